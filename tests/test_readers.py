"""DESIGN 3.8 and R4: one writer, many read-only opens, the writer lock.

The R4 test (``test_readers_see_whole_commits_while_a_writer_runs``) runs one
writer process that moves money between accounts, grows the file with large
buffers and strings and sometimes rolls back, and four reader processes that
``refresh()`` in a loop and check the invariants of every snapshot.  It runs
for ``PERMASTRUCT_READERS_SECONDS`` seconds (default 5, or 60 with
``PERMASTRUCT_STRESS=1``); the counts are printed (``pytest -s``)::

    PYTHONPATH=src python3 -m pytest -s tests/test_readers.py -k whole_commits

The other tests check, mostly in one process, what a reader sees, that
proxies survive refresh and growth, that readers hold back checkpoints, that
read-only storages refuse writes, and the writer lock (at once, with a
timeout, across processes, after SIGKILL, after close with live proxies, and
in a forked child).
"""

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import traceback

import pytest

from permastruct import Dict, List, Storage
from permastruct.errors import (DeadProxyError, ForkedProcessError, PermastructError, ReadOnlyError, StorageClosedError,
                                StorageLockedError)
from permastruct.pages import PageFile

SRC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _long_run():
    return os.environ.get("PERMASTRUCT_STRESS", "") not in ("", "0")


def run_seconds():
    """How long the R4 writer and readers run."""
    value = os.environ.get("PERMASTRUCT_READERS_SECONDS")
    if value:
        return float(value)
    return 60.0 if _long_run() else 5.0


class Bank(Storage):
    """Accounts whose balances always add up to TOTAL, plus growth that readers verify."""

    def populateSchema(self):
        s = self.schema

        class Account(s.Structure):
            balance = s.Int
            name = s.String

        class Blob(s.Structure):
            fill = s.Int  # every byte of data is this value
            size = s.Int  # len(data)
            data = s.Buffer

        Accounts = self.define(List("Accounts")[Account])
        ByName = self.define(Dict("ByName")[s.String, Account])
        Blobs = self.define(List("Blobs")[Blob])
        Notes = self.define(List("Notes")[s.String])

        class Root(s.Structure):
            generation = s.Int  # +1 at every commit of the writer
            naccounts = s.Int
            nblobs = s.Int
            accounts = Accounts
            by_name = ByName
            blobs = Blobs
            notes = Notes


INITIAL_ACCOUNTS = 40
INITIAL_BALANCE = 1000
TOTAL = INITIAL_ACCOUNTS * INITIAL_BALANCE
MB = 1 << 20


def note_text(length):
    """A big string that says how long it is: one letter chosen by the length."""
    return chr(65 + length % 26) * length


def make_bank(path):
    p = Bank(path)
    root = p.root
    root.accounts = []
    root.by_name = {}
    root.blobs = []
    root.notes = []
    for i in range(INITIAL_ACCOUNTS):
        account = p.schema.Account(balance=INITIAL_BALANCE, name=f"acct-{i}")
        root.accounts.append(account)
        root.by_name[f"acct-{i}"] = account
    root.naccounts = INITIAL_ACCOUNTS
    root.generation = 1
    p.commit()
    return p


def check_snapshot(p, rng, last_generation, deep=True):
    """Check every invariant of the snapshot ``p`` sees; return its generation."""
    root = p.root
    generation = root.generation
    assert generation >= last_generation, f"generation went back from {last_generation} to {generation}"
    accounts = root.accounts
    naccounts = root.naccounts
    balances = [account.balance for account in accounts]
    assert len(balances) == naccounts, f"{len(balances)} accounts, root says {naccounts}"
    assert sum(balances) == TOTAL, f"balances add up to {sum(balances)}, not {TOTAL} (generation {generation})"
    by_name = root.by_name
    assert len(by_name) == naccounts
    for i in rng.sample(range(naccounts), min(5, naccounts)):
        account = accounts[i]
        assert str(account.name) == f"acct-{i}"
        assert by_name[f"acct-{i}"].isSameAs(account)
    blobs = root.blobs
    assert len(blobs) == root.nblobs
    checked_bytes = 0
    for blob in blobs:
        fill, size = blob.fill, blob.size
        assert len(blob.data) == size
        if deep:
            view = memoryview(blob.data)
            try:
                assert view.nbytes == size and view.readonly == p.readonly
                data = view.tobytes()
            finally:
                view.release()
            assert data == bytes([fill]) * size, (
                f"blob of {size} bytes is not all {fill}: holds {sorted(set(data))[:10]}")
            checked_bytes += size
    for note in root.notes:
        text = str(note)
        assert text == note_text(len(text)), f"note of {len(text)} characters is torn"
    return generation, checked_bytes


def log_size(p):
    """The logical size of ``p``'s write-ahead log (its header and whole frames)."""
    journal = p._page_file.journal
    return journal.size() if journal is not None else 0


def run_python(code, timeout=60, **kwargs):
    """Run ``code`` in a fresh interpreter with permastruct importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC_DIR + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=timeout, **kwargs)


def start_python(code):
    """Start ``code`` in a fresh interpreter; its stdin and stdout are pipes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC_DIR + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


