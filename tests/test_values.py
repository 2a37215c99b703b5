"""Proxies that act like their values (issue 17, item 4).

String and ByteString proxies used as ``str``/``bytes``; ``+``, ``*``, ``|``
and the set operators on collections; collection previews in ``repr``;
``permastruct.to_python``; ``dir()`` of proxies; ``help()`` of structure
classes.  The generic protocol suites of CPython are in test_protocol_suites.py.
"""

import array
import hashlib
import inspect
import json
import pprint
import pydoc
import re
import sys

import pytest

import permastruct
from permastruct import Dict, List, Set, SortedDict, Storage, to_python
from permastruct.errors import CorruptStorageError, PermastructError, ReadOnlyError, StorageClosedError


class ValuesStorage(Storage):
    def populateSchema(self):
        s = self.schema

        class Agent(s.Structure):
            """A field agent.

            >>> 1 + 1
            2
            """
            name = s.ByteString
            age = s.Int
            weight = s.Float

            def greeting(self):
                return b"Hello, " + self.name

            @property
            def double_age(self):
                return 2 * self.age

        class Spy(Agent):
            code = s.String
            licensed = s.Bool

        class Item(s.Structure):
            value = s.Int

        Items = self.define(List("Items")[Item])

        class Holder(Item):
            items = Items
            label = s.String

        class Link(Item):
            next = Item

        class Pair(Item):
            left = Item
            right = Item

        self.define(List("Ints")[s.Int])
        self.define(List("Texts")[s.String])
        Agents = self.define(List("Agents")[Agent])
        self.define(Dict("ByName")[s.ByteString, Agent])
        self.define(Dict("Ages")[s.String, s.Int])
        self.define(Dict("Teams")[s.String, Agents])
        self.define(SortedDict("ByAge")[s.Int, Agent])
        self.define(Set("Tags")[s.String])
        self.define(Set("Numbers")[s.Int])

        class Root(s.Structure):
            name = s.ByteString
            title = s.String
            agent = Agent
            items = Items
            ints = s.Ints
            ages = s.Ages
            buf = s.Buffer
            count = s.Int


@pytest.fixture
def p(tmp_path):
    store = ValuesStorage(tmp_path / "values.ps")
    yield store
    if not store.closed:
        store.check()
        store.close()


# == strings ===================================================================================
TEXTS = ["", "Moneypenny", "h\u00e9llo w\u00f6rld \u2764 \U0001f600", "a,b,,c", "  Tab\tbed \n lines\r\n",
         "Title Case", "12345", "x" * 300]
BLOBS = [b"", b"Felix,Leiter", b"\x00\xff\x10", b"a,b,,c", b"  spaced \n", b"12345", b"y" * 300]

#: (method, args) calls tried on every sample; the proxy must answer what the value answers.
STR_CALLS = [
    ("capitalize", ()), ("casefold", ()), ("center", (20, "*")), ("count", ("a",)), ("encode", ()),
    ("encode", ("utf-16",)), ("endswith", ("y",)), ("endswith", (("a", "y"),)), ("expandtabs", (4,)),
    ("find", ("e",)), ("format", ()), ("format_map", ({},)), ("index", ("",)), ("isalnum", ()),
    ("isalpha", ()), ("isascii", ()), ("isdecimal", ()), ("isdigit", ()), ("isidentifier", ()),
    ("islower", ()), ("isnumeric", ()), ("isprintable", ()), ("isspace", ()), ("istitle", ()),
    ("isupper", ()), ("join", (["1", "2"],)), ("ljust", (15, ".")), ("lower", ()), ("lstrip", ()),
    ("partition", (",",)), ("removeprefix", ("Mo",)), ("removesuffix", ("ny",)), ("replace", ("a", "A")),
    ("replace", ("e", "E", 1)), ("rfind", ("e",)), ("rindex", ("",)), ("rjust", (12,)), ("rpartition", (",",)),
    ("rsplit", (",", 1)), ("rstrip", ()), ("split", ()), ("split", (",",)), ("split", (), {"sep": ",", "maxsplit": 1}),
    ("splitlines", ()), ("splitlines", (True,)), ("startswith", ("M",)), ("startswith", ("y", 1, 5)),
    ("strip", (" \n",)), ("swapcase", ()), ("title", ()), ("translate", ({ord("a"): "4"},)), ("upper", ()),
    ("zfill", (10,)),
]
BYTES_CALLS = [
    ("capitalize", ()), ("center", (20, b"*")), ("count", (b"a",)), ("decode", ()), ("decode", ("latin-1",)),
    ("endswith", (b"r",)), ("endswith", ((b"a", b"r"),)), ("expandtabs", (4,)), ("find", (b"e",)),
    ("find", (101,)), ("hex", ()), ("hex", (":",)), ("index", (b"",)), ("isalnum", ()), ("isalpha", ()),
    ("isascii", ()), ("isdigit", ()), ("islower", ()), ("isspace", ()), ("istitle", ()), ("isupper", ()),
    ("join", ([b"1", b"2"],)), ("ljust", (15, b".")), ("lower", ()), ("lstrip", ()), ("partition", (b",",)),
    ("removeprefix", (b"Fe",)), ("removesuffix", (b"er",)), ("replace", (b"e", b"E")), ("rfind", (b"e",)),
    ("rindex", (b"",)), ("rjust", (12,)), ("rpartition", (b",",)), ("rsplit", (b",", 1)), ("rstrip", ()),
    ("split", ()), ("split", (b",",)), ("splitlines", ()), ("startswith", (b"F",)), ("strip", ()),
    ("swapcase", ()), ("title", ()), ("translate", (bytes.maketrans(b"a", b"4"),)), ("upper", ()),
    ("zfill", (10,)),
]


