"""Field read and write (P1, P2): one scalar field of one record, in every store.

Run alone: ``python3 -m benchmarks.fields [--quick|--full]`` (or
``python3 benchmarks/fields.py``).  Each store reads (then writes) the ``Int``
and the ``Float`` field of one record, as its API does it:

- permastruct: ``agent.age`` of a persistent structure; writes happen inside
  the open transaction (dirty tracking is asked of the kernel at commit, so
  the write figure is the whole cost);
- plain: a ``__slots__`` attribute - the reference of P1 and P2;
- ctypes: a field of a ``ctypes.Structure``;
- sqlite3: ``SELECT age FROM agent WHERE id=1`` / ``UPDATE`` inside one open
  transaction;
- lmdb: ``struct.unpack_from`` of ``txn.get(key)`` / ``txn.put`` of the packed
  record inside one write transaction;
- ZODB: an attribute of a loaded persistent object (writes mark it changed);
- diskcache, shelve: get (and unpickle) / set the whole record;
- pickle: the dict loaded from the pickle file (a plain dict item once loaded).

P2 is judged against the floor of a write that refuses what does not fit
(DESIGN.md section 7): the cheapest of the range-checking Python setters of
``benchmarks/floors.py``, timed in the same rounds (rows ``floor: ...``).  A
``ctypes`` field write does not check (an ``int64`` field takes ``2**64 + 5``
as ``5``), so no checked write in Python can be cheaper than such a hook.

Each figure is ns per operation (the statement unrolled ten times in the
timed loop, the empty loop's cost subtracted); the
stores run side by side, one timing of each per round, and the ratios are
the medians of the per-round ratios.
"""

if __package__ in (None, ""):  # run as a script: python3 benchmarks/fields.py
    import os as _os
    import sys as _sys
    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    __package__ = "benchmarks"
    import benchmarks  # noqa: F401

import contextlib
import ctypes
import pickle
import struct
import timeit

from . import _stores as S
from . import floors
from .harness import OURS, Bar, Stats, Table, fmt, fmt_ratio, paired_ratio

NAME = "fields"
TITLE = "Field read and write"

CASES = ("Int field read", "Float field read", "Int field write", "Float field write")
RECORD = struct.Struct("<qd")
UNROLL = 10
FLOOR = "floor: "  # the prefix of the rows of the range-checking setters (P2's reference)
P2_LIMIT = 1.3


def _floor_targets():
    """``{row name: object}``: a record whose ``age`` write is each of ``floors``' range-checking setters."""
    targets = {}
    for label, hook in floors.HOOKS.items():
        cls = floors._ctypes_class()
        cls.__setattr__ = hook(cls)
        targets[FLOOR + label] = cls.from_buffer(bytearray(ctypes.sizeof(cls)))
    targets[FLOOR + "property setter"] = floors._property_record()
    return targets


class Plain:
    __slots__ = ("age", "weight")


class CAgent(ctypes.Structure):
    _fields_ = [("age", ctypes.c_int64), ("weight", ctypes.c_double)]


