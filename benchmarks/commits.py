"""Small-transaction commit rate (P6), ``sync=True`` and ``sync=False``, against a bare write+fsync loop.

Run alone: ``python3 -m benchmarks.commits [--quick|--full] [--dir DIR]`` (or
``python3 benchmarks/commits.py``).  Each round runs, side by side on the
same disk, every loop for a fixed time (2 s in ``--full``): a bare loop of
``os.pwrite`` of 4 KiB + ``os.fdatasync`` (what one durable small write costs
at least) and one small transaction per store - change one int, commit:

- permastruct: ``root.counter += 1; p.commit()`` with ``sync=True`` and ``sync=False``;
- sqlite3: ``UPDATE`` + ``commit()`` in WAL mode, ``synchronous=FULL`` / ``NORMAL`` (the same promise
  as our ``sync=False``: atomic, the latest commits may be lost on power loss);
- lmdb: one ``put`` per write transaction, ``sync=True`` / ``sync=False``;
- ZODB: an attribute of a persistent object, ``transaction.commit()`` (FileStorage always fsyncs);
- diskcache: ``cache[key] = n`` (its default: WAL, ``synchronous=NORMAL`` - no fsync per set);
- shelve: set + ``sync()`` (dbm writes, no fsync);
- pickle: the small dict dumped to a new file and renamed over the old one,
  fsynced (sync=True) or not (sync=False);
- plain and ctypes have nothing to commit (n/a).

A third table (``commits:modes``) runs permastruct's commit by storage mode
(``docs/modes.rst``), side by side: a file store with ``sync=True`` and
``sync=False``, the same with transaction metadata (``commit(description,
user=..., extension=...)``), the same with ``history=100`` (every commit also
logs the before-image of each page it changes: ``docs/modes.rst``) beside
``history=0`` (the default, the first rows), an in-memory store
(``Storage(None)``) and an overlay on a file (``overlay=True``).

Figures are the latencies of single commits (median, p90, p99) and the
commit rate (in the note).  P6 is the median over rounds of the per-round
ratio "commits per second with sync=True / bare loop iterations per second"
(bar >= 0.8); its second half (DESIGN.md section 7) the per-round ratio of our
``sync=False`` commit time to sqlite3's in WAL mode with ``synchronous=NORMAL``
(bar <= 2).
"""

if __package__ in (None, ""):  # run as a script: python3 benchmarks/commits.py
    import os as _os
    import sys as _sys
    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    __package__ = "benchmarks"
    import benchmarks  # noqa: F401

import os
import pickle
import statistics
import time

from . import _stores as S
from .harness import OURS, Bar, Stats, Table, fmt, fmt_ratio, paired_ratio

NAME = "commits"
TITLE = "Small-transaction commit rate"
BARE = "bare write+fdatasync"
_sync = getattr(os, "fdatasync", os.fsync)


def bare_loop(ctx, seconds, sync=True):
    path = ctx.fresh(NAME, "bare.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    block = bytes(4096)
    latencies = []
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            os.pwrite(fd, block, 0)
            _sync(fd)
            latencies.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)
    return latencies


def _timed(step, seconds):
    latencies = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        step()
        latencies.append(time.perf_counter() - start)
    return latencies


def ours_loop(ctx, seconds, sync):
    """permastruct's small commit in a file store (the first two rows of the modes table too)."""
    return mode_loop(ctx, seconds, "file:sync" if sync else "file:nosync")


def mode_loop(ctx, seconds, mode):
    """permastruct's small commit in one storage mode: "file", "meta" (with metadata), "history" (a
    file store with history=100), "memory", "overlay" (its base a file store); ``sync`` as the mode's
    name says."""
    kind, _, sync = mode.partition(":")
    path = ctx.fresh(NAME, f"mode-{kind}-{sync}.ps")
    if kind == "memory":
        p = S.open_ours(None)
    elif kind == "overlay":
        S.open_ours(path).close()
        p = S.open_ours(path, overlay=True)
    elif kind == "history":
        p = S.open_ours(path, sync=sync == "sync", history=100)
    else:
        p = S.open_ours(path, sync=sync == "sync")
    root = p.root
    p.commit()
    if kind == "meta":
        def step():
            root.counter += 1
            p.commit("one small change", user="bench", extension={"counter": root.counter})
    else:
        def step():
            root.counter += 1
            p.commit()
    try:
        return _timed(step, seconds)
    finally:
        p.close()
        S.remove(path)