def _call(target, name, args, kwargs):
    try:
        return "ok", getattr(target, name)(*args, **kwargs)
    except Exception as exc:  # the proxy must fail where the value fails, with the same exception type
        return "error", type(exc)


def _calls(table):
    for entry in table:
        name, args = entry[0], entry[1]
        yield name, args, entry[2] if len(entry) > 2 else {}


def test_every_public_str_and_bytes_method_is_on_the_proxies(p):
    title, raw = p.schema.String("Bond"), p.schema.ByteString(b"Bond")
    for python, proxy in ((str, title), (bytes, raw)):
        for name in dir(python):
            if name.startswith("_") or name == "fromhex":
                continue
            assert callable(getattr(proxy, name)), f"{type(proxy).__name__}.{name}"
    assert {name for name, _, _ in _calls(STR_CALLS)} == {n for n in dir(str) if not n.startswith("_")} - {
        "maketrans"}
    assert {name for name, _, _ in _calls(BYTES_CALLS)} == {n for n in dir(bytes) if not n.startswith("_")} - {
        "maketrans", "fromhex"}


@pytest.mark.parametrize("value", TEXTS)
def test_string_methods_answer_like_str(p, value):
    proxy = p.schema.String(value)
    for name, args, kwargs in _calls(STR_CALLS):
        expected = _call(value, name, args, kwargs)
        got = _call(proxy, name, args, kwargs)
        assert got == expected, f"{value!r}.{name}{args}"
        if got[0] == "ok":
            assert type(got[1]) is type(expected[1])
    assert proxy.maketrans("a", "b") == str.maketrans("a", "b")


@pytest.mark.parametrize("value", BLOBS)
def test_bytestring_methods_answer_like_bytes(p, value):
    proxy = p.schema.ByteString(value)
    for name, args, kwargs in _calls(BYTES_CALLS):
        expected = _call(value, name, args, kwargs)
        got = _call(proxy, name, args, kwargs)
        assert got == expected, f"{value!r}.{name}{args}"
        if got[0] == "ok":
            assert type(got[1]) is type(expected[1])
    assert proxy.maketrans(b"a", b"b") == bytes.maketrans(b"a", b"b")


@pytest.mark.parametrize("value", TEXTS)
def test_string_operators_answer_like_str(p, value):
    t = p.schema.String(value)
    assert t + "!" == value + "!" and type(t + "!") is str
    assert "!" + t == "!" + value and type("!" + t) is str
    assert t + t == value + value and type(t + t) is str
    assert t * 3 == value * 3 == 3 * t and type(t * 3) is str
    assert t * 0 == "" and t * -1 == ""
    assert f"{t}" == value and f"{t:>30}" == f"{value:>30}" and format(t, "^9") == format(value, "^9")
    assert "{}|{:<5}".format(t, t) == "{}|{:<5}".format(value, value)
    assert "%s" % t == value and "%r" % (t.contents,) == repr(value)
    assert ("x" in t) == ("x" in value) and ("" in t)
    assert list(t) == list(value) and list(reversed(t)) == list(reversed(value))
    assert len(t) == len(value)  # characters, not bytes
    if value:
        assert t[0] == value[0] and t[-1] == value[-1] and type(t[0]) is str
        with pytest.raises(IndexError):
            t[len(value)]
    assert t[1:3] == value[1:3] and t[::-1] == value[::-1] and type(t[1:3]) is str
    assert p.schema.String("%s-%d") % ("a", 3) == "a-3"
    assert p.schema.String("%(x)s") % {"x": t} == value


@pytest.mark.parametrize("value", BLOBS)
def test_bytestring_operators_answer_like_bytes(p, value):
    raw = p.schema.ByteString(value)
    assert raw + b"d" == value + b"d" and type(raw + b"d") is bytes
    assert b"d" + raw == b"d" + value and type(b"d" + raw) is bytes
    assert raw + bytearray(b"e") == value + b"e" and raw + memoryview(b"f") == value + b"f"
    assert bytearray(b"g") + raw == bytearray(b"g" + value)
    assert raw + raw == value + value
    assert raw * 2 == value * 2 == 2 * raw and type(raw * 2) is bytes
    assert (b"," in raw) == (b"," in value) and (44 in raw) == (44 in value)
    assert list(raw) == list(value)
    assert raw[1:3] == value[1:3] and type(raw[1:3]) is bytes
    if value:
        assert raw[0] == value[0] and type(raw[0]) is int
    assert str(raw) == str(value) and f"{raw}" == f"{value}"
    assert p.schema.ByteString(b"%s=%d") % (b"k", 5) == b"k=5"
    assert b"%s" % raw == value
    assert int(p.schema.ByteString(b"42")) == 42  # through the buffer protocol, as int(b"42")