# -- R4: processes ------------------------------------------------------------------
def _writer(path, seed, stop, report):
    """Move money, grow the file, roll back sometimes, until ``stop`` is set; then close."""
    try:
        rng = random.Random(seed)
        p = Bank(path)
        root = p.root
        counts = dict(commits=0, rollbacks=0, transfers=0, blobs_added=0, blobs_rewritten=0,
                      blobs_dropped=0, accounts_added=0, notes_added=0, max_log=0, max_log_file=0,
                      log_resets=0, max_commit_s=0.0)
        log = path + "-wal"
        while not stop.is_set():
            op = rng.random()
            accounts = root.accounts
            n = root.naccounts
            if op < 0.55:
                for _ in range(rng.randint(1, 20)):
                    a, b = rng.randrange(n), rng.randrange(n)
                    amount = rng.randint(0, 50)
                    accounts[a].balance -= amount
                    accounts[b].balance += amount
                    counts["transfers"] += 1
            elif op < 0.62:
                account = p.schema.Account(balance=0, name=f"acct-{n}")
                accounts.append(account)
                root.by_name[f"acct-{n}"] = account
                root.naccounts = n + 1
                giver = accounts[rng.randrange(n)]
                amount = rng.randint(0, 100)
                giver.balance -= amount
                account.balance += amount
                counts["accounts_added"] += 1
            elif op < 0.69:
                size = rng.choice((1, 2, 3, 4, 6)) * MB + rng.randrange(4096)
                fill = rng.randint(1, 255)
                root.blobs.append(p.schema.Blob(fill=fill, size=size, data=bytes([fill]) * size))
                root.nblobs += 1
                counts["blobs_added"] += 1
            elif op < 0.74 and len(root.blobs):
                blob = root.blobs[rng.randrange(len(root.blobs))]
                fill = rng.randint(1, 255)
                view = memoryview(blob.data)
                view[:] = bytes([fill]) * blob.size
                view.release()
                blob.fill = fill
                counts["blobs_rewritten"] += 1
            elif op < 0.80 and len(root.blobs) > 4:
                del root.blobs[rng.randrange(len(root.blobs))]
                root.nblobs -= 1
                counts["blobs_dropped"] += 1
            elif op < 0.86:
                root.notes.append(note_text(rng.randint(1000, 400_000)))
                if len(root.notes) > 6:
                    del root.notes[0]
                counts["notes_added"] += 1
            else:
                # Changes that break every invariant, then thrown away.
                accounts[rng.randrange(n)].balance += 1_000_000
                root.naccounts = n + 5
                if len(root.blobs):
                    root.blobs[0].fill ^= 0x55
                    view = memoryview(root.blobs[0].data)
                    view[:100] = bytes(100)
                    view.release()
                root.blobs.append(p.schema.Blob(fill=3, size=10, data=b"x" * 10))
                root.notes.append("torn" * 1000)
                p.rollback()
                root = p.root
                counts["rollbacks"] += 1
                continue
            root.generation += 1
            before = log_size(p)
            started = time.monotonic()
            p.commit()
            counts["max_commit_s"] = max(counts["max_commit_s"], time.monotonic() - started)
            counts["commits"] += 1
            after = log_size(p)
            counts["log_resets"] += after < before
            counts["max_log"] = max(counts["max_log"], after)
            counts["max_log_file"] = max(counts["max_log_file"], os.path.getsize(log))
        counts["generation"] = root.generation
        counts["naccounts"] = root.naccounts
        counts["nblobs"] = root.nblobs
        counts["file"] = os.path.getsize(path)
        p.close()
        report.put(("writer", counts))
    except BaseException:
        report.put(("writer", {"error": traceback.format_exc()}))


def _reader(path, seed, stop, report, try_writer):
    """Refresh and check snapshots until ``stop`` is set."""
    try:
        rng = random.Random(seed)
        counts = dict(snapshots=0, changed=0, checked_mb=0, locked=None)
        p = Bank(path, readonly=True)
        generation, checked = check_snapshot(p, rng, 0)
        held = p.root.accounts  # a proxy kept across every refresh
        while not stop.is_set():
            if p.refresh():
                counts["changed"] += 1
            generation, checked = check_snapshot(p, rng, generation)
            counts["snapshots"] += 1
            counts["checked_mb"] += checked // MB
            assert sum(account.balance for account in held) == TOTAL
            if try_writer and counts["locked"] is None and counts["snapshots"] >= 3:
                try:
                    Bank(path, timeout=0.05).close()
                    counts["locked"] = "a second writer opened the file"
                except StorageLockedError:
                    counts["locked"] = "StorageLockedError"
        counts["generation"] = generation
        p.close()
        report.put(("reader", counts))
    except BaseException:
        report.put(("reader", {"error": traceback.format_exc()}))


