"""Contract tests: the persistent collections behave like the Python builtins.

Contract: DESIGN.md sections 3.3 and 3.7 (and 3.2 for element values, 3.8 for
transactions).  Habit (section 6): *the same suite* runs against the builtins and
against the persistent types.

Every test that takes the ``impl`` fixture runs five times:

* ``builtin``         - ``list``, ``dict``, ``set`` and :class:`RefSortedDict` (a
  reference sorted dict written below on top of ``dict`` and ``bisect``);
* ``persistent``      - ``List``, ``Dict``, ``Set``, ``SortedDict`` in a store with
  4096-byte pages;
* ``persistent-p256`` - the same in a store with 256-byte pages (many pages, deep
  trees, collections that span pages);
* ``memory``, ``overlay`` - the same in an in-memory store and in an overlay on a
  file (``conftest.open_store``; ``pimpl`` adds ``memory`` only).

``impl.make(kind, init)`` creates a collection of one of the kinds in
:data:`KINDS` (``"LInt"`` is a list of ``Int``, ``"DStrInt"`` a dict from
``String`` to ``Int``, ``"SString"`` a set of ``String``, ``"SDIntAgent"`` a sorted
dict from ``Int`` to ``Agent``...).  The builtin implementation accepts anything, so
a test whose point is a *wrong-typed* value uses the ``pimpl`` fixture (persistent
only).  Exceptions are checked by exact builtin type (``KeyError``, ``IndexError``,
``TypeError``, ``ValueError``); a failed operation must leave the collection as it
was, and ``p.check()`` must pass after it.

Each persistent test ends (in the fixture) with ``p.check()``, ``p.commit()`` and
``p.check()`` again.
"""

import bisect
import collections.abc as abc
import contextlib
import dataclasses
import math
import random
import struct

import pytest

import permastruct
from conftest import open_store
from permastruct import Storage
from permastruct.errors import PermastructError, ReadOnlyError, SchemaError, StorageClosedError
from permastruct import Dict, List, Set, SortedDict

INF = float("inf")

# -- the schema ----------------------------------------------------------------------------
VALUE_TYPES = ("Int", "Float", "Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16",
               "UInt32", "UInt64", "Float32", "Float64")
REF_TYPES = ("ByteString", "String", "Agent", "Buffer")
NESTED_TYPES = ("LInt", "DStrInt", "SString")

#: kind name -> (category, element type) or (category, key type, value type),
#: in definition order (a kind may only use kinds defined before it).
KINDS = {}
for _t in VALUE_TYPES + REF_TYPES:
    KINDS["L" + _t] = ("list", _t)
KINDS.update({
    "DStrInt": ("dict", "String", "Int"),
    "SString": ("set", "String"),
    "LLInt": ("list", "LInt"),          # List of List
    "LDStrInt": ("list", "DStrInt"),    # List of Dict
    "LSString": ("list", "SString"),    # List of Set
    "DIntString": ("dict", "Int", "String"),
    "DBytesAgent": ("dict", "ByteString", "Agent"),
    "DFloatInt": ("dict", "Float", "Int"),
    "DInt8Int": ("dict", "Int8", "Int"),
    "DUInt64Int": ("dict", "UInt64", "Int"),
    "DIntFloat": ("dict", "Int", "Float"),
    "DStrBool": ("dict", "String", "Bool"),
    "DIntBuffer": ("dict", "Int", "Buffer"),
    "DStrLInt": ("dict", "String", "LInt"),        # Dict of List
    "DStrDStrInt": ("dict", "String", "DStrInt"),  # Dict of Dict
    "DStrSString": ("dict", "String", "SString"),  # Dict of Set
    "DIntUInt8": ("dict", "Int", "UInt8"),
    "SInt": ("set", "Int"),
    "SFloat": ("set", "Float"),
    "SByteString": ("set", "ByteString"),
    "SInt8": ("set", "Int8"),
    "SUInt64": ("set", "UInt64"),
    "SDIntAgent": ("sorted", "Int", "Agent"),
    "SDIntString": ("sorted", "Int", "String"),
    "SDIntInt": ("sorted", "Int", "Int"),
    "SDStrInt": ("sorted", "String", "Int"),
    "SDBytesInt": ("sorted", "ByteString", "Int"),
    "SDFloatString": ("sorted", "Float", "String"),
    "SDUInt64Int": ("sorted", "UInt64", "Int"),
    "SDInt8Int": ("sorted", "Int8", "Int"),
    "SDIntLInt": ("sorted", "Int", "LInt"),
    "SDIntInt8": ("sorted", "Int", "Int8"),
})
DESCRIPTORS = {"list": List, "dict": Dict, "set": Set, "sorted": SortedDict}


class ContractStorage(Storage):
    def populateSchema(self):
        s = self.schema

        class Agent(s.Structure):
            name = s.ByteString
            age = s.Int

        class Spy(Agent):
            code = s.String

        class Other(s.Structure):
            x = s.Int

        for name, (category, *types) in KINDS.items():
            args = tuple(getattr(s, t) for t in types)
            defined = self.define(DESCRIPTORS[category](name)[args if len(args) > 1 else args[0]])
            assert defined is getattr(s, name)

        class Root(s.Structure):
            ints = s.LInt
            ints2 = s.LInt
            names = s.LString
            agents = s.LAgent
            matrix = s.LLInt
            counts = s.DStrInt
            by_name = s.DBytesAgent
            groups = s.DStrLInt
            tags = s.SString
            idset = s.SInt
            by_age = s.SDIntAgent
            sstr = s.SDStrInt
            agent = Agent
            text = s.String


# -- plain values -----------------------------------------------------------------------------
@dataclasses.dataclass
class AgentV:
    """The builtin stand-in for a persistent Agent (mutable, equal field by field, unhashable)."""
    name: object
    age: int


@dataclasses.dataclass
class SpyV:
    name: object
    age: int
    code: object


#: plain sample values per element type: at least 6 each, distinct except for Bool
SAMPLES = {
    "Int": [0, 1, -1, 2 ** 63 - 1, -2 ** 63, 42, 7],
    "Float": [0.0, 1.5, -2.25, 1e300, INF, -INF, 3.0],
    "Bool": [True, False, False, True, True, False],
    "Int8": [0, -128, 127, 1, -1, 5],
    "Int16": [0, -2 ** 15, 2 ** 15 - 1, 3, -3, 9],
    "Int32": [0, -2 ** 31, 2 ** 31 - 1, 3, -3, 9],
    "Int64": [0, -2 ** 63, 2 ** 63 - 1, 3, -3, 9],
    "UInt8": [0, 255, 1, 128, 7, 9],
    "UInt16": [0, 2 ** 16 - 1, 1, 2 ** 15, 7, 9],
    "UInt32": [0, 2 ** 32 - 1, 1, 2 ** 31, 7, 9],
    "UInt64": [0, 2 ** 64 - 1, 1, 2 ** 63, 2 ** 63 - 1, 9],
    "Float32": [0.0, 0.5, -1.25, 3.0, 2.0 ** 100, INF],
    "Float64": [0.0, 1.5, -2.25, 1e-300, -INF, 5e-324],
    "ByteString": [b"", b"a", b"\x00\xff", b"x" * 300, b"hello", b"A" * 5000],
    "String": ["", "a", "\u00e9t\u00e9", "\U0001F600", "x" * 300, "\u4e2d" * 2000],
    "Agent": [AgentV(b"Felix", 31), AgentV(b"", 0), AgentV(b"Bond", 42), AgentV(None, -1),
              AgentV(b"x" * 200, 7), AgentV(b"M", 2 ** 62)],
    "Buffer": [b"", b"\x01\x02", bytes(range(256)), b"z" * 1000, b"q", b"r" * 5000],
    "LInt": [[], [1], [1, 2, 3], [-5] * 10, [2 ** 63 - 1], list(range(100))],
    "DStrInt": [{}, {"a": 1}, {"b": 2, "c": 3}, {"\u00e9": -1}, {"x" * 50: 0},
                {str(i): i for i in range(40)}],
    "SString": [set(), {"a"}, {"a", "b"}, {"\U0001F600"}, {"z" * 100}, {str(i) for i in range(30)}],
}
#: distinct hashable samples for keys
KEY_SAMPLES = {t: SAMPLES[t] for t in ("Int", "Float", "String", "ByteString", "Int8", "UInt64")}

#: wrong-typed values per element type (TypeError), for the persistent side
BAD_VALUES = {
    "Int": ["1", 1.5, b"1", [1], None, 1j],
    "Float": ["1.0", b"1", [1.0], None, 1j],
    "Bool": ["True", 0.5, None, [True]],
    "ByteString": ["text", 1, 1.5],
    "String": [b"bytes", 1, 1.5],
    "Agent": [b"x", 1, "Other"],
    "Buffer": ["text", 1, 1.5],
    "LInt": [1, ["x"], [1.5], "SInt"],
    "DStrInt": [1, {"a": "x"}, {1: 1}],
    "SString": [1, {1}],
}
for _t in VALUE_TYPES:
    if _t not in BAD_VALUES:
        BAD_VALUES[_t] = BAD_VALUES["Float" if _t.startswith("Float") else "Int"]
#: values that do not fit (OverflowError), for the persistent side
OVERFLOW_VALUES = {
    "Int": [2 ** 63, -2 ** 63 - 1], "Int64": [2 ** 63, -2 ** 63 - 1],
    "Int8": [128, -129], "Int16": [2 ** 15, -2 ** 15 - 1], "Int32": [2 ** 31, -2 ** 31 - 1],
    "UInt8": [256, -1], "UInt16": [2 ** 16, -1], "UInt32": [2 ** 32, -1], "UInt64": [2 ** 64, -1],
    "Float32": [1e40, -1e40], "Float": [10 ** 400], "Float64": [10 ** 400],
}


def _kind_of_list(elem):
    return "L" + elem


# -- the reference sorted dict ---------------------------------------------------------------
class RefSortedDict(abc.MutableMapping):
    """A minimal sorted dict on top of ``dict`` + a sorted key list kept with ``bisect``.

    The API is the one the persistent ``SortedDict`` promises: a MutableMapping that
    iterates in key order, ``popitem(index=-1)`` (IndexError when empty),
    ``peekitem(index=-1)``, ``irange``, ``bisect_left``, ``bisect_right``, ``index``.
    """

    def __init__(self, *args, **kwargs):
        self._d = {}
        self._keys = []
        self.update(*args, **kwargs)

    def __getitem__(self, key):
        return self._d[key]

    def __setitem__(self, key, value):
        if key not in self._d:
            i = bisect.bisect_left(self._keys, key)  # TypeError here leaves both unchanged
            self._keys.insert(i, key)
        self._d[key] = value

    def __delitem__(self, key):
        del self._d[key]
        i = bisect.bisect_left(self._keys, key)
        assert self._keys[i] == key
        del self._keys[i]

    def __iter__(self):
        return iter(list(self._keys))

    def __len__(self):
        return len(self._d)

    def __repr__(self):
        return f"RefSortedDict({dict(self.items())!r})"

    def clear(self):
        self._d.clear()
        self._keys.clear()

    def popitem(self, index=-1):
        if not self._keys:
            raise KeyError("popitem(): sorted dict is empty")  # like dict and sortedcontainers
        key = self._keys[index]
        del self._keys[index if index >= 0 else len(self._keys) + index]
        return key, self._d.pop(key)

    def peekitem(self, index=-1):
        key = self._keys[index]
        return key, self._d[key]

    def bisect_left(self, key):
        return bisect.bisect_left(self._keys, key)

    def bisect_right(self, key):
        return bisect.bisect_right(self._keys, key)

    def index(self, key):
        if key not in self._d:
            raise ValueError(f"{key!r} is not in the sorted dict")
        return bisect.bisect_left(self._keys, key)

    def irange(self, minimum=None, maximum=None, inclusive=(True, True), reverse=False):
        keys = self._keys
        lo = 0 if minimum is None else (bisect.bisect_left if inclusive[0] else bisect.bisect_right)(keys, minimum)
        hi = len(keys) if maximum is None else (bisect.bisect_right if inclusive[1] else bisect.bisect_left)(keys, maximum)
        chosen = keys[lo:hi]
        return iter(chosen[::-1] if reverse else chosen)


def expected_irange(keys, minimum, maximum, inclusive, reverse):
    """irange computed the slow way, independent of RefSortedDict."""
    out = [k for k in sorted(keys)
           if (minimum is None or (k >= minimum if inclusive[0] else k > minimum))
           and (maximum is None or (k <= maximum if inclusive[1] else k < maximum))]
    return out[::-1] if reverse else out


def test_reference_sorted_dict_agrees_with_sortedcontainers():
    """Self-test of the reference against sortedcontainers, when that happens to be installed."""
    sortedcontainers = pytest.importorskip("sortedcontainers")
    rng = random.Random(5)
    ref, real = RefSortedDict(), sortedcontainers.SortedDict()
    for _ in range(2000):
        k = rng.randrange(-50, 50)
        op = rng.randrange(4)
        if op == 0 and ref:
            i = rng.randrange(-len(ref), len(ref))
            assert ref.popitem(i) == real.popitem(i)
        elif op == 1:
            assert ref.pop(k, None) == real.pop(k, None)
        else:
            ref[k] = real[k] = rng.random()
        assert list(ref.items()) == list(real.items())
        lo, hi = sorted((rng.randrange(-60, 60), rng.randrange(-60, 60)))
        inc = (rng.random() < 0.5, rng.random() < 0.5)
        rev = rng.random() < 0.5
        assert list(ref.irange(lo, hi, inc, rev)) == list(real.irange(lo, hi, inc, rev))
        assert ref.bisect_left(k) == real.bisect_left(k)
        assert ref.bisect_right(k) == real.bisect_right(k)