def test_string_proxies_as_arguments_count_as_their_values(p):
    t = p.schema.String("Moneypenny")
    penny, bags = p.schema.String("penny"), p.schema.String("bags")
    assert t.replace(penny, bags) == "Moneybags"
    assert t.endswith(penny) and t.endswith(("x", penny)) and t.find(penny) == 5
    assert p.schema.String(", ").join([t, penny, "x"]) == "Moneypenny, penny, x"
    assert penny in t and t.split(sep=penny) == ["Money", ""]
    assert t + penny == "Moneypennypenny"
    raw = p.schema.ByteString(b"a,b")
    comma = p.schema.ByteString(b",")
    assert raw.split(comma) == [b"a", b"b"] and comma.join([raw, raw]) == b"a,b,a,b"
    assert b"-".join([raw, comma]) == b"a,b-,"  # bytes.join reads the proxies' buffers


def test_mixing_kinds_and_types_raises_type_error(p):
    t, raw = p.schema.String("x"), p.schema.ByteString(b"x")
    for bad in (lambda: t + 5, lambda: 5 + t, lambda: t + raw, lambda: raw + t, lambda: raw + 5,
                lambda: t * 1.5, lambda: raw * "2", lambda: b"x" + t, lambda: t.startswith(b"x"),
                lambda: raw.startswith("x"), lambda: memoryview(b"x") + raw, lambda: (1,) + t):
        with pytest.raises(TypeError):
            bad()

    class Right:
        def __radd__(self, other):
            return ("radd", other)

        def __rmul__(self, other):
            return ("rmul", other)

    assert t + Right() == ("radd", t)  # NotImplemented lets the other operand answer
    assert raw * Right() == ("rmul", raw)


def test_proxy_api_is_not_shadowed(p):
    t, raw = p.schema.String("Bond"), p.schema.ByteString(b"Bond")
    for proxy in (t, raw):
        assert proxy.isSameAs(proxy) and not proxy.isSameAs(proxy.contents)
        cls = type(proxy)
        assert isinstance(cls.__dict__.get("contents") or inspect.getattr_static(proxy, "contents"), property)
        assert re.fullmatch(rf"<persistent {cls.__name__} object @offset 0x[0-9a-f]+>", repr(proxy))
        assert proxy == proxy.contents and hash(proxy) == hash(proxy.contents)
    assert not hasattr(raw, "fromhex") and not hasattr(type(raw), "fromhex")
    assert t.contents == "Bond" and raw.contents == b"Bond"
    assert t.upper.__doc__.startswith("``s.upper(...)`` is ``s.contents.upper(...)``")


def test_bytestring_exports_its_bytes_read_only(p):
    raw = p.schema.ByteString(b"Felix")
    m = memoryview(raw)
    assert (m.format, m.itemsize, m.shape, m.readonly, m.nbytes) == ("B", 1, (5,), True, 5)
    assert m.tobytes() == b"Felix" and m[0] == ord("F")
    with pytest.raises(TypeError):
        m[0] = 1
    assert bytearray(raw) == bytearray(b"Felix")
    assert b"".join([raw, b"!"]) == b"Felix!"
    assert hashlib.sha256(raw).digest() == hashlib.sha256(b"Felix").digest()
    assert array.array("B", raw).tobytes() == b"Felix"
    # a Buffer made from a ByteString holds its bytes (it used to copy the proxy's header)
    assert bytes(p.schema.Buffer(raw)) == b"Felix"
    m.release()
    empty = p.schema.ByteString(b"")
    assert memoryview(empty).tobytes() == b"" and bytearray(empty) == bytearray()
    import ctypes
    with pytest.raises((TypeError, BufferError)):
        ctypes.c_char.from_buffer(raw)  # wants writable memory
    p.check()


def test_bytestring_export_in_a_read_only_storage(tmp_path):
    path = tmp_path / "ro.ps"
    with ValuesStorage(path) as w:
        w.root.name = b"James"
    reader = ValuesStorage(path, readonly=True)
    try:
        name = reader.root.name
        assert bytes(memoryview(name)) == b"James" and name.upper() == b"JAMES"
    finally:
        reader.close()


def test_string_has_no_buffer_protocol(p):
    t = p.schema.String("text")
    with pytest.raises(TypeError, match="bytes-like object is required"):
        memoryview(t)
    with pytest.raises(TypeError):
        b"".join([t])
    with pytest.raises(TypeError):
        bytearray(t)
    with pytest.raises(TypeError):
        p.schema.Buffer(t)
    assert bytes(t) == b"text"  # its UTF-8, through __bytes__, as before


