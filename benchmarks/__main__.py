"""python -m benchmarks: run the benchmark suite and print (and optionally write) the results.

    python -m benchmarks                  # --quick: every workload, small sizes, < 2 minutes
    python -m benchmarks --full           # the sizes of DESIGN.md section 7 (about half an hour)
    python -m benchmarks --only lookup    # one workload (repeat --only, or NAME,NAME)
    python -m benchmarks --dir /data/b    # measure on that disk (default: a temporary folder)
    python -m benchmarks --full --write-docs             # rewrite docs/performance.rst and its plots
    python -m benchmarks --full --only objects --write-docs  # merge one workload's new run into the page
    python -m benchmarks --write-docs --from results.json  # the same from a saved run, without running
"""

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time

if __package__ in (None, ""):  # pragma: no cover - python3 benchmarks/__main__.py
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"

from . import ROOT, WORKLOADS
from ._context import Context, remove
from .harness import PEERS, Bar, Table, available_peers, not_measured, render_bars, render_table

BARS = {
    "P1": ("read a scalar field", "<= 4x a plain __slots__ attribute read", "fields"),
    "P2": ("write a scalar field (in a transaction)", "within 1.3x the cheapest range-checking Python setter",
           "fields"),
    "P3": ("bulk load 1M records, then commit", "one append per record: faster than sqlite3 executemany",
           "bulkload"),
    "P3-bulk": ("bulk load 1M records with the bulk call, then commit", "3x faster than sqlite3 executemany",
                "bulkload"),
    "P4": ("random key lookup in a Dict of 1M keys", "<= 1.25x lmdb get; 3x faster than sqlite3", "lookup"),
    "P4b": ("build a Dict of 1M keys, commit included", "<= 2x lmdb puts, faster than sqlite3", "lookup"),
    "P4c": ("SortedDict range scan of (key, value) pairs", "faster than sqlite3, <= 1.5x an lmdb cursor", "rangescan"),
    "P5": ("open a 1 GB store and read one field", "< 10 ms and flat in store size", "opentime"),
    "P6": ("small transaction commit, sync=True", ">= 0.8x a bare write+fsync loop", "commits"),
    "P6-async": ("small transaction commit, sync=False", "<= 2x the time of sqlite3 in WAL mode, synchronous=NORMAL",
                 "commits"),
    "P7": ("hash a 256 MB persistent buffer via memoryview", "<= 1.2x hashing bytes in RAM", "buffers"),
    "P8": ("open a 4 GB store, read 1,000 random records", "the process's own (anonymous) memory grows < 16 MB",
           "memory"),
    "W1": ("create a 3-field structure + List.append + Dict insert under its name",
           "<= 2x the compiled predecessor", "objects"),
    "W2": ("iterate a List of structures reading one field", "<= 2x the compiled predecessor", "objects"),
    "W3": ("Dict[fresh bytes key].field", "<= 2x the compiled predecessor", "objects"),
    "I11-W1": ("issue 11 target for W1", "<= 6 us at N = 100,000", "objects"),
    "I11-W2": ("issue 11 target for W2", "<= 0.6 us at N = 100,000", "objects"),
    "I11-W3": ("issue 11 target for W3", "<= 1.8 us at N = 100,000", "objects"),
    "I11-W4": ("issue 11 target for W4", "<= about 2x the compiled predecessor at N = 100,000", "objects"),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="workloads:\n" + "\n".join(f"  {name:10} {text}"
                                                                        for name, text in WORKLOADS.items()))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small sizes, few repetitions: under two minutes (the default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the sizes of DESIGN.md section 7: 1M records, up to 10^7 keys, a 4 GB store")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help=argparse.SUPPRESS)  # tiny sizes: for the tests, the figures mean nothing
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this workload (repeatable, or NAME,NAME)")
    parser.add_argument("--stores", default=None, metavar="NAME,NAME",
                        help="compare only these stores (permastruct is always run); default all of: "
                             + ", ".join(PEERS))
    parser.add_argument("--dir", default=None,
                        help="folder on the disk to measure; stores built there are kept and reused by "
                             "later runs (default: a temporary folder, removed afterwards)")
    parser.add_argument("--fresh", action="store_true", help="rebuild stores an earlier run left in --dir")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    parser.add_argument("--write-docs", action="store_true",
                        help="rewrite the generated part of docs/performance.rst and the docs/perf_*.png plots "
                             "(a run of some workloads replaces theirs in docs/perf_results.json and keeps the rest)")
    parser.add_argument("--from", dest="source", default=None, metavar="FILE",
                        help="with --write-docs: use the results saved in FILE instead of running")
    parser.add_argument("--quiet", action="store_true", help="print the tables only, not the progress")
    args = parser.parse_args(argv)
    args.mode = args.mode or "quick"
    only = [name for part in args.only for name in part.split(",") if name]
    unknown = [name for name in only if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    args.only = only or list(WORKLOADS)
    if args.stores:
        stores = [name for name in args.stores.split(",") if name]
        bad = [name for name in stores if name not in PEERS]
        if bad:
            parser.error(f"unknown store {', '.join(bad)}; choose from {', '.join(PEERS)}")
        args.stores = ["permastruct"] + [name for name in stores if name != "permastruct"]
    if args.source and not args.write_docs:
        parser.error("--from goes with --write-docs")
    return args


# -- the machine ---------------------------------------------------------------------------------
def _read(path):
    try:
        with open(path) as source:
            return source.read()
    except OSError:
        return ""


def _mount_of(path):
    real = os.path.realpath(path)
    best = ("", "?", "?")
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        device, point, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, device, fstype)
    return best


def _versions():
    from importlib import metadata
    versions = {}
    import sqlite3
    versions["sqlite3"] = f"SQLite {sqlite3.sqlite_version}"
    for name in ("lmdb", "ZODB", "BTrees", "diskcache", "numpy", "matplotlib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    from ._stores import dbm_backend
    versions["shelve"] = f"over {dbm_backend()}"
    return versions


def machine(folder):
    """What the figures came from: CPU, cores, memory, Python, OS, the disk of ``folder``."""
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "?")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    mem = next((int(line.split()[1]) * 1024 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), 0)
    point, device, fstype = _mount_of(folder)
    disk = {"mount": point, "device": device, "fs": fstype}
    base = os.path.basename(device)
    block = base.rstrip("0123456789") if not os.path.exists(f"/sys/block/{base}") else base
    rotational = _read(f"/sys/block/{block}/queue/rotational").strip()
    if rotational:
        disk["rotational"] = rotational == "1"
    model_name = _read(f"/sys/block/{block}/device/model").strip()
    if model_name:
        disk["model"] = model_name
    try:
        stat = os.statvfs(folder)
        disk["free_gb"] = round(stat.f_bavail * stat.f_frsize / 2 ** 30, 1)
    except OSError:
        pass
    return {
        "cpu": model, "sha_ni": "sha_ni" in flags, "cores": os.cpu_count(),
        "memory_gb": round(mem / 2 ** 30, 1), "python": sys.version.split()[0],
        "implementation": platform.python_implementation(), "os": platform.platform(),
        "disk": disk, "versions": _versions(), "loadavg_start": _read("/proc/loadavg").split()[:3],
    }


# -- the run -------------------------------------------------------------------------------------
def run(args, out=None):
    out = out or sys.stdout
    started = time.time()
    temporary = args.dir is None
    folder = args.dir or tempfile.mkdtemp(prefix="permastruct-bench-")
    os.makedirs(folder, exist_ok=True)
    folder = os.path.abspath(folder)
    peers = available_peers()
    ctx = Context(mode=args.mode, dir=folder, stores=args.stores or list(PEERS), peers=peers,
                  verbose=not args.quiet, reuse=not args.fresh)
    ctx.out = out
    info = machine(folder)
    print(f"permastruct benchmarks, {args.mode} mode, in {folder}", file=out)
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, Python {info['python']}, "
          f"{info['disk']['fs']} on {info['disk']['device']}; load average {' '.join(info['loadavg_start'])}",
          file=out)
    for store in ctx.stores:
        ok, reason = peers[store]
        if not ok:
            print(f"  {store}: skipped: {reason}", file=out)
    results = {"mode": args.mode, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
               "machine": info, "workloads": {}, "stores": ctx.stores,
               "peers": {name: list(value) for name, value in peers.items()}}
    bars = {}
    try:
        for name in args.only:
            module = importlib.import_module(f".{name}", __package__)
            print(f"\n== {name}: {WORKLOADS[name]}", file=out, flush=True)
            begin = time.perf_counter()
            tables, found = module.run(ctx)
            seconds = time.perf_counter() - begin
            for table in tables:
                print("\n" + render_table(table), file=out)
            print(f"({name}: {seconds:.1f} s)", file=out, flush=True)
            results["workloads"][name] = {"tables": [t.to_dict() for t in tables],
                                          "bars": [b.to_dict() for b in found], "seconds": seconds,
                                          "loadavg": _read("/proc/loadavg").split()[:3]}
            for bar in found:
                bars[bar.id] = bar
    finally:
        if temporary:
            remove(folder)
    results["bars"] = [bar.to_dict() for bar in all_bars(bars, args.only)]
    results["seconds"] = time.time() - started
    results["machine"]["loadavg_end"] = _read("/proc/loadavg").split()[:3]
    print("\n== Performance bars (DESIGN.md section 7, issue 11's targets)", file=out)
    print(render_bars([Bar.from_dict(b) for b in results["bars"]]), file=out)
    print(f"\ntotal {results['seconds']:.1f} s ({args.mode} mode)", file=out, flush=True)
    return results


