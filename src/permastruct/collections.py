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
:meth:`_Collection.__repr__`).  The byte layout
of the collection objects and their internal arrays, hash tables and tree
nodes is in :mod:`permastruct._format`.

Ownership: a collection holds one reference on every by-reference element,
key and value it stores.  Removing, overwriting or clearing drops that
reference; an object that nothing in the file references any more, and that
no live proxy holds, is freed at the next commit.  Interned strings stay as
long as the string registry holds them.
"""

import bisect
import collections.abc as abc
import ctypes
import itertools
import operator
import struct
import threading
from array import array
from zlib import crc32 as _crc32

from . import _format as F
from . import _types as T
from .strings import new_string
from .structure import make_records, record_columns
from .errors import CorruptStorageError, PermastructError, ReadOnlyError, SchemaError

__all__ = ["List", "Dict", "Set", "SortedDict"]

_INTERNAL_HEADER = struct.Struct("<III")  # type, refs, owner type: the start of ARRAY, TABLE, NODE


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


class _Missing(Exception):
    """A lookup key that cannot be in the collection (wrong type or value)."""


def _unhashable(key):
    if type(key).__hash__ is None:
        raise TypeError(f"unhashable type: '{type(key).__name__}'")


# -- previews: what repr() shows of a collection ----------------------------------------
_PREVIEW_ITEMS = 5  # elements (or key: value pairs) shown at most
_PREVIEW_CHARS = 200  # about how long the shown elements get, together
_ITEM_CHARS = 80  # one element's repr is cut to this
_STRING_CHARS = 40  # strings are shown cut to this many characters
_previewing = threading.local()  # .active: a collection's preview is being built in this thread


def _preview_value(value):
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


# -- cells: how one element type is stored in 8 bytes ------------------------------------
class _Cell:
    """Encoding of values of field type ``ftype`` in an 8-byte cell.

    ``encode(value)`` validates (``TypeError``/``OverflowError``) and returns
    the cell; for by-reference types it may create a new persistent object
    (the caller increfs it once it is stored).  ``decode`` is None when the
    cell already is the Python value.
    """

    def __init__(self, heap, ftype, owner, role):
        self.type = ftype
        self.is_ref = not isinstance(ftype, T.ValueType)
        where = f"{owner} {role}"
        if self.is_ref:
            self.code = "Q"
            reference = heap.reference_to

            def encode(value):
                if type(value) is ftype:  # a live proxy of this very type (a dead one has
                    return value._ps_oid  # another class; a closed storage's refuses _ps_oid)
                return reference(ftype, value, where)
            self.encode, self.decode = encode, heap.proxy  # (proxy(0) is None)
            return
        check = ftype.checker(role, owner)
        if ftype.kind == "float":
            self.code = "d"
            if ftype.pack is not None:  # Float32: keep single precision
                unpack = struct.Struct("<f").unpack

                def encode(value):
                    return unpack(ftype.pack(check(value)))[0]
                self.encode = encode
            else:
                self.encode = check
            self.decode = None
        elif ftype.kind == "bool":
            self.code = "q"
            self.encode = lambda value: int(check(value))
            self.decode = bool
        else:
            self.code = "Q" if ftype.low == 0 else "q"
            self.encode = check
            self.decode = None


class _Key(_Cell):
    """A cell used as a key: hashing, normalising lookups, comparing."""

    def __init__(self, heap, ftype, owner, role):
        if not isinstance(ftype, T.ValueType) and getattr(ftype, "_ps_kind", None) != "string":
            raise SchemaError(f"{owner}: {role}s must be numbers, ByteString or String, "
                              f"not {getattr(ftype, '__name__', ftype)}")
        super().__init__(heap, ftype, owner, role)
        self.heap = heap
        if self.is_ref:
            self.string_type = ftype._ps_type_id
            self.python = str if self.string_type == F.T_STRING else (bytes, bytearray, memoryview)
            self.exact = str if self.string_type == F.T_STRING else bytes
        else:
            self.exact = int if ftype.kind == "int" else None
            self.number_kind = ftype.kind
            self.low, self.high = ftype.low, ftype.high
            self.f32 = ftype.pack

    # -- numbers --
    def _number(self, key):
        """``key`` as the stored Python number, or _Missing.

        Keys of a Float type are the keys a ``dict`` would find: an int equal
        to the stored double (an int no double equals, like 2**53 + 1, is never
        stored: see :meth:`store`).  Keys of a Float32 type are looked up as
        they are stored, rounded to single precision, so ``d[0.1] = 1; d[0.1]``
        finds what it stored (0.1 has no exact Float32 value).
        """
        kind = self.number_kind
        if type(key) is bool or isinstance(key, (int, float)):
            if kind == "float":
                try:
                    value = float(key)
                except OverflowError:
                    raise _Missing from None
                if value != value:  # NaN is never a key
                    raise _Missing
                if self.f32 is not None:
                    try:
                        value = struct.unpack("<f", self.f32(value))[0]
                    except (OverflowError, struct.error):
                        raise _Missing from None
                elif value != key:  # an int no double equals (2**53 + 1)
                    raise _Missing
                return value
            if isinstance(key, float):
                if not key.is_integer():
                    raise _Missing
                key = int(key)
            key = int(key)
            if kind == "bool":
                if key not in (0, 1):
                    raise _Missing
                return key
            if not self.low <= key <= self.high:
                raise _Missing
            return key
        raise _Missing

    # -- the three ways a key arrives --
    def lookup(self, key):
        """``(hash, data)`` for a lookup; raises _Missing if ``key`` cannot be present."""
        kind = type(key)
        if kind is self.exact:  # the common case first: bytes, str or int
            if kind is bytes:
                return _crc32(key, F.BYTES_SEED), key  # F.string_hash, inline
            if kind is str:
                try:
                    data = key.encode("utf-8")
                except UnicodeEncodeError:
                    raise _Missing from None
                return F.string_hash(F.T_STRING, data), data
            if self.low <= key <= self.high:
                return F.number_hash(key), key
        _unhashable(key)
        if not self.is_ref:
            value = self._number(key)
            return F.number_hash(value), value
        if isinstance(key, T.Persistent):
            if type(key)._ps_kind != "string" or type(key)._ps_type_id != self.string_type:
                raise _Missing
            return key._ps_hash, key._ps_bytes()
        if not isinstance(key, self.python):
            raise _Missing
        try:
            data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        except UnicodeEncodeError:  # a lone surrogate: no stored String can hold it
            raise _Missing from None
        return F.string_hash(self.string_type, data), data

    def store(self, key):
        """``(hash, data)`` for a key about to be stored: TypeError/OverflowError/ValueError if it cannot be."""
        if type(key) is bytes and self.exact is bytes:  # the common case first
            return _crc32(key, F.BYTES_SEED), key
        _unhashable(key)
        if not self.is_ref:
            value = self.encode(key)
            if value != value:
                raise ValueError(f"{self.type.name} NaN cannot be a key")
            if self.number_kind == "float" and self.f32 is None and value != key:
                raise ValueError(f"{key} has no exact {self.type.name} value (it would be stored as "
                                 f"{value!r}, another key): a {self.type.name} key must be a float or an "
                                 "int a float equals")
            if self.decode is bool:
                value = int(value)
            return F.number_hash(value), value
        if isinstance(key, T.Persistent):
            self.encode(key)  # heap, type and liveness checks
            return key._ps_hash, key._ps_bytes()
        if not isinstance(key, self.python):
            self.encode(key)  # raises the TypeError of a wrong type
        data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        return F.string_hash(self.string_type, data), data

    def new_cell(self, key, data):
        """The cell for a stored ``key``, its reference counted (by-reference keys: an existing
        string object gains a reference; a new one is born with it)."""
        if not self.is_ref:
            return data
        if isinstance(key, T.Persistent):
            self.heap.incref(key._ps_oid)
            return key._ps_oid
        return new_string(self.heap, self.string_type, data, 1)

    def bound(self, key):
        """A comparable form of ``key`` for bisect and irange (TypeError if not comparable)."""
        if not self.is_ref:
            if type(key) is bool or isinstance(key, (int, float)):
                return key
            raise TypeError(f"'<' not supported between a {self.type.name} key and {type(key).__name__}")
        try:
            return self.lookup(key)[1]
        except _Missing:
            raise TypeError(f"'<' not supported between a {self.type.__name__} key and "
                            f"{type(key).__name__}") from None

# -- the proxy base -----------------------------------------------------------------
_BODY_NAMES = {F.T_ARRAY: "array", F.T_TABLE: "hash table", F.T_NODE: "tree node"}


def _collection_problem(proxy):
    """What is wrong with a collection's header, or None: a count the file can hold, a body of the
    right kind and owner, and for a list an array that its count and capacity fit.

    Checked once, when the proxy is made (``_Collection._ps_validate``); the
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
    except (IndexError, struct.error):
        return f"its body {body:#x} is not in the map"
    if kind != cls._ps_body_type or owner != cls._ps_type_id:
        return (f"its body {body:#x} is not its {_BODY_NAMES[cls._ps_body_type]}: it has type {kind} "
                f"({_BODY_NAMES.get(kind, 'not an internal object')}) of owner type {owner}")
    if kind == F.T_ARRAY and (capacity != proxy._ps_aux or count > capacity):
        return f"it counts {count} elements and capacity {proxy._ps_aux}, its array has {capacity} cells"
    return None