def test_views_outlive_close_and_dead_proxies_refuse(tmp_path):
    store = ValuesStorage(tmp_path / "dead.ps")
    raw, t = store.schema.ByteString(b"Felix"), store.schema.String("Bond")
    kept = memoryview(raw)
    store.close()
    assert kept.tobytes() == b"Felix"  # the map stays while a view uses it
    for use in (lambda: raw.upper(), lambda: raw + b"x", lambda: b"x" + raw, lambda: raw * 2, lambda: memoryview(raw),
                lambda: bytearray(raw), lambda: t.upper(), lambda: t + "x", lambda: "x" + t, lambda: t[0],
                lambda: list(t), lambda: "B" in t, lambda: f"{t:>3}", lambda: str(raw), lambda: t % ()):
        with pytest.raises(StorageClosedError):
            use()
    with pytest.raises(TypeError):  # bytes.join replaces any buffer error with its own TypeError
        b"".join([raw])
    kept.release()


def test_rolled_back_strings_refuse(tmp_path):
    store = ValuesStorage(tmp_path / "rb.ps")
    store.commit()
    raw = store.schema.ByteString(b"gone")
    store.rollback()
    with pytest.raises(PermastructError):
        raw.upper()
    with pytest.raises(PermastructError):
        memoryview(raw)
    store.check()
    store.close()


# == collections: + * | & ======================================================================
def test_list_add_and_mul_return_plain_lists(p):
    lst = p.schema.Ints([1, 2])
    other = p.schema.Ints([3])
    for result, expected in ((lst + [4], [1, 2, 4]), ([0] + lst, [0, 1, 2]), (lst * 2, [1, 2, 1, 2]),
                             (2 * lst, [1, 2, 1, 2]), (lst + other, [1, 2, 3]), (other + lst, [3, 1, 2]),
                             (lst * 0, []), (lst * -3, []), (lst + [], [1, 2]), (lst * Idx(2), [1, 2, 1, 2])):
        assert type(result) is list and result == expected
    for bad in (lambda: lst + (4,), lambda: (4,) + lst, lambda: lst + 4, lambda: lst * 1.5, lambda: lst * "2",
                lambda: lst + {4}):
        with pytest.raises(TypeError):
            bad()
    assert lst == [1, 2] and other == [3]
    agents = p.schema.Agents([p.schema.Agent(age=1)])
    joined = agents + agents
    assert joined[0].isSameAs(joined[1]) and type(joined) is list
    assert lst.copy() == [1, 2] and type(lst.copy()) is list
    p.check()


class Idx:
    def __init__(self, i):
        self.i = i

    def __index__(self):
        return self.i


def test_list_iadd_and_imul_change_the_list_in_place(p):
    lst = same = p.schema.Ints([1, 2])
    lst += [3]
    lst += (4, 5)
    lst += range(6, 7)
    lst += p.schema.Ints([7])
    assert lst is same and lst == [1, 2, 3, 4, 5, 6, 7]
    lst *= 2
    assert lst is same and lst == [1, 2, 3, 4, 5, 6, 7] * 2
    lst *= 1
    assert len(lst) == 14
    lst *= Idx(0)
    assert lst is same and lst == []
    lst += [9]
    lst *= -2
    assert lst == []
    lst *= 5
    assert lst == []
    p.root.ints = [1]
    p.root.ints += [2]
    p.root.ints *= 3
    assert p.root.ints == [1, 2] * 3
    p.check()


def test_list_in_place_operators_change_nothing_on_error(p):
    lst = p.schema.Ints([1, 2])
    for bad in (lambda: lst.__iadd__([3, "x"]), lambda: lst.__iadd__([3, 2 ** 64]), lambda: lst.__iadd__(5),
                lambda: lst.__iadd__(None)):
        with pytest.raises((TypeError, OverflowError)):
            bad()
        assert lst == [1, 2]
    assert lst.__imul__(1.5) is NotImplemented
    with pytest.raises(TypeError):
        lst *= "2"
    assert lst == [1, 2]
    p.check()


def test_list_imul_counts_references(p):
    bond = p.schema.Agent(name=b"Bond")
    agents = p.schema.Agents([bond, None])
    p.root.agent = bond
    agents *= 3
    assert len(agents) == 6 and all(agents[i].isSameAs(bond) for i in (0, 2, 4)) and agents[5] is None
    p.check()
    p.commit()
    p.check()
    agents *= 0
    del bond
    p.commit()
    p.check()
    assert p.root.agent.name == b"Bond"


def test_in_place_operators_on_a_read_only_storage(tmp_path):
    path = tmp_path / "ro.ps"
    with ValuesStorage(path) as w:
        w.root.ints = [1, 2]
        w.root.ages = {"a": 1}
    reader = ValuesStorage(path, readonly=True)
    try:
        ints, ages = reader.root.ints, reader.root.ages
        with pytest.raises(ReadOnlyError):
            ints *= 2
        with pytest.raises(ReadOnlyError):
            ints += [3]
        with pytest.raises(ReadOnlyError):
            ages |= {"b": 2}
        assert ints + [3] == [1, 2, 3] and ages | {"b": 2} == {"a": 1, "b": 2}
    finally:
        reader.close()


def test_sort_that_changes_the_list_raises_value_error(p):
    lst = p.schema.Ints([3, 1, 2])

    def key(value):
        lst.append(0)
        return value

    with pytest.raises(ValueError, match="modified during sort"):
        lst.sort(key=key)
    assert lst == [3, 1, 2, 0, 0, 0]  # as the key left it; the sort was not applied
    p.check()


