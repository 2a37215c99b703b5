"""The write-ahead log: what a commit writes, what recovery accepts, what a checkpoint does.

Contract: DESIGN.md 3.8 and 4 (write-ahead log, two root records, checkpoint);
the layout is in ``permastruct._format`` ("Write-ahead log").  Crashes at every
I/O point, power loss, readers in other processes and full disks have their
own files; this one tests the log itself, byte by byte where it matters.
"""

import errno
import os
import subprocess
import sys
import textwrap
import zlib

import pytest

from permastruct import List, Storage
from permastruct import _format as F
from permastruct._journal import GROW_STEP, Journal
from permastruct._mapping import FileIO
from permastruct.errors import CorruptStorageError, NotAStorageError, PermastructError, StorageLockedError

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


class LogStorage(Storage):
    def populateSchema(self):
        Items = self.define(List("Items")[self.schema.Int])

        class Root(self.schema.Structure):
            n = self.schema.Int
            name = self.schema.String
            items = Items


def committed_values(path):
    p = LogStorage(path)
    try:
        p.check()
        root = p.root
        return root.n, None if root.name is None else str(root.name), list(root.items or [])
    finally:
        p.close()


class Recorder:
    """Records FileIO operations as (operation, file name suffix, args summary)."""

    def __init__(self):
        self.calls = []

    def __call__(self, operation, path, *args):
        kind = "wal" if path.endswith(F.WAL_SUFFIX) else "main"
        if operation == "pwrite":
            args = (len(args[0]), args[1])
        self.calls.append((operation, kind) + tuple(args))

    def __enter__(self):
        self.previous, FileIO.hook = FileIO.hook, self
        return self

    def __exit__(self, *exc):
        FileIO.hook = self.previous


def run_child(code):
    env = dict(os.environ, PYTHONPATH=SRC)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=120)
    return result


