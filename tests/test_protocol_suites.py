"""CPython's generic protocol suites, pointed at the persistent List and Dict.

``test.list_tests.CommonTest`` (which extends ``test.seq_tests.CommonTest``),
``test.seq_tests.CommonTest`` and ``test.mapping_tests.BasicTestMappingProtocol``
are written to be run against any sequence or mapping type through
``type2test``.  Here ``type2test`` is an adapter class whose constructor
builds a persistent collection, in an in-memory store made for each test and
checked (``Storage.check()``) after it, from the iterable it is given.  A
persistent List is typed, so the adapter picks the element type that fits the
values: Int, Float (ints and floats), String or ByteString.

The suites' tests that cannot apply to a typed persistent container are
skipped, each for the reason given in :data:`SKIPPED`; every other test runs
unchanged and must pass.
"""

import unittest
from test import list_tests, mapping_tests, seq_tests

from permastruct import Dict, List, Storage


class SuiteStorage(Storage):
    def populateSchema(self):
        s = self.schema
        self.define(List("Ints")[s.Int])
        self.define(List("Floats")[s.Float])
        self.define(List("Texts")[s.String])
        self.define(List("Blobs")[s.ByteString])
        self.define(Dict("TextMap")[s.String, s.String])


_store = None  # the in-memory store of the running test


def _list_type(values):
    """The persistent List type of the store that holds every value of ``values``."""
    kinds = {type(value) for value in values}
    schema = _store.schema
    if kinds <= {int, bool}:
        return schema.Ints
    if kinds <= {int, float}:
        return schema.Floats
    if kinds <= {str}:
        return schema.Texts
    if kinds <= {bytes}:
        return schema.Blobs
    raise TypeError(f"no persistent List type holds {', '.join(sorted(k.__name__ for k in kinds))} together")


class PersistentListAdapter:
    """``PersistentListAdapter(iterable)``: a new persistent List holding the elements of ``iterable``."""

    def __new__(cls, iterable=(), **options):
        values = list(iterable)  # iterating raises what list() raises
        return _list_type(values)(values, **options)


class PersistentDictAdapter:
    """``PersistentDictAdapter()``: a new, empty persistent Dict of String to String."""

    def __new__(cls, *args, **kwargs):
        return _store.schema.TextMap(*args, **kwargs)


#: The tests of the suites that cannot apply to a typed persistent container, and why.
SKIPPED = {
    "test_constructors": "builds a list of ('do', 1.2): no element type holds a str and a float together",
    "test_contains_fake": "stores the ALWAYS_EQ and NEVER_EQ sentinels: a typed List holds numbers or strings",
    "test_contains_order": "stores a StopCompares instance: a typed List holds numbers or strings",
    "test_count": "stores the ALWAYS_EQ and NEVER_EQ sentinels: a typed List holds numbers or strings",
    "test_index": "stores the ALWAYS_EQ and NEVER_EQ sentinels (and, in list_tests, EvilCmp objects): a typed "
                  "List holds numbers or strings",
    "test_remove": "stores the ALWAYS_EQ and NEVER_EQ sentinels and BadCmp2 objects among strs",
    "test_pickle": "proxies refuse pickling by design (DESIGN 3.4): the values are copied out instead",
    "test_free_after_iterating": "watches __del__ of an instance of a subclass of type2test; the adapter makes a "
                                 "proxy, never an instance of that subclass",
    "test_init": "re-calls __init__ on a list to refill it: a proxy's __init__ is ctypes', the constructor is "
                 "the type's call",
    "test_repr": "expects repr(lst) == '[0, 1, 2]' (a proxy's repr starts '<persistent Ints object @offset') and "
                 "appends a list to itself",
    "test_repr_deep": "nests lists in lists: a List of Int cannot hold a List",
    "test_copy": "stores the list [3, 4] among ints",
    "test_insert": "compares with a list of ints and strs ('left', -2, ..., 'foo')",
    "test_extendedslicing": "assigns the strs 'two' and 'elements' into a List of Int",
}


def _skip_listed(cls):
    for name, reason in SKIPPED.items():
        if hasattr(cls, name):
            setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
    return cls


class _FreshStore:
    """A new in-memory store for each test, checked after it."""

    def setUp(self):
        global _store
        super().setUp()
        _store = SuiteStorage(None)

    def tearDown(self):
        global _store
        try:
            _store.check()
        finally:
            _store.close()
            _store = None
        super().tearDown()


@_skip_listed
class TestListSuite(_FreshStore, list_tests.CommonTest):
    type2test = PersistentListAdapter


@_skip_listed
class TestSequenceSuite(_FreshStore, seq_tests.CommonTest):
    type2test = PersistentListAdapter


class TestMappingSuite(_FreshStore, mapping_tests.BasicTestMappingProtocol):
    type2test = PersistentDictAdapter

    def _reference(self):
        # The suite's own reference has the tuple value (1, 2, 3); a Dict of String to String holds strs.
        return {"1": "2", "key1": "value1", "key2": "value2"}


def test_the_skips_name_tests_of_the_suites():
    """Every skip names a test the suites have (a renamed test must not be skipped silently)."""
    known = set(dir(list_tests.CommonTest)) | set(dir(seq_tests.CommonTest))
    assert set(SKIPPED) <= known
