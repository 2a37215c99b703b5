"""The shared harness of the benchmark suite: timing, statistics, peers, tables, bars.

Everything here is plain logic that the tests run without timing anything:

>>> percentile([1, 2, 3, 4], 50)
2.5
>>> stats = Stats.of([3.0, 1.0, 2.0])
>>> stats.median, stats.n
(2.0, 3)
>>> paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0])
2.0
>>> peer_status(["a_module_that_is_not_there"])
(False, 'a_module_that_is_not_there not installed')
"""

import gc
import importlib.util
import math
import os
import statistics
import time
from dataclasses import dataclass, field

OURS = "permastruct"
KEEP_SAMPLES = 200  # a result file keeps the samples of a figure up to this many

#: The stores every workload compares, in table order: name -> modules it needs.
PEERS = {
    OURS: (),
    "sqlite3": ("sqlite3",),
    "shelve": ("shelve", "dbm"),
    "pickle": ("pickle",),
    "lmdb": ("lmdb",),
    "ZODB": ("ZODB", "BTrees"),
    "diskcache": ("diskcache",),
    "plain": (),
    "ctypes": ("ctypes",),
}

#: What each name stands for, as the tables' legend says it.
PEER_TEXT = {
    OURS: "permastruct (this project)",
    "sqlite3": "sqlite3 (standard library)",
    "shelve": "shelve (standard library, over the dbm backend found)",
    "pickle": "pickle of a dict/list written to one file",
    "lmdb": "lmdb (py-lmdb binding of LMDB)",
    "ZODB": "ZODB FileStorage with BTrees",
    "diskcache": "diskcache (a key-value cache over sqlite)",
    "plain": "plain Python objects in RAM (no persistence)",
    "ctypes": "ctypes structures/arrays in RAM (no persistence)",
}


def peer_status(modules):
    """``(True, "")`` when every module can be imported, else ``(False, "NAME not installed")``."""
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return False, f"{name} not installed"
    return True, ""


def available_peers(peers=PEERS):
    """``{store: (available, reason)}`` for every store of ``peers``."""
    return {name: peer_status(modules) for name, modules in peers.items()}


