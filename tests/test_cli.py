"""The command line, run as a user runs it: ``python -m permastruct`` in a subprocess.

Contract: DESIGN.md 3.12 (demo, info, check, --version, --help on each; exit
status 0 on success, 1 with a one-line message on a library error, 2 on a
usage error; no traceback; a closed pipe is not an error).
"""

import fcntl
import os
import pty
import re
import subprocess
import sys
import tomllib

import pytest

import permastruct
from permastruct import List, Storage
from permastruct import _format as F
from permastruct import cli
from permastruct._check import check_storage
from permastruct._journal import Journal
from permastruct._mapping import OS_PAGE
from permastruct.errors import CorruptStorageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")
ENV = dict(os.environ, PYTHONPATH=SRC)
PROG = f"{os.path.basename(sys.executable)} -m permastruct"


def run(*args, cwd=None, **kwargs):
    """Run ``python -m permastruct ARGS``; the CompletedProcess, text mode."""
    return subprocess.run([sys.executable, "-m", "permastruct", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120, **kwargs)


def assert_quiet_failure(result, status=1):
    """Exit ``status``, one line on stderr, no traceback."""
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


class AgentStorage(Storage):
    def populateSchema(self):
        class Agent(self.schema.Structure):
            name = self.schema.String
            age = self.schema.Int

        Agents = self.define(List("Agents")[Agent])

        class Root(self.schema.Structure):
            agents = Agents


def make_store(path, agents=5):
    with AgentStorage(path) as p:
        p.root.agents = [p.schema.Agent(name=f"agent {i}", age=i) for i in range(agents)]
    return path


# -- exit status, help, version, program name --------------------------------------------
def test_exit_status_is_0_on_success_1_on_a_library_error_and_2_on_a_usage_error(tmp_path):
    store = make_store(tmp_path / "s.ps")
    assert run("info", store).returncode == 0
    assert run("check", store).returncode == 0

    missing = run("info", tmp_path / "missing.ps")
    assert_quiet_failure(missing)
    assert missing.stderr.startswith(f"{PROG}: FileNotFoundError: ")
    assert missing.stderr.count("missing.ps") == 1  # the file named once
    (tmp_path / "notes.txt").write_text("not a store\n")
    for command in ("info", "check"):
        assert_quiet_failure(result := run(command, tmp_path / "notes.txt"))
        assert "NotAStorageError" in result.stderr and "notes.txt" in result.stderr
    assert_quiet_failure(run("check", tmp_path), 1)  # a directory

    for args in ((), ("frobnicate",), ("info",), ("check", "a", "b"), ("--bogus",)):
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.startswith(f"usage: {PROG}")


@pytest.mark.parametrize("command", [None, "demo", "info", "check"])
def test_help_is_plain_text_naming_the_program(command):
    args = ["--help"] if command is None else [command, "--help"]
    result = run(*args)
    assert result.returncode == 0 and result.stderr == ""
    text = result.stdout
    assert "``" not in text and ":mod:" not in text and ":class:" not in text
    usage = f"usage: {PROG}" + ("" if command is None else f" {command}")
    assert text.startswith(usage), text
    if command is None:
        assert all(name in text for name in ("demo", "info", "check", "--version", "exit status"))
    else:
        assert len(text.split("\n\n")[1]) > 200  # a description, not only the usage line


def test_version():
    result = run("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"permastruct {permastruct.__version__}\n", "")


def test_the_console_script_calls_itself_permastruct(tmp_path):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        entry = tomllib.load(f)["project"]["scripts"]["permastruct"]
    module, function = entry.split(":")
    script = tmp_path / "permastruct"  # what pip writes into bin/, for this entry point
    script.write_text(f"import sys\nfrom {module} import {function}\nsys.exit({function}())\n")

    def run_script(*args):
        return subprocess.run([sys.executable, str(script), *args], env=ENV, capture_output=True, text=True,
                              timeout=120)

    result = run_script("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: permastruct [-h]")
    assert "Run 'permastruct COMMAND --help'" in result.stdout
    result = run_script("check", "--help")
    assert result.stdout.startswith("usage: permastruct check")
    result = run_script("info", str(tmp_path / "missing.ps"))
    assert_quiet_failure(result)
    assert result.stderr.startswith("permastruct: FileNotFoundError")
    assert run_script().stderr.startswith("usage: permastruct ")


# -- a closed pipe ---------------------------------------------------------------------
@pytest.mark.parametrize("buffering", ["buffered", "unbuffered"])
def test_output_into_a_pipe_closed_after_one_line_stops_quietly(tmp_path, buffering):
    # A schema long enough that info writes more than the pipe holds: the
    # command is still writing when the reader goes away.
    class Wide(Storage):
        def populateSchema(self):
            for i in range(300):
                type(f"Type{i:03}", (self.schema.Structure,), {"number": self.schema.Int,
                                                               "label": self.schema.String})

            class Root(self.schema.Structure):
                n = self.schema.Int

    path = tmp_path / "wide.ps"
    Wide(path).close()
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
    flags = ["-u"] if buffering == "unbuffered" else []
    child = subprocess.Popen([sys.executable, *flags, "-m", "permastruct", "info", str(path)], env=ENV,
                             stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    line = b""
    while not line.endswith(b"\n"):
        line += os.read(read_end, 1)
    os.close(read_end)  # like `| head -1`
    stderr = child.communicate(timeout=120)[1].decode()
    assert line.startswith(b"file:")
    assert stderr == "", stderr  # no traceback, no "Exception ignored ... BrokenPipeError"
    assert child.returncode == 0


@pytest.mark.parametrize("args", [("info", "STORE"), ("check", "STORE"), ("--help",), ("demo",)])
def test_output_into_a_pipe_closed_before_it_is_written_stops_quietly(tmp_path, args):
    # Short output waits in stdout's buffer until the command ends: the closed
    # pipe shows when that buffer is written, at the end (demo: at each step).
    store = make_store(tmp_path / "s.ps")
    read_end, write_end = os.pipe()
    os.close(read_end)
    child = subprocess.run([sys.executable, "-m", "permastruct", *(str(store) if a == "STORE" else a for a in args)],
                           env=ENV, stdout=write_end, stderr=subprocess.PIPE, cwd=tmp_path, timeout=120)
    os.close(write_end)
    assert child.stderr.decode() == "" and child.returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["s.ps"]


# -- check -------------------------------------------------------------------------------
def run_on_a_terminal(*args):
    """Run the command with stderr on a pseudo-terminal; (status, stdout, what the terminal showed)."""
    master, slave = pty.openpty()
    child = subprocess.Popen([sys.executable, "-m", "permastruct", *map(str, args)], env=ENV,
                             stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    stdout = child.stdout.read().decode()
    child.stdout.close()
    status = child.wait(timeout=120)
    return status, stdout, shown.decode().replace("\r\n", "\n")  # the terminal turns \n into \r\n


def test_check_draws_a_progress_bar_on_a_terminal_that_finishes_its_lines(tmp_path):
    store = make_store(tmp_path / "s.ps", agents=3000)
    with Storage(store, readonly=True) as p:
        summary = p.check()
    status, stdout, shown = run_on_a_terminal("check", store)
    assert status == 0, shown
    assert re.fullmatch(rf"{re.escape(str(store))}: OK - {summary['objects']} objects, {summary['pages']} pages "
                        r"\(\d+ free\), 0 interned strings\n", stdout)
    assert shown.endswith("\n")
    lines = shown[:-1].split("\n")
    assert len(lines) == 2, shown  # one finished line per phase
    for line, what, total in zip(lines, ("pages", "objects"), (summary["pages"], summary["objects"])):
        frames = [frame for frame in line.split("\r") if frame.strip()]
        counts = [re.fullmatch(rf"{what} *\[[#.]+\] (\d+)/{total} *", frame) for frame in frames]
        assert all(counts), frames
        done = [int(match.group(1)) for match in counts]
        assert done == sorted(done) and done[-1] == total  # it advances and ends on the full count
        assert frames[-1].startswith(f"{what:<8}[{'#' * 30}]")


def test_check_draws_no_bar_when_stderr_is_not_a_terminal(tmp_path):
    result = run("check", make_store(tmp_path / "s.ps"))
    assert result.returncode == 0 and result.stderr == ""


def test_damage_found_midway_ends_the_bar_line_before_the_one_line_message(tmp_path):
    store = make_store(tmp_path / "s.ps")
    with AgentStorage(store, readonly=True) as p:  # the page of an Agent: not read when the store opens
        pid = p._page_file.page_of(p.root.agents[0]._ps_oid)
        page_size = p._page_file.page_size
    with open(store, "r+b") as f:
        f.seek(F.HEADER_BLOCK + pid * page_size + F.SLAB_AT)
        f.write(bytes([99]))
    status, stdout, shown = run_on_a_terminal("check", store)
    assert (status, stdout) == (1, "")
    *bar, message = shown.rstrip("\n").split("\n")
    assert re.fullmatch(rf"{re.escape(PROG)}: CorruptStorageError: '.*s\.ps': page {pid} is in use but "
                        "has unknown kind 99", message), shown
    assert bar and bar[-1].lstrip("\r").startswith("pages") and "Traceback" not in shown


def test_check_verifies_the_log_and_root_records_too_not_only_the_pages(tmp_path):
    store = make_store(tmp_path / "s.ps")
    with Storage(store, readonly=True) as p:
        main_txn = p._page_file.main_txn
    # A log that claims to start after transaction main_txn + 5: the commits
    # between are missing.  Opening reads no commit from it, and the page and
    # object checks see nothing wrong; Storage.check() reads the log.
    Journal.create(str(store) + "-wal", OS_PAGE, main_txn + 5, 0, (0, 0, 0)).close()
    with Storage(store, readonly=True) as p:
        check_storage(p)
        with pytest.raises(CorruptStorageError, match="the log starts after"):
            p.check()
    result = run("check", store)
    assert_quiet_failure(result)
    assert re.fullmatch(rf"{re.escape(PROG)}: CorruptStorageError: '.*s\.ps': the log starts after "
                        rf"transaction {main_txn + 5}, but the main file holds {main_txn}\n", result.stderr)


# -- info ----------------------------------------------------------------------------------
def info_fields(text):
    """``{"size": "...", "pages": "...", ...}`` from info's output (first line of each field)."""
    return dict(re.findall(r"^(\w+): +(.*)$", text, re.M))


def test_info_shows_the_file_pages_objects_per_type_and_space(tmp_path):
    store = make_store(tmp_path / "s.ps", agents=500)
    with Storage(store, readonly=True) as p:
        summary = p.check()
    result = run("info", store)
    assert result.returncode == 0 and result.stderr == ""
    text = result.stdout
    fields = info_fields(text)
    size = os.path.getsize(store)
    file_pages = (size - F.HEADER_BLOCK) // 4096
    assert fields["size"].startswith(f"{size} bytes")
    assert fields["size"].endswith(f"a {F.HEADER_BLOCK}-byte header and {file_pages} pages")
    committed, in_use, free = map(int, re.fullmatch(r"(\d+) in the last commit: (\d+) in use, (\d+) free",
                                                    fields["pages"]).groups())
    assert committed == summary["pages"] and in_use + free == committed
    assert free >= summary["free_pages"]
    preallocated = re.search(r"^ +(\d+) more preallocated", text, re.M)
    assert (int(preallocated.group(1)) if preallocated else 0) == file_pages - committed
    assert fields["commit"] == f"transaction {summary['transaction']}"
    assert fields["log"].startswith("none") and fields["writer"] == "none" and fields["readers"].startswith("none")
    assert "  Agent(Structure): name: String, age: Int" in text and "  Agents = List[Agent]" in text

    rows = {name: (int(n), int(nbytes)) for name, n, nbytes in
            re.findall(r"^  (.+?) +(\d+) +(\d+) bytes$", text, re.M)}
    assert {name: n for name, (n, _) in rows.items()} == summary["types"]
    assert rows["Agent"][0] == 500 and rows["String"][0] == 500 and rows["Root"][0] == 1
    live = sum(nbytes for _, nbytes in rows.values())
    assert fields["objects"] == f"{summary['objects']} objects, {live} bytes"
    space = dict(re.findall(r"^  (live|free|other) +(\d+) bytes", text, re.M))
    assert int(space["live"]) == live and int(space["free"]) == free * 4096
    assert live + int(space["free"]) + int(space["other"]) == committed * 4096


def test_info_names_the_log_a_writer_and_a_reader_behind(tmp_path):
    store = make_store(tmp_path / "s.ps")
    writer = AgentStorage(store)
    try:
        reader = Storage(store, readonly=True)
        try:
            behind = reader._page_file.txn
            for age in (40, 41):
                writer.root.agents[0].age = age
                writer.commit()
            fields = info_fields(run("info", store).stdout)
            assert fields["writer"] == "the store is open for writing"
            assert re.fullmatch(r"s\.ps-wal, \d+ bytes; 2 commits not yet copied into the main file", fields["log"])
            assert re.match(rf"1; the oldest, process {os.getpid()}, holds transaction {behind} \(committed "
                            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\), 2 commits behind, keeping \d+ bytes of log",
                            fields["readers"]), fields["readers"]
        finally:
            reader.close()
        assert info_fields(run("info", store).stdout)["readers"].startswith("none")
    finally:
        writer.close()
    fields = info_fields(run("info", store).stdout)
    assert fields["writer"] == "none" and fields["log"].startswith("none")


def test_info_and_check_count_the_free_runs_as_free_pages(tmp_path):
    class Buffers(Storage):
        def populateSchema(self):
            class Root(self.schema.Structure):
                big = self.schema.Buffer
                small = self.schema.Buffer

    store = tmp_path / "b.ps"
    with Buffers(store) as p:
        p.root.big, p.root.small = bytes(100_000), bytes(100)
        p.commit()
        p.root.big = None  # its pages become a free run, not free-page-list entries
    with Storage(store, readonly=True) as p:
        summary = p.check()
    free = int(re.search(r"in use, (\d+) free", run("info", store).stdout).group(1))
    assert free >= 100_000 // 4096 > summary["free_pages"]
    assert f"pages ({free} free)" in run("check", store).stdout


# -- demo ----------------------------------------------------------------------------------
def test_the_demo_runs_in_a_temporary_folder_and_leaves_nothing_behind(tmp_path):
    result = run("demo", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    created = re.fullmatch(r"1\. creating a store in (.*)", lines[0]).group(1)
    folder = re.fullmatch(r"\d+\. removed the demo store and its folder (.*)", lines[-1]).group(1)
    assert os.path.dirname(created) == folder
    assert not os.path.exists(folder)
    assert os.listdir(tmp_path) == []
    text = result.stdout
    assert "the store has one file, demo.ps" in text
    assert "while it is open for writing, the store has two files, demo.ps" in text and "demo.ps-wal" in text
    assert "no problem found" in text


def test_the_demo_with_a_path_keeps_its_store_and_reopens_it_next_time(tmp_path):
    path = tmp_path / "mine.ps"
    first = run("demo", path, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"1. creating a store in {path}\n")
    assert f"the store stays at {path}; look inside with: {PROG} info {path}" in first.stdout
    assert sorted(os.listdir(tmp_path)) == ["mine.ps"]
    assert "wrote agent.age = 32" in first.stdout

    second = run("demo", path, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith(f"1. opening the store {path}, made by an earlier demo\n")
    assert "wrote agent.age = 33" in second.stdout and "creating" not in second.stdout
    assert sorted(os.listdir(tmp_path)) == ["mine.ps"]
    assert run("check", path).returncode == 0


def test_the_demo_refuses_a_path_holding_data_it_did_not_make(tmp_path):
    other = make_store(tmp_path / "other.ps")
    text = tmp_path / "notes.txt"
    text.write_text("my notes\n")
    for path in (other, text):
        before = path.read_bytes()
        result = run("demo", path, cwd=tmp_path)
        assert_quiet_failure(result)
        assert result.stdout == "" and "exists and is" in result.stderr
        assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "other.ps"]


def test_a_failing_demo_step_removes_the_folder_and_exits_1(tmp_path, monkeypatch, capsys):
    def broken_check(self, progress=None):
        raise CorruptStorageError("a damaged page, for the test")

    monkeypatch.setattr(Storage, "check", broken_check)
    assert cli.main(["demo"], prog="permastruct") == 1
    out, err = capsys.readouterr()
    folder = os.path.dirname(re.match(r"1\. creating a store in (.*)", out).group(1))
    assert not os.path.exists(folder)
    assert err == "permastruct: CorruptStorageError: a damaged page, for the test\n"
    assert "removed" not in out
