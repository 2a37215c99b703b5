"""Engine-level tests of the collections: schema, freeing, check() finding damage, CLI."""

import struct
import subprocess
import sys
import zlib

import pytest

from permastruct import (CorruptStorageError, Dict, List, SchemaError, Set, SortedDict, Storage,
                         StorageClosedError)
from permastruct import _format as F
from permastruct import collections as C
from permastruct.cli import info

from conftest import assert_lookups_agree, lookups_storage


class Store(Storage):
    def populateSchema(self):
        s = self.schema

        class Agent(s.Structure):
            name = s.ByteString
            age = s.Int

        Ints = self.define(List("Ints")[s.Int])
        Matrix = self.define(List("Matrix")[Ints])
        self.define(Dict("ByName")[s.ByteString, Agent])
        self.define(Dict("Counts")[s.String, s.Int])
        self.define(Set("Tags")[s.String])
        self.define(SortedDict("ByAge")[s.Int, Agent])
        self.define(SortedDict("Words")[s.String, Matrix])

        class Root(s.Structure):
            ints = Ints
            matrix = Matrix
            by_name = self.schema.ByName
            counts = self.schema.Counts
            tags = self.schema.Tags
            by_age = self.schema.ByAge
            words = self.schema.Words


@pytest.fixture
def store(tmp_path):
    p = Store(tmp_path / "s.ps", pageSize=256)
    yield p
    p.close()


def objects_of(p, name):
    return p.check()["types"].get(name, 0)


# -- schema ---------------------------------------------------------------------------
def test_descriptors_need_names_and_types():
    with pytest.raises(SchemaError):
        List("not a name")
    with pytest.raises(SchemaError):
        Dict("D")[Storage]  # one type for two
    assert repr(List("L")) == "List('L')"

    class NoTypes(Storage):
        def populateSchema(self):
            self.define(List("L"))
    with pytest.raises(SchemaError, match="needs its element types"):
        NoTypes(None)


def test_keys_must_be_numbers_or_strings():
    class BadKeys(Storage):
        def populateSchema(self):
            class Agent(self.schema.Structure):
                age = self.schema.Int
            self.define(Dict("D")[Agent, self.schema.Int])
    with pytest.raises(SchemaError, match="keys must be numbers, ByteString or String"):
        BadKeys(None)


def test_define_outside_populate_schema_is_refused(store):
    with pytest.raises(SchemaError):
        store.define(List("Late")[store.schema.Int])


def test_reopen_binds_and_bare_open_builds_collection_classes(tmp_path):
    path = tmp_path / "s.ps"
    with Store(path) as p:
        p.root.matrix = [[1, 2], [3]]
        p.root.words = {"b": [[1]], "a": []}
    with Storage(path) as bare:
        matrix = bare.root.matrix
        assert type(matrix).__name__ == "Matrix" and matrix == [[1, 2], [3]]
        assert list(bare.root.words) == ["a", "b"]
        assert bare.root.words["b"][0] == [1]
    with Store(path) as p:
        assert p.root.matrix[1] == [3]


def test_schema_mismatch_of_a_collection_is_named(tmp_path):
    path = tmp_path / "s.ps"
    Store(path).close()

    class Changed(Storage):
        def populateSchema(self):
            s = self.schema

            class Agent(s.Structure):
                name = s.ByteString
                age = s.Int
            Ints = self.define(List("Ints")[s.Float])  # was Int
            Matrix = self.define(List("Matrix")[Ints])
            self.define(Dict("ByName")[s.ByteString, Agent])
            self.define(Dict("Counts")[s.String, s.Int])
            self.define(Set("Tags")[s.String])
            self.define(SortedDict("ByAge")[s.Int, Agent])
            self.define(SortedDict("Words")[s.String, Matrix])

            class Root(s.Structure):
                ints = Ints
                matrix = Matrix
                by_name = self.schema.ByName
                counts = self.schema.Counts
                tags = self.schema.Tags
                by_age = self.schema.ByAge
                words = self.schema.Words
    before = path.read_bytes()
    with pytest.raises(SchemaError, match=r"Ints is a list of \(Float\) in Python but a list of \(Int\)"):
        Changed(path)
    assert path.read_bytes() == before


# -- freeing ----------------------------------------------------------------------------
def test_dropping_nested_collections_frees_everything(store):
    p = store
    p.root  # created on first use
    baseline = p.check()["objects"]
    p.root.matrix = [[i, i + 1] for i in range(50)]
    p.root.words = {f"w{i}": [[i]] for i in range(40)}
    p.root.by_name = {b"x%d" % i: p.schema.Agent(age=i) for i in range(30)}
    p.commit()
    assert p.check()["objects"] > baseline + 100
    p.root.matrix = None
    p.root.words = None
    p.root.by_name = None
    p.commit()
    summary = p.check()
    assert summary["objects"] == baseline, summary["types"]


def test_shared_and_interned_objects_survive_removal(store):
    p = store
    agent = p.schema.Agent(age=7)
    tag = p.stringRegistry.get("kept")
    p.root.by_age = {7: agent}
    p.root.by_name = {b"seven": agent}
    p.root.tags = {tag, "dropped"}
    del agent
    del p.root.by_age[7]
    p.root.tags.clear()
    p.commit()
    assert p.root.by_name[b"seven"].age == 7
    assert "kept" in p.stringRegistry
    types = p.check()["types"]
    assert types["Agent"] == 1
    assert types.get("String", 0) == 1  # only the interned one


def test_sorted_string_keys_hold_references_in_separators(store):
    p = store
    p.root.words = {}
    words = p.root.words
    for i in range(300):
        words[f"{i:05d}"] = None
        p.check()
    for i in range(0, 300, 3):
        del words[f"{i:05d}"]
    p.commit()
    p.check()
    assert list(words) == [f"{i:05d}" for i in range(300) if i % 3]
    words.clear()
    p.commit()
    assert objects_of(p, "String") == 0
    assert objects_of(p, "(tree nodes)") == 0


def test_tree_height_and_peekitem_at_scale(store):
    p = store
    p.root.by_age = {}
    tree = p.root.by_age
    keys = list(range(0, 6000, 2))
    for k in reversed(keys):
        tree[k] = None
    p.check()
    assert [tree.peekitem(i)[0] for i in (0, 1, 1000, -1)] == [0, 2, 2000, 5998]
    assert tree.bisect_left(1001) == 501 and tree.bisect_right(1000) == 501
    assert list(tree.irange(10, 20, reverse=True)) == [20, 18, 16, 14, 12, 10]
    assert list(tree.irange(11, 19, inclusive=(False, False))) == [12, 14, 16, 18]
    for k in keys[::2]:
        del tree[k]
    p.check()
    assert list(tree) == keys[1::2]


# -- check() finds damage -------------------------------------------------------------
def _damage(p, offset, fmt, value):
    struct.pack_into(fmt, p._heap.mapping.view(offset, struct.calcsize(fmt)), 0, value)
    p._heap.views.clear()


def test_check_finds_a_wrong_list_count(store):
    p = store
    p.root.ints = [1, 2, 3]
    offset = p.root.ints._ps_offset
    _damage(p, offset + 8, "<Q", 2)
    with pytest.raises(CorruptStorageError, match="cells after the last element"):
        p.check()