def _setup(ctx, stack):
    """``{store: namespace}`` with an ``agent``-like object (age 31, weight 72.5) in each store."""
    spaces = {}
    p = stack.enter_context(_closing(S.open_ours(ctx.fresh("fields", "ours.ps"))))
    p.root.agent = p.schema.Agent(age=31, weight=72.5)
    p.commit()
    spaces[OURS] = {"agent": p.root.agent, "_storage": p}
    plain = Plain()
    plain.age, plain.weight = 31, 72.5
    spaces["plain"] = {"agent": plain}
    spaces["ctypes"] = {"agent": CAgent(31, 72.5)}
    if not ctx.skipped("sqlite3"):
        conn = S.open_sqlite(ctx.fresh("fields", "sqlite.db"))
        stack.callback(conn.close)
        conn.execute("CREATE TABLE agent (id INTEGER PRIMARY KEY, age INTEGER, weight REAL)")
        conn.execute("INSERT INTO agent VALUES (1, 31, 72.5)")
        conn.commit()
        cur = conn.cursor()
        cur.execute("BEGIN")  # every statement below runs in this one transaction
        stack.callback(conn.rollback)
        spaces["sqlite3"] = {"cur": cur}
    if not ctx.skipped("lmdb"):
        env = S.open_lmdb(ctx.fresh("fields", "lmdb"), map_size=1 << 26)
        stack.callback(env.close)
        with env.begin(write=True) as txn:
            txn.put(b"agent", RECORD.pack(31, 72.5))
        read_txn = env.begin()
        stack.callback(read_txn.abort)
        spaces["lmdb"] = {"txn": read_txn, "unpack": RECORD.unpack_from, "pack": RECORD.pack, "env": env}
    if not ctx.skipped("ZODB"):
        import transaction
        from ._zodb import ZAgent
        path = ctx.fresh("fields", "zodb.fs")
        S.zodb_remove(path)
        z = S.open_zodb(path)
        stack.callback(z.close)
        z.root["agent"] = ZAgent(31, 72.5)
        transaction.commit()
        spaces["ZODB"] = {"agent": z.root["agent"]}
    if not ctx.skipped("diskcache"):
        cache = S.open_diskcache(ctx.fresh("fields", "diskcache"))
        stack.callback(cache.close)
        cache["agent"] = (31, 72.5)
        spaces["diskcache"] = {"cache": cache}
    if not ctx.skipped("shelve"):
        path = ctx.fresh("fields", "shelf")
        S.shelve_remove(path)
        shelf = S.open_shelve(path)
        stack.callback(shelf.close)
        shelf["agent"] = (31, 72.5)
        spaces["shelve"] = {"shelf": shelf}
    if not ctx.skipped("pickle"):
        path = ctx.fresh("fields", "agent.pickle")
        with open(path, "wb") as out:
            pickle.dump({"age": 31, "weight": 72.5}, out)
        with open(path, "rb") as source:
            spaces["pickle"] = {"agent": pickle.load(source)}
    return spaces


@contextlib.contextmanager
def _closing(storage):
    try:
        yield storage
    finally:
        if not storage.closed:
            storage.rollback()
            storage.close()


def _statements(case):
    """``{store: statement}`` for one case (statements run with the store's namespace)."""
    field = "age" if case.startswith("Int") else "weight"
    value = "32" if field == "age" else "73.5"
    index = 0 if field == "age" else 1
    if case.endswith("read"):
        return {
            OURS: f"agent.{field}", "plain": f"agent.{field}", "ctypes": f"agent.{field}",
            "sqlite3": f"cur.execute('SELECT {field} FROM agent WHERE id=1').fetchone()[0]",
            "lmdb": f"unpack(txn.get(b'agent'))[{index}]",
            "ZODB": f"agent.{field}",
            "diskcache": f"cache['agent'][{index}]",
            "shelve": f"shelf['agent'][{index}]",
            "pickle": f"agent['{field}']",
        }
    pair = "(32, 72.5)" if field == "age" else "(31, 73.5)"
    return {
        OURS: f"agent.{field} = {value}", "plain": f"agent.{field} = {value}",
        "ctypes": f"agent.{field} = {value}",
        "sqlite3": f"cur.execute('UPDATE agent SET {field}=? WHERE id=1', ({value},))",
        "lmdb": f"wtxn.put(b'agent', pack(*{pair}))",
        "ZODB": f"agent.{field} = {value}",
        "diskcache": f"cache['agent'] = {pair}",
        "shelve": f"shelf['agent'] = {pair}",
        "pickle": f"agent['{field}'] = {value}",
    }


