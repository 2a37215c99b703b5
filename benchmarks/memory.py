"""Resident memory (P8) after opening a large store and reading 1,000 random records.

Run alone: ``python3 -m benchmarks.memory [--quick|--full]``.  The stores of
the open-time workload (built or reused), each opened in a fresh process
which reads ``/proc/self/statm`` before the open, after it, and after
reading 1,000 random records (every field, the 4,000-byte payload copied
out).  The figure is the growth of resident memory from before the open to
after the reads, in MB.  The largest store is 4 GB in ``--full``.
"""

if __package__ in (None, ""):  # run as a script
    import os as _os
    import sys as _sys
    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    __package__ = "benchmarks"
    import benchmarks  # noqa: F401

from .harness import OURS, Bar, Stats, Table, fmt, size_text
from .opentime import child, impls_for, sizes

NAME = "memory"
TITLE = "Resident memory after touching records of a large store"
MB = 1 << 20


def run(ctx):
    table = Table(NAME, "Resident memory growth: open + read 1,000 random records (MB)", "MB", 1 / MB)
    table.notes.append("one fresh process per point; RSS from /proc/self/statm after the library's import, "
                       "then after open + 1,000 random reads; the note gives the growth at open alone, and how much of the "
                       "growth is anonymous memory and how much pages of mapped files (which the kernel can drop)")

    def touch(store, path, n):
        result = child("touch", store, path, n)
        grown = result["touched"] - result["before"]
        at_open = result["opened"] - result["before"]
        parts = result.get("parts", {})
        split = ""
        if "anon" in parts and "file" in parts:
            split = f"; of the growth {fmt(parts['anon'] / MB)} MB anonymous, {fmt(parts['file'] / MB)} MB file pages"
        return Stats.of([grown]), {"note": f"open alone: {fmt(at_open / MB)} MB{split}", "open_bytes": at_open,
                                   "anon_bytes": parts.get("anon"), "file_bytes": parts.get("file")}

    all_sizes = sizes(ctx)
    for size in all_sizes:
        ctx.run_stores(table, size_text(size), impls_for(ctx, size, touch))
    case = size_text(all_sizes[-1])
    ours = table.value(case, OURS)
    bars = []
    if ours is not None:
        peers = [f"{store} {fmt(table.value(case, store))} MB" for store in ("sqlite3", "lmdb", "pickle", "ZODB")
                 if table.value(case, store) is not None]
        note = "" if all_sizes[-1] == 4 << 30 else f"measured at {case} (--full measures 4 GB)"
        bars.append(Bar("P8", "open a 4 GB store, read 1,000 random records", "resident memory grows < 64 MB",
                        f"{fmt(ours)} MB at {case}", ", ".join(peers) or "-", f"{fmt(ours / 64)}x the 64 MB bar",
                        ours < 64, note))
    return [table], bars


def main(argv=None):
    from .__main__ import main as suite
    return suite(["--only", NAME, *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