def test_check_finds_a_misplaced_hash_entry(store):
    p = store
    p.root.counts = {"a": 1, "b": 2}
    table = p.root.counts._ps_body
    nslots = F.TABLE.unpack_from(p._heap.mapping.view(table, F.TABLE.size))[4]
    entries_at = table + F.TABLE.size + -(-4 * nslots // 8) * 8  # the uint32 slots, padded to 8 bytes
    _damage(p, entries_at, "<I", 12345)  # the stored hash of the first entry
    with pytest.raises(CorruptStorageError, match="stored hash"):
        p.check()


def test_check_finds_unordered_tree_keys(store):
    p = store
    p.root.by_age = {1: None, 2: None, 3: None}
    leaf = p.root.by_age._ps_body
    _damage(p, leaf + F.NODE.size, "<q", 5)
    with pytest.raises(CorruptStorageError, match="not in increasing order"):
        p.check()


def test_check_finds_a_wrong_subtree_count(store):
    p = store
    p.root.by_age = {i: None for i in range(50)}
    root = p.root.by_age._ps_node(p.root.by_age._ps_body)
    assert not root.leaf
    root.counts[0] += 1
    with pytest.raises(CorruptStorageError, match="holds .* items, the node says"):
        p.check()


def test_a_damaged_body_offset_is_an_error_not_a_crash(store):
    p = store
    p.root.ints = [1, 2, 3]
    ints = p.root.ints
    _damage(p, ints._ps_offset + 16, "<Q", 1 << 40)
    with pytest.raises(CorruptStorageError):
        ints[0]
    with pytest.raises(CorruptStorageError):
        p.check()


# -- proxies and the command line -----------------------------------------------------
def test_repr_and_closed_collections(tmp_path):
    p = Store(tmp_path / "s.ps")
    p.root.tags = {"a"}
    tags = p.root.tags
    assert repr(tags).startswith("<persistent Tags object @offset 0x")
    p.close()
    with pytest.raises(StorageClosedError):
        tags | {"b"}
    with pytest.raises(StorageClosedError):
        len(tags)


def test_info_lists_collection_types(tmp_path):
    path = tmp_path / "s.ps"
    Store(path).close()
    lines = []
    info(str(path), out=lines.append)
    text = "\n".join(lines)
    assert "Matrix = List[Ints]" in text
    assert "ByName = Dict[ByteString, Agent]" in text
    assert "Words = SortedDict[String, Matrix]" in text


def test_collections_module_is_importable_alongside_the_stdlib_one():
    code = "import collections, permastruct.collections as pc; print(collections.OrderedDict.__name__, pc.List.kind)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["OrderedDict", "list"]
    assert C.KINDS == ("list", "dict", "set", "sorteddict")


# -- Dict and Set: short string keys inline in the table entries ------------------------------
def _entry_at(collection, key_index):
    """The file offset of live entry ``key_index`` (in insertion order, no deletions) of a Dict or Set."""
    table = collection._ps_table()
    return collection._ps_body + table.entries_at + key_index * type(collection)._ps_esize


def test_short_string_keys_are_inline_and_make_no_string_objects(store):
    p = store
    before = objects_of(p, "ByteString")
    p.root.by_name = {b"": None, b"M": None, b"x" * 16: None}
    p.commit()
    assert objects_of(p, "ByteString") == before  # all three inline: no string object
    p.root.by_name[b"y" * 17] = None  # one byte past KEY_INLINE: a string object
    p.commit()
    assert objects_of(p, "ByteString") == before + 1
    keys = list(p.root.by_name)
    assert keys == [b"", b"M", b"x" * 16, b"y" * 17] and all(type(k) is bytes for k in keys)
    tags = [_entry_tag(p.root.by_name, i) for i in range(4)]
    assert tags == [F.TAG_INLINE, F.TAG_INLINE + 1, F.TAG_INLINE + 16, F.TAG_REF]
    del p.root.by_name[b"y" * 17]
    p.commit()
    assert objects_of(p, "ByteString") == before  # the long key's object went with it
    p.check()


def _entry_tag(collection, index):
    return struct.unpack_from("<I", type(collection)._heap.mapping.view(_entry_at(collection, index) + 4, 4))[0]


def test_string_keys_count_their_utf8_bytes(store):
    p = store
    p.root.counts = {"é" * 8: 1, "é" * 9: 2, "🐍" * 4: 3}  # 16, 18 and 16 bytes of UTF-8
    counts = p.root.counts
    assert [_entry_tag(counts, i) for i in range(3)] == [F.TAG_INLINE + 16, F.TAG_REF, F.TAG_INLINE + 16]
    assert counts == {"é" * 8: 1, "é" * 9: 2, "🐍" * 4: 3} and all(type(k) is str for k in counts)
    assert counts["é" * 9] == 2 and "é" * 8 in counts and "é" * 7 not in counts
    p.commit()
    p.check()


def test_every_kind_of_key_finds_an_inline_entry(store):
    p = store
    p.root.by_name = {b"Bond": None, b"a key longer than inline": None}
    by_name = p.root.by_name
    interned = p.stringRegistry.get(b"Bond")
    for key in (b"Bond", memoryview(b"Bond"), p.schema.ByteString(b"Bond"), interned):
        assert key in by_name and by_name[key] is None
    for key in (b"a key longer than inline", memoryview(b"a key longer than inline"),
                p.stringRegistry.get(b"a key longer than inline")):
        assert key in by_name and by_name[key] is None
    for key in ("Bond", b"Bon", b"Bond\x00", b"", b"Bond" * 5, 7):
        assert key not in by_name
        with pytest.raises(KeyError):
            by_name[key]
    p.root.tags = {"spy", "a tag longer than sixteen bytes"}
    assert "spy" in p.root.tags and b"spy" not in p.root.tags and "a tag longer than sixteen bytes" in p.root.tags
    p.check()


def test_an_interned_key_is_copied_inline_when_short(store):
    p = store
    short, long = p.stringRegistry.get("spy"), p.stringRegistry.get("a tag longer than sixteen bytes")
    refs = p._heap.refcount(short._ps_oid), p._heap.refcount(long._ps_oid)
    p.root.tags = {short, long}
    assert p._heap.refcount(short._ps_oid) == refs[0]  # inline: the string object is not referenced
    assert p._heap.refcount(long._ps_oid) == refs[1] + 1  # by reference: one more
    assert set(p.root.tags) == {"spy", "a tag longer than sixteen bytes"}
    p.root.tags.clear()
    assert p._heap.refcount(long._ps_oid) == refs[1]
    p.commit()
    p.check()


def test_inline_keys_survive_rebuilds_deletes_and_reopen(tmp_path):
    path = tmp_path / "k.ps"
    with Store(path, pageSize=256) as p:
        p.root.by_name = {}
        d = p.root.by_name
        for i in range(500):
            d[b"k%d" % i if i % 3 else b"a longer key number %d" % i] = None
        for i in range(0, 500, 2):
            del d[b"k%d" % i if i % 3 else b"a longer key number %d" % i]
        p.check()
    with Store(path) as p:
        d = p.root.by_name
        expected = [b"k%d" % i if i % 3 else b"a longer key number %d" % i for i in range(1, 500, 2)]
        assert list(d) == expected and all(k in d for k in expected) and len(d) == 250
        p.check()


def test_check_finds_damaged_inline_keys(store):
    p = store
    p.root.counts = {"ab": 1}
    at = _entry_at(p.root.counts, 0)
    _damage(p, at + 8 + 5, "<B", 1)  # a byte after the 2-byte key
    with pytest.raises(CorruptStorageError, match="bytes after its 2-byte inline key are not zero"):
        p.check()
    _damage(p, at + 8 + 5, "<B", 0)
    _damage(p, at + 4, "<I", F.TAG_INLINE + F.KEY_INLINE + 1)  # a length past the 16 bytes
    with pytest.raises(CorruptStorageError, match="neither a reference"):
        p.check()
    with pytest.raises(CorruptStorageError, match="has the tag"):
        list(p.root.counts)
    _damage(p, at + 4, "<I", F.TAG_INLINE + 2)
    _damage(p, at + 8, "<H", 0xFFFF)  # not UTF-8
    with pytest.raises(CorruptStorageError, match="not UTF-8"):
        p.check()
    with pytest.raises(CorruptStorageError, match="not UTF-8"):
        list(p.root.counts)


def test_check_finds_a_short_key_stored_by_reference(store):
    p = store
    p.root.counts = {"a key longer than inline": 1}
    short = p.schema.String("ab")
    p.root.tags = {"x"}
    at = _entry_at(p.root.counts, 0)
    _damage(p, at + 8, "<Q", short._ps_oid)  # a reference to a 2-byte string: a lookup would miss it
    p._heap.incref(short._ps_oid)
    with pytest.raises(CorruptStorageError, match="a key of 2 bytes is a reference"):
        p.check()


def test_a_file_of_the_previous_format_version_is_refused_unchanged(tmp_path):
    path = tmp_path / "old.ps"
    with Store(path) as p:
        p.root.counts = {"a": 1}
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, F.FORMAT_VERSION - 1)
    struct.pack_into("<I", data, 60, __import__("zlib").crc32(bytes(data[:60])))
    path.write_bytes(bytes(data))
    from permastruct import IncompatibleFormatError
    for cls in (Store, Storage):
        with pytest.raises(IncompatibleFormatError, match=f"format version {F.FORMAT_VERSION - 1}, older than "
                                                          "this permastruct's .*dump --json FILE.*load FILE.json NEWFILE"):
            cls(path)
    assert path.read_bytes() == bytes(data)



