"""Random key lookup (P4) at 10^4..10^7 keys: 16-byte keys to int values.

Run alone: ``python3 -m benchmarks.lookup [--quick|--full]``.  Every store is
grown once from empty through every size (10^4, 10^5 in ``--quick``; up to
10^7 in ``--full``), committed at each size, and at each size looks up random
existing keys (the same keys for every store): timed passes taken side by
side, one pass of every store per round, so that a burst of noise on the
shared machine hits them all, each right after an untimed pass of the same
store to warm its caches.  Keys are ``b"key-%012d" % i``, values ``i``.

- permastruct: ``Dict[ByteString, Int]``, ``d[key]``; grown one ``d[key] = i``
  at a time.  The build table has a second row, ``permastruct (update)``: the
  same Dict grown with one ``d.update(pairs)`` per million keys (the bulk
  call; it is not looked up, its table is the same);
- sqlite3: ``SELECT v FROM kv WHERE k=?`` on ``k BLOB PRIMARY KEY``;
- lmdb: ``txn.get(key)`` in one read transaction, the value ``struct``-unpacked;
- ZODB: an ``OOBTree``, ``tree[key]`` (after its commit, default cache);
- diskcache: ``cache[key]``; shelve: ``shelf[str_key]``;
- pickle: a dict pickled to a file at each size and loaded back (the load
  time is in the note), then ``d[key]``; plain: a ``dict``.
- ctypes has no keyed lookup (n/a).

A second table gives the cost of building each store (microseconds per key
inserted, commits included), since that is what a larger size costs.
"""

if __package__ in (None, ""):  # run as a script
    import os as _os
    import sys as _sys
    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    __package__ = "benchmarks"
    import benchmarks  # noqa: F401

import pickle
import random
import struct
import time

from . import _stores as S
from .harness import OURS, Bar, Stats, Table, count_text, fmt, fmt_ratio, time_call

NAME = "lookup"
BULK = OURS + " (update)"  # a build-table row only
P4_LIMIT = 1.25  # DESIGN.md section 7: the floor of a pure-Python probe measured 1.15x
TITLE = "Random key lookup"
VALUE = struct.Struct("<q")
CHUNK = 1_000_000  # keys per write transaction while growing


def key(i):
    return b"key-%012d" % i


# -- one builder per store: grow(lo, hi), then lookups(sample) -> fn(number) ------------------
class Ours:
    FILE = "ours.ps"

    def __init__(self, ctx):
        self.path = ctx.fresh(NAME, self.FILE)
        self.p = S.open_ours(self.path)
        self.p.root.keys = self.p.schema.KeyIndex()
        self.d = self.p.root.keys

    def grow(self, lo, hi):
        d, p = self.d, self.p
        for start in range(lo, hi, CHUNK):
            for i in range(start, min(hi, start + CHUNK)):
                d[key(i)] = i
            p.commit()

    def lookups(self, sample):
        d = self.d

        def go(number):
            for k in sample:
                d[k]
        return go

    def close(self):
        self.p.close()
        S.remove(self.path)


class OursBulk(Ours):
    FILE = "ours-update.ps"

    def grow(self, lo, hi):
        d, p = self.d, self.p
        for start in range(lo, hi, CHUNK):
            d.update((key(i), i) for i in range(start, min(hi, start + CHUNK)))
            p.commit()


class Sqlite:
    def __init__(self, ctx):
        self.path = ctx.fresh(NAME, "sqlite.db")
        self.conn = S.open_sqlite(self.path)
        self.conn.execute("CREATE TABLE kv (k BLOB PRIMARY KEY, v INTEGER)")

    def grow(self, lo, hi):
        for start in range(lo, hi, CHUNK):
            self.conn.executemany("INSERT INTO kv VALUES (?, ?)",
                                  ((key(i), i) for i in range(start, min(hi, start + CHUNK))))
            self.conn.commit()

    def lookups(self, sample):
        execute = self.conn.cursor().execute

        def go(number):
            for k in sample:
                execute("SELECT v FROM kv WHERE k=?", (k,)).fetchone()[0]
        return go

    def close(self):
        self.conn.close()
        S.remove(self.path)