def make_commits(path, count, close=False):
    """Commit ``count`` transactions (n = 1..count) in a child that dies without closing."""
    code = f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_journal import LogStorage
        p = LogStorage({str(path)!r})
        p.root.items = []
        for i in range(1, {count} + 1):
            p.root.n = i
            p.root.name = "name %d" % i
            p.root.items.append(i)
            p.commit()
        {"p.close()" if close else "os._exit(0)"}
    """
    result = run_child(code)
    assert result.returncode == 0, result.stderr


def wal_of(path):
    return str(path) + F.WAL_SUFFIX


def commit_ends(path):
    journal = Journal.open(wal_of(path), True, 4096)
    try:
        return [commit.end for commit in journal.commits], journal
    finally:
        journal.close()


# -- a commit writes the log, not the main file ------------------------------------------
def test_small_commit_appends_to_the_log_and_syncs_it_once(tmp_path):
    path = tmp_path / "s.ps"
    p = LogStorage(path)
    p.root.n = 1
    p.commit()
    main_before = path.read_bytes()
    p.root.n = 2
    with Recorder() as rec:
        p.commit()
    assert [call[:2] for call in rec.calls] == [("pwrite", "wal"), ("fsync", "wal")]
    assert path.read_bytes() == main_before  # the main file waits for a checkpoint
    p.close()
    assert committed_values(path)[0] == 2


def test_commit_without_changes_writes_nothing(tmp_path):
    p = LogStorage(tmp_path / "s.ps")
    p.root.n = 1
    p.commit()
    with Recorder() as rec:
        p.commit()
        p.commit()
    assert rec.calls == []
    p.close()


def test_sync_false_never_fsyncs_a_commit(tmp_path):
    p = LogStorage(tmp_path / "s.ps", sync=False)
    p.root.n = 1
    p.commit()
    with Recorder() as rec:
        for i in range(5):
            p.root.n = i
            p.commit()
    assert rec.calls and all(call[0] == "pwrite" for call in rec.calls)
    p.close()
    assert committed_values(tmp_path / "s.ps")[0] == 4


def test_checkpoint_syncs_pages_before_the_root_record_and_resets_the_log_last(tmp_path):
    path = tmp_path / "s.ps"
    p = LogStorage(path)
    p.root.n = 7
    p.commit()
    with Recorder() as rec:
        p.close()
    ops = rec.calls
    main_writes = [i for i, call in enumerate(ops) if call[:2] == ("pwrite", "main")]
    root_write = max(i for i in main_writes if ops[i][3] in F.ROOT_OFFSETS)
    page_writes = [i for i in main_writes if ops[i][3] >= F.HEADER_BLOCK]
    fsyncs = [i for i, call in enumerate(ops) if call[:2] == ("fsync", "main")]
    reset = next(i for i, call in enumerate(ops) if call[:2] == ("pwrite", "wal") and call[3] == 0)
    assert page_writes and max(page_writes) < fsyncs[0] < root_write < fsyncs[1] < reset
    removal = next(i for i, call in enumerate(ops) if call[:2] == ("unlink", "wal"))
    assert reset < removal  # removed last, under the checkpoint lock
    assert not os.path.exists(wal_of(path))  # a clean close leaves no log behind
    assert committed_values(path)[0] == 7


def test_the_log_stays_bounded_over_many_commits(tmp_path):
    path = tmp_path / "s.ps"
    p = LogStorage(path)
    p.root.items = []
    biggest = 0
    for i in range(1500):
        p.root.n = i
        p.root.items.append(i)
        p.commit()
        biggest = max(biggest, os.path.getsize(wal_of(path)))
    assert biggest <= p._page_file.checkpoint_bytes + GROW_STEP + 64 * 1024
    assert p._page_file.main_txn > 2  # checkpoints happened on the way
    p.check()
    p.close()
    assert committed_values(path)[2] == list(range(1500))


# -- recovery ----------------------------------------------------------------------------
def test_commits_in_the_log_survive_a_crash(tmp_path):
    path = tmp_path / "s.ps"
    make_commits(path, 5)
    ends, journal = commit_ends(path)
    assert len(ends) >= 5  # still in the log: the child never closed
    assert committed_values(path) == (5, "name 5", [1, 2, 3, 4, 5])
    # the open checkpointed them, and its clean close removed the log
    assert Journal.open(wal_of(path), True, 4096) is None


@pytest.mark.parametrize("cut", ["inside_commit_frame", "inside_page_frame", "after_page_frames",
                                 "one_byte_short"])
def test_a_torn_last_commit_is_ignored(tmp_path, cut):
    path = tmp_path / "s.ps"
    make_commits(path, 4)
    ends, _ = commit_ends(path)
    last_start, last_end = ends[-2], ends[-1]
    length = {"inside_commit_frame": last_end - 10,
              "inside_page_frame": last_start + F.FRAME.size + 100,
              "after_page_frames": last_end - F.FRAME.size - F.COMMIT.size,
              "one_byte_short": last_end - 1}[cut]
    os.truncate(wal_of(path), length)
    assert committed_values(path) == (3, "name 3", [1, 2, 3])


def test_a_damaged_frame_ends_the_log_there(tmp_path):
    path = tmp_path / "s.ps"
    make_commits(path, 6)
    ends, _ = commit_ends(path)
    with open(wal_of(path), "r+b") as f:  # flip a byte in the data of commit 4's first frame
        f.seek(ends[-4] + F.FRAME.size + 50)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    # commits 4, 5 and 6 are gone, although 5 and 6 are whole: no guessing past a damaged frame
    assert committed_values(path) == (3, "name 3", [1, 2, 3])


def test_frames_of_an_old_log_generation_are_ignored(tmp_path):
    path = tmp_path / "s.ps"
    make_commits(path, 3)
    stale = open(wal_of(path), "rb").read()
    assert committed_values(path)[0] == 3  # checkpoints and resets the log
    p = LogStorage(path)
    p.root.n = 100
    p.close()
    # put the old log (different salt, older transactions) back beside the newer main file
    with open(wal_of(path), "wb") as f:
        f.write(stale)
    assert committed_values(path)[0] == 100


def test_a_log_newer_than_the_main_file_is_refused_untouched(tmp_path):
    path = tmp_path / "s.ps"
    make_commits(path, 2, close=True)
    old_main = path.read_bytes()
    make_commits_more = f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_journal import LogStorage
        p = LogStorage({str(path)!r})
        p.root.n = 50; p.commit()
        p._page_file.checkpoint()
        p.root.n = 51; p.commit()
        os._exit(0)
    """
    assert run_child(make_commits_more).returncode == 0
    with open(path, "wb") as f:  # an older main file with a log that starts later
        f.write(old_main)
    before = (path.read_bytes(), open(wal_of(path), "rb").read())
    with pytest.raises(CorruptStorageError, match="missing"):
        LogStorage(path)
    assert (path.read_bytes(), open(wal_of(path), "rb").read()) == before