#: The cases of the modes table: (case, mode_loop's mode).
MODES = [("file, sync=True", "file:sync"), ("file, sync=True, history=100", "history:sync"),
         ("file, sync=True, with metadata", "meta:sync"),
         ("file, sync=False", "file:nosync"), ("file, sync=False, history=100", "history:nosync"),
         ("file, sync=False, with metadata", "meta:nosync"),
         ("in memory", "memory:"), ("overlay", "overlay:")]


def run_modes(ctx, seconds, rounds):
    """The ``commits:modes`` table: permastruct's small commit in each storage mode, side by side."""
    table = Table(f"{NAME}:modes", "Commit of one small change by storage mode (us per commit)", "us/commit", 1e6)
    table.notes.append(f"{rounds} rounds of {seconds:g} s per mode, side by side; p50/p90/p99 of single "
                       "commits; the commit rate is in the note (permastruct only)")
    if OURS not in ctx.stores or ctx.skipped(OURS):
        return None
    latencies = {mode: [] for _, mode in MODES}
    rates = {mode: [] for _, mode in MODES}
    for _ in range(rounds):
        for _, mode in MODES:
            runs = mode_loop(ctx, seconds, mode)
            latencies[mode] += runs
            rates[mode].append(len(runs) / seconds)
    for case, mode in MODES:
        table.add(case, OURS, Stats.of(latencies[mode]), f"{fmt(statistics.median(rates[mode]))} commits/s",
                  rate=statistics.median(rates[mode]), rates=rates[mode])
    return table


def sqlite_loop(ctx, seconds, sync):
    path = ctx.fresh(NAME, f"sqlite-{sync}.db")
    conn = S.open_sqlite(path, sync=sync, wal=True, synchronous="FULL" if sync else "NORMAL")
    conn.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, n INTEGER)")
    conn.execute("INSERT INTO c VALUES (1, 0)")
    conn.commit()

    def step():
        conn.execute("UPDATE c SET n = n + 1 WHERE id = 1")
        conn.commit()
    try:
        return _timed(step, seconds)
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            S.remove(path + suffix)


def lmdb_loop(ctx, seconds, sync):
    path = ctx.fresh(NAME, f"lmdb-{sync}")
    env = S.open_lmdb(path, sync=sync, map_size=1 << 26)
    counter = [0]

    def step():
        counter[0] += 1
        with env.begin(write=True) as txn:
            txn.put(b"counter", counter[0].to_bytes(8, "little"))
    try:
        return _timed(step, seconds)
    finally:
        env.close()
        S.remove(path)


def zodb_loop(ctx, seconds, sync):
    import transaction

    from ._zodb import ZAgent
    path = ctx.path(NAME, "zodb.fs")
    S.zodb_remove(path)
    z = S.open_zodb(path)
    agent = z.root["agent"] = ZAgent()
    transaction.commit()

    def step():
        agent.age += 1
        transaction.commit()
    try:
        return _timed(step, seconds)
    finally:
        z.close()
        S.zodb_remove(path)


def diskcache_loop(ctx, seconds, sync):
    path = ctx.fresh(NAME, "diskcache")
    cache = S.open_diskcache(path)
    counter = [0]

    def step():
        counter[0] += 1
        cache["counter"] = counter[0]
    try:
        return _timed(step, seconds)
    finally:
        cache.close()
        S.remove(path)


def shelve_loop(ctx, seconds, sync):
    path = ctx.path(NAME, "shelf")
    S.shelve_remove(path)
    shelf = S.open_shelve(path, "n")
    counter = [0]

    def step():
        counter[0] += 1
        shelf["counter"] = counter[0]
        shelf.sync()
    try:
        return _timed(step, seconds)
    finally:
        shelf.close()
        S.shelve_remove(path)


def pickle_loop(ctx, seconds, sync):
    path = ctx.fresh(NAME, f"state-{sync}.pickle")
    state = {"counter": 0, "name": "small state"}

    def step():
        state["counter"] += 1
        with open(path + ".tmp", "wb") as out:
            pickle.dump(state, out)
            if sync:
                out.flush()
                os.fsync(out.fileno())
        os.replace(path + ".tmp", path)
    try:
        return _timed(step, seconds)
    finally:
        S.remove(path)
        S.remove(path + ".tmp")


