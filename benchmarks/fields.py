"""P1/P2 (DESIGN.md section 7): scalar field read and write against a plain ``__slots__`` attribute.

Run: ``python3 benchmarks/fields.py`` (``--quick`` for fewer repetitions).
Prints the median and p90 of several timing runs, in ns per operation with
the loop overhead subtracted, and the ratios P1 (read, bar <= 4x) and P2
(write inside a transaction, bar <= 6x).  Dirty tracking costs nothing on the
write path (it is asked of the kernel at commit), so the write figure is the
whole cost.
"""

import os
import statistics
import sys
import tempfile
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from permastruct import Storage  # noqa: E402


class Plain:
    __slots__ = ("age", "weight")


class BenchStorage(Storage):
    def populateSchema(self):
        class Agent(self.schema.Structure):
            age = self.schema.Int
            weight = self.schema.Float

        class Root(self.schema.Structure):
            agent = Agent


def measure(stmt, namespace, number, repeat):
    overhead = min(timeit.repeat("pass", globals=namespace, number=number, repeat=repeat))
    runs = sorted((t - overhead) / number * 1e9
                  for t in timeit.repeat(stmt, globals=namespace, number=number, repeat=repeat))
    return statistics.median(runs), runs[int(0.9 * (len(runs) - 1))]


def main(argv=None):
    quick = "--quick" in (argv or sys.argv[1:])
    number, repeat = (200_000, 5) if quick else (1_000_000, 15)
    folder = tempfile.mkdtemp()
    storage = BenchStorage(os.path.join(folder, "bench.ps"))
    storage.root.agent = storage.schema.Agent(age=31, weight=72.5)
    agent = storage.root.agent
    plain = Plain()
    plain.age, plain.weight = 31, 72.5
    namespace = {"plain": plain, "agent": agent}
    rows = [
        ("slots read", "plain.age"), ("Int field read", "agent.age"), ("Float field read", "agent.weight"),
        ("slots write", "plain.age = 32"), ("Int field write", "agent.age = 32"),
        ("Float field write", "agent.weight = 73.5"),
    ]
    results = {}
    print(f"{'operation':<20}{'median ns':>12}{'p90 ns':>10}")
    for label, stmt in rows:
        results[label] = measure(stmt, namespace, number, repeat)
        print(f"{label:<20}{results[label][0]:>12.1f}{results[label][1]:>10.1f}")
    read_base, write_base = results["slots read"][0], results["slots write"][0]
    print()
    for bar_id, label, base, bar in (("P1", "Int field read", read_base, 4), ("P1", "Float field read", read_base, 4),
                                     ("P2", "Int field write", write_base, 6),
                                     ("P2", "Float field write", write_base, 6)):
        ratio = results[label][0] / base
        print(f"{bar_id} {label:<18} {ratio:5.1f}x  (bar <= {bar}x: {'holds' if ratio <= bar else 'MISSED'})")
    storage.commit()
    storage.close()


if __name__ == "__main__":
    main()
