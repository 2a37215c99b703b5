"""The storage modes of DESIGN 3.10 (seed 001: MappingStorage, DemoStorage): in memory and overlay.

* ``Storage(None)``: the same API in memory; nothing on disk outlives it (not
  after ``close()``, not after a SIGKILL); it grows, and running out of memory
  (address space, a file-size limit) is a ``StorageFullError`` with the store
  still at its last commit.
* ``Storage(path, overlay=True)``: the file is a read-only base that is never
  written (same bytes and modification time of the base and its log after
  commits, rollbacks, 50 MB of growth and close; a 0444 base; a writer that
  commits to the base meanwhile does not change what the overlay sees).
* Both: an exception at any opcode inside ``commit()`` or ``rollback()`` (a trace
  function raising ``KeyboardInterrupt``: at every ``STRIDE``-th opcode, every
  one with ``PERMASTRUCT_STRESS=1``) leaves the last commit, with the changes
  still pending; a retried commit commits exactly them.

The contract and stress suites run over both modes too (``conftest.open_store``).
"""

import hashlib
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest
from conftest import _long_run, interrupt_at_opcode

import permastruct
from permastruct import Dict, List, Storage
from permastruct.errors import (DeadProxyError, IncompleteChangeError, OverlayError, ReadOnlyError,
                                StorageClosedError)

SRC = os.path.dirname(os.path.dirname(permastruct.__file__))
#: The interrupt sweeps stop at every STRIDE-th opcode of the call (every one in long runs).
STRIDE = 1 if _long_run() else 5


class ModeStorage(Storage):
    def populateSchema(self):
        s = self.schema

        class Item(s.Structure):
            name = s.String
            value = s.Int

        Items = self.define(List("Items")[Item])
        Blobs = self.define(List("Blobs")[s.Buffer])

        class Root(s.Structure):
            count = s.Int
            label = s.String
            items = Items
            blobs = Blobs


def run_python(code, timeout=120):
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def state(p):
    """What the root holds, as plain values."""
    root = p.root
    return (root.count, None if root.label is None else str(root.label),
            None if root.items is None else [(str(item.name), item.value) for item in root.items],
            None if root.blobs is None else [bytes(blob) for blob in root.blobs])


# == in memory ===========================================================================================
def test_memory_store_has_the_same_api():
    p = ModeStorage(None)
    try:
        assert p.fileName is None and repr(p) == "<ModeStorage (memory)>"
        assert not p.readonly and not p.overlay and p.sync is False
        p.root.count = 1
        p.root.items = [p.schema.Item(name="a", value=1)]
        p.commit()
        made = p.schema.Item(name="b", value=2)
        p.root.items.append(made)
        p.root.count = 2
        p.rollback()
        assert state(p)[:3] == (1, None, [("a", 1)])
        with pytest.raises(DeadProxyError):
            made.value
        with p.transaction():
            p.root.label = "kept"
        with pytest.raises(ValueError):
            with p.transaction():
                p.root.label = "dropped"
                raise ValueError("roll back")
        assert str(p.root.label) == "kept"
        assert p.refresh() is False  # a writer always sees its own state
        assert p.check()["transaction"] >= 3
        assert p.readers() == []
        assert p._page_file.log_path() is None
    finally:
        p.close()
    assert repr(p) == "<ModeStorage (memory)>"
    with pytest.raises(StorageClosedError):
        p.root
    p.close()  # again: nothing


def test_memory_store_grows_like_a_file_store():
    with ModeStorage(None, fileSize=0, pageSize=512) as p:
        first = p.fileSize
        p.root.blobs = []
        for i in range(40):
            p.root.blobs.append(bytes([i]) * 100_000)
            if i % 7 == 0:
                p.commit()
        p.commit()
        assert p.fileSize >= 40 * 100_000 > first
        assert [bytes(blob)[:1] for blob in p.root.blobs] == [bytes([i]) for i in range(40)]
        p.root.blobs = None
        p.commit()  # frees them: the space is used again
        size = p.fileSize
        p.root.blobs = [bytes(100_000) for _ in range(10)]
        p.commit()
        assert p.fileSize == size
        p.check()


def test_memory_store_arguments():
    with pytest.raises(ValueError, match="read-only"):
        ModeStorage(None, readonly=True)
    with pytest.raises(ValueError, match="overlay"):
        ModeStorage(None, overlay=True)
    with pytest.raises(TypeError):
        ModeStorage(None, overlay=1)
    # two in-memory stores are two stores
    a, b = ModeStorage(None), ModeStorage(None)
    a.root.count, b.root.count = 1, 2
    a.commit(), b.commit()
    assert (a.root.count, b.root.count) == (1, 2)
    a.close(), b.close()


