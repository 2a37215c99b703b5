"""permastruct's benchmark suite: the same workloads side by side against other stores.

``python -m benchmarks`` runs everything in one process run (``--quick``, the
default, in under two minutes; ``--full`` for the sizes of DESIGN.md section
7); ``--only NAME`` runs one workload; ``--write-docs`` rewrites the tables and
plots of ``docs/performance.rst``.  See ``python -m benchmarks --help``.

The peers (``lmdb``, ``ZODB`` + ``BTrees``, ``diskcache``; ``numpy`` and
``matplotlib`` for the plots) come with the ``bench`` extra:
``python3 -m pip install -e ".[bench]"``.  A peer that is missing gets a
"skipped: NAME not installed" row and the rest runs.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SRC = os.path.join(ROOT, "src")

# Benchmark the permastruct of this checkout, not another installed one.
if "permastruct" not in sys.modules and os.path.isdir(os.path.join(_SRC, "permastruct")) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

#: The workloads, in the order a run takes them: module name -> what it measures.
WORKLOADS = {
    "fields": "field read and write (P1, P2)",
    "bulkload": "bulk load of records, then commit (P3)",
    "objects": "the object workloads of issue 11: create, iterate, look up, write agents (W1-W4)",
    "lookup": "random key lookup at 10^4..10^7 keys (P4)",
    "rangescan": "range scan of an ordered index",
    "listiter": "list iteration",
    "commits": "small-transaction commit rate, sync=True and sync=False (P6)",
    "opentime": "open time against store size (P5)",
    "memory": "resident memory after touching records of a large store (P8)",
    "buffers": "zero-copy buffer hashing against bytes in RAM (P7)",
}
