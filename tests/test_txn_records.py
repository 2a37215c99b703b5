"""Transaction records (DESIGN 3.8, 3.10; seed 001): ``commit(description, *, user, extension)``,
``transaction(...)`` with the same arguments, and ``last_transaction``.

The metadata goes into the transaction's commit frame in the log (log format
version 3, ``_format.pack_txn_meta``); logs of versions 2 (freed objects, no
metadata) are still read, and a writer that must append to one writes its
frames in that version.
"""

import math
import mmap
import shutil

import pytest

from permastruct import List, Storage
from permastruct import _format as F
from permastruct._journal import Journal


class RecStorage(Storage):
    def populateSchema(self):
        Items = self.define(List("Items")[self.schema.String])

        class Root(self.schema.Structure):
            n = self.schema.Int
            items = Items


def log_commits(path):
    journal = Journal.open(str(path) + F.WAL_SUFFIX, True, mmap.PAGESIZE)
    try:
        return journal.version, journal.commits
    finally:
        journal.close()


def test_metadata_goes_into_the_commit_frame(tmp_path):
    path = tmp_path / "m.ps"
    with RecStorage(path) as p:
        first = p.last_transaction
        p.root.n = 1
        p.root.items = ["a", "b"]
        p.commit("first", user="alice", extension={"ticket": 7, "ratio": 0.5, "urgent": True, "tag": "x"})
        assert p.last_transaction == first + 1
        p.root.items = None  # frees the list and its strings: the frame lists them too
        p.commit(user="bob")
        with p.transaction("in a block", extension={}):
            p.root.n = 3
        p.root.n = 4
        p.commit()
        assert p.last_transaction == first + 4
        version, commits = log_commits(path)
        assert version == F.WAL_VERSION == 4
        metas = [F.unpack_txn_meta(commit.meta) for commit in commits[-4:]]
        assert metas == [("first", "alice", {"ticket": 7, "ratio": 0.5, "urgent": True, "tag": "x"}),
                         (None, "bob", {}), ("in a block", None, {}), (None, None, {})]
        assert commits[-3].freed and not commits[-1].freed and commits[-1].meta == b""
        assert [commit.txn for commit in commits[-4:]] == list(range(first + 1, first + 5))
        p.check()
    with RecStorage(path, readonly=True) as r:
        assert r.last_transaction == first + 4 and r.root.n == 4


def test_last_transaction_of_readers_and_of_a_commit_with_nothing_in_it(tmp_path):
    path = tmp_path / "r.ps"
    w = RecStorage(path)
    r = RecStorage(path, readonly=True)
    try:
        before = w.last_transaction
        assert r.last_transaction == before
        w.commit("nothing")  # no change: no transaction
        assert w.last_transaction == before
        w.root.n = 1
        w.commit()
        assert r.last_transaction == before and r.refresh() and r.last_transaction == before + 1
    finally:
        r.close()
        w.close()
    for p in (RecStorage(None), RecStorage(path, overlay=True)):
        before = p.last_transaction
        p.root.n = 5
        p.commit("kept in memory", user="u", extension={"k": 1})
        assert p.last_transaction == before + 1
        p.close()


@pytest.mark.parametrize("arguments, error, match", [
    (dict(description=b"bytes"), TypeError, "description must be a str"),
    (dict(user=1), TypeError, "user must be a str"),
    (dict(extension=[("a", 1)]), TypeError, "extension must be a dict"),
    (dict(extension={1: "a"}), TypeError, "keys must be str"),
    (dict(extension={"a": None}), TypeError, r"extension\['a'\] must be a str, int, float or bool"),
    (dict(extension={"a": [1]}), TypeError, "not list"),
    (dict(extension={"a": math.nan}), ValueError, "finite"),
    (dict(extension={"a": math.inf}), ValueError, "finite"),
    (dict(description="\ud800"), ValueError, "not valid text"),
    (dict(description="x" * (F.MAX_TXN_META + 1)), ValueError, "more than"),
])
def test_bad_metadata_is_refused_before_anything_changes(tmp_path, arguments, error, match):
    path = tmp_path / "b.ps"
    with RecStorage(path) as p:
        p.root.n = 1
        p.commit()
        before = p.last_transaction
        p.root.n = 2
        description = arguments.pop("description", None)
        with pytest.raises(error, match=match):
            p.commit(description, **arguments)
        assert p.last_transaction == before and p.root.n == 2  # still pending
        with pytest.raises(error, match=match):
            with p.transaction(description, **arguments):
                p.root.n = 3  # never runs
        assert p.root.n == 2
        p.rollback()
        assert p.root.n == 1
        p.check()


def test_a_nested_block_refuses_metadata(tmp_path):
    with RecStorage(tmp_path / "n.ps") as p:
        with pytest.raises(ValueError, match="outermost"):
            with p.transaction("outer"):
                p.root.n = 1
                with p.transaction("inner"):
                    p.root.n = 2
        assert p.root.n == 0  # the outer block rolled back
        with p.transaction("outer", user="me"):
            with p.transaction():
                p.root.n = 3
        version, commits = log_commits(tmp_path / "n.ps")
        assert F.unpack_txn_meta(commits[-1].meta) == ("outer", "me", {})


def test_a_version_2_log_is_still_read_and_appended_to_in_version_2(tmp_path, monkeypatch):
    """A log written by the version before metadata (its commits not yet in the main file) is
    recovered; a writer that appends to it (a reader kept it from being started over) writes
    version 2 frames: freed offsets kept, metadata left out."""
    path, copy = tmp_path / "v2.ps", tmp_path / "copy.ps"
    monkeypatch.setattr(F, "WAL_VERSION", 2)
    p = RecStorage(path)
    p.root.items = ["one", "two", "three"]
    p.commit()
    p.root.items = ["four"]  # frees three strings
    p.root.n = 2
    p.commit("dropped: a version 2 log has no room for it")
    for name in (path, str(path) + F.WAL_SUFFIX):  # what a crash leaves now
        shutil.copyfile(name, str(name).replace("v2.ps", "copy.ps"))
    p.close()
    monkeypatch.undo()
    version, commits = log_commits(copy)
    assert version == 2 and commits[-1].freed and commits[-1].meta == b""
    with RecStorage(copy, readonly=True) as r:
        assert r.root.n == 2 and list(map(str, r.root.items)) == ["four"]
        r.check()
    journal = Journal.open(str(copy) + F.WAL_SUFFIX, False, mmap.PAGESIZE)
    try:
        last = journal.commits[-1]
        journal.append(last.txn + 1, [], last.root, False, freed=[4096 + 64], meta=b'{"user":"x"}')
    finally:
        journal.close()
    version, commits = log_commits(copy)
    assert version == 2 and commits[-1].freed == [4096 + 64] and commits[-1].meta == b""
    with RecStorage(copy) as w:
        assert w.root.n == 2
        w.check()
        w.root.n = 3
        w.commit("a new log after the checkpoint", user="y")
        version, commits = log_commits(copy)
        assert version == F.WAL_VERSION and F.unpack_txn_meta(commits[-1].meta)[:2] == ("a new log after the checkpoint", "y")


def test_unreadable_metadata_never_decides_a_commit():
    assert F.unpack_txn_meta(b"\xff not json") == (None, None, {})
    assert F.unpack_txn_meta(b"[1, 2]") == (None, None, {})
    assert F.unpack_txn_meta(b'{"extension": 3}') == (None, None, {})
    assert F.pack_txn_meta() == b""