def all_bars(found, ran):
    """The bars of BARS in order; a bar whose workload did not run (or could not measure it) says so."""
    out = []
    for bar_id, (operation, text, workload) in BARS.items():
        if bar_id in found:
            out.append(found[bar_id])
        elif workload in ran:
            out.append(not_measured(bar_id, operation, text, "could not be measured in this run (see its table)"))
        else:
            out.append(not_measured(bar_id, operation, text, f"workload {workload} not run"))
    return out


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.source:
        with open(args.source) as source:
            results = rejudge(json.load(source))
    else:
        results = run(args)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(results, out, indent=1)
    if args.write_docs:
        from . import _report
        docs = os.path.join(ROOT, "docs")
        written = _report.write_docs(docs_results(results, docs), docs)
        print("wrote " + ", ".join(written))
    return results


def rejudge(results):
    """``results`` (a saved run) with the bars of every workload that can judge its own tables again
    (a ``judge(tables)`` function) judged by today's code: a bar that changed wording or limit is
    applied to the figures already measured."""
    import importlib
    by_id = {bar["id"]: index for index, bar in enumerate(results.get("bars", []))}
    for name, data in results["workloads"].items():
        module = importlib.import_module(f".{name}", __package__)
        judge = getattr(module, "judge", None)
        if judge is None:
            continue
        for bar in judge(load_tables(results, name)):
            entry = bar.to_dict()
            data["bars"] = [b for b in data.get("bars", []) if b["id"] != bar.id] + [entry]
            if bar.id in by_id:
                results["bars"][by_id[bar.id]] = entry
            else:
                results.setdefault("bars", []).append(entry)
    order = {bar_id: index for index, bar_id in enumerate(BARS)}
    results.get("bars", []).sort(key=lambda bar: order.get(bar["id"], len(order)))
    return results


def docs_results(results, docs):
    """What the docs show: ``results``, or - for a run of some workloads - the saved results with theirs replaced."""
    saved = os.path.join(docs, "perf_results.json")
    if set(results["workloads"]) >= set(WORKLOADS) or not os.path.exists(saved):
        return results
    with open(saved) as source:
        base = json.load(source)
    print(f"merging {', '.join(results['workloads'])} into the results of the run of {base['started']} "
          f"({os.path.relpath(saved)})")
    from . import _report
    return _report.merge_results(base, results, {bar_id: bar[2] for bar_id, bar in BARS.items()})


def load_tables(results, workload):
    return [Table.from_dict(t) for t in results["workloads"].get(workload, {}).get("tables", [])]


if __name__ == "__main__":
    main()