def test_a_forged_commit_naming_a_page_past_the_file_is_refused(tmp_path):
    path = tmp_path / "s.ps"
    make_commits(path, 1)
    journal = Journal.open(wal_of(path), True, 4096)
    salt, txn, end, unit = journal.salt, journal.last_txn + 1, journal.end, journal.unit
    last = journal.commits[-1]
    journal.close()
    size = os.path.getsize(path)

    chain = [journal.chain]

    def frame(kind, where, data):
        header = F.FRAME.pack(kind, salt, txn, where, len(data), 0)[:28]
        chain[0] = zlib.crc32(data, zlib.crc32(header, chain[0]))
        return header + F.UINT32.pack(chain[0]) + data

    forged = frame(F.FRAME_PAGE, size + 1 << 20, bytes(unit))
    forged += frame(F.FRAME_COMMIT, 1, F.COMMIT.pack(last.page_count, last.free_head, *last.slots))
    with open(wal_of(path), "r+b") as f:
        f.seek(end)
        f.write(forged)
    with pytest.raises(CorruptStorageError, match="past the end"):
        LogStorage(path)


# -- rollback and reopen with commits still in the log -----------------------------------
def test_rollback_restores_pages_that_are_only_in_the_log(tmp_path):
    path = tmp_path / "s.ps"
    p = LogStorage(path)
    p.root.items = list(range(100))
    p.root.n = 1
    p.commit()
    assert p._page_file._logged  # committed, not yet checkpointed
    p.root.n = 2
    p.root.items[5] = -5
    p.root.items.extend(range(1000))
    p.rollback()
    assert p.root.n == 1 and list(p.root.items) == list(range(100))
    p.check()
    p.root.n = 3
    p.commit()
    p.close()
    assert committed_values(path)[:1] == (3,)


def test_a_failed_fsync_makes_the_storage_refuse_commits(tmp_path):
    path = tmp_path / "s.ps"
    p = LogStorage(path)
    p.root.n = 1
    p.commit()

    def fail_fsync(operation, name, *args):
        if operation == "fsync":
            raise OSError(5, "injected EIO")

    p.root.n = 2
    FileIO.hook = fail_fsync
    try:
        with pytest.raises(OSError):
            p.commit()
    finally:
        FileIO.hook = None
    p.root.n = 3
    with pytest.raises(PermastructError, match="fsync failed"):
        p.commit()
    p.close()  # writes nothing more
    assert committed_values(path)[0] in (1, 2)


def test_second_writer_is_refused_and_reader_allowed(tmp_path):
    path = tmp_path / "s.ps"
    p = LogStorage(path)
    p.root.n = 1
    p.commit()
    with pytest.raises(StorageLockedError):
        LogStorage(path)
    reader = LogStorage(path, readonly=True)
    assert reader.root.n == 1
    p.root.n = 2
    p.commit()
    assert reader.root.n == 1 and reader.refresh() is True and reader.root.n == 2
    assert reader.refresh() is False
    reader.close()
    p.close()


def test_a_reader_proxy_of_an_object_the_writer_freed_dies_at_refresh(tmp_path):
    path = tmp_path / "s.ps"
    p = LogStorage(path)
    p.root.name = "first"
    p.root.items = [1, 2, 3]
    p.commit()
    reader = LogStorage(path, readonly=True)
    items, root = reader.root.items, reader.root
    assert list(items) == [1, 2, 3]
    p.root.items = None  # the list is freed at this commit
    p.root.n = 9
    p.commit()
    assert list(items) == [1, 2, 3]  # the reader's snapshot still has it
    assert reader.refresh() is True
    assert root.n == 9 and root.items is None  # a proxy of a live object moves on
    with pytest.raises(PermastructError, match="freed by the writer"):
        len(items)
    reader.close()
    p.close()