class _Collection(T.Persistent):
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
        return self._ps_count

    _ps_brackets = ("[", "]", "[]")  # around a preview's elements; what an empty one shows

    def __repr__(self):
        """``<persistent Name object @offset 0x...: [first elements, ...] (n items)>``.

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
            for text in itertools.islice(self._ps_preview(), _PREVIEW_ITEMS):
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
        return map(_preview_value, self)

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
        _INTERNAL_HEADER.pack_into(heap.mapping.view(offset, _INTERNAL_HEADER.size), 0,
                                   type_id, 1, type(self)._ps_type_id)
        return offset

    def _ps_bad(self, what):
        heap = type(self)._heap
        return CorruptStorageError(f"{heap.name!r}: {type(self).__name__} at {self._ps_offset:#x}: {what}")

    def _ps_check_internal(self, offset, type_id, size):
        heap = type(self)._heap
        heap.check_offset(offset, size)
        try:
            kind, _, owner = _INTERNAL_HEADER.unpack_from(heap.mapping.view(offset, _INTERNAL_HEADER.size))
        except IndexError:
            raise self._ps_bad(f"its internal object at {offset:#x} is not in the map") from None
        if kind != type_id or owner != type(self)._ps_type_id:
            raise self._ps_bad(f"its internal object at {offset:#x} has type {kind} of owner {owner}")


def _slice_length(start, stop, step):
    return len(range(start, stop, step))


# -- List ----------------------------------------------------------------------------
class PersistentList(_Collection):
    """A persistent list (``collections.abc.MutableSequence``).

    >>> from permastruct import Storage, List
    >>> class S(Storage):
    ...     def populateSchema(self):
    ...         self.define(List("Ints")[self.schema.Int])
    >>> p = S(None)
    >>> numbers = p.schema.Ints([3, 1, 2])
    >>> numbers.append(5); numbers.sort(); numbers[:], numbers[-1], len(numbers)
    ([1, 2, 3, 5], 5, 4)
    """

    __slots__ = ()
    _ps_kind = "list"
    _ps_body_type = F.T_ARRAY

    @classmethod
    def _ps_prepare(cls, heap):
        cls._ps_cell = _Cell(heap, cls._ps_params[0], cls.__name__, "element")

    @staticmethod
    def _ps_accepts(value):
        return isinstance(value, abc.Iterable) and not isinstance(
            value, (str, bytes, bytearray, memoryview, abc.Mapping, T.Persistent)) or isinstance(value, PersistentList)

    # -- the array --
    def _ps_cells(self):
        """A memoryview of the array's cells (cast to the cell code), cached per array."""
        body = self._ps_body
        heap = type(self)._heap
        cells = heap.views.get(body)
        if cells is None:
            capacity = self._ps_aux
            self._ps_check_internal(body, F.T_ARRAY, F.ARRAY.size + F.CELL * capacity)
            if F.ARRAY.unpack_from(heap.mapping.view(body, F.ARRAY.size))[4] != capacity:
                raise self._ps_bad("its array has another capacity than the list says")
            if self._ps_count > capacity:
                raise self._ps_bad(f"{self._ps_count} elements in an array of {capacity}")
            try:
                cells = heap.mapping.view(body + F.ARRAY.size, F.CELL * capacity).cast(type(self)._ps_cell.code)
            except IndexError:
                raise self._ps_bad(f"its array at {body:#x} crosses the end of a mapped segment") from None
            heap.views[body] = cells
        return cells

    def _ps_resize(self, heap, capacity):
        """Move the elements to a new array of ``capacity`` cells (0: no array)."""
        count, old = self._ps_count, self._ps_body
        new = 0
        if capacity:
            new = self._ps_internal(heap, F.T_ARRAY, F.ARRAY.size + F.CELL * capacity)
            F.UINT64.pack_into(heap.mapping.view(new + 16, 8), 0, capacity)
            if count:
                fresh = heap.mapping.view(new + F.ARRAY.size, F.CELL * capacity).cast(type(self)._ps_cell.code)
                fresh[:count] = self._ps_cells()[:count]
                fresh.release()
        self._ps_body, self._ps_aux = new, capacity
        if old:
            heap.drop_internal(old)

    def _ps_reserve(self, heap, needed):
        capacity = self._ps_aux
        if needed > capacity:
            self._ps_resize(heap, max(needed, 8, capacity + (capacity >> 1)))
        return self._ps_cells()

    def _ps_maybe_shrink(self, heap):
        count, capacity = self._ps_count, self._ps_aux
        if count == 0:
            if capacity:
                self._ps_resize(heap, 0)
        elif capacity > 16 and count < capacity >> 2:
            self._ps_resize(heap, max(8, count * 2))

    def _ps_values(self, start=0, stop=None):
        """The Python values of elements ``start:stop``."""
        count = self._ps_count
        stop = count if stop is None else min(stop, count)
        if start >= stop:
            return []
        cells = self._ps_cells()[start:stop].tolist()
        decode = type(self)._ps_cell.decode
        return cells if decode is None else [decode(c) for c in cells]

    def _ps_encode_all(self, values):
        encode = type(self)._ps_cell.encode
        return [encode(v) for v in values]

    def _ps_fill(self, source):
        self.extend(source)

    def _ps_preview(self):
        return map(_preview_value, self._ps_values(0, _PREVIEW_ITEMS))

    # -- reading --
    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self._ps_count)
            if step == 1:
                return self._ps_values(start, stop)
            return self._ps_values()[index]
        try:
            index = index.__index__()
        except AttributeError:
            raise TypeError(f"list indices must be integers or slices, not {type(index).__name__}") from None
        count = self._ps_count
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError("list index out of range")
        cell = self._ps_cells()[index]
        decode = type(self)._ps_cell.decode
        return cell if decode is None else decode(cell)

    def __iter__(self):
        decode = type(self)._ps_cell.decode
        index, body, cells = 0, None, None
        while index < self._ps_count:
            if self._ps_body != body:
                body, cells = self._ps_body, self._ps_cells()
            cell = cells[index]
            yield cell if decode is None else decode(cell)
            index += 1

    def __reversed__(self):
        decode = type(self)._ps_cell.decode
        index, body, cells = self._ps_count - 1, None, None
        while 0 <= index < self._ps_count:
            if self._ps_body != body:
                body, cells = self._ps_body, self._ps_cells()
            cell = cells[index]
            yield cell if decode is None else decode(cell)
            index -= 1

    def __contains__(self, value):
        return value in self._ps_values()

    def index(self, value, start=0, stop=None):
        """The first index of ``value`` (``ValueError`` if absent), like ``list.index``."""
        values = self._ps_values()
        try:
            return values.index(value, start, len(values) if stop is None else stop)
        except ValueError:
            raise ValueError(f"{value!r} is not in list") from None

    def count(self, value):
        return self._ps_values().count(value)

    def __eq__(self, other):
        if isinstance(other, PersistentList):
            return self.isSameAs(other) or self._ps_values() == other._ps_values()
        if isinstance(other, list):
            return self._ps_values() == other
        return NotImplemented

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    # -- new plain lists, as slicing makes --
    def copy(self):
        """A plain ``list`` of the elements (a shallow copy, like ``lst[:]``).

        >>> from permastruct import Storage, List
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(List("Ints")[self.schema.Int])
        >>> p = S(None)
        >>> p.schema.Ints([1, 2]).copy()
        [1, 2]
        """
        return self._ps_values()

    def __add__(self, other):
        """``lst + other``: a plain ``list`` (``other`` a list or a persistent List), like ``lst[:] + other``.

        >>> from permastruct import Storage, List
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(List("Ints")[self.schema.Int])
        >>> p = S(None)
        >>> numbers = p.schema.Ints([1, 2])
        >>> numbers + [3], [0] + numbers, numbers + numbers
        ([1, 2, 3], [0, 1, 2], [1, 2, 1, 2])
        """
        if isinstance(other, PersistentList):
            return self._ps_values() + other._ps_values()
        if isinstance(other, list):
            return self._ps_values() + other
        return NotImplemented

    def __radd__(self, other):
        if isinstance(other, list):
            return other + self._ps_values()
        return NotImplemented

    def __mul__(self, count):
        """``lst * n`` and ``n * lst``: a plain ``list``, like ``lst[:] * n``.

        >>> from permastruct import Storage, List
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(List("Ints")[self.schema.Int])
        >>> p = S(None)
        >>> numbers = p.schema.Ints([1, 2])
        >>> numbers * 2, 2 * numbers, numbers * 0
        ([1, 2, 1, 2], [1, 2, 1, 2], [])
        """
        if not hasattr(type(count), "__index__"):
            return NotImplemented
        return self._ps_values() * count

    __rmul__ = __mul__

    # -- changing --
    def _ps_write_all(self, heap, cells):
        """Replace every element by ``cells`` (already encoded and increfed by the caller)."""
        cells_array = array(type(self)._ps_cell.code, cells)
        count = len(cells_array)
        if not count and not self._ps_body:
            return
        view = self._ps_reserve(heap, count)
        old = self._ps_count
        view[:count] = memoryview(cells_array)
        if old > count:
            view[count:old] = array(type(self)._ps_cell.code, bytes(F.CELL * (old - count)))
        self._ps_count = count
        self._ps_maybe_shrink(heap)

    def __setitem__(self, index, value):
        heap = self._ps_storage()
        cell_type = type(self)._ps_cell
        if isinstance(index, slice):
            return self._ps_set_slice(heap, index, value)
        try:
            index = index.__index__()
        except AttributeError:
            raise TypeError(f"list indices must be integers or slices, not {type(index).__name__}") from None
        count = self._ps_count
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError("list assignment index out of range")
        cell = cell_type.encode(value)
        cells = self._ps_cells()
        old = cells[index]
        cells[index] = cell
        if cell_type.is_ref:
            if cell:
                heap.incref(cell)
            if old:
                heap.decref(old)

    def _ps_set_slice(self, heap, index, value):
        if isinstance(value, PersistentList) and value.isSameAs(self):
            value = value[:]
        values = list(value) if not isinstance(value, list) else value
        start, stop, step = index.indices(self._ps_count)
        if step != 1 and len(values) != _slice_length(start, stop, step):
            raise ValueError(f"attempt to assign sequence of size {len(values)} to extended slice of "
                             f"size {_slice_length(start, stop, step)}")
        new = self._ps_encode_all(values)
        cells = self._ps_cells()[:self._ps_count].tolist() if self._ps_count else []
        removed = cells[index]
        cells[index] = new
        self._ps_replace(heap, cells, new, removed)

    def _ps_replace(self, heap, cells, added, removed):
        if type(self)._ps_cell.is_ref:
            for cell in added:
                if cell:
                    heap.incref(cell)
        self._ps_write_all(heap, cells)
        if type(self)._ps_cell.is_ref:
            for cell in removed:
                if cell:
                    heap.decref(cell)

    def __delitem__(self, index):
        heap = self._ps_storage()
        if isinstance(index, slice):
            cells = self._ps_cells()[:self._ps_count].tolist() if self._ps_count else []
            removed = cells[index]
            del cells[index]
            return self._ps_replace(heap, cells, (), removed)
        try:
            index = index.__index__()
        except AttributeError:
            raise TypeError(f"list indices must be integers or slices, not {type(index).__name__}") from None
        count = self._ps_count
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError("list assignment index out of range")
        self._ps_remove_at(heap, index)

    def _ps_remove_at(self, heap, index):
        cells = self._ps_cells()
        count = self._ps_count
        old = cells[index]
        cells[index:count - 1] = cells[index + 1:count]
        cells[count - 1] = 0
        self._ps_count = count - 1
        self._ps_maybe_shrink(heap)
        if old and type(self)._ps_cell.is_ref:
            heap.decref(old)
        return old

    def insert(self, index, value):
        """Insert ``value`` before ``index`` (clamped like ``list.insert``)."""
        heap = self._ps_storage()
        try:
            index = index.__index__()
        except AttributeError:
            raise TypeError(f"'{type(index).__name__}' object cannot be interpreted as an integer") from None
        cell_type = type(self)._ps_cell
        cell = cell_type.encode(value)
        count = self._ps_count
        index = min(max(index + count if index < 0 else index, 0), count)
        cells = self._ps_reserve(heap, count + 1)
        cells[index + 1:count + 1] = cells[index:count]
        cells[index] = cell
        self._ps_count = count + 1
        if cell and cell_type.is_ref:
            heap.incref(cell)

    def append(self, value):
        """Add ``value`` at the end (amortised O(1))."""
        cls = type(self)
        heap = cls._heap
        if heap.readonly:
            self._ps_storage()  # raises ReadOnlyError
        cell_type = cls._ps_cell
        cell = cell_type.encode(value)
        count = self._ps_count
        if count < self._ps_aux:
            cells = heap.views.get(self._ps_body) or self._ps_cells()
        else:
            cells = self._ps_reserve(heap, count + 1)
        cells[count] = cell
        self._ps_count = count + 1
        if cell and cell_type.is_ref:
            heap.incref(cell)

    def extend(self, values):
        """Append every element of ``values``; nothing is added if one of them has a wrong type."""
        heap = self._ps_storage()
        if isinstance(values, PersistentList):
            values = values._ps_values()
        self._ps_append_cells(heap, self._ps_encode_all(values))

    def extend_records(self, rows=None, *, columns=None, cls=None):
        """Make a new record per row (or per position of ``columns``) and append them; return how many.

        The bulk way to load a list of structures: ``rows`` is an iterable of
        rows, each a sequence of every field's value in the order of the
        class's fields, or a mapping of field names to values; ``columns``
        maps field names to equally long sequences (lists, ``array``\\ s,
        ``numpy`` arrays: a buffer of the field's own type is taken as it
        is).  Fields left out are zero, ``False`` or None.  The records are of
        the list's element type, or of ``cls``, a subclass of it.  Every
        value is checked as a single write checks it, before anything is
        made, and a bad one raises the error a single write would, naming its
        row: then nothing is added.  The result equals appending
        ``cls(**row)`` for each row, at a fraction of the cost: the records
        are written a page at a time.

        >>> from permastruct import Storage, List
        >>> class Shop(Storage):
        ...     def populateSchema(self):
        ...         class Item(self.schema.Structure):
        ...             name = self.schema.String
        ...             price = self.schema.Float
        ...             stock = self.schema.Int
        ...         self.define(List("Items")[Item])
        >>> p = Shop(None)
        >>> items = p.schema.Items()
        >>> items.extend_records([("pen", 1.5, 40), ("ink", 7.25, 3)])
        2
        >>> items.extend_records(columns={"name": ["pad", "nib"], "stock": [12, 90]})
        2
        >>> [(str(item.name), item.price, item.stock) for item in items]
        [('pen', 1.5, 40), ('ink', 7.25, 3), ('pad', 0.0, 12), ('nib', 0.0, 90)]
        >>> items.extend_records([("cap", 2.0, "many")])
        Traceback (most recent call last):
        ...
        TypeError: row 0: Item.stock is Int: expected an int, not str
        >>> len(items)
        4
        """
        heap = self._ps_storage()
        element = type(self)._ps_params[0]
        record = element if cls is None else cls
        if not (isinstance(record, type) and issubclass(record, element) and record._ps_kind == "structure"
                and record._heap is heap):
            raise TypeError(f"{type(self).__name__} holds {getattr(element, '__name__', element)}: records "
                            f"of {getattr(record, '__name__', record)!r} cannot be made for it")
        columns, count = record_columns(record, rows, columns)
        if not count:
            return 0
        length = self._ps_count
        cells = self._ps_reserve(heap, length + count)  # first: the records then need only their own room
        cells[length:length + count] = make_records(record, columns, count, 1)
        self._ps_count = length + count
        return count

    def _ps_append_cells(self, heap, new):
        """Append encoded cells ``new`` (by-reference ones gain a reference each)."""
        if not new:
            return
        count = self._ps_count
        packed = memoryview(array(type(self)._ps_cell.code, new))
        cells = self._ps_reserve(heap, count + len(new))
        cells[count:count + len(new)] = packed
        self._ps_count = count + len(new)
        if type(self)._ps_cell.is_ref:
            for cell in new:
                if cell:
                    heap.incref(cell)

    def __iadd__(self, values):
        """``lst += values``: ``lst.extend(values)``, in place (nothing is added if one has a wrong type).

        >>> from permastruct import Storage, List
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(List("Ints")[self.schema.Int])
        >>> p = S(None)
        >>> numbers = same = p.schema.Ints([1])
        >>> numbers += (2, 3); numbers[:], numbers is same
        ([1, 2, 3], True)
        """
        self.extend(values)
        return self

    def __imul__(self, count):
        """``lst *= n``: repeat the elements in place, like ``list`` (``n <= 0`` empties the list).

        Runtime: O(n * len(lst)); by-reference elements gain a reference per copy.

        >>> from permastruct import Storage, List
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(List("Ints")[self.schema.Int])
        >>> p = S(None)
        >>> numbers = same = p.schema.Ints([1, 2])
        >>> numbers *= 2; numbers[:], numbers is same
        ([1, 2, 1, 2], True)
        """
        if not hasattr(type(count), "__index__"):
            return NotImplemented
        heap = self._ps_storage()
        count = operator.index(count)
        size = self._ps_count
        if count <= 0:
            self.clear()
        elif count > 1 and size:
            cells = self._ps_cells()[:size].tolist()
            self._ps_append_cells(heap, cells * (count - 1))
        return self

    def pop(self, index=-1):
        """Remove and return the element at ``index`` (the last by default)."""
        heap = self._ps_storage()
        count = self._ps_count
        if not count:
            raise IndexError("pop from empty list")
        try:
            index = index.__index__()
        except AttributeError:
            raise TypeError(f"'{type(index).__name__}' object cannot be interpreted as an integer") from None
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError("pop index out of range")
        value = self[index]  # a proxy keeps the object alive past its decref
        self._ps_remove_at(heap, index)
        return value

    def remove(self, value):
        """Remove the first element equal to ``value`` (``ValueError`` if absent)."""
        heap = self._ps_storage()
        try:
            index = self._ps_values().index(value)
        except ValueError:
            raise ValueError("list.remove(x): x not in list") from None
        self._ps_remove_at(heap, index)

    def clear(self):
        """Remove every element."""
        heap = self._ps_storage()
        if not self._ps_count:
            return
        removed = self._ps_cells()[:self._ps_count].tolist()
        self._ps_replace(heap, [], (), removed)

    def reverse(self):
        """Reverse the elements in place."""
        self._ps_storage()
        count = self._ps_count
        if count > 1:
            cells = self._ps_cells()
            cells[:count] = memoryview(array(type(self)._ps_cell.code, reversed(cells[:count].tolist())))

    def sort(self, *, key=None, reverse=False):
        """Sort in place, like ``list.sort`` (stable; unchanged if a comparison fails).

        A list that ``key`` or a comparison changes meanwhile is left as they
        left it, and ``ValueError`` is raised (as ``list.sort`` does).
        """
        self._ps_storage()
        count = self._ps_count
        if count < 2:
            return
        before = self._ps_cells()[:count].tolist()
        values = self._ps_values()
        keys = values if key is None else [key(v) for v in values]
        order = sorted(range(count), key=keys.__getitem__, reverse=reverse)
        cells = self._ps_cells()
        current = cells[:count].tolist()
        if self._ps_count != count or current != before:
            raise ValueError("list modified during sort")
        cells[:count] = memoryview(array(type(self)._ps_cell.code, [current[i] for i in order]))

    # -- heap hooks --
    @classmethod
    def _ps_references(cls, heap, offset, type_id):
        """Offsets the object at ``offset`` (this list or its array) references."""
        header = F.COLLECTION.unpack_from(heap.mapping.view(offset, F.COLLECTION.size))
        if type_id != F.T_ARRAY:
            return [header[3]] if header[3] else []
        if not cls._ps_cell.is_ref:
            return []
        capacity = F.ARRAY.unpack_from(heap.mapping.view(offset, F.ARRAY.size))[4]
        heap.check_offset(offset, F.ARRAY.size + F.CELL * capacity)
        return [c for c in heap.mapping.view(offset + F.ARRAY.size, F.CELL * capacity).cast("Q") if c]

    @classmethod
    def _ps_internal_size(cls, heap, offset, type_id):
        if type_id != F.T_ARRAY:
            return None
        return F.ARRAY.size + F.CELL * F.ARRAY.unpack_from(heap.mapping.view(offset, F.ARRAY.size))[4]

    def _ps_check(self, referenced, fail):
        me = T.Persistent.__repr__(self)  # the short form: a preview would read what is checked
        count, body, capacity = self._ps_count, self._ps_body, self._ps_aux
        if not body:
            if count or capacity:
                fail(f"{me} has {count} elements and capacity {capacity} but no array")
            return
        referenced(body, None, me)
        self._ps_cells()
        if count > capacity:
            fail(f"{me} has {count} elements in an array of {capacity}")
        cells = self._ps_cells()
        if any(cells[count:capacity].tolist()):
            fail(f"{me}: cells after the last element are not empty")
        cell_type = type(self)._ps_cell
        if cell_type.is_ref:
            for index, cell in enumerate(cells[:count].tolist()):
                if cell:
                    referenced(cell, cell_type.type, f"{me}[{index}]")