def _entries():
    folders = {tempfile.gettempdir(), os.getcwd()} | ({"/dev/shm"} if os.path.isdir("/dev/shm") else set())
    return {folder: set(os.listdir(folder)) for folder in folders}


def _new_big_files(before):
    """Files of 1 MB or more in the folders of ``_entries()`` that were not there ``before``."""
    found = []
    for folder, names in _entries().items():
        for name in names - before[folder]:
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                if os.path.isfile(path) and os.path.getsize(path) >= 1 << 20:
                    found.append(path)
    return found


def test_nothing_outlives_a_memory_store_not_even_a_kill(tmp_path):
    """A child commits 8 MB into a memory store and is SIGKILLed: no file anywhere keeps it."""
    before = _entries()
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_modes import ModeStorage
        p = ModeStorage(None)
        p.root.blobs = [os.urandom(1 << 20) for _ in range(8)]
        p.commit()
        print(sorted(os.readlink("/proc/self/fd/" + fd) for fd in os.listdir("/proc/self/fd")
                     if os.path.exists("/proc/self/fd/" + fd)), flush=True)
        time.sleep(60)
        """)], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=SRC), stdout=subprocess.PIPE, text=True)
    try:
        files = child.stdout.readline()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert "memfd:permastruct" in files, files
    assert "/dev/shm" not in files and str(tmp_path) not in files, files
    assert _new_big_files(before) == []  # (other processes may come and go in these folders)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("limit", ["RLIMIT_AS", "RLIMIT_FSIZE"])
def test_memory_store_full(limit):
    """Out of address space (mmap) or over the file-size limit (the in-memory file's growth):
    StorageFullError, and the store is at its last commit and usable."""
    result = run_python(f"""
        import resource, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_modes import ModeStorage
        from permastruct.errors import StorageFullError
        p = ModeStorage(None)
        p.root.blobs = []
        p.commit()
        blob = bytes(8 << 20)
        if {limit!r} == "RLIMIT_AS":
            used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (used + (300 << 20), resource.RLIM_INFINITY))
        else:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (200 << 20, resource.RLIM_INFINITY))
        committed = 0
        try:
            for i in range(1000):
                p.root.blobs.append(blob)
                if i % 3 == 2:
                    p.root.count = i
                    p.commit()
                    committed = i
        except StorageFullError as exc:
            print("full", exc.errno, exc)
        p.rollback()
        assert p.root.count == committed and len(p.root.blobs) == committed + 1, (p.root.count, committed)
        p.check()
        p.root.blobs = None
        p.root.count = -1
        p.commit()
        p.check()
        print("usable", p.root.count)
        p.close()
        """)
    assert result.returncode == 0, result.stderr
    assert "full" in result.stdout and "usable -1" in result.stdout, result.stdout


# == overlay =============================================================================================
def _fingerprint(path):
    """sha256 and modification time (ns) of a file, or None when there is none."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return digest, os.stat(path).st_mtime_ns


def _base(tmp_path, name="base.ps", keep_log=False):
    """A base store with a few commits; with ``keep_log`` a writer is returned still open, its last
    commits in the log (not yet in the main file)."""
    path = str(tmp_path / name)
    w = ModeStorage(path, pageSize=512)
    w.root.count = 10
    w.root.label = "base"
    w.root.items = [w.schema.Item(name=f"i{n}", value=n) for n in range(50)]
    w.commit()
    if keep_log:
        w.root.count = 11
        w.root.items[0].value = 100
        w.commit()
        return path, w
    w.close()
    return path, None


