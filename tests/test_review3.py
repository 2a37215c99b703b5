"""Review of the kept table views (``_ps_tv``), the interrupt model and bulk Dict updates: the cases
the first tests of them left out."""

import pytest

from permastruct._heap import Heap
from permastruct._mapping import MappedFile
from conftest import assert_lookups_agree, lookups_storage

Lookups = lookups_storage()


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
    assert_lookups_agree(d, {b"k%d" % i: i for i in range(3)}, [b"k0", b"k1", b"k2"])  # (its view kept)
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
    assert_lookups_agree(d, expected, list(expected) + [b"k9"])
    assert_lookups_agree(r.root.by_bytes, expected, list(expected) + [b"k9"])
    assert_lookups_agree(r.root.by_text, {"t%d" % i: -i for i in range(3)}, ["t0", "t1", "t2"])
    assert r.refresh() is False
    r.close()
    w.close()


# -- bulk update (Dict.update through _ps_fill_columns) --------------------------------------------
def _update_agrees(p, name, pairs, reference):
    d = getattr(p.root, name)
    items = list(pairs)
    d.update(pairs if isinstance(pairs, list) else iter(items))  # (an iterator: the way of a generator)
    reference.update(items)
    assert dict(d) == reference and list(d) == list(reference) and len(d) == len(reference)
    assert_lookups_agree(d, reference, list(reference))
    p.check()


@pytest.mark.parametrize("name, key", [("by_bytes", lambda i: b"k%d" % i), ("by_text", lambda i: "t%d" % i),
                                       ("by_int", lambda i: i * 7 - 3)])
def test_a_bulk_update_with_repeated_keys_keeps_the_last_value(lookups, name, key):
    p = lookups
    setattr(p.root, name, {})
    reference = {}
    pairs = [(key(i % 5), i) for i in range(20)]  # every key four times, in one update
    _update_agrees(p, name, pairs, reference)
    _update_agrees(p, name, [[key(i), -i] for i in range(3, 40)], reference)  # pairs as lists; some present
    _update_agrees(p, name, ((key(i), i * i) for i in range(40, 80)), reference)  # an iterator of tuples
    p.commit()


def test_a_bulk_update_of_keys_of_every_length_up_to_and_past_the_inline_limit(lookups):
    """String keys by their UTF-8 length, not their length in characters: 16 bytes (inline, the one
    length of the update), 17 (a string object), mixed, and characters of two or more bytes."""
    p = lookups
    for keys in (["%016d" % i for i in range(50)],  # every key 16 bytes: one length
                 ["é" * 8 + "%d" % i for i in range(10)],  # 8 characters of 2 bytes and a digit: 17 bytes
                 ["é" * 8 for _ in range(1)] + ["x" * n for n in range(1, 17)],  # 16 bytes, and 1 to 16
                 ["€" * 5 + "%d" % i for i in range(10)],  # 15 + 1 bytes, in 6 characters
                 ["%017d" % i for i in range(30)]):  # 17 bytes: string objects
        p.root.by_text = {}
        reference = {}
        _update_agrees(p, "by_text", [(k, n) for n, k in enumerate(keys)], reference)
        _update_agrees(p, "by_text", [(k, -n) for n, k in enumerate(keys)], reference)
    p.root.by_bytes = {}
    reference = {}
    _update_agrees(p, "by_bytes", [(b"%016d" % i, i) for i in range(40)], reference)
    _update_agrees(p, "by_bytes", [(b"x" * n, n) for n in range(0, 20)], reference)
    p.commit()
    p.check()


def test_a_bulk_update_from_a_generator_that_raises_stores_nothing(lookups):
    p = lookups
    p.root.by_bytes = {b"a": 1}
    p.commit()

    def pairs():
        for i in range(100):
            if i == 60:
                raise ZeroDivisionError("midway")
            yield (b"k%d" % i, i)
    with pytest.raises(ZeroDivisionError):
        p.root.by_bytes.update(pairs())
    assert dict(p.root.by_bytes) == {b"a": 1}
    with pytest.raises(ValueError):
        p.root.by_bytes.update([(b"x", 1), (b"y", 2, 3)])
    with pytest.raises(TypeError):
        p.root.by_bytes.update([(b"x", 1), 5])
    assert dict(p.root.by_bytes) == {b"a": 1}
    p.check()


def test_a_bulk_update_of_short_bytes_keys_of_mixed_lengths(lookups):
    """Keys of 0 to 16 bytes in one update into an empty Dict (the column writer, a length per key),
    then again with new values (present keys: the general way)."""
    p = lookups
    p.root.by_bytes = {}
    reference = {}
    _update_agrees(p, "by_bytes", [(b"x" * n, n) for n in range(17)], reference)
    _update_agrees(p, "by_bytes", [(b"x" * n, -n) for n in range(17)], reference)
    p.root.by_bytes = {}
    reference = {}
    _update_agrees(p, "by_bytes", [(b"", 1), (b"", 2)], reference)  # one key, twice, of length 0
    p.commit()


