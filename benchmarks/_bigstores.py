"""Stores of a given size in bytes, for the open-time (P5) and resident-memory (P8) workloads.

A store of ``size`` bytes holds ``size // 4096`` records ``(i, f, payload)``
with a 4,000-byte payload, in each store's natural form (see
``opentime.py``).  Stores are built in the run folder and reused by a later
run in the same ``--dir`` (a ``.built`` file beside each records what it
holds); ``--fresh`` rebuilds them.

The child side (:func:`open_one`, :func:`touch`) runs in a fresh process
(``python -m benchmarks._child``), so that what it measures - time to open,
resident memory - is not hidden by what the parent already has.
"""

import json
import os
import pickle
import random
import struct
import time

from . import _stores as S
from ._context import remove
from .harness import OURS

BUILD_VERSION = 1
_BUILT_THIS_RUN = set()  # markers of stores this process built (--fresh rebuilds each store once per run)
PAYLOAD = 4000
RECORD_BYTES = 4096
HEAD = struct.Struct("<qd")
KEY = struct.Struct(">Q")
COMMIT_EVERY = 8192

_BLOCK = random.Random(5).randbytes(1 << 20)
#: What a store was built with, beyond the defaults (a store built otherwise is rebuilt).
SETTINGS = {"diskcache": f"size_limit={S.DISKCACHE_SIZE_LIMIT}"}


def payload(i):
    start = (i * 4099) % (len(_BLOCK) - PAYLOAD)
    return _BLOCK[start:start + PAYLOAD]


