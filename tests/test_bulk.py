"""Bulk record loading: ``List.extend_records`` (issue 11, item 4).

The contract: appending records made from rows or columns equals appending
``cls(**row)`` one at a time (same values, same errors), every value is
checked before anything is made, and a bad row, a full disk, a rollback or
an interrupt leaves nothing half-made (``check()`` after each).
"""

import errno
import math
import os
import random
from array import array

import pytest

from permastruct import List, Storage
from permastruct._mapping import FileIO
from permastruct.errors import (DeadProxyError, IncompleteChangeError, ReadOnlyError, StorageClosedError,
                                StorageFullError)


class Shop(Storage):
    def populateSchema(self):
        s = self.schema

        self.define(List("Tags")[s.String])

        class Maker(s.Structure):
            label = s.String

        class Item(s.Structure):
            code = s.Int
            price = s.Float
            weight = s.Float32
            small = s.Int8
            count = s.UInt32
            fresh = s.Bool
            name = s.String
            raw = s.ByteString
            maker = Maker
            tags = s.Tags

        class Special(Item):
            note = s.String

        self.define(List("Items")[Item])
        self.define(List("Makers")[Maker])

        class Root(s.Structure):
            items = s.Items
            makers = s.Makers


def _fields(item):
    """A comparable picture of one record (references by value)."""
    return (type(item).__name__, item.code, item.price, item.weight, item.small, item.count, item.fresh,
            None if item.name is None else str(item.name), None if item.raw is None else item.raw.contents,
            None if item.maker is None else str(item.maker.label),
            None if item.tags is None else [str(tag) for tag in item.tags],
            getattr(item, "note", None) and str(item.note))


NAMES = ["code", "price", "weight", "small", "count", "fresh", "name", "raw", "maker", "tags"]


def _row(i, maker=None):
    return (i * 7, i / 3, i * 0.25, i % 100 - 50, i * 3, i % 2 == 0, None if i % 5 == 0 else f"nämé{i}",
            b"raw" * (i % 4) if i % 6 else None, maker, [f"t{i}", "x"] if i % 9 == 0 else None)


@pytest.fixture
def shop(tmp_path):
    p = Shop(str(tmp_path / "shop.ps"))
    p.root.items = []
    p.root.makers = [p.schema.Maker(label="acme"), p.schema.Maker(label="zeta")]
    p.commit()
    yield p
    if not p.closed:
        p.close()


def _single(p, rows, cls=None):
    """What appending one record per row gives (the reference the bulk call must equal)."""
    cls = cls or p.schema.Item
    return [cls(**dict(zip(NAMES, row))) for row in rows]


def test_rows_columns_and_mappings_equal_one_append_per_row(shop):
    p = shop
    makers = list(p.root.makers)
    rows = [_row(i, makers[i % 2] if i % 3 else None) for i in range(500)]
    items = p.root.items
    assert items.extend_records(rows) == 500
    assert items.extend_records([dict(zip(NAMES, row)) for row in rows[:50]]) == 50
    columns = {name: [row[k] for row in rows[:70]] for k, name in enumerate(NAMES)}
    assert items.extend_records(columns=columns) == 70
    p.check()
    expected = [_fields(item) for item in _single(p, rows + rows[:50] + rows[:70])]
    assert [_fields(item) for item in items] == expected
    p.commit()
    p.close()
    p = Shop(p.fileName)
    assert [_fields(item) for item in p.root.items] == expected
    p.check()
    p.close()


def test_fields_left_out_take_their_defaults_and_mapping_rows_may_differ(shop):
    items = shop.root.items
    items.extend_records([{"code": 1}, {"name": "only a name"}, {}])
    items.extend_records(columns={"price": [2.5]})
    assert [(i.code, i.price, i.fresh, i.name, i.maker) for i in items] == [
        (1, 0.0, False, None, None), (0, 0.0, False, "only a name", None), (0, 0.0, False, None, None),
        (0, 2.5, False, None, None)]
    shop.check()


def test_a_subclass_is_made_with_cls(shop):
    items = shop.root.items
    items.extend_records([(1, 1.0, 1.0, 1, 1, True, "a", b"b", None, None, "special")], cls=shop.schema.Special)
    assert type(items[0]) is shop.schema.Special and str(items[0].note) == "special"
    with pytest.raises(TypeError, match="cannot be made"):
        items.extend_records([("x",)], cls=shop.schema.Maker)
    shop.check()


def test_buffers_of_the_stored_type_and_numpy_arrays_are_taken_as_columns(shop):
    numpy = pytest.importorskip("numpy")
    items = shop.root.items
    codes = numpy.arange(1000, dtype=numpy.int64) * 3
    prices = numpy.linspace(0, 1, 1000)
    counts = array("I", range(1000))
    smalls = numpy.arange(1000, dtype=numpy.int32) % 100  # another width: converted and checked
    fresh = numpy.arange(1000) % 3 == 0  # numpy bools: a buffer of '?'
    items.extend_records(columns={"code": codes, "price": prices, "count": counts, "small": smalls,
                                  "fresh": fresh})
    assert [i.code for i in items] == codes.tolist()
    assert [i.price for i in items] == prices.tolist()
    assert [i.count for i in items] == list(counts)
    assert [i.small for i in items] == smalls.tolist()
    assert [i.fresh for i in items] == fresh.tolist()
    shop.check()


