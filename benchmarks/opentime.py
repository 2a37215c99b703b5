"""Open time against store size (P5): a fresh process opens the store and reads one field.

Run alone: ``python3 -m benchmarks.opentime [--quick|--full]``.  Stores of
1 MB .. 4 GB (``--full``; 1, 16 and 64 MB in ``--quick``) hold ``size/4096``
records ``(i, f, 4,000-byte payload)``:

- permastruct: a ``List[Big]`` of structures with a ``ByteString`` payload; open with the
  schema's class (writable, as a program would), ``root.bigs[n // 2].i``;
- sqlite3: a table with an ``INTEGER PRIMARY KEY``; ``connect`` + one ``SELECT``;
- lmdb: 8-byte keys to packed records; ``open`` + ``begin`` + ``get``;
- ZODB: ``ZRecord`` persistent objects in an ``IOBTree``; ``FileStorage`` (read-only, its
  saved ``.index``) + ``DB`` + ``root`` + the record;
- diskcache: ``Cache(dir)[i]``; shelve: ``shelve.open(path, "r")[str(i)]``;
- pickle: ``pickle.load`` of the list, then the record.

Each figure is the time from before the open to after the field is read,
measured inside a fresh process (``python -m benchmarks._child``) after the
store's library is imported; several processes per point, warm page cache.
``--full`` adds a cold-cache table: the store's files are dropped from the
page cache (``posix_fadvise(DONTNEED)``) before each process.
"""

if __package__ in (None, ""):  # run as a script
    import os as _os
    import sys as _sys
    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    __package__ = "benchmarks"
    import benchmarks  # noqa: F401

import json
import subprocess
import sys

from . import ROOT
from . import _bigstores as B
from .harness import OURS, Bar, Stats, Table, fmt, size_text

NAME = "opentime"
TITLE = "Open time against store size"
STORES = (OURS, "sqlite3", "shelve", "pickle", "lmdb", "ZODB", "diskcache")


def sizes(ctx):
    return ctx.pick(smoke=[1 << 20], quick=[1 << 20, 16 << 20, 64 << 20],
                    full=[1 << 20, 16 << 20, 256 << 20, 1 << 30, 4 << 30])


def size_limits(ctx):
    """The largest store each peer is built at (building the larger ones takes too long)."""
    if ctx.mode != "full":
        return {}
    return {"pickle": 1 << 30, "ZODB": 1 << 30, "diskcache": 1 << 30, "shelve": 1 << 30}


def child(mode, store, path, n):
    """Run ``python -m benchmarks._child`` and return its JSON answer."""
    done = subprocess.run([sys.executable, "-m", "benchmarks._child", mode, store, path, str(n)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"child {mode} {store} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def impls_for(ctx, size, measure_one):
    """``{store: impl}`` for :meth:`Context.run_stores`: build (or reuse) the store, then measure it."""
    limits = size_limits(ctx)
    impls = {}
    for store in STORES:
        if store in limits and size > limits[store]:
            impls[store] = f"not run at this size: building {store} at {size_text(size)} takes too long"
            continue

        def go(store=store):
            path, n, built = B.ensure(ctx, store, size)
            if built is not None:
                ctx.log(f"built {store} {size_text(size)} ({n:,} records) in {built:.1f} s")
            return measure_one(store, path, n)
        impls[store] = go
    impls["plain"] = "n/a: nothing to open"
    impls["ctypes"] = "n/a: nothing to open"
    return impls


def run(ctx):
    repeat = ctx.pick(smoke=1, quick=3, full=5)
    table = Table(NAME, "Open a store and read one field, in a fresh process (ms)", "ms", 1e3)
    table.notes.append(f"{repeat} processes per point, warm page cache; Python start-up and the library's "
                       "import are not included")
    tables = [table]
    cold = None
    if ctx.mode == "full":
        cold = Table(f"{NAME}-cold", "Open a store and read one field, cold page cache (ms)", "ms", 1e3)
        cold.notes.append("the store's files dropped from the page cache before each of 3 processes")
        tables.append(cold)

    def warm(store, path, n):
        runs = [child("open", store, path, n) for _ in range(repeat)]
        return Stats.of([r["seconds"] for r in runs]), {
            "size": B.store_size(path), "imports_ms": round(1e3 * runs[0]["imports"], 1)}

    def cold_one(store, path, n):
        runs = []
        for _ in range(3):
            B.drop_cache(path)
            runs.append(child("open", store, path, n))
        return Stats.of([r["seconds"] for r in runs]), {"size": B.store_size(path)}

    for size in sizes(ctx):
        case = size_text(size)
        ctx.run_stores(table, case, impls_for(ctx, size, warm))
        if cold is not None:
            ctx.run_stores(cold, case, impls_for(ctx, size, cold_one))
    return tables, _bars(table, sizes(ctx))


def _bars(table, all_sizes):
    gb = 1 << 30
    target = gb if gb in all_sizes else all_sizes[-1]
    case = size_text(target)
    ours = table.value(case, OURS)
    if ours is None:
        return []
    smallest = table.value(size_text(all_sizes[0]), OURS)
    largest = table.value(size_text(all_sizes[-1]), OURS)
    growth = largest / smallest if smallest else float("nan")
    peers = [f"{store} {fmt(table.value(case, store))} ms" for store in ("pickle", "ZODB", "sqlite3", "lmdb")
             if table.value(case, store) is not None]
    note = f"{size_text(all_sizes[-1])} / {size_text(all_sizes[0])}: {fmt(growth)}x (flat: <= 2x)"
    if target != gb:
        note += f"; measured at {case} (--full measures 1 GB and 4 GB)"
    return [Bar("P5", "open a 1 GB store and read one field", "< 10 ms and flat in store size",
                f"{fmt(ours)} ms at {case}", ", ".join(peers) or "-", f"{fmt(growth)}x from smallest to largest",
                ours < 10 and growth <= 2, note)]


def main(argv=None):
    from .__main__ import main as suite
    return suite(["--only", NAME, *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