def test_a_bulk_update_into_a_table_whose_index_has_no_empty_slot_raises(lookups):
    """Damage: every empty hash slot names an entry (the table's figures unchanged).  A lookup and a
    store say so (CorruptStorageError); a bulk update must too, not probe the full ring forever."""
    import signal

    from permastruct.errors import CorruptStorageError
    p = lookups
    p.root.by_bytes = {}
    d = p.root.by_bytes
    d.update([(b"k%d" % i, i) for i in range(3)])
    p.commit()
    table = d._ps_table()
    for slot in range(len(table.indices)):
        if not table.indices[slot]:
            table.indices[slot] = 1
    with pytest.raises(CorruptStorageError):
        d[b"absent"] = 1

    def hung(signum, frame):
        raise TimeoutError("the bulk update probes a full ring of hash slots forever")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        with pytest.raises(CorruptStorageError):
            d.update([(b"new%d" % i, i) for i in range(2)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    p.rollback()
    assert dict(d) == {b"k%d" % i: i for i in range(3)}
    p.check()


# -- a change cut short: the kept view is never ahead of, nor behind, the proxy's body -------------
def _emptied_by_pops(d):
    while len(d):
        d.pop(next(iter(d)))


def _emptied_by_dels(d):
    for key in list(d):
        del d[key]


def _emptied_by_popitem(d):
    while len(d):
        d.popitem()


def _shrunk(d):
    for key in list(d)[:-2]:  # down to 2 of 40: a rebuild at an eighth full
        del d[key]


def _grown(d):
    for i in range(40, 120):
        d[b"k%d" % i] = i


def _updated(d):
    d.update((b"k%d" % i, -i) for i in range(30, 200))


_CUT_SHORT = {"clear": lambda d: d.clear(), "pops": _emptied_by_pops, "dels": _emptied_by_dels,
              "popitem": _emptied_by_popitem, "shrunk": _shrunk, "grown": _grown, "updated": _updated}


@pytest.mark.parametrize("how", sorted(_CUT_SHORT))
def test_a_kept_view_is_its_bodys_at_every_point_of_a_change_cut_short(tmp_path, how):
    """KeyboardInterrupt at every opcode of a change that frees or replaces a Dict's table: wherever it
    lands, a live kept view is the view of the table the proxy's body names (never of the table a
    body of 0 or a new table replaced: a lookup made before the rollback would read it), and after
    the rollback every lookup reads the committed table."""
    import sys

    from conftest import interrupt_at_opcode
    size = 40 if how in ("shrunk", "grown", "updated") else 8  # (emptied: every opcode of a small one)
    p = Lookups(tmp_path / "l.ps", pageSize=256)
    p.root.by_bytes = {b"k%d" % i: i for i in range(size)}
    p.commit()
    committed = {b"k%d" % i: i for i in range(size)}
    heap = p._heap
    d = p.root.by_bytes
    fired = interrupt_at_opcode(10 ** 9)  # (how many opcodes it runs: every one of the last few
    try:  # hundred, where a table is freed or replaced, and a sample of the rest)
        _CUT_SHORT[how](d)
    finally:
        sys.settrace(None)
    total = fired.opcodes()
    p.rollback()
    stride = 1 if size < 40 else 97
    counts = sorted(set(range(1, total, stride)) | set(range(max(1, total - 300), total + 2)))
    for count in counts:
        assert_lookups_agree(d, committed, [b"k0", b"k99"])  # (its view kept)
        fired = interrupt_at_opcode(count)
        try:
            _CUT_SHORT[how](d)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        kept = getattr(d, "_ps_tv", None)
        if kept is not None and kept.fast is not None:
            assert d._ps_body and heap.tables.get(d._ps_body) is kept, (count, d._ps_body)
        if not d._ps_body:  # (no table: no key is in it, by any way of asking)
            assert not any(key in d for key in committed) and d.get(b"k0") is None, count
        p.rollback()
        assert_lookups_agree(d, committed, list(committed) + [b"k99"])
    assert not fired()
    p.check()
    p.close()


# -- the header block is written with pwrite only, never through the map (MappedFile.dirty_ranges) --
def _header_untouched(p):
    """The map's pages of the header block show the file's bytes and were never written in the map."""
    from permastruct import _format as F
    from permastruct._mapping import OS_PAGE
    mapping = p._page_file.mapping
    segment = mapping.segment_of(0)
    assert bytes(segment.map[:F.HEADER_BLOCK]) == mapping.io.pread(F.HEADER_BLOCK, 0)
    assert not [first for first, _ in mapping._dirty(segment) if first * OS_PAGE < F.HEADER_BLOCK]


def _work(p):
    d = p.root.by_bytes
    d.update((b"k%d" % i, i) for i in range(300))
    p.commit()
    for i in range(0, 300, 3):
        del d[b"k%d" % i]
    p.root.by_text = {"t%d" % i: i for i in range(50)}
    p.rollback()
    with p.transaction():
        p.root.by_int = {i: i for i in range(100)}
        with pytest.raises(ZeroDivisionError), p.transaction():
            d.clear()
            1 / 0
    d.update((b"n%d" % i, i) for i in range(100))
    p.commit()
    _header_untouched(p)


@pytest.mark.parametrize("how", ["made", "reopened", "memory", "overlay"])
def test_nothing_writes_the_header_block_through_the_map(tmp_path, how):
    """Commits, rollbacks, savepoints, undo, pack and backup leave the header block of the map as
    the file has it: a commit does not look for changes in a segment before the map's origin, so a
    write there would never be committed (nor seen by readers)."""
    path = tmp_path / "l.ps"
    if how == "memory":
        p = Lookups(None, pageSize=256)
    else:
        p = Lookups(path, pageSize=256, history=5)
        if how != "made":
            p.root.by_bytes = {b"x": 1}
            p.close()
            p = Lookups(path, overlay=(how == "overlay"), pageSize=256)
    p.root.by_bytes = {}
    p.commit()
    _header_untouched(p)
    _work(p)
    _work(p)
    if how in ("made", "reopened"):
        p.undo(p.last_transaction)
        _header_untouched(p)
        p.backup(tmp_path / "copy.ps")
        r = Lookups(path, readonly=True)
        _header_untouched(r)
        p.root.by_bytes.clear()
        p.commit()
        r.refresh()
        _header_untouched(r)
        r.close()
    p.root.by_text = None
    p.commit()
    p.pack()
    _header_untouched(p)
    p.check()
    p.close()


def test_a_refresh_cut_short_before_it_moves_leaves_the_next_one_as_it_was(tmp_path, monkeypatch):
    """Interrupted as it waits for the snapshot lock (nothing moved), a refresh leaves nothing due: the
    next one, with nothing new, does nothing, and so kills no proxy of an object made in a place the
    last move freed (the freed offsets are that move's, not this one's)."""
    from permastruct._commit import Engine
    path = tmp_path / "l.ps"
    w = Lookups(path, pageSize=256)
    w.root.by_text = {"a": 1}
    w.commit()
    r = Lookups(path, readonly=True)
    old = r.root.by_text
    w.root.by_text = None  # the old Dict freed, then the new one made in its place
    w.commit()
    w.root.by_text = {"b": 2}
    w.commit()
    assert r.refresh() is True
    new = r.root.by_text
    assert new._ps_oid in r._page_file.freed  # (the case itself: a proxy at a freed offset, made after)
    calls = _interrupt_once(monkeypatch, Engine, "_lock_snapshot")
    with pytest.raises(KeyboardInterrupt):
        r.refresh()
    assert calls
    assert r.refresh() is False
    assert dict(new) == {"b": 2}
    with pytest.raises(Exception):
        len(old)
    r.close()
    w.close()


@pytest.mark.parametrize("case", ["bytes", "int"])
def test_a_rollback_cut_short_just_after_its_pages_went_back_leaves_no_kept_view(lookups, monkeypatch, case):
    """An interrupt as the page file's discard returns, before the rollback forgets its views: a Dict
    grown in the transaction (its proxy keeping the new table's view) reads its committed table."""
    p = lookups
    name, key = ("by_bytes", lambda i: b"k%d" % i) if case == "bytes" else ("by_int", lambda i: i * 7)
    setattr(p.root, name, {key(i): i for i in range(5)})
    p.commit()
    d = getattr(p.root, name)
    committed = {key(i): i for i in range(5)}
    for i in range(5, 400):  # grown: a new table, whose view the proxy keeps
        d[key(i)] = -i
    assert_lookups_agree(d, {**committed, **{key(i): -i for i in range(5, 400)}}, [key(0), key(399)])
    pf = p._page_file
    original = pf.discard

    def discard_then_interrupt():
        original()
        raise KeyboardInterrupt("as the discard returns")
    monkeypatch.setattr(pf, "discard", discard_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        p.rollback()
    monkeypatch.undo()
    assert_lookups_agree(d, committed, [key(i) for i in range(10)] + [key(399)])
    p.rollback()
    assert_lookups_agree(d, committed, [key(i) for i in range(10)])
    p.check()
