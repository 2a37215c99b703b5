"""``List``: a persistent list whose elements are a contiguous array of 8-byte cells.

Theory of operation
===================

The COLLECTION header holds ``count`` (elements), ``body`` (the ``ARRAY``)
and ``aux`` (the array's capacity, in cells).  The array is one internal
object: its header, then ``capacity`` cells (:mod:`permastruct._cells`),
elements ``0 .. count - 1`` first.  The proxy reads and writes the cells
through one ``memoryview`` cast to the cell's struct code (``'q'``, ``'Q'`` or
``'d'``), cached per array in ``heap.views``, so ``lst[i]`` is an index into
a typed memoryview (plus a proxy lookup for by-reference elements).

Invariants:

- ``count <= capacity``; ``capacity == 0`` exactly when ``body == 0``;
- every cell at or past ``count`` is zero (a slot handed out later starts
  clean, and ``check()`` can tell a stale reference from a live one);
- each non-zero by-reference cell holds one reference on its object.

Growth moves the cells into a new array of ``max(needed, 8, 1.5 * capacity)``
cells (amortised O(1) ``append``); a list that falls below a quarter of a
capacity above 16 moves to an array of twice its count.
"""

import collections.abc as abc
import contextlib
import ctypes
import itertools
import operator
import weakref
from array import array

from . import _format as F
from . import _types as T
from ._cells import Cell
from ._collection import PREVIEW_ITEMS, Collection, preview_value
from .structure import make_records, record_columns

_NO_CELLS = ctypes.create_string_buffer(8)  # what an empty list's buffer points at (never read)
_CHUNK = 1024  # the most elements iteration copies out of a List of numbers at once


def _slice_length(start, stop, step):
    return len(range(start, stop, step))