class Lmdb:
    def __init__(self, ctx):
        self.path = ctx.fresh(NAME, "lmdb")
        self.env = S.open_lmdb(self.path)
        self.txn = None

    def grow(self, lo, hi):
        if self.txn is not None:
            self.txn.abort()
            self.txn = None
        pack = VALUE.pack
        for start in range(lo, hi, CHUNK):
            with self.env.begin(write=True) as txn:
                put = txn.put
                for i in range(start, min(hi, start + CHUNK)):
                    put(key(i), pack(i))

    def lookups(self, sample):
        self.txn = self.env.begin()
        get, unpack = self.txn.get, VALUE.unpack

        def go(number):
            for k in sample:
                unpack(get(k))[0]
        return go

    def close(self):
        if self.txn is not None:
            self.txn.abort()
        self.env.close()
        S.remove(self.path)


class Zodb:
    def __init__(self, ctx):
        import transaction
        from BTrees.OOBTree import OOBTree
        self.transaction = transaction
        self.path = ctx.path(NAME, "zodb.fs")
        S.zodb_remove(self.path)
        self.z = S.open_zodb(self.path)
        self.tree = self.z.root["keys"] = OOBTree()
        transaction.commit()

    def grow(self, lo, hi):
        tree = self.tree
        for start in range(lo, hi, CHUNK):
            for i in range(start, min(hi, start + CHUNK)):
                tree[key(i)] = i
            self.transaction.commit()

    def lookups(self, sample):
        tree = self.tree

        def go(number):
            for k in sample:
                tree[k]
        return go

    def close(self):
        self.z.close()
        S.zodb_remove(self.path)


class Diskcache:
    def __init__(self, ctx):
        self.path = ctx.fresh(NAME, "diskcache")
        self.cache = S.open_diskcache(self.path)

    def grow(self, lo, hi):
        cache = self.cache
        for start in range(lo, hi, CHUNK):
            with cache.transact():
                for i in range(start, min(hi, start + CHUNK)):
                    cache[key(i)] = i

    def lookups(self, sample):
        cache = self.cache

        def go(number):
            for k in sample:
                cache[k]
        return go

    def close(self):
        self.cache.close()
        S.remove(self.path)


class Shelve:
    def __init__(self, ctx):
        self.path = ctx.path(NAME, "shelf")
        S.shelve_remove(self.path)
        self.shelf = S.open_shelve(self.path, "n")

    def grow(self, lo, hi):
        shelf = self.shelf
        for i in range(lo, hi):
            shelf[key(i).decode()] = i
        shelf.sync()

    def lookups(self, sample):
        shelf = self.shelf
        keys = [k.decode() for k in sample]

        def go(number):
            for k in keys:
                shelf[k]
        return go

    def close(self):
        self.shelf.close()
        S.shelve_remove(self.path)


class Pickle:
    def __init__(self, ctx):
        self.path = ctx.fresh(NAME, "keys.pickle")
        self.d = {}
        self.loaded = None

    def grow(self, lo, hi):
        self.loaded = None
        d = self.d
        for i in range(lo, hi):
            d[key(i)] = i
        with open(self.path, "wb") as out:
            pickle.dump(d, out, protocol=pickle.HIGHEST_PROTOCOL)

    def lookups(self, sample):
        start = time.perf_counter()
        with open(self.path, "rb") as source:
            self.loaded = d = pickle.load(source)
        self.load_seconds = time.perf_counter() - start

        def go(number):
            for k in sample:
                d[k]
        return go

    def close(self):
        S.remove(self.path)


class Plain:
    def __init__(self, ctx):
        self.d = {}

    def grow(self, lo, hi):
        d = self.d
        for i in range(lo, hi):
            d[key(i)] = i

    def lookups(self, sample):
        d = self.d

        def go(number):
            for k in sample:
                d[k]
        return go

    def close(self):
        self.d = None


BUILDERS = {OURS: Ours, "sqlite3": Sqlite, "shelve": Shelve, "pickle": Pickle, "lmdb": Lmdb, "ZODB": Zodb,
            "diskcache": Diskcache, "plain": Plain, "ctypes": "n/a: ctypes has no keyed lookup"}