# -- the two implementations --------------------------------------------------------------------
def plain(x):
    """A persistent value (or a builtin one) as plain Python values, recursively."""
    if x is None or isinstance(x, (bool, int, float, bytes, str, AgentV, SpyV)):
        return x
    if isinstance(x, (permastruct.ByteString, permastruct.String)):
        return x.contents
    if isinstance(x, permastruct.Buffer):
        return bytes(x)
    if isinstance(x, (bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, permastruct.Structure):
        if hasattr(x, "code"):
            return SpyV(plain(x.name), x.age, plain(x.code))
        return AgentV(plain(x.name), x.age)
    if isinstance(x, abc.Mapping):
        return {plain(k): plain(v) for k, v in x.items()}
    if isinstance(x, abc.Set):
        return {plain(e) for e in x}
    if isinstance(x, (abc.Sequence, tuple)):
        return [plain(e) for e in x]
    raise AssertionError(f"cannot make {x!r} plain")


def snapshot(x):
    """Contents *and order* of a collection, as plain values."""
    if isinstance(x, abc.Mapping):
        return [(plain(k), plain(v)) for k, v in x.items()]
    return [plain(e) for e in x]


class BuiltinImpl:
    persistent = False
    name = "builtin"

    def make(self, kind, *args, size=None):
        category = KINDS[kind][0]
        return {"list": list, "dict": dict, "set": set, "sorted": RefSortedDict}[category](*args)

    def value(self, tname, v):
        """The value to store for the plain sample ``v`` of type ``tname``."""
        if isinstance(v, AgentV):
            return dataclasses.replace(v)
        if isinstance(v, list):
            return list(v)
        if isinstance(v, dict):
            return dict(v)
        if isinstance(v, set):
            return set(v)
        return v

    lookup = value

    def agent(self, name, age):
        return AgentV(name, age)

    def check(self):
        pass

    def commit(self):
        pass

    plain = staticmethod(plain)


class PersistentImpl:
    persistent = True

    def __init__(self, p, name):
        self.p = p
        self.name = name
        self._n = 0

    @property
    def s(self):
        return self.p.schema

    def make(self, kind, *args, size=None):
        cls = getattr(self.p.schema, kind)
        if size is not None:
            return cls(*args, size=size)
        return cls(*args)

    def value(self, tname, v):
        """The value to store for the plain sample ``v``: alternately the plain value, a new
        persistent object, and (for strings) an interned string."""
        self._n += 1
        alt = self._n % 3
        s = self.p.schema
        if tname == "Agent":
            return self.agent(v.name, v.age)
        if tname in ("ByteString", "String"):
            if alt == 0:
                return v
            if alt == 1:
                return getattr(s, tname)(v)
            return self.p.stringRegistry.get(v)
        if tname == "Buffer":
            return (bytes(v), s.Buffer(v), bytearray(v))[alt]
        if tname in KINDS:
            if alt == 0:
                return getattr(s, tname)(v)
            return v
        return v

    def lookup(self, tname, v):
        """A value to look ``v`` up with (``in``, ``index``, ``count``, ``remove``)."""
        if tname == "Agent":
            return self.agent(v.name, v.age)
        if tname == "Buffer":
            return self.p.schema.Buffer(v)
        return v

    def agent(self, name, age):
        if name is None:
            return self.p.schema.Agent(age=age)
        return self.p.schema.Agent(name=name, age=age)

    def check(self):
        summary = self.p.check()
        assert isinstance(summary, dict)
        return summary

    def commit(self):
        """Commit (which frees what nothing references any more) and check."""
        self.p.commit()
        self.check()

    plain = staticmethod(plain)


def _open(tmp_path, param):
    page_size = 256 if param.endswith("p256") else 4096
    mode = param if param in ("memory", "overlay") else "file"
    return open_store(ContractStorage, mode, tmp_path / f"contract-{page_size}.ps", pageSize=page_size)


@contextlib.contextmanager
def _persistent(tmp_path, param):
    p = _open(tmp_path, param)
    try:
        yield PersistentImpl(p, param)
        if not p.closed:
            p.check()
            p.commit()
            p.check()
    finally:
        p.close()


@pytest.fixture(params=["builtin", "persistent", "persistent-p256", "memory", "overlay"])
def impl(request, tmp_path):
    """A factory of collections: the builtins, or the persistent types (two page sizes)."""
    if request.param == "builtin":
        yield BuiltinImpl()
        return
    with _persistent(tmp_path, request.param) as pi:
        yield pi


@pytest.fixture(params=["persistent", "persistent-p256", "memory"])
def pimpl(request, tmp_path):
    """The persistent implementation only (for what builtins cannot express: wrong types...)."""
    with _persistent(tmp_path, request.param) as pi:
        yield pi


@contextlib.contextmanager
def unchanged(impl, coll, exc, match=None):
    """``exc`` is raised, and ``coll`` (contents and order) is as it was; check() passes."""
    before = snapshot(coll)
    with pytest.raises(exc, match=match):
        yield
    assert snapshot(coll) == before, "a failed operation changed the collection"
    impl.check()


class Idx:
    """An object with ``__index__`` (like numpy integers)."""

    def __init__(self, i):
        self.i = i

    def __index__(self):
        return self.i


# == List ===============================================================================================
def test_list_is_a_mutable_sequence(impl):
    lst = impl.make("LInt")
    assert isinstance(lst, abc.MutableSequence)
    assert isinstance(lst, abc.Sequence)
    with pytest.raises(TypeError):
        hash(lst)
    with pytest.raises(TypeError):
        {lst}


def test_list_construct(impl):
    assert impl.make("LInt") == []
    assert len(impl.make("LInt")) == 0
    assert not impl.make("LInt")
    assert impl.make("LInt", [1, 2, 3]) == [1, 2, 3]
    assert impl.make("LInt", (1, 2)) == [1, 2]
    assert impl.make("LInt", range(4)) == [0, 1, 2, 3]
    assert impl.make("LInt", (x * x for x in range(5))) == [0, 1, 4, 9, 16]
    assert impl.make("LInt", iter([7])) == [7]
    assert impl.make("LInt", {3: "a", 1: "b"}) == [3, 1]
    assert impl.make("LString", ["a", "\u00e9", ""]) == ["a", "\u00e9", ""]
    assert impl.make("LString", "abc") == ["a", "b", "c"]
    assert impl.make("LFloat", [1, 2.5]) == [1.0, 2.5]
    big = impl.make("LInt", range(3000))
    assert len(big) == 3000 and big[2999] == 2999 and big[-3000] == 0
    other = impl.make("LInt", [4, 5])
    assert impl.make("LInt", other) == [4, 5]
    assert bool(impl.make("LInt", [0]))
    with pytest.raises(TypeError):
        impl.make("LInt", 5)
    impl.check()


def test_list_equality(impl):
    lst = impl.make("LInt", [1, 2, 3])
    assert lst == [1, 2, 3]
    assert [1, 2, 3] == lst
    assert not (lst != [1, 2, 3])
    assert lst != [1, 2]
    assert lst != [1, 2, 3, 4]
    assert lst != [3, 2, 1]
    assert [1, 2] != lst
    assert lst == impl.make("LInt", [1, 2, 3])
    assert lst != impl.make("LInt", [1, 2])
    assert lst == impl.make("LFloat", [1.0, 2.0, 3.0])
    assert lst != (1, 2, 3)          # like list: a tuple is not equal
    assert lst != {1, 2, 3}
    assert lst != "123"
    assert lst != None  # noqa: E711
    assert impl.make("LInt") == []
    assert impl.make("LString", ["a", "b"]) == ["a", "b"]
    assert impl.make("LString", ["a", "b"]) != [b"a", b"b"]
    assert impl.make("LByteString", [b"a"]) == [b"a"]
    assert impl.make("LByteString", [b"a"]) != ["a"]
    assert lst == lst


def test_list_getitem(impl):
    lst = impl.make("LInt", [10, 20, 30])
    assert [lst[0], lst[1], lst[2], lst[-1], lst[-2], lst[-3]] == [10, 20, 30, 30, 20, 10]
    assert type(lst[0]) is int
    for i in (3, 4, -4, 100, -100, 2 ** 70, -2 ** 70):
        with pytest.raises(IndexError):
            lst[i]
    for i in ("1", 1.0, None, [0], b"0", (0,)):
        with pytest.raises(TypeError):
            lst[i]
    with pytest.raises(IndexError):
        impl.make("LInt")[0]
    with pytest.raises(IndexError):
        impl.make("LInt")[-1]


def test_list_index_protocol(impl):
    """Indexes may be any object with ``__index__`` (numpy ints, bools), as for list."""
    lst = impl.make("LInt", [10, 20, 30])
    assert lst[Idx(1)] == 20
    assert lst[Idx(-1)] == 30
    assert lst[True] == 20
    assert lst[False] == 10
    assert lst[Idx(0):Idx(2)] == [10, 20]
    lst[Idx(2)] = 33
    del lst[Idx(0)]
    assert lst == [20, 33]
    lst.insert(Idx(0), 1)
    assert lst.pop(Idx(0)) == 1
    assert lst == [20, 33]
    impl.check()


def test_list_slices_read(impl):
    data = list(range(7))
    lst = impl.make("LInt", data)
    bounds = [None, *range(-9, 10), 2 ** 70, -2 ** 70]
    for a in bounds:
        for b in bounds:
            for c in (None, 1, 2, 3, -1, -2, -5, 2 ** 70):
                got = lst[a:b:c]
                assert type(got) is list, f"lst[{a}:{b}:{c}] is a {type(got).__name__}"
                assert got == data[a:b:c], f"lst[{a}:{b}:{c}]"
    assert lst[slice(Idx(1), Idx(3))] == [1, 2]
    with pytest.raises(ValueError):
        lst[::0]
    with pytest.raises(TypeError):
        lst["a":]
    with pytest.raises(TypeError):
        lst[:1.5]
    assert impl.make("LInt")[:] == []
    strs = impl.make("LString", ["a", "b", "c"])
    assert strs[1:] == ["b", "c"]
    assert strs[::-1] == ["c", "b", "a"]


def test_list_setitem(impl):
    lst = impl.make("LInt", [1, 2, 3])
    lst[0] = 10
    lst[-1] = 30
    lst[1] = -2 ** 63
    assert lst == [10, -2 ** 63, 30]
    lst[1] = True  # bool into Int: stored as 1
    assert lst == [10, 1, 30]
    for i in (3, -4, 2 ** 70):
        with unchanged(impl, lst, IndexError):
            lst[i] = 5
    for i in ("0", 0.0, None):
        with unchanged(impl, lst, TypeError):
            lst[i] = 5
    with unchanged(impl, impl.make("LInt"), IndexError):
        impl.make("LInt")[0] = 1
    impl.check()


def test_list_slice_assign(impl):
    base = [0, 1, 2, 3, 4]
    bounds = [None, -7, -2, 0, 1, 3, 5, 8]
    for a in bounds:
        for b in bounds:
            for vals in ([], [9], [9, 8], [7, 8, 9, 6, 5, 4, 3]):
                for step in (None, 1):
                    lst = impl.make("LInt", base)
                    ref = list(base)
                    lst[a:b:step] = vals
                    ref[a:b:step] = vals
                    assert lst == ref, f"[{a}:{b}:{step}] = {vals}"
    impl.check()


def test_list_slice_assign_iterables_and_self(impl):
    lst = impl.make("LInt", [0, 1, 2])
    lst[1:2] = iter([5, 6])
    assert lst == [0, 5, 6, 2]
    lst[:0] = (x for x in (-1, -2))
    assert lst == [-1, -2, 0, 5, 6, 2]
    lst[2:4] = range(3)
    assert lst == [-1, -2, 0, 1, 2, 6, 2]
    lst[:] = (7, 8)
    assert lst == [7, 8]
    lst[:] = lst
    assert lst == [7, 8]
    lst[1:1] = lst
    assert lst == [7, 7, 8, 8]
    lst[::-1] = lst
    assert lst == [8, 8, 7, 7]
    lst[:] = []
    assert lst == []
    strs = impl.make("LString", ["x"])
    strs[0:0] = "ab"
    assert strs == ["a", "b", "x"]
    with unchanged(impl, lst, TypeError):
        lst[0:1] = 5
    lst.extend([1, 2, 3])
    with unchanged(impl, lst, TypeError):
        lst[0:1] = None
    impl.check()


def test_list_extended_slice_assign(impl):
    base = list(range(8))
    bounds = [None, -9, -3, 0, 2, 5, 9]
    for a in bounds:
        for b in bounds:
            for c in (2, 3, -1, -2, -3):
                n = len(base[a:b:c])
                lst = impl.make("LInt", base)
                ref = list(base)
                vals = [100 + i for i in range(n)]
                lst[a:b:c] = vals
                ref[a:b:c] = vals
                assert lst == ref, f"[{a}:{b}:{c}] = {vals}"
                with unchanged(impl, lst, ValueError):
                    lst[a:b:c] = vals + [1]
                if n:
                    with unchanged(impl, lst, ValueError):
                        lst[a:b:c] = vals[1:]
    lst = impl.make("LInt", base)
    with unchanged(impl, lst, ValueError):
        lst[::0] = []
    with unchanged(impl, lst, ValueError):
        lst[::0] = [1, 2]
    lst[::2] = (x for x in range(4))
    assert lst == [0, 1, 1, 3, 2, 5, 3, 7]
    impl.check()


def test_list_delitem(impl):
    base = [0, 1, 2, 3, 4, 5]
    for i in range(-6, 6):
        lst = impl.make("LInt", base)
        ref = list(base)
        del lst[i]
        del ref[i]
        assert lst == ref
    lst = impl.make("LInt", base)
    for i in (6, -7, 2 ** 70):
        with unchanged(impl, lst, IndexError):
            del lst[i]
    for i in ("0", None, 1.0):
        with unchanged(impl, lst, TypeError):
            del lst[i]
    with unchanged(impl, impl.make("LInt"), IndexError):
        del impl.make("LInt")[0]
    impl.check()


def test_list_delete_slices(impl):
    base = list(range(7))
    bounds = [None, -9, -3, -1, 0, 1, 4, 7, 10]
    for a in bounds:
        for b in bounds:
            for c in (None, 1, 2, 3, -1, -2):
                lst = impl.make("LInt", base)
                ref = list(base)
                del lst[a:b:c]
                del ref[a:b:c]
                assert lst == ref, f"del [{a}:{b}:{c}]"
    lst = impl.make("LInt", base)
    with unchanged(impl, lst, ValueError):
        del lst[::0]
    del lst[:]
    assert lst == []
    impl.check()


def test_list_append_extend_iadd(impl):
    lst = impl.make("LInt")
    lst.append(1)
    lst.append(-2 ** 63)
    assert lst == [1, -2 ** 63]
    lst.extend([2, 3])
    lst.extend(range(4, 6))
    lst.extend(x for x in [6])
    lst.extend(())
    lst.extend(impl.make("LInt", [7]))
    assert lst == [1, -2 ** 63, 2, 3, 4, 5, 6, 7]
    same = lst
    lst += [8, 9]
    assert lst is same
    assert lst == [1, -2 ** 63, 2, 3, 4, 5, 6, 7, 8, 9]
    lst += range(2)
    assert lst[-2:] == [0, 1]
    short = impl.make("LInt", [1, 2])
    short.extend(short)
    assert short == [1, 2, 1, 2]
    short += short
    assert short == [1, 2, 1, 2] * 2
    with unchanged(impl, short, TypeError):
        short.extend(5)
    with unchanged(impl, short, TypeError):
        short += 5
    with pytest.raises(TypeError):
        short.append()
    for i in range(1000):
        short.append(i)
    assert len(short) == 1008 and short[-1] == 999 and short[8] == 0
    impl.check()


def test_list_insert(impl):
    base = [0, 1, 2, 3]
    for i in range(-7, 8):
        lst = impl.make("LInt", base)
        ref = list(base)
        lst.insert(i, 99)
        ref.insert(i, 99)
        assert lst == ref, f"insert({i})"
    lst = impl.make("LInt")
    lst.insert(5, 1)
    lst.insert(-5, 0)
    lst.insert(1, 5)
    assert lst == [0, 5, 1]
    with unchanged(impl, lst, TypeError):
        lst.insert("0", 1)
    with unchanged(impl, lst, TypeError):
        lst.insert(None, 1)
    with unchanged(impl, lst, TypeError):
        lst.insert(0.0, 1)
    front = impl.make("LInt")
    for i in range(300):
        front.insert(0, i)
    assert front == list(range(299, -1, -1))
    impl.check()


def test_list_pop(impl):
    lst = impl.make("LInt", [1, 2, 3, 4, 5])
    assert lst.pop() == 5
    assert lst.pop(0) == 1
    assert lst.pop(-1) == 4
    assert lst == [2, 3]
    for i in (2, -3, 100):
        with unchanged(impl, lst, IndexError):
            lst.pop(i)
    with unchanged(impl, lst, TypeError):
        lst.pop("0")
    with unchanged(impl, lst, TypeError):
        lst.pop(0.0)
    assert lst.pop(1) == 3
    assert lst.pop() == 2
    assert lst == []
    with unchanged(impl, lst, IndexError, match="pop from empty list"):
        lst.pop()
    with unchanged(impl, lst, IndexError):
        lst.pop(0)
    impl.check()


def test_list_remove(impl):
    lst = impl.make("LInt", [1, 2, 3, 2, 1])
    lst.remove(2)
    assert lst == [1, 3, 2, 1]
    lst.remove(1.0)
    assert lst == [3, 2, 1]
    lst.remove(True)
    assert lst == [3, 2]
    for missing in (9, 2.5, "x", None, b"2", [2], 2 ** 70, -2 ** 70):
        with unchanged(impl, lst, ValueError):
            lst.remove(missing)
    with unchanged(impl, impl.make("LInt"), ValueError):
        impl.make("LInt").remove(1)
    strs = impl.make("LString", ["a", "b", "a"])
    strs.remove("a")
    assert strs == ["b", "a"]
    with unchanged(impl, strs, ValueError):
        strs.remove(b"a")
    with unchanged(impl, strs, ValueError):
        strs.remove(1)
    impl.check()


def test_list_index_count_contains(impl):
    lst = impl.make("LInt", [1, 3, 2, 1, 5])
    assert lst.index(1) == 0
    assert lst.index(1, 1) == 3
    assert lst.index(5) == 4
    assert lst.index(1, -2) == 3
    assert lst.index(3, -100, 100) == 1
    assert lst.index(2, 0, 3) == 2
    assert lst.index(1.0) == 0
    assert lst.index(True) == 0
    assert lst.index(1, Idx(1)) == 3
    for args in ((1, 1, 3), (5, 0, 4), (5, -1, -1), (1, 10), (9,), ("1",), (None,), (2 ** 70,),
                 (1.5,), (2, 3, 2)):
        with pytest.raises(ValueError):
            lst.index(*args)
    with pytest.raises(TypeError):
        lst.index(1, "a")
    with pytest.raises(TypeError):
        lst.index(1, 0, 1.5)
    assert lst.count(1) == 2
    assert lst.count(1.0) == 2
    assert lst.count(True) == 2
    assert lst.count(9) == 0
    assert lst.count("1") == 0
    assert lst.count(2 ** 70) == 0
    assert 5 in lst and 5.0 in lst and True in lst
    assert 9 not in lst
    assert "1" not in lst and None not in lst and [1] not in lst and 2 ** 70 not in lst
    assert 1.5 not in lst
    empty = impl.make("LInt")
    assert 0 not in empty and empty.count(0) == 0
    with pytest.raises(ValueError):
        empty.index(0)
    strs = impl.make("LString", ["a", "\u00e9", "a"])
    assert strs.index("\u00e9") == 1
    assert strs.count("a") == 2
    assert "a" in strs and b"a" not in strs and 1 not in strs
    byts = impl.make("LByteString", [b"a", b""])
    assert byts.index(b"") == 1
    assert b"a" in byts and "a" not in byts
    assert byts.count(b"") == 1


def test_list_iteration_and_reversed(impl):
    lst = impl.make("LInt", [1, 2, 3])
    it = iter(lst)
    assert next(it) == 1
    assert list(it) == [2, 3]
    assert list(lst) == [1, 2, 3]
    assert list(reversed(lst)) == [3, 2, 1]
    assert [x for x in impl.make("LInt")] == []
    assert list(reversed(impl.make("LInt"))) == []
    assert sum(impl.make("LInt", range(101))) == 5050
    assert list(impl.make("LString", ["b", "a"])) == ["b", "a"]
    assert list(reversed(impl.make("LString", ["b", "a"]))) == ["a", "b"]


def test_list_clear_reverse(impl):
    lst = impl.make("LInt", range(10))
    lst.reverse()
    assert lst == list(range(9, -1, -1))
    lst.clear()
    assert lst == [] and len(lst) == 0
    lst.clear()
    lst.reverse()
    assert lst == []
    lst.append(1)
    assert lst == [1]
    odd = impl.make("LString", ["a", "b", "c"])
    odd.reverse()
    assert odd == ["c", "b", "a"]
    impl.check()


def test_list_sort(impl):
    data = [3, -1, 2, -2 ** 63, 2 ** 63 - 1, 0, 2, -7]
    lst = impl.make("LInt", data)
    assert lst.sort() is None
    assert lst == sorted(data)
    lst.sort(reverse=True)
    assert lst == sorted(data, reverse=True)
    lst.sort(key=lambda x: x % 3)
    assert lst == sorted(sorted(data, reverse=True), key=lambda x: x % 3)  # stable
    lst.sort(key=abs, reverse=True)
    assert lst == sorted(sorted(sorted(data, reverse=True), key=lambda x: x % 3), key=abs, reverse=True)
    words = ["b", "a", "\u00e9", "", "B", "ab", "\U0001F600", "\u4e2d"]
    strs = impl.make("LString", words)
    strs.sort()
    assert strs == sorted(words)
    strs.sort(key=len)
    assert strs == sorted(sorted(words), key=len)
    blobs = [b"b", b"", b"\xff", b"a\x00", b"a"]
    byts = impl.make("LByteString", blobs)
    byts.sort(reverse=True)
    assert byts == sorted(blobs, reverse=True)
    floats = impl.make("LFloat", [1.5, -INF, 0.0, INF, -2.0])
    floats.sort()
    assert floats == [-INF, -2.0, 0.0, 1.5, INF]
    agents = impl.make("LAgent", [impl.agent(b"c", 3), impl.agent(b"a", 1), impl.agent(b"b", 2)])
    agents.sort(key=lambda a: a.age)
    assert [a.age for a in agents] == [1, 2, 3]
    agents.sort(key=lambda a: bytes(a.name), reverse=True)
    assert [bytes(a.name) for a in agents] == [b"c", b"b", b"a"]
    with pytest.raises(TypeError):
        agents.sort()  # structures have no order
    with pytest.raises(TypeError):
        lst.sort(lambda x: x)  # key is keyword-only
    empty = impl.make("LInt")
    empty.sort()
    assert empty == []
    impl.check()


def test_list_float_values(impl):
    lst = impl.make("LFloat", [-0.0, INF, -INF, 5e-324, 1e308])
    assert math.copysign(1.0, lst[0]) == -1.0
    assert lst[1:] == [INF, -INF, 5e-324, 1e308]
    lst.append(float("nan"))
    assert math.isnan(lst[-1])
    lst.append(2)
    assert lst[-1] == 2.0
    if impl.persistent:
        assert type(lst[-1]) is float     # an int stored in a Float reads back as a float
    bools = impl.make("LBool", [True, False])
    assert bools == [True, False]
    assert bools[0] is True and bools[1] is False


# -- every element type: the same script against a plain list ----------------------------------
LIST_ELEMENT_TYPES = VALUE_TYPES + REF_TYPES + NESTED_TYPES


@pytest.mark.parametrize("etype", LIST_ELEMENT_TYPES)
def test_list_of_each_element_type(impl, etype):
    vals = SAMPLES[etype]
    kind = _kind_of_list(etype)

    def v(x):
        return impl.value(etype, x)

    lst = impl.make(kind, [v(x) for x in vals[:3]])
    ref = list(vals[:3])

    def same():
        assert len(lst) == len(ref)
        assert impl.plain(lst) == ref
        impl.check()

    same()
    for i in range(-3, 3):
        assert impl.plain(lst[i]) == ref[i]
    for x, plain_x in zip(lst, ref):
        assert impl.plain(x) == plain_x
    lst.append(v(vals[3]))
    ref.append(vals[3])
    same()
    lst.insert(1, v(vals[4]))
    ref.insert(1, vals[4])
    lst.insert(-1, v(vals[5]))
    ref.insert(-1, vals[5])
    lst.insert(100, v(vals[0]))
    ref.insert(100, vals[0])
    same()
    lst[0] = v(vals[5])
    ref[0] = vals[5]
    lst[-1] = v(vals[2])
    ref[-1] = vals[2]
    same()
    lst[1:3] = [v(vals[0]), v(vals[1]), v(vals[2])]
    ref[1:3] = [vals[0], vals[1], vals[2]]
    same()
    n = len(ref[::2])
    new = [vals[i % len(vals)] for i in range(n)]
    lst[::2] = [v(x) for x in new]
    ref[::2] = new
    same()
    assert impl.plain(lst[1:4]) == ref[1:4]
    assert impl.plain(lst[::-1]) == ref[::-1]
    assert [impl.plain(x) for x in reversed(lst)] == ref[::-1]
    for x in vals:
        q = impl.lookup(etype, x)
        assert (q in lst) == (x in ref)
        assert lst.count(q) == ref.count(x)
        if x in ref:
            assert lst.index(q) == ref.index(x)
            assert lst.index(q, 1) == ref.index(x, 1) if x in ref[1:] else True
        else:
            with pytest.raises(ValueError):
                lst.index(q)
    assert impl.plain(lst.pop()) == ref.pop()
    assert impl.plain(lst.pop(0)) == ref.pop(0)
    assert impl.plain(lst.pop(-2)) == ref.pop(-2)
    same()
    target = ref[1]
    lst.remove(impl.lookup(etype, target))
    ref.remove(target)
    same()
    del lst[0]
    del ref[0]
    del lst[-1]
    del ref[-1]
    same()
    lst.extend([v(x) for x in vals])
    ref.extend(vals)
    del lst[1:3]
    del ref[1:3]
    same()
    del lst[::2]
    del ref[::2]
    same()
    lst += [v(vals[0]), v(vals[1])]
    ref += [vals[0], vals[1]]
    lst.reverse()
    ref.reverse()
    same()
    impl.commit()
    same()
    lst[0] = lst[0]                  # the same object again
    lst[-1] = lst[1]                 # shared by two positions
    ref[-1] = ref[1]
    lst[:] = lst                     # self-assignment
    lst.extend(lst)                  # self-extension
    ref.extend(ref)
    lst.append(lst.pop(0))           # out and back in
    ref.append(ref.pop(0))
    same()
    impl.commit()
    same()
    del lst[len(lst) // 2:]
    del ref[len(ref) // 2:]
    impl.commit()
    same()
    copy = impl.make(kind, lst)
    assert impl.plain(copy) == ref
    assert copy == lst and not (copy != lst)
    copy.append(v(vals[0]))
    assert copy != lst
    assert impl.plain(lst) == ref
    lst.clear()
    ref.clear()
    same()
    lst.extend(v(x) for x in vals)
    ref.extend(vals)
    same()


@pytest.mark.parametrize("etype", VALUE_TYPES + ("ByteString", "String"))
def test_list_sort_each_element_type(impl, etype):
    vals = SAMPLES[etype] * 2
    random.Random(etype).shuffle(vals)
    lst = impl.make(_kind_of_list(etype), [impl.value(etype, x) for x in vals])
    lst.sort()
    assert impl.plain(lst) == sorted(vals)
    lst.sort(reverse=True)
    assert impl.plain(lst) == sorted(vals, reverse=True)
    impl.check()


def test_list_of_agents_holds_references(impl):
    a = impl.agent(b"Felix", 31)
    agents = impl.make("LAgent", [a, a])
    agents.append(impl.agent(b"Bond", 7))
    agents[0].age = 32  # through the collection, into the shared object
    assert a.age == 32
    assert agents[1].age == 32
    assert impl.plain(agents) == [AgentV(b"Felix", 32), AgentV(b"Felix", 32), AgentV(b"Bond", 7)]
    a.name = b"Felix the Cat"
    assert agents[1].name == b"Felix the Cat"
    assert agents.index(impl.agent(b"Bond", 7)) == 2
    assert impl.agent(b"Bond", 8) not in agents
    agents.remove(impl.agent(b"Felix the Cat", 32))
    assert len(agents) == 2 and agents[0].name == b"Felix the Cat"
    impl.check()


def test_list_of_lists(impl):
    m = impl.make("LLInt", [[1, 2], [], [3]])
    assert m == [[1, 2], [], [3]]
    assert [[1, 2], [], [3]] == m
    m[0].append(9)
    m[1].extend([4, 5])
    assert m == [[1, 2, 9], [4, 5], [3]]
    row = m[2]
    row.insert(0, 0)
    assert m[2] == [0, 3]
    m.append([7])
    m.append(impl.make("LInt", [8]))
    assert m[-2:] == [[7], [8]]
    m[0] = [6]
    assert m[0] == [6]
    del m[1]
    assert m == [[6], [0, 3], [7], [8]]
    assert [0, 3] in m and [3, 0] not in m
    assert m.index([7]) == 2
    m.remove([8])
    m.sort(key=len, reverse=True)
    assert m == [[0, 3], [6], [7]]
    m.reverse()
    assert m == [[7], [6], [0, 3]]
    m[0:2] = [[1], [2], [3]]
    assert m == [[1], [2], [3], [0, 3]]
    assert m.pop() == [0, 3]
    assert m != [[1], [2], [4]]
    m.clear()
    m.append([0])
    m.append([1, 2])
    m.append(m.pop(0))              # a nested list out and back in
    del m[-1]
    m.insert(0, m[0])               # the same nested list twice
    m[0].append(3)
    assert m == [[1, 2, 3], [1, 2, 3]]
    impl.commit()
    assert m == [[1, 2, 3], [1, 2, 3]]
    m.pop()
    impl.commit()
    assert m == [[1, 2, 3]]
    m.clear()
    assert m == []
    impl.check()


def test_mutation_while_iterating_values(impl):
    """Changing values (not the size) while iterating is allowed, as for the builtins."""
    lst = impl.make("LInt", [1, 2, 3])
    for i, x in enumerate(lst):
        lst[i] = x * 10
    assert lst == [10, 20, 30]
    d = impl.make("DStrInt", {"a": 1, "b": 2})
    for k in d:
        d[k] += 1
    assert list(d.items()) == [("a", 2), ("b", 3)]
    sd = impl.make("SDIntInt", {2: 1, 1: 2})
    for k in sd:
        sd[k] = -sd[k]
    assert list(sd.items()) == [(1, -2), (2, -1)]
    by_name = impl.make("DBytesAgent", {b"a": impl.agent(b"a", 1)})
    for k in list(by_name):
        by_name[k] = by_name[k]      # the same object again
    impl.commit()
    assert by_name[b"a"].age == 1
    impl.check()


def test_list_of_dicts_and_sets(impl):
    ld = impl.make("LDStrInt", [{"a": 1}])
    ld.append({"b": 2})
    ld[0]["c"] = 3
    assert ld == [{"a": 1, "c": 3}, {"b": 2}]
    assert {"b": 2} in ld
    ls = impl.make("LSString", [{"x"}])
    ls[0].add("y")
    ls.append({"z"})
    assert ls == [{"x", "y"}, {"z"}]
    assert ls.index({"z"}) == 1
    impl.check()


# == Dict ===============================================================================================
def test_dict_is_a_mutable_mapping(impl):
    d = impl.make("DStrInt")
    assert isinstance(d, abc.MutableMapping)
    with pytest.raises(TypeError):
        hash(d)


def test_dict_construct(impl):
    assert impl.make("DStrInt") == {}
    assert not impl.make("DStrInt")
    assert impl.make("DStrInt", {"a": 1, "b": 2}) == {"a": 1, "b": 2}
    assert impl.make("DStrInt", [("a", 1), ("b", 2)]) == {"a": 1, "b": 2}
    assert impl.make("DStrInt", (("a", i) for i in range(3))) == {"a": 2}
    d = impl.make("DStrInt", [("a", 1), ("b", 2), ("a", 3)])
    assert list(d.items()) == [("a", 3), ("b", 2)]
    assert impl.make("DStrInt", impl.make("DStrInt", {"x": 1})) == {"x": 1}
    assert impl.make("DStrInt", impl.make("SDStrInt", {"y": 1, "x": 2})) == {"x": 2, "y": 1}
    big = impl.make("DIntString", {i: str(i) for i in range(2000)})
    assert len(big) == 2000 and big[1999] == "1999"
    hinted = impl.make("DStrInt", size=1000)
    assert hinted == {} and len(hinted) == 0
    for i in range(1500):
        hinted[str(i)] = i
    assert hinted == {str(i): i for i in range(1500)}
    with pytest.raises(TypeError):
        impl.make("DStrInt", 5)
    with pytest.raises(ValueError):
        impl.make("DStrInt", [("a",)])
    impl.check()


def test_dict_getitem_setitem_delitem(impl):
    d = impl.make("DStrInt", {"a": 1})
    assert d["a"] == 1
    d["b"] = 2
    d["a"] = 10
    assert d == {"a": 10, "b": 2}
    assert len(d) == 2
    for missing in ("c", "", "A", b"a", 1, None, 1.5, ("a",)):
        with pytest.raises(KeyError):
            d[missing]
    with unchanged(impl, d, KeyError):
        del d["c"]
    with unchanged(impl, d, KeyError):
        del d[b"a"]
    with unchanged(impl, d, KeyError):
        del d[0]
    del d["a"]
    assert d == {"b": 2}
    with unchanged(impl, d, KeyError):
        del d["a"]
    with pytest.raises(KeyError) as info:
        d["zz"]
    assert info.value.args == ("zz",)
    impl.check()


def test_dict_unhashable_keys(impl):
    d = impl.make("DStrInt", {"a": 1})
    for bad in (["a"], {"a": 1}, {"a"}, bytearray(b"a")):
        with unchanged(impl, d, TypeError):
            d[bad]
        with unchanged(impl, d, TypeError):
            bad in d
        with unchanged(impl, d, TypeError):
            d.get(bad)
        with unchanged(impl, d, TypeError):
            d.get(bad, 0)
        with unchanged(impl, d, TypeError):
            d.pop(bad, None)
        with unchanged(impl, d, TypeError):
            del d[bad]
        with unchanged(impl, d, TypeError):
            d[bad] = 1
        with unchanged(impl, d, TypeError):
            d.setdefault(bad, 1)
    byts = impl.make("DBytesAgent", {b"a": impl.agent(b"a", 1)})
    with unchanged(impl, byts, TypeError):
        bytearray(b"a") in byts
    with unchanged(impl, byts, TypeError):
        byts[bytearray(b"a")]


def test_dict_order(impl):
    d = impl.make("DStrInt", {"b": 1, "a": 2, "c": 3})
    assert list(d) == ["b", "a", "c"]
    d["a"] = 20                     # overwriting keeps the position
    assert list(d) == ["b", "a", "c"]
    del d["b"]
    d["b"] = 5                      # delete + reinsert moves it to the end
    assert list(d) == ["a", "c", "b"]
    assert list(d.values()) == [20, 3, 5]
    assert list(d.items()) == [("a", 20), ("c", 3), ("b", 5)]
    d.update({"a": 0, "z": 9})
    assert list(d.items()) == [("a", 0), ("c", 3), ("b", 5), ("z", 9)]
    d.pop("c")
    d.setdefault("c", 7)
    assert list(d) == ["a", "b", "z", "c"]
    assert d.popitem() == ("c", 7)
    assert list(d) == ["a", "b", "z"]


def test_dict_order_many_keys(impl):
    rng = random.Random(11)
    d = impl.make("DIntString")
    ref = {}
    for step in range(3000):
        k = rng.randrange(600)
        r = rng.random()
        if r < 0.55:
            d[k] = ref[k] = str(step)
        elif r < 0.9:
            assert d.pop(k, None) == ref.pop(k, None)
        elif ref and r < 0.93:
            assert d.popitem() == ref.popitem()
        else:
            assert (k in d) == (k in ref)
    assert list(d.items()) == list(ref.items())
    assert len(d) == len(ref)
    for k in range(600):
        assert d.get(k) == ref.get(k)
    impl.check()


def test_dict_contains_len_iter_views(impl):
    d = impl.make("DStrInt", {"a": 1, "b": 2})
    assert "a" in d and "z" not in d and 1 not in d and b"a" not in d and None not in d
    assert len(d) == 2
    assert sorted(d) == ["a", "b"]
    keys, values, items = d.keys(), d.values(), d.items()
    assert len(keys) == 2 and len(values) == 2 and len(items) == 2
    assert "a" in keys and "z" not in keys
    assert 2 in values and 3 not in values
    assert ("a", 1) in items and ("a", 2) not in items and ("z", 1) not in items
    assert keys == {"a", "b"}
    assert keys & {"a", "z"} == {"a"}
    assert keys - {"a"} == {"b"}
    assert items == {("a", 1), ("b", 2)}
    d["c"] = 3                      # views are live
    assert len(keys) == 3 and list(values) == [1, 2, 3]
    assert list(items) == [("a", 1), ("b", 2), ("c", 3)]
    assert isinstance(keys, abc.KeysView) and isinstance(items, abc.ItemsView)
    assert isinstance(values, abc.ValuesView)
    assert dict(d) == {"a": 1, "b": 2, "c": 3}


def test_dict_equality(impl):
    d = impl.make("DStrInt", {"a": 1, "b": 2})
    assert d == {"a": 1, "b": 2}
    assert d == {"b": 2, "a": 1}          # order does not matter for ==
    assert {"b": 2, "a": 1} == d
    assert d != {"a": 1}
    assert d != {"a": 1, "b": 3}
    assert d != {"a": 1, "b": 2, "c": 3}
    assert d == impl.make("DStrInt", [("b", 2), ("a", 1)])
    assert d == impl.make("SDStrInt", {"a": 1, "b": 2})
    assert d == {"a": 1.0, "b": 2.0}
    assert d != [("a", 1), ("b", 2)]
    assert d != {"a", "b"}
    assert d != None  # noqa: E711
    assert impl.make("DStrInt") == {}
    assert impl.make("DStrInt") != []


def test_dict_get_setdefault_pop(impl):
    d = impl.make("DStrInt", {"a": 1})
    assert d.get("a") == 1
    assert d.get("z") is None
    assert d.get("z", 5) == 5
    assert d.get(1, "x") == "x"
    assert d.setdefault("a", 9) == 1
    assert d.setdefault("b", 2) == 2
    assert d == {"a": 1, "b": 2}
    assert d.pop("a") == 1
    assert d.pop("a", "gone") == "gone"
    assert d.pop(b"b", None) is None
    assert d.pop(1, 0) == 0
    with unchanged(impl, d, KeyError):
        d.pop("a")
    with unchanged(impl, d, KeyError):
        d.pop(1)
    assert d == {"b": 2}
    with pytest.raises(TypeError):
        d.get()
    with pytest.raises(TypeError):
        d.pop()
    impl.check()


def test_dict_popitem(impl):
    d = impl.make("DStrInt", {"a": 1, "b": 2, "c": 3})
    assert d.popitem() == ("c", 3)
    assert d.popitem() == ("b", 2)
    d["d"] = 4
    d["a"] = 10
    assert d.popitem() == ("d", 4)
    assert d.popitem() == ("a", 10)
    with unchanged(impl, d, KeyError):
        d.popitem()
    d["e"] = 5
    assert d.popitem() == ("e", 5)
    impl.check()


def test_dict_update_clear(impl):
    d = impl.make("DStrInt")
    d.update({"a": 1})
    d.update([("b", 2), ("a", 3)])
    d.update(impl.make("DStrInt", {"c": 4}))
    d.update(x=5)
    d.update({"y": 6}, z=7)
    d.update()
    d.update(())
    d.update((k, v) for k, v in [("g", 8)])
    assert list(d.items()) == [("a", 3), ("b", 2), ("c", 4), ("x", 5), ("y", 6), ("z", 7), ("g", 8)]
    with pytest.raises(TypeError):
        d.update(5)
    with pytest.raises(ValueError):
        d.update([("a",)])
    with pytest.raises((TypeError, ValueError)):
        d.update(["abc"])
    # pairs of any kind dict.update takes: lists, tuple subclasses
    import collections
    Pair = collections.namedtuple("Pair", "key value")
    d.update([["h", 9]])
    d.update([Pair("j", 10), ("h", 11)])
    assert (d["a"], d["h"], d["j"]) == (3, 11, 10)
    with pytest.raises(TypeError):
        d.update([("k", 1), 5])  # an element that is no pair
    assert ("k" in d) is not impl.persistent  # (dict stores the pairs before it; ours stores nothing)
    d.clear()
    assert d == {} and len(d) == 0 and list(d) == []
    d.clear()
    d["q"] = 1
    assert d == {"q": 1}
    impl.check()


def test_dict_numeric_keys(impl):
    """1, 1.0 and True are the same key; a number that is not a stored key is missing."""
    d = impl.make("DIntString", {1: "one", 0: "zero", -2 ** 63: "min", 2 ** 63 - 1: "max"})
    assert d[1.0] == "one" and d[True] == "one" and d[False] == "zero" and d[0.0] == "zero"
    assert 1.0 in d and True in d and -0.0 in d
    assert 1.5 not in d and 2 ** 63 not in d and -2 ** 63 - 1 not in d and 2 ** 70 not in d
    assert float("nan") not in d and INF not in d
    for missing in (1.5, 2 ** 63, -2 ** 63 - 1, 2 ** 70, INF, "1"):
        with pytest.raises(KeyError):
            d[missing]
        assert d.get(missing, "dflt") == "dflt"
        assert d.pop(missing, "dflt") == "dflt"
        with unchanged(impl, d, KeyError):
            del d[missing]
    assert d[-2 ** 63] == "min" and d[2 ** 63 - 1] == "max"
    d[True] = "true"                # the same key as 1: overwrites, keeps the position
    assert list(d.items())[0] == (1, "true")
    assert len(d) == 4
    assert d.pop(1.0) == "true"
    assert 1 not in d
    fl = impl.make("DFloatInt", {1: 10, 2.5: 25, -0.0: 0})
    assert fl[1] == 10 and fl[1.0] == 10 and fl[True] == 10
    assert fl[0] == 0 and fl[0.0] == 0 and fl[-0.0] == 0
    fl[0.0] = 100                   # 0.0 == -0.0: the same key
    assert len(fl) == 3 and fl[-0.0] == 100
    fl[INF] = 1
    fl[-INF] = 2
    assert fl[INF] == 1 and fl[-INF] == 2
    assert 3 not in fl and "1" not in fl
    assert list(fl.keys()) == [1.0, 2.5, 0.0, INF, -INF]
    i8 = impl.make("DInt8Int", {-128: 1, 127: 2})
    assert i8[-128] == 1 and 128 not in i8 and -129 not in i8 and 1000 not in i8
    with pytest.raises(KeyError):
        i8[1000]
    big = impl.make("DIntString", {2 ** 53: "p53", 2 ** 62: "p62"})
    assert big[2.0 ** 53] == "p53" and big[float(2 ** 62)] == "p62"
    assert 2 ** 53 + 1 not in big and 1e300 not in big and 2.0 ** 63 not in big
    with pytest.raises(KeyError):
        big[1e300]
    u64 = impl.make("DUInt64Int", {2 ** 64 - 1: 1, 0: 2, 2 ** 63: 3})
    assert u64[2 ** 64 - 1] == 1 and u64[2 ** 63] == 3 and -1 not in u64 and 2 ** 64 not in u64
    assert list(u64) == [2 ** 64 - 1, 0, 2 ** 63]
    impl.check()


def test_float_keys_equal_ints_only_when_exact(impl, request):
    """An int is the same key as a float only when the two are equal in Python: 2**53 + 1
    is not 2.0**53 (float(2**53 + 1) rounds to 2.0**53), 10**300 is not 1e300."""
    fd = impl.make("DFloatInt", {2.0 ** 53: 1, 1e300: 2, 0.1: 3})
    assert fd[2 ** 53] == 1
    assert 2 ** 53 + 1 not in fd and 10 ** 300 not in fd and 2 ** 1100 not in fd
    assert fd.get(10 ** 300, "none") == "none" and fd.pop(2 ** 53 + 1, "none") == "none"
    with pytest.raises(KeyError):
        fd[2 ** 53 + 1]
    fs = impl.make("SFloat", {2.0 ** 53, 1e300})
    assert 2 ** 53 in fs and 2 ** 53 + 1 not in fs and 10 ** 300 not in fs
    with pytest.raises(KeyError):
        fs.remove(2 ** 53 + 1)
    sd = impl.make("SDFloatString", {2.0 ** 53: "a", 1e300: "b"})
    assert sd[2 ** 53] == "a" and 2 ** 53 + 1 not in sd and 10 ** 300 not in sd
    with pytest.raises(ValueError):
        sd.index(2 ** 53 + 1)
    assert len(fd) == 3 and len(fs) == 2 and len(sd) == 2
    impl.check()


def test_a_key_stored_as_another_number_type_is_found_by_it(impl):
    """A key given as an integer-like object (``__index__``: numpy's integers) or a real number
    (numpy's floats, Fraction) is stored; looked up by the same object it must be found, as a dict
    finds it (the lookup refused every number but int, float and bool)."""
    from fractions import Fraction
    numpy = pytest.importorskip("numpy")
    d = impl.make("DIntString", {})
    d[numpy.int64(7)] = "seven"
    assert d[numpy.int64(7)] == "seven" and numpy.int32(7) in d and d[7] == "seven"
    assert d.get(numpy.uint8(7)) == "seven" and Fraction(7) in d and Fraction(15, 2) not in d
    assert numpy.float64(7.0) in d and numpy.float32(7.5) not in d and numpy.int64(8) not in d
    assert d.pop(numpy.int16(7)) == "seven" and len(d) == 0
    fl = impl.make("DFloatInt", {0.5: 1, 3: 2})
    assert fl[numpy.float32(0.5)] == 1 and fl[Fraction(1, 2)] == 1 and fl[numpy.int64(3)] == 2
    assert Fraction(1, 3) not in fl and numpy.float32(0.1) not in fl
    s = impl.make("SFloat", {numpy.float64(2.5)})
    assert numpy.float32(2.5) in s and Fraction(5, 2) in s
    sd = impl.make("SDFloatString", {1.5: "a"})
    assert sd[numpy.float32(1.5)] == "a" and Fraction(3, 2) in sd
    impl.check()


def test_dict_string_and_bytes_keys(impl):
    words = ["", "a", "A", "\u00e9", "e\u0301", "\U0001F600", "\u4e2d" * 500, "a\x00b", "x" * 4000]
    d = impl.make("DStrInt", {w: i for i, w in enumerate(words)})
    for i, w in enumerate(words):
        assert d[w] == i
        assert w in d
        assert w.encode() not in d
    assert list(d) == words
    blobs = [b"", b"\x00", b"\xff" * 3, b"a", b"A", b"x" * 4000, bytes(range(256))]
    bd = impl.make("DBytesAgent", {b: impl.agent(b, i) for i, b in enumerate(blobs)})
    for i, b in enumerate(blobs):
        assert bd[b].age == i
        assert b in bd and b.decode("latin-1") not in bd
        assert bd[b].name == b
    assert list(bd) == blobs
    impl.check()


@pytest.mark.parametrize("ktype", sorted(KEY_SAMPLES))
def test_dict_of_each_key_type(impl, ktype):
    kind = {"Int": "DIntString", "Float": "DFloatInt", "String": "DStrInt",
            "ByteString": "DBytesAgent", "Int8": "DInt8Int", "UInt64": "DUInt64Int"}[ktype]
    vtype = KINDS[kind][2]
    keys = KEY_SAMPLES[ktype]
    vals = SAMPLES[vtype]
    d = impl.make(kind)
    ref = {}
    for i, k in enumerate(keys):
        d[impl.value(ktype, k)] = impl.value(vtype, vals[i % len(vals)])
        ref[k] = vals[i % len(vals)]
    assert [impl.plain(k) for k in d] == list(ref)
    assert impl.plain(d) == ref
    for k in keys:
        assert k in d
        assert impl.plain(d[k]) == ref[k]
        assert impl.plain(d.get(k)) == ref[k]
    for i, k in enumerate(keys[::2]):
        assert impl.plain(d.pop(k)) == ref.pop(k)
    for i, k in enumerate(keys):
        d[k] = impl.value(vtype, vals[(i + 1) % len(vals)])
        ref[k] = vals[(i + 1) % len(vals)]
    assert snapshot(d) == list(ref.items())
    assert impl.plain(d.popitem()) == list(ref.popitem())
    impl.check()


@pytest.mark.parametrize("kind", ["DIntString", "DBytesAgent", "DIntFloat", "DStrBool", "DIntBuffer",
                                  "DStrLInt", "DStrDStrInt", "DStrSString", "DIntUInt8"])
def test_dict_of_each_value_type(impl, kind):
    _, ktype, vtype = KINDS[kind]
    keys = KEY_SAMPLES[ktype]
    vals = SAMPLES[vtype]
    d = impl.make(kind)
    ref = {}
    for i, k in enumerate(keys):
        d[k] = impl.value(vtype, vals[i % len(vals)])
        ref[k] = vals[i % len(vals)]
    assert impl.plain(d) == ref
    for i, k in enumerate(keys):        # overwrite every value
        d[k] = impl.value(vtype, vals[(i + 2) % len(vals)])
        ref[k] = vals[(i + 2) % len(vals)]
    assert snapshot(d) == list(ref.items())
    assert impl.plain(d.setdefault(keys[0], impl.value(vtype, vals[0]))) == ref[keys[0]]
    del d[keys[1]]
    del ref[keys[1]]
    assert impl.plain(d.setdefault(keys[1], impl.value(vtype, vals[3]))) == vals[3]
    ref[keys[1]] = vals[3]
    assert snapshot(d) == list(ref.items())
    assert impl.plain(list(d.values())) == list(ref.values())
    assert impl.plain(d.pop(keys[2])) == ref.pop(keys[2])
    d.clear()
    assert d == {}
    impl.check()


def test_dict_holds_references(impl):
    by_name = impl.make("DBytesAgent")
    a = impl.agent(b"Felix", 31)
    by_name[b"felix"] = a
    by_name[b"cat"] = a
    by_name[b"felix"].age = 32
    assert by_name[b"cat"].age == 32 and a.age == 32
    groups = impl.make("DStrLInt")
    groups.setdefault("a", []).append(1)
    groups.setdefault("a", []).append(2)
    groups.setdefault("b", [10]).append(3)
    groups["c"] = [5]
    groups["c"].extend([6])
    assert groups == {"a": [1, 2], "b": [10, 3], "c": [5, 6]}
    nested = impl.make("DStrDStrInt")
    nested["x"] = {"p": 1}
    nested["x"]["q"] = 2
    nested.setdefault("y", {})["r"] = 3
    assert nested == {"x": {"p": 1, "q": 2}, "y": {"r": 3}}
    tags = impl.make("DStrSString", {"t": {"a"}})
    tags["t"].add("b")
    assert tags == {"t": {"a", "b"}}
    impl.check()


# == Set =================================================================================================
def test_set_is_a_mutable_set(impl):
    s = impl.make("SString")
    assert isinstance(s, abc.MutableSet)
    with pytest.raises(TypeError):
        hash(s)


def test_set_construct(impl):
    assert impl.make("SString") == set()
    assert not impl.make("SString")
    assert impl.make("SString", {"a", "b"}) == {"a", "b"}
    assert impl.make("SString", ["a", "b", "a"]) == {"a", "b"}
    assert len(impl.make("SString", ["a", "b", "a"])) == 2
    assert impl.make("SString", frozenset({"x"})) == {"x"}
    assert impl.make("SString", (str(i) for i in range(3))) == {"0", "1", "2"}
    assert impl.make("SString", impl.make("SString", {"q"})) == {"q"}
    assert impl.make("SString", "abca") == {"a", "b", "c"}
    assert impl.make("SInt", range(2000)) == set(range(2000))
    assert impl.make("SFloat", [1, 2]) == {1.0, 2.0}
    with pytest.raises(TypeError):
        impl.make("SString", 5)
    impl.check()


def test_set_add_discard_remove(impl):
    s = impl.make("SString")
    s.add("a")
    s.add("b")
    s.add("a")
    assert s == {"a", "b"} and len(s) == 2
    s.discard("a")
    s.discard("zz")
    s.discard(1)
    s.discard(b"b")
    assert s == {"b"}
    s.remove("b")
    assert s == set()
    for missing in ("b", 1, b"x", None):
        with unchanged(impl, s, KeyError):
            s.remove(missing)
    s.add("c")
    for bad in (["c"], {"c": 1}, bytearray(b"c")):  # (a set argument is looked up as a frozenset)
        with unchanged(impl, s, TypeError):
            s.remove(bad)
        with unchanged(impl, s, TypeError):
            s.discard(bad)
        with unchanged(impl, s, TypeError):
            bad in s
        with unchanged(impl, s, TypeError):
            s.add(bad)
    impl.check()


def test_set_pop_clear_contains_iter(impl):
    items = {"a", "b", "c"}
    s = impl.make("SString", items)
    assert "a" in s and "z" not in s and 1 not in s and b"a" not in s and None not in s
    assert sorted(s) == ["a", "b", "c"]
    got = s.pop()
    assert got in items and got not in s and len(s) == 2
    seen = {got, s.pop(), s.pop()}
    assert seen == items
    with unchanged(impl, s, KeyError):
        s.pop()
    s.add("q")
    s.clear()
    assert s == set() and len(s) == 0 and list(s) == []
    s.clear()
    impl.check()


@pytest.mark.parametrize("kind", ["DStrInt", "SString"])
def test_insert_and_delete_the_newest_key_repeatedly(impl, kind, request):
    """Adding a key and deleting it again (the newest entry) many times; check() each time."""
    c = impl.make(kind)
    if kind == "DStrInt":
        add, delete = (lambda k: c.__setitem__(k, len(k))), c.__delitem__
    else:
        add, delete = c.add, c.remove
    add("keep")
    for i in range(60):
        add("k%d" % i)
        delete("k%d" % i)
        impl.check()
    assert list(c) == ["keep"] and "k0" not in c and "keep" in c
    add("last")
    assert sorted(c) == ["keep", "last"]
    if kind == "DStrInt" or impl.persistent:  # the builtin set is not insertion-ordered
        assert list(c) == ["keep", "last"]
    impl.check()


def test_set_pop_then_add(impl, request):
    """pop() then add() again: found by the stress test (seed 0, 256-byte pages)."""
    s = impl.make("SString")
    for k in ["0", "27", "23", "35"]:
        s.add(k)
    popped = [s.pop(), s.pop()]
    s.add("26")
    popped.append(s.pop())
    for k in ["31", "22", "18"]:
        s.add(k)
    impl.check()
    assert s == {"0", "27", "23", "35", "26", "31", "22", "18"} - set(popped)
    assert "zzz" not in s
    rng = random.Random(0)
    ref = set(s)
    for _ in range(400):
        if rng.random() < 0.5 and ref:
            x = s.pop()
            ref.remove(x)
        else:
            k = str(rng.randrange(40))
            s.add(k)
            ref.add(k)
        assert s == ref
    impl.check()


def test_dict_popitem_then_insert(impl):
    d = impl.make("DStrInt")
    rng = random.Random(1)
    ref = {}
    for step in range(400):
        if rng.random() < 0.5 and ref:
            assert d.popitem() == ref.popitem()
        else:
            k = str(rng.randrange(40))
            d[k] = ref[k] = step
        if step % 20 == 0:
            impl.check()
    assert list(d.items()) == list(ref.items())
    impl.check()


def test_set_numeric_elements(impl):
    s = impl.make("SInt", {1, 0, -2 ** 63, 2 ** 63 - 1})
    assert 1.0 in s and True in s and 0.0 in s and -0.0 in s and False in s
    assert 1.5 not in s and 2 ** 63 not in s and 2 ** 70 not in s and "1" not in s and INF not in s
    s.add(True)
    assert len(s) == 4
    s.discard(1.0)
    assert 1 not in s and len(s) == 3
    s.discard(2 ** 70)
    s.discard(1.5)
    with unchanged(impl, s, KeyError):
        s.remove(2 ** 63)
    f = impl.make("SFloat", [0.0, 1, 2.5, INF, -INF])
    f.add(-0.0)
    assert len(f) == 5
    assert 1 in f and True in f and 0 in f and -0.0 in f and 2.5 in f and INF in f
    assert 3 not in f and "1" not in f
    f.add(2.0 ** 53)
    assert 2 ** 53 in f and 2.0 ** 53 in f
    i8 = impl.make("SInt8", {-128, 127})
    assert 128 not in i8 and -129 not in i8 and 127 in i8
    i8.discard(1000)
    u64 = impl.make("SUInt64", {2 ** 64 - 1, 0})
    assert 2 ** 64 - 1 in u64 and -1 not in u64 and 2 ** 64 not in u64
    impl.check()


def test_set_bytes_elements(impl):
    blobs = [b"", b"\x00", b"a", b"x" * 5000, bytes(range(256))]
    s = impl.make("SByteString", blobs)
    for b in blobs:
        assert b in s and b.decode("latin-1") not in s
    assert s == set(blobs)
    s.discard(b"a")
    assert b"a" not in s and len(s) == 4
    with pytest.raises(TypeError):
        bytearray(b"") in s
    impl.check()


def _set_operands(impl, values):
    return [set(values), frozenset(values), impl.make("SInt", values)]


def test_set_binary_operators(impl):
    for other in _set_operands(impl, {2, 3, 4}):
        s = impl.make("SInt", {1, 2, 3})
        for result, expected in ((s | other, {1, 2, 3, 4}), (s & other, {2, 3}), (s - other, {1}),
                                 (s ^ other, {1, 4})):
            assert type(result) is set, f"{type(result).__name__} from an operator with {type(other).__name__}"
            assert result == expected
        assert s == {1, 2, 3}           # operators do not change the operands
        assert other == {2, 3, 4}
        assert other | s == {1, 2, 3, 4}
        assert other & s == {2, 3}
        assert other - s == {4}
        assert other ^ s == {1, 4}
    s = impl.make("SInt", {1, 2})
    assert s | s == {1, 2} and s & s == {1, 2} and s - s == set() and s ^ s == set()
    assert impl.make("SInt") | {1} == {1}
    impl.check()


def test_set_operators_refuse_non_sets(impl):
    """Like set: the operators need a set on both sides; isdisjoint takes any iterable."""
    s = impl.make("SInt", {1, 2})
    for other in ([2, 3], (2, 3), "ab", 5, None):
        for op in ("__or__", "__and__", "__sub__", "__xor__", "__le__", "__lt__", "__ge__", "__gt__"):
            with pytest.raises(TypeError):
                {"__or__": lambda: s | other, "__and__": lambda: s & other, "__sub__": lambda: s - other,
                 "__xor__": lambda: s ^ other, "__le__": lambda: s <= other, "__lt__": lambda: s < other,
                 "__ge__": lambda: s >= other, "__gt__": lambda: s > other}[op]()
    assert s == {1, 2}
    assert not s.isdisjoint([2, 3])
    assert s.isdisjoint((x for x in (5, 6)))
    with pytest.raises(TypeError):
        s.isdisjoint(5)


def test_set_inplace_operators_refuse_non_sets(impl):
    s = impl.make("SInt", {1, 2})
    for other in ([2, 3], (2, 3), 5):
        with unchanged(impl, s, TypeError):
            s |= other
        with unchanged(impl, s, TypeError):
            s &= other
        with unchanged(impl, s, TypeError):
            s -= other
        with unchanged(impl, s, TypeError):
            s ^= other


def test_set_inplace_operators(impl):
    for other in _set_operands(impl, {2, 3, 4}):
        for op, expected in (("|=", {1, 2, 3, 4}), ("&=", {2, 3}), ("-=", {1}), ("^=", {1, 4})):
            s = impl.make("SInt", {1, 2, 3})
            same = s
            if op == "|=":
                s |= other
            elif op == "&=":
                s &= other
            elif op == "-=":
                s -= other
            else:
                s ^= other
            assert s is same, f"{op} rebinds"
            assert s == expected, f"{op} {type(other).__name__}"
            assert other == {2, 3, 4}
    s = impl.make("SInt", {1, 2})
    s |= s
    assert s == {1, 2}
    s &= s
    assert s == {1, 2}
    s ^= s
    assert s == set()
    t = impl.make("SInt", {1, 2})
    t -= t
    assert t == set()
    impl.check()


def test_set_comparisons(impl):
    s = impl.make("SInt", {1, 2})
    for same in _set_operands(impl, {1, 2}):
        assert s == same and same == s and not (s != same)
        assert s <= same and s >= same and not (s < same) and not (s > same)
    for bigger in _set_operands(impl, {1, 2, 3}):
        assert s < bigger and s <= bigger and not (s > bigger) and not (s >= bigger) and s != bigger
        assert bigger > s
    for smaller in _set_operands(impl, {1}):
        assert s > smaller and s >= smaller and not (s < smaller) and s != smaller
    for other in _set_operands(impl, {3}):
        assert not (s <= other) and not (s >= other) and s != other
        assert s.isdisjoint(other)
    assert not s.isdisjoint({2, 9})
    assert s.isdisjoint([])
    assert s != [1, 2] and s != (1, 2) and s != {1: None, 2: None} and s != None  # noqa: E711
    assert impl.make("SInt") == set() and impl.make("SInt") == frozenset()
    assert impl.make("SInt", {1}) == impl.make("SFloat", {1.0})
    strs = impl.make("SString", {"a", "b"})
    assert strs == {"a", "b"} and strs != {b"a", b"b"} and strs <= {"a", "b", "c"}


# == SortedDict ============================================================================================
def test_sorteddict_is_a_mutable_mapping(impl):
    sd = impl.make("SDIntInt")
    assert isinstance(sd, abc.MutableMapping)
    with pytest.raises(TypeError):
        hash(sd)


def test_sorteddict_construct_and_order(impl):
    sd = impl.make("SDIntInt", {3: 30, 1: 10, 2: 20})
    assert list(sd) == [1, 2, 3]
    assert list(sd.keys()) == [1, 2, 3]
    assert list(sd.values()) == [10, 20, 30]
    assert list(sd.items()) == [(1, 10), (2, 20), (3, 30)]
    assert sd == {1: 10, 2: 20, 3: 30} and {3: 30, 2: 20, 1: 10} == sd
    assert sd != {1: 10} and sd != [(1, 10), (2, 20), (3, 30)]
    assert impl.make("SDIntInt", [(5, 1), (-5, 2), (5, 3)]) == {-5: 2, 5: 3}
    assert list(impl.make("SDIntInt", ((i, i) for i in (9, 8, 7)))) == [7, 8, 9]
    assert impl.make("SDIntInt", sd) == sd
    assert impl.make("SDIntInt") == {} and not impl.make("SDIntInt")
    assert list(impl.make("SDStrInt", impl.make("DStrInt", {"b": 1, "a": 2}))) == ["a", "b"]
    with pytest.raises(TypeError):
        impl.make("SDIntInt", 5)
    with pytest.raises(ValueError):
        impl.make("SDIntInt", [(1,)])
    impl.check()


def test_sorteddict_mapping_methods(impl):
    sd = impl.make("SDIntString", {5: "five", 1: "one"})
    assert sd[5] == "five" and sd[1.0] == "one" and sd[True] == "one"
    sd[3] = "three"
    sd[5] = "FIVE"
    assert list(sd.items()) == [(1, "one"), (3, "three"), (5, "FIVE")]
    for missing in (2, 2.5, "1", b"1", None, 2 ** 70, -2 ** 70, INF):
        with pytest.raises(KeyError):
            sd[missing]
        assert missing not in sd
        assert sd.get(missing) is None and sd.get(missing, 0) == 0
        assert sd.pop(missing, "d") == "d"
        with unchanged(impl, sd, KeyError):
            del sd[missing]
        with unchanged(impl, sd, KeyError):
            sd.pop(missing)
    for bad in ([1], {1: 1}, {1}):
        with unchanged(impl, sd, TypeError):
            sd[bad]
        with unchanged(impl, sd, TypeError):
            bad in sd
        with unchanged(impl, sd, TypeError):
            sd.get(bad)
        with unchanged(impl, sd, TypeError):
            del sd[bad]
    assert len(sd) == 3 and 3 in sd and 3.0 in sd
    assert sd.get(3) == "three"
    assert sd.setdefault(3, "x") == "three"
    assert sd.setdefault(0, "zero") == "zero"
    assert sd.pop(1) == "one"
    del sd[5]
    assert list(sd.items()) == [(0, "zero"), (3, "three")]
    sd.update({9: "nine", -1: "minus"})
    sd.update([(4, "four")], **{})
    assert list(sd) == [-1, 0, 3, 4, 9]
    keys, values, items = sd.keys(), sd.values(), sd.items()
    assert 4 in keys and "four" in values and (4, "four") in items and (4, "x") not in items
    assert len(keys) == len(values) == len(items) == 5
    assert keys == {-1, 0, 3, 4, 9}
    sd[2] = "two"                   # views are live
    assert list(keys) == [-1, 0, 2, 3, 4, 9]
    assert dict(sd) == {-1: "minus", 0: "zero", 2: "two", 3: "three", 4: "four", 9: "nine"}
    sd.clear()
    assert sd == {} and list(sd) == [] and len(sd) == 0
    sd[1] = "again"
    assert sd == {1: "again"}
    impl.check()


def test_sorteddict_popitem(impl):
    sd = impl.make("SDIntInt", {i: i * 10 for i in (4, 1, 3, 2, 5)})
    assert sd.popitem() == (5, 50)
    assert sd.popitem(0) == (1, 10)
    assert sd.popitem(1) == (3, 30)
    assert sd.popitem(-2) == (2, 20)
    assert list(sd.items()) == [(4, 40)]
    for i in (1, -2, 5):
        with unchanged(impl, sd, IndexError):
            sd.popitem(i)
    assert sd.popitem(index=-1) == (4, 40)
    assert len(sd) == 0
    impl.check()


def test_sorteddict_popitem_empty(impl, request):
    """``popitem(index=-1)`` raises KeyError when the SortedDict is empty, like ``dict.popitem``
    and ``sortedcontainers.SortedDict.popitem``; an index out of range of a non-empty one is an
    IndexError."""
    sd = impl.make("SDIntInt")
    with unchanged(impl, sd, KeyError):
        sd.popitem()
    with unchanged(impl, sd, KeyError):
        sd.popitem(0)
    sd[1] = 1
    with unchanged(impl, sd, IndexError):
        sd.popitem(5)
    sd.popitem()
    with unchanged(impl, sd, KeyError):
        sd.popitem()


def test_sorteddict_peekitem(impl):
    sd = impl.make("SDIntString", {i: str(i) for i in (40, 10, 30, 20)})
    assert sd.peekitem() == (40, "40")
    assert sd.peekitem(0) == (10, "10")
    assert sd.peekitem(-1) == (40, "40")
    assert sd.peekitem(2) == (30, "30")
    assert sd.peekitem(-4) == (10, "10")
    for i in (4, -5, 100):
        with unchanged(impl, sd, IndexError):
            sd.peekitem(i)
    with pytest.raises(TypeError):
        sd.peekitem("0")
    assert len(sd) == 4
    empty = impl.make("SDIntString")
    with unchanged(impl, empty, IndexError):
        empty.peekitem()
    with unchanged(impl, empty, IndexError):
        empty.peekitem(0)


def test_sorteddict_bisect_and_index(impl):
    sd = impl.make("SDIntInt", {k: k for k in (10, 20, 30, 40)})
    for key, left, right in ((5, 0, 0), (10, 0, 1), (15, 1, 1), (20, 1, 2), (40, 3, 4), (45, 4, 4),
                             (-2 ** 63, 0, 0), (2 ** 63 - 1, 4, 4)):
        assert sd.bisect_left(key) == left, f"bisect_left({key})"
        assert sd.bisect_right(key) == right, f"bisect_right({key})"
    assert [sd.index(k) for k in (10, 20, 30, 40)] == [0, 1, 2, 3]
    assert sd.index(30.0) == 2
    for missing in (0, 15, 50, "10", 2 ** 70):
        with pytest.raises(ValueError):
            sd.index(missing)
    empty = impl.make("SDIntInt")
    assert empty.bisect_left(3) == 0 and empty.bisect_right(3) == 0
    with pytest.raises(ValueError):
        empty.index(3)
    for bad in ("x", b"x", None):
        with pytest.raises(TypeError):
            sd.bisect_left(bad)
        with pytest.raises(TypeError):
            sd.bisect_right(bad)


def test_sorteddict_bisect_and_irange_with_other_numbers(impl):
    """Numbers of another type compare as Python numbers do (1.5 lies between 1 and 2)."""
    sd = impl.make("SDIntInt", {k: k for k in (1, 2, 3, 4)})
    assert sd.bisect_left(1.5) == 1 and sd.bisect_right(2.0) == 2 and sd.bisect_left(True) == 0
    assert sd.bisect_left(2 ** 70) == 4 and sd.bisect_right(-2 ** 70) == 0
    assert sd.bisect_left(INF) == 4 and sd.bisect_left(-INF) == 0
    assert list(sd.irange(1.5, 3.5)) == [2, 3]
    assert list(sd.irange(-2 ** 70, 2 ** 70)) == [1, 2, 3, 4]
    assert list(sd.irange(2.0, 3.0, inclusive=(False, False))) == []
    fl = impl.make("SDFloatString", {0.5: "a", 1.0: "b", 2.5: "c", 2.0 ** 53: "d"})
    assert fl.bisect_left(1) == 1 and fl.bisect_right(1) == 2
    assert list(fl.irange(1, 3)) == [1.0, 2.5]
    assert fl.bisect_left(2 ** 53 + 1) == 4 and fl.bisect_right(2 ** 53 - 1) == 3
    assert fl[2 ** 53] == "d"
    assert fl.bisect_left(10 ** 400) == 4 and fl.bisect_right(-10 ** 400) == 0


def test_sorteddict_irange(impl):
    keys = list(range(0, 20, 2))
    sd = impl.make("SDIntInt", {k: -k for k in reversed(keys)})
    bounds = [None, -1, 0, 1, 2, 9, 10, 18, 19, 25]
    for lo in bounds:
        for hi in bounds:
            for inclusive in ((True, True), (True, False), (False, True), (False, False)):
                for reverse in (False, True):
                    expected = expected_irange(keys, lo, hi, inclusive, reverse)
                    got = sd.irange(lo, hi, inclusive, reverse)
                    assert iter(got) is got or isinstance(got, abc.Iterator)
                    assert list(got) == expected, f"irange({lo}, {hi}, {inclusive}, {reverse})"
                    assert list(sd.irange(minimum=lo, maximum=hi, inclusive=inclusive,
                                          reverse=reverse)) == expected
    assert list(sd.irange()) == keys
    assert list(sd.irange(reverse=True)) == keys[::-1]
    assert list(sd.irange(5)) == keys[3:]
    assert list(sd.irange(maximum=5)) == keys[:3]
    assert list(impl.make("SDIntInt").irange(0, 10)) == []
    assert list(sd.irange(10, 5)) == []
    strs = impl.make("SDStrInt", {w: 0 for w in ("b", "a", "ab", "c", "\u00e9")})
    assert list(strs.irange("a", "b")) == ["a", "ab", "b"]
    assert list(strs.irange("a", "b", (False, False))) == ["ab"]
    assert list(strs.irange("b", reverse=True)) == ["\u00e9", "c", "b"]


KEY_ORDER_CASES = {
    "SDIntInt": [-2 ** 63, -2 ** 62, -256, -1, 0, 1, 255, 256, 2 ** 32, 2 ** 63 - 1],
    "SDUInt64Int": [0, 1, 255, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 2, 2 ** 64 - 1],
    "SDInt8Int": [-128, -127, -1, 0, 1, 127],
    "SDFloatString": [-INF, -1e300, -1.5, -5e-324, 0.0, 5e-324, 1e-300, 1.0, 1.5, 2.0 ** 60, INF],
    "SDStrInt": ["", "\x00", "A", "Z", "a", "a\x00", "aa", "ab", "b", "\x7f", "\u00e9", "\u00ff",
                 "\u0100", "\u4e2d", "\uffff", "\U0001F600", "\U0010FFFF"],
    "SDBytesInt": [b"", b"\x00", b"\x00\x00", b"\x01", b"A", b"a", b"a\x00", b"ab", b"b", b"\x7f",
                   b"\x80", b"\xff", b"\xff\xff"],
}


@pytest.mark.parametrize("kind", sorted(KEY_ORDER_CASES))
def test_sorteddict_key_order(impl, kind):
    keys = KEY_ORDER_CASES[kind]
    assert keys == sorted(keys)
    shuffled = list(keys)
    random.Random(kind).shuffle(shuffled)
    vtype = KINDS[kind][2]
    v0 = SAMPLES[vtype][1]
    sd = impl.make(kind)
    for k in shuffled:
        sd[k] = impl.value(vtype, v0)
    assert [impl.plain(k) for k in sd] == keys
    assert [impl.plain(k) for k in sd.keys()] == keys
    for i, k in enumerate(keys):
        assert impl.plain(sd.peekitem(i)[0]) == k
        assert sd.index(k) == i
        assert sd.bisect_left(k) == i and sd.bisect_right(k) == i + 1
        assert k in sd
    assert [impl.plain(k) for k in sd.irange(keys[1], keys[-2])] == keys[1:-1]
    assert [impl.plain(k) for k in sd.irange(keys[1], keys[-2], (False, False), True)] == keys[2:-2][::-1]
    for k in keys[::3]:
        del sd[k]
    assert [impl.plain(k) for k in sd] == [k for k in keys if k not in keys[::3]]
    impl.check()


def test_sorteddict_float_zero_is_one_key(impl):
    sd = impl.make("SDFloatString", {-0.0: "neg"})
    sd[0.0] = "pos"
    assert len(sd) == 1 and sd[-0.0] == "pos" and sd[0] == "pos"
    sd[1] = "one"
    assert list(sd) == [0.0, 1.0]
    assert sd.index(0) == 0 and sd.bisect_right(-0.0) == 1


def test_sorteddict_many_keys(impl):
    rng = random.Random(3)
    sd = impl.make("SDIntInt")
    ref = {}
    for step in range(4000):
        k = rng.randrange(-1000, 1000)
        r = rng.random()
        if r < 0.6:
            sd[k] = ref[k] = step
        elif r < 0.9:
            assert sd.pop(k, None) == ref.pop(k, None)
        elif ref:
            i = rng.randrange(-len(ref), len(ref))
            expected_key = sorted(ref)[i]
            assert sd.popitem(i) == (expected_key, ref.pop(expected_key))
    keys = sorted(ref)
    assert list(sd.items()) == [(k, ref[k]) for k in keys]
    for _ in range(300):
        k = rng.randrange(-1100, 1100)
        assert sd.bisect_left(k) == bisect.bisect_left(keys, k)
        assert sd.bisect_right(k) == bisect.bisect_right(keys, k)
        if keys:
            i = rng.randrange(-len(keys), len(keys))
            assert sd.peekitem(i) == (keys[i], ref[keys[i]])
            assert sd.index(keys[i]) == i % len(keys)
        lo, hi = sorted((rng.randrange(-1100, 1100), rng.randrange(-1100, 1100)))
        assert list(sd.irange(lo, hi)) == [x for x in keys if lo <= x <= hi]
    while sd:
        k, v = sd.popitem(0)
        assert ref.pop(k) == v
    assert not ref
    impl.check()


def test_sorteddict_values_of_other_types(impl):
    by_age = impl.make("SDIntAgent")
    felix = impl.agent(b"Felix", 31)
    by_age[31] = felix
    by_age[7] = impl.agent(b"Bond", 7)
    by_age[31].name = b"Felix the Cat"
    assert felix.name == b"Felix the Cat"
    assert [a.name for a in by_age.values()] == [b"Bond", b"Felix the Cat"]
    assert by_age.peekitem(0)[1].age == 7
    assert impl.plain(by_age) == {7: AgentV(b"Bond", 7), 31: AgentV(b"Felix the Cat", 31)}
    rows = impl.make("SDIntLInt")
    rows[2] = [1]
    rows.setdefault(1, []).append(5)
    rows[2].append(2)
    assert rows == {1: [5], 2: [1, 2]}
    assert list(rows.values()) == [[5], [1, 2]]
    small = impl.make("SDIntInt8", {1: -128, 0: 127})
    assert list(small.values()) == [127, -128]
    impl.check()


# == what only the persistent side can do ============================================================
def _bad(pimpl, etype, bad):
    """Resolve the symbolic wrong values of BAD_VALUES into objects of the storage."""
    if bad == "Other":
        return pimpl.p.schema.Other(x=1)
    if bad == "SInt":
        return pimpl.p.schema.SInt({1})
    return bad


@pytest.mark.parametrize("etype", LIST_ELEMENT_TYPES)
def test_list_rejects_wrong_elements(pimpl, etype):
    """A wrong-typed or overflowing element: TypeError/OverflowError and nothing written."""
    kind = _kind_of_list(etype)
    vals = SAMPLES[etype]
    lst = pimpl.make(kind, [pimpl.value(etype, x) for x in vals[:3]])
    cases = [(TypeError, _bad(pimpl, etype, b)) for b in BAD_VALUES[etype]]
    cases += [(OverflowError, b) for b in OVERFLOW_VALUES.get(etype, [])]
    for exc, bad in cases:
        good = pimpl.value(etype, vals[4])
        with unchanged(pimpl, lst, exc):
            lst.append(bad)
        with unchanged(pimpl, lst, exc):
            lst.insert(1, bad)
        with unchanged(pimpl, lst, exc):
            lst[1] = bad
        with unchanged(pimpl, lst, exc):
            lst[-1] = bad
        with unchanged(pimpl, lst, exc):
            lst[0:1] = [good, bad]
        with unchanged(pimpl, lst, exc):
            lst[:] = [bad]
        with unchanged(pimpl, lst, exc):
            lst[::2] = [good, bad]
        with unchanged(pimpl, lst, exc):
            lst.extend([good, bad])
        with unchanged(pimpl, lst, exc):
            lst.extend(x for x in (good, good, bad))
        with unchanged(pimpl, lst, exc):
            lst += [good, bad]
        with pytest.raises(exc):
            pimpl.make(kind, [good, bad])
        pimpl.check()
    assert pimpl.plain(lst) == vals[:3]
    pimpl.p.commit()
    pimpl.check()
    assert pimpl.plain(lst) == vals[:3]


def test_value_conversions_on_store(pimpl):
    lst = pimpl.make("LInt", [True, False])
    assert lst == [1, 0] and type(lst[0]) is int
    fl = pimpl.make("LFloat", [1, True])
    assert fl == [1.0, 1.0] and type(fl[0]) is float
    f32 = pimpl.make("LFloat32", [0.1])
    assert f32[0] == struct.unpack("<f", struct.pack("<f", 0.1))[0]
    b = pimpl.make("LBool", [1, 0])
    assert b[0] is True and b[1] is False
    u = pimpl.make("LUInt8", [Idx(200)])
    assert u == [200]


@pytest.mark.parametrize("kind", ["DStrInt", "DIntString", "DBytesAgent", "DFloatInt", "DInt8Int",
                                  "DUInt64Int", "DStrLInt"])
def test_dict_rejects_wrong_keys_and_values(pimpl, kind):
    _, ktype, vtype = KINDS[kind]
    keys, vals = KEY_SAMPLES[ktype], SAMPLES[vtype]
    d = pimpl.make(kind, [(keys[i], pimpl.value(vtype, vals[i])) for i in range(3)])
    bad_keys = [(TypeError, b) for b in BAD_VALUES[ktype] if not isinstance(b, (list, dict, set))]
    bad_keys += [(OverflowError, b) for b in OVERFLOW_VALUES.get(ktype, [])]
    bad_keys += [(TypeError, b) for b in ([1], {1: 1})]
    if ktype.startswith("Float"):
        bad_keys.append((ValueError, float("nan")))
    bad_values = [(TypeError, _bad(pimpl, vtype, b)) for b in BAD_VALUES[vtype]]
    bad_values += [(OverflowError, b) for b in OVERFLOW_VALUES.get(vtype, [])]
    good_value = pimpl.value(vtype, vals[3])
    for exc, bad in bad_keys:
        with unchanged(pimpl, d, exc):
            d[bad] = good_value
        with unchanged(pimpl, d, exc):
            d.setdefault(bad, good_value)
        with pytest.raises(exc):
            pimpl.make(kind, [(keys[4], good_value), (bad, good_value)])
        with unchanged(pimpl, d, exc):
            d.update([(bad, good_value)])
    for exc, bad in bad_values:
        with unchanged(pimpl, d, exc):
            d[keys[0]] = bad         # an existing key keeps its value
        with unchanged(pimpl, d, exc):
            d[keys[5]] = bad         # a new key is not added
        with unchanged(pimpl, d, exc):
            d.setdefault(keys[5], bad)
        with pytest.raises(exc):
            pimpl.make(kind, {keys[4]: bad})
    pimpl.check()


@pytest.mark.parametrize("kind", ["SString", "SInt", "SFloat", "SByteString", "SInt8", "SUInt64"])
def test_set_rejects_wrong_elements(pimpl, kind):
    etype = KINDS[kind][1]
    keys = KEY_SAMPLES[etype]
    s = pimpl.make(kind, keys[:3])
    bad = [(TypeError, b) for b in BAD_VALUES[etype] if not isinstance(b, (list, dict, set))]
    bad += [(OverflowError, b) for b in OVERFLOW_VALUES.get(etype, [])]
    if etype.startswith("Float"):
        bad.append((ValueError, float("nan")))
    for exc, value in bad:
        with unchanged(pimpl, s, exc):
            s.add(value)
        with pytest.raises(exc):
            pimpl.make(kind, [keys[4], value])
        before = set(pimpl.plain(s))
        with pytest.raises(exc):
            s |= {value}
        after = set(pimpl.plain(s))
        assert after == before, "a failed |= changed the set"
        if exc is ValueError:
            continue
        # a wrong-typed value is simply not there
        assert value not in s
        s.discard(value)
        with unchanged(pimpl, s, KeyError):
            s.remove(value)
    pimpl.check()


@pytest.mark.parametrize("kind", ["SDIntAgent", "SDStrInt", "SDFloatString", "SDBytesInt", "SDUInt64Int",
                                  "SDInt8Int"])
def test_sorteddict_rejects_wrong_keys_and_values(pimpl, kind):
    _, ktype, vtype = KINDS[kind]
    keys, vals = KEY_SAMPLES[ktype], SAMPLES[vtype]
    sd = pimpl.make(kind, {keys[i]: pimpl.value(vtype, vals[i]) for i in range(3)})
    bad_keys = [(TypeError, b) for b in BAD_VALUES[ktype] if not isinstance(b, (list, dict, set))]
    bad_keys += [(OverflowError, b) for b in OVERFLOW_VALUES.get(ktype, [])]
    if ktype.startswith("Float"):
        bad_keys.append((ValueError, float("nan")))
    good_value = pimpl.value(vtype, vals[3])
    for exc, bad in bad_keys:
        with unchanged(pimpl, sd, exc):
            sd[bad] = good_value
        with unchanged(pimpl, sd, exc):
            sd.setdefault(bad, good_value)
        with pytest.raises(exc):
            pimpl.make(kind, {keys[4]: good_value, bad: good_value})
    bad_values = [(TypeError, _bad(pimpl, vtype, b)) for b in BAD_VALUES[vtype]]
    bad_values += [(OverflowError, b) for b in OVERFLOW_VALUES.get(vtype, [])]
    for exc, bad in bad_values:
        with unchanged(pimpl, sd, exc):
            sd[keys[0]] = bad
        with unchanged(pimpl, sd, exc):
            sd[keys[5]] = bad
    pimpl.check()


def test_nan_values_are_allowed(pimpl):
    d = pimpl.make("DIntFloat", {1: float("nan")})
    assert math.isnan(d[1])
    lst = pimpl.make("LFloat", [float("nan")])
    assert math.isnan(lst[0])
    with unchanged(pimpl, pimpl.make("SFloat"), ValueError):
        pimpl.make("SFloat").add(float("nan"))


def test_set_and_dict_are_insertion_ordered(pimpl):
    s = pimpl.make("SString", ["b", "a", "c"])
    assert list(s) == ["b", "a", "c"]
    s.add("a")
    assert list(s) == ["b", "a", "c"]
    s.discard("b")
    s.add("b")
    assert list(s) == ["a", "c", "b"]
    s |= {"z"}
    assert list(s)[-1] == "z"
    ints = pimpl.make("SInt", [5, 3, 9, 1])
    assert list(ints) == [5, 3, 9, 1]
    assert ints.pop() in (5, 3, 9, 1)
    pimpl.check()


def test_fields_of_collection_types(pimpl):
    p = pimpl.p
    root = p.root
    for name in ("ints", "names", "agents", "matrix", "counts", "by_name", "groups", "tags", "by_age"):
        assert getattr(root, name) is None, f"{name} is not None before it is set"
    root.ints = [1, 2]
    root.names = ["a", "b"]
    root.agents = [p.schema.Agent(name=b"x", age=1)]
    root.matrix = [[1], [2, 3]]
    root.counts = {"a": 1}
    root.by_name = {b"x": p.schema.Agent(name=b"x", age=2)}
    root.groups = {"g": [1, 2]}
    root.tags = {"a", "b"}
    root.idset = {1, 2}
    root.by_age = {3: p.schema.Agent(age=3)}
    root.sstr = {"b": 1, "a": 2}
    assert root.ints == [1, 2] and isinstance(root.ints, abc.MutableSequence)
    assert root.names == ["a", "b"]
    assert root.matrix == [[1], [2, 3]]
    assert root.counts == {"a": 1} and root.groups == {"g": [1, 2]}
    assert root.tags == {"a", "b"} and root.idset == {1, 2}
    assert root.by_age[3].age == 3 and list(root.sstr) == ["a", "b"]
    assert root.by_name[b"x"].age == 2
    root.ints.append(3)
    assert root.ints == [1, 2, 3]
    # a proxy of the right type is shared, not copied
    root.ints2 = root.ints
    assert root.ints2.isSameAs(root.ints)
    root.ints2.append(4)
    assert root.ints == [1, 2, 3, 4]
    root.ints = root.ints              # the same object again
    p.commit()
    pimpl.check()
    assert root.ints == [1, 2, 3, 4] and root.ints.isSameAs(root.ints2)
    # a new plain value replaces the collection
    old = root.ints
    root.ints = [9]
    assert root.ints == [9] and not root.ints.isSameAs(old)
    assert root.ints2 == [1, 2, 3, 4]
    # wrong types: TypeError, the field keeps its value
    for field, bad in (("ints", ["x"]), ("ints", [1.5]), ("ints", 5), ("ints", p.schema.SInt({1})),
                       ("ints", p.schema.LFloat([1.0])), ("counts", {1: 1}), ("counts", {"a": "b"}),
                       ("tags", {1}), ("tags", 5), ("by_age", {"x": p.schema.Agent()}),
                       ("matrix", [[1], ["x"]]), ("agents", [b"x"]), ("by_name", {b"x": 1})):
        before = snapshot(getattr(root, field))
        with pytest.raises(TypeError):
            setattr(root, field, bad)
        assert snapshot(getattr(root, field)) == before, f"failed assignment to {field} changed it"
        pimpl.check()
    root.ints = None
    assert root.ints is None
    root.ints = []
    assert root.ints == []
    pimpl.check()
    p.commit()
    pimpl.check()


def test_collections_survive_commit_and_reopen(tmp_path):
    path = tmp_path / "reopen.ps"
    p = ContractStorage(path, pageSize=256)
    try:
        s = p.schema
        root = p.root
        root.ints = list(range(500))
        root.names = ["a", "\u00e9", "x" * 1000, p.stringRegistry.get("interned")]
        root.agents = [s.Agent(name=b"a", age=1), s.Spy(name=b"s", age=2, code="007")]
        root.matrix = [[1, 2], [], list(range(100))]
        root.counts = {str(i): i for i in range(300)}
        root.by_name = {b"x": s.Agent(name=b"x", age=5)}
        root.groups = {"g": [1], "h": []}
        root.tags = {str(i) for i in range(100)}
        root.idset = set(range(-50, 50))
        root.by_age = {i: s.Agent(age=i) for i in range(200, 0, -3)}
        root.sstr = {w: len(w) for w in ("pear", "apple", "fig", "\u00e9clair")}
        del root.counts["7"]
        root.counts["7"] = 7                # moved to the end
        expected = {name: snapshot(getattr(root, name)) for name in
                    ("ints", "names", "agents", "matrix", "counts", "by_name", "groups", "tags",
                     "idset", "by_age", "sstr")}
        p.commit()
        p.check()
    finally:
        p.close()
    p = ContractStorage(path)
    try:
        p.check()
        root = p.root
        for name, snap in expected.items():
            assert snapshot(getattr(root, name)) == snap, name
        assert type(root.agents[1]).__name__ == "Spy" and root.agents[1].code == "007"
        assert root.names[3].isSameAs(p.stringRegistry.get("interned"))
        assert list(root.counts)[-1] == "7"
        assert list(root.sstr) == sorted(root.sstr)
        assert root.by_age.peekitem(0)[0] == 2
        root.ints.append(500)
        root.counts["new"] = 1
        p.commit()
    finally:
        p.close()
    bare = Storage(path)                       # the bare Storage reaches every collection
    try:
        bare.check()
        root = bare.root
        assert root.ints == list(range(501))
        assert root.counts["new"] == 1 and root.counts["299"] == 299
        assert root.tags == {str(i) for i in range(100)}
        assert list(root.by_age)[:3] == [2, 5, 8]
        assert root.matrix[2][99] == 99
    finally:
        bare.close()


def test_rollback_restores_collections(pimpl):
    p = pimpl.p
    root = p.root
    root.ints = [1, 2, 3]
    root.counts = {"a": 1}
    root.tags = {"x"}
    root.by_age = {1: p.schema.Agent(age=1)}
    p.commit()
    root.ints.append(4)
    root.ints[0] = 100
    root.counts["b"] = 2
    del root.counts["a"]
    root.tags.add("y")
    root.by_age[2] = p.schema.Agent(age=2)
    del root.by_age[1]
    fresh = p.schema.LInt([7])
    root.ints2 = fresh
    p.rollback()
    root = p.root
    assert root.ints == [1, 2, 3]
    assert root.counts == {"a": 1}
    assert root.tags == {"x"}
    assert list(root.by_age) == [1] and root.by_age[1].age == 1
    assert root.ints2 is None
    with pytest.raises(PermastructError):
        len(fresh)
    pimpl.check()


def test_proxies_die_on_close(tmp_path):
    p = ContractStorage(tmp_path / "close.ps")
    lst = p.schema.LInt([1])
    d = p.schema.DStrInt({"a": 1})
    s = p.schema.SString({"a"})
    sd = p.schema.SDIntInt({1: 1})
    p.root.ints = lst
    p.close()
    for call in (lambda: len(lst), lambda: lst[0], lambda: lst.append(1), lambda: d["a"],
                 lambda: list(d), lambda: "a" in s, lambda: s.add("b"), lambda: sd.peekitem(),
                 lambda: list(sd.irange())):
        with pytest.raises(StorageClosedError):
            call()


def test_read_only_storage_refuses_writes(tmp_path):
    path = tmp_path / "ro.ps"
    with ContractStorage(path) as p:
        p.root.ints = [1, 2]
        p.root.counts = {"a": 1}
        p.root.tags = {"t"}
        p.root.by_age = {1: p.schema.Agent(age=1)}
    ro = ContractStorage(path, readonly=True)
    try:
        root = ro.root
        assert root.ints == [1, 2] and root.counts == {"a": 1} and root.tags == {"t"}
        assert root.by_age.peekitem(0)[0] == 1
        for call in (lambda: root.ints.append(3), lambda: root.ints.__setitem__(0, 5),
                     lambda: root.ints.pop(), lambda: root.ints.sort(), lambda: root.counts.__setitem__("b", 1),
                     lambda: root.counts.pop("a"), lambda: root.tags.add("u"), lambda: root.tags.clear(),
                     lambda: root.by_age.__delitem__(1), lambda: root.by_age.popitem()):
            with pytest.raises(ReadOnlyError):
                call()
        assert root.ints == [1, 2] and root.counts == {"a": 1} and root.tags == {"t"}
        assert len(root.by_age) == 1
        ro.check()
    finally:
        ro.close()


def test_proxy_of_another_storage_is_refused(tmp_path, pimpl):
    other = ContractStorage(tmp_path / "other.ps")
    try:
        foreign_agent = other.schema.Agent(age=1)
        foreign_list = other.schema.LInt([1])
        agents = pimpl.make("LAgent")
        with unchanged(pimpl, agents, ValueError):
            agents.append(foreign_agent)
        m = pimpl.make("LLInt")
        with unchanged(pimpl, m, ValueError):
            m.append(foreign_list)
        by_age = pimpl.make("SDIntAgent")
        with unchanged(pimpl, by_age, ValueError):
            by_age[1] = foreign_agent
        with pytest.raises(ValueError):
            pimpl.p.root.ints = foreign_list
        assert pimpl.p.root.ints is None
    finally:
        other.close()


def test_structures_keep_their_subtype(pimpl):
    s = pimpl.p.schema
    agents = pimpl.make("LAgent", [s.Spy(name=b"James", age=40, code="007"), s.Agent(age=1)])
    assert type(agents[0]).__name__ == "Spy" and agents[0].code == "007"
    assert type(agents[1]).__name__ == "Agent"
    by_age = pimpl.make("SDIntAgent", {1: s.Spy(code="x")})
    assert by_age[1].code == "x"


def test_shared_and_interned_objects_survive_removal(tmp_path):
    """Removing an element drops one reference; what is still referenced elsewhere stays."""
    p = ContractStorage(tmp_path / "shared.ps", pageSize=256)
    try:
        s = p.schema
        root = p.root
        felix = s.Agent(name=b"Felix" * 100, age=31)
        root.agent = felix
        root.agents = [felix, felix]
        root.by_age = {31: felix}
        root.names = [p.stringRegistry.get("interned"), "own"]
        root.text = root.names[1]           # shared by a field and the list
        root.matrix = [[1, 2]]
        root.ints = root.matrix[0]          # a nested list shared with a field
        del felix
        p.commit()
        p.check()
        root.agents.clear()
        del root.by_age[31]
        root.names.clear()
        root.matrix.pop()
        p.commit()
        p.check()
        assert root.agent.name == b"Felix" * 100 and root.agent.age == 31
        assert "interned" in p.stringRegistry
        assert root.text == "own"
        assert root.ints == [1, 2]
        root.agent = None
        root.text = None
        root.ints = None
        p.commit()
        p.check()
    finally:
        p.close()
    p = ContractStorage(tmp_path / "shared.ps")
    try:
        p.check()
        assert p.root.agents == [] and len(p.root.by_age) == 0
    finally:
        p.close()


def test_removed_element_stays_usable_through_its_proxy(pimpl):
    """An element removed from a collection lives on while a proxy holds it, and can go back in."""
    p = pimpl.p
    s = p.schema
    agents = pimpl.make("LAgent", [s.Agent(name=b"x" * 600, age=1)])
    by_age = pimpl.make("SDIntAgent", {2: s.Agent(name=b"y" * 600, age=2)})
    rows = pimpl.make("LLInt", [[1, 2, 3]])
    p.root.agents = agents
    p.root.by_age = by_age
    p.root.matrix = rows
    p.commit()
    first = agents.pop()
    second = by_age.pop(2)
    row = rows.pop()
    p.commit()
    pimpl.check()
    assert first.name == b"x" * 600 and second.name == b"y" * 600 and row == [1, 2, 3]
    agents.append(first)
    by_age[3] = second
    rows.append(row)
    del first, second, row
    p.commit()
    pimpl.check()
    assert agents[0].name == b"x" * 600 and by_age[3].age == 2 and rows == [[1, 2, 3]]


def test_rollback_restores_removed_elements(pimpl):
    p = pimpl.p
    s = p.schema
    p.root.agents = [s.Agent(name=b"a" * 300, age=i) for i in range(5)]
    p.root.by_name = {b"k%d" % i: s.Agent(name=b"b" * 300, age=i) for i in range(5)}
    p.root.names = ["n" * 400, p.stringRegistry.get("interned")]
    p.commit()
    p.root.agents.clear()
    p.root.by_name.clear()
    p.root.names.clear()
    p.root.agents = None
    p.rollback()
    pimpl.check()
    root = p.root
    assert [a.age for a in root.agents] == list(range(5))
    assert all(a.name == b"a" * 300 for a in root.agents)
    assert [root.by_name[b"k%d" % i].age for i in range(5)] == list(range(5))
    assert root.names == ["n" * 400, "interned"]
    p.commit()
    pimpl.check()


@pytest.mark.parametrize("descriptor", ["Dict-Agent", "Dict-List", "Dict-Buffer", "SortedDict-Agent",
                                        "SortedDict-List", "Set-Agent", "Set-List"])
def test_keys_must_be_numbers_or_strings(tmp_path, descriptor):
    category, key = descriptor.split("-")

    class BadStorage(Storage):
        def populateSchema(self):
            s = self.schema

            class Agent(s.Structure):
                age = s.Int

            Ints = self.define(List("Ints")[s.Int])
            key_type = {"Agent": Agent, "List": Ints, "Buffer": s.Buffer}[key]
            if category == "Set":
                self.define(Set("Bad")[key_type])
            else:
                self.define({"Dict": Dict, "SortedDict": SortedDict}[category]("Bad")[key_type, s.Int])

            class Root(s.Structure):
                x = s.Int

    with pytest.raises(SchemaError):
        BadStorage(tmp_path / "bad.ps")


def test_schema_mismatch_of_element_type(tmp_path):
    class A(Storage):
        def populateSchema(self):
            s = self.schema
            Ints = self.define(List("Ints")[s.Int])

            class Root(s.Structure):
                ints = Ints

    class B(Storage):
        def populateSchema(self):
            s = self.schema
            Ints = self.define(List("Ints")[s.Float])

            class Root(s.Structure):
                ints = Ints

    class C(Storage):
        def populateSchema(self):
            s = self.schema
            Ints = self.define(Set("Ints")[s.Int])

            class Root(s.Structure):
                ints = Ints

    path = tmp_path / "m.ps"
    with A(path) as p:
        p.root.ints = [1]
    before = path.read_bytes()
    for other in (B, C):
        with pytest.raises(SchemaError):
            other(path)
        assert path.read_bytes() == before
    with A(path) as p:
        assert p.root.ints == [1]


def test_define_returns_the_type_and_types_are_reachable(tmp_path):
    p = ContractStorage(tmp_path / "t.ps")
    try:
        for name in KINDS:
            assert getattr(p.schema, name) is not None
        assert permastruct.List is List and permastruct.Dict is Dict
        from permastruct import collections as pc
        assert pc.List is List and pc.Dict is Dict and pc.Set is Set and pc.SortedDict is SortedDict
    finally:
        p.close()


def test_update_with_a_bad_nested_value_changes_nothing(tmp_path):
    """issue 16 item 7: d.update({1: [10], 2: ["x"]}) raised TypeError but left {1: [10]}."""
    from permastruct import Dict, List, SortedDict, Storage

    class Nested(Storage):
        def populateSchema(self):
            s = self.schema
            Ints = self.define(List("Ints")[s.Int])
            self.define(Dict("ByNumber")[s.Int, Ints])
            self.define(SortedDict("Sorted")[s.Int, Ints])

            class Root(s.Structure):
                n = s.Int

    with Nested(tmp_path / "nested.ps") as p:
        before = p.check()["objects"]
        for kind in ("ByNumber", "Sorted"):
            d = getattr(p.schema, kind)({0: [0]})
            with pytest.raises(TypeError):
                d.update({1: [10], 2: ["x"]})
            assert {k: list(v) for k, v in d.items()} == {0: [0]}
            with pytest.raises(TypeError):
                d.update([(3, [30]), (4, [1.5])])
            assert list(d) == [0]
            del d
        p.commit()
        assert p.check()["objects"] == before  # what the failed updates made was freed


def test_float_keys_are_looked_up_as_they_are_stored(tmp_path):
    """issue 16 item 4: Float32 keys (and Float keys holding ints past 2**53) were rounded when
    stored and looked up exactly: d[0.1] = 1; d[0.1] raised KeyError, a Set never found 0.1."""
    from permastruct import Dict, Set, SortedDict, Storage

    class Floats(Storage):
        def populateSchema(self):
            s = self.schema
            self.define(Dict("Single")[s.Float32, s.Int])
            self.define(Set("SingleSet")[s.Float32])
            self.define(SortedDict("SingleSorted")[s.Float32, s.Int])
            self.define(Dict("Double")[s.Float, s.Int])

            class Root(s.Structure):
                n = s.Int

    with Floats(tmp_path / "f.ps") as p:
        for name in ("Single", "SingleSorted"):
            d = getattr(p.schema, name)()
            d[0.1] = 1
            assert d[0.1] == 1 and 0.1 in d and d.get(0.1) == 1
            d[0.1] = 2
            assert len(d) == 1 and d[0.1] == 2
            del d[0.1]
            assert len(d) == 0
        s = p.schema.SingleSet()
        s.add(0.1)
        assert 0.1 in s and len(s) == 1
        s.discard(0.1)
        assert len(s) == 0
        big = 2 ** 53 + 1
        d = p.schema.Double()
        with pytest.raises(ValueError, match="no exact Float value"):
            d[big] = 5  # it would be stored as 2.0**53: another key than the one given
        assert len(d) == 0
        d[2 ** 53] = 5
        assert d[2 ** 53] == 5 and d[2.0 ** 53] == 5 and big not in d
        with pytest.raises(KeyError):
            d[float("nan")]
        p.check()
