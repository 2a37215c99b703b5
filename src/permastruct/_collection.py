"""The base every collection proxy shares: the COLLECTION header, previews, mapping methods.

Theory of operation
===================

A collection object is a 32-byte ``COLLECTION`` record (see
:mod:`permastruct._format`): ``count`` (elements), ``body`` (the offset of the
one internal object that holds the elements: a List's ``ARRAY``, a Dict's or
Set's ``TABLE``, a SortedDict's root ``NODE``; 0 while there is none) and
``aux`` (a List's capacity; for the others a modification number that
iterators watch).  :class:`Collection` reads these three fields as ctypes
fields of the proxy, so ``len()`` is one C-level read.

Invariants every collection keeps (``Storage.check()`` verifies them):

- ``body == 0`` exactly when the collection holds nothing (a List may keep an
  empty array only while its capacity says so);
- an internal object belongs to exactly one collection: its reference count
  is 1 and it names its owner's type id, so a damaged body pointing at
  another collection's array is caught when the proxy is made
  (:func:`_collection_problem`) and whenever a cached view is looked up;
- the collection holds one reference on every by-reference cell it stores
  (a B+tree separator key counts once more); removing, overwriting and
  clearing drop it.

Internal objects are read through views cached by offset in ``heap.views``
(a cast ``memoryview`` for an array, a ``_NodeView``) and ``heap.tables``
(a ``_TableView``, which the Dict or Set proxy also keeps), dropped by the
heap when the object is freed or moved (``heap.drop_view``), all of them
when the map shows another state (``heap.forget_views``).

:class:`MappingMixin` holds the mapping methods ``Dict`` and ``SortedDict``
share (``get``, ``setdefault``, ``update``, the views, ``|``, ``==``).
"""

import collections.abc as abc
import ctypes
import gc
import itertools
import struct
import threading

from . import _format as F
from . import _types as T
from .errors import CorruptStorageError, PermastructError, ReadOnlyError


# -- previews: what repr() shows of a collection ----------------------------------------
PREVIEW_ITEMS = 5  # elements (or key: value pairs) shown at most
_PREVIEW_CHARS = 200  # about how long the shown elements get, together
_ITEM_CHARS = 80  # one element's repr is cut to this
_STRING_CHARS = 40  # strings are shown cut to this many characters
_previewing = threading.local()  # .active: a collection's preview is being built in this thread


def preview_value(value):
    """One element as a preview shows it: strings (persistent ones too) by their value, cut short."""
    if isinstance(value, T.Persistent) and type(value)._ps_kind == "string":
        value, cut = value._ps_prefix(_STRING_CHARS)
    elif isinstance(value, (str, bytes)):
        value, cut = value[:_STRING_CHARS], len(value) > _STRING_CHARS
    else:
        text = repr(value)
        return text if len(text) <= _ITEM_CHARS else text[:_ITEM_CHARS - 3] + "..."
    text = repr(value)
    return text[:-1] + "..." + text[-1] if cut else text


# -- the proxy base -----------------------------------------------------------------
_BODY_NAMES = {F.T_ARRAY: "array", F.T_TABLE: "hash table", F.T_NODE: "tree node"}


def _collection_problem(proxy):
    """What is wrong with a collection's header, or None: a count the file can hold, a body of the
    right kind and owner, and for a list an array that its count and capacity fit.

    Checked once, when the proxy is made (``Collection._ps_validate``); the
    collection's own changes keep it true.  Internal objects are cached by
    offset (``heap.views``): a body of another kind or owner must never be
    looked up there, and lists that share an array must all fit in it.
    """
    cls = type(proxy)
    heap = cls._heap
    count, body = proxy._ps_count, proxy._ps_body
    if not body:
        return f"it counts {count} elements but has no {_BODY_NAMES[cls._ps_body_type]}" if count else None
    mapping = heap.mapping
    if count > mapping.size >> 3:  # every element takes at least one 8-byte cell
        return f"it counts {count} elements, more than the file can hold"
    segments = mapping.segments
    try:  # a damaged body outside the map, or crossing its end, raises here
        segment = segments[0] if len(segments) == 1 else mapping.segment_of(body)
        kind, _, owner, _, capacity = F.ARRAY.unpack_from(segment.map, body - segment.start)
    except (IndexError, OverflowError, struct.error):  # (an offset past 2**63: OverflowError)
        return f"its body {body:#x} is not in the map"
    if kind != cls._ps_body_type or owner != cls._ps_type_id:
        return (f"its body {body:#x} is not its {_BODY_NAMES[cls._ps_body_type]}: it has type {kind} "
                f"({_BODY_NAMES.get(kind, 'not an internal object')}) of owner type {owner}")
    if kind == F.T_ARRAY and (capacity != proxy._ps_aux or count > capacity):
        return f"it counts {count} elements and capacity {proxy._ps_aux}, its array has {capacity} cells"
    return None