@pytest.mark.parametrize("kind", ["Ages", "ByAgeLike"])
def test_mapping_or_operators(p, kind):
    if kind == "Ages":
        d = same = p.schema.Ages({"b": 2, "a": 1})
        order = ["b", "a", "c"]
    else:
        d = same = p.schema.ByAge({2: None, 1: None})
        order = None
    if kind == "Ages":
        merged = d | {"c": 3, "a": 0}
        assert type(merged) is dict and merged == {"b": 2, "a": 0, "c": 3} and list(merged) == order
        left = {"c": 3, "a": 0} | d
        assert type(left) is dict and left == {"c": 3, "a": 1, "b": 2} and list(left) == ["c", "a", "b"]
        assert d | p.schema.Ages({"z": 26}) == {"b": 2, "a": 1, "z": 26}
        for bad in (lambda: d | [("c", 3)], lambda: [("c", 3)] | d, lambda: d | 1):
            with pytest.raises(TypeError):
                bad()
        d |= {"c": 3}
        d |= [("e", 5)]
        d |= p.schema.Ages({"f": 6})
        assert d is same and d == {"b": 2, "a": 1, "c": 3, "e": 5, "f": 6}
        for bad in ({"g": "x"}, {1: 1}, [("g", 1, 2)], 5):
            with pytest.raises((TypeError, ValueError)):
                d |= bad
            assert d is same and len(d) == 5 and "g" not in d
    else:
        bond = p.schema.Agent(name=b"Bond")
        merged = d | {0: bond}
        assert type(merged) is dict and list(merged) == [1, 2, 0] and merged[0].isSameAs(bond)
        d |= {0: bond}
        assert d is same and list(d) == [0, 1, 2]
        with pytest.raises(TypeError):
            d |= {"x": None}
        assert list(d) == [0, 1, 2]
    p.check()


def test_set_operators_return_plain_sets(p):
    tags = p.schema.Tags(["spy", "boss"])
    numbers = p.schema.Numbers([1, 2, 3])
    cases = [
        (tags | {"cook"}, {"spy", "boss", "cook"}), ({"cook"} | tags, {"spy", "boss", "cook"}),
        (tags & {"spy", "x"}, {"spy"}), ({"spy", "x"} & tags, {"spy"}), (tags - {"spy"}, {"boss"}),
        ({"spy", "x"} - tags, {"x"}), (tags ^ {"spy", "x"}, {"boss", "x"}), (frozenset({"x"}) ^ tags,
                                                                              {"spy", "boss", "x"}),
        (numbers | numbers, {1, 2, 3}), (numbers & range(2) if False else numbers & {0, 1}, {1}),
        (tags.union(["x"], ("y",)), {"spy", "boss", "x", "y"}), (tags.intersection(["spy"], ["spy", "z"]), {"spy"}),
        (tags.difference(["spy"], ["q"]), {"boss"}), (tags.symmetric_difference(["spy", "q"]), {"boss", "q"}),
        (numbers.union(), {1, 2, 3}), (tags.copy(), {"spy", "boss"}),
    ]
    for result, expected in cases:
        assert type(result) in (set, frozenset) and result == expected
    assert type({"cook"} | tags) is set
    assert tags.issubset(["spy", "boss", "x"]) and not tags.issubset(["spy"])
    assert tags.issuperset(["spy"]) and not tags.issuperset(["x"])
    assert tags <= {"spy", "boss"} and tags < {"spy", "boss", "x"} and tags.isdisjoint({"x"})
    for bad in (lambda: tags | ["x"], lambda: ["x"] | tags, lambda: tags & "spy", lambda: tags - 1):
        with pytest.raises(TypeError):
            bad()
    assert tags == {"spy", "boss"} and numbers == {1, 2, 3}
    p.check()


def test_set_update_methods_change_in_place_and_nothing_on_error(p):
    tags = same = p.schema.Tags(["a", "b", "c"])
    tags.intersection_update(["a", "b", "x"], ("b", "a"))
    assert tags == {"a", "b"}
    tags.difference_update(["a"], ["q"])
    assert tags == {"b"}
    tags.symmetric_difference_update(["b", "c", "d"])
    assert tags is same and tags == {"c", "d"}
    tags |= {"e"}
    tags &= {"c", "d", "e"}
    tags -= {"c"}
    tags ^= {"z", "d"}
    assert tags is same and tags == {"e", "z"}
    for bad in (lambda: tags.symmetric_difference_update(["k", 1]), lambda: tags.intersection_update([["x"]]),
                lambda: tags.difference_update([["x"]]), lambda: tags.symmetric_difference_update(5)):
        with pytest.raises(TypeError):
            bad()
        assert tags == {"e", "z"}
    p.check()


# == repr / str / pprint =========================================================================
HEAD = r"<persistent {} object @offset 0x[0-9a-f]+"