def record_count(size):
    return max(16, size // RECORD_BYTES)


def location(ctx, store, size):
    names = {OURS: "ours.ps", "sqlite3": "sqlite.db", "lmdb": "lmdb", "ZODB": "zodb.fs",
             "diskcache": "diskcache", "shelve": "shelf", "pickle": "recs.pickle"}
    return ctx.path("stores", f"{size >> 20}MB", names[store])


def ensure(ctx, store, size):
    """The path of ``store`` holding ``size`` bytes of records (built now unless a reusable one is there).

    Returns ``(path, n, build_seconds or None when reused)``.
    """
    path = location(ctx, store, size)
    n = record_count(size)
    marker = path + ".built"
    wanted = {"version": BUILD_VERSION, "n": n, "store": store, "settings": SETTINGS.get(store, "")}
    if (ctx.reuse or marker in _BUILT_THIS_RUN) and os.path.exists(marker):
        try:
            with open(marker) as source:
                if json.load(source) == wanted:
                    return path, n, None
        except (OSError, ValueError):
            pass
    remove(marker)
    _remove_store(store, path)
    start = time.perf_counter()
    BUILDERS[store](path, n)
    seconds = time.perf_counter() - start
    for name in _files_of(path):
        with open(name, "rb") as source:
            os.fsync(source.fileno())
    with open(marker, "w") as out:
        json.dump(wanted, out)
    _BUILT_THIS_RUN.add(marker)
    return path, n, seconds


def _remove_store(store, path):
    if store == "ZODB":
        S.zodb_remove(path)
    elif store == "shelve":
        S.shelve_remove(path)
    else:
        remove(path)


def _files_of(path):
    """Every file of the store at ``path`` (the path itself, its folder's files, its siblings path.*)."""
    folder, base = os.path.split(path)
    out = []
    for name in os.listdir(folder):
        full = os.path.join(folder, name)
        if name.endswith(".built"):
            continue
        if name == base or name.startswith(base + ".") or name.startswith(base + "-"):
            if os.path.isdir(full):
                for sub, _, files in os.walk(full):
                    out.extend(os.path.join(sub, f) for f in files)
            else:
                out.append(full)
    return out


def drop_cache(path):
    """Ask the kernel to drop the page cache of the store's files (a cold open follows)."""
    for name in _files_of(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def store_size(path):
    return sum(os.path.getsize(name) for name in _files_of(path))


# -- builders ------------------------------------------------------------------------------------
def build_ours(path, n):
    p = S.open_ours(path, fileSize=n * RECORD_BYTES + (n * 128) + (1 << 20))
    p.root.bigs = []
    bigs = p.root.bigs
    Big = p.schema.Big
    for i in range(n):
        bigs.append(Big(i=i, f=i * 0.5, payload=payload(i)))
        if i % COMMIT_EVERY == COMMIT_EVERY - 1:
            p.commit()
    p.close()


def build_sqlite(path, n):
    conn = S.open_sqlite(path)
    conn.execute("CREATE TABLE recs (id INTEGER PRIMARY KEY, i INTEGER, f REAL, payload BLOB)")
    for start in range(0, n, COMMIT_EVERY):
        conn.executemany("INSERT INTO recs VALUES (?, ?, ?, ?)",
                         ((i, i, i * 0.5, payload(i)) for i in range(start, min(n, start + COMMIT_EVERY))))
        conn.commit()
    conn.close()


def build_lmdb(path, n):
    env = S.open_lmdb(path)
    for start in range(0, n, COMMIT_EVERY):
        with env.begin(write=True) as txn:
            for i in range(start, min(n, start + COMMIT_EVERY)):
                txn.put(KEY.pack(i), HEAD.pack(i, i * 0.5) + payload(i), append=True)
    env.close()


def build_zodb(path, n):
    import transaction
    from BTrees.IOBTree import IOBTree

    from ._zodb import ZRecord
    z = S.open_zodb(path)
    tree = z.root["recs"] = IOBTree()
    for i in range(n):
        tree[i] = ZRecord(i, i * 0.5, payload=payload(i))
        if i % COMMIT_EVERY == COMMIT_EVERY - 1:
            transaction.commit()
            z.conn.cacheMinimize()
    transaction.commit()
    z.close()


def build_diskcache(path, n):
    cache = S.open_diskcache(path)
    for start in range(0, n, COMMIT_EVERY):
        with cache.transact():
            for i in range(start, min(n, start + COMMIT_EVERY)):
                cache[i] = (i, i * 0.5, payload(i))
    cache.close()


def build_shelve(path, n):
    shelf = S.open_shelve(path, "n")
    for i in range(n):
        shelf[str(i)] = (i, i * 0.5, payload(i))
    shelf.close()


def build_pickle(path, n):
    data = [(i, i * 0.5, payload(i)) for i in range(n)]
    with open(path, "wb") as out:
        pickle.dump(data, out, protocol=pickle.HIGHEST_PROTOCOL)


BUILDERS = {OURS: build_ours, "sqlite3": build_sqlite, "lmdb": build_lmdb, "ZODB": build_zodb,
            "diskcache": build_diskcache, "shelve": build_shelve, "pickle": build_pickle}


# -- the child side: open, read one field; touch records -------------------------------------------
def opener(store):
    """``(open(path) -> handle, read(handle, i) -> (i, f, payload bytes or view), close(handle))``."""
    if store == OURS:
        def read(p, i):
            rec = p.root.bigs[i]
            return rec.i, rec.f, bytes(rec.payload)
        return S.open_ours, read, lambda p: p.close()
    if store == "sqlite3":
        def read(conn, i):
            return conn.execute("SELECT i, f, payload FROM recs WHERE id=?", (i,)).fetchone()
        return S.open_sqlite, read, lambda conn: conn.close()
    if store == "lmdb":
        def open_(path):
            env = S.open_lmdb(path)
            return env, env.begin()

        def read(handle, i):
            value = handle[1].get(KEY.pack(i))
            return (*HEAD.unpack_from(value), bytes(value[HEAD.size:]))

        def close(handle):
            handle[1].abort()
            handle[0].close()
        return open_, read, close
    if store == "ZODB":
        def read(z, i):
            rec = z.root["recs"][i]
            return rec.i, rec.f, rec.payload
        return (lambda path: S.open_zodb(path, readonly=True)), read, lambda z: z.close()
    if store == "diskcache":
        return S.open_diskcache, (lambda cache, i: cache[i]), lambda cache: cache.close()
    if store == "shelve":
        return (lambda path: S.open_shelve(path, "r")), (lambda shelf, i: shelf[str(i)]), lambda s: s.close()
    if store == "pickle":
        def open_(path):
            with open(path, "rb") as source:
                return pickle.load(source)
        return open_, (lambda data, i: data[i]), lambda data: None
    raise ValueError(f"no opener for {store!r}")


def open_one(store, path, n):
    """Child: time to open the store and read one field of the middle record."""
    open_, read, close = opener(store)
    start = time.perf_counter()
    handle = open_(path)
    value = read(handle, n // 2)[0]
    seconds = time.perf_counter() - start
    if value != n // 2:
        raise AssertionError(f"{store}: record {n // 2} reads {value}")
    close(handle)
    return {"seconds": seconds}


def touch(store, path, n, count=1000, seed=3):
    """Child: resident memory before opening, after opening and after reading ``count`` random records."""
    from .harness import rss_bytes, rss_parts
    open_, read, close = opener(store)
    rng = random.Random(seed)
    picks = [rng.randrange(n) for _ in range(count)]
    before, before_parts = rss_bytes(), rss_parts()
    handle = open_(path)
    opened = rss_bytes()
    total = 0
    for i in picks:
        rec = read(handle, i)
        total += rec[0] + len(rec[2])
    touched, touched_parts = rss_bytes(), rss_parts()
    close(handle)
    grown = {name: touched_parts[name] - before_parts.get(name, 0) for name in touched_parts}
    return {"before": before, "opened": opened, "touched": touched, "parts": grown, "checksum": total}
