"""P6 (DESIGN.md section 7): small-transaction commit rate against a bare write+fsync loop.

Run: ``python3 benchmarks/commits.py [--seconds S] [--dir DIR]``.  Each round
runs, side by side on the same disk: a bare loop of ``os.write`` of 4 KiB +
``os.fdatasync`` (what one durable small write costs at least), and
permastruct commits that change one Int field (``sync=True``, then
``sync=False``).  Prints commits per second (median of the rounds), the
p50/p90/p99 latency of single commits, and the ratio P6 (bar >= 0.8x the
bare loop).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from permastruct import Storage  # noqa: E402

_sync = getattr(os, "fdatasync", os.fsync)


class CommitStorage(Storage):
    def populateSchema(self):
        class Root(self.schema.Structure):
            counter = self.schema.Int


def bare_loop(folder, seconds):
    path = os.path.join(folder, "bare.bin")
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


def commit_loop(folder, seconds, sync):
    path = os.path.join(folder, f"commits-{sync}.ps")
    p = CommitStorage(path, sync=sync)
    root = p.root
    p.commit()
    latencies = []
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            root.counter += 1
            p.commit()
            latencies.append(time.perf_counter() - start)
    finally:
        p.close()
        for name in (path, path + "-wal"):
            if os.path.exists(name):
                os.unlink(name)
    return latencies


def summary(latencies):
    ordered = sorted(latencies)

    def pick(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    return len(latencies), pick(0.5), pick(0.9), pick(0.99)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each measured loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    folder = args.dir or tempfile.mkdtemp(prefix="permastruct-bench-")
    rates = {"bare write+fdatasync": [], "commit sync=True": [], "commit sync=False": []}
    latency = {name: [] for name in rates}
    for _ in range(args.rounds):
        for name, run in (("bare write+fdatasync", lambda: bare_loop(folder, args.seconds)),
                          ("commit sync=True", lambda: commit_loop(folder, args.seconds, True)),
                          ("commit sync=False", lambda: commit_loop(folder, args.seconds, False))):
            runs = run()
            rates[name].append(len(runs) / args.seconds)
            latency[name] += runs
    print(f"disk: {folder}")
    print(f"{'loop':24} {'per second':>12} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9}")
    for name in rates:
        _, p50, p90, p99 = summary(latency[name])
        print(f"{name:24} {statistics.median(rates[name]):12.0f} {p50:9.1f} {p90:9.1f} {p99:9.1f}")
    ratio = statistics.median(rates["commit sync=True"]) / statistics.median(rates["bare write+fdatasync"])
    print(f"P6: commit sync=True / bare loop = {ratio:.2f}x (bar >= 0.8x): {'holds' if ratio >= 0.8 else 'missed'}")


if __name__ == "__main__":
    main()