def test_collection_reprs_preview_the_first_elements(p):
    ints = p.schema.Ints(range(1000))
    text = repr(ints)
    assert re.fullmatch(HEAD.format("Ints") + r": \[0, 1, 2, 3, 4, \.\.\.\] \(1000 items\)>", text)
    assert str(ints) == text and pprint.pformat(ints) == text
    assert re.fullmatch(HEAD.format("Ints") + r": \[\] \(0 items\)>", repr(p.schema.Ints()))
    assert re.fullmatch(HEAD.format("Ints") + r": \[7\] \(1 item\)>", repr(p.schema.Ints([7])))
    bond = p.schema.Agent(name=b"Bond")
    by_name = p.schema.ByName({b"Bond": bond, b"M": None})
    assert re.fullmatch(HEAD.format("ByName") + r": \{b'Bond': " + HEAD.format("Agent") + r">, b'M': None\} "
                        r"\(2 items\)>", repr(by_name))
    assert re.fullmatch(HEAD.format("Ages") + r": \{'a': 1\} \(1 item\)>", repr(p.schema.Ages({"a": 1})))
    assert re.fullmatch(HEAD.format("Ages") + r": \{\} \(0 items\)>", repr(p.schema.Ages()))
    assert re.fullmatch(HEAD.format("ByAge") + r": \{1: None, 2: None\} \(2 items\)>",
                        repr(p.schema.ByAge({2: None, 1: None})))
    assert re.fullmatch(HEAD.format("Tags") + r": \{'x'\} \(1 item\)>", repr(p.schema.Tags(["x"])))
    assert re.fullmatch(HEAD.format("Tags") + r": set\(\) \(0 items\)>", repr(p.schema.Tags()))
    # structures and strings keep the DESIGN 3.4 form
    assert re.fullmatch(HEAD.format("Agent") + ">", repr(bond))
    assert re.fullmatch(HEAD.format("ByteString") + ">", repr(bond.name))


def test_previews_are_short(p):
    texts = p.schema.Texts(["x" * 1000, "\u00e9" * 1000, "short"])
    text = repr(texts)
    assert "'" + "x" * 40 + "...'" in text and "'" + "\u00e9" * 40 + "...'" in text and "'short'" in text
    assert len(text) < 400
    many = p.schema.Texts(["y" * 60] * 50)
    assert repr(many).count("'y") <= 5 and len(repr(many)) < 500 and repr(many).endswith(", ...] (50 items)>")
    teams = p.schema.Teams({"00": [p.schema.Agent()] * 3})
    # a collection inside a preview shows only its size
    assert re.fullmatch(HEAD.format("Teams") + r": \{'00': " + HEAD.format("Agents") + r" \(3 items\)>\} "
                        r"\(1 item\)>", repr(teams))


def test_preview_reads_only_what_it_shows(p, monkeypatch):
    agents = p.schema.Agents([p.schema.Agent(age=i) for i in range(2000)])
    by_name = p.schema.ByName({b"%d" % i: p.schema.Agent(age=i) for i in range(2000)})  # keys: inline
    p.commit()
    made = []
    real = p._heap.remember  # called for every proxy made (none of the elements has a live one)
    monkeypatch.setattr(p._heap, "remember", lambda offset, proxy: made.append(offset) or real(offset, proxy))
    p._heap._prune()  # the heap drops the proxies nothing holds: each element's is made again
    assert repr(agents).endswith(", ...] (2000 items)>")
    assert 0 < len(made) <= 5
    made.clear()
    p._heap._prune()
    assert repr(by_name).endswith(", ...} (2000 items)>")
    assert 0 < len(made) <= 5


def test_previews_do_not_recurse(p):
    items = p.schema.Items()
    holder = p.schema.Holder(items=items, value=1)
    items.append(holder)
    items.append(p.schema.Item(value=2))
    text = repr(items)  # a List that contains itself, through a structure
    assert re.fullmatch(HEAD.format("Items") + r": \[" + HEAD.format("Holder") + ">, " + HEAD.format("Item")
                        + r">\] \(2 items\)>", text)

    # a structure whose __repr__ shows its collection: the cycle is cut at the second collection
    type(holder).__repr__ = lambda self: f"Holder({self.items!r})"
    try:
        text = repr(items)
        assert re.fullmatch(HEAD.format("Items") + r": \[Holder\(" + HEAD.format("Items") + r" \(2 items\)>\), "
                            + HEAD.format("Item") + r">\] \(2 items\)>", text)
        assert repr(holder).startswith("Holder(<persistent Items object")
    finally:
        del type(holder).__repr__
    p.check()


def test_damaged_collection_repr_does_not_raise(p, monkeypatch):
    ints = p.schema.Ints([1, 2])

    def broken(self, start=0, stop=None):
        raise CorruptStorageError("damaged for the test")
    monkeypatch.setattr(type(ints), "_ps_values", broken)
    assert re.fullmatch(HEAD.format("Ints") + r" \(2 items\), damaged>", repr(ints))


