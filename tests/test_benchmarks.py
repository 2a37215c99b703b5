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
    assert list(bars) == list(suite.BARS) and list(bars)[:4] == ["P1", "P2", "P3", "P3-bulk"]
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


# -- the object workloads of issue 11 (benchmarks/objects.py) ----------------------------------------
def _objects_tables(values):
    """Per-case tables as objects.run makes them: ``values`` maps case -> {store: [seconds per round]}."""
    from benchmarks import objects
    tables = []
    for case in objects.CASES:
        table = harness.Table(f"{objects.NAME}:{case}", case, "us/object", 1e6, paired=True)
        for store, samples in values.get(case, {}).items():
            table.add(case, store, harness.Stats.of(samples))
        tables.append(table)
    return tables


def test_objects_summary_and_bars_against_the_predecessor_and_the_floor():
    from benchmarks import objects
    us = 1e-6
    tables = _objects_tables({
        "W1": {harness.OURS: [7.0 * us, 7.6 * us], "plain": [0.5 * us, 0.4 * us]},   # 7.4 us: 2x of 3.7 exactly
        "W1 commit": {harness.OURS: [1.3 * us, 1.3 * us]},
        "W2": {harness.OURS: [0.95 * us, 0.95 * us], "plain": [0.05 * us, 0.05 * us]},
        "W3": {harness.OURS: [1.1 * us, 1.1 * us], "plain": [0.1 * us, 0.1 * us]},
        # W4 not measured
    })
    figures = objects.figures_of(tables)
    assert set(figures) == {"W1", "W1 commit", "W2", "W3"}
    assert figures["W1"]["ours"] == pytest.approx(7.3) and figures["W1"]["plain"] == pytest.approx(0.45)
    assert figures["W1"]["plain_ratio"] == pytest.approx((14 + 19) / 2)  # paired: the median of 14x and 19x
    assert figures["W1 commit"]["plain"] is None and figures["W1 commit"]["plain_ratio"] is None

    bars = {bar.id: bar for bar in objects.bars(figures, objects.FULL_N)}
    assert list(bars) == ["W1", "W2", "W3", "I11-W1", "I11-W2", "I11-W3"]  # W4 was not measured
    assert bars["W1"].holds is True and bars["W1"].ratio.startswith("1.97x its upper bound")
    assert bars["W2"].holds is False and bars["W2"].ratio.startswith("2.50x its upper bound")  # 0.95 / 0.38
    assert bars["W3"].holds is True and bars["I11-W3"].holds is True  # 1.1 us: 1x the predecessor's upper bound
    assert bars["I11-W1"].holds is False and bars["I11-W1"].ratio == "1.22x the target"  # 7.3 / 6
    assert "published, not run here" in bars["W1"].peer and "plain 0.450 us" in bars["W1"].peer
    assert all(bar.note == "" for bar in bars.values())
    assert all("--full runs 100,000" in bar.note for bar in objects.bars(figures, 300))

    summary = objects.summary_table(figures, objects.FULL_N)
    assert summary.columns[4] == objects.PREDECESSOR + " us"
    rows = {row[0]: row for row in harness.table_rows(summary)}
    assert list(rows) == list(objects.CASES)
    assert rows["W1"][1:] == ["7.30", "0.450", "16.5x", "3.4-3.7", "1.97x", "<= 6 us", "missed"]
    assert rows["W1 commit"][2:4] == ["-", "-"] and rows["W1 commit"][-1] == "-"
    assert rows["W4"][1] == "-" and rows["W4"][-1] == "not measured" and rows["W4"][4] == "0.22-0.30"
    text = harness.render_table(summary)
    assert "compiled predecessor (published figures, seed 000 library; not run here)" in text
    # A table of text keeps its columns through the results file and renders as RST.
    again = harness.Table.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert again.columns == summary.columns and harness.table_rows(again) == harness.table_rows(summary)
    assert "7.30" in _report.rst_table(again.title, harness.table_header(again), harness.table_rows(again))


def test_objects_lookup_keys_and_expected_sums_are_fixed():
    from benchmarks import objects
    keys = objects.lookup_keys(1000)
    assert keys == objects.lookup_keys(1000) and len(keys) == 1000 and len(set(keys)) > 500
    assert all(0 <= int(key[5:]) < 1000 for key in keys) and all(key.startswith(b"agent") for key in keys)
    ages, looked_up = objects.expected(1000, keys[:3])
    assert ages == 10 * sum(range(100)) and looked_up == sum(int(key[5:]) % 100 for key in keys[:3])