def test_overlay_reads_the_base_and_keeps_changes_in_memory(tmp_path):
    path, _ = _base(tmp_path)
    log = path + "-wal"
    before = _fingerprint(path), _fingerprint(log)
    p = ModeStorage(path, overlay=True)
    try:
        assert repr(p) == f"<ModeStorage {path!r} (overlay)>" and p.overlay and p.fileName == path
        assert not p.readonly and p.sync is False
        assert state(p)[:3] == (10, "base", [(f"i{n}", n) for n in range(50)])
        p.root.count = 20
        p.root.items.append(p.schema.Item(name="new", value=-1))
        p.commit()
        p.root.count = 30
        p.root.label = "rolled back"
        p.rollback()
        assert state(p)[:2] == (20, "base") and len(p.root.items) == 51
        del p.root.items[:10]
        p.commit()
        # 50 MB of growth past the base's end
        p.root.blobs = []
        for i in range(50):
            p.root.blobs.append(bytes([i]) * (1 << 20))
            if i % 10 == 9:
                p.commit()
        assert p.fileSize > 50 << 20 > os.path.getsize(path)
        p.root.blobs[3] = b"changed"
        p.rollback()
        assert bytes(p.root.blobs[3])[:2] == b"\x03\x03"
        p.check()
        assert (_fingerprint(path), _fingerprint(log)) == before
        with pytest.raises(OverlayError, match="overlay"):
            p.refresh()
    finally:
        p.close()
    assert (_fingerprint(path), _fingerprint(log)) == before
    # the base is as it was; a new overlay starts from it again
    with ModeStorage(path, overlay=True) as p:
        assert state(p)[:2] == (10, "base") and len(p.root.items) == 50
        p.root.count = 99
    with ModeStorage(path, readonly=True) as r:
        assert r.root.count == 10
        r.check()
    assert (_fingerprint(path), _fingerprint(log)) == before


def test_overlay_of_a_read_only_file(tmp_path):
    path, _ = _base(tmp_path)
    os.chmod(path, 0o444)
    before = _fingerprint(path)
    try:
        with ModeStorage(path, overlay=True) as p:
            p.root.count = 5
            p.root.blobs = [bytes(1 << 20) for _ in range(3)]
            p.commit()
            p.root.count = 6
            p.rollback()
            assert p.root.count == 5
            p.check()
        assert _fingerprint(path) == before
        assert not os.path.exists(path + "-wal")
    finally:
        os.chmod(path, 0o644)


def test_overlay_of_a_base_whose_log_holds_commits(tmp_path):
    """A base as a crash leaves it (its last commits only in the log), both files 0444: the overlay
    sees those commits; the base and its log keep their bytes and times through commits,
    rollbacks, 50 MB of growth and close."""
    path, w = _base(tmp_path, name="live.ps", keep_log=True)
    copy = str(tmp_path / "base.ps")
    for suffix in ("", "-wal"):
        shutil.copyfile(path + suffix, copy + suffix)
    w.close()
    log = copy + "-wal"
    with ModeStorage(copy, readonly=True) as r:
        assert r.last_transaction > r._page_file.main_txn  # the log holds commits the main file lacks
    for name in (copy, log):
        os.chmod(name, 0o444)
    before = _fingerprint(copy), _fingerprint(log)
    try:
        with ModeStorage(copy, overlay=True) as p:
            assert state(p)[:2] == (11, "base") and p.root.items[0].value == 100
            first = p.last_transaction
            p.root.items[0].value = 0
            p.root.blobs = []
            for i in range(50):
                p.root.blobs.append(os.urandom(1 << 20))
                if i % 10 == 9:
                    p.commit(f"growth {i}")
                else:
                    p.root.count = i
            p.root.items[1].value = 12345
            p.rollback()
            assert p.root.items[1].value == 1 and p.root.items[0].value == 0 and len(p.root.blobs) == 50
            assert p.last_transaction == first + 5
            p.check()
            assert (_fingerprint(copy), _fingerprint(log)) == before
        assert (_fingerprint(copy), _fingerprint(log)) == before
        with ModeStorage(copy, readonly=True) as r:
            assert state(r)[:2] == (11, "base") and r.root.blobs is None
            r.check()
        assert (_fingerprint(copy), _fingerprint(log)) == before
    finally:
        for name in (copy, log):
            os.chmod(name, 0o644)