# -- statistics --------------------------------------------------------------------
def percentile(values, q):
    """The ``q``-th percentile (0..100) of ``values``, linear between closest ranks (numpy's default).

    >>> percentile([10], 99), percentile([1, 2, 3, 4, 5], 90)
    (10, 4.6)
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], not {q}")
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    if fraction == 0:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


@dataclass
class Stats:
    """A summary of samples (seconds per operation, or any other unit)."""

    samples: list
    median: float
    p90: float
    p99: float
    mean: float
    minimum: float
    n: int

    @classmethod
    def of(cls, samples):
        samples = [float(s) for s in samples]
        if not samples:
            raise ValueError("no samples")
        return cls(samples, statistics.median(samples), percentile(samples, 90), percentile(samples, 99),
                   statistics.fmean(samples), min(samples), len(samples))

    @property
    def spread(self):
        """p90 / median: 1.0 for a quiet machine, more when the runs scatter."""
        return self.p90 / self.median if self.median else float("nan")

    def to_dict(self, keep=KEEP_SAMPLES):
        """A JSON-able dict; the samples themselves only when there are at most ``keep``."""
        return {"median": self.median, "p90": self.p90, "p99": self.p99, "mean": self.mean,
                "min": self.minimum, "n": self.n, "samples": self.samples if self.n <= keep else []}

    @classmethod
    def from_dict(cls, data):
        """The inverse of :meth:`to_dict`.

        >>> Stats.from_dict(Stats.of(range(1000)).to_dict()).p90
        899.1
        """
        if data.get("samples"):
            return cls.of(data["samples"])
        return cls([], data["median"], data["p90"], data["p99"], data["mean"], data["min"], data["n"])


def paired_ratio(ours, theirs):
    """The median of ``ours[i] / theirs[i]`` over runs made side by side (pair by pair).

    >>> paired_ratio([1.0, 1.0], [0.5, 0.25])
    3.0
    """
    pairs = [a / b for a, b in zip(ours, theirs) if b]
    if not pairs:
        return float("nan")
    return statistics.median(pairs)


def ratio(ours, theirs):
    """``ours / theirs`` (NaN when either is missing or ``theirs`` is 0)."""
    if ours is None or theirs is None or not theirs:
        return float("nan")
    return ours / theirs


# -- timing --------------------------------------------------------------------------
class _NoGC:
    def __enter__(self):
        self.enabled = gc.isenabled()
        gc.collect()
        gc.disable()

    def __exit__(self, *exc):
        if self.enabled:
            gc.enable()


def no_gc():
    """A context in which the cyclic garbage collector does not run (as timeit does)."""
    return _NoGC()


def time_call(fn, number=1):
    """Seconds per call of ``fn(number)`` - ``fn`` runs its operation ``number`` times."""
    with no_gc():
        start = time.perf_counter()
        fn(number)
        return (time.perf_counter() - start) / number


def calibrate(fn, target, limit=10_000_000):
    """How many operations ``fn(number)`` must run to take about ``target`` seconds."""
    number = 1
    while True:
        with no_gc():
            start = time.perf_counter()
            fn(number)
            elapsed = time.perf_counter() - start
        if elapsed >= target / 4 or number >= limit:
            if elapsed <= 0:
                return min(limit, number * 10)
            return max(1, min(limit, int(number * target / elapsed)))
        number *= 4


def measure(fn, *, repeat, warmup=1, number=1, overhead=0.0):
    """Run ``fn(number)`` ``warmup`` times untimed, then ``repeat`` timed times.

    Returns the :class:`Stats` of seconds per operation (``overhead`` - the
    cost of an empty loop of one operation - subtracted).
    """
    for _ in range(warmup):
        fn(number)
    return Stats.of([max(0.0, time_call(fn, number) - overhead) for _ in range(repeat)])


def measure_side_by_side(variants, *, repeat, warmup=1, numbers=None, overhead=0.0):
    """Run each of ``variants`` (name -> fn(number)) once per round, ``repeat`` rounds.

    Interleaving the variants makes each round a fair pair: a burst of noise
    hits every variant of the round.  Returns ``{name: Stats}`` whose samples
    are in round order, ready for :func:`paired_ratio`.
    """
    numbers = numbers or {}
    for _ in range(warmup):
        for name, fn in variants.items():
            fn(numbers.get(name, 1))
    samples = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            samples[name].append(max(0.0, time_call(fn, numbers.get(name, 1)) - overhead))
    return {name: Stats.of(values) for name, values in samples.items()}


def loop_overhead(number=1_000_000):
    """Seconds per iteration of an empty ``for`` loop (subtracted from per-operation figures)."""
    def empty(n):
        for _ in range(n):
            pass
    return min(time_call(empty, number) for _ in range(3))


def rss_bytes():
    """Resident memory of this process, from ``/proc/self/statm`` (or ``getrusage`` elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_parts():
    """``{"anon": bytes, "file": bytes}`` of resident memory (``/proc/self/status``; empty elsewhere).

    File pages are pages of mapped files (a store's map, shared libraries): the
    kernel can drop them at any time; anonymous pages are the process's own.
    """
    parts = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    name, value = line.split(":")
                    parts[name[3:].lower()] = int(value.split()[0]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return parts


# -- results -----------------------------------------------------------------------------
@dataclass
class Row:
    """One store's figure for one case of a workload.

    ``stats`` is ``None`` for a store that did not run; ``note`` then says why
    (``"skipped: lmdb not installed"``, ``"n/a: ..."``, ``"not run at this size: ..."``).
    """

    case: str
    store: str
    stats: Stats = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self):
        return {"case": self.case, "store": self.store, "note": self.note, "extra": self.extra,
                "stats": self.stats.to_dict() if self.stats else None}

    @classmethod
    def from_dict(cls, data):
        stats = Stats.from_dict(data["stats"]) if data.get("stats") else None
        return cls(data["case"], data["store"], stats, data.get("note", ""), data.get("extra", {}))


@dataclass
class Table:
    """A workload's figures: rows of (case, store), one unit, and which way is better.

    ``scale`` converts the stats' unit to the displayed one (1e9: seconds to ns).
    ``higher_is_better`` for rates.  Ratios are always "ours / theirs" of the
    displayed figure, computed per case; where the samples were taken side by
    side (``paired``), the ratio is the median of the per-round ratios.

    A table with ``columns`` is a table of text: those headers, and each row's
    cells in its ``extra["cells"]`` (a summary computed from other tables).
    """

    name: str
    title: str
    unit: str
    scale: float = 1.0
    higher_is_better: bool = False
    paired: bool = False
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    reference: str = OURS
    columns: list = None

    def add(self, case, store, stats=None, note="", **extra):
        row = Row(case, store, stats, note, extra)
        self.rows.append(row)
        return row

    def cases(self):
        seen = []
        for row in self.rows:
            if row.case not in seen:
                seen.append(row.case)
        return seen

    def row(self, case, store):
        for row in self.rows:
            if row.case == case and row.store == store:
                return row
        return None

    def value(self, case, store, stat="median"):
        row = self.row(case, store)
        if row is None or row.stats is None:
            return None
        return getattr(row.stats, stat) * self.scale

    def ratio(self, case, store):
        """ours / theirs for ``store`` in ``case`` (paired when the table was measured side by side)."""
        ours, theirs = self.row(case, self.reference), self.row(case, store)
        if ours is None or theirs is None or ours.stats is None or theirs.stats is None:
            return float("nan")
        if self.paired and ours.stats.n == theirs.stats.n:
            return paired_ratio(ours.stats.samples, theirs.stats.samples)
        return ratio(ours.stats.median, theirs.stats.median)

    def to_dict(self):
        return {"name": self.name, "title": self.title, "unit": self.unit, "scale": self.scale,
                "higher_is_better": self.higher_is_better, "paired": self.paired,
                "reference": self.reference, "notes": self.notes, "columns": self.columns,
                "rows": [row.to_dict() for row in self.rows]}

    @classmethod
    def from_dict(cls, data):
        table = cls(data["name"], data["title"], data["unit"], data["scale"], data["higher_is_better"],
                    data["paired"], [Row.from_dict(r) for r in data["rows"]], data.get("notes", []),
                    data.get("reference", OURS), data.get("columns"))
        return table


@dataclass
class Bar:
    """A performance bar of DESIGN.md section 7, evaluated."""

    id: str
    operation: str
    bar: str
    ours: str
    peer: str
    ratio: str
    holds: bool = None  # None: not measured
    note: str = ""

    @property
    def verdict(self):
        return "not measured" if self.holds is None else ("holds" if self.holds else "missed")

    def to_dict(self):
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data):
        return cls(**data)