def test_bulkload_judges_p3_and_the_bulk_call_against_sqlite3():
    from benchmarks import bulkload
    n = 1_000_000
    table = harness.Table(bulkload.NAME, "t", "us/record", 1e6 / n)
    case = f"{harness.count_text(n)} records"
    table.add(case, harness.OURS, harness.Stats.of([2.0]))
    table.add(case, "sqlite3", harness.Stats.of([2.5]))
    table.add(case, "lmdb", harness.Stats.of([1.5]))  # faster than ours: shown, not judged
    table.add(bulkload.bulk_case(n), harness.OURS, harness.Stats.of([0.5]))
    bars = {bar.id: bar for bar in bulkload._bars(table, case, n)}
    assert bars["P3"].holds is True and "vs lmdb" in bars["P3"].ratio and "not judged" in bars["P3"].note
    assert bars["P3-bulk"].holds is True and "vs sqlite3" in bars["P3-bulk"].ratio
    table = harness.Table(bulkload.NAME, "t", "us/record", 1e6 / n)
    table.add(case, harness.OURS, harness.Stats.of([2.0]))
    table.add(case, "sqlite3", harness.Stats.of([2.5]))
    table.add(bulkload.bulk_case(n), harness.OURS, harness.Stats.of([1.0]))  # more than a third: missed
    assert {bar.id: bar for bar in bulkload._bars(table, case, n)}["P3-bulk"].holds is False


def test_the_bulk_load_benchmark_loads_every_record(tmp_path):
    from benchmarks import bulkload
    from benchmarks._context import Context
    ctx = Context(dir=str(tmp_path), verbose=False)
    elapsed, size = bulkload.load_ours_bulk(ctx, 500)
    assert elapsed > 0 and size > 0
    p = __import__("benchmarks._stores", fromlist=["open_ours"]).open_ours(ctx.path(bulkload.NAME, "ours.ps"))
    assert [(r.i, r.f, r.name.contents) for r in p.root.recs] == list(bulkload.records(500))
    p.close()


def test_smoke_run_of_the_object_workloads(tmp_path, capsys):
    """W1-W4 end to end at a tiny N with whatever peers are installed; every store's answers are checked."""
    results = suite.main(["--smoke", "--only", "objects,bulkload", "--stores", "sqlite3,lmdb,ZODB,plain,pickle",
                          "--dir", str(tmp_path / "run"), "--quiet"])
    out = capsys.readouterr().out
    assert "W1: Agent(" in out and "compiled predecessor (published figures" in out and "I11-W4" in out
    tables = {t["name"]: harness.Table.from_dict(t) for t in results["workloads"]["objects"]["tables"]}
    assert list(tables) == [f"objects:{case}" for case in ("W1", "W1 commit", "W2", "W3", "W4")] + ["objects-summary"]
    for case in ("W1", "W1 commit", "W2", "W3", "W4"):
        table = tables[f"objects:{case}"]
        notes = {row.store: row.note for row in table.rows}
        assert set(notes) == {harness.OURS, "sqlite3", "lmdb", "ZODB", "plain", "pickle"}
        assert table.row(case, harness.OURS).stats.median > 0 and not notes[harness.OURS]
        assert table.row(case, "sqlite3").stats is not None  # always installed
        assert notes["pickle"].startswith("n/a")
        for peer in ("lmdb", "ZODB"):
            module = {"lmdb": "lmdb", "ZODB": "ZODB"}[peer]
            if harness.peer_status([module])[0]:
                assert table.row(case, peer).stats is not None, notes[peer]
            else:
                assert notes[peer] == f"skipped: {module} not installed"
    assert tables["objects:W1 commit"].row("W1 commit", "plain").note.startswith("n/a: plain objects")
    assert tables["objects:W2"].row("W2", "plain").stats is not None
    summary = harness.table_rows(tables["objects-summary"])
    assert [row[0] for row in summary] == ["W1", "W1 commit", "W2", "W3", "W4"]
    bars = {bar["id"]: bar for bar in results["bars"]}
    assert all(bars[bar_id]["holds"] in (True, False) for bar_id in ("W1", "W2", "W3", "I11-W1", "I11-W4"))
    assert bars["P3-bulk"]["holds"] in (True, False)  # measured: the bulk call exists
    bulk = harness.Table.from_dict(results["workloads"]["bulkload"]["tables"][0])
    assert bulk.row("300 records, bulk call", harness.OURS).stats.median > 0
    assert not any(os.listdir(tmp_path / "run" / "objects"))  # every store's files removed


