"""Zero-copy buffer hashing (P7): sha256 of a persistent Buffer through ``memoryview``, against bytes in RAM.

Run alone: ``python3 -m benchmarks.buffers [--quick|--full]``.  One buffer of
256 MB (64 MB in ``--quick``) is stored in each store; each timed pass gets
the bytes out the way the store offers and hashes them with
``hashlib.sha256``:

- permastruct: ``sha256(memoryview(root.blob))`` - no copy; a second row gives the
  first pass after opening the store (its pages are mapped on first touch);
- plain: the same ``bytes`` in RAM - the reference of P7;
- ctypes: a ``c_char`` array in RAM, through ``memoryview``;
- lmdb: ``txn.get(key)`` with ``buffers=True`` - a zero-copy view of LMDB's map;
- sqlite3: ``SELECT`` of the blob (a copy), then hash;
- pickle: ``pickle.load`` of the bytes from its file, then hash;
- ZODB: a persistent object holding the bytes, loaded in a new connection, then hash;
- diskcache: ``cache[key]`` (a large value lives in a file of its own), then hash;
- shelve: ``shelf[key]``, then hash.

The figures are ms per pass (median of the timed passes after a warm-up
pass) and the rate in GB/s; the file is in the page cache.
"""

if __package__ in (None, ""):  # run as a script
    import os as _os
    import sys as _sys
    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    __package__ = "benchmarks"
    import benchmarks  # noqa: F401

import ctypes
import hashlib
import pickle
import random
import time
import warnings

from . import _stores as S
from .harness import OURS, Bar, Stats, Table, fmt, fmt_ratio, paired_ratio, size_text

NAME = "buffers"
TITLE = "Zero-copy buffer hashing"
FIRST = "permastruct (first pass after open)"


def make_data(size):
    block = random.Random(9).randbytes(1 << 20)
    return block * (size >> 20)


def run(ctx):
    size = ctx.pick(smoke=1 << 20, quick=64 << 20, full=256 << 20)
    repeat = ctx.pick(smoke=2, quick=5, full=9)
    data = make_data(size)
    expected = hashlib.sha256(data).hexdigest()
    case = f"{size_text(size)} buffer"
    table = Table(NAME, f"sha256 of a {size_text(size)} buffer (ms per pass)", "ms", 1e3)
    table.notes.append(f"one warm-up pass, {repeat} timed passes; the stored bytes are in the page cache; "
                       "each pass includes getting the bytes out of the store")
    passes, closers = {}, []
    firsts = []

    def check(digest):
        if digest != expected:
            raise AssertionError("wrong digest")

    # permastruct
    path = ctx.fresh(NAME, "ours.ps")
    p = S.open_ours(path, fileSize=size + (4 << 20))
    p.root.blob = data
    p.close()
    for _ in range(ctx.pick(smoke=1, quick=3, full=5)):  # first pass after open: pages mapped on first touch
        p = S.open_ours(path)
        start = time.perf_counter()
        with memoryview(p.root.blob) as view:
            check(hashlib.sha256(view).hexdigest())
        firsts.append(time.perf_counter() - start)
        p.close()
    p = S.open_ours(path)
    blob = p.root.blob

    def ours(number):
        with memoryview(blob) as view:
            check(hashlib.sha256(view).hexdigest())
    passes[OURS] = ours

    def close_ours():
        p.close()
        S.remove(path)
    closers.append(close_ours)

    def plain(number):
        check(hashlib.sha256(data).hexdigest())
    passes["plain"] = plain

    array = (ctypes.c_char * size).from_buffer_copy(data)

    def ctypes_pass(number):
        check(hashlib.sha256(memoryview(array)).hexdigest())
    passes["ctypes"] = ctypes_pass

    setups = {"lmdb": _lmdb, "sqlite3": _sqlite, "pickle": _pickle, "ZODB": _zodb, "diskcache": _diskcache,
              "shelve": _shelve}
    failures = {}
    for store, setup in setups.items():
        if store not in ctx.stores or ctx.skipped(store):
            continue
        try:
            fn, close = setup(ctx, data, check)
        except Exception as exc:  # noqa: BLE001
            failures[store] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
            continue
        passes[store] = fn
        closers.append(close)
    try:
        # Side by side: one pass of every store per round, so that the ratio of P7 is pair by pair.
        for fn in passes.values():
            fn(1)
        samples = {store: [] for store in passes}
        for _ in range(repeat):
            for store, fn in passes.items():
                start = time.perf_counter()
                fn(1)
                samples[store].append(time.perf_counter() - start)
    finally:
        for close in closers:
            close()
    impls = {}
    for store in ctx.stores:
        if store in samples:
            impls[store] = (lambda store=store: (Stats.of(samples[store]), {
                "note": f"{fmt(size / Stats.of(samples[store]).median / 1e9)} GB/s"}))
        elif store in failures:
            impls[store] = failures[store]
    first_stats = Stats.of(firsts)
    saved = ctx.stores
    ctx.stores = list(saved)
    if OURS in ctx.stores:
        ctx.stores.insert(ctx.stores.index(OURS) + 1, FIRST)
        impls[FIRST] = lambda: (first_stats, {"note": f"{fmt(size / first_stats.median / 1e9)} GB/s"})
    try:
        ctx.run_stores(table, case, impls)
    finally:
        ctx.stores = saved
    table.paired = True
    bars = []
    if samples.get(OURS) and samples.get("plain"):
        value = paired_ratio(samples[OURS], samples["plain"])
        bars.append(Bar("P7", "hash a 256 MB persistent buffer via memoryview", "<= 1.2x hashing bytes in RAM",
                        f"{fmt(Stats.of(samples[OURS]).median * 1e3)} ms", f"bytes in RAM "
                        f"{fmt(Stats.of(samples['plain']).median * 1e3)} ms", fmt_ratio(value), value <= 1.2,
                        ("" if size == 256 << 20 else f"measured at {size_text(size)} (--full: 256 MB); ")
                        + f"first pass after open: {fmt(first_stats.median * 1e3)} ms"))
    return [table], bars