def limits(ctx):
    """The largest size each store is grown to (the slow builders stop earlier; the note says so)."""
    if ctx.mode == "full":
        return {"shelve": 10 ** 6, "diskcache": 10 ** 6}
    if ctx.mode == "quick":
        return {"shelve": 10 ** 4, "diskcache": 10 ** 4, "ZODB": 10 ** 5}
    return {}


def run(ctx):
    sizes = ctx.pick(smoke=[100, 1000], quick=[10 ** 4, 10 ** 5], full=[10 ** 4, 10 ** 5, 10 ** 6, 10 ** 7])
    lookups = ctx.pick(smoke=200, quick=5000, full=50_000)
    repeat = ctx.pick(smoke=2, quick=3, full=5)
    table = Table(NAME, "Random key lookup (ns per lookup)", "ns/lookup", 1e9)
    table.notes.append(f"{lookups:,} random existing keys per timed pass, {repeat} timed passes taken side by side "
                       "(one pass of every store per round, each after an untimed pass of the same store)")
    build = Table(f"{NAME}-build", "Building the lookup stores (us per key inserted, commits included)",
                  "us/key", 1e6)
    build.notes.append(f"{BULK}: the same Dict grown with one update() of (key, value) pairs per million keys")
    rng = random.Random(7)
    samples = {n: [key(rng.randrange(n)) for _ in range(lookups)] for n in sizes}
    cap = limits(ctx)
    builders = {}
    try:
        for store in ctx.stores:
            builder_class = BUILDERS.get(store, "n/a")
            skip = builder_class if isinstance(builder_class, str) else ctx.skipped(store)
            if not skip:
                try:
                    builders[store] = builder_class(ctx)
                except Exception as exc:  # noqa: BLE001 - a peer that fails is a row that says so
                    skip = _failed(ctx, store, exc)
            if skip:
                for n in sizes:
                    table.add(f"{count_text(n)} keys", store, note=skip)
                    build.add(f"{count_text(n)} keys", store, note=skip)
            if store == OURS and OURS in builders:
                builders[BULK] = OursBulk(ctx)
        _grow_and_look_up(ctx, builders, sizes, samples, repeat, cap, table, build)
    finally:
        for builder in builders.values():
            try:
                builder.close()
            except Exception:  # noqa: BLE001 - cleanup of a failed peer
                pass
    for note in [f"{store} stops at {count_text(limit)} keys in this mode (building it further takes too long)"
                 for store, limit in cap.items() if limit < sizes[-1] and store in ctx.stores]:
        table.notes.append(note)
    return [table, build], _bars(table, sizes, build)


def _failed(ctx, store, exc):
    import traceback
    ctx.log(f"{store} failed in lookup:\n" + traceback.format_exc())
    return f"failed: {type(exc).__name__}: {str(exc)[:80]}"


def _side_by_side(passes, repeat):
    """Seconds of ``repeat`` timed passes of each store (name -> fn), one of each per round.

    Each timed pass follows an untimed one of the same store: the pass of the
    store before it (a sqlite3 pass reads megabytes) would otherwise leave it
    cold caches, the sampled keys included, and the store after it warm ones.
    """
    seconds = {store: [] for store in passes}
    for _ in range(repeat):
        for store, go in passes.items():
            go(1)
            seconds[store].append(time_call(go, 1))
    return seconds


def _grow_and_look_up(ctx, builders, sizes, samples, repeat, cap, table, build):
    """At each size: grow every store to it (timed), then time their lookups side by side."""
    grown = dict.fromkeys(builders, 0)
    failed = {}
    for n in sizes:
        case = f"{count_text(n)} keys"
        passes = {}
        for store, builder in builders.items():
            if store in failed:
                note = failed[store]
            elif cap.get(store) is not None and n > cap[store]:
                note = f"not run at this size: building {store} to {count_text(n)} keys takes too long"
            else:
                note = ""
                try:
                    start = time.perf_counter()
                    builder.grow(grown[store], n)
                    elapsed = time.perf_counter() - start
                    build.add(case, store, Stats.of([elapsed / (n - grown[store])]), n=n)
                    ctx.log(f"lookup {case} {store}: built at {elapsed / max(1, n - grown[store]) * 1e6:,.2f} us/key")
                    grown[store] = n
                    if store != BULK:
                        passes[store] = builder.lookups(samples[n])
                except Exception as exc:  # noqa: BLE001 - a peer that fails is a row that says so
                    note = failed[store] = _failed(ctx, store, exc)
            if note:
                build.add(case, store, note=note)
                if store != BULK:
                    table.add(case, store, note=note)
        if not passes:
            continue
        found = _side_by_side(passes, repeat)
        for store, seconds in found.items():
            stats = Stats.of([s / len(samples[n]) for s in seconds])
            note = ""
            if store == "pickle":
                note = f"after loading the whole pickle: {fmt(builders[store].load_seconds * 1e3)} ms"
            table.add(case, store, stats, note, n=n)
            ctx.log(f"lookup {case} {store}: {stats.median * 1e9:,.0f} ns")