def run(ctx):
    repeat = ctx.pick(smoke=2, quick=7, full=21)
    target = ctx.pick(smoke=0.0005, quick=0.008, full=0.05)
    tables, ratios = [], {}
    with contextlib.ExitStack() as stack:
        spaces = _setup(ctx, stack)
        overhead_timer = timeit.Timer("pass")
        overhead = min(overhead_timer.timeit(1_000_000) for _ in range(3)) / 1_000_000
        for case in CASES:
            table = Table(f"{NAME}:{case}", f"{case}", "ns/op", 1e9, paired=True)
            table.notes.append("side by side: one timing of each store per round; ours / theirs is the median "
                               "of the per-round ratios")
            statements = _statements(case)
            timers, numbers = {}, {}
            with contextlib.ExitStack() as writes:
                for store in ctx.stores:
                    if store not in spaces:
                        continue
                    namespace = dict(spaces[store])
                    if store == "lmdb" and case.endswith("write"):
                        wtxn = namespace["env"].begin(write=True)
                        writes.callback(wtxn.abort)
                        namespace["wtxn"] = wtxn
                    if store == "diskcache" and case.endswith("write"):
                        writes.enter_context(namespace["cache"].transact())
                    # Unrolled UNROLL times, so the loop's own cost is a small part of a figure.
                    timers[store] = timeit.Timer("\n".join([statements[store]] * UNROLL), globals=namespace)
                if case.endswith("write"):  # P2's floor (an Int field's checked write), in the same rounds
                    for label, record in _floor_targets().items():
                        timers[label] = timeit.Timer("\n".join(["agent.age = 32"] * UNROLL), globals={"agent": record})
                for store, timer in timers.items():
                    number = 10
                    while True:
                        elapsed = timer.timeit(number)
                        if elapsed > target / 10 or number >= 1_000_000:
                            break
                        number *= 10
                    numbers[store] = max(1, min(5_000_000, int(target * number / max(elapsed, 1e-9))))
                samples = {store: [] for store in timers}
                for _ in range(repeat):
                    for store, timer in timers.items():
                        elapsed = timer.timeit(numbers[store]) / numbers[store]
                        samples[store].append(max((elapsed - overhead) / UNROLL, 1e-12))
            impls = {store: (lambda values=values: Stats.of(values)) for store, values in samples.items()}
            for store in ctx.stores:
                if store not in impls:
                    impls[store] = f"skipped: {ctx.peers[store][1]}" if ctx.skipped(store) else "n/a"
            ctx.run_stores(table, case, impls)
            floor_rows = sorted((Stats.of(values).median, label) for label, values in samples.items()
                                if label.startswith(FLOOR))
            for _, label in floor_rows:
                table.add(case, label, Stats.of(samples[label]), note="range-checking Python setter (floors.py)")
            tables.append(table)
            if floor_rows:
                floor = floor_rows[0][1]
                floor_samples = samples[floor]
                table.notes.append(f"P2's floor: the cheapest range-checking setter, {floor[len(FLOOR):]}")
            if OURS in samples and "plain" in samples:
                ratios[case] = (paired_ratio(samples[OURS], samples["plain"]),
                                Stats.of(samples[OURS]).median, Stats.of(samples["plain"]).median)
            if OURS in samples and case.endswith("write") and floor_rows:
                ratios["floor " + case] = (paired_ratio(samples[OURS], floor_samples), Stats.of(samples[OURS]).median,
                                           Stats.of(floor_samples).median, floor[len(FLOOR):])
    return tables, _bars(ratios)


def _bars(ratios):
    """P1 against a ``__slots__`` read; P2 against the cheapest range-checking setter (DESIGN.md section 7)."""
    bars = []
    for bar_id, operation, cases, limit, bar, peer in (
            ("P1", "read a scalar field", ("Int field read", "Float field read"), 4.0,
             "<= 4x a __slots__ attribute", "plain __slots__"),
            ("P2", "write a scalar field (in a transaction)", ("floor Int field write", "floor Float field write"),
             P2_LIMIT, f"within {P2_LIMIT:g}x the cheapest range-checking Python setter", None)):
        found = [ratios[case] for case in cases if case in ratios]
        if not found:
            continue
        worst = max(found, key=lambda entry: entry[0])
        ours_text = " / ".join(f"{fmt(ratios[c][1] * 1e9)} ns" for c in cases if c in ratios)
        peer_text = " / ".join(f"{fmt(ratios[c][2] * 1e9)} ns" for c in cases if c in ratios)
        ratio_text = " / ".join(fmt_ratio(ratios[c][0]) for c in cases if c in ratios)
        if peer is None:  # the floor: one setter, measured beside each of our writes
            peer = f"{found[0][3]} (floors.py)"
        bars.append(Bar(bar_id, operation, bar, f"{ours_text} (Int / Float)", f"{peer}: {peer_text}", ratio_text,
                        worst[0] <= limit))
    return bars


def main(argv=None):
    from .__main__ import main as suite
    return suite(["--only", NAME, *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
