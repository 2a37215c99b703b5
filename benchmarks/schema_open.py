"""Opening a store whose schema gains a field, against opening it unchanged (issue 15).

Run alone: ``python3 -m benchmarks.schema_open [SIZE_MB ...]`` (default: 16 and 1024).  A
store of ``SIZE_MB`` holds ``size/4096`` records ``Big(i, f, payload)`` (a 4,000-byte
``ByteString`` payload) in a ``List``.  Each figure is the time, inside a fresh process, from
before ``Storage(...)`` to after one record's field is read: with the classes the store was
written with (``unchanged``) and with a ``Big`` that has one more field (``grows``: the open
adds it to the stored schema and commits, ``sync=True``).  Every ``grows`` run opens a fresh
copy of the store (fsynced first: the first commit of an open fsyncs the main file, which would
otherwise write the whole copy back).  For comparison, ``unchanged+commit``: the unchanged open,
the read, then one field written and committed.  Medians of 5 processes, warm page cache.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from permastruct import List, Storage

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


class Before(Storage):
    def populateSchema(self):
        class Big(self.schema.Structure):
            i = self.schema.Int
            f = self.schema.Float
            payload = self.schema.ByteString

        class Root(self.schema.Structure):
            bigs = List("Bigs")[Big]


class After(Storage):
    def populateSchema(self):
        class Big(self.schema.Structure):
            i = self.schema.Int
            f = self.schema.Float
            payload = self.schema.ByteString
            seen = self.schema.Int  # the new field

        class Root(self.schema.Structure):
            bigs = List("Bigs")[Big]


def build(path, n):
    with Before(path, fileSize=n * 4200) as p:
        p.root.bigs = []
        bigs, Big = p.root.bigs, p.schema.Big
        for i in range(n):
            bigs.append(Big(i=i, f=i / 2, payload=i.to_bytes(8, "little") * 500))
            if i % 20000 == 19999:
                p.commit()


CHILD = """
import sys, time
sys.path[:0] = [{src!r}, {here!r}]
import schema_open
start = time.perf_counter()
p = getattr(schema_open, {cls!r})({path!r})
value = p.root.bigs[{n} // 2].i
elapsed = time.perf_counter() - start
assert value == {n} // 2
if {cls!r} == "After":
    assert p.root.bigs[0].seen == 0
if {commit!r}:  # for comparison: the cost of one small commit after an unchanged open
    start = time.perf_counter()
    p.root.bigs[{n} // 2].f = 0.25
    p.commit()
    elapsed += time.perf_counter() - start
p.close()
print(elapsed)
"""


def timed(cls, path, n, commit=False):
    code = CHILD.format(src=SRC, here=os.path.dirname(os.path.abspath(__file__)), cls=cls, path=path, n=n,
                        commit=commit)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout)


def main(sizes):
    folder = tempfile.mkdtemp(prefix="schema-open-")
    try:
        print(f"{'store':>10} {'records':>8} {'unchanged ms':>13} {'grows ms':>9} {'unchanged+commit ms':>20}")
        for size_mb in sizes:
            n = size_mb * (1 << 20) // 4096
            original = os.path.join(folder, "store.ps")
            started = time.perf_counter()
            build(original, n)
            built = time.perf_counter() - started
            unchanged, grows, committed = [], [], []
            for _ in range(5):
                unchanged.append(timed("Before", original, n))
                copy = os.path.join(folder, "copy.ps")
                shutil.copyfile(original, copy)
                with open(copy, "rb+") as handle:
                    os.fsync(handle.fileno())
                committed.append(timed("Before", copy, n, commit=True))
                shutil.copyfile(original, copy)
                with open(copy, "rb+") as handle:  # else the open's commit pays for writing the copy back
                    os.fsync(handle.fileno())
                grows.append(timed("After", copy, n))
                os.unlink(copy)
            size = os.path.getsize(original)
            print(f"{size / (1 << 20):>8.0f}MB {n:>8} {1000 * statistics.median(unchanged):>13.2f} "
                  f"{1000 * statistics.median(grows):>9.2f} {1000 * statistics.median(committed):>20.2f}"
                  f"   (built in {built:.0f} s)", flush=True)
            os.unlink(original)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [16, 1024])