def test_a_commit_that_fails_after_its_checkpoint_keeps_its_changes_pending(tmp_path):
    """A commit checkpoints before it logs itself; if logging then fails, nothing is lost or half-done.

    (The reader test of R4 is what caught a checkpoint copying the pending
    changes into the main file; this checks the writer's side of that path.)
    """
    path = tmp_path / "s.ps"
    p = LogStorage(path)
    p._page_file.checkpoint_bytes = 1  # every commit checkpoints first
    p.root.n = 1
    p.commit()
    p.root.n = 2

    def fail_the_append(operation, name, *args):
        if operation == "pwrite" and name.endswith(F.WAL_SUFFIX) and args[1] > 0:
            raise OSError(errno.ENOSPC, "injected: the disk is full")

    FileIO.hook = fail_the_append
    try:
        with pytest.raises(OSError):
            p.commit()
    finally:
        FileIO.hook = None
    assert p.root.n == 2  # the change is still pending, not lost
    p.rollback()
    assert p.root.n == 1
    p.check()
    p.root.n = 3
    p.commit()
    p.close()
    assert committed_values(path)[0] == 3


def test_free_pages_dropped_at_the_end_are_not_logged(tmp_path):
    """A transaction that frees the last pages (writing their headers) and then lets the
    allocator drop them from the end must not log them: recovery refuses a commit that
    writes past its own pages.  Found by the random-kill test (a store that would not reopen)."""
    class Names(Storage):
        def populateSchema(self):
            Strings = self.define(List("Strings")[self.schema.ByteString])

            class Root(self.schema.Structure):
                items = Strings

    path = str(tmp_path / "s.ps")
    p = Names(path, pageSize=256)
    try:
        p.root.items = [bytes([i + 1]) * 200 for i in range(60)]
        p.commit()
        grown = p._page_file.page_count
        p.root.items = []
        p._heap.collect_unreferenced()  # frees the strings' pages now: their headers are written
        released = p._heap.allocator.merge()["released"]
        assert released > 0 and p._page_file.page_count < grown
        p.commit()
        end = F.HEADER_BLOCK + p._page_file.page_count * p._page_file.page_size
        assert all(offset < end for offset, _ in p._page_file.journal.commits[-1].frames)
        with Names(path, readonly=True) as reader:  # reads the log as a recovery would
            assert list(reader.root.items) == []
            reader.check()
        p.check()
        p.root.items = [b"again" * 50 for _ in range(40)]  # the file grows over those pages again
        p.commit()
        p.check()
    finally:
        p.close()
    with Names(path) as again:
        assert list(again.root.items) == [b"again" * 50] * 40
        again.check()


# -- a commit that raises is not made (issue 16 item 1; R7) ------------------------------------------
def crash_image(path, into):
    """The files as a crash now would leave them."""
    import shutil
    for suffix in ("", F.WAL_SUFFIX):
        if os.path.exists(f"{path}{suffix}"):
            shutil.copyfile(f"{path}{suffix}", f"{into}{suffix}")
    return into


@pytest.mark.parametrize("where", ["after the frames", "in the fsync", "after the fsync"])
def test_a_commit_interrupted_after_its_log_write_is_undone(tmp_path, where):
    """KeyboardInterrupt after the commit frame reached the log: the commit is taken out of the log
    (a crash finds the previous one), the changes stay pending, and a retry commits them."""
    path = tmp_path / "s.ps"
    p = LogStorage(path)
    p.root.n = 1
    p.commit()
    p.root.n = 2
    p.root.name = "two"
    fired = []

    def interrupt(operation, name, *args):
        if fired or not name.endswith(F.WAL_SUFFIX):
            return
        if (where == "after the frames" and operation == "fsync") or (where == "in the fsync" and operation == "fsync"):
            fired.append(operation)
            raise KeyboardInterrupt
    if where == "after the fsync":
        real = Journal.append

        def append(self, *args, **kwargs):
            commit = real(self, *args, **kwargs)
            if not fired:
                fired.append("append")
                raise KeyboardInterrupt
            return commit
        Journal.append = append
    else:
        FileIO.hook = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            p.commit()
    finally:
        FileIO.hook = None
        if where == "after the fsync":
            Journal.append = real
    assert fired
    assert committed_values(crash_image(path, tmp_path / "crash.ps"))[:2] == (1, None)
    assert p.root.n == 2  # still pending
    p.check()
    p.commit()  # the retry commits them
    assert committed_values(crash_image(path, tmp_path / "crash2.ps"))[:2] == (2, "two")
    p.root.n = 3
    p.commit()
    p.close()
    assert committed_values(path)[:2] == (3, "two")


