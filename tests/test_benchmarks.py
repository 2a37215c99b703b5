"""The benchmark suite's own logic (no timing is asserted): statistics, ratios, peers, a tiny run, the report."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import WORKLOADS, harness  # noqa: E402
from benchmarks import __main__ as suite  # noqa: E402
from benchmarks import _report  # noqa: E402
from benchmarks._context import Context  # noqa: E402


def test_percentiles_match_linear_interpolation():
    values = [5, 1, 4, 2, 3]
    assert harness.percentile(values, 0) == 1
    assert harness.percentile(values, 50) == 3
    assert harness.percentile(values, 100) == 5
    assert harness.percentile(values, 90) == pytest.approx(4.6)
    assert harness.percentile(list(range(101)), 99) == pytest.approx(99)
    with pytest.raises(ValueError):
        harness.percentile([], 50)
    with pytest.raises(ValueError):
        harness.percentile([1], 101)


def test_stats_summary_and_round_trip():
    stats = harness.Stats.of([4, 1, 3, 2])
    assert (stats.median, stats.minimum, stats.n) == (2.5, 1, 4)
    assert stats.p90 == pytest.approx(3.7)
    assert harness.Stats.from_dict(stats.to_dict()) == stats
    big = harness.Stats.of(range(10_000))
    restored = harness.Stats.from_dict(json.loads(json.dumps(big.to_dict())))
    assert restored.samples == [] and restored.median == big.median and restored.p99 == big.p99


def test_ratios_pair_by_pair():
    # Round 2 was hit by noise for both: the paired ratio ignores it, the ratio of medians does not.
    ours, theirs = [2.0, 20.0, 2.0], [1.0, 10.0, 1.0]
    assert harness.paired_ratio(ours, theirs) == 2.0
    assert harness.paired_ratio([1.0], [0.0]) != harness.paired_ratio([1.0], [0.0])  # NaN: nothing to pair
    table = harness.Table("t", "t", "ns", 1e9, paired=True)
    table.add("c", harness.OURS, harness.Stats.of(ours))
    table.add("c", "lmdb", harness.Stats.of(theirs))
    table.add("c", "ZODB", note="skipped: ZODB not installed")
    assert table.ratio("c", "lmdb") == 2.0
    assert table.ratio("c", "ZODB") != table.ratio("c", "ZODB")  # NaN
    rows = harness.table_rows(table)
    assert rows[0][5] == "1 (reference)" and rows[1][5] == "2.00x"
    assert rows[2][2:6] == ["-"] * 4 and rows[2][6] == "skipped: ZODB not installed"


def test_peer_detection_reports_what_is_missing():
    assert harness.peer_status(["sqlite3", "pickle"]) == (True, "")
    assert harness.peer_status(["sqlite3", "no_such_module_xyz"]) == (False, "no_such_module_xyz not installed")
    found = harness.available_peers({"fake": ("no_such_module_xyz",), "plain": ()})
    assert found == {"fake": (False, "no_such_module_xyz not installed"), "plain": (True, "")}


def test_a_missing_peer_gets_a_skipped_row_and_a_failing_one_a_failed_row(tmp_path):
    ctx = Context(mode="smoke", dir=str(tmp_path), stores=[harness.OURS, "lmdb", "sqlite3", "plain"],
                  peers={harness.OURS: (True, ""), "lmdb": (False, "lmdb not installed"),
                         "sqlite3": (True, ""), "plain": (True, "")}, verbose=False)
    table = harness.Table("t", "t", "s")

    def broken():
        raise OSError("disk on fire")
    ctx.run_stores(table, "case", {harness.OURS: lambda: harness.Stats.of([1.0]), "lmdb": lambda: 1 / 0,
                                   "sqlite3": broken})
    notes = {row.store: row.note for row in table.rows}
    assert notes == {harness.OURS: "", "lmdb": "skipped: lmdb not installed",
                     "sqlite3": "failed: OSError: disk on fire", "plain": "n/a: not part of this workload"}


def test_command_line_choices():
    args = suite.parse_args(["--only", "lookup,fields", "--stores", "lmdb"])
    assert args.mode == "quick" and args.only == ["lookup", "fields"] and args.stores == [harness.OURS, "lmdb"]
    assert suite.parse_args(["--full"]).only == list(WORKLOADS)
    with pytest.raises(SystemExit):
        suite.parse_args(["--only", "nothing"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--quick", "--full"])


def test_smoke_run_of_one_workload_and_its_report(tmp_path, capsys):
    """A tiny lookup run end to end (whatever peers are installed), then the docs written from it."""
    results = suite.main(["--smoke", "--only", "lookup", "--stores", "sqlite3,lmdb,plain,ctypes",
                          "--dir", str(tmp_path / "run"), "--quiet"])
    out = capsys.readouterr().out
    assert "Random key lookup" in out and "P4" in out
    tables = [harness.Table.from_dict(t) for t in results["workloads"]["lookup"]["tables"]]
    lookup = tables[0]
    assert {row.store for row in lookup.rows} == {harness.OURS, "sqlite3", "lmdb", "plain", "ctypes"}
    ours = lookup.row("10^3 keys", harness.OURS)
    assert ours.stats is not None and ours.stats.median > 0
    assert lookup.row("10^3 keys", "ctypes").note.startswith("n/a")
    if not harness.peer_status(["lmdb"])[0]:
        assert lookup.row("10^3 keys", "lmdb").note == "skipped: lmdb not installed"
    bars = {bar["id"]: bar for bar in results["bars"]}
    assert list(bars) == [f"P{i}" for i in range(1, 9)]
    assert bars["P4"]["holds"] in (True, False) and bars["P1"]["holds"] is None
    docs = tmp_path / "docs"
    docs.mkdir()
    _report.write_docs(json.loads(json.dumps(results)), str(docs), with_plots=False)
    text = (docs / "performance.rst").read_text()
    assert _report.BEGIN in text and _report.END in text and "Random key lookup" in text
    assert "The machine" in text and ">>>" not in text
    # A second write replaces the generated part and keeps the hand-written text.
    (docs / "performance.rst").write_text(text.replace("(Written by hand after a full run.)", "Our reading."))
    _report.write_docs(results, str(docs), with_plots=False)
    again = (docs / "performance.rst").read_text()
    assert "Our reading." in again and again.count(_report.BEGIN) == 1
    assert not os.path.exists(tmp_path / "run" / "lookup" / "ours.ps")


def test_floors_measure_every_way_of_building_a_field():
    from benchmarks import floors
    rows = floors.measure(number=200, repeat=1)
    labels = [label for label, _, _ in rows]
    assert labels[0] == "__slots__ attribute" and labels[-1] == "permastruct Int field"
    assert set(floors.HOOKS) <= set(labels) and "ctypes field (no range check)" in labels
    assert all(write is not None and write >= 0 for _, _, write in rows)
    assert [label for label, read, _ in rows if read is None] == list(floors.HOOKS)
    text = floors.report(rows)
    assert len(text.splitlines()) == len(rows) + 1 and "permastruct Int field" in text
