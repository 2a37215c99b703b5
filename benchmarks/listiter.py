"""List iteration: read every element of a stored sequence of n ints, in order.

Run alone: ``python3 -m benchmarks.listiter [--quick|--full]``.  n is 10^6 in
``--full``, 10^5 in ``--quick``; figures are ns per element, one warm-up
pass, then timed passes.

- permastruct: ``for x in lst`` over a ``List[Int]``;
- plain: a ``list``; ctypes: a ``c_int64`` array;
- sqlite3: ``SELECT v FROM t`` (rowid order);
- lmdb: a cursor over 8-byte keys, values ``struct``-unpacked;
- ZODB: ``IOBTree.values()``;
- pickle: the list loaded from its file (load time in the note), then iterated;
- shelve, diskcache: every key, then its value (they keep no order; capped
  at a smaller n, said in the note).
"""

if __package__ in (None, ""):  # run as a script
    import os as _os
    import sys as _sys
    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    __package__ = "benchmarks"
    import benchmarks  # noqa: F401

import ctypes
import pickle
import struct
import time

from . import _stores as S
from .harness import OURS, Stats, Table, count_text, fmt, measure

NAME = "listiter"
TITLE = "List iteration"
KEY = struct.Struct(">Q")
VALUE = struct.Struct("<q")


def _ours(ctx, n):
    path = ctx.fresh(NAME, "ours.ps")
    p = S.open_ours(path)
    p.root.ints = []
    p.root.ints.extend(range(n))
    p.commit()
    lst = p.root.ints

    def it(number):
        for x in lst:
            pass

    def close():
        p.close()
        S.remove(path)
    return it, close, ""


def _plain(ctx, n):
    lst = list(range(n))

    def it(number):
        for x in lst:
            pass
    return it, (lambda: None), ""


def _ctypes(ctx, n):
    arr = (ctypes.c_int64 * n)(*range(n))

    def it(number):
        for x in arr:
            pass
    return it, (lambda: None), ""


def _sqlite(ctx, n):
    path = ctx.fresh(NAME, "sqlite.db")
    conn = S.open_sqlite(path)
    conn.execute("CREATE TABLE t (v INTEGER)")
    conn.executemany("INSERT INTO t VALUES (?)", ((i,) for i in range(n)))
    conn.commit()

    def it(number):
        for (x,) in conn.execute("SELECT v FROM t"):
            pass

    def close():
        conn.close()
        S.remove(path)
    return it, close, ""


def _lmdb(ctx, n):
    path = ctx.fresh(NAME, "lmdb")
    env = S.open_lmdb(path)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(KEY.pack(i), VALUE.pack(i), append=True)
    txn = env.begin()
    unpack = VALUE.unpack

    def it(number):
        for v in txn.cursor().iternext(keys=False, values=True):
            unpack(v)[0]

    def close():
        txn.abort()
        env.close()
        S.remove(path)
    return it, close, ""


def _zodb(ctx, n):
    import transaction
    from BTrees.IOBTree import IOBTree
    path = ctx.path(NAME, "zodb.fs")
    S.zodb_remove(path)
    z = S.open_zodb(path)
    tree = z.root["ints"] = IOBTree()
    for i in range(n):
        tree[i] = i
    transaction.commit()

    def it(number):
        for x in tree.values():
            pass

    def close():
        z.close()
        S.zodb_remove(path)
    return it, close, ""


def _pickle(ctx, n):
    path = ctx.fresh(NAME, "ints.pickle")
    with open(path, "wb") as out:
        pickle.dump(list(range(n)), out, protocol=pickle.HIGHEST_PROTOCOL)
    start = time.perf_counter()
    with open(path, "rb") as source:
        lst = pickle.load(source)
    load = time.perf_counter() - start

    def it(number):
        for x in lst:
            pass
    return it, (lambda: S.remove(path)), f"after loading the whole pickle: {fmt(load * 1e3)} ms"


def _diskcache(ctx, n):
    path = ctx.fresh(NAME, "diskcache")
    cache = S.open_diskcache(path)
    with cache.transact():
        for i in range(n):
            cache[i] = i

    def it(number):
        for k in cache:
            cache[k]

    def close():
        cache.close()
        S.remove(path)
    return it, close, ""


def _shelve(ctx, n):
    path = ctx.path(NAME, "shelf")
    S.shelve_remove(path)
    shelf = S.open_shelve(path, "n")
    for i in range(n):
        shelf[str(i)] = i
    shelf.sync()

    def it(number):
        for k in shelf:
            shelf[k]

    def close():
        shelf.close()
        S.shelve_remove(path)
    return it, close, ""


SETUPS = {OURS: _ours, "sqlite3": _sqlite, "shelve": _shelve, "pickle": _pickle, "lmdb": _lmdb, "ZODB": _zodb,
          "diskcache": _diskcache, "plain": _plain, "ctypes": _ctypes}


def run(ctx):
    n = ctx.pick(smoke=1000, quick=100_000, full=1_000_000)
    small = ctx.pick(smoke=1000, quick=10_000, full=100_000)  # shelve and diskcache
    repeat = ctx.pick(smoke=2, quick=3, full=5)
    table = Table(NAME, f"Iteration over {count_text(n)} stored ints (ns per element)", "ns/element", 1e9)
    table.notes.append(f"one warm-up pass, {repeat} timed passes")
    case = f"{count_text(n)} ints"

    def impl(store, setup):
        def go():
            size = small if store in ("shelve", "diskcache") else n
            it, close, note = setup(ctx, size)
            try:
                stats = measure(it, repeat=repeat)
            finally:
                close()
            if size != n:
                note = f"measured at {count_text(size)} elements (building {count_text(n)} takes too long)"
            return Stats.of([s / size for s in stats.samples]), {"note": note}
        return go

    ctx.run_stores(table, case, {store: impl(store, setup) for store, setup in SETUPS.items()})
    return [table], []


def main(argv=None):
    from .__main__ import main as suite
    return suite(["--only", NAME, *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