@pytest.mark.parametrize("opcodes", range(1, 13))
def test_an_interrupt_at_any_bytecode_after_the_log_write_undoes_the_commit(tmp_path, opcodes):
    """An interrupt can land on any bytecode, the jump past an ``except`` clause too: the log
    append must count its commit frame as written from before the write, or the undo leaves the
    frame in the log (found by the random-bytecode interrupt suite: ``check()`` then saw a log one
    commit ahead of the storage)."""
    path = tmp_path / "s.ps"
    p = LogStorage(path)
    p.root.n = 1
    p.commit()
    p.root.n = 2
    state = {"written": False, "count": 0, "fired": False}

    def hook(operation, name, *args):
        if operation == "pwrite" and name.endswith(F.WAL_SUFFIX):
            state["written"] = True

    def local(frame, event, arg):
        if event == "opcode" and state["written"] and not state["fired"]:
            state["count"] += 1
            if state["count"] == opcodes:
                state["fired"] = True
                raise KeyboardInterrupt
        return local

    def trace(frame, event, arg):
        if frame.f_code is Journal.append.__code__:
            frame.f_trace_opcodes = True
            return local
        return None
    FileIO.hook = hook
    sys.settrace(trace)
    try:
        p.commit()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
        FileIO.hook = None
    if not state["fired"]:
        pytest.skip(f"the append returned within {opcodes} bytecodes of its write")
    p.check()  # the log holds no commit beyond the storage's
    assert committed_values(crash_image(path, tmp_path / "crash.ps"))[0] == 1
    assert p.root.n == 2  # still pending
    p.rollback()
    p.check()
    p.close()
    assert committed_values(path)[0] == 1


def test_an_interrupt_between_the_engine_and_the_storage_bookkeeping_undoes_the_commit(tmp_path, monkeypatch):
    """The commit returns only when the storage has recorded it too: an exception after the
    engine published it (here: making the storage's new set of created objects) undoes it."""
    import permastruct.storage as storage_module
    path = tmp_path / "s.ps"
    p = LogStorage(path)
    p.root.n = 1
    p.commit()
    p.root.n = 2
    calls = []

    def failing_set(*args):
        calls.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(storage_module, "set", failing_set, raising=False)
    with pytest.raises(KeyboardInterrupt):
        p.commit()
    monkeypatch.undo()
    assert calls
    assert committed_values(crash_image(path, tmp_path / "crash.ps"))[0] == 1
    p.rollback()
    assert p.root.n == 1
    p.check()
    p.close()
    assert committed_values(path)[0] == 1


def test_a_commit_never_acknowledged_is_undone_by_the_next_call(tmp_path):
    """If the storage never confirms a commit the engine published (an exception came first and
    even the undo in its handler could not run), the next operation undoes it before anything."""
    path = tmp_path / "s.ps"
    p = LogStorage(path)
    p.root.n = 1
    p.commit()
    p.root.n = 2
    pf = p._page_file
    pf.commit(acknowledge=False)  # published, never acknowledged
    assert pf._unacknowledged is not None
    p.rollback()  # settles it first: the commit is undone, then the changes are rolled back
    assert p.root.n == 1 and pf._unacknowledged is None
    assert committed_values(crash_image(path, tmp_path / "crash.ps"))[0] == 1
    p.root.n = 5
    pf.commit(acknowledge=False)
    pf.close(flush=False)  # (what close() does when its commit fails) settles: not kept
    p._closed = True
    p._finalizer.detach()
    assert committed_values(path)[0] == 1