@needs_fork
def test_readers_see_whole_commits_while_a_writer_runs(tmp_path):
    """R4: 1 writer + 4 reader processes: no torn read, no error, second writer refused, log bounded.

    The writer moves money between accounts (the total never changes), adds
    accounts, appends buffers of 1-6 MB whose bytes all equal their ``fill``
    field, rewrites them in place, drops them, appends big strings, and rolls
    back transactions that break every invariant.  Each reader refreshes and
    checks every invariant of every snapshot, including a proxy it holds
    from its open.  A reader and this process try to open a second writer.
    """
    path = str(tmp_path / "bank.ps")
    make_bank(path).close()
    seconds = run_seconds()
    context = multiprocessing.get_context("fork")
    stop_readers, stop_writer = context.Event(), context.Event()
    report = context.Queue()
    writer = context.Process(target=_writer, args=(path, 1, stop_writer, report))
    readers = [context.Process(target=_reader, args=(path, 100 + i, stop_readers, report, i == 0))
               for i in range(4)]
    started = time.monotonic()
    writer.start()
    for reader in readers:
        reader.start()
    results = []
    try:
        time.sleep(min(1.0, seconds / 2))
        with pytest.raises(StorageLockedError):
            Bank(path)
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        stop_readers.set()  # readers first: then the writer's close can checkpoint everything
        for _ in readers:
            results.append(report.get(timeout=120))
        stop_writer.set()
        results.append(report.get(timeout=120))
    finally:
        stop_readers.set()
        stop_writer.set()
        for process in [writer] + readers:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()
    elapsed = time.monotonic() - started
    errors = [counts["error"] for _, counts in results if "error" in counts]
    assert not errors, "\n".join(errors)
    (writer_counts,) = [counts for kind, counts in results if kind == "writer"]
    reader_counts = [counts for kind, counts in results if kind == "reader"]
    print(f"\nR4 {elapsed:.1f} s: writer {writer_counts}")
    for counts in reader_counts:
        print(f"   reader {counts}")
    print(f"   log: max {writer_counts['max_log'] / MB:.1f} MiB logical, "
          f"{writer_counts['max_log_file'] / MB:.1f} MiB file, {writer_counts['log_resets']} resets; "
          f"main file {writer_counts['file'] / MB:.1f} MiB")
    assert writer.exitcode == 0 and all(reader.exitcode == 0 for reader in readers)
    assert writer_counts["commits"] > 10 and writer_counts["rollbacks"] > 0
    assert writer_counts["blobs_added"] > 0
    assert [counts["locked"] for counts in reader_counts if counts["locked"]] == ["StorageLockedError"]
    for counts in reader_counts:
        assert counts["snapshots"] > 3
        assert counts["changed"] > 0, "a reader never saw a new commit"
        assert counts["generation"] <= writer_counts["generation"]
    # Bounded: the checkpoint threshold plus a few of the largest commits (6 MiB).
    bound = 2 * PageFile.checkpoint_bytes + 3 * 7 * MB
    assert writer_counts["max_log"] < bound, writer_counts
    assert writer_counts["max_log_file"] < bound, writer_counts
    with Bank(path) as p:
        assert log_size(p) <= 64  # the writer's close checkpointed everything: no reader was left
        p.check()
        generation, _ = check_snapshot(p, random.Random(0), 0)
        assert generation == writer_counts["generation"]
        assert p.root.naccounts == writer_counts["naccounts"]
        assert p.root.nblobs == writer_counts["nblobs"]