def _bars(table, sizes, build=None):
    """P4 (lookup: <= 1.25x lmdb's get and 3x faster than sqlite3 at every size measured, the figures
    given at 10^6 keys; DESIGN.md section 7)
    and P4b (building 10^6 keys, commits included: <= 2x lmdb's puts, faster than sqlite3; our
    better of one insert a key and update()).  Functions of the tables: a saved run is re-judged
    by calling it again."""
    target = 10 ** 6 if 10 ** 6 in sizes else sizes[-1]
    case = f"{count_text(target)} keys"
    note = "" if target == 10 ** 6 else f"measured at {count_text(target)} keys (--full measures 10^6)"
    bars = []
    ours = table.value(case, OURS)
    parts, holds = [], []
    for name, limit in (("lmdb", P4_LIMIT), ("sqlite3", 1 / 3)):
        value = table.value(case, name)
        if ours is not None and value is not None:
            parts.append((name, table.ratio(case, name), value))
            holds.append(table.ratio(case, name) <= limit)
    if parts:
        # issue 12 asks for the ratios at every size: the bar holds only if every measured size meets them
        others, missed = [], []
        for n in sizes:
            size_case = f"{count_text(n)} keys"
            if table.value(size_case, OURS) is None:
                continue
            for name, limit in (("lmdb", P4_LIMIT), ("sqlite3", 1 / 3)):
                if table.value(size_case, name) is not None and table.ratio(size_case, name) > limit:
                    missed.append(f"{count_text(n)} vs {name}")
            if n != target and table.value(size_case, "lmdb") is not None:
                others.append(f"{count_text(n)}: {fmt_ratio(table.ratio(size_case, 'lmdb'))}")
        holds = holds + [not missed]
        text = "; ".join(t for t in (note, "vs lmdb at " + ", ".join(others) if others else "",
                                     "missed at " + ", ".join(missed) if missed else "") if t)
        bars.append(Bar("P4", "random key lookup in a Dict of 1M keys",
                        f"<= {P4_LIMIT:g}x lmdb get; 3x faster than sqlite3", f"{fmt(ours)} ns",
                        ", ".join(f"{name} {fmt(value)} ns" for name, _, value in parts),
                        " / ".join(f"{fmt_ratio(r)} vs {name}" for name, r, _ in parts),
                        all(holds) and len(parts) == 2, text))
    if build is not None:
        mine = [(build.value(case, store), store) for store in (OURS, BULK) if build.value(case, store) is not None]
        lmdb, sqlite = build.value(case, "lmdb"), build.value(case, "sqlite3")
        if mine and lmdb is not None and sqlite is not None:
            best, store = min(mine)
            bars.append(Bar("P4b", "build a Dict of 1M keys, commit included", "<= 2x lmdb puts, faster than sqlite3",
                            " / ".join(f"{fmt(value)} us ({name})" for value, name in mine),
                            f"lmdb {fmt(lmdb)} us, sqlite3 {fmt(sqlite)} us",
                            f"{fmt_ratio(best / lmdb)} vs lmdb / {fmt_ratio(best / sqlite)} vs sqlite3 ({store})",
                            best <= 2 * lmdb and best < sqlite, note))
    return bars


def judge(tables):
    """The bars of a saved run's tables (see ``python -m benchmarks --write-docs --from``)."""
    from ._report import parse_size
    table, build = tables
    sizes = sorted(parse_size(case) for case in table.cases())
    return _bars(table, sizes, build)


def main(argv=None):
    from .__main__ import main as suite
    return suite(["--only", NAME, *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
