"""Per-operation cost of the persistent collections at a given size (default 1M elements).

    python3 benchmarks/collections.py            # 1,000,000 elements
    python3 benchmarks/collections.py --n 100000 # quicker
    python3 -m benchmarks.collections --n 100000 # the same

This is a close-up of permastruct alone; ``python -m benchmarks`` (the
``lookup``, ``rangescan`` and ``listiter`` workloads) sets the same
operations side by side with other stores.

Each figure is the wall time of one pass over all n elements divided by n
(keys in random order where the operation is a lookup), with a plain Python
``list``/``dict`` doing the same pass beside it for scale.
"""

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from permastruct import Dict, List, SortedDict, Storage  # noqa: E402


class Bench(Storage):
    def populateSchema(self):
        s = self.schema
        self.define(List("Ints")[s.Int])
        self.define(Dict("ByName")[s.ByteString, s.Int])
        self.define(SortedDict("Index")[s.Int, s.Int])

        class Root(s.Structure):
            ints = self.schema.Ints
            by_name = self.schema.ByName
            index = self.schema.Index


def timed(label, n, run, baseline=None):
    start = time.perf_counter()
    run()
    ours = (time.perf_counter() - start) / n * 1e9
    text = f"{label:<34} {ours:9.0f} ns/op"
    if baseline is not None:
        start = time.perf_counter()
        baseline()
        theirs = (time.perf_counter() - start) / n * 1e9
        text += f"   (Python builtin {theirs:6.0f} ns/op, ratio {ours / theirs:5.1f}x)"
    print(text, flush=True)
    return ours


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    n = args.n
    rng = random.Random(42)
    order = list(range(n))
    rng.shuffle(order)
    names = [b"agent-%012d" % i for i in range(n)]
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "bench.ps")
    p = Bench(path, sync=False)
    root = p.root
    print(f"n = {n:,}; file {path}")
    root.ints = []
    ints = root.ints
    plain = []
    timed("List.append", n, lambda: [ints.append(i) for i in range(n)], lambda: [plain.append(i) for i in range(n)])
    timed("List[i] (random i)", n, lambda: [ints[i] for i in order], lambda: [plain[i] for i in order])
    timed("List iteration", n, lambda: [x for x in ints], lambda: [x for x in plain])
    root.by_name = p.schema.ByName()
    by_name, plain = root.by_name, {}

    def fill_dict(target):
        for i in order:
            target[names[i]] = i
    timed("Dict[bytes] = v (new keys)", n, lambda: fill_dict(by_name), lambda: fill_dict(plain))
    timed("Dict[bytes] (random)", n, lambda: [by_name[names[i]] for i in order],
          lambda: [plain[names[i]] for i in order])
    root.index = p.schema.Index()
    index, plain = root.index, {}

    def fill_sorted(target):
        for i in order:
            target[i] = i
    timed("SortedDict[int] = v (random)", n, lambda: fill_sorted(index), lambda: fill_sorted(plain))
    timed("SortedDict[int] (random)", n, lambda: [index[i] for i in order], lambda: [plain[i] for i in order])
    timed("SortedDict.irange (full scan)", n, lambda: sum(1 for _ in index.irange(0, n)))
    timed("SortedDict.items() scan", n, lambda: sum(1 for _ in index.items()))
    start = time.perf_counter()
    p.commit()
    print(f"commit of all of it: {time.perf_counter() - start:.2f} s; file {p.fileSize / 1e6:.0f} MB")
    start = time.perf_counter()
    p.check()
    print(f"check(): {time.perf_counter() - start:.2f} s")
    p.close()
    os.unlink(path)
    os.rmdir(folder)


if __name__ == "__main__":
    main()