@pytest.mark.parametrize("bad, error, text", [
    ({"code": "seven"}, TypeError, "row 3: Item.code is Int: expected an int, not str"),
    ({"code": 1 << 63}, OverflowError, "row 3: Item.code is Int"),
    ({"small": 200}, OverflowError, "row 3: Item.small is Int8"),
    ({"count": -1}, OverflowError, "row 3: Item.count is UInt32"),
    ({"price": "1.5"}, TypeError, "row 3: Item.price is Float"),
    ({"weight": 1e300}, OverflowError, "row 3: Item.weight is Float32"),
    ({"fresh": 2}, TypeError, "row 3: Item.fresh is Bool"),
    ({"name": b"bytes"}, TypeError, "row 3"),
    ({"raw": "text"}, TypeError, "row 3"),
    ({"maker": "not a maker"}, TypeError, "row 3"),
    ({"tags": [1, 2]}, TypeError, "row 3"),
])
def test_a_bad_value_raises_the_single_write_error_naming_its_row_and_adds_nothing(shop, bad, error, text):
    p = shop
    items = p.root.items
    items.extend_records([_row(i) for i in range(5)])
    p.commit()
    before = p.check()["objects"]
    rows = [dict(zip(NAMES, _row(i))) for i in range(10)]
    rows[3].update(bad)
    with pytest.raises(error, match=text.replace("(", r"\(")):
        items.extend_records(rows)
    single = dict(zip(NAMES, _row(3)), **bad)  # the single write refuses it too, with the same error type
    with pytest.raises(error):
        p.schema.Item(**single)
    assert len(items) == 5
    p.commit()  # the failed calls left nothing behind: nothing to free, nothing held
    assert p.check()["objects"] == before


def test_shapes_that_are_not_rows_or_columns_are_refused(shop):
    items = shop.root.items
    with pytest.raises(TypeError, match="rows or columns"):
        items.extend_records()
    with pytest.raises(TypeError, match="rows or columns"):
        items.extend_records([], columns={})
    with pytest.raises(TypeError, match="row 1 has 2 values for 10 fields"):
        items.extend_records([_row(0), (1, 2)])
    with pytest.raises(TypeError, match="row 0 is a str"):
        items.extend_records(["abc"])
    with pytest.raises(TypeError, match="no field.*'colour'"):
        items.extend_records([{"colour": 1}])
    with pytest.raises(TypeError, match="no field.*'colour'"):
        items.extend_records(columns={"colour": [1]})
    with pytest.raises(ValueError, match="differ in length"):
        items.extend_records(columns={"code": [1, 2], "price": [1.0]})
    assert items.extend_records([]) == 0 and items.extend_records(columns={}) == 0
    assert items.extend_records(iter([_row(1)])) == 1  # any iterable of rows
    assert len(items) == 1
    shop.check()


def test_read_only_and_closed_storages_refuse(shop, tmp_path):
    items = shop.root.items
    items.extend_records([_row(1)])
    shop.commit()
    path = shop.fileName
    shop.close()
    with pytest.raises(StorageClosedError):
        items.extend_records([_row(1)])
    p = Shop(path, readonly=True)
    with pytest.raises(ReadOnlyError):
        p.root.items.extend_records([_row(2)])
    p.close()


def test_rollback_kills_the_proxies_of_bulk_records_and_frees_them(shop):
    p = shop
    items = p.root.items
    items.extend_records([_row(1)])
    p.commit()
    before = p.check()["objects"]
    items.extend_records([_row(i) for i in range(2000)])
    held = items[1500]
    name = held.name
    p.rollback()
    with pytest.raises(DeadProxyError):
        held.code  # noqa: B018 - dead
    with pytest.raises(DeadProxyError):
        str(name)
    assert len(p.root.items) == 1
    assert p.check()["objects"] == before


def test_a_savepoint_takes_back_only_the_records_made_after_it(shop):
    p = shop
    items = p.root.items
    with p.transaction():
        items.extend_records([_row(i) for i in range(300)])
        first = items[299]
        try:
            with p.transaction():
                items.extend_records([_row(i) for i in range(400)])
                second = items[600]
                raise RuntimeError("give up the inner block")
        except RuntimeError:
            pass
        assert len(items) == 300 and first.code == 299 * 7
        with pytest.raises(DeadProxyError):
            second.code  # noqa: B018 - made after the savepoint: dead
    assert len(p.root.items) == 300
    p.check()