class Collection(T.Persistent):
    """Common part of the collection proxies: the 32-byte COLLECTION header."""

    _fields_ = [("_ps_count", ctypes.c_uint64), ("_ps_body", ctypes.c_uint64),
                ("_ps_aux", ctypes.c_uint64)]
    __slots__ = ()
    __hash__ = None
    _ps_params = ()
    _ps_readonly = False

    @staticmethod
    def _ps_validate(proxy, room):
        """Its header, checked once when the proxy is made (see ``_collection_problem``)."""
        if proxy._ps_body or proxy._ps_count:
            return _collection_problem(proxy)
        return None

    def __len__(self):
        """``len(c)``: the number of elements.

        Runtime: O(1), one field read.
        """
        return self._ps_count

    _ps_brackets = ("[", "]", "[]")  # around a preview's elements; what an empty one shows

    def __repr__(self):
        """``<persistent Name object @offset 0x...: [first elements, ...] (n items)>``.

        Runtime: O(1): it reads at most the five elements it shows (a Dict also passes over the
        deleted entries before them).

        The preview shows at most 5 elements (``key: value`` pairs for
        mappings) and stops adding once they pass about 200 characters;
        strings show by their value, cut at 40 characters, and other
        elements by their own repr, cut at 80.  It reads only the elements
        it shows (a Dict also passes over the deleted entries before them),
        never the whole collection.  A collection inside another's preview
        shows only its size (``<persistent Tags object @offset 0x... (3
        items)>``), so a collection that contains itself, through a
        structure whose ``__repr__`` shows it, is shown without recursing.
        A damaged collection shows ``damaged`` instead of elements.

        >>> from permastruct import Storage, List
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(List("Ints")[self.schema.Int])
        >>> p = S(None)
        >>> p.schema.Ints(range(100))
        <persistent Ints object @offset 0x...: [0, 1, 2, 3, 4, ...] (100 items)>
        >>> print(p.schema.Ints([7]))
        <persistent Ints object @offset 0x...: [7] (1 item)>
        """
        head = T.Persistent.__repr__(self)[:-1]
        count = self._ps_count
        size = f"({count} item{'' if count == 1 else 's'})"
        state = _previewing.__dict__
        if state.get("active"):
            return f"{head} {size}>"
        state["active"] = True
        shown, total = [], 0
        try:
            for text in itertools.islice(self._ps_preview(), PREVIEW_ITEMS):
                shown.append(text)
                total += len(text) + 2
                if total >= _PREVIEW_CHARS:
                    break
        except PermastructError:
            return f"{head} {size}, damaged>"
        finally:
            state["active"] = False
        opening, closing, empty = self._ps_brackets
        if not shown:
            body = empty if not count else f"{opening}...{closing}"
        else:
            body = opening + ", ".join(shown) + (", ..." if len(shown) < count else "") + closing
        return f"{head}: {body} {size}>"

    def _ps_preview(self):
        """The preview texts of the first elements, lazily (see ``__repr__``)."""
        return map(preview_value, self)

    def _ps_storage(self):
        """The heap, for a change: refuses read-only storages."""
        heap = type(self)._heap
        if heap.readonly:
            raise ReadOnlyError(f"{heap!r} is open read-only: cannot change this {type(self).__name__}")
        return heap

    @classmethod
    def _ps_from_python(cls, heap, value, where):
        """A new collection holding the elements of plain Python ``value`` (a field assignment)."""
        if not cls._ps_accepts(value):
            raise TypeError(f"{where} holds {cls.__name__}: cannot store a value of type {type(value).__name__}")
        return cls._ps_build(heap, value)

    @classmethod
    def _ps_construct(cls, source=None, **options):
        """``Kind(source, **options)``: a new collection (of ``source``'s elements, if given)."""
        heap = cls._heap
        heap.check_writable()
        return heap.proxy(cls._ps_build(heap, source, **options))

    @classmethod
    def _ps_check_python(cls, value, where):
        if not cls._ps_accepts(value):
            super()._ps_check_python(value, where)

    @classmethod
    def _ps_build(cls, heap, source, **options):
        offset = heap.new_object(cls, F.COLLECTION.size)
        proxy = heap.at(cls, offset)
        try:
            proxy._ps_init(source, **options)
        except BaseException:
            heap.free_object(offset)
            raise
        return offset

    def _ps_init(self, source, **options):
        if options:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) "
                            f"{', '.join(options)}")
        if source is not None:
            self._ps_fill(source)

    def _ps_internal(self, heap, type_id, size):
        """A new zeroed internal object of this collection (reference count 1)."""
        offset = heap.allocator.alloc(size)
        F.INTERNAL.pack_into(heap.mapping.view(offset, F.INTERNAL.size), 0,
                                   type_id, 1, type(self)._ps_type_id)
        return offset

    def _ps_bad(self, what):
        heap = type(self)._heap
        return CorruptStorageError(f"{heap.name}: {type(self).__name__} at {self._ps_offset:#x}: {what}")

    def _ps_check_internal(self, offset, type_id, size):
        heap = type(self)._heap
        heap.check_offset(offset, size)
        try:
            kind, _, owner = F.INTERNAL.unpack_from(heap.mapping.view(offset, F.INTERNAL.size))
        except IndexError:
            raise self._ps_bad(f"its internal object at {offset:#x} is not in the map") from None
        if kind != type_id or owner != type(self)._ps_type_id:
            raise self._ps_bad(f"its internal object at {offset:#x} has type {kind} of owner {owner}")



