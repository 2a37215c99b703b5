"""``p.backup(path)``: a consistent copy of the last commit, from a writer, a reader or a memory store;
and the store id that keeps a log from being replayed onto another file.

Contract: DESIGN.md 3.10 and issue 14 item 3.
"""

import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import permastruct
from permastruct import List, Storage
from permastruct import _format as F
from permastruct.errors import NotAStorageError, StorageFullError

SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(permastruct.__file__)))


class Shop(Storage):
    def populateSchema(self):
        s = self.schema

        class Item(s.Structure):
            name = s.String
            price = s.Int

        Items = self.define(List("Items")[Item])

        class Root(s.Structure):
            items = Items
            counter = s.Int
            blob = s.Buffer


def state(p):
    return (p.root.counter, [(str(i.name), i.price) for i in p.root.items or []],
            bytes(p.root.blob) if p.root.blob is not None else None)


def store_id(path):
    with open(path, "rb") as f:
        return F.HEADER.unpack_from(f.read(F.HEADER.size))[5]


@pytest.fixture
def shop(tmp_path):
    path = str(tmp_path / "shop.ps")
    with Shop(path) as p:
        p.root.items = [p.schema.Item(name=f"item{i}", price=i) for i in range(200)]
        p.root.blob = os.urandom(100000)
    return path


def test_a_writer_backs_up_its_last_commit_not_its_pending_changes(shop, tmp_path):
    with Shop(shop) as p:
        p.root.counter = 1
        p.commit()
        committed = state(p)
        p.root.counter = 2  # pending
        p.root.items.append(p.schema.Item(name="pending", price=-1))
        result = p.backup(tmp_path / "copy.ps")
        assert result["transaction"] == p._page_file.txn
        assert state(p)[0] == 2  # the writer's own changes are untouched
        p.commit()
    assert sorted(os.listdir(tmp_path)) == ["copy.ps", "shop.ps"]
    with Shop(str(tmp_path / "copy.ps"), readonly=True) as c:
        c.check()
        assert state(c) == committed
    assert store_id(str(tmp_path / "copy.ps")) != store_id(shop)
    with Shop(str(tmp_path / "copy.ps")) as c:  # an ordinary store: writable, no log to start with
        c.root.counter = 5
        c.check()


def test_backup_while_the_log_holds_commits_and_a_reader_holds_back_the_checkpoint(shop, tmp_path):
    with Shop(shop) as p:
        reader = Shop(shop, readonly=True)
        try:
            for n in range(30):  # commits only in the log: the reader keeps the checkpoint back
                p.root.counter = n
                p.root.items[n].price = 1000 + n
                p.commit()
            expected = state(p)
            p.backup(tmp_path / "w.ps")
            reader_state = state(reader)
            reader.backup(tmp_path / "r.ps")
            assert reader.refresh()
            reader.backup(tmp_path / "r2.ps")
        finally:
            reader.close()
    with Shop(str(tmp_path / "w.ps"), readonly=True) as c:
        c.check()
        assert state(c) == expected
    with Shop(str(tmp_path / "r.ps"), readonly=True) as c:
        c.check()
        assert state(c) == reader_state
    with Shop(str(tmp_path / "r2.ps"), readonly=True) as c:
        assert state(c) == expected


def test_backup_of_a_memory_store(tmp_path):
    p = Shop(None)
    p.root.counter = 7
    p.commit()
    p.root.counter = 8
    p.backup(tmp_path / "m.ps")
    p.close()
    with Shop(str(tmp_path / "m.ps")) as c:
        assert c.root.counter == 7
        c.check()


def test_refusals(shop, tmp_path):
    with Shop(shop) as p:
        p.root.counter = 1
        p.commit()
        log = p._page_file.log_path()
        for bad in (shop, log, os.path.join(os.path.dirname(shop), ".", "shop.ps")):
            with pytest.raises(ValueError, match="itself or its log"):
                p.backup(bad)
        os.symlink(shop, tmp_path / "link.ps")
        with pytest.raises(ValueError):
            p.backup(tmp_path / "link.ps")
        (tmp_path / "there.ps").write_bytes(b"keep me")
        with pytest.raises(FileExistsError):
            p.backup(tmp_path / "there.ps")
        assert (tmp_path / "there.ps").read_bytes() == b"keep me"
        with pytest.raises(FileNotFoundError):
            p.backup(tmp_path / "no" / "such" / "folder.ps")
        with pytest.raises(FileExistsError):
            p.backup(tmp_path / "there.ps", compact=True)
        with pytest.raises(ValueError):
            p.backup(shop, compact=True)
    p.close()
    with pytest.raises(permastruct.errors.StorageClosedError):
        p.backup(tmp_path / "closed.ps")