LOOPS = {OURS: ours_loop, "sqlite3": sqlite_loop, "shelve": shelve_loop, "pickle": pickle_loop,
         "lmdb": lmdb_loop, "ZODB": zodb_loop, "diskcache": diskcache_loop}
#: Stores that cannot commit in the other mode, and why.
ONLY = {"ZODB": (True, "FileStorage always fsyncs"), "diskcache": (False, "its default never fsyncs a set"),
        "shelve": (False, "dbm never fsyncs")}


def run(ctx):
    seconds = ctx.pick(smoke=0.05, quick=0.3, full=2.0)
    rounds = ctx.pick(smoke=1, quick=2, full=3)
    tables = {sync: Table(f"{NAME}:sync={sync}", f"Commit of one small change, sync={sync} (us per commit)",
                          "us/commit", 1e6) for sync in (True, False)}
    for sync, table in tables.items():
        table.notes.append(f"{rounds} rounds of {seconds:g} s per loop, loops side by side in each round; "
                           "p50/p90/p99 of single commits; the commit rate is in the note")
    variants = [(BARE, True, bare_loop)]
    for store in ctx.stores:
        loop = LOOPS.get(store)
        if loop is None:
            continue
        for sync in (True, False):
            if store in ONLY and ONLY[store][0] != sync:
                continue
            variants.append((store, sync, loop))
    latencies = {(store, sync): [] for store, sync, _ in variants}
    rates = {(store, sync): [] for store, sync, _ in variants}
    failed = {}
    for _ in range(rounds):
        for store, sync, loop in variants:
            if (store, sync) in failed or (store != BARE and ctx.skipped(store)):
                continue
            try:
                runs = loop(ctx, seconds, sync)
            except Exception as exc:  # noqa: BLE001 - a failing peer must not stop the suite
                failed[(store, sync)] = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
                continue
            latencies[(store, sync)] += runs
            rates[(store, sync)].append(len(runs) / seconds)
    for sync, table in tables.items():
        case = f"sync={sync}"
        impls = {}
        for store in [BARE] + list(ctx.stores):
            key = (store, sync)
            if key in failed:
                impls[store] = failed[key]
            elif latencies.get(key):
                impls[store] = (lambda key=key: (Stats.of(latencies[key]), {
                    "note": f"{fmt(statistics.median(rates[key]))} commits/s",
                    "rate": statistics.median(rates[key]), "rates": rates[key]}))
            elif store in ONLY and ONLY[store][0] != sync:
                impls[store] = f"n/a: {ONLY[store][1]}"
            elif store in LOOPS:
                impls[store] = ctx.skipped(store) or "n/a"
            elif store != BARE:
                impls[store] = "n/a: nothing to commit"
        saved = ctx.stores
        ctx.stores = ([BARE] if sync else []) + list(saved)
        try:
            ctx.run_stores(table, case, impls)
        finally:
            ctx.stores = saved
    bars = []
    ours, bare = rates.get((OURS, True)), rates.get((BARE, True))
    if ours and bare:
        value = paired_ratio(ours, bare)
        bars.append(Bar("P6", "small transaction commit, sync=True", ">= 0.8x a bare write+fsync loop",
                        f"{fmt(statistics.median(ours))} commits/s", f"bare loop {fmt(statistics.median(bare))}/s",
                        fmt_ratio(value), value >= 0.8,
                        f"sync=False: {fmt(statistics.median(rates[(OURS, False)]))} commits/s"
                        if rates.get((OURS, False)) else ""))
    ours, sqlite = rates.get((OURS, False)), rates.get(("sqlite3", False))
    if ours and sqlite:
        value = paired_ratio(sqlite, ours)  # time per commit, ours / sqlite3's: their rate / ours
        bars.append(Bar("P6-async", "small transaction commit, sync=False",
                        "<= 2x the time of sqlite3 in WAL mode, synchronous=NORMAL",
                        f"{fmt(1e6 / statistics.median(ours))} us ({fmt(statistics.median(ours))} commits/s)",
                        f"sqlite3 {fmt(1e6 / statistics.median(sqlite))} us", fmt_ratio(value), value <= 2.0))
    modes = run_modes(ctx, seconds, rounds)
    return [tables[True], tables[False]] + ([modes] if modes is not None else []), bars


def main(argv=None):
    from .__main__ import main as suite
    return suite(["--only", NAME, *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