# == to_python ==================================================================================
def test_to_python_converts_every_kind(p):
    import numpy as np

    bond = p.schema.Agent(name=b"Bond", age=37, weight=80.5)
    spy = p.schema.Spy(name=b"Mata", code="H21", licensed=True)
    assert to_python(bond) == {"name": b"Bond", "age": 37, "weight": 80.5}
    assert to_python(spy) == {"name": b"Mata", "age": 0, "weight": 0.0, "code": "H21", "licensed": True}
    assert to_python(p.schema.Agent()) == {"name": None, "age": 0, "weight": 0.0}
    assert to_python(p.schema.Ints([1, 2])) == [1, 2]
    assert to_python(p.schema.Texts(["a", "b"])) == ["a", "b"]
    converted = to_python(p.schema.ByName({b"Bond": bond, b"M": None}))
    assert converted == {b"Bond": {"name": b"Bond", "age": 37, "weight": 80.5}, b"M": None}
    assert all(type(k) is bytes for k in converted)
    ages = to_python(p.schema.Ages({"b": 2, "a": 1}))
    assert ages == {"b": 2, "a": 1} and list(ages) == ["b", "a"] and all(type(k) is str for k in ages)
    assert list(to_python(p.schema.ByAge({3: None, 1: bond, 2: None}))) == [1, 2, 3]
    tags = to_python(p.schema.Tags(["x", "y"]))
    assert tags == {"x", "y"} and type(tags) is set and all(type(e) is str for e in tags)
    assert to_python(p.schema.Numbers([3, 4])) == {3, 4}
    assert to_python(p.schema.String("s")) == "s" and type(to_python(p.schema.String("s"))) is str
    assert type(to_python(p.schema.ByteString(b"b"))) is bytes
    assert to_python(p.schema.Buffer(array.array("d", [1.5, 2.0]))) == [1.5, 2.0]
    assert to_python(p.schema.Buffer(b"ab")) == [97, 98]
    assert to_python(p.schema.Buffer(np.arange(6).reshape(2, 3))) == [[0, 1, 2], [3, 4, 5]]
    big_endian = np.arange(3, dtype=">i4")
    assert to_python(p.schema.Buffer(big_endian)) == big_endian.tobytes()  # a format memoryview cannot unpack
    for plain in (None, 1, 2.5, "s", b"b", [p.schema.Ints([1])], {"k": 1}):
        assert to_python(plain) is plain  # plain values, plain containers included, pass through
    p.check()


def test_to_python_depth(p):
    bond = p.schema.Agent(name=b"Bond", age=37)
    teams = p.schema.Teams({"00": [bond]})
    assert to_python(teams, depth=0) is teams
    one = to_python(teams, depth=1)
    assert type(one) is dict and list(one) == ["00"] and one["00"].isSameAs(teams["00"])
    two = to_python(teams, depth=2)
    assert type(two["00"]) is list and two["00"][0].isSameAs(bond)
    three = to_python(teams, depth=3)
    assert three["00"][0]["age"] == 37 and three["00"][0]["name"].isSameAs(bond.name)
    assert to_python(teams, depth=4) == to_python(teams) == {"00": [{"name": b"Bond", "age": 37, "weight": 0.0}]}
    with pytest.raises(ValueError):
        to_python(teams, depth=-1)
    with pytest.raises(TypeError):
        to_python(teams, depth=1.5)
    assert to_python(teams, depth=Idx(1)) == one


def test_to_python_depth_is_the_shortest_path(p):
    far = p.schema.Link(value=10)
    x = p.schema.Link(value=9, next=far)
    pair = p.schema.Pair(left=p.schema.Link(value=1, next=x), right=x)
    result = to_python(pair, depth=2)
    # x is two levels down through `right`: converted, and the same dict where `left.next` reaches it
    assert result["right"]["value"] == 9 and result["left"]["next"] is result["right"]
    assert result["right"]["next"].isSameAs(far)  # three levels down by every path: a proxy


def test_to_python_keeps_sharing_and_cycles(p):
    bond = p.schema.Agent(name=b"Bond")
    agents = p.schema.Agents([bond, bond])
    converted = to_python(agents)
    assert converted[0] is converted[1]
    items = p.schema.Items()
    holder = p.schema.Holder(items=items, value=1, label="h")
    items.append(holder)
    items.append(holder)
    result = to_python(items)
    assert result[0] is result[1] and result[0]["items"] is result and result[0]["label"] == "h"
    again = to_python(holder)
    assert again["items"][0] is again
    p.check()


def test_to_python_long_chains_do_not_recurse(p):
    head = node = p.schema.Link(value=0)
    for i in range(1, 100_000):
        nxt = p.schema.Link(value=i)
        node.next = nxt
        node = nxt
    p.root.items = [head]  # kept: Storage frees an unreferenced chain one object per pass at commit
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)
    try:
        result = to_python(head)
    finally:
        sys.setrecursionlimit(limit)
    count = 0
    while result is not None:
        assert result["value"] == count
        count += 1
        result = result["next"]
    assert count == 100_000


def test_to_python_is_json_ready(p):
    p.root.title = "root"
    p.root.ages = {"Bond": 37, "M": 60}
    p.root.items = [p.schema.Item(value=3)]
    p.root.count = 2
    text = json.dumps(to_python(p.root.ages))
    assert json.loads(text) == {"Bond": 37, "M": 60}
    teams = p.schema.Teams({"00": []})
    assert json.loads(json.dumps(to_python(teams))) == {"00": []}
    plain = to_python(p.root)
    assert plain["ages"] == {"Bond": 37, "M": 60} and plain["items"] == [{"value": 3}] and plain["agent"] is None