def test_a_checkpoint_interrupted_at_every_step_leaves_a_store_that_recovers(tmp_path):
    """An exception at each I/O step of a checkpoint: the live store carries on and commits, and the
    files as they are after it (a crash) reopen at the last commit."""
    base = tmp_path / "base.ps"
    p = LogStorage(base)
    p.root.items = list(range(3000))
    p.commit()
    p.close()
    steps = 0
    while True:
        path = tmp_path / f"s{steps}.ps"
        import shutil
        shutil.copyfile(base, path)
        p = LogStorage(path)
        for i in range(3):
            p.root.n = i + 1
            p.root.items[i] = -i
            p.commit()
        seen = []

        def interrupt(operation, name, *args):
            seen.append(operation)
            if len(seen) == steps + 1:
                raise KeyboardInterrupt
        FileIO.hook = interrupt
        try:
            p._page_file.checkpoint()
            finished = True
        except KeyboardInterrupt:
            finished = False
        finally:
            FileIO.hook = None
        assert committed_values(crash_image(path, tmp_path / f"c{steps}.ps"))[0] == 3
        p.root.n = 4
        p.commit()
        p.check()
        assert committed_values(crash_image(path, tmp_path / f"d{steps}.ps"))[0] == 4
        p.close()
        assert committed_values(path)[0] == 4
        if finished:
            break
        steps += 1
    assert steps >= 4  # pages, fsync, root record, fsync, log header at least


# -- hostile neighbours (issue 16 items 9, 10) ----------------------------------------------------
def test_a_forged_commit_claiming_many_pages_makes_no_huge_file(tmp_path):
    """A 176-byte log with one well-formed commit frame claiming 262,144 pages: refused, and
    neither file grows (it used to allocate 1 GiB of disk)."""
    path = tmp_path / "s.ps"
    with LogStorage(path) as p:
        p.root.n = 1
    size = os.path.getsize(path)
    head = open(path, "rb").read(F.HEADER_BLOCK)
    roots = [F.unpack_root(head[o:o + F.ROOT.size]) for o in F.ROOT_OFFSETS]
    txn, _, _, slots = max(r for r in roots if r is not None)
    salt = 0x5EED
    body = F.COMMIT.pack(262_144, F.NO_NEXT_FREE_PAGE, *slots)
    frame = F.FRAME.pack(F.FRAME_COMMIT, salt, txn + 1, 0, len(body), 0)[:28]
    log = (F.pack_wal_header(4096, salt, txn)
           + frame + F.UINT32.pack(zlib.crc32(body, zlib.crc32(frame, salt))) + body)
    assert len(log) == 176
    with open(wal_of(path), "wb") as f:
        f.write(log)
    for readonly in (False, True):
        with pytest.raises(CorruptStorageError, match="262144 pages"):
            LogStorage(path, readonly=readonly)
    assert os.path.getsize(path) == size and os.path.getsize(wal_of(path)) == 176


def test_a_foreign_file_at_the_logs_name_is_never_written(tmp_path):
    path = tmp_path / "notes.txt"
    with LogStorage(path) as p:
        p.root.n = 1
    other = b"my own notes, nothing to do with permastruct\n" * 10
    with open(wal_of(path), "wb") as f:
        f.write(other)
    for readonly in (False, True):
        with pytest.raises(NotAStorageError, match="not a permastruct log"):
            LogStorage(path, readonly=readonly)
    assert open(wal_of(path), "rb").read() == other
    # ... also when it appears while the store is open (the log is made at the first commit)
    os.unlink(wal_of(path))
    p = LogStorage(path)
    with open(wal_of(path), "wb") as f:
        f.write(other)
    p.root.n = 2
    with pytest.raises(NotAStorageError):
        p.commit()
    assert open(wal_of(path), "rb").read() == other
    p.rollback()
    p._page_file.journal = None
    os.unlink(wal_of(path))
    p.close()
    assert committed_values(path)[0] == 1


def test_a_fifo_at_the_logs_name_does_not_hang_an_open(tmp_path):
    path = tmp_path / "s.ps"
    with LogStorage(path) as p:
        p.root.n = 1
    os.mkfifo(wal_of(path))
    for readonly in (True, False):
        with pytest.raises(NotAStorageError, match="FIFO"):
            LogStorage(path, readonly=readonly)
    os.unlink(wal_of(path))
    assert committed_values(path)[0] == 1


def test_a_log_whose_first_header_never_reached_the_disk_is_the_stores_own(tmp_path):
    """A log of zeros (created, its header lost in a power loss) holds nothing and is reused."""
    path = tmp_path / "s.ps"
    with LogStorage(path) as p:
        p.root.n = 1
    with open(wal_of(path), "wb") as f:
        f.write(bytes(64))
    with LogStorage(path) as p:
        assert p.root.n == 1
        p.root.n = 2
    assert committed_values(path)[0] == 2


