"""Building a Dict in bulk (issue 12, P4b): a bulk update into a table it grows places the old
entries and the new in one pass; a multi-page object's pages after its first carry no link.

The contract: whatever the mix (new, present, repeated, long keys, equal hashes), the Dict
ends as a ``dict`` updated the same way would, ``check()`` passes, and an interrupt anywhere
in the update is undone by a rollback.
"""

import sys
import zlib

import pytest

from permastruct import Dict, Storage
from permastruct import _format as F

from conftest import interrupt_at_opcode

# pairs of ByteString keys with one stored hash (crc32 with the bytes seed)
_SAME_HASH = ((b"c29685295", b"c32060020"), (b"c29685294", b"c32060021"))


class Build(Storage):
    def populateSchema(self):
        s = self.schema
        self.define(Dict("Index")[s.ByteString, s.Int])
        self.define(Dict("Numbers")[s.Int, s.Float])
        self.define(Dict("Small")[s.ByteString, s.Int8])
        self.define(Dict("Counts")[s.ByteString, s.UInt64])
        self.define(Dict("Wide")[s.ByteString, s.Int])

        class Root(s.Structure):
            index = s.Index
            numbers = s.Numbers
            blob = s.ByteString
            small = s.Small
            counts = s.Counts
            wide = s.Wide


@pytest.fixture
def build(tmp_path):
    p = Build(tmp_path / "b.ps", pageSize=256)  # small pages: every table is a run of many
    yield p
    p.close()


def _agree(d, reference):
    assert len(d) == len(reference)
    assert dict(d.items()) == reference
    for key, value in reference.items():
        assert d[key] == value


def test_the_same_hash_keys_are_distinct():
    for one, other in _SAME_HASH:
        assert zlib.crc32(one, F.BYTES_SEED) == zlib.crc32(other, F.BYTES_SEED)


@pytest.mark.parametrize("case", ["new", "present", "repeated", "long", "same hash", "mixed"])
def test_a_bulk_update_that_grows_the_table_agrees_with_dict(build, case):
    p = build
    first = [(b"k%d" % i, i) for i in range(150)] + [(_SAME_HASH[0][0], -1)]
    p.root.index = {}
    d = p.root.index
    d.update(first)
    reference = dict(first)
    p.commit()
    new = [(b"n%d" % i, i) for i in range(400)]  # more than the table holds: it grows
    second = {
        "new": new + [(_SAME_HASH[1][0], -2)],
        "present": new + [(b"k7", 70), (b"k149", 71)],
        "repeated": new + [(b"n%d" % (i % 30), -i) for i in range(60)],
        "long": new + [(b"a key longer than sixteen bytes", 5)],
        "same hash": [(_SAME_HASH[0][1], -3)] + new + [(_SAME_HASH[1][0], -4), (_SAME_HASH[1][1], -5)],
        "mixed": new + [(b"k3", 30), (b"n5", 50), (b"x" * 40, 4), (_SAME_HASH[0][0], 9), (b"", 0)],
    }[case]
    d.update(iter(second))
    reference.update(second)
    _agree(d, reference)
    p.check()
    p.commit()
    p.check()
    _agree(d, reference)
    for key in (b"zz", b"", b"n400", _SAME_HASH[1][1] + b"!"):
        assert (key in d) == (key in reference)


def test_a_bulk_update_grows_a_table_with_dead_entries(build):
    p = build
    p.root.index = {b"k%d" % i: i for i in range(100)}
    d = p.root.index
    reference = {b"k%d" % i: i for i in range(100)}
    for i in range(0, 100, 3):
        del d[b"k%d" % i], reference[b"k%d" % i]
    more = [(b"m%d" % i, i) for i in range(500)]
    d.update(more)
    reference.update(more)
    _agree(d, reference)
    p.check()