# -- List ----------------------------------------------------------------------------
class PersistentList(Collection):
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
        cls._ps_cell = Cell(heap, cls._ps_params[0], cls.__name__, "element")
        cls._ps_exports = {}  # array offset -> WeakSet of the MemoryExporters of its cells
        if cls._ps_cell.is_ref:
            cls.append = _fast_append(cls, heap)

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
            type(self)._ps_exports.pop(old, None)
            heap.drop_internal(old)

    def _ps_reserve(self, heap, needed):
        capacity = self._ps_aux
        if needed > capacity:
            if self._ps_exported():
                raise BufferError(f"this {type(self).__name__} has {capacity} cells and its buffer is exported: "
                                  f"it cannot grow to {needed} while a memoryview or array of it exists; "
                                  "release them first")
            self._ps_resize(heap, max(needed, 8, capacity + (capacity >> 1)))
        return self._ps_cells()

    def _ps_exported(self):
        """Whether a buffer of the current array is exported (its cells must not move)."""
        return bool(type(self)._ps_exports.get(self._ps_body))

    def _ps_maybe_shrink(self, heap):
        if self._ps_exported():  # an exported array stays where it is, larger than needed
            return
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
        return map(preview_value, self._ps_values(0, PREVIEW_ITEMS))

    # -- reading --
    def __getitem__(self, index):
        """``lst[i]`` (a value) or ``lst[i:j:k]`` (a plain ``list``).

        Runtime: O(1) for an index: one typed memoryview read (and an identity-map lookup for by-
        reference elements); O(k) for a slice of k elements.
        """
        if type(index) is int:  # the common case, written out (the cells cached: see _ps_cells)
            count = self._ps_count
            if index < 0:
                index += count
            if not 0 <= index < count:
                raise IndexError("list index out of range")
            cls = type(self)
            cell = (cls._heap.views.get(self._ps_body) or self._ps_cells())[index]
            decode = cls._ps_cell.decode
            return cell if decode is None else decode(cell)
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
        """The elements in order.

        Runtime: O(1) per element.

        A List is read a chunk at a time: 16 elements, then 64, 256 and
        1,024 at most, each copied out in one C-level step (and, for objects
        and strings, their proxies made at once, which keep them alive) and
        handed out by ``itertools.chain``, so a loop over a List of numbers
        costs about what a loop over a ``list`` does.  The length is read
        again before each chunk: elements appended meanwhile are seen.  A
        change made meanwhile to an element of the current chunk not yet
        reached, or a removal, is seen from the next chunk on.
        """
        return itertools.chain.from_iterable(self._ps_chunks())

    def _ps_chunks(self):
        """Lists of the values of consecutive elements (see ``__iter__``)."""
        decode = type(self)._ps_cell.decode  # None, bool, or the heap's proxy()
        index, size = 0, 16
        while True:
            count = self._ps_count
            if index >= count:
                return
            stop = min(count, index + size)
            chunk = self._ps_cells()[index:stop].tolist()
            yield chunk if decode is None else list(map(decode, chunk))
            index = stop
            if size < _CHUNK:
                size *= 4

    def __reversed__(self):
        """The elements from the last to the first.

        Runtime: O(1) per element.  The List is read a chunk at a time, as by ``iter``.
        """
        return itertools.chain.from_iterable(self._ps_chunks_reversed())

    def _ps_chunks_reversed(self):
        decode = type(self)._ps_cell.decode
        stop, size = self._ps_count, 16
        while stop > 0:
            stop = min(stop, self._ps_count)
            start = max(0, stop - size)
            if start >= stop:
                return
            chunk = self._ps_cells()[start:stop].tolist()
            chunk.reverse()
            yield chunk if decode is None else list(map(decode, chunk))
            stop = start
            if size < _CHUNK:
                size *= 4

    def __contains__(self, value):
        """``value in lst``.

        Runtime: O(n): the elements are read out once, then compared.
        """
        return value in self._ps_values()

    def index(self, value, start=0, stop=None):
        """The first index of ``value`` (``ValueError`` if absent), like ``list.index``.

        Runtime: O(n).
        """
        values = self._ps_values()
        try:
            return values.index(value, start, len(values) if stop is None else stop)
        except ValueError:
            raise ValueError(f"{value!r} is not in list") from None

    def count(self, value):
        """The number of elements equal to ``value``.

        Runtime: O(n).
        """
        return self._ps_values().count(value)

    def __eq__(self, other):
        """``lst == other``: equal elements in the same order (``other`` a list or a List).

        Runtime: O(n).
        """
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

        Runtime: O(n).

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

        Runtime: O(n + m).

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

        Runtime: O(n * count).

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
        """``lst[i] = value`` or ``lst[i:j:k] = values``; a wrong value changes nothing.

        Runtime: O(1) for an index; O(n + m) for a slice (the cells are rewritten in one pass).
        """
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
        if cell_type.is_ref and cell:
            heap.incref(cell)  # (first: it refuses an object with too many references)
        cells[index] = cell
        if cell_type.is_ref and old:
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
        refs = type(self)._ps_cell.is_ref
        if refs:
            heap.incref_all(added)  # (all or none: first, before anything is written)
        try:
            self._ps_write_all(heap, cells)
        except Exception:  # (room refused: a full disk, an exported buffer) nothing written
            if refs:
                for cell in added:
                    if cell:
                        heap.decref(cell)
            raise
        if type(self)._ps_cell.is_ref:
            for cell in removed:
                if cell:
                    heap.decref(cell)

    def __delitem__(self, index):
        """``del lst[i]`` or ``del lst[i:j:k]``.

        Runtime: O(n - i): the cells after ``i`` move down with one slice assignment; O(n) for a
        slice.
        """
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
        """Insert ``value`` before ``index`` (clamped like ``list.insert``).

        Runtime: O(n - index): the cells after it move up with one slice assignment.
        """
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
        if cell and cell_type.is_ref:
            heap.incref(cell)  # (first: it refuses an object with too many references)
        cells[index + 1:count + 1] = cells[index:count]
        cells[index] = cell
        self._ps_count = count + 1

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
        if cell and cell_type.is_ref:
            heap.incref(cell)  # (first: it refuses an object with too many references)
        cells[count] = cell
        self._ps_count = count + 1

    def extend(self, values):
        """Append every element of ``values``; nothing is added if one of them has a wrong type.

        Runtime: O(m) for ``m`` new elements: checked and encoded first, then written with one slice
        assignment.
        """
        heap = self._ps_storage()
        if isinstance(values, PersistentList):
            values = values._ps_values()
        cell = type(self)._ps_cell
        if cell.raw:  # Int, Float, ...: array() checks and converts every value in C, as encode would
            if type(values) not in (list, tuple):
                values = [value for value in values]  # (list() would trust a __length_hint__)
            try:
                packed = array(cell.code, values)
            except (TypeError, OverflowError, ValueError):
                pass  # the loop below raises the error, with the names a single append gives
            else:
                return self._ps_append_packed(heap, packed)
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

        Runtime: O(k) for k records, with C-level conversions per column.

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

    def _ps_append_packed(self, heap, packed):
        """Append the cells of ``packed`` (an array of the cell's code; by-value elements only)."""
        size = len(packed)
        if size:
            count = self._ps_count
            cells = self._ps_reserve(heap, count + size)
            cells[count:count + size] = memoryview(packed)
            self._ps_count = count + size

    def _ps_append_cells(self, heap, new):
        """Append encoded cells ``new`` (by-reference ones gain a reference each)."""
        if not new:
            return
        count = self._ps_count
        packed = memoryview(array(type(self)._ps_cell.code, new))
        cells = self._ps_reserve(heap, count + len(new))
        if type(self)._ps_cell.is_ref:
            heap.incref_all(new)  # (all or none: first, before a cell is written)
        cells[count:count + len(new)] = packed
        self._ps_count = count + len(new)

    def __iadd__(self, values):
        """``lst += values``: ``lst.extend(values)``, in place (nothing is added if one has a wrong type).

        Runtime: as ``extend``.

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
        """Remove and return the element at ``index`` (the last by default).

        Runtime: O(1) for the last element, O(n - index) otherwise.
        """
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
        """Remove the first element equal to ``value`` (``ValueError`` if absent).

        Runtime: O(n).
        """
        heap = self._ps_storage()
        try:
            index = self._ps_values().index(value)
        except ValueError:
            raise ValueError("list.remove(x): x not in list") from None
        self._ps_remove_at(heap, index)

    def clear(self):
        """Remove every element.

        Runtime: O(n) for by-reference elements (each loses a reference), O(1) otherwise; the array
        is freed.
        """
        heap = self._ps_storage()
        if not self._ps_count:
            return
        removed = self._ps_cells()[:self._ps_count].tolist()
        self._ps_replace(heap, [], (), removed)

    def reverse(self):
        """Reverse the elements in place.

        Runtime: O(n), one pass over the cells.
        """
        self._ps_storage()
        count = self._ps_count
        if count > 1:
            cells = self._ps_cells()
            cells[:count] = memoryview(array(type(self)._ps_cell.code, reversed(cells[:count].tolist())))

    def sort(self, *, key=None, reverse=False):
        """Sort in place, like ``list.sort`` (stable; unchanged if a comparison fails).

        Runtime: O(n log n) comparisons of the Python values; the cells are written back in one
        slice assignment.

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

    # -- the buffer protocol --
    def __buffer__(self, flags=0):
        """The zero-copy memoryview behind ``memoryview(lst)`` and ``numpy.asarray(lst)`` (PEP 688).

        A List of numbers or Bool exports its cells: format ``'q'`` (signed
        integers and Bool, as int64), ``'Q'`` (``UInt64`` and the other
        unsigned types, as uint64) or ``'d'`` (floats, as double), shape
        ``(len(lst),)``.  It is writable in a writable storage for ``Int``,
        ``Int64``, ``UInt64``, ``Float`` and ``Float64`` (every 8 bytes are a
        valid value there; a write is part of the current transaction), and
        read-only for the narrower types, whose range a write could break.
        While a view exists the array cannot move: an operation that would
        grow the list raises ``BufferError`` (as ``bytearray`` does), and a
        shrinking one keeps the array.  A view that outlives ``close()``
        keeps its memory mapped and reaches no file.

        Runtime: O(1); nothing is copied.

        >>> from permastruct import Storage, List
        >>> class S(Storage):
        ...     def populateSchema(self):
        ...         self.define(List("Ints")[self.schema.Int])
        >>> p = S(None)
        >>> numbers = p.schema.Ints([1, 2, 3])
        >>> with memoryview(numbers) as view:
        ...     view[0] = 10
        ...     view.format, view.tolist()
        ('q', [10, 2, 3])
        >>> numbers[0]
        10
        """
        cls = type(self)
        cell = cls._ps_cell
        if cell.is_ref:
            raise TypeError(f"a {cls.__name__} holds references: only Lists of numbers and Bool export "
                            "their cells through the buffer protocol")
        heap = cls._heap
        heap.storage._check_open()
        count, body = self._ps_count, self._ps_body
        readonly = heap.readonly or not cell.raw
        if not count:
            exporter = T.MemoryExporter(ctypes.addressof(_NO_CELLS), 0, 8, cell.code, (0,), readonly, keep=self)
        else:
            self._ps_cells()  # the array checked (owner, capacity, bounds)
            segment, local = heap.locate(body, F.ARRAY.size + F.CELL * count)
            pin = heap.mapping.view(body + F.ARRAY.size, F.CELL * count)  # holds the segment's map
            exporter = T.MemoryExporter(segment.address + local + F.ARRAY.size, F.CELL * count, F.CELL,
                                        cell.code, (count,), readonly, keep=(self, pin))
            exports = cls._ps_exports.get(body)
            if exports is None:
                exports = cls._ps_exports[body] = weakref.WeakSet()
            exports.add(exporter)
        view = memoryview(exporter)
        heap.exported(view, body if count else 0, self._ps_oid)  # (a rollback taking it back quarantines it)
        return view

    def __release_buffer__(self, view):
        with contextlib.suppress(BufferError, ValueError):  # still exported elsewhere: its holders release it
            view.release()

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