# -- what a reader sees ----------------------------------------------------------------
def blob_bytes(size, seed):
    """``size`` bytes in which every 4 KiB page starts with its number and the seed (misplaced pages show)."""
    data = bytearray(bytes(range(256)) * (size // 256 + 1))[:size]
    for page in range(0, size - 16, 4096):
        data[page:page + 16] = page.to_bytes(8, "little") + seed.to_bytes(8, "little")
    return bytes(data)


def test_a_reader_sees_the_snapshot_of_its_open(tmp_path):
    path = str(tmp_path / "snap.ps")
    w = make_bank(path)
    r = Bank(path, readonly=True)
    accounts = r.root.accounts
    assert r.root.generation == 1 and len(accounts) == INITIAL_ACCOUNTS
    w.root.accounts[0].balance -= 10
    w.root.accounts[1].balance += 10
    w.root.accounts.append(w.schema.Account(balance=0, name="late"))
    w.root.naccounts += 1
    w.root.notes.append("committed")
    w.root.generation = 2
    w.commit()
    w.root.generation = 3  # not committed: never seen by a reader
    w.root.accounts[2].balance = 0
    # Before refresh: exactly the state at its open.
    assert r.root.generation == 1
    assert [a.balance for a in accounts] == [INITIAL_BALANCE] * INITIAL_ACCOUNTS
    assert len(r.root.notes) == 0
    # A second reader opened now sees the commit, not the pending changes.
    with Bank(path, readonly=True) as other:
        assert other.root.generation == 2 and other.root.accounts[2].balance == INITIAL_BALANCE
        assert [str(note) for note in other.root.notes] == ["committed"]
    assert r.refresh() is True
    assert r.root.generation == 2
    balances = [a.balance for a in accounts]  # the proxy from before the refresh
    assert balances[:3] == [INITIAL_BALANCE - 10, INITIAL_BALANCE + 10, INITIAL_BALANCE]
    assert len(accounts) == INITIAL_ACCOUNTS + 1 and str(accounts[-1].name) == "late"
    assert sum(balances) == TOTAL
    assert [str(note) for note in r.root.notes] == ["committed"]
    assert r.refresh() is False  # nothing new
    w.rollback()
    assert r.refresh() is False  # a rollback commits nothing
    w.root.generation = 4
    w.commit()
    assert r.refresh() is True and r.root.generation == 4
    w.close()
    assert r.refresh() is False and r.root.generation == 4  # close with nothing pending
    r.check()
    r.close()
    with pytest.raises(StorageClosedError):
        r.refresh()


def test_a_writable_storage_refresh_does_nothing(tmp_path):
    path = str(tmp_path / "w.ps")
    with make_bank(path) as w:
        w.root.generation = 7
        assert w.refresh() is False
        assert w.root.generation == 7


def test_reader_proxies_survive_refresh_and_a_lot_of_growth(tmp_path):
    """A 50 MB buffer added after the reader opened: read after refresh, also through memoryview."""
    path = str(tmp_path / "grow.ps")
    w = make_bank(path)
    w.root.blobs.append(w.schema.Blob(fill=0, size=10000, data=blob_bytes(10000, 1)))
    w.root.nblobs = 1
    w.commit()
    size_before = os.path.getsize(path)
    r = Bank(path, readonly=True)
    root, accounts, account = r.root, r.root.accounts, r.root.accounts[5]
    name, small = account.name, r.root.blobs[0]
    small_view = memoryview(small.data)
    assert small_view.readonly and small_view.tobytes() == blob_bytes(10000, 1)

    big = 50 * MB + 123
    w.root.blobs.append(w.schema.Blob(fill=0, size=big, data=blob_bytes(big, 2)))
    w.root.nblobs = 2
    memoryview(w.root.blobs[0].data)[:] = blob_bytes(10000, 3)
    account_w = w.root.accounts[5]
    account_w.balance -= 1
    w.root.accounts[6].balance += 1
    for i in range(2000):  # many small objects too: the file grows in many places
        w.root.notes.append(f"n{i}")
    w.commit()
    assert os.path.getsize(path) > size_before + 50 * MB
    # Still the old snapshot, through every proxy and view held.
    assert len(r.root.blobs) == 1 and account.balance == INITIAL_BALANCE
    assert small_view.tobytes() == blob_bytes(10000, 1)

    assert r.refresh() is True
    assert len(r.root.blobs) == 2 and len(r.root.notes) == 2000 and str(r.root.notes[1999]) == "n1999"
    assert root.nblobs == 2 and account.balance == INITIAL_BALANCE - 1 and str(name) == "acct-5"
    assert sum(a.balance for a in accounts) == TOTAL
    assert small_view.tobytes() == blob_bytes(10000, 3)  # views show the snapshot the reader is at
    blob = r.root.blobs[1]
    view = memoryview(blob.data)
    assert view.readonly and view.nbytes == big and len(blob.data) == big
    assert view[:16].tobytes() == blob_bytes(32, 2)[:16]
    assert view.tobytes() == blob_bytes(big, 2)
    assert bytes(blob.data) == blob_bytes(big, 2)
    with pytest.raises(TypeError):
        view[0] = 1  # read-only memory

    # More growth while the reader holds the 50 MB view; then drop the big buffer.
    w.root.blobs.append(w.schema.Blob(fill=0, size=20 * MB, data=blob_bytes(20 * MB, 4)))
    w.root.nblobs = 3
    w.commit()
    assert r.refresh() is True
    assert view.tobytes() == blob_bytes(big, 2)
    assert memoryview(r.root.blobs[2].data).tobytes() == blob_bytes(20 * MB, 4)
    del w.root.blobs[1]
    w.root.nblobs = 2
    w.commit()
    assert r.refresh() is True
    assert [len(b.data) for b in r.root.blobs] == [10000, 20 * MB]
    r.check()
    view.release()
    small_view.release()
    r.close()
    w.close()
    with Bank(path) as p:
        p.check()
        assert [bytes(b.data) for b in p.root.blobs] == [blob_bytes(10000, 3), blob_bytes(20 * MB, 4)]


def test_a_reader_holds_back_checkpoints_until_it_refreshes_or_closes(tmp_path, monkeypatch):
    monkeypatch.setattr(PageFile, "checkpoint_bytes", 64 << 10)
    path = str(tmp_path / "hold.ps")
    make_bank(path).close()  # everything is in the main file
    w = Bank(path)
    r = Bank(path, readonly=True)

    def main_bytes():
        with open(path, "rb") as f:
            return f.read()

    def commit_some(count, seed):
        for i in range(count):
            w.root.blobs.append(w.schema.Blob(fill=seed, size=40000, data=bytes([seed]) * 40000))
            w.root.nblobs += 1
            w.root.generation += 1
            w.commit()

    before = main_bytes()
    commit_some(10, 1)  # 10 commits of 40 KB: the log passes its 64 KiB threshold several times
    after = main_bytes()
    assert after[:len(before)] == before, "a checkpoint wrote the main file while a reader needed it"
    assert after[len(before):] == bytes(len(after) - len(before))  # growth only: zeros
    assert log_size(w) > 10 * 40000
    assert r.root.generation == 1 and r.root.nblobs == 0

    assert r.refresh() is True and r.root.nblobs == 10
    seen = w._page_file.txn
    w.root.generation += 1
    w.commit()  # the first commit after the reader moved checkpoints up to the reader's snapshot
    assert w._page_file.main_txn == seen
    assert main_bytes() != after
    commit_some(5, 2)
    held = main_bytes()
    assert log_size(w) > 5 * 40000
    assert r.root.nblobs == 10 and all(b.fill == 1 for b in r.root.blobs)
    r.close()
    w.root.generation += 1
    w.commit()  # a closed reader holds nothing back: the log starts over before this commit
    assert log_size(w) < PageFile.checkpoint_bytes and main_bytes() != held

    # A writer's close checkpoints only as far as the readers allow; the next open finishes.
    r = Bank(path, readonly=True)
    commit_some(3, 3)
    held = main_bytes()
    w.close()
    assert main_bytes()[:len(held)] == held and os.path.getsize(path + "-wal") > 3 * 40000
    assert r.root.nblobs == 15 and r.refresh() is True and r.root.nblobs == 18
    check_snapshot(r, random.Random(0), 0)
    r.close()
    with Bank(path) as p:  # recovery checkpoints the log
        assert log_size(p) == 64 and p.root.nblobs == 18
        p.check()


@needs_fork
def test_a_reader_that_refreshes_keeps_the_log_bounded(tmp_path, monkeypatch):
    """A reader that refreshes every 20 ms must not make the log grow like one that never does.

    The writer never waits for readers: the log holds what was committed since
    the oldest reader's snapshot, so a writer committing 30 KB every 5 ms has
    about 120 KB more in its log per 20 ms that the reader lags."""
    monkeypatch.setattr(PageFile, "checkpoint_bytes", 64 << 10)
    path = str(tmp_path / "bounded.ps")
    make_bank(path).close()
    context = multiprocessing.get_context("fork")
    stop, ready = context.Event(), context.Event()

    def refresh_often():
        p = Bank(path, readonly=True)
        ready.set()
        while not stop.is_set():
            p.refresh()
            time.sleep(0.02)
        p.close()

    reader = context.Process(target=refresh_often)
    reader.start()
    try:
        assert ready.wait(30)
        w = Bank(path, sync=False)
        largest = 0
        for i in range(150):
            w.root.notes.append(note_text(30000 + i))
            if len(w.root.notes) > 3:
                del w.root.notes[0]
            w.commit()
            largest = max(largest, log_size(w))
            time.sleep(0.005)
        stop.set()
        reader.join(30)
        w.close()
    finally:
        stop.set()
        reader.join(30)
    print(f"\nlog: largest {largest / MB:.2f} MiB over 150 commits of ~30 KB")
    assert largest < 16 * PageFile.checkpoint_bytes, (
        f"the log grew to {largest} bytes although the reader refreshed every 20 ms")



@needs_fork
def test_readers_refreshing_do_not_starve_the_writer(tmp_path, monkeypatch):
    """Readers refreshing in a loop: a commit that checkpoints must not wait for them to stop.

    Each reader's refresh is made slow (30 ms while it reads the log, as with a
    large log or a slow disk), so that their refreshes overlap.  A watchdog
    stops the readers when a commit has waited 2 s, so that a starved writer
    ends the test instead of hanging it.
    """
    import threading
    monkeypatch.setattr(PageFile, "checkpoint_bytes", 256 << 10)
    path = str(tmp_path / "starve.ps")
    make_bank(path).close()
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    ready = context.Semaphore(0)

    def refresh_in_a_loop():
        take_snapshot = PageFile._take_snapshot

        def slow_snapshot(self):
            time.sleep(0.03)
            return take_snapshot(self)

        PageFile._take_snapshot = slow_snapshot  # (in the child process only)
        p = Bank(path, readonly=True)
        ready.release()
        started = time.monotonic()
        while not stop.is_set() and time.monotonic() - started < 60:
            p.refresh()
        p.close()

    committing = [None]  # when the commit in progress started

    def watchdog():
        while not stop.is_set():
            since = committing[0]
            if since is not None and time.monotonic() - since > 2.0:
                stop.set()
            time.sleep(0.05)

    readers = [context.Process(target=refresh_in_a_loop) for _ in range(4)]
    for reader in readers:
        reader.start()
    guard = threading.Thread(target=watchdog, daemon=True)
    slowest, resets = 0.0, 0
    try:
        for _ in readers:
            assert ready.acquire(timeout=30)
        guard.start()
        with Bank(path, sync=False) as w:
            for i in range(12):  # 12 commits of 100 KB: the log passes 256 KiB every 3 commits
                w.root.blobs.append(w.schema.Blob(fill=1, size=100_000, data=bytes([1]) * 100_000))
                w.root.nblobs += 1
                before = log_size(w)
                committing[0] = time.monotonic()
                w.commit()
                slowest = max(slowest, time.monotonic() - committing[0])
                committing[0] = None
                resets += log_size(w) < before
    finally:
        stop.set()
        for reader in readers:
            reader.join(30)
        guard.join(5)
    print(f"\nslowest commit: {slowest:.2f} s, {resets} log resets")
    assert slowest < 1.5, f"a commit waited {slowest:.1f} s for readers to stop refreshing"



@pytest.mark.parametrize("kind", ["Buffer", "String"])
def test_a_reader_reads_an_object_that_crosses_its_own_map_pieces(tmp_path, kind):
    """A reader maps the file in pieces as it grows; a later writer (one piece) may put an object across.

    Run in a child process: the bug is a segmentation fault.
    """
    path = str(tmp_path / "cross.ps")
    result = run_python(f"""
        import os
        from permastruct import Storage, List

        class S(Storage):
            def populateSchema(self):
                s = self.schema
                Fill = self.define(List("Fill")[s.Buffer])
                class Root(s.Structure):
                    fill = Fill
                    text = s.String
                    data = s.Buffer

        path = {path!r}
        p = S(path)
        p.root.fill = []
        p.commit()
        r = S(path, readonly=True)          # maps the file as it is now: one piece
        end = r._heap.mapping.size
        for i in range(40):                 # the first writer grows the file past the reader's piece
            p.root.fill.append(bytes(100_000))
        p.commit()
        p.close()
        p = S(path)                         # a new writer maps the whole file as one piece
        p.root.fill = None                  # frees the space, the allocator merges it into one run
        p.commit()
        n = 3_000_000
        if {kind!r} == "String":
            p.root.text = "s" * n
            offset = p.root.text._ps_oid
        else:
            p.root.data = bytes(range(256)) * (n // 256)
            offset = p.root.data._ps_oid
        p.commit()
        assert offset < end < offset + n, (offset, end)  # the object crosses the reader's piece end
        assert r.refresh()
        if {kind!r} == "String":
            assert str(r.root.text) == "s" * n
        else:
            assert bytes(memoryview(r.root.data)) == bytes(range(256)) * (n // 256)
        r.check()
        r.close()
        p.close()
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (
        f"exit {result.returncode}: {result.stdout} {result.stderr[-2000:]}")



# -- read-only storages refuse writes ------------------------------------------------------------
def test_a_reader_refuses_every_write(tmp_path):
    path = str(tmp_path / "ro.ps")
    w = make_bank(path)
    w.root.blobs.append(w.schema.Blob(fill=4, size=100, data=bytes([4]) * 100))
    w.root.nblobs = 1
    w.root.notes.append(note_text(4))
    w.close()
    with open(path, "rb") as f:
        main = f.read()
    assert not os.path.exists(path + "-wal")  # a clean close removed it
    r = Bank(path, readonly=True)
    root = r.root
    accounts, by_name = root.accounts, root.by_name
    account = accounts[0]
    writes = {
        "Int field": lambda: setattr(account, "balance", 5),
        "String field": lambda: setattr(account, "name", "other"),
        "reference field": lambda: setattr(root, "accounts", None),
        "reference field to a new list": lambda: setattr(root, "notes", ["x"]),
        "List.append": lambda: accounts.append(account),
        "List.insert": lambda: accounts.insert(0, account),
        "List.extend": lambda: accounts.extend([account]),
        "List[i] =": lambda: accounts.__setitem__(0, accounts[1]),
        "del List[i]": lambda: accounts.__delitem__(0),
        "List.pop": lambda: accounts.pop(),
        "List.sort": lambda: accounts.sort(key=lambda a: a.balance),
        "List.reverse": lambda: accounts.reverse(),
        "List.clear": lambda: accounts.clear(),
        "Dict[k] =": lambda: by_name.__setitem__("new", account),
        "Dict[k] = (existing key)": lambda: by_name.__setitem__("acct-1", account),
        "del Dict[k]": lambda: by_name.__delitem__("acct-1"),
        "Dict.pop": lambda: by_name.pop("acct-1"),
        "Dict.setdefault (new key)": lambda: by_name.setdefault("new", account),
        "Dict.update": lambda: by_name.update({"new": account}),
        "Dict.clear": lambda: by_name.clear(),
        "new structure": lambda: r.schema.Account(balance=1),
        "new String": lambda: r.schema.String("x"),
        "new Buffer": lambda: r.schema.Buffer(b"x"),
        "new List": lambda: r.schema.Accounts(),
        "new Dict": lambda: r.schema.ByName(),
        "interning a new string": lambda: r.stringRegistry.get("never seen"),
        "commit": r.commit,
        "rollback": r.rollback,
        "transaction": lambda: r.transaction().__enter__(),
        "page file checkpoint": lambda: r._page_file.checkpoint(),
    }
    refused = {}
    for what, write in writes.items():
        try:
            write()
        except ReadOnlyError as exc:
            refused[what] = str(exc)
    assert sorted(refused) == sorted(writes), f"not refused: {sorted(set(writes) - set(refused))}"
    assert all("read-only" in message for message in refused.values())
    assert issubclass(ReadOnlyError, PermastructError) and issubclass(ReadOnlyError, PermissionError)
    view = memoryview(root.blobs[0].data)
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1
    view.release()
    # Reads that look like writes but change nothing are fine.
    assert by_name.setdefault("acct-1", None).isSameAs(accounts[1])
    # Nothing changed, in the snapshot or in the files.
    check_snapshot(r, random.Random(0), 0)
    assert account.balance == INITIAL_BALANCE and len(accounts) == INITIAL_ACCOUNTS
    r.check()
    r.close()
    assert open(path, "rb").read() == main
    assert not os.path.exists(path + "-wal")  # a reader never creates a log


def test_a_read_only_open_of_a_missing_file_raises_file_not_found(tmp_path):
    path = tmp_path / "missing.ps"
    with pytest.raises(FileNotFoundError):
        Bank(path, readonly=True)
    with pytest.raises(FileNotFoundError):
        Storage(str(path), readonly=True)
    assert not path.exists() and not (tmp_path / "missing.ps-wal").exists()
    assert os.listdir(tmp_path) == []


# -- the writer lock --------------------------------------------------------------------------
def test_a_second_writer_is_refused_at_once(tmp_path):
    path = str(tmp_path / "lock.ps")
    w = make_bank(path)
    started = time.monotonic()
    with pytest.raises(StorageLockedError) as info:
        Bank(path)
    assert time.monotonic() - started < 0.5
    assert isinstance(info.value, BlockingIOError) and isinstance(info.value, PermastructError)
    assert path in str(info.value) and "readonly=True" in str(info.value)
    with pytest.raises(StorageLockedError):
        Storage(path)  # the bare class too
    with pytest.raises(StorageLockedError):
        PageFile(path)
    with Bank(path, readonly=True) as r:  # readers never conflict
        assert r.root.generation == 1
    w.root.generation = 2  # the refused opens changed nothing for the writer
    w.commit()
    w.close()
    with Bank(path) as again:
        assert again.root.generation == 2


def test_a_second_writer_in_another_process_is_refused(tmp_path):
    path = str(tmp_path / "lock.ps")
    w = make_bank(path)
    result = run_python(f"""
        import time
        from permastruct import Storage
        from permastruct.errors import StorageLockedError
        started = time.monotonic()
        try:
            Storage({path!r})
            print("opened")
        except StorageLockedError:
            print("locked", time.monotonic() - started < 0.5)
        with Storage({path!r}, readonly=True) as r:
            print(r.root.generation)
    """)
    assert result.stdout.split() == ["locked", "True", "1"], result.stderr
    w.close()
    # The other way round: a child holds the lock.
    child = start_python(f"""
        import sys
        from permastruct import Storage
        p = Storage({path!r})
        p.root.generation = 5
        p.commit()
        print("holding", flush=True)
        sys.stdin.readline()
        p.close()
        print("closed", flush=True)
    """)
    try:
        assert child.stdout.readline().strip() == "holding"
        with pytest.raises(StorageLockedError):
            Bank(path)
        with Bank(path, readonly=True) as r:
            assert r.root.generation == 5
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "closed"
        with Bank(path) as again:
            assert again.root.generation == 5
    finally:
        child.kill()
        child.wait()


def test_a_writer_with_a_timeout_waits_that_long_then_raises(tmp_path):
    path = str(tmp_path / "wait.ps")
    w = make_bank(path)
    started = time.monotonic()
    with pytest.raises(StorageLockedError) as info:
        Bank(path, timeout=0.3)
    waited = time.monotonic() - started
    assert 0.28 <= waited < 1.0, waited
    assert "0.3" in str(info.value)
    for bad in (-1, "1", True, [1]):
        with pytest.raises(ValueError):
            Bank(path, timeout=bad)
    w.close()


def test_a_nan_timeout_is_refused(tmp_path):
    path = str(tmp_path / "nan.ps")
    w = make_bank(path)  # holds the lock while the child tries
    env = dict(os.environ, PYTHONPATH=SRC_DIR)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from permastruct import Storage
        try:
            Storage({path!r}, timeout=float("nan"))
        except ValueError:
            print("refused")
    """)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        out, _ = child.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        out = "still waiting after 2 s"
    finally:
        child.kill()
        child.wait()
        w.close()
    assert out.strip() == "refused", out


def test_a_waiting_writer_gets_the_lock_when_the_first_closes_in_time(tmp_path):
    path = str(tmp_path / "handover.ps")
    make_bank(path).close()
    child = start_python(f"""
        import time
        from permastruct import Storage
        p = Storage({path!r})
        p.root.generation = 9
        p.commit()
        print("holding", flush=True)
        time.sleep(0.4)
        p.root.generation = 10  # committed by close
        p.close()
    """)
    try:
        assert child.stdout.readline().strip() == "holding"
        started = time.monotonic()
        with Bank(path, timeout=20) as p:
            waited = time.monotonic() - started
            assert p.root.generation == 10
            p.check()
        assert 0.1 < waited < 10, waited
    finally:
        child.kill()
        child.wait()
    # In one process: a thread closes the first writer while the second waits.
    import threading
    first = Bank(path)
    first.root.generation = 11
    timer = threading.Timer(0.3, first.close)
    timer.start()
    started = time.monotonic()
    with Bank(path, timeout=20) as second:
        assert second.root.generation == 11
    assert 0.2 < time.monotonic() - started < 10
    timer.join()


def test_a_killed_writer_releases_its_lock_and_the_next_open_recovers_its_last_commit(tmp_path):
    path = str(tmp_path / "killed.ps")
    make_bank(path).close()
    r = Bank(path, readonly=True)
    child = start_python(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_readers import Bank
        p = Bank({path!r})
        p.root.accounts[0].balance -= 7
        p.root.accounts[1].balance += 7
        p.root.blobs.append(p.schema.Blob(fill=5, size=3_000_000, data=bytes([5]) * 3_000_000))
        p.root.nblobs = 1
        p.root.generation = 2
        p.commit()                        # the last commit
        p.root.generation = 3             # pending: lost with the process
        p.root.accounts[0].balance = 0
        p.root.blobs.append(p.schema.Blob(fill=6, size=10, data=bytes([6]) * 10))
        print("ready", flush=True)
        time.sleep(60)
    """)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        with pytest.raises(StorageLockedError):
            Bank(path)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
        child.wait()
    assert r.root.generation == 1 and r.refresh() is True
    generation, _ = check_snapshot(r, random.Random(0), 0)
    assert generation == 2
    with Bank(path) as p:  # no StorageLockedError: the kernel dropped the dead process's lock
        p.check()
        assert p.root.generation == 2 and p.root.nblobs == 1
        assert p.root.accounts[0].balance == INITIAL_BALANCE - 7
        check_snapshot(p, random.Random(0), 0)
    assert r.refresh() is False
    r.close()


def test_closing_with_live_proxies_releases_the_lock(tmp_path):
    path = str(tmp_path / "proxies.ps")
    w = make_bank(path)
    w.root.blobs.append(w.schema.Blob(fill=2, size=50_000, data=bytes([2]) * 50_000))
    w.root.nblobs = 1
    root, accounts, account, blob = w.root, w.root.accounts, w.root.accounts[3], w.root.blobs[0]
    view = memoryview(blob.data)  # an export of the map: the map cannot be unmapped
    name = account.name
    w.close()
    for proxy in (root, accounts, account, blob, name):
        with pytest.raises(StorageClosedError):
            proxy.isSameAs(proxy)
    result = run_python(f"""
        from permastruct import Storage
        with Storage({path!r}) as p:
            print(p.root.nblobs)
    """)
    assert result.stdout.split() == ["1"], result.stderr
    with Bank(path) as p:
        assert bytes(p.root.blobs[0].data) == bytes([2]) * 50_000
    del view


@needs_fork
def test_a_forked_child_cannot_use_the_parents_storages_and_the_parent_keeps_its_locks(tmp_path, monkeypatch):
    monkeypatch.setattr(PageFile, "checkpoint_bytes", 64 << 10)
    path = str(tmp_path / "fork.ps")
    make_bank(path).close()
    w = Bank(path)
    r = Bank(path, readonly=True)
    account = w.root.accounts[0]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never run pytest code
        os.close(read)
        outcomes = []
        # Every proxy of the parent's storages refuses too, a field write or read included.
        for what, action in (("field write", lambda: setattr(account, "balance", 1)),
                             ("field read", lambda: account.balance),
                             ("commit", w.commit), ("root", lambda: w.root),
                             ("new object", lambda: w.schema.Account()),
                             ("refresh", r.refresh)):
            try:
                action()
                outcomes.append(f"{what}: no error")
            except ForkedProcessError as exc:
                outcomes.append(f"{what}: {'forked' in str(exc)}")
            except BaseException as exc:
                outcomes.append(f"{what}: {type(exc).__name__}")
        try:
            w.close()
            r.close()
            outcomes.append("closed")
        except BaseException as exc:
            outcomes.append(f"close: {type(exc).__name__}")
        os.write(write, "\n".join(outcomes).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcomes = pipe.read().decode().splitlines()
    os.waitpid(pid, 0)
    assert outcomes == ["field write: True", "field read: True", "commit: True", "root: True",
                        "new object: True", "refresh: True", "closed"], outcomes
    assert account.balance == INITIAL_BALANCE  # the child's write stayed in the child
    # The parent still holds the writer lock ...
    result = run_python(f"""
        from permastruct import Storage
        from permastruct.errors import StorageLockedError
        try:
            Storage({path!r})
            print("opened")
        except StorageLockedError:
            print("locked")
    """)
    assert result.stdout.split() == ["locked"], result.stderr
    # ... and its reader still holds back checkpoints.
    before = open(path, "rb").read()
    for i in range(5):
        w.root.notes.append(note_text(40000 + i))
        w.root.generation += 1
        w.commit()
    assert open(path, "rb").read()[:len(before)] == before
    assert r.root.generation == 1 and r.refresh() and r.root.generation == 6
    account.balance -= 1
    w.root.accounts[1].balance += 1
    w.close()
    r.close()
    with Bank(path) as p:
        assert p.root.generation == 6 and p.root.accounts[0].balance == INITIAL_BALANCE - 1
        p.check()


def test_close_leaves_no_large_log_behind(tmp_path, monkeypatch):
    """close() checkpoints with truncate=True and, with no reader behind, removes the log."""
    monkeypatch.setattr(PageFile, "checkpoint_bytes", 64 << 10)
    path = str(tmp_path / "trunc.ps")
    p = make_bank(path)
    p.root.notes.append(note_text(200_000))  # > 2 x 64 KiB: the next commit checkpoints and resets the log
    p.commit()
    assert log_size(p) > 200_000  # a checkpoint is not part of a commit (it could not be undone)
    p.root.generation += 1
    p.commit()
    assert log_size(p) < 64 << 10
    p.close()
    assert not os.path.exists(path + "-wal")  # and a clean close removes it



def test_proxies_made_before_a_growing_refresh_still_know_their_offset(tmp_path):
    """After a refresh that maps the grown file anew, older proxies (still in the old map) work."""
    path = str(tmp_path / "grown.ps")
    w = make_bank(path)
    r = Bank(path, readonly=True)
    account = r.root.accounts[0]
    text = repr(account)
    for i in range(20):
        w.root.blobs.append(w.schema.Blob(fill=i, size=200_000, data=bytes([i]) * 200_000))
    w.commit()
    assert r.refresh()
    assert repr(account) == text and account.balance == INITIAL_BALANCE
    r.close()
    w.close()


# -- long readers are reported, never waited for (issue 16 item 13) ------------------------------------
def test_a_reader_that_never_refreshes_is_reported_and_never_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(PageFile, "checkpoint_bytes", 64 << 10)
    path = str(tmp_path / "long.ps")
    make_bank(path).close()
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        sys.path.insert(0, {SRC_DIR!r})
        from test_readers import Bank
        r = Bank({path!r}, readonly=True)
        print(r._page_file.txn, flush=True)
        sys.stdin.readline()  # holds its snapshot until told
        r.close()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        snapshot = int(child.stdout.readline())
        w = Bank(path, sync=False)
        before = time.time()
        slept = []
        monkeypatch.setattr(time, "sleep", lambda seconds: slept.append(seconds))
        sizes = []
        for i in range(60):
            w.root.notes.append(note_text(20_000 + i))  # 60 x 20 KB: far past the checkpoint size
            w.commit()
            sizes.append(w.readers()[0]["log_bytes"])
        monkeypatch.undo()
        assert not slept  # the writer never waited for the reader
        (reader,) = w.readers()
        assert reader["pid"] == child.pid and reader["transaction"] == snapshot
        assert reader["behind"] == 60 and reader["since"] is not None and reader["since"] <= before + 1
        assert reader["log_bytes"] > 60 * 20_000 and sizes == sorted(sizes)
        w.close()
    finally:
        child.communicate("\n", timeout=60)
    with Bank(path) as w:
        assert w.readers() == []
        assert len(w.root.notes) == 60


def test_readers_lists_every_reader_and_follows_refresh(tmp_path):
    path = str(tmp_path / "many.ps")
    w = make_bank(path)
    readers = [Bank(path, readonly=True) for _ in range(3)]
    w.root.generation += 1
    w.commit()
    listed = w.readers()  # one entry per process and snapshot
    assert [(r["pid"], r["behind"]) for r in listed] == [(os.getpid(), 1)]
    readers[1].refresh()
    assert [(r["pid"], r["behind"]) for r in w.readers()] == [(os.getpid(), 1), (os.getpid(), 0)]
    for r in readers:
        r.close()
    assert w.readers() == []
    w.close()


class Points(Storage):
    def populateSchema(self):
        class Point(self.schema.Structure):
            x = self.schema.Int
            y = self.schema.Int

        Line = self.define(List("Line")[Point])

        class Root(self.schema.Structure):
            line = Line


def test_a_readers_proxy_of_a_freed_object_dies_even_when_a_new_one_took_its_place(tmp_path):
    """issue 16 item 5: the new object has the same type (and here the very same place), so only
    the commit's list of freed objects tells the reader: before, its proxy silently read the new one."""
    path = str(tmp_path / "reuse.ps")
    w = Points(path)
    w.root.line = [w.schema.Point(x=i, y=-i) for i in range(10)]
    w.commit()
    r = Points(path, readonly=True)
    victim, kept = r.root.line[5], r.root.line[6]
    offset = victim._ps_offset
    del w.root.line[5]
    w.commit()  # frees the point
    w.root.line.append(w.schema.Point(x=100, y=100))  # takes the place it left
    w.commit()
    assert w.root.line[-1]._ps_offset == offset  # (what makes this test mean something)
    assert r.refresh()
    with pytest.raises(DeadProxyError, match="freed by the writer"):
        victim.x
    assert (kept.x, kept.y) == (6, -6)
    assert r.root.line[-1].x == 100
    r.close()
    w.close()


def test_a_reader_hears_of_objects_freed_at_the_writers_close(tmp_path):
    path = str(tmp_path / "closing.ps")
    w = make_bank(path)
    w.root.notes.append("short-lived")
    w.commit()
    r = Bank(path, readonly=True)
    note = r.root.notes[0]
    del w.root.notes[0]
    w.close()  # the note is freed by the close's own commit
    r.refresh()
    with pytest.raises(DeadProxyError):
        str(note)
    r.close()
