"""Review of the kept table views (``_ps_tv``), the interrupt model and bulk Dict updates: the cases
the first tests of them left out."""

import pytest

from permastruct._heap import Heap
from permastruct._mapping import MappedFile
from test_collections_engine import Lookups, _agree


@pytest.fixture
def lookups(tmp_path):
    p = Lookups(tmp_path / "l.ps", pageSize=256)
    yield p
    p.close()


def _interrupt_once(monkeypatch, cls, name):
    """Make ``cls.name`` raise KeyboardInterrupt at its entry, once (a signal delivered at its RESUME)."""
    original = getattr(cls, name)
    calls = []

    def interrupted(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt(f"at the entry of {name}")
        return original(*args, **kwargs)
    monkeypatch.setattr(cls, name, interrupted)
    return calls


def _writer_and_reader(path):
    w = Lookups(path, pageSize=256)
    w.root.by_bytes = {b"k%d" % i: i for i in range(3)}
    w.commit()
    r = Lookups(path, readonly=True)
    d = r.root.by_bytes
    _agree(d, {b"k%d" % i: i for i in range(3)}, [b"k0", b"k1", b"k2"])  # (its view kept)
    # the writer frees the table and makes another table of that shape in its place
    old = w.root.by_bytes._ps_body
    w.root.by_bytes.clear()
    w.root.by_text = {"t%d" % i: -i for i in range(3)}
    assert w.root.by_text._ps_body == old
    expected = {b"k%d" % i: 10 + i for i in range(3)}
    w.root.by_bytes.update(expected)
    w.commit()
    return w, r, d, expected


@pytest.mark.parametrize("where", [(Heap, "forget_views"), (MappedFile, "drop_private")])
def test_a_refresh_cut_short_is_finished_by_the_next(tmp_path, monkeypatch, where):
    """A reader's refresh() interrupted as it retires its cached views, or as it moves its map to the
    writer's commit: the next refresh() finishes the move (it does not say "nothing new" and stay
    half way), and a Dict proxy the reader kept reads the table of the new commit, not the place of
    the table the writer freed (another Dict's table now)."""
    w, r, d, expected = _writer_and_reader(tmp_path / "l.ps")
    calls = _interrupt_once(monkeypatch, *where)
    with pytest.raises(KeyboardInterrupt):
        r.refresh()
    assert calls
    assert r.refresh() is True  # the move it did not finish
    _agree(d, expected, list(expected) + [b"k9"])
    _agree(r.root.by_bytes, expected, list(expected) + [b"k9"])
    _agree(r.root.by_text, {"t%d" % i: -i for i in range(3)}, ["t0", "t1", "t2"])
    assert r.refresh() is False
    r.close()
    w.close()

