"""Resident memory (P8) after opening a large store and reading 1,000 random records.

Run alone: ``python3 -m benchmarks.memory [--quick|--full]``.  The stores of
the open-time workload (built or reused), each opened in a fresh process
which reads ``/proc/self/statm`` before the open, after it, and after
reading 1,000 random records (every field, the 4,000-byte payload copied
out).  The figure is the growth of resident memory from before the open to
after the reads, in MB: first with the store's files dropped from the page
cache (cold), then at once again in a second process (warm).  The largest
store is 4 GB in ``--full``.

Pages of a mapped file count in the resident set once a process touches
them, and the kernel maps the cached neighbours of a faulting page with it
("fault-around", and whole large folios of the page cache), so a store read
through ``mmap`` (permastruct, lmdb) shows more resident memory than the
bytes it reads; that memory is clean file cache the kernel can take back.  P8 (DESIGN.md
section 7) therefore judges the process's own (anonymous) memory, from
``/proc/self/statm``'s split, and reports the whole growth beside it.
"""

if __package__ in (None, ""):  # run as a script
    import os as _os
    import sys as _sys
    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    __package__ = "benchmarks"
    import benchmarks  # noqa: F401

from .harness import OURS, Bar, Stats, Table, fmt, size_text
from . import _bigstores as B
from .opentime import child, impls_for, sizes

NAME = "memory"
TITLE = "Resident memory after touching records of a large store"
MB = 1 << 20
P8_LIMIT_MB = 16  # DESIGN.md section 7: the process's own memory; the file's pages are reported beside it


def run(ctx):
    cold = Table(NAME, "Resident memory growth: open + read 1,000 random records, cold page cache (MB)", "MB",
                 1 / MB)
    warm = Table(f"{NAME}-warm", "The same at once again, warm page cache (MB)", "MB", 1 / MB)
    cold.notes.append("one fresh process per point, after the store's files were dropped from the page cache "
                      "(posix_fadvise DONTNEED); RSS from /proc/self/statm after the library's import, then after "
                      "open + 1,000 random reads; the note gives the growth at open alone, and how much of the "
                      "growth is anonymous memory and how much pages of mapped files (which the kernel can drop)")
    warm.notes.append("a second process right after the cold one, reading the same records: the pages it maps are "
                      "in the page cache")

    def touch(store, path, n, drop):
        if drop:
            B.drop_cache(path)
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
        ctx.run_stores(cold, size_text(size), impls_for(ctx, size, lambda *a: touch(*a, drop=True)))
        ctx.run_stores(warm, size_text(size), impls_for(ctx, size, lambda *a: touch(*a, drop=False)))
    return [cold, warm], p8_bars(cold, warm, all_sizes[-1])


def p8_bars(cold, warm, size):
    """P8 from the two tables at the largest ``size`` (a list of at most one Bar): the process's own
    memory judged, the whole resident growth beside it.  Also re-judges a saved run."""
    case = size_text(size)
    bars = []
    figures = [table.value(case, OURS) for table in (cold, warm)]
    anon = [None if table.row(case, OURS) is None else table.row(case, OURS).extra.get("anon_bytes")
            for table in (cold, warm)]
    if None not in figures and None not in anon:
        worst = max(anon) / MB
        peers = [f"{store} {fmt(cold.value(case, store))} MB" for store in ("sqlite3", "lmdb", "pickle", "ZODB")
                 if cold.value(case, store) is not None]
        note = (f"resident growth with the mapped file's pages: {fmt(figures[0])} MB cold, {fmt(figures[1])} MB "
                "warm (pages of the file, which the kernel can drop; its fault-around maps 64 KiB per touch, "
                "for lmdb too)")
        if size != 4 << 30:
            note += f"; measured at {case} (--full measures 4 GB)"
        bars.append(Bar("P8", "open a 4 GB store, read 1,000 random records",
                        f"the process's own (anonymous) memory grows < {P8_LIMIT_MB} MB",
                        f"{fmt(anon[0] / MB)} MB cold, {fmt(anon[1] / MB)} MB warm at {case} (anonymous)",
                        "cold, whole resident growth: " + (", ".join(peers) or "-"),
                        f"{fmt(worst / P8_LIMIT_MB)}x the {P8_LIMIT_MB} MB bar", worst < P8_LIMIT_MB, note))
    return bars


def judge(tables):
    """The bars of a saved run's tables (see ``python -m benchmarks --write-docs --from``)."""
    from ._report import parse_size
    cold, warm = tables
    return p8_bars(cold, warm, max(parse_size(case) for case in cold.cases()))


def main(argv=None):
    from .__main__ import main as suite
    return suite(["--only", NAME, *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    main()
