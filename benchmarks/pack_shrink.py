"""How far ``pack()`` shrinks a store most of whose records were deleted (issue 14).

Run alone: ``python3 -m benchmarks.pack_shrink [N]`` (default 100,000).  Makes a
store of N records (an ``Int`` id, a ``String`` name, a ``Float``) in a
``Dict[Int, Record]``, closes it, deletes a seeded random 95% of them and
commits, closes, then opens it, runs ``pack()`` and closes again.  Prints the
file size after each step, the pack's result and time, and the bound of issue
14: the pages in use after the pack plus one growth step of the map (16
granules) and the header block.
"""

import os
import random
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    __package__ = "benchmarks"
    import benchmarks  # noqa: F401

from permastruct import Dict, Storage
from permastruct._format import HEADER_BLOCK
from permastruct._mapping import GRANULE


class Records(Storage):
    def populateSchema(self):
        s = self.schema

        class Record(s.Structure):
            id = s.Int
            name = s.String
            score = s.Float
        self.define(Dict("ById")[s.Int, Record])

        class Root(s.Structure):
            records = s.ById


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 100_000
    rng = random.Random(5)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "records.ps")
        started = time.perf_counter()
        with Records(path) as p:
            p.root.records = {}
            records = p.root.records
            for i in range(n):
                records[i] = p.schema.Record(id=i, name=f"record number {i}", score=i / 3)
            p.commit()
        print(f"made {n:,} records: {os.path.getsize(path):,} bytes ({time.perf_counter() - started:.2f} s)")
        with Records(path) as p:
            records = p.root.records
            for i in range(n):
                if rng.random() < 0.95:
                    del records[i]
            p.commit()
        print(f"95% deleted, closed: {os.path.getsize(path):,} bytes")
        with Records(path) as p:
            started = time.perf_counter()
            result = p.pack()
            seconds = time.perf_counter() - started
            pf = p._page_file
            free = pf.free_page_count() + sum(count for _, count in p._heap.allocator.free_runs())
            live = pf.page_count - free
            page_size = pf.page_size
            p.check()
        size = os.path.getsize(path)
        bound = HEADER_BLOCK + live * page_size + 16 * GRANULE
        print(f"pack: {seconds:.2f} s, {result}")
        print(f"after pack and close: {size:,} bytes; {live:,} pages in use; bound {bound:,}: "
              f"{'within' if size <= bound else 'OVER'}")


if __name__ == "__main__":
    main()