def test_number_keys_grow_in_one_pass(build):
    p = build
    p.root.numbers = {i * 7: float(i) for i in range(50)}
    d = p.root.numbers
    reference = {i * 7: float(i) for i in range(50)}
    more = [(i * 13 - 999, i / 2) for i in range(700)] + [((1 << 63) - 1, 1.0), (-(1 << 63), 2.0)]
    d.update(more)
    reference.update(more)
    _agree(d, reference)
    p.check()


def test_a_large_object_spans_pages_whose_links_are_not_written(tmp_path):
    """A multi-page object (a run) takes new pages at the end of the file: only the first page's
    link is written (the object's bytes cover the others'); the store checks, and the pages,
    freed and taken again as slabs and smaller runs, check too."""
    p = Build(tmp_path / "run.ps", pageSize=256)
    p.commit()
    blob = bytes(range(256)) * 40  # about 40 pages of 256 bytes
    p.root.blob = blob
    p.check()
    p.commit()
    p.close()
    p = Build(tmp_path / "run.ps")
    assert p.root.blob.contents == blob
    p.check()
    p.root.blob = None
    p.commit()
    p.root.index = {b"k%d" % i: i for i in range(300)}  # small objects and a run out of the freed pages
    p.check()
    p.commit()
    p.check()
    assert len(p.root.index) == 300
    p.close()


def test_an_interrupt_anywhere_in_a_growing_bulk_update_is_undone_by_rollback(build):
    """KeyboardInterrupt at every opcode of a bulk update that grows the table (the one-pass
    placement): it raised, and a rollback brings back the dict as committed; or it returned, and
    the dict is fully updated.  ``check()`` passes either way."""
    p = build
    first = [(b"k%d" % i, i) for i in range(20)]
    p.root.index = dict(first)
    p.commit()
    committed = dict(first)
    second = [(b"n%d" % i, i) for i in range(30)] + [(b"k3", 33)]
    updated = dict(committed, **{})
    updated.update(second)
    count = 1
    while True:
        fired = interrupt_at_opcode(count)
        raised = False
        try:
            p.root.index.update(second)
        except KeyboardInterrupt:
            raised = True
        finally:
            sys.settrace(None)
        if raised:
            p.rollback()
            _agree(p.root.index, committed)
        else:
            _agree(p.root.index, updated)
            p.check()
            p.rollback()
        p.check()
        if not fired():
            break
        count += 1
    assert count > 100


@pytest.mark.parametrize("field, good, bad", [
    ("small", [-128, 127, 0], [128, -129]),
    ("counts", [0, (1 << 64) - 1], [-1, 1 << 64]),
    ("wide", [-(1 << 63), (1 << 63) - 1], [1 << 63, -(1 << 63) - 1]),
])
def test_bulk_values_are_range_checked_as_a_single_store_would(build, field, good, bad):
    """The values' range is checked at once (an array of the value type's C type): the bounds go
    in; one value past them raises the OverflowError of a single store, and nothing is stored."""
    p = build
    setattr(p.root, field, {})
    d = getattr(p.root, field)
    pairs = [(b"g%d" % i, value) for i, value in enumerate(good * 20)]
    d.update(pairs)
    _agree(d, dict(pairs))
    for value in bad:
        with pytest.raises(OverflowError) as single:
            d[b"one"] = value
        with pytest.raises(OverflowError) as bulk:
            d.update([(b"b%d" % i, 1) for i in range(50)] + [(b"bad", value)])
        assert str(bulk.value) == str(single.value)
        _agree(d, dict(pairs))
    for value in (True, 1.0, "1"):  # not an int: what a single store does with it, the same in bulk
        try:
            d[b"one"] = value
        except (TypeError, ValueError) as exc:
            with pytest.raises(type(exc)):
                d.update([(b"b%d" % i, 1) for i in range(50)] + [(b"bad", value)])
        else:
            d.update([(b"b%d" % i, 1) for i in range(50)] + [(b"bad", value)])
            assert d[b"bad"] == d[b"one"]
    p.check()