def test_a_full_disk_makes_nothing(shop, monkeypatch):
    p = shop
    items = p.root.items
    items.extend_records([_row(i) for i in range(10)])
    p.commit()
    before = p.check()["objects"]

    def hook(operation, path, *args):
        if operation == "fallocate":
            raise OSError(errno.ENOSPC, "no space (injected)", path)
    monkeypatch.setattr(FileIO, "hook", hook)
    with pytest.raises(StorageFullError):
        items.extend_records([(i, 0.5, 0.5, 1, 1, True, "n%d" % i, b"r", None, None) for i in range(200_000)])
    monkeypatch.setattr(FileIO, "hook", None)
    assert len(items) == 10
    p.commit()
    assert p.check()["objects"] == before
    items.extend_records([_row(i) for i in range(1000)])  # usable again once there is room
    p.commit()
    assert len(items) == 1010
    p.check()


def test_an_interrupt_inside_leaves_a_change_that_only_a_rollback_ends(shop, monkeypatch):
    from permastruct import _alloc
    p = shop
    items = p.root.items
    items.extend_records([_row(1)])
    p.commit()
    before = p.check()["objects"]
    calls = {"n": 0}
    real = _alloc.scatter

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(_alloc, "scatter", interrupted)
    with pytest.raises(KeyboardInterrupt):
        items.extend_records([_row(i) for i in range(5000)])
    monkeypatch.setattr(_alloc, "scatter", real)
    with pytest.raises(IncompleteChangeError):
        p.commit()
    p.rollback()
    assert len(p.root.items) == 1
    assert p.check()["objects"] == before


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_seeded_bulk_churn_with_tiny_pages_and_reopen(tmp_path, seed):
    """Bulk loads between deletes (slots on free lists, partial slabs, runs of whole slab pages),
    checked against a plain list, with random reopens."""
    rnd = random.Random(seed)
    path = str(tmp_path / "churn.ps")
    p = Shop(path, pageSize=512)
    p.root.items = []
    p.commit()
    model, committed = [], []
    for step in range(25):
        items = p.root.items
        action = rnd.random()
        if action < 0.5 or not model:
            n = rnd.choice([1, 3, 14, 15, 16, 100, 700, 2500])
            rows = [_row(rnd.randrange(10_000)) for _ in range(n)]
            if rnd.random() < 0.5:
                items.extend_records(rows)
            else:
                items.extend_records(columns={name: [row[k] for row in rows] for k, name in enumerate(NAMES)})
            model.extend(rows)
        elif action < 0.8:
            start = rnd.randrange(len(model))
            stop = min(len(model), start + rnd.randrange(1, 800))
            del items[start:stop]
            del model[start:stop]
        elif rnd.random() < 0.3:
            p.rollback()
            model = list(committed)
        else:
            p.commit()
            committed = list(model)
        p.check()
        if rnd.random() < 0.25:
            p.commit()
            committed = list(model)
            p.close()
            p = Shop(path)
        assert [_row_of(item) for item in p.root.items] == [_expected(row) for row in model]
    p.close()


def _row_of(item):
    return (item.code, item.price, item.weight, item.small, item.count, item.fresh,
            None if item.name is None else str(item.name), None if item.raw is None else item.raw.contents,
            None, None if item.tags is None else [str(t) for t in item.tags])


def _expected(row):
    row = list(row)
    row[2] = float(array("f", [row[2]])[0])  # Float32 keeps single precision
    row[8] = None
    return tuple(row)


def test_many_records_in_runs_of_whole_pages_read_back_exactly(tmp_path):
    path = str(tmp_path / "many.ps")
    p = Shop(path)
    p.root.items = []
    n = 120_000
    p.root.items.extend_records(columns={"code": range(n), "price": [i * 0.5 for i in range(n)],
                                         "raw": [b"r%09d" % i for i in range(n)]})
    p.commit()
    p.close()
    p = Shop(path, readonly=True)
    items = p.root.items
    assert len(items) == n
    for i in (0, 1, 126, 127, 128, 4095, n // 2, n - 1):
        assert (items[i].code, items[i].price, items[i].raw.contents) == (i, i * 0.5, b"r%09d" % i)
    assert sum(item.code for item in items) == n * (n - 1) // 2
    assert math.isclose(p.check()["types"]["Item"], n)
    p.close()
    os.unlink(path)


def test_records_too_large_for_a_slab_are_made_one_page_run_each(tmp_path):
    """With 256-byte pages a slab holds objects of at most 112 bytes: an Item (about 80 bytes)
    still fits, a record of 20 Int fields (168 bytes) takes a page run of its own."""
    class Wide(Storage):
        def populateSchema(self):
            fields = {f"f{k}": self.schema.Int for k in range(20)}
            Row = type("Row", (self.schema.Structure,), fields)
            self.define(List("Rows")[Row])

            class Root(self.schema.Structure):
                rows = self.schema.Rows
    path = str(tmp_path / "wide.ps")
    p = Wide(path, pageSize=256)
    p.root.rows = []
    rows = [tuple(range(i, i + 20)) for i in range(300)]
    assert p.root.rows.extend_records(rows) == 300
    p.check()
    p.commit()
    p.close()
    with Wide(path) as p:
        assert [tuple(getattr(row, f"f{k}") for k in range(20)) for row in p.root.rows] == rows
        p.check()