def not_measured(bar_id, operation, bar, why):
    return Bar(bar_id, operation, bar, "-", "-", "-", None, why)


# -- text output -------------------------------------------------------------------------
def fmt(value, digits=3):
    """A number with about ``digits`` significant digits, thousands separated.

    >>> fmt(1234567.8), fmt(0.012345), fmt(None), fmt(12.34)
    ('1,234,568', '0.0123', '-', '12.3')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f}"


def fmt_ratio(value):
    """``'2.31x'`` (or ``'-'``)."""
    if value is None or math.isnan(value):
        return "-"
    return f"{fmt(value)}x"


def table_rows(table):
    """The rows of ``table`` as text cells: case, store, median, p90, p99, ours/theirs, note.

    (A table of text - with ``columns`` - gives each row's own cells.)
    """
    if table.columns:
        return [[str(cell) for cell in row.extra.get("cells", [])] for row in table.rows]
    out = []
    for row in table.rows:
        if row.stats is None:
            out.append([row.case, row.store, "-", "-", "-", "-", row.note])
            continue
        ratio_text = "1 (reference)" if row.store == table.reference else fmt_ratio(table.ratio(row.case, row.store))
        out.append([row.case, row.store, fmt(row.stats.median * table.scale), fmt(row.stats.p90 * table.scale),
                    fmt(row.stats.p99 * table.scale), ratio_text, row.note])
    return out


def table_header(table):
    if table.columns:
        return list(table.columns)
    return ["case", "store", f"median {table.unit}", "p90", "p99", "ours / theirs", "note"]


def render_text(headers, rows):
    """A plain fixed-width table.

    >>> print(render_text(["a", "bb"], [["1", "2"], ["333", "4"]]))
    a    bb
    ---  --
    1    2
    333  4
    """
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [headers, ["-" * w for w in widths], *rows]]
    return "\n".join(lines)


def render_table(table):
    text = f"{table.title}\n" + render_text(table_header(table), table_rows(table))
    for note in table.notes:
        text += f"\n  note: {note}"
    return text


def render_bars(bars):
    headers = ["bar", "operation", "bar", "ours", "peer", "ratio", "verdict", "note"]
    rows = [[b.id, b.operation, b.bar, b.ours, b.peer, b.ratio, b.verdict, b.note] for b in bars]
    return render_text(headers, rows)


# -- sizes ------------------------------------------------------------------------------------
def size_text(nbytes):
    """``'64 MB'``, ``'4 GB'``, ``'1 MB'`` (powers of two, as the sizes are chosen).

    >>> size_text(1 << 20), size_text(4 << 30), size_text(1536)
    ('1 MB', '4 GB', '1.5 KB')
    """
    for unit, shift in (("GB", 30), ("MB", 20), ("KB", 10)):
        if nbytes >= 1 << shift:
            value = nbytes / (1 << shift)
            return f"{value:g} {unit}"
    return f"{nbytes} B"


def count_text(n):
    """``'10^6'`` for a power of ten, else the number with separators.

    >>> count_text(1_000_000), count_text(50_000)
    ('10^6', '50,000')
    """
    exponent = round(math.log10(n)) if n > 0 else 0
    if n > 0 and 10 ** exponent == n:
        return f"10^{exponent}"
    return f"{n:,}"