def _lmdb(ctx, data, check):
    path = ctx.fresh(NAME, "lmdb")
    env = S.open_lmdb(path, map_size=len(data) * 2 + (64 << 20))
    with env.begin(write=True) as txn:
        txn.put(b"blob", data)
    txn = env.begin(buffers=True)

    def go(number):
        check(hashlib.sha256(txn.get(b"blob")).hexdigest())

    def close():
        txn.abort()
        env.close()
        S.remove(path)
    return go, close


def _sqlite(ctx, data, check):
    path = ctx.fresh(NAME, "sqlite.db")
    conn = S.open_sqlite(path)
    conn.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)")
    conn.execute("INSERT INTO blobs VALUES (1, ?)", (data,))
    conn.commit()

    def go(number):
        (value,) = conn.execute("SELECT data FROM blobs WHERE id=1").fetchone()
        check(hashlib.sha256(value).hexdigest())

    def close():
        conn.close()
        S.remove(path)
    return go, close


def _pickle(ctx, data, check):
    path = ctx.fresh(NAME, "blob.pickle")
    with open(path, "wb") as out:
        pickle.dump(data, out, protocol=pickle.HIGHEST_PROTOCOL)

    def go(number):
        with open(path, "rb") as source:
            check(hashlib.sha256(pickle.load(source)).hexdigest())
    return go, (lambda: S.remove(path))


def _zodb(ctx, data, check):
    import transaction

    from ._zodb import ZRecord
    path = ctx.path(NAME, "zodb.fs")
    S.zodb_remove(path)
    z = S.open_zodb(path)
    z.root["blob"] = ZRecord(payload=data)
    with warnings.catch_warnings():  # ZODB warns that a 256 MB record should be a blob: that is the point
        warnings.simplefilter("ignore")
        transaction.commit()

    def go(number):
        conn = z.db.open()
        try:
            conn.cacheMinimize()
            check(hashlib.sha256(conn.root()["blob"].payload).hexdigest())
        finally:
            conn.cacheMinimize()
            conn.close()

    def close():
        z.close()
        S.zodb_remove(path)
    return go, close


def _diskcache(ctx, data, check):
    path = ctx.fresh(NAME, "diskcache")
    cache = S.open_diskcache(path)
    cache["blob"] = data

    def go(number):
        check(hashlib.sha256(cache["blob"]).hexdigest())

    def close():
        cache.close()
        S.remove(path)
    return go, close


def _shelve(ctx, data, check):
    path = ctx.path(NAME, "shelf")
    S.shelve_remove(path)
    shelf = S.open_shelve(path, "n")
    shelf["blob"] = data
    shelf.sync()

    def go(number):
        check(hashlib.sha256(shelf["blob"]).hexdigest())

    def close():
        shelf.close()
        S.shelve_remove(path)
    return go, close


def main(argv=None):
    from .__main__ import main as suite
    return suite(["--only", NAME, *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
