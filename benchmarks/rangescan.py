"""Range scan of an ordered index: (key, value) pairs of consecutive int keys from a random start.

Run alone: ``python3 -m benchmarks.rangescan [--quick|--full]``.  An index of
n int keys (10^6 in ``--full``, 10^5 in ``--quick``) to int values; each
timed pass scans ranges of 100 and of 10,000 keys at random starts (the same
for every store) and reads every pair.  Figures are ns per pair returned.

- permastruct: ``SortedDict[Int, Int]``: ``for k, v in d.irange_items(a, b)``
  (a leaf's key and value cells read at once); a second row gives the keys
  alone (``d.irange(a, b)``);
- sqlite3: ``SELECT k, v FROM t WHERE k BETWEEN ? AND ?`` on an ``INTEGER PRIMARY KEY``;
- lmdb: a cursor ``set_range`` to the big-endian start key, then ``next``;
- ZODB: ``IOBTree.items(a, b)``;
- plain: a sorted list of pairs, ``bisect`` to the start, then indexing.
- shelve, diskcache, pickle and ctypes have no ordered range query (n/a);
  a loaded pickle is the plain case.
"""

if __package__ in (None, ""):  # run as a script
    import os as _os
    import sys as _sys
    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    __package__ = "benchmarks"
    import benchmarks  # noqa: F401

import bisect
import random
import struct

from . import _stores as S
from .harness import OURS, Bar, Stats, Table, count_text, fmt, fmt_ratio, measure

NAME = "rangescan"
TITLE = "Range scan"
KEY = struct.Struct(">Q")
VALUE = struct.Struct("<q")
KEYS_ONLY = "permastruct (keys only)"


def _ours(ctx, n):
    path = ctx.fresh(NAME, "ours.ps")
    p = S.open_ours(path)
    p.root.index = p.schema.IntIndex()
    index = p.root.index
    for i in range(n):
        index[i] = 2 * i
    p.commit()

    def scan(a, b):
        for k, v in index.irange_items(a, b):
            pass

    def keys(a, b):
        for k in index.irange(a, b):
            pass

    def close():
        p.close()
        S.remove(path)
    return {OURS: scan, KEYS_ONLY: keys}, close


def _sqlite(ctx, n):
    path = ctx.fresh(NAME, "sqlite.db")
    conn = S.open_sqlite(path)
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", ((i, 2 * i) for i in range(n)))
    conn.commit()
    execute = conn.cursor().execute

    def scan(a, b):
        for k, v in execute("SELECT k, v FROM t WHERE k BETWEEN ? AND ?", (a, b)):
            pass

    def close():
        conn.close()
        S.remove(path)
    return {"sqlite3": scan}, close


def _lmdb(ctx, n):
    path = ctx.fresh(NAME, "lmdb")
    env = S.open_lmdb(path)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(KEY.pack(i), VALUE.pack(2 * i), append=True)
    txn = env.begin()
    cursor = txn.cursor()
    pack, unpack_key, unpack_value = KEY.pack, KEY.unpack, VALUE.unpack
    high_key = KEY.pack

    def scan(a, b):
        if not cursor.set_range(pack(a)):
            return
        end = high_key(b)
        for k, v in cursor:
            if k > end:
                break
            unpack_key(k)[0], unpack_value(v)[0]

    def close():
        txn.abort()
        env.close()
        S.remove(path)
    return {"lmdb": scan}, close


def _zodb(ctx, n):
    import transaction
    from BTrees.IOBTree import IOBTree
    path = ctx.path(NAME, "zodb.fs")
    S.zodb_remove(path)
    z = S.open_zodb(path)
    tree = z.root["index"] = IOBTree()
    for i in range(n):
        tree[i] = 2 * i
    transaction.commit()

    def scan(a, b):
        for k, v in tree.items(a, b):
            pass

    def close():
        z.close()
        S.zodb_remove(path)
    return {"ZODB": scan}, close


def _plain(ctx, n):
    pairs = [(i, 2 * i) for i in range(n)]
    keys = [i for i in range(n)]

    def scan(a, b):
        start = bisect.bisect_left(keys, a)
        stop = bisect.bisect_right(keys, b)
        for j in range(start, stop):
            k, v = pairs[j]
    return {"plain": scan}, (lambda: None)