# -- the lookup made per class: every key the general way finds, it finds ----------------------
Lookups = lookups_storage()


def test_lookups_agree_with_a_dict_through_deletes_and_rebuilds(lookups):
    import random
    p = lookups
    rng = random.Random(5)
    p.root.by_bytes, p.root.by_text, p.root.by_int, p.root.by_count = {}, {}, {}, {}
    cases = [
        (p.root.by_bytes, lambda i: b"k%d" % i if i % 5 else b"a key longer than sixteen %d" % i,
         [b"", b"k", memoryview(b"k2"), "k3", 3, b"k1\x00", b"x" * 16]),
        (p.root.by_text, lambda i: "t%d" % i if i % 5 else "é" * (i % 12),
         ["", "\ud800", "t1\x00", b"t1", 1.5, ("t1",), "é" * 9]),
        (p.root.by_int, lambda i: rng.randrange(-(1 << 63), 1 << 63) if i % 7 == 0 else i * 2 - 300,
         [True, False, 1.0, 2.0, 2.5, 1 << 63, -(1 << 63) - 1, 1 << 70, float("nan"), "1", None]),
        (p.root.by_count, lambda i: (1 << 64) - 1 - i if i % 3 == 0 else i,
         [-1, 1 << 64, True, 4.0, (1 << 64) - 1]),
    ]
    for mapping, make, odd in cases:
        reference = {}
        for i in range(400):
            key = make(i)
            value = i if mapping is not p.root.by_count else b"v%d" % i
            mapping[key] = value
            reference[key] = value
            if i % 3 == 0 and reference:  # deletes leave tombstones on the probe paths
                gone = rng.choice(list(reference))
                del mapping[gone], reference[gone]
        assert_lookups_agree(mapping, reference, list(reference) + [make(i) for i in range(400, 450)] + odd)
        for key in list(reference)[: len(reference) // 2]:  # shrink: tables are rebuilt smaller
            del mapping[key], reference[key]
        assert_lookups_agree(mapping, reference, list(reference) + odd)
    p.root.by_real = {1.5: 1, 2.0: 2}  # a key type without the made lookup goes the general way
    assert_lookups_agree(p.root.by_real, {1.5: 1, 2.0: 2, 2: 2, True: KeyError}, [1.5, 2.0, 2, True, 3])
    p.root.int_set = {-128, 0, 127}
    assert all(k in p.root.int_set for k in (-128, 0, 127, 0.0, False))
    assert not any(k in p.root.int_set for k in (128, -129, 1, "0", 0.5))
    p.commit()
    p.check()



def test_stores_agree_with_a_dict_through_deletes_overwrites_and_bulk_updates(lookups):
    import random
    p = lookups
    rng = random.Random(11)
    p.root.by_bytes, p.root.by_int = {}, {}
    makers = [(p.root.by_bytes, lambda i: b"k%d" % i if i % 4 else b"a key longer than sixteen %d" % i),
              (p.root.by_int, lambda i: i * 7 - 500 if i % 9 else (1 << 63) - 1 - i)]
    for mapping, make in makers:
        reference = {}
        for step in range(1500):
            i = rng.randrange(300)
            action = rng.random()
            if action < 0.55:
                value = rng.choice([i, -i, True, (1 << 63) - 1, -(1 << 63)])
                mapping[make(i)] = value
                reference[make(i)] = int(value)
            elif action < 0.8 and reference:
                gone = rng.choice(list(reference))
                del mapping[gone], reference[gone]
            elif action < 0.9:  # a bulk update, some keys new and some present, in one order
                items = [(make(rng.randrange(300)), rng.randrange(100)) for _ in range(rng.randrange(1, 40))]
                mapping.update(items)
                reference.update(items)
            else:
                bad = rng.choice([1 << 63, -(1 << 63) - 1, 1.5, "7", None])
                before = list(mapping.items())
                with pytest.raises((TypeError, OverflowError)):
                    mapping[make(i)] = bad
                with pytest.raises((TypeError, OverflowError)):
                    mapping.update([(make(i + 1000), 1), (make(i), bad)])
                assert list(mapping.items()) == before
            if step % 250 == 0:
                assert list(mapping.items()) == list(reference.items())  # insertion order kept
                p.check()
        assert list(mapping.items()) == list(reference.items())
    p.commit()
    p.check()



@pytest.mark.parametrize("case", ["short", "sixteen", "mixed", "long", "duplicates", "ints", "sized"])
def test_an_update_into_an_empty_dict_is_written_at_once_and_agrees_with_a_dict(lookups, case):
    p = lookups
    p.root.by_bytes, p.root.by_int = {}, {}
    target = p.root.by_int if case == "ints" else p.root.by_bytes
    if case == "sized":
        target = p.root.by_bytes = p.schema.ByBytes(size=500)  # an empty table made beforehand
    pairs = {
        "short": [(b"k%d" % i, i) for i in range(300)],
        "sixteen": [(b"%016d" % i, -i) for i in range(300)],
        "mixed": [(b"x" * (i % 17), i) for i in range(17)] + [(b"k%d" % i, True) for i in range(200)],
        "long": [(b"k%d" % i if i % 2 else b"a key longer than sixteen %d" % i, i) for i in range(300)],
        "duplicates": [(b"k%d" % (i % 50), i) for i in range(300)],
        "ints": [((1 << 63) - 1 - i if i % 2 else -i * 977, i) for i in range(300)],
        "sized": [(b"k%d" % i, i) for i in range(400)],
    }[case]
    target.update(pairs)
    reference = dict(pairs)
    assert list(target.items()) == list(reference.items())
    assert_lookups_agree(target, reference, list(reference) + [b"k999", b"", -1, 1 << 63])
    p.check()
    target[pairs[0][0]] = 5  # the table takes single changes as any other
    del target[pairs[-1][0]]
    reference[pairs[0][0]] = 5
    del reference[pairs[-1][0]]
    assert list(target.items()) == list(reference.items())
    p.commit()
    p.check()


def test_a_bad_pair_in_an_update_of_an_empty_dict_stores_nothing(lookups):
    p = lookups
    p.root.by_bytes, p.root.by_int = {}, {}
    good = [(b"k%d" % i, i) for i in range(100)]
    for bad, error in (((b"x", 1 << 63), OverflowError), ((b"x", 1.5), TypeError), (("x", 1), TypeError),
                       ((b"x", None), TypeError)):
        with pytest.raises(error):
            p.root.by_bytes.update(good + [bad])
        assert len(p.root.by_bytes) == 0
    with pytest.raises(OverflowError):
        p.root.by_int.update([(1, 1), (1 << 63, 2)])
    with pytest.raises(ValueError, match="has length 3"):
        p.root.by_int.update([(1, 1), (2, 2, 2)])
    assert len(p.root.by_int) == 0
    p.check()


def test_a_store_in_a_read_only_or_busy_storage_is_refused(tmp_path):
    import threading
    from permastruct import ConcurrentUseError, ReadOnlyError
    path = tmp_path / "r.ps"
    with Lookups(path) as p:
        p.root.by_bytes = {b"a": 1}
        p.root.by_int = {1: 1}
        heap = p._heap
        heap._changing = threading.get_ident() + 1  # another thread is in the middle of a change
        for mapping, key in ((p.root.by_bytes, b"a"), (p.root.by_int, 1)):
            for new_key in (key, key * 2):
                with pytest.raises(ConcurrentUseError):
                    mapping[new_key] = 2
        heap._changing = 0
        assert dict(p.root.by_bytes) == {b"a": 1} and dict(p.root.by_int) == {1: 1}
    with Lookups(path, readonly=True) as p:
        for mapping, key in ((p.root.by_bytes, b"a"), (p.root.by_int, 1)):
            for new_key in (key, key * 2):
                with pytest.raises(ReadOnlyError):
                    mapping[new_key] = 2


def _index_at(collection, slot):
    return collection._ps_body + F.TABLE.size + 4 * slot


def test_a_damaged_index_fails_the_lookup_not_the_process(lookups):
    p = lookups
    p.root.by_bytes = {b"a": 1}
    p.root.by_int = {5: 1}
    for mapping, key in ((p.root.by_bytes, b"a"), (p.root.by_int, 5)):
        table = mapping._ps_table()
        home = next(slot for slot, index in enumerate(table.indices) if index)
        _damage(p, _index_at(mapping, home), "<I", 1000)  # names an entry past the capacity
        with pytest.raises(CorruptStorageError, match="names entry 999"):
            mapping[key]
        with pytest.raises(CorruptStorageError, match="names entry 999"):
            key in mapping


def test_a_table_without_an_empty_index_ends_its_probe(lookups):
    p = lookups
    p.root.by_bytes = {b"a": 1}
    p.root.by_int = {5: 1}
    for mapping, key, absent in ((p.root.by_bytes, b"a", b"b"), (p.root.by_int, 5, 6)):
        table = mapping._ps_table()
        for slot, index in enumerate(table.indices):
            if not index:
                _damage(p, _index_at(mapping, slot), "<I", F.TABLE_DELETED)
        assert mapping[key] == 1 and key in mapping
        assert absent not in mapping  # every probe wraps around once, then stops
        with pytest.raises(KeyError):
            mapping[absent]
        with pytest.raises(CorruptStorageError, match="slots are in use"):
            p.check()


def _home(mapping, data):
    """The home slot of string key bytes ``data`` in ``mapping``'s table."""
    seed = F.STRING_SEED if type(mapping)._ps_key.string_type == F.T_STRING else F.BYTES_SEED
    return zlib.crc32(data, seed) & mapping._ps_table().mask


def test_a_short_key_is_told_from_entries_whose_bytes_begin_with_it(lookups):
    # the made lookup reads an entry's first len(key) key bytes and its tag, not the stored hash or the
    # zeros after the key: an entry whose bytes begin with the key, or a long key's reference whose
    # bytes equal it, must not be taken for it, even when the probe meets it first
    p = lookups
    long_key = b"a key longer than sixteen bytes"
    p.root.by_bytes = {b"ab\x00": 1, long_key: 2, b"": 3}
    p.root.by_text = {"ab\x00": 1, "a text key longer than sixteen": 2}
    for mapping, stored, probe in ((p.root.by_bytes, b"ab\x00", b"ab"), (p.root.by_bytes, b"", b"\x00"),
                                   (p.root.by_text, "ab\x00", "ab")):
        number = list(mapping).index(stored) + 1
        data = probe.encode() if isinstance(probe, str) else probe
        _damage(p, _index_at(mapping, _home(mapping, data)), "<I", number)  # the probe meets that entry first
        assert probe not in mapping and mapping.get(probe) is None
        with pytest.raises(KeyError):
            mapping[probe]
        assert mapping[stored] == list(mapping.values())[number - 1]
    # a reference's key field: its offset (8 bytes) then zeros
    for mapping, key in ((p.root.by_bytes, long_key), (p.root.by_text, "a text key longer than sixteen")):
        number = list(mapping).index(key) + 1
        entry = mapping._ps_body + mapping._ps_table().entries_at + (number - 1) * type(mapping)._ps_esize
        field = bytes(p._heap.mapping.view(entry + 8, 16))
        assert struct.unpack_from("<I", p._heap.mapping.view(entry + 4, 4))[0] == F.TAG_REF
        for data in (field, field[:8], field.rstrip(b"\x00")):
            try:
                probe = data if mapping is p.root.by_bytes else data.decode()
            except UnicodeDecodeError:
                continue
            _damage(p, _index_at(mapping, _home(mapping, data)), "<I", number)
            assert probe not in mapping
            with pytest.raises(KeyError):
                mapping[probe]
    # a store of the short key makes a new entry; the one its bytes begin with keeps its value
    p.root.by_bytes[b"ab"] = 9
    assert p.root.by_bytes[b"ab"] == 9 and p.root.by_bytes[b"ab\x00"] == 1
    assert len(p.root.by_bytes) == 4


def test_tables_keep_at_most_a_third_of_their_slots_in_use(lookups):
    from permastruct import _hashtable as H
    p = lookups
    p.root.by_bytes, p.root.by_int = {}, {}
    sizes = {"bytes": [], "int": []}
    for i in range(3000):
        p.root.by_bytes[b"k%d" % i] = i
        p.root.by_int[i * 7919] = i
        for name, mapping in (("bytes", p.root.by_bytes), ("int", p.root.by_int)):
            table = mapping._ps_table()
            assert 3 * table.head[4] <= 3 * table.capacity <= table.mask + 1
            if not sizes[name] or sizes[name][-1] != table.mask + 1:
                sizes[name].append(table.mask + 1)
    for grown in sizes.values():  # a small full table grows to four times its slots
        assert grown == [16 << 2 * n for n in range(len(grown))] and grown[-1] == 16384
    nslots, capacity = H._table_shape(1)
    while nslots < 1 << 26:  # from 2^18 slots on, to twice its slots (2^22 for 10^6 keys, not 2^24)
        grown, capacity = H._table_shape(H._room_to_grow(capacity, nslots))
        assert grown == nslots * (4 if nslots < 1 << 18 else 2)
        nslots = grown
    for wanted in (0, 1, 5, 6, 1000, 10 ** 6, H._MAX_ENTRIES):
        nslots, capacity = H._table_shape(wanted)
        assert nslots & (nslots - 1) == 0 and wanted <= capacity < nslots <= 1 << 32
        assert capacity < F.TABLE_DELETED  # every entry number fits an index
        if nslots < 1 << 32:
            assert 3 * capacity <= nslots
    p.check()


#: short keys whose stored hashes (crc32) are equal: ByteString (two pairs), String
_SAME_HASH_BYTES = (b"c29685295", b"c32060020", b"c29685294", b"c32060021")
_SAME_HASH_TEXT = ("c9085436", "c20020000")


@pytest.mark.parametrize("case", ["new", "same hash", "present", "repeated", "tombstones", "ints", "mixed",
                                  "text"])
def test_an_update_into_a_filled_dict_is_written_at_once_or_item_by_item_and_agrees(lookups, case):
    p = lookups
    for one, other in (_SAME_HASH_BYTES[:2], _SAME_HASH_BYTES[2:]):
        assert zlib.crc32(one, F.BYTES_SEED) == zlib.crc32(other, F.BYTES_SEED)
    assert zlib.crc32(_SAME_HASH_TEXT[0].encode(), F.STRING_SEED) == zlib.crc32(_SAME_HASH_TEXT[1].encode(),
                                                                               F.STRING_SEED)
    first = {"ints": [(i * 31 - 700, i) for i in range(200)],
             "text": [("t%d" % i, i) for i in range(200)] + [(_SAME_HASH_TEXT[0], -1)],
             "same hash": [(b"k%d" % i, i) for i in range(200)] + [(_SAME_HASH_BYTES[0], -1)]}.get(
        case, [(b"k%d" % i, i) for i in range(200)])
    second = {
        "new": [(b"n%d" % i, i) for i in range(300)],
        "same hash": [(_SAME_HASH_BYTES[1], -2), (_SAME_HASH_BYTES[2], -3)] + [(b"n%d" % i, i) for i in range(300)]
        + [(_SAME_HASH_BYTES[3], -4)],  # one hash as a key in the table, one as a key before it in the update
        "present": [(b"n%d" % i, i) for i in range(300)] + [(b"k7", 70)],
        "repeated": [(b"n%d" % (i % 40), i) for i in range(300)],
        "tombstones": [(b"n%d" % i, i) for i in range(300)],
        "ints": [(i * 37 + 10 ** 6, i) for i in range(300)] + [((1 << 63) - 1, 5), (-(1 << 63), 6)],
        "mixed": [(b"x" * (i % 17), i) for i in range(17)] + [(b"a key longer than sixteen", 1)],
        "text": [(_SAME_HASH_TEXT[1], -2)] + [("n%d" % i, i) for i in range(300)] + [("é" * 8, 8)],
    }[case]
    if case == "ints":
        p.root.by_int = {}
        target = p.root.by_int
    elif case == "text":
        p.root.by_text = {}
        target = p.root.by_text
    else:
        p.root.by_bytes = p.schema.ByBytes(size=400) if case == "tombstones" else {}  # (no shrink, no growth)
        target = p.root.by_bytes
    filled = []
    fill = type(target)._ps_fill_columns
    type(target)._ps_fill_columns = lambda self, *args: filled.append(fill(self, *args)) or filled[-1]
    target.update(first)
    reference = dict(first)
    if case == "tombstones":
        for key, _ in first[::3]:
            del target[key], reference[key]
    p.check()
    target.update(second)
    del type(target)._ps_fill_columns  # (the class's own, inherited, again)
    reference.update(second)
    # written at once: into the empty table, and new keys, distinct, short, into a table without tombstones
    # (String keys are stored item by item)
    assert filled == ([] if case == "text" else [True, case in ("new", "same hash", "ints")])
    assert list(target.items()) == list(reference.items())
    assert_lookups_agree(target, reference, list(reference) + [b"zz", "zz", -5, b"", ""])
    p.check()
    p.commit()
    p.check()


def test_a_damaged_index_fails_a_bulk_update_not_the_process(lookups):
    p = lookups
    p.root.by_bytes = p.schema.ByBytes(size=100)  # no rebuild before the update: its index is read
    p.root.by_bytes.update([(b"a", 1)])
    table = p.root.by_bytes._ps_table()
    slots = [slot for slot, index in enumerate(table.indices) if not index]
    for slot in slots:
        _damage(p, _index_at(p.root.by_bytes, slot), "<I", 1000)  # every empty index names entry 999
    with pytest.raises(CorruptStorageError, match="names entry 999"):
        p.root.by_bytes.update([(b"k%d" % i, i) for i in range(20)])


# -- a proxy keeps its table's view (_ps_tv): whatever frees, moves or takes back a table retires it --
_KEPT_CASES = {  # (attribute of Lookups' root, key of entry i, value of entry i)
    "bytes": ("by_bytes", lambda i: b"k%d" % i, lambda i: i),
    "text": ("by_text", lambda i: "t%d" % i, lambda i: i),
    "int": ("by_int", lambda i: i * 3 - 7, lambda i: i),
}


def _fill(mapping, keys, value, first, last):
    for i in range(first, last):
        mapping[keys(i)] = value(i)
    return {keys(i): value(i) for i in range(first, last)}


def _kept(mapping):
    """The view the proxy keeps, which must be live and its table's."""
    view = mapping._ps_tv
    assert view.fast is not None
    return view


@pytest.mark.parametrize("case", sorted(_KEPT_CASES))
def test_a_kept_view_is_retired_when_its_table_is_freed_and_its_place_taken(lookups, case):
    """Cleared, or grown into a new table: the old place goes to another Dict's table of the same size,
    and the first Dict's lookups (every way of asking, and a store) never read that table."""
    name, keys, value = _KEPT_CASES[case]
    p = lookups
    other_name = "by_bytes" if name != "by_bytes" else "by_text"
    _, other_keys, _ = _KEPT_CASES["bytes" if name != "by_bytes" else "text"]
    setattr(p.root, name, {}), setattr(p.root, other_name, {})
    d, other = getattr(p.root, name), getattr(p.root, other_name)
    reference = _fill(d, keys, value, 0, 3)
    assert_lookups_agree(d, reference, list(reference))
    old, kept = d._ps_body, _kept(d)
    d.clear()
    assert kept.fast is None and d._ps_body == 0
    for i in range(3):  # the same shape of table, in the place just freed
        other[other_keys(i)] = 1000 + i
    assert other._ps_body == old  # (the hazard itself: without it this test would prove nothing)
    assert_lookups_agree(d, {}, list(reference))
    assert len(d) == 0 and dict(d) == {}
    # grown: its first table is freed, and taken by a third table of that shape
    reference = _fill(d, keys, value, 0, 3)
    first, kept = d._ps_body, _kept(d)
    reference.update(_fill(d, keys, value, 3, 200))
    assert d._ps_body != first and kept.fast is None and _kept(d) is not kept
    del getattr(p.root, other_name)[other_keys(0)]
    setattr(p.root, other_name, {other_keys(i): 2000 + i for i in range(3)})
    assert_lookups_agree(d, reference, list(reference) + [keys(500)])
    d[keys(0)] = -1
    reference[keys(0)] = -1
    assert_lookups_agree(d, reference, list(reference))
    p.commit()
    p.check()


@pytest.mark.parametrize("case", sorted(_KEPT_CASES))
@pytest.mark.parametrize("how", ["rollback", "savepoint", "undo"])
def test_a_kept_view_follows_a_rollback_or_undo_to_the_table_it_restores(tmp_path, case, how):
    """A Dict grown (and looked up) in a transaction that is then taken back reads its restored table,
    even when its proxy kept the view of the table the change made."""
    name, keys, value = _KEPT_CASES[case]
    p = Lookups(tmp_path / "l.ps", pageSize=256, history=5)
    setattr(p.root, name, {})
    d = getattr(p.root, name)
    reference = _fill(d, keys, value, 0, 5)
    p.commit()
    assert_lookups_agree(d, reference, list(reference))
    committed = d._ps_body
    grown = dict(reference, **{})
    if how == "savepoint":
        with p.transaction():
            with pytest.raises(ZeroDivisionError), p.transaction():
                grown.update(_fill(d, keys, value, 5, 300))
                assert d._ps_body != committed
                assert_lookups_agree(d, grown, list(grown))
                1 / 0
            assert d._ps_body == committed
            assert_lookups_agree(d, reference, list(grown))
    else:
        grown.update(_fill(d, keys, value, 5, 300))
        assert d._ps_body != committed
        assert_lookups_agree(d, grown, list(grown))
        if how == "rollback":
            p.rollback()
        else:
            p.commit()
            p.undo(p.last_transaction)
    assert d._ps_body == committed
    assert_lookups_agree(d, reference, list(grown))
    d[keys(1)] = 77  # a store through the kept view, which must be the restored table's
    reference[keys(1)] = 77
    assert_lookups_agree(d, reference, list(grown))
    p.commit()
    p.check()
    p.close()
    with Lookups(tmp_path / "l.ps") as q:
        assert_lookups_agree(getattr(q.root, name), reference, list(grown))


def test_a_kept_view_follows_a_pack_that_moves_its_table(tmp_path):
    p = Lookups(tmp_path / "l.ps", pageSize=256)
    p.root.by_text = {"t%d" % i: i for i in range(6000)}  # space to give back before the table
    p.commit()
    p.root.by_bytes = {}
    d = p.root.by_bytes
    for i in range(1000):  # grown one key at a time: its last table goes at the end of the file
        d[b"k%d" % i] = i
    p.commit()
    reference = dict(d)
    assert_lookups_agree(d, reference, list(reference))
    before, kept = d._ps_body, _kept(d)
    p.root.by_text = None
    p.commit()
    p.pack()
    assert d._ps_body < before and kept.fast is None  # moved down into the space given back
    assert_lookups_agree(d, reference, list(reference) + [b"k9"])
    p.root.by_text = {"t%d" % i: i for i in range(3)}  # (may take the old place)
    assert_lookups_agree(d, reference, list(reference) + [b"k9"])
    d[b"k9"] = 9
    reference[b"k9"] = 9
    assert_lookups_agree(d, reference, list(reference))
    p.commit()
    p.check()
    p.close()


def test_a_readers_kept_view_follows_the_writers_commits(tmp_path):
    path = tmp_path / "l.ps"
    w = Lookups(path, pageSize=256)
    w.root.by_bytes = {b"k%d" % i: i for i in range(3)}
    w.commit()
    r = Lookups(path, readonly=True)
    d = r.root.by_bytes
    assert_lookups_agree(d, {b"k%d" % i: i for i in range(3)}, [b"k0", b"k1", b"k2"])
    old, kept = d._ps_body, _kept(d)
    w.root.by_bytes.clear()
    w.root.by_text = {"t%d" % i: 1000 + i for i in range(3)}  # its table in the place just freed
    assert w.root.by_text._ps_body == old
    w.commit()
    assert_lookups_agree(d, {b"k%d" % i: i for i in range(3)}, [b"k0", b"k1", b"k2"])  # still the reader's snapshot
    assert r.refresh() is True
    assert kept.fast is None
    assert_lookups_agree(d, {}, [b"k0", b"k1", b"k2"])
    assert_lookups_agree(r.root.by_text, {"t%d" % i: 1000 + i for i in range(3)}, ["t0", "t1", "t2"])
    w.root.by_bytes.update({b"k%d" % i: -i for i in range(100)})
    w.commit()
    assert r.refresh() is True
    assert_lookups_agree(d, {b"k%d" % i: -i for i in range(100)}, [b"k%d" % i for i in range(101)])
    r.close()
    w.close()


# -- SortedDict scans a leaf at a time; bulk update of Dict and SortedDict ----------------------
class Scans(Storage):
    def populateSchema(self):
        s = self.schema

        class Agent(s.Structure):
            age = s.Int

        self.define(SortedDict("IntToInt")[s.Int, s.Int])
        self.define(SortedDict("Words")[s.String, Agent])
        self.define(SortedDict("Reals")[s.Float, s.Float])
        self.define(Dict("Counts")[s.ByteString, s.Int])
        self.define(Dict("People")[s.String, Agent])

        class Root(s.Structure):
            ints = self.schema.IntToInt
            words = self.schema.Words
            reals = self.schema.Reals
            counts = self.schema.Counts
            people = self.schema.People


@pytest.fixture
def scans(tmp_path):
    p = Scans(tmp_path / "scans.ps", pageSize=256)  # nodes of 8 keys: many leaves and levels
    yield p
    p.close()


def _expected_range(reference, low, high, inclusive, reverse):
    keys = sorted(k for k in reference
                  if (low is None or (k >= low if inclusive[0] else k > low))
                  and (high is None or (k <= high if inclusive[1] else k < high)))
    return [(k, reference[k]) for k in (reversed(keys) if reverse else keys)]


def test_irange_items_matches_irange_and_lookups(scans):
    import random
    p = scans
    rng = random.Random(7)
    reference = {rng.randrange(-5000, 5000): rng.randrange(10 ** 9) for _ in range(1500)}
    p.root.ints = reference
    sd = p.root.ints
    assert list(sd.items()) == sorted(reference.items()) and list(sd.values()) == [v for _, v in sorted(reference.items())]
    for _ in range(200):
        low, high = sorted(rng.randrange(-6000, 6000) for _ in range(2))
        low = None if rng.random() < 0.1 else low
        high = None if rng.random() < 0.1 else high
        inclusive = (rng.random() < 0.5, rng.random() < 0.5)
        reverse = rng.random() < 0.5
        expected = _expected_range(reference, low, high, inclusive, reverse)
        assert list(sd.irange_items(low, high, inclusive, reverse)) == expected
        assert list(sd.irange(low, high, inclusive, reverse)) == [k for k, _ in expected]
    assert list(sd.irange_items(10 ** 6, None)) == [] and list(p.schema.IntToInt().irange_items()) == []
    with pytest.raises(TypeError):
        sd.irange_items("a", 5)
    p.check()



def test_ranges_bounded_on_keys_at_leaf_edges(scans):
    """Bounds equal to keys, next to them, equal to each other, at the first and last keys of leaves."""
    p = scans
    keys = list(range(0, 600, 2))
    p.root.ints = {k: -k for k in keys}
    sd = p.root.ints
    reference = {k: -k for k in keys}
    bounds = [-3, -2, 0, 1, 2, 597, 598, 599, 600] + [k + d for k in range(0, 600, 34) for d in (-1, 0, 1)]
    for low in bounds:
        for high in bounds[::3] + [low]:
            for inclusive in ((True, True), (True, False), (False, True), (False, False)):
                for reverse in (False, True):
                    expected = _expected_range(reference, low, high, inclusive, reverse)
                    assert list(sd.irange_items(low, high, inclusive, reverse)) == expected, (low, high, inclusive)
    for reverse in (False, True):
        assert list(sd.irange(None, 10, reverse=reverse)) == ([10, 8, 6, 4, 2, 0] if reverse else [0, 2, 4, 6, 8, 10])
        assert list(sd.irange(590, None, (False, True), reverse)) == ([598, 596, 594, 592] if reverse
                                                                       else [592, 594, 596, 598])
    p.root.words = {f"w{k:03}": None for k in range(0, 200, 2)}
    words = p.root.words
    assert list(words.irange("w010", "w020", (False, True))) == ["w012", "w014", "w016", "w018", "w020"]
    assert list(words.irange("w011", "w019", reverse=True)) == ["w018", "w016", "w014", "w012"]
    assert list(words.irange("w0001", "w0009")) == [] and list(words.irange("x", None)) == []
    p.check()


def test_irange_items_of_string_keys_and_reference_values(scans):
    p = scans
    p.root.words = {f"w{k:03}": p.schema.Agent(age=k) for k in range(300)}
    pairs = list(p.root.words.irange_items("w100", "w104"))
    assert [str(k) for k, _ in pairs] == ["w100", "w101", "w102", "w103", "w104"]
    assert [agent.age for _, agent in pairs] == [100, 101, 102, 103, 104]
    assert [a.age for a in p.root.words.values()] == list(range(300))
    p.check()


def test_scans_see_a_change_in_size_as_an_error(scans):
    p = scans
    p.root.ints = {k: k for k in range(100)}
    sd = p.root.ints
    for make in (lambda: sd.irange_items(10, 90), lambda: iter(sd.items()), lambda: iter(sd.values()),
                 lambda: reversed(sd), lambda: sd.irange(0, 99, reverse=True)):
        scan = make()
        next(scan)
        sd[1000] = 1
        with pytest.raises(RuntimeError, match="changed size during iteration"):
            list(scan)
        del sd[1000]
    p.check()



def test_a_short_range_or_one_asked_for_before_a_change_sees_it(scans):
    p = scans
    p.root.ints = {k: k for k in range(100)}
    sd = p.root.ints
    for reverse in (False, True):
        scan = sd.irange_items(40, 42, reverse=reverse)  # ends inside one leaf
        next(scan)
        sd[1000] = 1
        with pytest.raises(RuntimeError, match="changed size during iteration"):
            list(scan)
        del sd[1000]
        scan = sd.irange(10, 20, reverse=reverse)  # asked for, then the tree changes, then read
        sd.clear()
        with pytest.raises(RuntimeError, match="changed size during iteration"):
            next(scan)
        sd.update((k, k) for k in range(100))
    p.check()


@pytest.mark.parametrize("count", [1, 2, 7, 8, 9, 17, 64, 65, 500, 3000])
def test_update_builds_an_empty_sorted_dict_bottom_up(scans, count):
    import random
    p = scans
    rng = random.Random(count)
    keys = list(range(count))
    rng.shuffle(keys)
    pairs = [(k, k * 3) for k in keys] + [(k, -k) for k in keys[: count // 3]]  # later pairs win
    reference = dict(pairs)
    p.root.ints = p.schema.IntToInt()
    p.root.ints.update(pairs)
    sd = p.root.ints
    assert len(sd) == count and list(sd.items()) == sorted(reference.items())
    p.check()
    for k in range(0, count, 3):  # the built tree takes single changes as any other
        del sd[k]
        reference.pop(k)
    for k in range(count, count + 50):
        sd[k] = k
        reference[k] = k
    assert list(sd.items()) == sorted(reference.items())
    p.commit()
    p.check()


def test_update_of_strings_builds_a_tree_with_counted_separators(scans):
    p = scans
    p.root.words = p.schema.Words()
    people = {f"a key longer than a few bytes {k:04}": p.schema.Agent(age=k) for k in range(400)}
    p.root.words.update(people)
    assert [str(k) for k in p.root.words] == sorted(people)
    p.commit()
    p.check()  # reference counts of keys (leaf and separators) and values add up
    p.root.words.clear()
    p.commit()
    p.check()


def test_update_of_a_filled_sorted_dict_merges(scans):
    p = scans
    p.root.reals = {float(k): 0.0 for k in range(0, 200, 2)}
    p.root.reals.update((k / 2, k) for k in range(300))
    reference = {float(k): 0.0 for k in range(0, 200, 2)}
    reference.update((k / 2, float(k)) for k in range(300))
    assert list(p.root.reals.items()) == sorted(reference.items())
    p.check()


@pytest.mark.parametrize("bad, error", [(("x", 1), TypeError), ((5, 2 ** 64), OverflowError),
                                        ((5, "one"), TypeError)])
def test_a_bad_item_in_an_update_stores_nothing(scans, bad, error):
    p = scans
    p.root.ints = {1: 1}
    p.root.counts = {b"a": 1}
    p.commit()
    for target, good in ((p.root.ints, [(k, k) for k in range(100)]),
                         (p.root.counts, [(b"%d" % k, k) for k in range(100)])):
        before = dict(target.items())
        key, value = bad
        if target is p.root.counts and not isinstance(key, str):
            key = b"k%d" % key
        with pytest.raises(error):
            target.update(good + [(key, value)])
        assert dict(target.items()) == before
        p.check()
    empty = p.schema.IntToInt()
    with pytest.raises(TypeError):
        empty.update([(k, k) for k in range(100)] + [(1.5, 1)])
    assert len(empty) == 0
    with pytest.raises(ValueError, match="NaN"):
        p.schema.Reals().update([(1.0, 1.0), (float("nan"), 2.0)])
    p.check()


def test_a_bad_reference_value_in_an_update_stores_nothing(scans):
    p = scans
    p.root.people = {"M": p.schema.Agent(age=60)}
    p.root.words = {}
    with pytest.raises(TypeError):
        p.root.people.update({"Bond": p.schema.Agent(age=37), "Q": 42})
    with pytest.raises(TypeError):
        p.root.words.update({"Bond": p.schema.Agent(age=37), "Q": p.schema.IntToInt()})
    assert list(p.root.people) == ["M"] and len(p.root.words) == 0
    p.commit()
    p.check()


def test_dict_update_makes_room_once_and_overwrites(scans):
    p = scans
    p.root.counts = {b"k%d" % k: k for k in range(10)}
    counts = p.root.counts
    rebuilds = []
    real = counts._ps_move  # (every new table: a rebuild, or the move of a bulk update)
    type(counts)._ps_move = lambda self, heap, wanted: rebuilds.append(wanted) or real.__func__(self, heap, wanted)
    try:
        counts.update((b"k%d" % k, -k) for k in range(5000))
    finally:
        del type(counts)._ps_move
    assert len(rebuilds) == 1 and len(counts) == 5000
    assert counts[b"k3"] == -3 and counts[b"k4999"] == -4999 and list(counts)[:3] == [b"k0", b"k1", b"k2"]
    p.root.people = {}
    p.root.people.update({f"person {k}": p.schema.Agent(age=k) for k in range(300)})
    p.root.people.update({"person 7": None})
    assert p.root.people["person 7"] is None and p.root.people["person 8"].age == 8
    p.commit()
    p.check()


# -- Lists of numbers through the buffer protocol; bulk extend ---------------------------------
class Numbers(Storage):
    def populateSchema(self):
        s = self.schema
        self.define(List("Ints")[s.Int])
        self.define(List("Reals")[s.Float])
        self.define(List("Counts")[s.UInt64])
        self.define(List("Bytes")[s.Int8])
        self.define(List("Flags")[s.Bool])
        self.define(List("Singles")[s.Float32])
        self.define(List("Texts")[s.String])

        class Root(s.Structure):
            ints = self.schema.Ints
            reals = self.schema.Reals


def test_memoryview_of_a_list_is_its_cells(tmp_path):
    path = tmp_path / "n.ps"
    with Numbers(path) as p:
        p.root.ints = range(5)
        p.root.reals = [0.5, 1.5]
        with memoryview(p.root.ints) as view:
            assert (view.format, view.itemsize, view.shape, view.readonly) == ("q", 8, (5,), False)
            view[4] = -7
        with memoryview(p.root.reals) as view:
            assert view.format == "d" and view.tolist() == [0.5, 1.5]
            view[0] = 2.25
        assert p.root.ints[:] == [0, 1, 2, 3, -7] and p.root.reals[0] == 2.25
        for kind, values, fmt, readonly in (("Counts", [1, 2 ** 64 - 1], "Q", False), ("Bytes", [-3, 4], "q", True),
                                            ("Flags", [True, False], "q", True), ("Singles", [0.5], "d", True)):
            lst = getattr(p.schema, kind)(values)
            with memoryview(lst) as view:
                assert (view.format, view.readonly) == (fmt, readonly)
                assert view.tolist() == [int(v) if fmt == "q" else v for v in values]
        with memoryview(p.schema.Ints()) as view:
            assert view.tolist() == [] and view.shape == (0,)
        with pytest.raises(TypeError, match="holds references"):
            memoryview(p.schema.Texts(["a"]))
        p.commit()  # what was written through the views is part of the commit
    with Numbers(path, readonly=True) as p:
        assert p.root.ints[:] == [0, 1, 2, 3, -7] and p.root.reals[:] == [2.25, 1.5]
        with memoryview(p.root.ints) as view:
            assert view.readonly
        p.check()


def test_an_exported_list_cannot_move(tmp_path):
    with Numbers(tmp_path / "n.ps", pageSize=256) as p:
        p.root.ints = range(8)
        ints = p.root.ints
        view = memoryview(ints)
        with pytest.raises(BufferError, match="cannot grow"):
            ints.extend(range(100))
        with pytest.raises(BufferError):
            ints.append(8)
        assert ints[:] == list(range(8))
        del ints[1:]  # shrinking keeps the array while it is exported
        ints.clear()
        assert len(ints) == 0 and view[0] == 0  # the view sees the cells, zeroed
        p.check()
        view.release()
        ints.extend(range(100))  # released: the list grows again
        assert ints[:] == list(range(100))
        p.commit()
        p.check()


def test_numpy_asarray_of_a_list_is_zero_copy(tmp_path):
    numpy = pytest.importorskip("numpy")
    with Numbers(tmp_path / "n.ps") as p:
        p.root.ints = range(1000)
        array = numpy.asarray(p.root.ints)
        assert array.dtype == numpy.int64 and array.shape == (1000,) and array.flags.writeable
        array *= 2
        assert p.root.ints[999] == 1998 and int(array.sum()) == 999000
        reals = numpy.asarray(p.schema.Reals([1.0, 2.0]))
        assert reals.dtype == numpy.float64 and reals.tolist() == [1.0, 2.0]
        del array, reals
        p.root.ints.append(1)  # no export left
        p.commit()
        p.check()


def test_extend_of_numbers_is_checked_like_append(tmp_path):
    numpy = pytest.importorskip("numpy")
    with Numbers(tmp_path / "n.ps") as p:
        p.root.ints = [1]
        ints = p.root.ints
        ints.extend(numpy.arange(3))
        ints.extend(x * 10 for x in range(3))
        ints.extend((True, 5))
        ints.extend(b"\x07")  # as list.extend: the byte values
        assert ints[:] == [1, 0, 1, 2, 0, 10, 20, 1, 5, 7]
        for bad, error in (([1, 2.5], TypeError), ([2 ** 63], OverflowError), (["x"], TypeError)):
            with pytest.raises(error, match="Ints.element is Int"):
                ints.extend(bad)
        assert len(ints) == 10
        p.root.reals = []
        p.root.reals.extend([1, 2.5, numpy.float64(3)])
        assert p.root.reals[:] == [1.0, 2.5, 3.0]
        with pytest.raises(TypeError, match="Reals.element is Float"):
            p.root.reals.extend([1.0, "2"])
        assert len(p.root.reals) == 3
        counts = p.schema.Counts()
        with pytest.raises(OverflowError):
            counts.extend([1, -1])
        assert len(counts) == 0
        p.commit()
        p.check()


def test_a_list_of_numbers_is_iterated_a_chunk_at_a_time(tmp_path):
    with Numbers(tmp_path / "n.ps") as p:
        p.root.ints = range(5000)
        ints = p.root.ints
        assert list(ints) == list(range(5000)) and list(reversed(ints)) == list(range(4999, -1, -1))
        assert sum(ints) == sum(range(5000))
        it = iter(ints)
        assert [next(it) for _ in range(20)] == list(range(20))  # into the second chunk
        ints[100] = -1  # a later chunk: seen
        assert next(it) == 20 and -1 in list(it)
        seen = []
        for x in ints:  # appends meanwhile are seen, a chunk later at the latest
            seen.append(x)
            if x == 4999:
                ints.extend([7, 8])
        assert seen[-2:] == [7, 8] and len(seen) == 5002
        grown = p.schema.Ints([1])
        for x in grown:  # the array moves as it grows: each chunk is read from the array of its time
            if x < 3000:
                grown.append(x + 1)
        assert list(grown) == list(range(1, 3001))
        shrunk = p.schema.Ints(range(100))
        out = []
        for x in shrunk:  # a removal is seen from the next chunk on; nothing past the end is read
            out.append(x)
            if x == 0:
                del shrunk[10:]
        assert out == list(range(16))
        for kind, values in (("Flags", [True, False, True]), ("Reals", [0.5, -1.0]), ("Singles", [0.5]),
                             ("Bytes", [-128, 127]), ("Counts", [0, (1 << 64) - 1])):
            made = getattr(p.schema, kind)(values * 700)
            assert list(made) == values * 700 and [type(x) for x in made][:len(values)] == [type(v) for v in values]
            assert list(reversed(made)) == (values * 700)[::-1]
        assert list(p.schema.Texts(["a", "b"])) == ["a", "b"]  # by reference: one element at a time
        p.check()