def test_a_full_disk_leaves_no_file(shop, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with Shop(shop, readonly=True) as p:
        with pytest.raises(StorageFullError, match="no file was left"):
            p.backup(tmp_path / "full.ps")
    assert sorted(os.listdir(tmp_path)) == ["shop.ps"]
    monkeypatch.undo()
    calls = []
    real = os.pwrite

    def failing(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:  # the header went out, the pages do not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", failing)
    with Shop(shop, readonly=True) as p:
        with pytest.raises(StorageFullError):
            p.backup(tmp_path / "full.ps")
    assert sorted(os.listdir(tmp_path)) == ["shop.ps"]


def test_a_crash_during_backup_leaves_nothing_at_the_target(shop, tmp_path):
    target = str(tmp_path / "crash.ps")
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {SRC_DIR!r})
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_backup import Shop
        real = os.pwrite
        def dying(fd, data, offset):
            if offset >= 4096:  # the header went out, the pages do not
                os._exit(86)
            return real(fd, data, offset)
        with Shop({shop!r}, readonly=True) as p:
            os.pwrite = dying
            p.backup({target!r})
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == 86
    assert not os.path.exists(target)


def test_backup_while_a_writer_commits_and_readers_read(shop, tmp_path):
    """A writer process commits without pause; backups taken from readers (in this process) each
    pass check() and equal the reader's snapshot."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {SRC_DIR!r})
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_backup import Shop
        with Shop({shop!r}) as p:
            print("ready", flush=True)
            n = 0
            end = time.time() + 30
            while time.time() < end and not sys.stdin.closed:
                n += 1
                p.root.counter = n
                p.root.items[n % 200].price = n
                if n % 7 == 0:
                    p.root.items.append(p.schema.Item(name=f"new{{n}}", price=n))
                p.commit()
                if n % 50 == 0:
                    import select
                    if select.select([sys.stdin], [], [], 0)[0]:
                        break
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        readers = [Shop(shop, readonly=True) for _ in range(4)]
        try:
            for round_ in range(3):
                for index, reader in enumerate(readers):
                    reader.refresh()
                    target = str(tmp_path / f"b{round_}-{index}.ps")
                    reader.backup(target)
                    with Shop(target, readonly=True) as copy:
                        copy.check()
                        assert state(copy) == state(reader)
                        assert copy._page_file.txn == reader._page_file.txn
                    os.unlink(target)
        finally:
            for reader in readers:
                reader.close()
    finally:
        writer.stdin.write("stop\n")
        writer.stdin.close()
        assert writer.wait(timeout=60) == 0


def test_a_log_is_never_replayed_onto_another_file(shop, tmp_path):
    """A log of one store put beside another store (or beside a copy of the same store's file made
    by backup) is never read into it: a writer refuses it untouched, a reader ignores it."""
    other = str(tmp_path / "other.ps")
    with Shop(other) as o:
        o.root.counter = 100
    with Shop(shop) as p:
        p.root.counter = 42
        p.commit()  # in the log, not yet in the main file
        p.backup(str(tmp_path / "copy.ps"))
        wal = p._page_file.log_path()
        crashed = str(tmp_path / "crashed-wal")
        shutil.copyfile(wal, crashed)
    for victim in (other, str(tmp_path / "copy.ps")):
        shutil.copyfile(crashed, victim + F.WAL_SUFFIX)
        before = open(victim + F.WAL_SUFFIX, "rb").read()
        expected = 100 if victim == other else 42
        with Shop(victim, readonly=True) as r:  # a reader does not take it
            assert r.root.counter == expected
        with pytest.raises(NotAStorageError, match="log of another store"):
            Shop(victim)
        assert open(victim + F.WAL_SUFFIX, "rb").read() == before
        os.unlink(victim + F.WAL_SUFFIX)
        with Shop(victim) as w:
            assert w.root.counter == expected
            w.check()


def test_backup_command(shop, tmp_path):
    import contextlib
    import io
    from permastruct import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main(["backup", shop, str(tmp_path / "b.ps")], prog="permastruct") == 0
        assert cli.main(["backup", shop, str(tmp_path / "b.ps")], prog="permastruct") == 1
        assert cli.main(["backup", "--help"], prog="permastruct") == 0
    assert "a copy of transaction" in out.getvalue()
    assert err.getvalue().startswith("permastruct: FileExistsError:") and len(err.getvalue().splitlines()) == 1
    with Shop(str(tmp_path / "b.ps"), readonly=True) as c:
        c.check()


def _json(path):
    from permastruct import _dump
    with Storage(path, readonly=True) as p:
        return _dump.dump_json(p)


def test_a_compact_copy_holds_only_what_the_root_reaches(shop, tmp_path):
    with Shop(shop) as p:
        p.root.items.extend(p.schema.Item(name=f"more{i}", price=i) for i in range(20000))
        p.commit()
        del p.root.items[100:]
        p.root.blob = None
        p.commit()
        p.root.counter = 99  # pending: not in the copy
        result = p.backup(tmp_path / "small.ps", compact=True)
        full = p.backup(tmp_path / "full.ps")
        p.rollback()
    assert result["bytes"] < full["bytes"] / 5
    assert result["objects"] == 1 + 1 + 100 + 100  # root, list, items, names
    assert sorted(os.listdir(tmp_path)) == ["full.ps", "shop.ps", "small.ps"]
    assert _json(str(tmp_path / "small.ps")) == _json(shop)
    with Shop(str(tmp_path / "small.ps")) as c:
        c.check()
        assert c.root.counter == 0 and len(c.root.items) == 100


def test_compact_in_place(shop, tmp_path):
    import contextlib
    import io
    from permastruct import cli
    from permastruct.errors import StorageLockedError
    from permastruct._backup import compact_in_place
    with Shop(shop) as p:
        del p.root.items[10:]
        p.root.blob = None
    expected = _json(shop)
    with Shop(shop):
        with pytest.raises(StorageLockedError):
            compact_in_place(shop)
    with Shop(shop, readonly=True):
        with pytest.raises(StorageLockedError, match="open for reading"):
            compact_in_place(shop)
    before = os.path.getsize(shop)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main(["compact", shop], prog="permastruct") == 0
        assert cli.main(["backup", "--compact", shop, str(tmp_path / "c.ps")], prog="permastruct") == 0
        assert cli.main(["compact", "--help"], prog="permastruct") == 0
    assert "compacted from" in out.getvalue() and "a compact copy" in out.getvalue()
    assert os.path.getsize(shop) < before
    assert sorted(os.listdir(tmp_path)) == ["c.ps", "shop.ps"]
    assert _json(shop) == expected
    os.symlink(shop, tmp_path / "link.ps")
    compact_in_place(str(tmp_path / "link.ps"))  # the file the link names is compacted
    assert os.path.islink(tmp_path / "link.ps") and _json(shop) == expected
    os.unlink(tmp_path / "link.ps")
    with Shop(shop) as p:
        p.check()
        p.root.items.append(p.schema.Item(name="after", price=1))
    with Shop(shop, readonly=True) as p:
        assert len(p.root.items) == 11


def test_a_copied_main_file_does_not_take_the_originals_log(shop, tmp_path):
    """The header block names the original's log; a plain copy of the main file (same store id, another
    inode) does not read it: it opens at the commit its own bytes hold."""
    with Shop(shop) as p:
        p.root.counter = 1
        p.commit()
        p._page_file.checkpoint()
        p.root.counter = 2
        p.commit()  # only in the log
        wal = p._page_file.log_path()
        shutil.copyfile(shop, tmp_path / "plain.ps")
        before = open(wal, "rb").read()
        assert store_id(str(tmp_path / "plain.ps")) == store_id(shop)
        with Shop(str(tmp_path / "plain.ps"), readonly=True) as c:
            assert c.root.counter == 1
        with Shop(str(tmp_path / "plain.ps")) as c:
            assert c.root.counter == 1
            c.root.counter = 10
        assert open(wal, "rb").read() == before
        assert p.root.counter == 2
    with Shop(shop, readonly=True) as p:
        assert p.root.counter == 2
    with Shop(str(tmp_path / "plain.ps"), readonly=True) as c:
        assert c.root.counter == 10
        c.check()


@pytest.mark.parametrize("base_keeps_a_log", [False, True])
def test_backup_of_an_overlay_holds_its_last_commit_over_the_base(tmp_path, base_keeps_a_log):
    from permastruct import List, Storage

    class Layered(Storage):
        def populateSchema(self):
            self.define(List("Nums")[self.schema.Int])

            class Root(self.schema.Structure):
                counter = self.schema.Int
                name = self.schema.String
                nums = self.schema.Nums

    base = str(tmp_path / "base.ps")
    writer = Layered(base)
    writer.root.counter, writer.root.name, writer.root.nums = 3, "base", list(range(5000))
    writer.commit()
    if base_keeps_a_log:  # a writer stays open: its last commit is in its log only
        writer.root.counter = 4
        writer.root.nums[10] = -10
        writer.commit()
    else:
        writer.close()
    overlay = Layered(base, overlay=True)
    overlay.root.name = "over" * 1000
    overlay.root.nums[20] = -20
    overlay.commit()
    overlay.root.counter, overlay.root.nums[30] = 10, -30  # not committed: not in the copy
    overlay.backup(tmp_path / "copy.ps")
    overlay.close()
    with Layered(str(tmp_path / "copy.ps")) as copy:
        expected = (4, -10) if base_keeps_a_log else (3, 10)
        assert (copy.root.counter, copy.root.nums[10]) == expected
        assert (str(copy.root.name), copy.root.nums[20], copy.root.nums[30]) == ("over" * 1000, -20, 30)
        copy.check()
    if base_keeps_a_log:
        writer.close()


@pytest.mark.parametrize("page_size", [4096, 1024])
def test_a_compact_copy_is_at_most_the_live_bytes_plus_one_page_per_size_class(tmp_path, page_size):
    """The live bytes of the copy: each object in its slot at the density of its size class's slabs
    (a slab page of size class k holds ``slots_per_page(k)`` of them), each page run whole, and the
    allocator's page.  The copy's file holds no more than that plus one page for each size class
    it uses (the last, partly filled slab) and the header block: no free page, no growth room."""
    from permastruct._mapping import GRANULE
    path = str(tmp_path / "shop.ps")
    with Shop(path, pageSize=page_size) as p:
        p.root.items = [p.schema.Item(name=f"item {i}" + "x" * (i % 90), price=i) for i in range(20000)]
        p.root.blob = os.urandom(100000)
        p.commit()
        del p.root.items[::3]  # freed all over the file
        p.root.items.extend(p.schema.Item(name=f"late {i}", price=-i) for i in range(2000))
        p.commit()
        expected = state(p)
        result = p.backup(tmp_path / "small.ps", compact=True)
        full = p.backup(tmp_path / "full.ps")
    with Shop(result["path"], readonly=True) as c:
        c.check()
        assert state(c) == expected
        heap, pf = c._heap, c._page_file
        alloc = heap.allocator
        per_class, run_pages = {}, 0
        for _, capacity, _ in heap.walk():
            if capacity <= alloc.max_small:
                index = alloc.classes.index(capacity)
                per_class[index] = per_class.get(index, 0) + 1
            else:
                run_pages += (F.RUN_OBJECT + capacity) // pf.page_size
        live_bytes = page_size * (sum(n / alloc.slots_per_page(k) for k, n in per_class.items()) + run_pages + 1)
        assert pf.free_page_count() == 0 and not alloc.free_runs()
        assert len(per_class) >= 3
        bound = live_bytes + len(per_class) * page_size
        assert pf.page_count * page_size <= bound
        unit = max(GRANULE, page_size)
        assert result["bytes"] == os.path.getsize(result["path"]) <= F.HEADER_BLOCK + -(-bound // unit) * unit
    assert result["bytes"] < full["bytes"] * 0.8
