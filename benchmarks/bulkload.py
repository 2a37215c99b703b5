"""Bulk load (P3): n records (an int, a float, a 16-byte string) into a fresh store, then commit.

Run alone: ``python3 -m benchmarks.bulkload [--quick|--full]``.  n is 1M in
``--full`` (DESIGN.md's P3), 20,000 in ``--quick``.  Every figure is the wall
time from an empty store to the durable commit of all n records (the file
created, loaded, committed and closed, fsync included where the store
syncs), as each store does a bulk load best:

- permastruct: ``List[Rec]``, one ``append(Rec(i=, f=, name=))`` per record, ``commit()``;
- sqlite3: ``executemany`` of an ``INSERT`` in one transaction, ``commit()``;
- lmdb: one write transaction, ``put`` of the ``struct``-packed record under an 8-byte key;
- ZODB: persistent record objects in an ``IOBTree``, one ``transaction.commit()``;
- diskcache: ``cache[i] = (i, f, name)`` inside ``cache.transact()``;
- shelve: ``shelf[str(i)] = (i, f, name)``, ``close()``;
- pickle: a list of tuples pickled to a file, fsynced;
- plain, ctypes: the records built in RAM (a list of ``__slots__`` objects,
  an array of ``ctypes.Structure``) - no file, the floor of what Python can do.

P3 (DESIGN.md section 7, issue 11) is judged against sqlite3: one ``append``
per record must be faster than ``executemany`` in one transaction (lmdb is
shown beside it), and the bulk call (``List.extend_records`` of the same
rows, ``load_ours_bulk``) 3x faster.
"""

if __package__ in (None, ""):  # run as a script
    import os as _os
    import sys as _sys
    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    __package__ = "benchmarks"
    import benchmarks  # noqa: F401

import ctypes
import os
import pickle
import struct
import time

from . import _stores as S
from .harness import OURS, Bar, Stats, Table, count_text, fmt, fmt_ratio, not_measured

NAME = "bulkload"
TITLE = "Bulk load of records, then commit"
RECORD = struct.Struct("<qd16s")
KEY = struct.Struct(">Q")


def records(n):
    """The n records: ``(i, i * 0.5, 16-byte name)``."""
    return ((i, i * 0.5, b"name-%011d" % i) for i in range(n))


class PlainRec:
    __slots__ = ("i", "f", "name")

    def __init__(self, i, f, name):
        self.i, self.f, self.name = i, f, name


class CRec(ctypes.Structure):
    _fields_ = [("i", ctypes.c_int64), ("f", ctypes.c_double), ("name", ctypes.c_char * 16)]


def load_ours(ctx, n):
    path = ctx.fresh(NAME, "ours.ps")
    start = time.perf_counter()
    p = S.open_ours(path, fileSize=max(1 << 20, n * 96))
    p.root.recs = []
    recs = p.root.recs
    Rec = p.schema.Rec
    append = recs.append
    for i, f, name in records(n):
        append(Rec(i=i, f=f, name=name))
    p.commit()
    p.close()
    return time.perf_counter() - start, S.store_bytes(path)


def load_ours_bulk(ctx, n):
    """The same records through the bulk call: ``List.extend_records`` of the rows, then commit."""
    path = ctx.fresh(NAME, "ours.ps")
    start = time.perf_counter()
    p = S.open_ours(path, fileSize=max(1 << 20, n * 96))
    p.root.recs = []
    p.root.recs.extend_records(records(n))
    p.commit()
    p.close()
    return time.perf_counter() - start, S.store_bytes(path)


BULK_CALL = load_ours_bulk


def bulk_case(n):
    return f"{count_text(n)} records, bulk call"


def load_sqlite(ctx, n):
    path = ctx.fresh(NAME, "sqlite.db")
    start = time.perf_counter()
    conn = S.open_sqlite(path)
    conn.execute("CREATE TABLE recs (i INTEGER PRIMARY KEY, f REAL, name BLOB)")
    conn.executemany("INSERT INTO recs VALUES (?, ?, ?)", records(n))
    conn.commit()
    conn.close()
    return time.perf_counter() - start, S.store_bytes(path)


def load_lmdb(ctx, n):
    path = ctx.fresh(NAME, "lmdb")
    start = time.perf_counter()
    env = S.open_lmdb(path)
    pack, key = RECORD.pack, KEY.pack
    with env.begin(write=True) as txn:
        put = txn.put
        for i, f, name in records(n):
            put(key(i), pack(i, f, name))
    env.close()
    return time.perf_counter() - start, S.tree_size(path)


def load_zodb(ctx, n):
    import transaction
    from BTrees.IOBTree import IOBTree

    from ._zodb import ZRecord
    path = ctx.path(NAME, "zodb.fs")
    S.zodb_remove(path)
    start = time.perf_counter()
    z = S.open_zodb(path)
    tree = z.root["recs"] = IOBTree()
    for i, f, name in records(n):
        tree[i] = ZRecord(i, f, name)
    transaction.commit()
    z.close()
    return time.perf_counter() - start, S.store_bytes(path)


def load_diskcache(ctx, n):
    path = ctx.fresh(NAME, "diskcache")
    start = time.perf_counter()
    cache = S.open_diskcache(path)
    with cache.transact():
        for i, f, name in records(n):
            cache[i] = (i, f, name)
    cache.close()
    return time.perf_counter() - start, S.tree_size(path)