def test_to_python_of_dead_proxies_raises(tmp_path):
    store = ValuesStorage(tmp_path / "dead.ps")
    ints = store.schema.Ints([1])
    store.close()
    with pytest.raises(StorageClosedError):
        to_python(ints)


def test_to_python_is_exported():
    assert "to_python" in permastruct.__all__ and permastruct.to_python is to_python
    import permastruct._convert as convert
    assert convert.__doc__.startswith("One job:")


# == dir() ======================================================================================
def test_dir_lists_the_proxy_api(p):
    spy = p.schema.Spy(name=b"x")
    names = dir(spy)
    for expected in ("name", "age", "weight", "code", "licensed", "greeting", "double_age", "isSameAs",
                     "__eq__", "__class__", "__doc__"):
        assert expected in names
    for hidden in ("_b_base_", "_b_needsfree_", "_objects", "from_buffer", "_fields_", "_ps_ref_name",
                   "_ps_type", "_storage", "__ctypes_from_outparam__", "__setstate__", "__slots__"):
        assert hidden not in names
    assert names == sorted(names)
    ints = dir(p.schema.Ints())
    assert {"append", "extend", "copy", "sort", "__add__", "__iadd__", "__len__", "isSameAs"} <= set(ints)
    assert not any(n.startswith("_ps_") or n.startswith("_b_") for n in ints)
    assert {"keys", "items", "update", "__or__"} <= set(dir(p.schema.Ages()))
    assert {"union", "add", "isdisjoint"} <= set(dir(p.schema.Tags()))
    strings = dir(p.schema.String("s"))
    assert {"contents", "upper", "isSameAs", "__add__"} <= set(strings) and "from_buffer" not in strings
    assert {"contents", "decode", "hex"} <= set(dir(p.schema.ByteString(b"b")))
    assert {"format", "shape", "isSameAs"} <= set(dir(p.schema.Buffer(b"x")))
    assert "_ps_dir" in type(spy).__dict__  # worked out once per class


# == help() =====================================================================================
def test_help_shows_fields_and_types(p):
    text = pydoc.render_doc(p.schema.Spy, renderer=pydoc.plaintext)
    for line in ("name: ByteString (from Agent)", "age: Int (from Agent)", "weight: Float (from Agent)",
                 "code: String", "licensed: Bool"):
        assert line in text
    assert "name: ByteString (by reference; None until set)" in text
    agent_text = pydoc.render_doc(p.schema.Agent, renderer=pydoc.plaintext)
    sections = {part.strip(" |\n").split("\n")[0]: part for part in re.split(r"\n \|  -{20,}\n", agent_text)}
    assert "double_age" in sections["Readonly properties defined here:"]  # the user's own read-only property
    assert "name" not in sections["Readonly properties defined here:"]
    assert "name: ByteString (by reference" in sections["Data descriptors defined here:"]
    assert str(inspect.signature(p.schema.Spy)) == (
        "(*, name: ByteString = None, age: Int = 0, weight: Float = 0.0, code: String = None, "
        "licensed: Bool = False)")
    root_doc = p.schema.Root.__doc__
    assert "A persistent Root structure." in root_doc and "items: Items (List[Item])" in root_doc
    assert "ages: Ages (Dict[String, Int])" in root_doc
    agent_doc = p.schema.Agent.__doc__
    assert agent_doc.startswith("A field agent.\n\n>>> 1 + 1\n2\n\nFields:\n    name: ByteString\n")


def test_reference_field_setter_goes_through_the_checks(p, tmp_path):
    agent = p.schema.Agent()
    prop = type(agent).name
    prop.__set__(agent, b"Bond")
    assert agent.name == b"Bond"
    with pytest.raises(TypeError):
        prop.__set__(agent, 5)
    assert agent.name == b"Bond"
    p.root.agent = agent
    p.close()
    with pytest.raises(StorageClosedError):
        prop.__set__(agent, b"x")
    reader = ValuesStorage(tmp_path / "values.ps", readonly=True)
    try:
        with pytest.raises(ReadOnlyError):
            type(reader.root).title.__set__(reader.root, "x")
    finally:
        reader.close()


def test_structures_and_collections_do_not_export_their_raw_bytes():
    """A ctypes object would hand out its own bytes (header, counts, offsets) writably: refused."""
    from permastruct import List, Storage

    class S(Storage):
        def populateSchema(self):
            Numbers = self.define(List("Numbers")[self.schema.Int])

            class Root(self.schema.Structure):
                n = self.schema.Int
                numbers = Numbers

    p = S(None)
    p.root.numbers = [1, 2]
    with pytest.raises(TypeError, match="bytes-like object is required"):
        memoryview(p.root)
    with pytest.raises(TypeError):
        p.schema.Buffer(p.root)
    # a List of numbers exports its cells (the elements), never the header of the proxy
    with memoryview(p.root.numbers) as view:
        assert view.format == "q" and view.tolist() == [1, 2]
    assert memoryview(p.schema.Buffer(p.root.numbers)).tolist() == [1, 2]
    p.root.n = 7  # field writes do not need the buffer protocol
    assert p.root.n == 7
    p.check()
    p.close()