def test_a_run_of_some_workloads_is_merged_into_the_saved_results(tmp_path):
    """--write-docs after --only objects keeps the other workloads (and their bars) of the saved run."""
    def workload(title):
        table = harness.Table(title, title, "s")
        table.add("c", harness.OURS, harness.Stats.of([1.0, 2.0, 3.0]))
        return {"tables": [table.to_dict()], "bars": [], "seconds": 1.0, "loadavg": ["1.0", "1.0", "1.0"]}

    machine = {"cpu": "old cpu", "cores": 2, "memory_gb": 1, "python": "3.11", "implementation": "CPython",
               "os": "Linux", "disk": {}, "versions": {}, "loadavg_start": ["1"], "loadavg_end": ["1"]}
    base = {"mode": "full", "started": "then", "seconds": 60, "machine": machine, "stores": [harness.OURS],
            "workloads": {"fields": workload("fields table"), "lookup": workload("lookup table")},
            "bars": [{"id": "P1", "operation": "o", "bar": "b", "ours": "1", "peer": "p", "ratio": "1x",
                      "holds": True, "note": "old P1"},
                     {"id": "P4", "operation": "o", "bar": "b", "ours": "1", "peer": "p", "ratio": "1x",
                      "holds": False, "note": "old P4"}]}
    new_bars = suite.all_bars({"W1": harness.Bar("W1", "o", "b", "9", "p", "3x", False, "new W1")}, ["objects"])
    new = {"mode": "full", "started": "now", "seconds": 30, "machine": dict(machine, cpu="new cpu"),
           "stores": [harness.OURS, "plain"], "workloads": {"objects": workload("objects table")},
           "bars": [bar.to_dict() for bar in new_bars]}
    docs = tmp_path / "docs"
    docs.mkdir()
    assert suite.docs_results(new, str(docs)) is new  # nothing saved: the run alone
    (docs / "perf_results.json").write_text(json.dumps(base))
    merged = suite.docs_results(new, str(docs))
    assert list(merged["workloads"]) == ["fields", "objects", "lookup"]  # the suite's order
    assert merged["workloads"]["objects"]["run"]["started"] == "now" and "run" not in merged["workloads"]["fields"]
    bars = {bar["id"]: bar for bar in merged["bars"]}
    assert list(bars) == list(suite.BARS)
    assert bars["P1"]["note"] == "old P1" and bars["P4"]["note"] == "old P4" and bars["W1"]["note"] == "new W1"
    assert bars["W2"]["holds"] is None  # objects ran but did not measure it
    assert "a newer bar" not in bars["P3"]["note"] and "workload bulkload not run" in bars["P3"]["note"]
    assert bars["P2"]["holds"] is None and "a newer bar" in bars["P2"]["note"]  # fields ran then, P2 was not kept
    assert merged["merged"][0]["workloads"] == ["objects"] and merged["merged"][0]["cpu"] == "new cpu"
    assert base["workloads"].keys() == {"fields", "lookup"}  # the saved results are not changed in place
    _report.write_docs(merged, str(docs), with_plots=False)
    text = (docs / "performance.rst").read_text()
    assert "fields table" in text and "objects table" in text and "lookup table" in text
    assert "later run merged in" in text and "in a later full mode run (started now)" in text
    assert "in these runs" in text
    assert json.loads((docs / "perf_results.json").read_text())["merged"][0]["started"] == "now"


def test_a_saved_run_is_judged_again_by_todays_bars():
    """``--write-docs --from FILE`` applies the bars of today's code to the figures a saved run measured
    (P4, P4b, P4c, P8: workloads with a ``judge(tables)``); other bars stay as they were."""
    def table(name, rows):
        result = harness.Table(name, name, "ns", 1e9, paired=False)
        for case, store, value in rows:
            result.add(case, store, harness.Stats.of([value * 1e-9] * 3))
        return result.to_dict()

    lookup = table("lookup", [("10^6 keys", harness.OURS, 120), ("10^6 keys", "lmdb", 100),
                              ("10^6 keys", "sqlite3", 1000)])
    build = table("lookup-build", [("10^6 keys", harness.OURS, 3000), ("10^6 keys", harness.OURS + " (update)", 900),
                                   ("10^6 keys", "lmdb", 500), ("10^6 keys", "sqlite3", 1000)])
    scan = table("rangescan", [("ranges of 100 keys", harness.OURS, 200), ("ranges of 100 keys", "lmdb", 100),
                               ("ranges of 100 keys", "sqlite3", 300)])
    old = {"id": "P4", "operation": "o", "bar": "faster than lmdb get", "ours": "1", "peer": "p", "ratio": "1x",
           "holds": False, "note": ""}
    kept = dict(old, id="P1", note="kept")
    results = {"workloads": {"lookup": {"tables": [lookup, build], "bars": [old]},
                             "rangescan": {"tables": [scan], "bars": []},
                             "fields": {"tables": [], "bars": [kept]}},
               "bars": [kept, old]}
    bars = {bar["id"]: bar for bar in suite.rejudge(results)["bars"]}
    assert bars["P1"] == kept
    assert bars["P4"]["holds"] is True and "1.25x" in bars["P4"]["bar"]  # 1.2x lmdb, 0.12x sqlite3
    assert bars["P4b"]["holds"] is True and "(update)" in bars["P4b"]["ratio"]  # 900 <= 2 x 500 and < 1000
    assert bars["P4c"]["holds"] is False  # 2x lmdb's cursor
    assert [bar["id"] for bar in results["workloads"]["lookup"]["bars"]] == ["P4", "P4b"]