def load_shelve(ctx, n):
    path = ctx.path(NAME, "shelf")
    S.shelve_remove(path)
    start = time.perf_counter()
    shelf = S.open_shelve(path, "n")
    for i, f, name in records(n):
        shelf[str(i)] = (i, f, name)
    shelf.close()
    return time.perf_counter() - start, S.store_bytes(path)


def load_pickle(ctx, n):
    path = ctx.fresh(NAME, "recs.pickle")
    start = time.perf_counter()
    data = list(records(n))
    with open(path, "wb") as out:
        pickle.dump(data, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()
        os.fsync(out.fileno())
    return time.perf_counter() - start, os.path.getsize(path)


def load_plain(ctx, n):
    start = time.perf_counter()
    data = [PlainRec(i, f, name) for i, f, name in records(n)]
    elapsed = time.perf_counter() - start
    del data
    return elapsed, 0


def load_ctypes(ctx, n):
    start = time.perf_counter()
    data = (CRec * n)()
    for i, f, name in records(n):
        rec = data[i]
        rec.i, rec.f, rec.name = i, f, name
    elapsed = time.perf_counter() - start
    del data
    return elapsed, 0


LOADERS = {OURS: load_ours, "sqlite3": load_sqlite, "shelve": load_shelve, "pickle": load_pickle,
           "lmdb": load_lmdb, "ZODB": load_zodb, "diskcache": load_diskcache, "plain": load_plain,
           "ctypes": load_ctypes}


def run(ctx):
    n = ctx.pick(smoke=300, quick=20_000, full=1_000_000)
    repeat = ctx.pick(smoke=1, quick=3, full=3)
    budget = ctx.pick(smoke=1, quick=2, full=60)  # seconds of timed loads per store, after the first
    case = f"{count_text(n)} records"
    table = Table(NAME, f"Bulk load of {count_text(n)} records, then commit (per record)", "us/record", 1e6 / n)
    table.notes.append("the whole load: create, insert every record, durable commit, close; "
                       "ours / theirs < 1 means permastruct is faster")
    table.notes.append(f"a warm-up load of n/20 records, then up to {repeat} timed loads per store "
                       f"(fewer once {budget} s of loads have run)")

    def measure(loader):
        def go():
            loader(ctx, max(1, n // 20))  # warm-up: imports, caches, code paths
            times, size = [], 0
            while len(times) < repeat and (not times or sum(times) < budget):
                elapsed, size = loader(ctx, n)
                times.append(elapsed)
            extra = {"file_mb": round(size / 2 ** 20, 1)} if size else {}
            if size:
                extra["note"] = f"file {fmt(size / 2 ** 20)} MB"
            return Stats.of(times), extra
        return go

    ctx.run_stores(table, case, {store: measure(loader) for store, loader in LOADERS.items()})
    stats, extra = measure(BULK_CALL)()
    table.add(bulk_case(n), OURS, stats, extra.pop("note", ""), **extra)
    table.notes.append("the bulk call case is permastruct's only (one call for all records); it is compared "
                       "with sqlite3's executemany above")
    _cleanup(ctx)
    return [table], _bars(table, case, n)


def _cleanup(ctx):
    for name in ("ours.ps", "sqlite.db", "lmdb", "diskcache", "recs.pickle"):
        ctx.fresh(NAME, name)
    S.zodb_remove(ctx.path(NAME, "zodb.fs"))
    S.shelve_remove(ctx.path(NAME, "shelf"))


def _bars(table, case, n):
    """P3: one append per record against sqlite3's executemany (lmdb shown beside it); P3-bulk: the bulk call."""
    out = []
    ours = table.value(case, OURS)
    sqlite, lmdb = table.value(case, "sqlite3"), table.value(case, "lmdb")
    size_note = "" if n == 1_000_000 else f"measured at {count_text(n)} records (--full runs 1M)"
    if ours is not None and sqlite is not None:
        shown = [name for name in ("sqlite3", "lmdb") if table.value(case, name) is not None]
        total = table.row(case, OURS).stats.median
        note = size_note
        if lmdb is not None:
            note = (note + "; " if note else "") + "lmdb is shown, not judged (DESIGN.md: sqlite3)"
        out.append(Bar("P3", "bulk load 1M records, then commit",
                       "one append per record: faster than sqlite3 executemany",
                       f"{fmt(ours)} us/record ({fmt(total)} s)",
                       ", ".join(f"{name} {fmt(table.value(case, name))} us" for name in shown),
                       " / ".join(f"{fmt_ratio(table.ratio(case, name))} vs {name}" for name in shown),
                       table.ratio(case, "sqlite3") < 1, note))
    bulk = table.value(bulk_case(n), OURS)
    if bulk is None:
        row = table.row(bulk_case(n), OURS)
        out.append(not_measured("P3-bulk", "bulk load 1M records with the bulk call, then commit",
                                "3x faster than sqlite3 executemany", row.note if row else "not measured"))
    elif sqlite is not None:
        bulk_ratio = bulk / sqlite
        out.append(Bar("P3-bulk", "bulk load 1M records with the bulk call, then commit",
                       "3x faster than sqlite3 executemany", f"{fmt(bulk)} us/record", f"sqlite3 {fmt(sqlite)} us",
                       f"{fmt_ratio(bulk_ratio)} vs sqlite3", bulk_ratio <= 1 / 3, size_note))
    return out


def main(argv=None):
    from .__main__ import main as suite
    return suite(["--only", NAME, *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
