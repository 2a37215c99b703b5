"""Persistent collections: ``List``, ``Dict``, ``Set`` and ``SortedDict``.

A *descriptor* names a collection type and its element types; ``define``
turns it into a proxy class of the heap::

    Agents = self.define(List("Agents")[Agent])
    ByName = self.define(Dict("ByName")[self.schema.ByteString, Agent])
    Tags = self.define(Set("Tags")[self.schema.String])
    ByAge = self.define(SortedDict("ByAge")[self.schema.Int, Agent])

The proxies behave like ``list``, ``dict`` (insertion ordered), ``set``
(insertion ordered) and a sorted dict (a B+tree of pages).  What builds a
new value builds a plain one, as slicing does: ``lst + [4]``, ``2 * lst``,
``d | {...}``, ``tags & {...}`` and ``copy()`` return a ``list``, ``dict`` or
``set``; the in-place forms (``lst += ...``, ``lst *= n``, ``d |= ...``,
``tags |= ...``) change the persistent collection.  Their ``repr`` (and so
``str`` and ``pprint``) previews the first few elements (see
:meth:`permastruct._collection.Collection.__repr__`).  The byte layout
of the collection objects and their internal arrays, hash tables and tree
nodes is in :mod:`permastruct._format`.

This module is the public face: the descriptors and the proxy class a
storage makes for each defined collection type.  The code lives in one
module per structure, each with its theory of operation and invariants at
its top:

- :mod:`permastruct._cells`: how an element, key or value is stored in an
  8-byte cell, key hashing and normalising;
- :mod:`permastruct._collection`: the base all proxies share (the
  COLLECTION header, previews) and the mapping methods of Dict and SortedDict;
- :mod:`permastruct._list`: ``List``, a contiguous array of cells;
- :mod:`permastruct._hashtable`: the insertion-ordered hash table of ``Dict``
  and ``Set``;
- :mod:`permastruct._btree`: the B+tree of ``SortedDict``.

Ownership: a collection holds one reference on every by-reference element,
key and value it stores.  Removing, overwriting or clearing drops that
reference; an object that nothing in the file references any more, and that
no live proxy holds, is freed at the next commit.  Interned strings stay as
long as the string registry holds them.
"""

from . import _format as F
from . import _types as T
from ._btree import PersistentSortedDict
from ._hashtable import PersistentDict, PersistentSet
from ._list import PersistentList
from .errors import SchemaError

__all__ = ["List", "Dict", "Set", "SortedDict"]


# -- descriptors ------------------------------------------------------------------
class _Descriptor:
    """``Kind('Name')[types]``: what ``Storage.define`` needs to create a collection type."""

    kind = None
    arity = 1

    def __init__(self, name, params=None):
        if not isinstance(name, str) or not name.isidentifier():
            raise SchemaError(f"a collection type needs a name that is an identifier, not {name!r}")
        self.name = name
        self.params = params

    def __getitem__(self, params):
        if self.params is not None:
            raise SchemaError(f"{self!r} already has its element types")
        if not isinstance(params, tuple):
            params = (params,)
        if len(params) != self.arity:
            raise SchemaError(f"{type(self).__name__}({self.name!r}) takes {self.arity} type(s), "
                              f"not {len(params)}")
        return type(self)(self.name, params)

    def __repr__(self):
        text = f"{type(self).__name__}({self.name!r})"
        if self.params is not None:
            text += "[" + ", ".join(getattr(p, "__name__", repr(p)) for p in self.params) + "]"
        return text


class List(_Descriptor):
    """``List('Name')[T]``: a persistent list of ``T``."""

    kind = "list"


class Dict(_Descriptor):
    """``Dict('Name')[K, V]``: a persistent, insertion-ordered dict from ``K`` to ``V``."""

    kind = "dict"
    arity = 2


class Set(_Descriptor):
    """``Set('Name')[K]``: a persistent, insertion-ordered set of ``K``."""

    kind = "set"


class SortedDict(_Descriptor):
    """``SortedDict('Name')[K, V]``: a persistent dict ordered by key (a B+tree)."""

    kind = "sorteddict"
    arity = 2


DESCRIPTORS = {cls.kind: cls for cls in (List, Dict, Set, SortedDict)}
INTERNAL_TYPES = (F.T_ARRAY, F.T_TABLE, F.T_NODE)

BASES = {"list": PersistentList, "dict": PersistentDict, "set": PersistentSet,
         "sorteddict": PersistentSortedDict}
KINDS = tuple(BASES)


def make_class(storage, kind, name, params):
    """The proxy class of collection type ``name`` of ``kind`` with element types ``params``."""
    base = BASES[kind]
    cls = T.PersistentMeta(name, (base,), {"__slots__": (), "_storage": storage, "_heap": storage._heap,
                                           "_ps_params": tuple(params), "__module__": "permastruct.schema"})
    cls._ps_type_id = 0
    cls._ps_prepare(storage._heap)
    return cls