abc.MutableSequence.register(PersistentList)


def _fast_append(cls, heap):
    """``append`` of List class ``cls`` whose elements are references: a live proxy of the element
    type into an array with room is one change written out here (the change guard of
    :func:`_types.change` inline, the reference, the cell, the count); anything else goes the
    general way (:meth:`PersistentList.append`), which checks, converts and grows."""
    element, general, ident, incref = cls._ps_cell.type, PersistentList.append, T._get_ident, heap.incref
    cut_short = T._CUT_SHORT

    def append(self, value):
        if type(value) is element and not heap._changing and not heap.readonly:
            count = self._ps_count
            if count < self._ps_aux:
                cells = heap.views.get(self._ps_body)
                if cells is not None:
                    heap._changing = ident()
                    try:
                        offset = value._ps_oid
                        incref(offset)
                        cells[count] = offset
                        self._ps_count = count + 1
                    except Exception as error:
                        if not isinstance(error, cut_short):
                            heap._changing = 0
                        raise
                    heap._changing = 0
                    return
        general(self, value)
    append.__doc__, append.__qualname__ = general.__doc__, f"{cls.__name__}.append"
    return append

# Every method that changes a list is one change (see _types.change): done once, here.
for _name in ("__setitem__", "__delitem__", "insert", "append", "extend", "extend_records", "__iadd__",
              "__imul__", "pop", "remove", "clear", "reverse", "sort"):
    setattr(PersistentList, _name, T.change(PersistentList.__dict__[_name]))
del _name