SETUPS = {OURS: _ours, "sqlite3": _sqlite, "lmdb": _lmdb, "ZODB": _zodb, "plain": _plain}
NOT_APPLICABLE = {
    "shelve": "n/a: no ordered keys", "diskcache": "n/a: no range query by key",
    "pickle": "n/a: a loaded pickle is the plain case", "ctypes": "n/a: no ordered index",
}


def run(ctx):
    n = ctx.pick(smoke=2000, quick=100_000, full=1_000_000)
    lengths = ctx.pick(smoke=[10, 100], quick=[100, 10_000], full=[100, 10_000])
    items_per_pass = ctx.pick(smoke=500, quick=20_000, full=200_000)
    repeat = ctx.pick(smoke=2, quick=3, full=5)
    rng = random.Random(11)
    starts = {length: [rng.randrange(n - length) for _ in range(max(1, items_per_pass // length))]
              for length in lengths}
    table = Table(NAME, f"Range scan of an index of {count_text(n)} int keys (ns per pair)", "ns/pair", 1e9)
    table.notes.append(f"about {items_per_pass:,} pairs per timed pass at random starts, one warm-up pass, "
                       f"{repeat} timed passes")
    scans, closers, failures = {}, [], {}
    stores = list(ctx.stores)
    if OURS in stores:
        stores.insert(stores.index(OURS) + 1, KEYS_ONLY)
    for store in ctx.stores:
        setup = SETUPS.get(store)
        if setup is None or ctx.skipped(store):
            continue
        try:
            found, close = setup(ctx, n)
        except Exception as exc:  # noqa: BLE001
            failures[store] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
            continue
        scans.update(found)
        closers.append(close)
        ctx.log(f"rangescan: {store} built")
    try:
        for length in lengths:
            case = f"ranges of {length:,} keys"
            impls = {}
            for store in stores:
                if store in scans:
                    scan = scans[store]

                    def go(number, scan=scan, length=length):
                        for a in starts[length]:
                            scan(a, a + length - 1)
                    impls[store] = (lambda go=go, length=length: Stats.of(
                        [s / (len(starts[length]) * length) for s in measure(go, repeat=repeat).samples]))
                else:
                    impls[store] = failures.get(store) or NOT_APPLICABLE.get(store, "n/a")
            saved = ctx.stores
            ctx.stores = stores
            try:
                ctx.run_stores(table, case, impls)
            finally:
                ctx.stores = saved
    finally:
        for close in closers:
            close()
    return [table], _bars(table)


def _bars(table):
    """P4c: a range scan of (key, value) pairs faster than sqlite3 and <= 1.5x an lmdb cursor, in the
    ranges of the largest length measured (DESIGN.md section 7)."""
    cases = [case for case in table.cases() if table.value(case, OURS) is not None]
    if not cases:
        return []
    case = cases[-1]
    lmdb, sqlite = table.value(case, "lmdb"), table.value(case, "sqlite3")
    if lmdb is None or sqlite is None:
        return []
    ours = table.value(case, OURS)
    others = [f"{other}: {fmt_ratio(table.ratio(other, 'lmdb'))} vs lmdb, {fmt_ratio(table.ratio(other, 'sqlite3'))} "
              "vs sqlite3" for other in cases[:-1] if table.value(other, "lmdb") and table.value(other, "sqlite3")]
    return [Bar("P4c", "SortedDict range scan of (key, value) pairs", "faster than sqlite3, <= 1.5x an lmdb cursor",
                f"{fmt(ours)} ns/pair ({case})", f"lmdb {fmt(lmdb)} ns, sqlite3 {fmt(sqlite)} ns",
                f"{fmt_ratio(table.ratio(case, 'lmdb'))} vs lmdb / {fmt_ratio(table.ratio(case, 'sqlite3'))} vs sqlite3",
                table.ratio(case, "sqlite3") < 1 and table.ratio(case, "lmdb") <= 1.5, "; ".join(others))]


def judge(tables):
    """The bars of a saved run's tables (see ``python -m benchmarks --write-docs --from``)."""
    return _bars(tables[0])


def main(argv=None):
    from .__main__ import main as suite
    return suite(["--only", NAME, *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