# -- Dict and Set: an insertion-ordered hash table ------------------------------------------
#: Entries a hash table can hold: its indices are uint32 (entry number + 1, and 0xFFFFFFFF for deleted).
_MAX_ENTRIES = (1 << 32) * 2 // 3 - 2


def _table_shape(wanted):
    """``(nslots, capacity)`` of a table for at least ``wanted`` entries (load <= 2/3)."""
    nslots = 8
    while nslots * 2 < wanted * 3:
        nslots *= 2
    return nslots, nslots * 2 // 3


class _TableView:
    """Cached views of one TABLE object: header, indices, entries."""

    __slots__ = ("head", "indices", "entries", "mask", "capacity", "entries_at")

    def __init__(self, heap, offset, esize):
        type_id, _, _, _, nslots, used, filled, capacity = F.TABLE.unpack_from(
            heap.mapping.view(offset, F.TABLE.size))
        if not nslots or nslots & (nslots - 1) or capacity >= nslots or used > capacity or filled > capacity:
            raise CorruptStorageError(f"{heap.name!r}: hash table at {offset:#x} has {nslots} slots, "
                                      f"{used} of {capacity} entries used")
        entries_at = F.TABLE.size + -(-4 * nslots // 8) * 8
        heap.check_offset(offset, entries_at + esize * capacity)
        self.head = heap.mapping.view(offset, F.TABLE.size).cast("Q")
        self.indices = heap.mapping.view(offset + F.TABLE.size, 4 * nslots).cast("I")
        self.entries = heap.mapping.view(offset + entries_at, esize * capacity)
        self.mask = nslots - 1
        self.capacity = capacity
        self.entries_at = entries_at


class _HashCollection(_Collection):
    """The hash table shared by Dict and Set (insertion ordered, like ``dict``)."""

    __slots__ = ()
    _ps_has_values = False
    _ps_body_type = F.T_TABLE

    @classmethod
    def _ps_prepare(cls, heap):
        cls._ps_key = _Key(heap, cls._ps_params[0], cls.__name__, "key")
        code = cls._ps_key.code
        if cls._ps_has_values:
            cls._ps_value = _Cell(heap, cls._ps_params[1], cls.__name__, "value")
            code += cls._ps_value.code
        cls._ps_entry = struct.Struct("<II" + code)
        cls._ps_equals = heap.string_equals if cls._ps_key.is_ref else None
        cls._ps_esize = cls._ps_entry.size
        cls._ps_blank = bytes(cls._ps_esize)

    @classmethod
    def _ps_accepts(cls, value):
        if cls._ps_has_values:
            return isinstance(value, abc.Mapping)
        return isinstance(value, abc.Iterable) and not isinstance(value, (str, bytes, bytearray, abc.Mapping))

    def _ps_init(self, source, size=None, **options):
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise TypeError(f"size must be a non-negative int, not {size!r}")
            if size > _MAX_ENTRIES:
                raise OverflowError(f"a {type(self).__name__} holds at most {_MAX_ENTRIES} entries; "
                                    f"size={size} is more")
            if size:
                self._ps_rebuild(type(self)._heap, size)
        super()._ps_init(source, **options)

    def _ps_table(self):
        body = self._ps_body
        heap = type(self)._heap
        view = heap.views.get(body)
        if view is None:
            self._ps_check_internal(body, F.T_TABLE, F.TABLE.size)
            try:
                view = _TableView(heap, body, type(self)._ps_esize)
            except IndexError:
                raise self._ps_bad(f"its hash table at {body:#x} crosses the end of a mapped segment") from None
            heap.views[body] = view
        return view

    def _ps_find(self, table, hash_, data):
        """``(slot, entry, fields)`` of the key ``data`` with ``hash_``, or ``(free slot, -1, None)``."""
        cls = type(self)
        indices, mask, entries, capacity = table.indices, table.mask, table.entries, table.capacity
        unpack, esize = cls._ps_entry.unpack_from, cls._ps_esize
        equals = cls._ps_equals  # None for numbers: compare the cells
        slot = hash_ & mask
        free = -1
        for _ in range(mask + 1):
            index = indices[slot]
            if index == 0:  # F.TABLE_EMPTY
                return (slot if free < 0 else free), -1, None
            if index == F.TABLE_DELETED:
                if free < 0:
                    free = slot
            else:
                if index > capacity:
                    raise self._ps_bad(f"hash slot {slot} names entry {index - 1}")
                fields = unpack(entries, (index - 1) * esize)
                if fields[0] == hash_ and (fields[2] == data if equals is None else equals(fields[2], data)):
                    return slot, index - 1, fields
            slot = (slot + 1) & mask
        if free >= 0:
            return free, -1, None
        raise self._ps_bad("its hash table has no free slot")

    def _ps_lookup(self, key):
        """``(table, slot, entry, fields)`` of ``key``; raises _Missing."""
        body = self._ps_body
        if not body:
            _unhashable(key)
            raise _Missing
        cls = type(self)
        hash_, data = cls._ps_key.lookup(key)
        table = cls._heap.views.get(body) or self._ps_table()
        # The first probe, inline: with the table at most 2/3 full it usually decides.
        slot = hash_ & table.mask
        index = table.indices[slot]
        if 0 < index <= table.capacity:
            fields = cls._ps_entry.unpack_from(table.entries, (index - 1) * cls._ps_esize)
            equals = cls._ps_equals
            if fields[0] == hash_ and (fields[2] == data if equals is None else equals(fields[2], data)):
                return table, slot, index - 1, fields
        slot, entry, fields = self._ps_find(table, hash_, data)
        if entry < 0:
            raise _Missing
        return table, slot, entry, fields

    def _ps_rebuild(self, heap, wanted):
        """Move the live entries to a new table with room for ``wanted`` entries (compacting)."""
        cls = type(self)
        nslots, capacity = _table_shape(max(wanted, self._ps_count))
        entries_at = F.TABLE.size + -(-4 * nslots // 8) * 8
        new = self._ps_internal(heap, F.T_TABLE, entries_at + cls._ps_esize * capacity)
        F.TABLE.pack_into(heap.mapping.view(new, F.TABLE.size), 0, F.T_TABLE, 1, cls._ps_type_id, 0,
                          nslots, 0, 0, capacity)
        view = _TableView(heap, new, cls._ps_esize)
        used = 0
        esize, mask = cls._ps_esize, nslots - 1
        old = self._ps_body
        if old:
            table = self._ps_table()
            source = table.entries
            unpack = cls._ps_entry.unpack_from
            for entry in range(table.head[3]):
                fields = unpack(source, entry * esize)
                if not fields[1]:
                    continue
                view.entries[used * esize:(used + 1) * esize] = source[entry * esize:(entry + 1) * esize]
                slot = fields[0] & mask
                while view.indices[slot]:
                    slot = (slot + 1) & mask
                view.indices[slot] = used + 1
                used += 1
        view.head[3] = view.head[4] = used
        heap.views[new] = view
        self._ps_body = new
        if old:
            heap.drop_internal(old)
        return view

    def _ps_insert(self, heap, key, value_cell=None, stored=None):
        """Add ``key``; ``stored`` is ``_ps_key.store(key)`` if the caller has it already.

        Returns ``(table, -1)`` for a new key, ``(table, entry)`` for one already present.
        """
        cls = type(self)
        key_type = cls._ps_key
        hash_, data = stored or key_type.store(key)
        table = self._ps_table() if self._ps_body else self._ps_rebuild(heap, 1)
        slot, entry, _ = self._ps_find(table, hash_, data)
        if entry >= 0:
            return table, entry
        used = table.head[3]
        if used >= table.capacity or (table.head[4] >= table.capacity and table.indices[slot] == F.TABLE_EMPTY):
            table = self._ps_rebuild(heap, self._ps_count * 2 + 1)
            slot, _, _ = self._ps_find(table, hash_, data)
            used = table.head[3]
        if table.indices[slot] == F.TABLE_EMPTY:
            table.head[4] += 1
        cell = key_type.new_cell(key, data)
        fields = (hash_, 1, cell) if value_cell is None else (hash_, 1, cell, value_cell)
        cls._ps_entry.pack_into(table.entries, used * cls._ps_esize, *fields)
        table.indices[slot] = used + 1
        table.head[3] = used + 1
        self._ps_count += 1
        self._ps_aux += 1
        if value_cell and cls._ps_has_values and cls._ps_value.is_ref:
            heap.incref(value_cell)
        return table, -1

    def _ps_delete(self, heap, table, slot, entry, fields):
        cls = type(self)
        esize = cls._ps_esize
        table.indices[slot] = F.TABLE_DELETED
        table.entries[entry * esize:(entry + 1) * esize] = cls._ps_blank
        used = table.head[3]
        if entry == used - 1:
            unpack = cls._ps_entry.unpack_from
            while used and not unpack(table.entries, (used - 1) * esize)[1]:
                used -= 1
            table.head[3] = used
        self._ps_count -= 1
        self._ps_aux += 1
        if cls._ps_key.is_ref:
            heap.decref(fields[2])
        if cls._ps_has_values and cls._ps_value.is_ref and fields[3]:
            heap.decref(fields[3])
        count = self._ps_count
        if count == 0:
            old = self._ps_body
            self._ps_body = 0
            heap.drop_internal(old)
        elif table.capacity > 16 and count * 8 < table.capacity:
            self._ps_rebuild(heap, count * 2)

    def _ps_last_entry(self):
        """``(table, slot, entry, fields)`` of the newest entry (the collection is not empty)."""
        cls = type(self)
        table = self._ps_table()
        entry = table.head[3] - 1
        fields = cls._ps_entry.unpack_from(table.entries, entry * cls._ps_esize)
        slot = fields[0] & table.mask
        for _ in range(table.mask + 1):
            if table.indices[slot] == entry + 1:
                return table, slot, entry, fields
            slot = (slot + 1) & table.mask
        raise self._ps_bad(f"its newest entry {entry} has no hash slot")

    def _ps_live_entries(self):
        """Unpacked live entries in insertion order; a change in size during iteration raises."""
        cls = type(self)
        unpack, esize = cls._ps_entry.unpack_from, cls._ps_esize
        version = self._ps_aux
        entry = 0
        while True:
            if self._ps_aux != version:
                raise RuntimeError(f"{cls.__name__} changed size during iteration")
            if not self._ps_body:
                return
            table = self._ps_table()
            if entry >= table.head[3]:
                return
            fields = unpack(table.entries, entry * esize)
            entry += 1
            if fields[1]:
                yield fields

    def _ps_decode_key(self, cell):
        decode = type(self)._ps_key.decode
        return cell if decode is None else decode(cell)

    def __iter__(self):
        decode = type(self)._ps_key.decode
        for fields in self._ps_live_entries():
            yield fields[2] if decode is None else decode(fields[2])

    def __contains__(self, key):
        try:
            self._ps_lookup(key)
        except _Missing:
            return False
        return True

    def clear(self):
        """Remove every element."""
        heap = self._ps_storage()
        if not self._ps_body:
            return
        cls = type(self)
        removed = list(self._ps_live_entries())
        old = self._ps_body
        self._ps_body = 0
        self._ps_count = 0
        self._ps_aux += 1
        heap.drop_internal(old)
        key_ref = cls._ps_key.is_ref
        value_ref = cls._ps_has_values and cls._ps_value.is_ref
        for fields in removed:
            if key_ref:
                heap.decref(fields[2])
            if value_ref and fields[3]:
                heap.decref(fields[3])

    # -- heap hooks --
    @classmethod
    def _ps_references(cls, heap, offset, type_id):
        header = F.COLLECTION.unpack_from(heap.mapping.view(offset, F.COLLECTION.size))
        if type_id != F.T_TABLE:
            return [header[3]] if header[3] else []
        view = _TableView(heap, offset, cls._ps_esize)
        refs = []
        unpack, esize = cls._ps_entry.unpack_from, cls._ps_esize
        key_ref = cls._ps_key.is_ref
        value_ref = cls._ps_has_values and cls._ps_value.is_ref
        for entry in range(view.head[3]):
            fields = unpack(view.entries, entry * esize)
            if fields[1]:
                if key_ref:
                    refs.append(fields[2])
                if value_ref and fields[3]:
                    refs.append(fields[3])
        return refs

    @classmethod
    def _ps_internal_size(cls, heap, offset, type_id):
        if type_id != F.T_TABLE:
            return None
        _, _, _, _, nslots, _, _, capacity = F.TABLE.unpack_from(heap.mapping.view(offset, F.TABLE.size))
        return F.TABLE.size + -(-4 * nslots // 8) * 8 + cls._ps_esize * capacity

    def _ps_check(self, referenced, fail):
        me = T.Persistent.__repr__(self)  # the short form: a preview would read what is checked
        cls = type(self)
        count, body = self._ps_count, self._ps_body
        if not body:
            if count:
                fail(f"{me} has {count} elements but no table")
            return
        referenced(body, None, me)
        table = self._ps_table()
        used = table.head[3]
        unpack, esize = cls._ps_entry.unpack_from, cls._ps_esize
        key_type = cls._ps_key
        live = 0
        slots_of = {}
        for slot, index in enumerate(table.indices):
            if index not in (F.TABLE_EMPTY, F.TABLE_DELETED):
                if index - 1 >= used or index - 1 in slots_of:
                    fail(f"{me}: hash slot {slot} names entry {index - 1} (used {used})")
                slots_of[index - 1] = slot
        for entry in range(table.capacity):
            fields = unpack(table.entries, entry * esize)
            if entry >= used or not fields[1]:
                if any(table.entries[entry * esize:(entry + 1) * esize]):
                    fail(f"{me}: unused entry {entry} is not empty")
                if entry in slots_of:
                    fail(f"{me}: hash slot {slots_of[entry]} names the unused entry {entry}")
                continue
            live += 1
            if entry not in slots_of:
                fail(f"{me}: entry {entry} has no hash slot")
            where = f"{me} entry {entry}"
            if key_type.is_ref:
                referenced(fields[2], key_type.type, where + " key")
                data = type(self)._heap.string_data(fields[2])
                expected = F.string_hash(key_type.string_type, data)
            else:
                value = fields[2]
                expected = F.number_hash(int(value) if key_type.decode is bool else value)
            if fields[0] != expected:
                fail(f"{where}: stored hash {fields[0]:#x}, expected {expected:#x}")
            slot = fields[0] & table.mask
            while slot != slots_of[entry]:
                if table.indices[slot] == F.TABLE_EMPTY:
                    fail(f"{where} cannot be found from its hash position")
                slot = (slot + 1) & table.mask
            if cls._ps_has_values and cls._ps_value.is_ref and fields[3]:
                referenced(fields[3], cls._ps_value.type, where + " value")
        if live != count:
            fail(f"{me} counts {count} elements but its table holds {live}")
        filled = sum(1 for index in table.indices if index != F.TABLE_EMPTY)
        if filled != table.head[4] or filled > table.capacity:
            fail(f"{me}: {filled} hash slots are in use, the table says {table.head[4]} "
                 f"(capacity {table.capacity})")


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


class _MappingMixin:
    """Mapping methods shared by Dict and SortedDict (both define _ps_items and _ps_get)."""

    __slots__ = ()

    def keys(self):
        return _KeysView(self)

    def values(self):
        return _ValuesView(self)

    def items(self):
        return _ItemsView(self)

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def setdefault(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            self[key] = default
            return self[key]

    _MARKER = object()

    def pop(self, key, default=_MARKER):
        try:
            value = self[key]
        except KeyError:
            if default is _MappingMixin._MARKER:
                raise
            return default
        del self[key]
        return value

    def update(self, other=(), **kwargs):
        """Like ``dict.update``; every key and value is checked before the first one is stored."""
        if isinstance(other, abc.Mapping):
            pairs = [(key, other[key]) for key in other.keys()]
        elif hasattr(other, "keys"):
            pairs = [(key, other[key]) for key in other.keys()]
        else:
            pairs = []
            for item in other:
                item = tuple(item)
                if len(item) != 2:
                    raise ValueError(f"dictionary update sequence element has length {len(item)}; 2 is required")
                pairs.append(item)
        pairs.extend(kwargs.items())
        self._ps_validate_pairs(pairs)
        cls = type(self)
        if cls._ps_value.is_ref:
            # Make every new value object first (a nested collection is checked only as it is
            # built); one that fails leaves the mapping as it was, and the objects made before
            # it, stored nowhere, are freed at the next commit.
            heap, encode = cls._heap, cls._ps_value.encode
            pairs = [(key, value if value is None or isinstance(value, T.Persistent)
                      else heap.proxy(encode(value))) for key, value in pairs]
        for key, value in pairs:
            self[key] = value

    def _ps_validate_pairs(self, pairs):
        cls = type(self)
        for key, value in pairs:
            cls._ps_key.store(key)
            if cls._ps_value.is_ref:
                cls._ps_value_check(value)
            else:
                cls._ps_value.encode(value)

    def _ps_fill(self, source):
        self.update(source)

    _ps_brackets = ("{", "}", "{}")

    def _ps_preview(self):
        for key, value in self._ps_items():
            yield f"{_preview_value(key)}: {_preview_value(value)}"

    def __or__(self, other):
        """``d | other``: a plain ``dict`` of this mapping's items updated with ``other``'s (any mapping).

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
        if not isinstance(other, abc.Mapping):
            return NotImplemented
        if isinstance(other, _Collection) and self.isSameAs(other):
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


def _value_checker(heap, ftype, where):
    """Validate a by-reference value without creating anything."""
    def check(value):
        if value is None:
            return
        if isinstance(value, T.Persistent):
            heap.reference_check(ftype, value, where)
            return
        ftype._ps_check_python(value, where)
    return check


class PersistentDict(_MappingMixin, _HashCollection):
    """A persistent dict (``collections.abc.MutableMapping``), insertion ordered like ``dict``.

    >>> from permastruct import Storage, Dict
    >>> class S(Storage):
    ...     def populateSchema(self):
    ...         self.define(Dict("Ages")[self.schema.String, self.schema.Int])
    >>> p = S(None)
    >>> ages = p.schema.Ages({"Bond": 37})
    >>> ages["M"] = 60; ages["Bond"], "M" in ages, len(ages), ages == {"Bond": 37, "M": 60}
    (37, True, 2, True)
    """

    __slots__ = ()
    _ps_kind = "dict"
    _ps_has_values = True

    @classmethod
    def _ps_prepare(cls, heap):
        super()._ps_prepare(heap)
        if cls._ps_value.is_ref:
            cls._ps_value_check = staticmethod(_value_checker(heap, cls._ps_params[1], f"{cls.__name__} value"))

    def __getitem__(self, key):
        try:
            fields = self._ps_lookup(key)[3]
        except _Missing:
            raise KeyError(key) from None
        decode = type(self)._ps_value.decode
        return fields[3] if decode is None else decode(fields[3])

    def __setitem__(self, key, value):
        heap = self._ps_storage()
        cls = type(self)
        stored = cls._ps_key.store(key)  # a wrong key fails before the value creates anything
        value_type = cls._ps_value
        cell = value_type.encode(value)
        table, entry = self._ps_insert(heap, key, cell, stored)
        if entry >= 0:  # an existing key: replace the value
            at = entry * cls._ps_esize
            fields = list(cls._ps_entry.unpack_from(table.entries, at))
            old, fields[3] = fields[3], cell
            cls._ps_entry.pack_into(table.entries, at, *fields)
            if value_type.is_ref:
                if cell:
                    heap.incref(cell)
                if old:
                    heap.decref(old)

    def __delitem__(self, key):
        heap = self._ps_storage()
        try:
            table, slot, entry, fields = self._ps_lookup(key)
        except _Missing:
            raise KeyError(key) from None
        self._ps_delete(heap, table, slot, entry, fields)

    def _ps_items(self):
        cls = type(self)
        kdecode, vdecode = cls._ps_key.decode, cls._ps_value.decode
        for fields in self._ps_live_entries():
            yield (fields[2] if kdecode is None else kdecode(fields[2]),
                   fields[3] if vdecode is None else vdecode(fields[3]))

    def _ps_iter_values(self):
        vdecode = type(self)._ps_value.decode
        for fields in self._ps_live_entries():
            yield fields[3] if vdecode is None else vdecode(fields[3])

    def popitem(self):
        """Remove and return the last inserted ``(key, value)``; ``KeyError`` if empty."""
        heap = self._ps_storage()
        if not self._ps_count:
            raise KeyError("popitem(): dictionary is empty")
        cls = type(self)
        table, slot, entry, fields = self._ps_last_entry()
        kdecode, vdecode = cls._ps_key.decode, cls._ps_value.decode
        item = (fields[2] if kdecode is None else kdecode(fields[2]),
                fields[3] if vdecode is None else vdecode(fields[3]))
        self._ps_delete(heap, table, slot, entry, fields)
        return item

    def pop(self, key, default=_MappingMixin._MARKER):
        """Remove ``key`` and return its value (or ``default``; ``KeyError`` without one)."""
        heap = self._ps_storage()
        try:
            table, slot, entry, fields = self._ps_lookup(key)
        except _Missing:
            if default is _MappingMixin._MARKER:
                raise KeyError(key) from None
            return default
        vdecode = type(self)._ps_value.decode
        value = fields[3] if vdecode is None else vdecode(fields[3])
        self._ps_delete(heap, table, slot, entry, fields)
        return value

    def copy(self):
        """A plain ``dict`` with the same items."""
        return dict(self._ps_items())


class PersistentSet(_HashCollection):
    """A persistent set (``collections.abc.MutableSet``), insertion ordered.

    >>> from permastruct import Storage, Set
    >>> class S(Storage):
    ...     def populateSchema(self):
    ...         self.define(Set("Tags")[self.schema.String])
    >>> p = S(None)
    >>> tags = p.schema.Tags(["spy", "agent"])
    >>> tags.add("spy"); len(tags), "agent" in tags, tags | {"boss"} == {"spy", "agent", "boss"}
    (2, True, True)
    """

    __slots__ = ()
    _ps_kind = "set"
    _ps_brackets = ("{", "}", "set()")

    def _ps_fill(self, source):
        self._ps_add_all(source)

    @classmethod
    def _from_iterable(cls, iterable):
        return set(iterable)

    def add(self, key):
        """Add ``key`` (no effect if present)."""
        self._ps_insert(self._ps_storage(), key)

    def discard(self, key):
        """Remove ``key`` if present."""
        heap = self._ps_storage()
        try:
            table, slot, entry, fields = self._ps_lookup(key)
        except _Missing:
            return
        self._ps_delete(heap, table, slot, entry, fields)

    def remove(self, key):
        """Remove ``key``; ``KeyError`` if absent."""
        heap = self._ps_storage()
        try:
            table, slot, entry, fields = self._ps_lookup(key)
        except _Missing:
            raise KeyError(key) from None
        self._ps_delete(heap, table, slot, entry, fields)

    def pop(self):
        """Remove and return the last added element; ``KeyError`` if empty."""
        heap = self._ps_storage()
        if not self._ps_count:
            raise KeyError("pop from an empty set")
        table, slot, entry, fields = self._ps_last_entry()
        key = self._ps_decode_key(fields[2])
        self._ps_delete(heap, table, slot, entry, fields)
        return key

    def __ior__(self, other):
        self._ps_storage()
        if not isinstance(other, abc.Set):
            return NotImplemented
        self._ps_add_all(other)
        return self

    def _ps_add_all(self, keys):
        keys = list(keys)
        for key in keys:  # every key is checked before the first is stored
            type(self)._ps_key.store(key)
        for key in keys:
            self.add(key)

    def update(self, *others):
        """Add the elements of every iterable in ``others``."""
        self._ps_storage()
        self._ps_add_all([key for other in others for key in other])

    def __iand__(self, other):
        self._ps_storage()
        if not isinstance(other, abc.Set):
            return NotImplemented
        for key in [k for k in self if k not in other]:
            self.discard(key)
        return self

    def __isub__(self, other):
        self._ps_storage()
        if not isinstance(other, abc.Set):
            return NotImplemented
        if other is self:
            self.clear()
            return self
        for key in list(other):
            self.discard(key)
        return self

    def __ixor__(self, other):
        self._ps_storage()
        if not isinstance(other, abc.Set):
            return NotImplemented
        if other is self:
            self.clear()
            return self
        other = list(dict.fromkeys(other))
        for key in other:
            if key not in self:
                type(self)._ps_key.store(key)
        for key in other:
            if key in self:
                self.discard(key)
            else:
                self.add(key)
        return self

    def __eq__(self, other):
        if not isinstance(other, abc.Set):
            return NotImplemented
        return len(self) == len(other) and self.__le__(other)

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def copy(self):
        """A plain ``set`` with the same elements."""
        return set(self)

    # -- set's named methods: new plain sets, or changes in place --
    def union(self, *others):
        """A plain ``set`` of the elements of this set and of every iterable in ``others`` (``set.union``).

        >>> from permastruct import Storage, Set
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(Set("Tags")[self.schema.String])
        >>> p = S(None)
        >>> p.schema.Tags(["spy"]).union(["boss"], ("spy",)) == {"boss", "spy"}
        True
        """
        return set(self).union(*others)

    def intersection(self, *others):
        """A plain ``set`` of the elements also in every iterable of ``others`` (``set.intersection``).

        >>> from permastruct import Storage, Set
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(Set("Tags")[self.schema.String])
        >>> p = S(None)
        >>> p.schema.Tags(["spy", "boss"]).intersection(["boss", "cook"])
        {'boss'}
        """
        return set(self).intersection(*others)

    def difference(self, *others):
        """A plain ``set`` of the elements in none of the iterables ``others`` (``set.difference``).

        >>> from permastruct import Storage, Set
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(Set("Tags")[self.schema.String])
        >>> p = S(None)
        >>> p.schema.Tags(["spy", "boss"]).difference(["boss"]) == {"spy"}
        True
        """
        return set(self).difference(*others)

    def symmetric_difference(self, other):
        """A plain ``set`` of the elements in exactly one of this set and ``other`` (``set.symmetric_difference``).

        >>> from permastruct import Storage, Set
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(Set("Tags")[self.schema.String])
        >>> p = S(None)
        >>> p.schema.Tags(["spy", "boss"]).symmetric_difference(["boss", "cook"]) == {"cook", "spy"}
        True
        """
        return set(self).symmetric_difference(other)

    def issubset(self, other):
        """Whether every element is in iterable ``other`` (``set.issubset``).

        >>> from permastruct import Storage, Set
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(Set("Tags")[self.schema.String])
        >>> p = S(None)
        >>> p.schema.Tags(["spy"]).issubset(["spy", "boss"]), p.schema.Tags(["spy"]).issuperset([])
        (True, True)
        """
        return set(self).issubset(other)

    def issuperset(self, other):
        """Whether every element of iterable ``other`` is in this set (``set.issuperset``; see ``issubset``)."""
        return set(self).issuperset(other)

    def intersection_update(self, *others):
        """Keep only the elements also in every iterable of ``others``, in place.

        >>> from permastruct import Storage, Set
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(Set("Tags")[self.schema.String])
        >>> p = S(None)
        >>> tags = p.schema.Tags(["spy", "boss"]); tags.intersection_update(["boss"]); tags == {"boss"}
        True
        """
        self._ps_storage()
        keep = set(self).intersection(*others)  # every iterable is read before the first change
        for key in [k for k in self if k not in keep]:
            self.discard(key)

    def difference_update(self, *others):
        """Remove the elements of every iterable in ``others``, in place.

        >>> from permastruct import Storage, Set
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(Set("Tags")[self.schema.String])
        >>> p = S(None)
        >>> tags = p.schema.Tags(["spy", "boss"]); tags.difference_update(["boss"], ["cook"]); tags == {"spy"}
        True
        """
        self._ps_storage()
        drop = set().union(*others)  # every iterable is read before the first change
        for key in [k for k in self if k in drop]:
            self.discard(key)

    def symmetric_difference_update(self, other):
        """Keep the elements in exactly one of this set and iterable ``other``, in place (``tags ^= set(other)``).

        Nothing changes if an element of ``other`` cannot be stored.

        >>> from permastruct import Storage, Set
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(Set("Tags")[self.schema.String])
        >>> p = S(None)
        >>> tags = p.schema.Tags(["spy", "boss"]); tags.symmetric_difference_update(["boss", "cook"])
        >>> tags == {"spy", "cook"}
        True
        """
        self._ps_storage()
        self.__ixor__(set(other))


def _set_operator(name):
    """The operator ``name`` of ``abc.Set``, refusing non-sets like ``set`` does."""
    mixin = getattr(abc.Set, name)

    def operator(self, other):
        if not isinstance(other, abc.Set):
            return NotImplemented
        return mixin(self, other)
    operator.__name__ = name
    return operator


for _name in ("__le__", "__lt__", "__ge__", "__gt__", "__and__", "__rand__", "__or__", "__ror__",
              "__sub__", "__rsub__", "__xor__", "__rxor__"):
    setattr(PersistentSet, _name, _set_operator(_name))
PersistentSet.isdisjoint = abc.Set.isdisjoint


# -- SortedDict: a B+tree of one-page nodes ----------------------------------------------------
def tree_order(page_size):
    """The most keys a B+tree node of a store with ``page_size`` holds."""
    return (page_size - F.RUN_OBJECT - F.NODE.size - 40) // 24


class _NodeView:
    """Cached views of one B+tree NODE: header fields, keys, values or children and counts."""

    __slots__ = ("offset", "leaf", "head16", "head64", "keys", "values", "children", "counts", "raw", "tree")

    def __init__(self, heap, offset, order, key_code, value_code, tree=None):
        heap.check_offset(offset, node_size(heap))
        raw = heap.mapping.view(offset, node_size(heap))
        self.tree = tree  # the proxy class of the SortedDict type owning the node
        self.offset = offset
        self.raw = raw
        self.head16 = raw[:F.NODE.size].cast("H")
        self.head64 = raw[:F.NODE.size].cast("Q")
        self.leaf = bool(raw[12])
        keys_at = F.NODE.size
        values_at = keys_at + F.CELL * (order + 1)
        self.keys = raw[keys_at:values_at].cast(key_code)
        if self.leaf:
            self.values = raw[values_at:values_at + F.CELL * (order + 1)].cast(value_code)
            self.children = self.counts = None
        else:
            self.values = None
            counts_at = values_at + F.CELL * (order + 2)
            self.children = raw[values_at:counts_at].cast("Q")
            self.counts = raw[counts_at:counts_at + F.CELL * (order + 2)].cast("Q")

    @property
    def n(self):
        return self.head16[7]

    @n.setter
    def n(self, value):
        self.head16[7] = value


def node_size(heap):
    return heap.pf.page_size - F.RUN_OBJECT


class _StringKeys:
    """The keys of a node as bytes, for bisect (string keys are references)."""

    __slots__ = ("keys", "data")

    def __init__(self, keys, data):
        self.keys, self.data = keys, data

    def __getitem__(self, index):
        return self.data(self.keys[index])


class PersistentSortedDict(_MappingMixin, _Collection):
    """A persistent dict ordered by key: a B+tree of pages with O(log n) operations.

    >>> from permastruct import Storage, SortedDict
    >>> class S(Storage):
    ...     def populateSchema(self):
    ...         self.define(SortedDict("ByAge")[self.schema.Int, self.schema.String])
    >>> p = S(None)
    >>> by_age = p.schema.ByAge({37: "Bond", 60: "M", 25: "Q"})
    >>> list(by_age.irange(30, 70)), str(by_age[25]), by_age.peekitem(-1)[0], by_age.bisect_left(40)
    ([37, 60], 'Q', 60, 2)
    """

    __slots__ = ()
    _ps_kind = "sorteddict"
    _ps_body_type = F.T_NODE

    @classmethod
    def _ps_prepare(cls, heap):
        key_type = cls._ps_params[0]
        cls._ps_key = _Key(heap, key_type, cls.__name__, "key")
        cls._ps_value = _Cell(heap, cls._ps_params[1], cls.__name__, "value")
        if cls._ps_value.is_ref:
            cls._ps_value_check = staticmethod(_value_checker(heap, cls._ps_params[1], f"{cls.__name__} value"))
        cls._ps_order = tree_order(heap.pf.page_size)
        cls._ps_string_data = heap.string_data if cls._ps_key.is_ref else None
        if cls._ps_order < 4:
            raise SchemaError(f"{cls.__name__}: pages of {heap.pf.page_size} bytes are too small "
                              "for a B+tree node")

    @staticmethod
    def _ps_accepts(value):
        return isinstance(value, abc.Mapping)

    # -- nodes --
    def _ps_node(self, offset):
        cls = type(self)
        heap = cls._heap
        node = heap.views.get(offset)
        if type(node) is not _NodeView or node.tree is not cls:
            # children and leaf links are offsets read from the file: what is cached
            # there may be another collection's array, table or node
            if node is not None:
                raise self._ps_bad(f"its tree links to {offset:#x}, which is not one of its nodes")
            self._ps_check_internal(offset, F.T_NODE, node_size(heap))
            try:
                node = _NodeView(heap, offset, cls._ps_order, cls._ps_key.code, cls._ps_value.code, cls)
            except IndexError:
                raise self._ps_bad(f"its node at {offset:#x} crosses the end of a mapped segment") from None
            if node.n > cls._ps_order + 1:
                raise self._ps_bad(f"its node at {offset:#x} has {node.n} keys")
            heap.views[offset] = node
        return node

    def _ps_new_node(self, heap, leaf):
        offset = self._ps_internal(heap, F.T_NODE, node_size(heap))
        heap.mapping.view(offset + 12, 1)[0] = 1 if leaf else 0
        return self._ps_node(offset)

    def _ps_searchable(self, node):
        """The keys of ``node`` as a sequence bisect can search."""
        if type(self)._ps_key.is_ref:
            return _StringKeys(node.keys, type(self)._heap.string_data)
        return node.keys

    def _ps_descend(self, probe):
        """``(path, leaf)``: the inner nodes with the child index taken, and the leaf for ``probe``."""
        cls = type(self)
        views = cls._heap.views
        string_data = cls._ps_string_data
        path = []
        offset = self._ps_body
        for _ in range(64):
            node = views.get(offset)
            if type(node) is not _NodeView or node.tree is not cls:
                node = self._ps_node(offset)
            if node.leaf:
                return path, node
            keys = node.keys if string_data is None else _StringKeys(node.keys, string_data)
            index = bisect.bisect_right(keys, probe, 0, node.head16[7])
            path.append((node, index))
            offset = node.children[index]
        raise self._ps_bad("its tree is deeper than 64 levels")

    def _ps_find(self, key):
        """``(path, leaf, index)`` of ``key``; raises _Missing."""
        if not self._ps_body:
            _unhashable(key)
            raise _Missing
        probe = type(self)._ps_key.lookup(key)[1]
        path, leaf = self._ps_descend(probe)
        string_data = type(self)._ps_string_data
        keys = leaf.keys if string_data is None else _StringKeys(leaf.keys, string_data)
        n = leaf.head16[7]
        index = bisect.bisect_left(keys, probe, 0, n)
        if index < n and keys[index] == probe:
            return path, leaf, index
        raise _Missing

    def _ps_decode(self, node, index):
        cls = type(self)
        key = node.keys[index]
        if cls._ps_key.decode is not None:
            key = cls._ps_key.decode(key)
        value = node.values[index]
        if cls._ps_value.decode is not None:
            value = cls._ps_value.decode(value)
        return key, value

    # -- reading --
    def __getitem__(self, key):
        try:
            path, leaf, index = self._ps_find(key)
        except _Missing:
            raise KeyError(key) from None
        value = leaf.values[index]
        decode = type(self)._ps_value.decode
        return value if decode is None else decode(value)

    def __contains__(self, key):
        try:
            self._ps_find(key)
        except _Missing:
            return False
        return True

    def _ps_walk(self, node, index, reverse=False):
        """``(node, index)`` pairs from position ``index`` of leaf ``node`` onwards, watching changes.

        A leaf link that leads to an inner node, or more steps than the
        elements and leaves there can be (a cycle of leaves), is damage.
        """
        version = self._ps_aux
        steps = 2 * self._ps_count + 2  # elements plus leaves: every leaf but an empty root holds a key
        while node is not None:
            if self._ps_aux != version:
                raise RuntimeError(f"{type(self).__name__} changed size during iteration")
            steps -= 1
            if steps < 0:
                raise self._ps_bad(f"its leaves link in a cycle (through {node.offset:#x})")
            if reverse:
                if index < 0:
                    nxt = node.head64[3]
                    node = self._ps_leaf(nxt) if nxt else None
                    index = node.n - 1 if node is not None else 0
                    continue
                yield node, index
                index -= 1
            else:
                if index >= node.n:
                    nxt = node.head64[2]
                    node = self._ps_leaf(nxt) if nxt else None
                    index = 0
                    continue
                yield node, index
                index += 1

    def _ps_leaf(self, offset):
        """The node at ``offset``, which a leaf link names: it must be a leaf."""
        node = self._ps_node(offset)
        if not node.leaf:
            raise self._ps_bad(f"a leaf links to {offset:#x}, which is an inner node")
        return node

    def _ps_child(self, node, index, depth):
        """Child ``index`` of inner ``node`` at ``depth`` levels below the root (bounded: a cycle is damage)."""
        if depth >= 64:
            raise self._ps_bad("its tree is deeper than 64 levels")
        return self._ps_node(node.children[index])

    def _ps_edge_leaf(self, last):
        node = self._ps_node(self._ps_body)
        depth = 0
        while not node.leaf:
            depth += 1
            node = self._ps_child(node, node.n if last else 0, depth)
        return node

    def _ps_positions(self, reverse=False):
        if not self._ps_count:
            return iter(())
        leaf = self._ps_edge_leaf(reverse)
        return self._ps_walk(leaf, leaf.n - 1 if reverse else 0, reverse)

    def __iter__(self):
        decode = type(self)._ps_key.decode
        for node, index in self._ps_positions():
            key = node.keys[index]
            yield key if decode is None else decode(key)

    def __reversed__(self):
        decode = type(self)._ps_key.decode
        for node, index in self._ps_positions(reverse=True):
            key = node.keys[index]
            yield key if decode is None else decode(key)

    def _ps_items(self):
        for node, index in self._ps_positions():
            yield self._ps_decode(node, index)

    def _ps_iter_values(self):
        decode = type(self)._ps_value.decode
        for node, index in self._ps_positions():
            value = node.values[index]
            yield value if decode is None else decode(value)

    def _ps_position_of(self, probe, right):
        """The number of keys below ``probe`` (or not above it, if ``right``)."""
        if not self._ps_count:
            return 0
        node = self._ps_node(self._ps_body)
        position = depth = 0
        search = bisect.bisect_right if right else bisect.bisect_left
        while not node.leaf:
            index = bisect.bisect_right(self._ps_searchable(node), probe, 0, node.n)
            position += sum(node.counts[:index].tolist())
            depth += 1
            node = self._ps_child(node, index, depth)
        return position + search(self._ps_searchable(node), probe, 0, node.n)

    def bisect_left(self, key):
        """The index where ``key`` is or would be inserted, before equal keys."""
        return self._ps_position_of(type(self)._ps_key.bound(key), right=False)

    def bisect_right(self, key):
        """The index after the position of ``key``."""
        return self._ps_position_of(type(self)._ps_key.bound(key), right=True)

    bisect = bisect_right

    def index(self, key):
        """The position of ``key`` in key order; ``ValueError`` if it is absent."""
        if key not in self:
            raise ValueError(f"{key!r} is not in {type(self).__name__}")
        return self.bisect_left(key)

    def _ps_at(self, index):
        """``(leaf, position in leaf)`` of the element at sorted ``index`` (may be negative)."""
        count = self._ps_count
        try:
            index = index.__index__()
        except AttributeError:
            raise TypeError(f"{type(self).__name__} indices must be integers, not {type(index).__name__}") from None
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"{type(self).__name__} index out of range")
        node = self._ps_node(self._ps_body)
        depth = 0
        while not node.leaf:
            counts = node.counts[:node.n + 1].tolist()
            child = 0
            while index >= counts[child]:
                index -= counts[child]
                child += 1
                if child == len(counts):
                    raise self._ps_bad(f"the subtree counts of its node {node.offset:#x} do not add up")
            depth += 1
            node = self._ps_child(node, child, depth)
        if index >= node.n:
            raise self._ps_bad(f"the subtree counts above its leaf {node.offset:#x} do not add up")
        return node, index

    def peekitem(self, index=-1):
        """The ``(key, value)`` at sorted position ``index`` (``IndexError`` if out of range)."""
        node, position = self._ps_at(index)
        return self._ps_decode(node, position)

    def irange(self, minimum=None, maximum=None, inclusive=(True, True), reverse=False):
        """Iterate over the keys from ``minimum`` to ``maximum`` (None: unbounded), in order."""
        key_type = type(self)._ps_key
        low = None if minimum is None else key_type.bound(minimum)
        high = None if maximum is None else key_type.bound(maximum)
        return self._ps_irange(low, high, inclusive, reverse)

    def _ps_irange(self, low, high, inclusive, reverse):
        if not self._ps_count:
            return
        decode = type(self)._ps_key.decode
        start = 0 if low is None else self._ps_position_of(low, right=not inclusive[0])
        stop = self._ps_count if high is None else self._ps_position_of(high, right=inclusive[1])
        if start >= stop:
            return
        if reverse:
            node, index = self._ps_at(stop - 1)
        else:
            node, index = self._ps_at(start)
        remaining = stop - start
        for node, index in self._ps_walk(node, index, reverse):
            if remaining <= 0:
                return
            remaining -= 1
            key = node.keys[index]
            yield key if decode is None else decode(key)

    # -- changing --
    def __setitem__(self, key, value):
        heap = self._ps_storage()
        cls = type(self)
        key_type = cls._ps_key
        hash_, data = key_type.store(key)
        value_type = cls._ps_value
        cell = value_type.encode(value)
        try:
            self._ps_store(heap, key, data, cell)
        except (ValueError, IndexError, OverflowError) as exc:
            if isinstance(exc, PermastructError):
                raise
            raise self._ps_damage(exc) from exc

    def _ps_damage(self, exc):
        """The CorruptStorageError for ``exc``, met while changing the tree: counts or links that do
        not add up (a subtree count going below zero, a node index past its keys) come from the file."""
        return self._ps_bad(f"its tree does not add up ({type(exc).__name__}: {exc})")

    def _ps_store(self, heap, key, data, cell):
        cls = type(self)
        key_type, value_type = cls._ps_key, cls._ps_value
        if not self._ps_body:
            leaf = self._ps_new_node(heap, leaf=True)
            self._ps_body = leaf.offset
        path, leaf = self._ps_descend(data)
        keys = self._ps_searchable(leaf)
        n = leaf.n
        index = bisect.bisect_left(keys, data, 0, n)
        if index < n and keys[index] == data:
            old = leaf.values[index]
            leaf.values[index] = cell
            if value_type.is_ref:
                if cell:
                    heap.incref(cell)
                if old:
                    heap.decref(old)
            return
        key_cell = key_type.new_cell(key, data)
        leaf.keys[index + 1:n + 1] = leaf.keys[index:n]
        leaf.values[index + 1:n + 1] = leaf.values[index:n]
        leaf.keys[index], leaf.values[index] = key_cell, cell
        leaf.n = n + 1
        if value_type.is_ref and cell:
            heap.incref(cell)
        for node, child in path:
            node.counts[child] += 1
        self._ps_count += 1
        self._ps_aux += 1
        if leaf.n > cls._ps_order:
            self._ps_split(heap, path, leaf)

    def _ps_split(self, heap, path, node):
        """Split the overfull ``node`` and, as needed, its ancestors."""
        key_ref = type(self)._ps_key.is_ref
        while node.n > type(self)._ps_order:
            n = node.n
            half = n // 2
            right = self._ps_new_node(heap, node.leaf)
            if node.leaf:
                moved = n - half
                right.keys[:moved] = node.keys[half:n]
                right.values[:moved] = node.values[half:n]
                node.keys[half:n] = _zeros(node.keys, moved)
                node.values[half:n] = _zeros(node.values, moved)
                right.n, node.n = moved, half
                separator = right.keys[0]
                if key_ref:
                    heap.incref(separator)
                following = node.head64[2]
                right.head64[2], right.head64[3] = following, node.offset
                node.head64[2] = right.offset
                if following:
                    self._ps_node(following).head64[3] = right.offset
                left_count, right_count = half, moved
            else:
                # keys[half] moves up; the right node gets keys half+1.. and children half+1..
                separator = node.keys[half]
                moved = n - half - 1
                right.keys[:moved] = node.keys[half + 1:n]
                right.children[:moved + 1] = node.children[half + 1:n + 1]
                right.counts[:moved + 1] = node.counts[half + 1:n + 1]
                node.keys[half:n] = _zeros(node.keys, n - half)
                node.children[half + 1:n + 1] = _zeros(node.children, moved + 1)
                node.counts[half + 1:n + 1] = _zeros(node.counts, moved + 1)
                right.n, node.n = moved, half
                left_count = sum(node.counts[:half + 1].tolist())
                right_count = sum(right.counts[:moved + 1].tolist())
            if path:
                parent, child = path.pop()
                n = parent.n
                parent.keys[child + 1:n + 1] = parent.keys[child:n]
                parent.children[child + 2:n + 2] = parent.children[child + 1:n + 1]
                parent.counts[child + 2:n + 2] = parent.counts[child + 1:n + 1]
                parent.keys[child] = separator
                parent.children[child + 1] = right.offset
                parent.counts[child], parent.counts[child + 1] = left_count, right_count
                parent.n = n + 1
                node = parent
            else:
                root = self._ps_new_node(heap, leaf=False)
                root.keys[0] = separator
                root.children[0], root.children[1] = node.offset, right.offset
                root.counts[0], root.counts[1] = left_count, right_count
                root.n = 1
                self._ps_body = root.offset
                return

    def __delitem__(self, key):
        heap = self._ps_storage()
        try:
            path, leaf, index = self._ps_find(key)
        except _Missing:
            raise KeyError(key) from None
        self._ps_delete(heap, path, leaf, index)

    def _ps_delete(self, heap, path, leaf, index):
        try:
            self._ps_remove(heap, path, leaf, index)
        except (ValueError, IndexError, OverflowError) as exc:
            if isinstance(exc, PermastructError):
                raise
            raise self._ps_damage(exc) from exc

    def _ps_remove(self, heap, path, leaf, index):
        cls = type(self)
        n = leaf.n
        key_cell, value_cell = leaf.keys[index], leaf.values[index]
        leaf.keys[index:n - 1] = leaf.keys[index + 1:n]
        leaf.values[index:n - 1] = leaf.values[index + 1:n]
        leaf.keys[n - 1] = 0
        leaf.values[n - 1] = 0
        leaf.n = n - 1
        for node, child in path:
            node.counts[child] -= 1
        self._ps_count -= 1
        self._ps_aux += 1
        if cls._ps_key.is_ref:
            heap.decref(key_cell)
        if cls._ps_value.is_ref and value_cell:
            heap.decref(value_cell)
        self._ps_rebalance(heap, path, leaf)

    def _ps_rebalance(self, heap, path, node):
        """Restore the minimum fill of ``node`` and its ancestors after a removal."""
        cls = type(self)
        minimum = cls._ps_order // 2
        while True:
            if not path:  # the root
                if node.leaf and node.n == 0:
                    self._ps_body = 0
                    heap.drop_internal(node.offset)
                elif not node.leaf and node.n == 0:
                    self._ps_body = node.children[0]
                    node.children[0] = 0
                    node.counts[0] = 0
                    heap.drop_internal(node.offset)
                return
            if node.n >= minimum:
                return
            parent, child = path.pop()
            if child > 0:
                left = self._ps_sibling(parent, child - 1, node)
                if left.n > minimum:
                    self._ps_borrow_left(heap, parent, child, left, node)
                    return
            if child < parent.n:
                right = self._ps_sibling(parent, child + 1, node)
                if right.n > minimum:
                    self._ps_borrow_right(heap, parent, child, node, right)
                    return
            if child > 0:
                self._ps_merge(heap, parent, child - 1, self._ps_sibling(parent, child - 1, node), node)
            else:
                self._ps_merge(heap, parent, child, node, self._ps_sibling(parent, child + 1, node))
            node = parent

    def _ps_sibling(self, parent, index, node):
        """Child ``index`` of ``parent``, a sibling of ``node``: a leaf exactly when ``node`` is one."""
        sibling = self._ps_node(parent.children[index])
        if sibling.leaf != node.leaf or sibling is node:
            raise self._ps_bad(f"its node {parent.offset:#x} has leaves and inner nodes (or one node twice) "
                               "as children")
        return sibling

    def _ps_borrow_left(self, heap, parent, child, left, node):
        n, ln = node.n, left.n
        key_ref = type(self)._ps_key.is_ref
        node.keys[1:n + 1] = node.keys[0:n]
        if node.leaf:
            node.values[1:n + 1] = node.values[0:n]
            node.keys[0], node.values[0] = left.keys[ln - 1], left.values[ln - 1]
            left.keys[ln - 1] = left.values[ln - 1] = 0
            old = parent.keys[child - 1]
            parent.keys[child - 1] = node.keys[0]
            if key_ref:
                heap.incref(node.keys[0])
                heap.decref(old)
            moved = 1
        else:
            node.children[1:n + 2] = node.children[0:n + 1]
            node.counts[1:n + 2] = node.counts[0:n + 1]
            node.keys[0] = parent.keys[child - 1]
            node.children[0], node.counts[0] = left.children[ln], left.counts[ln]
            parent.keys[child - 1] = left.keys[ln - 1]
            moved = left.counts[ln]
            left.keys[ln - 1] = 0
            left.children[ln] = left.counts[ln] = 0
        left.n, node.n = ln - 1, n + 1
        parent.counts[child - 1] -= moved
        parent.counts[child] += moved

    def _ps_borrow_right(self, heap, parent, child, node, right):
        n, rn = node.n, right.n
        key_ref = type(self)._ps_key.is_ref
        if node.leaf:
            node.keys[n], node.values[n] = right.keys[0], right.values[0]
            right.keys[0:rn - 1] = right.keys[1:rn]
            right.values[0:rn - 1] = right.values[1:rn]
            right.keys[rn - 1] = right.values[rn - 1] = 0
            old = parent.keys[child]
            parent.keys[child] = right.keys[0]
            if key_ref:
                heap.incref(right.keys[0])
                heap.decref(old)
            moved = 1
        else:
            node.keys[n] = parent.keys[child]
            node.children[n + 1], node.counts[n + 1] = right.children[0], right.counts[0]
            parent.keys[child] = right.keys[0]
            moved = right.counts[0]
            right.keys[0:rn - 1] = right.keys[1:rn]
            right.children[0:rn] = right.children[1:rn + 1]
            right.counts[0:rn] = right.counts[1:rn + 1]
            right.keys[rn - 1] = 0
            right.children[rn] = right.counts[rn] = 0
        right.n, node.n = rn - 1, n + 1
        parent.counts[child + 1] -= moved
        parent.counts[child] += moved

    def _ps_merge(self, heap, parent, child, left, right):
        """Merge ``right`` (child ``child + 1`` of ``parent``) into ``left`` (child ``child``)."""
        ln, rn = left.n, right.n
        separator = parent.keys[child]
        if left.leaf:
            left.keys[ln:ln + rn] = right.keys[:rn]
            left.values[ln:ln + rn] = right.values[:rn]
            left.n = ln + rn
            following = right.head64[2]
            left.head64[2] = following
            if following:
                self._ps_node(following).head64[3] = left.offset
            if type(self)._ps_key.is_ref:
                heap.decref(separator)
        else:
            left.keys[ln] = separator
            left.keys[ln + 1:ln + 1 + rn] = right.keys[:rn]
            left.children[ln + 1:ln + 2 + rn] = right.children[:rn + 1]
            left.counts[ln + 1:ln + 2 + rn] = right.counts[:rn + 1]
            left.n = ln + 1 + rn
        n = parent.n
        parent.counts[child] += parent.counts[child + 1]
        parent.keys[child:n - 1] = parent.keys[child + 1:n]
        parent.children[child + 1:n] = parent.children[child + 2:n + 1]
        parent.counts[child + 1:n] = parent.counts[child + 2:n + 1]
        parent.keys[n - 1] = 0
        parent.children[n] = parent.counts[n] = 0
        parent.n = n - 1
        heap.drop_internal(right.offset)

    def popitem(self, index=-1):
        """Remove and return the ``(key, value)`` at sorted ``index`` (the largest by default)."""
        heap = self._ps_storage()
        if not self._ps_count:
            raise KeyError(f"popitem(): {type(self).__name__} is empty")
        leaf, position = self._ps_at(index)
        key, value = self._ps_decode(leaf, position)
        path, leaf, position = self._ps_find(key)
        self._ps_delete(heap, path, leaf, position)
        return key, value

    def pop(self, key, default=_MappingMixin._MARKER):
        """Remove ``key`` and return its value (or ``default``; ``KeyError`` without one)."""
        heap = self._ps_storage()
        try:
            path, leaf, index = self._ps_find(key)
        except _Missing:
            if default is _MappingMixin._MARKER:
                raise KeyError(key) from None
            return default
        value = self._ps_decode(leaf, index)[1]
        self._ps_delete(heap, path, leaf, index)
        return value

    def clear(self):
        """Remove every item (the nodes are freed at once, the elements' references dropped)."""
        heap = self._ps_storage()
        if not self._ps_body:
            return
        cls = type(self)
        stack = [self._ps_body]
        dropped = []
        key_ref, value_ref = cls._ps_key.is_ref, cls._ps_value.is_ref
        while stack:
            node = self._ps_node(stack.pop())
            n = node.n
            if key_ref:
                dropped.extend(node.keys[:n].tolist())
            if node.leaf:
                if value_ref:
                    dropped.extend(c for c in node.values[:n].tolist() if c)
            else:
                stack.extend(node.children[:n + 1].tolist())
            heap.drop_internal(node.offset)
        self._ps_body = 0
        self._ps_count = 0
        self._ps_aux += 1
        for cell in dropped:
            heap.decref(cell)

    def copy(self):
        """A plain ``dict`` with the same items, in key order."""
        return dict(self._ps_items())

    # -- heap hooks --
    @classmethod
    def _ps_references(cls, heap, offset, type_id):
        if type_id != F.T_NODE:
            header = F.COLLECTION.unpack_from(heap.mapping.view(offset, F.COLLECTION.size))
            return [header[3]] if header[3] else []
        node = _NodeView(heap, offset, cls._ps_order, cls._ps_key.code, cls._ps_value.code)
        n = min(node.n, cls._ps_order + 1)
        refs = []
        if cls._ps_key.is_ref:
            refs.extend(node.keys[:n].tolist())
        if node.leaf:
            if cls._ps_value.is_ref:
                refs.extend(c for c in node.values[:n].tolist() if c)
        else:
            refs.extend(node.children[:n + 1].tolist())
        return [r for r in refs if r]

    @classmethod
    def _ps_internal_size(cls, heap, offset, type_id):
        return node_size(heap) if type_id == F.T_NODE else None

    def _ps_check(self, referenced, fail):
        me = T.Persistent.__repr__(self)  # the short form: a preview would read what is checked
        cls = type(self)
        heap = cls._heap
        count, body = self._ps_count, self._ps_body
        if not body:
            if count:
                fail(f"{me} has {count} items but no tree")
            return
        referenced(body, None, f"{me} root")
        key_type = cls._ps_key
        order, minimum = cls._ps_order, cls._ps_order // 2
        leaves = []

        def sort_key(cell):
            return heap.string_data(cell) if key_type.is_ref else cell

        def walk(offset, low, high, depth, is_root):
            """Check the subtree at ``offset``; return (element count, leaf depth)."""
            if depth > 64:
                fail(f"{me}: the tree is deeper than 64 levels (a cycle?)")
            node = self._ps_node(offset)
            n = node.n
            where = f"{me} node {offset:#x}"
            if n > order or (not is_root and n < minimum) or (is_root and not node.leaf and n < 1):
                fail(f"{where} holds {n} keys (order {order})")
            keys = [sort_key(c) for c in node.keys[:n].tolist()]
            if key_type.is_ref:
                for cell in node.keys[:n].tolist():
                    referenced(cell, key_type.type, where + " key")
            if any(a >= b for a, b in zip(keys, keys[1:])):
                fail(f"{where}: keys are not in increasing order")
            if keys and ((low is not None and keys[0] < low) or (high is not None and keys[-1] >= high)):
                fail(f"{where}: keys outside the range its parent gives")
            if any(node.keys[n:order + 1].tolist()):
                fail(f"{where}: key cells after the last key are not empty")
            if node.leaf:
                values = node.values[:n].tolist()
                if cls._ps_value.is_ref:
                    for cell in values:
                        if cell:
                            referenced(cell, cls._ps_value.type, where + " value")
                leaves.append(offset)
                return n, depth
            total, leaf_depth = 0, None
            counts = node.counts[:n + 1].tolist()
            for index, child in enumerate(node.children[:n + 1].tolist()):
                referenced(child, None, where + f" child {index}")
                sub, sub_depth = walk(child, keys[index - 1] if index else low,
                                      keys[index] if index < n else high, depth + 1, False)
                if sub != counts[index]:
                    fail(f"{where}: child {index} holds {sub} items, the node says {counts[index]}")
                if leaf_depth is not None and sub_depth != leaf_depth:
                    fail(f"{where}: the tree is not balanced")
                leaf_depth = sub_depth
                total += sub
            return total, leaf_depth

        total, _ = walk(body, None, None, 0, True)
        if total != count:
            fail(f"{me} counts {count} items but its tree holds {total}")
        previous = 0
        for offset in leaves:
            node = self._ps_node(offset)
            if node.head64[3] != previous:
                fail(f"{me}: leaf {offset:#x} links back to {node.head64[3]:#x}, not {previous:#x}")
            if previous and self._ps_node(previous).head64[2] != offset:
                fail(f"{me}: leaf {previous:#x} does not link to {offset:#x}")
            previous = offset
        if self._ps_node(previous).head64[2]:
            fail(f"{me}: the last leaf links onwards")


def _zeros(view, count):
    return memoryview(array(view.format, bytes(F.CELL * count)))


BASES = {"list": PersistentList, "dict": PersistentDict, "set": PersistentSet,
         "sorteddict": PersistentSortedDict}
KINDS = tuple(BASES)

abc.MutableSequence.register(PersistentList)
abc.MutableMapping.register(PersistentDict)
abc.MutableSet.register(PersistentSet)
abc.MutableMapping.register(PersistentSortedDict)


def make_class(storage, kind, name, params):
    """The proxy class of collection type ``name`` of ``kind`` with element types ``params``."""
    base = BASES[kind]
    cls = T.PersistentMeta(name, (base,), {"__slots__": (), "_storage": storage, "_heap": storage._heap,
                                           "_ps_params": tuple(params), "__module__": "permastruct.schema"})
    cls._ps_type_id = 0
    cls._ps_prepare(storage._heap)
    return cls


# Every method that changes a collection is one change (see _types.change): done here, once.
_CHANGES = {
    PersistentList: ("__setitem__", "__delitem__", "insert", "append", "extend", "extend_records", "__iadd__",
                     "__imul__",
                     "pop", "remove", "clear", "reverse", "sort"),
    _HashCollection: ("clear",),
    _MappingMixin: ("setdefault", "pop", "update", "__ior__"),
    PersistentDict: ("__setitem__", "__delitem__", "popitem", "pop"),
    PersistentSet: ("add", "discard", "remove", "pop", "__ior__", "update", "__iand__", "__isub__",
                    "__ixor__", "intersection_update", "difference_update", "symmetric_difference_update"),
    PersistentSortedDict: ("__setitem__", "__delitem__", "popitem", "pop", "clear"),
}
for _cls, _names in _CHANGES.items():
    for _name in _names:
        setattr(_cls, _name, T.change(_cls.__dict__[_name]))
del _cls, _names, _name