def test_an_overlay_killed_while_it_commits_leaves_the_base_as_it_was(tmp_path):
    path, _ = _base(tmp_path)
    before = _fingerprint(path), _fingerprint(path + "-wal")
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_modes import ModeStorage
        p = ModeStorage({path!r}, overlay=True)
        p.root.blobs = []
        n = 0
        while True:
            n += 1
            p.root.count = n
            p.root.blobs.append(os.urandom(50_000))
            p.commit()
            if n == 20:
                print("running", flush=True)
        """)], env=dict(os.environ, PYTHONPATH=SRC), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "running\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (_fingerprint(path), _fingerprint(path + "-wal")) == before
    with ModeStorage(path) as w:  # the killed overlay's reader locks went with it
        assert w.readers() == [] and w.root.count == 10 and w.root.blobs is None
        w.check()


def test_overlay_arguments(tmp_path):
    path, _ = _base(tmp_path)
    with pytest.raises(ValueError, match="readonly"):
        ModeStorage(path, overlay=True, readonly=True)
    with pytest.raises(FileNotFoundError):
        ModeStorage(str(tmp_path / "missing.ps"), overlay=True)
    assert not os.path.exists(tmp_path / "missing.ps")


def test_overlay_beside_a_writer_of_the_base(tmp_path):
    """The base's writer keeps committing (and checkpointing) while an overlay is open: the overlay
    sees its one snapshot (the writer's log pages included) and its own changes, nothing else; the
    writer is not blocked and its commits are whole afterwards."""
    path, w = _base(tmp_path, keep_log=True)
    try:
        p = ModeStorage(path, overlay=True)
        try:
            assert state(p)[:2] == (11, "base") and p.root.items[0].value == 100
            p.root.label = "overlay"
            p.root.items[1].value = -1
            p.commit()
            seen = state(p)
            for n in range(30):  # more than a checkpoint's worth of log
                w.root.count = 1000 + n
                w.root.label = f"writer {n}"
                for item in w.root.items:
                    item.value += 1
                w.root.blobs = [os.urandom(200_000)]
                w.commit()
            w._page_file.checkpoint()
            assert state(p) == seen
            p.root.items[2].value = -2
            p.rollback()
            assert state(p) == seen
            p.check()
            assert any(reader["pid"] == os.getpid() for reader in w.readers())
        finally:
            p.close()
        w.root.count = 7
        w.commit()
        w.check()
    finally:
        w.close()
    with ModeStorage(path, readonly=True) as r:
        assert r.root.count == 7 and str(r.root.label) == "writer 29"
        r.check()


def test_overlay_beside_a_writer_in_another_process(tmp_path):
    path, _ = _base(tmp_path)
    with ModeStorage(path, overlay=True) as p:
        p.root.count = -5
        p.commit()
        result = run_python(f"""
            import sys
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            from test_modes import ModeStorage
            with ModeStorage({path!r}) as w:
                for n in range(20):
                    w.root.count = n
                    w.root.items[n].value = -n
                    w.commit()
            """)
        assert result.returncode == 0, result.stderr
        assert p.root.count == -5 and [item.value for item in p.root.items][:20] == list(range(20))
        p.check()
    with ModeStorage(path, readonly=True) as r:
        assert r.root.count == 19


# == an exception at every opcode of a commit ==============================================================
@pytest.mark.parametrize("mode", ["memory", "overlay"])
def test_interrupt_at_every_opcode_of_a_commit(tmp_path, mode):
    if mode == "memory":
        p = ModeStorage(None, pageSize=512)
    else:
        path, _ = _base(tmp_path)
        before = _fingerprint(path)
        p = ModeStorage(path, overlay=True)
    try:
        p.root.items = []
        p.root.blobs = []
        p.commit()
        committed = state(p)
        step, fired = 0, True
        while fired and step < 10_000:
            step += 1
            # a change of existing pages, a new object, growth
            p.root.count = step
            p.root.items.append(p.schema.Item(name=f"s{step}", value=step))
            p.root.blobs.append(bytes([step % 256]) * (3000 if step % 5 else 70_000))
            if len(p.root.blobs) > 6:  # and freeing: the store stays small
                del p.root.blobs[0]
                del p.root.items[0]
            pending = state(p)
            last = p.last_transaction
            fired_now = interrupt_at_opcode(step * STRIDE)
            try:
                p.commit()
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            fired = fired_now()
            if not fired or p.last_transaction != last:
                # (an interrupt at the opcodes after the commit took effect - its return - is one
                # in the caller: the commit stands)
                committed = pending
            elif step % 2:  # retry: exactly the pending changes go in (or, if the interrupt cut the
                assert state(p) == pending  # commit's own change short, it refuses: roll back)
                try:
                    p.commit()
                    committed = pending
                except IncompleteChangeError:
                    pass
            p.rollback()
            assert state(p) == committed, f"step {step}"
            p.check()
        assert 20 < step < 10_000
    finally:
        p.close()
    if mode == "overlay":
        assert _fingerprint(path) == before


@pytest.mark.parametrize("mode", ["memory", "overlay"])
def test_nested_blocks_are_savepoints(tmp_path, mode):
    p = ModeStorage(None) if mode == "memory" else ModeStorage(_base(tmp_path)[0], overlay=True)
    try:
        p.root.items = [p.schema.Item(name="kept", value=1)]
        p.commit()
        with p.transaction("outer"):
            p.root.count = 1
            try:
                with p.transaction():
                    made = p.schema.Item(name="inner", value=2)
                    p.root.items.append(made)
                    p.root.blobs = [bytes(100_000)]
                    raise ValueError("the inner block fails")
            except ValueError:
                pass
            with p.transaction():
                p.root.label = "inner kept"
        assert state(p) == (1, "inner kept", [("kept", 1)], None)
        with pytest.raises(DeadProxyError):
            made.value
        p.rollback()
        assert state(p) == (1, "inner kept", [("kept", 1)], None)
        p.check()
    finally:
        p.close()


@pytest.mark.parametrize("mode", ["memory", "overlay"])
def test_interrupt_at_every_opcode_of_a_rollback(tmp_path, mode):
    p = ModeStorage(None, pageSize=512) if mode == "memory" else ModeStorage(_base(tmp_path)[0], overlay=True)
    try:
        p.root.items = [p.schema.Item(name=str(n), value=n) for n in range(20)]
        p.root.blobs = [bytes(5000)]
        p.commit()
        committed = state(p)
        step, fired = 0, True
        while fired and step < 10_000:
            step += 1
            p.root.count = step
            p.root.items[step % 20].value = -step
            p.root.blobs.append(bytes([step % 256]) * 9000)
            fired_now = interrupt_at_opcode(step * STRIDE)
            try:
                p.rollback()
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            fired = fired_now()
            if fired:
                p.rollback()  # undisturbed this time
            assert state(p) == committed, f"step {step}"
            p.check()
        assert 10 < step < 10_000
    finally:
        p.close()


def test_memory_commit_that_fails_to_write(tmp_path):
    """A failed write at each point of a memory commit: the last commit stays, the changes pending."""
    from permastruct._mapping import FileIO
    p = ModeStorage(None, pageSize=512)
    try:
        p.root.items = [p.schema.Item(name=str(n), value=n) for n in range(100)]
        p.commit()
        for failing in range(1, 40):
            committed = state(p)
            for item in p.root.items[::7]:
                item.value += 1
            p.root.items.append(p.schema.Item(name="x" * 600, value=failing))
            pending = state(p)
            writes = [0]

            def hook(operation, path, *args):
                if operation == "pwrite" and path == "(memory)":
                    writes[0] += 1
                    if writes[0] == failing:
                        raise OSError(5, "injected")
            FileIO.hook = hook
            try:
                p.commit()
                raised = False
            except OSError:
                raised = True
            finally:
                FileIO.hook = None
            if raised:
                assert state(p) == pending
                p.rollback()
                assert state(p) == committed
            else:
                assert state(p) == pending
            p.check()
    finally:
        p.close()


def test_readonly_error_names_the_overlay_base():
    """The overlay's I/O layer refuses a write below its boundary (the engine never tries)."""
    from permastruct._mapping import FileIO, OverlayIO
    path = os.path.join(tempfile.mkdtemp(), "b")
    with open(path, "wb") as f:
        f.write(bytes(8192))
    io = OverlayIO(FileIO.open(path, readonly=True, create=False), 4096)
    try:
        with pytest.raises(ReadOnlyError, match="never written"):
            io.pwrite(b"x", 10)
        io.fallocate(4096, 8192)
        assert io.size() == 4096 + 8192
    finally:
        io.close()


class _BigTable(Storage):
    def populateSchema(self):
        s = self.schema
        self.define(Dict("Numbers")[s.Int, s.Int])

        class Root(s.Structure):
            numbers = s.Numbers
            pad = s.ByteString


def test_an_overlay_reads_a_page_run_that_crosses_the_last_whole_map_unit(tmp_path):
    path = str(tmp_path / "base.ps")
    with _BigTable(path, pageSize=1024) as p:
        p.root.pad = b"x" * 3000
        p.root.numbers = {i: i for i in range(348)}  # its hash table: a run across the last unit
    with _BigTable(path) as p:
        p.check()
    with _BigTable(path, overlay=True) as o:
        assert dict(o.root.numbers) == {i: i for i in range(348)}
        o.check()


def test_at_the_last_transaction_reads_a_page_run_that_crosses_the_last_whole_map_unit(tmp_path):
    path = str(tmp_path / "base.ps")
    with _BigTable(path, pageSize=1024, history=5) as p:
        p.root.pad = b"x" * 3000
        p.root.numbers = {i: i for i in range(348)}
        p.commit()
        last = p.undo_log()[0]["id"]
    with _BigTable(path, readonly=True, at=last) as r:
        assert dict(r.root.numbers) == {i: i for i in range(348)}