class _ItemsView(abc.ItemsView):
    __slots__ = ()

    def __iter__(self):
        return self._mapping._ps_items()


class _ValuesView(abc.ValuesView):
    __slots__ = ()

    def __iter__(self):
        return self._mapping._ps_iter_values()


class _KeysView(abc.KeysView):
    __slots__ = ()


class MappingMixin:
    """Mapping methods shared by Dict and SortedDict (both define _ps_items and _ps_get)."""

    __slots__ = ()

    def keys(self):
        """A view of the keys, in the mapping's order.

        Runtime: O(1) to make; iterating it is O(n).
        """
        return _KeysView(self)

    def values(self):
        """A view of the values, in the mapping's order.

        Runtime: O(1) to make; iterating it is O(n).
        """
        return _ValuesView(self)

    def items(self):
        """A view of the ``(key, value)`` pairs, in the mapping's order.

        Runtime: O(1) to make; iterating it is O(n).
        """
        return _ItemsView(self)

    def get(self, key, default=None):
        """``d[key]``, or ``default`` if ``key`` is absent.

        Runtime: as ``d[key]``: O(1) average for a Dict, O(log n) for a SortedDict.
        """
        try:
            return self[key]
        except KeyError:
            return default

    def setdefault(self, key, default=None):
        """``d[key]``; if absent, store ``default`` first and return it.

        Runtime: one lookup, plus one insert if absent.
        """
        try:
            return self[key]
        except KeyError:
            self[key] = default
            return self[key]

    _MARKER = object()

    def pop(self, key, default=_MARKER):
        """Remove ``key`` and return its value (or ``default``; ``KeyError`` without one).

        Runtime: one lookup and one delete.
        """
        try:
            value = self[key]
        except KeyError:
            if default is MappingMixin._MARKER:
                raise
            return default
        del self[key]
        return value

    def update(self, other=(), **kwargs):
        """Like ``dict.update``; every key and value is checked before the first one is stored.

        A key or value of a wrong type or out of range raises the error a
        single write would (``TypeError``, ``OverflowError``, ``ValueError``)
        and nothing is stored.  The items are then stored in one pass: a
        Dict makes room for all of them at once (and when the keys are
        distinct, short, of one type and not in it yet, and the values by
        value, they are written at once: the entries a column at a time, the
        index placed in one loop, with the old entries when the table
        grows), an empty SortedDict is built bottom-up from the sorted
        items, leaf by leaf.

        Runtime: O(m) for ``m`` items into a Dict, O(m log m) into an empty
        SortedDict (a sort), O(m log n) into a SortedDict holding ``n``.
        """
        heap = self._ps_storage()
        # The pairs and their prepared forms are many small acyclic tuples, alive together:
        # the cycle collector would walk them all again and again as they are made.
        # (Process-wide while it runs; put back in the finally, also after an interrupt anywhere.)
        collecting = gc.isenabled()
        try:
            gc.disable()
            if type(other) is dict:
                pairs = list(other.items())
            elif isinstance(other, abc.Mapping) or hasattr(other, "keys"):
                pairs = [(key, other[key]) for key in other.keys()]
            else:
                pairs = list(other)
                if set(map(type, pairs)) - {tuple}:  # (a pass of type(), cheaper than one of tuple())
                    pairs = list(map(tuple, pairs))
                if set(map(len, pairs)) - {2}:
                    bad = next(item for item in pairs if len(item) != 2)
                    raise ValueError(f"dictionary update sequence element has length {len(bad)}; "
                                     "2 is required")
            pairs.extend(kwargs.items())
            if pairs:
                self._ps_bulk_store(heap, self._ps_prepare_pairs(heap, pairs))
        finally:
            if collecting:
                gc.enable()

    def _ps_prepare_pairs(self, heap, pairs):
        """``(key, stored, value cell, holder)`` for every pair: every key and value checked first,
        then the new value objects made (``holder``: a proxy that keeps one alive until stored)."""
        cls = type(self)
        store, value_type = cls._ps_key.store, cls._ps_value
        if not value_type.is_ref:
            encode = value_type.encode
            return [(key, store(key), encode(value), None) for key, value in pairs]
        check = cls._ps_value_check
        stored = []
        for key, value in pairs:
            stored.append(store(key))
            check(value)
        # Make every new value object (a nested collection is checked only as it is built); one
        # that fails leaves the mapping as it was, and the objects made before it, stored
        # nowhere, are freed at the next commit.
        encode, proxy = value_type.encode, heap.proxy
        prepared = []
        for (key, value), key_stored in zip(pairs, stored):
            if value is None or isinstance(value, T.Persistent):
                prepared.append((key, key_stored, encode(value), value))
            else:
                holder = proxy(encode(value))
                prepared.append((key, key_stored, holder._ps_oid, holder))
        return prepared

    def _ps_fill(self, source):
        self.update(source)

    _ps_brackets = ("{", "}", "{}")

    def _ps_preview(self):
        for key, value in self._ps_items():
            yield f"{preview_value(key)}: {preview_value(value)}"

    def __or__(self, other):
        """``d | other``: a plain ``dict`` of this mapping's items updated with ``other``'s (any mapping).

        Runtime: O(n + m): a copy of the items, then ``dict.update``.

        >>> from permastruct import Storage, Dict
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(Dict("Ages")[self.schema.String, self.schema.Int])
        >>> p = S(None)
        >>> ages = p.schema.Ages({"Bond": 37})
        >>> merged = ages | {"M": 60}
        >>> type(merged).__name__, merged == {"Bond": 37, "M": 60}, {"Q": 80} | ages == {"Q": 80, "Bond": 37}
        ('dict', True, True)
        """
        if not isinstance(other, abc.Mapping):
            return NotImplemented
        result = dict(self._ps_items())
        result.update(other)
        return result

    def __ror__(self, other):
        if not isinstance(other, abc.Mapping):
            return NotImplemented
        result = dict(other)
        result.update(self._ps_items())
        return result

    def __ior__(self, other):
        """``d |= other``: ``d.update(other)`` in place (a mapping or ``(key, value)`` pairs, as for ``dict``).

        Runtime: as ``update``.

        Every key and value is checked before the first is stored.

        >>> from permastruct import Storage, Dict
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(Dict("Ages")[self.schema.String, self.schema.Int])
        >>> p = S(None)
        >>> ages = same = p.schema.Ages({"Bond": 37})
        >>> ages |= [("M", 60)]; len(ages), ages is same
        (2, True)
        """
        self.update(other)
        return self

    def __eq__(self, other):
        """``d == other``: the same keys mapped to equal values (``other`` any mapping).

        Runtime: O(n) lookups in ``other``.
        """
        if not isinstance(other, abc.Mapping):
            return NotImplemented
        if isinstance(other, Collection) and self.isSameAs(other):
            return True
        if len(self) != len(other):
            return False
        for key, value in self._ps_items():
            try:
                if other[key] != value:
                    return False
            except KeyError:
                return False
        return True

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result


# Every method that changes a collection is one change (see _types.change): done once, here.
for _name in ("setdefault", "pop", "update", "__ior__"):
    setattr(MappingMixin, _name, T.change(MappingMixin.__dict__[_name]))
del _name