# -- one store whatever names it (issue 16 item 2; R8) ----------------------------------------------
def commit_and_die(path, n):
    """In a child: open the store at ``path``, set n, commit, and die without closing."""
    result = run_child(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_journal import LogStorage
        p = LogStorage({str(path)!r})
        p.root.n = {n}
        p.root.items = list(range({n}))
        p.commit()
        os._exit(0)
    """)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind", ["symlink", "hard link", "hard link elsewhere"])
def test_a_store_is_one_store_through_any_of_its_names(tmp_path, kind):
    """Commits a killed writer left in the log are found through every name of the store,
    and never replayed over newer data."""
    path = tmp_path / "real.ps"
    with LogStorage(path) as p:
        p.root.n = 1
    folder = tmp_path / ("elsewhere" if kind.endswith("elsewhere") else "")
    folder.mkdir(exist_ok=True)
    other = folder / "other.ps"
    (os.symlink if kind == "symlink" else os.link)(path, other)
    commit_and_die(other, 2)  # its log is left behind, named after `other`
    assert committed_values(path)[0] == 2  # found through the real name (and checkpointed there)
    commit_and_die(path, 3)
    assert committed_values(other)[0] == 3
    commit_and_die(other, 4)
    with LogStorage(path) as p:
        assert p.root.n == 4 and list(p.root.items) == list(range(4))
        p.check()
        p.root.n = 5
    with LogStorage(other) as p:
        assert p.root.n == 5
        p.check()
    assert not [name for name in os.listdir(tmp_path) if name.endswith("-wal")]


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
def test_two_names_do_not_make_two_writers(tmp_path, kind):
    path = tmp_path / "real.ps"
    with LogStorage(path) as p:
        p.root.n = 1
    other = tmp_path / "other.ps"
    (os.symlink if kind == "symlink" else os.link)(path, other)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        sys.path.insert(0, {SRC!r})
        from test_journal import LogStorage
        p = LogStorage({str(other)!r})
        print("open", flush=True)
        sys.stdin.readline()
        p.close()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "open"
        with pytest.raises(StorageLockedError):
            LogStorage(path)
    finally:
        child.communicate("\n", timeout=60)


def test_a_copy_of_both_files_is_a_store_and_a_copy_of_one_never_reads_the_others_log(tmp_path):
    import shutil
    path = tmp_path / "a.ps"
    with LogStorage(path) as p:
        p.root.n = 1
    commit_and_die(path, 2)  # a log with transaction n=2 beside a.ps
    both = tmp_path / "both.ps"
    shutil.copyfile(path, both)
    shutil.copyfile(wal_of(path), wal_of(both))
    alone = tmp_path / "alone.ps"
    shutil.copyfile(path, alone)  # its header block names a.ps-wal, which is not its log
    assert committed_values(both)[0] == 2
    assert committed_values(alone)[0] == 1
    with LogStorage(alone) as p:  # it lives its own life from there
        p.root.n = 10
    assert committed_values(path)[0] == 2 and committed_values(alone)[0] == 10


def test_a_stale_log_of_the_store_is_never_replayed_over_newer_data(tmp_path):
    """A log that does not continue the main file's history (here: saved aside, while the store went
    on through other commits and checkpoints, then put back) is ignored and then overwritten."""
    import shutil
    path = tmp_path / "s.ps"
    with LogStorage(path) as p:
        p.root.n = 1
    commit_and_die(path, 2)
    shutil.copyfile(wal_of(path), tmp_path / "saved-wal")
    with LogStorage(path) as p:  # recovers n=2, then goes on
        assert p.root.n == 2
        for n in range(3, 6):
            p.root.n = n
            p.root.items = [n]
            p.commit()
    shutil.copyfile(tmp_path / "saved-wal", wal_of(path))
    with LogStorage(path) as p:
        assert p.root.n == 5 and list(p.root.items) == [5]
        p.check()
    assert committed_values(path)[0] == 5


# -- a large commit writes its fresh pages once (issue 11, item 5) ------------------------------
class Big(Storage):
    def populateSchema(self):
        class Root(self.schema.Structure):
            data = self.schema.Buffer
            n = self.schema.Int


def test_a_large_commit_writes_its_fresh_pages_once_and_syncs_twice(tmp_path):
    """Pages past everything a reader or recovery can read go straight into the main file (synced
    before the commit frame): the data is written once, with two fsyncs, and close copies nothing."""
    path = str(tmp_path / "big.ps")
    p = Big(path)
    p.root.n = 1
    p.commit()
    written, syncs = {}, []

    def hook(operation, file, *args):
        if operation == "pwrite":
            written[file] = written.get(file, 0) + len(args[0])
        elif operation == "fsync":
            syncs.append(file)
    size = 24 << 20
    payload = bytes(range(256)) * (size // 256)
    FileIO.hook = hook
    try:
        p.root.data = payload
        p.commit()
        commit_written, commit_syncs = dict(written), list(syncs)
        reader = Big(path, readonly=True)
        assert bytes(reader.root.data) == payload  # a reader opened now sees it in the main file
        reader.close()
        p.close()
    finally:
        FileIO.hook = None
    assert commit_written.get(path, 0) >= size and commit_written.get(path + "-wal", 0) < (1 << 20)
    assert sorted(commit_syncs) == [path, path + "-wal"]
    assert sum(written.values()) < size * 1.1  # the close copied (almost) nothing more
    with Big(path) as p:
        assert bytes(p.root.data) == payload and p.root.n == 1
        p.check()


def test_fresh_pages_written_for_a_commit_that_then_failed_are_not_part_of_the_store(tmp_path, monkeypatch):
    from permastruct.errors import StorageFullError

    path = str(tmp_path / "failed.ps")
    p = Big(path)
    p.root.n = 1
    p.commit()
    p.root.data = b"\x01" * (4 << 20)
    p.root.n = 2

    def hook(operation, file, *args):  # the log write fails: the commit fails after the main file's
        if operation == "pwrite" and file.endswith("-wal"):
            raise OSError(errno.ENOSPC, "injected", file)
    monkeypatch.setattr(FileIO, "hook", hook)
    with pytest.raises(StorageFullError):
        p.commit()
    monkeypatch.setattr(FileIO, "hook", None)
    copy = tmp_path / "crashed.ps"
    import shutil
    shutil.copy(path, copy)
    if os.path.exists(path + "-wal"):
        shutil.copy(path + "-wal", str(copy) + "-wal")
    with Big(str(copy)) as q:  # a crash now: the store is at its last commit
        assert q.root.n == 1 and q.root.data is None
        q.check()
    p.commit()  # the same changes commit once there is room (their pages are in the main file already)
    p.close()
    with Big(path) as p:
        assert p.root.n == 2 and bytes(p.root.data) == b"\x01" * (4 << 20)
        p.check()


def test_fresh_pages_of_many_small_objects_across_map_segments_are_written_once(tmp_path):
    """Slab pages of many records span several segments of the map: the private copies of every
    one of them are dropped after the commit writes them (a run of pages that crosses into the
    next segment is dropped there too), so neither a later commit nor the close writes them again."""
    path = str(tmp_path / "records.ps")
    p = RecordStore(path)
    p.root.items = []
    p.commit()
    p.root.items.extend_records([(i, i * 0.5, b"name-%011d" % i) for i in range(250_000)])
    written = {}

    def hook(operation, file, *args):
        if operation == "pwrite":
            written[os.path.basename(file)] = written.get(os.path.basename(file), 0) + len(args[0])
    FileIO.hook = hook
    try:
        p.commit()
        assert p._page_file.uncommitted() == []  # nothing left private: all of it is in the file
        at_commit = dict(written)
        p.close()
    finally:
        FileIO.hook = None
    assert at_commit["records.ps"] > 10 << 20 and at_commit.get("records.ps-wal", 0) < 1 << 20
    assert sum(written.values()) < 1.05 * sum(at_commit.values())
    with RecordStore(path) as p:
        assert len(p.root.items) == 250_000 and p.root.items[-1].name == b"name-%011d" % 249_999
        p.check()


class RecordStore(Storage):
    def populateSchema(self):
        class Rec(self.schema.Structure):
            i = self.schema.Int
            f = self.schema.Float
            name = self.schema.ByteString
        self.define(List("Recs")[Rec])

        class Root(self.schema.Structure):
            items = self.schema.Recs
