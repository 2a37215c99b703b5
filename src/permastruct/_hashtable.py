"""The insertion-ordered hash table that ``Dict`` and ``Set`` share, and the two proxies.

Theory of operation
===================

The COLLECTION header holds ``count`` (live entries), ``body`` (the
``TABLE``) and ``aux`` (a modification number: every insert and delete
bumps it, and an iterator that sees it change raises ``RuntimeError`` as
``dict`` does).  The table is one internal object laid out like CPython's
compact dict (byte layout in :mod:`permastruct._format`):

- ``nslots`` (a power of two) uint32 *indices*: 0 empty, ``0xFFFFFFFF``
  deleted (a tombstone), else an entry number + 1;
- ``capacity`` (``nslots // 3``: see ``_table_shape``) *entries* in
  insertion order: hash, tag (0: not live), key[, value cell].

A lookup probes linearly from ``hash & (nslots - 1)`` until it meets the key
or an empty index.  The general path compares the stored hash first, the
key cell (or the string it names) only on a hash match; the lookups made
per class for short keys (``_fast_lookups``) compare the key bytes and the
tag (which says an inline key's length) and skip the hash.

Invariants (``Storage.check()`` verifies each one):

- ``used`` (entries appended so far, minus deleted ones at the end) is at
  most ``capacity``; entries at or past ``used``, and deleted entries, are
  all zero bytes;
- every live entry has exactly one index naming it, reachable from its hash
  position without crossing an empty index; no index names a dead entry;
- ``filled`` counts the indices that are not empty (live and tombstones) and
  stays at most ``capacity`` < ``nslots``, so every probe ends;
- the stored hash is the fixed hash of the key (:func:`_format.string_hash`,
  :func:`_format.number_hash`);
- the live entries number ``count``.

A full table (``used == capacity``, or a probe that would fill the last
allowed index) is rebuilt at twice the live count, dropping tombstones and
dead entries; a table that falls below an eighth of a capacity above 16 is
rebuilt at twice its count, and an empty one is freed.
"""

import collections.abc as abc
import io
import itertools
import operator
import struct
from array import array
from binascii import crc32 as _crc32  # zlib's function, a cheaper call (see _fast_lookups)

from . import _format as F
from . import _types as T
from ._cells import Cell, Key, Missing, unhashable, value_checker
from ._collection import Collection, MappingMixin
from .errors import CorruptStorageError


# -- Dict and Set: an insertion-ordered hash table ------------------------------------------
#: Entries a hash table can hold: its indices are uint32 (entry number + 1, and 0xFFFFFFFF for deleted).
_MAX_ENTRIES = (1 << 32) * 2 // 3 - 2


_GROW_FOURFOLD = 1 << 18  # slots: a full table smaller than this grows to four times its slots


def _room_to_grow(count, nslots):
    """The entries a full table of ``nslots`` slots holding ``count`` live ones is rebuilt for: a
    table of four times the slots while it is small (fewer rebuilds, as CPython's dict grows to
    ``used * 3``), of twice the slots from ``_GROW_FOURFOLD`` slots on (four times would leave a
    table of 10^7 keys three quarters empty: about 1 GB).

    (Small tables growing four times a step also leave ``pack`` less scattered space: with every
    table of twice the slots of the one before, tests/test_pack.py's 5,000-record store packed to
    116 pages of 182, not under half, and its 100,000-record one to 1,675 pages against 1,221.)
    """
    return count * 2 + 1 if nslots < _GROW_FOURFOLD else max(1, count * 2)


def _table_shape(wanted):
    """``(nslots, capacity)`` of a table for at least ``wanted`` entries: at most a third of the slots
    in use (up to 2/3 for the largest tables, whose indices would no longer be uint32).

    A third, not CPython's two thirds: an index costs 4 bytes a slot against
    24-32 bytes an entry, and each probe past the first is one more entry
    read (a cache miss in a large table).  Measured with 16-byte keys, the
    mean probes of a hit at 10^6 keys went from 1.69 (load 0.48) to 1.08
    (0.24), and a lookup from 1.0x to 0.8x lmdb's ``get``.
    """
    nslots = 16
    while nslots < wanted * 3 and nslots < 1 << 32:
        nslots *= 2
    return nslots, max(nslots // 3, min(wanted, nslots * 2 // 3))


_U64 = F.UINT64
_TAG_REF, _TAG_INLINE, _KEY_INLINE = F.TAG_REF, F.TAG_INLINE, F.KEY_INLINE
_PAD = tuple(bytes(_KEY_INLINE - n) for n in range(_KEY_INLINE + 1))  # zeros after an n-byte inline key
_BYTES_SEED = F.BYTES_SEED
_KEY_FIELD = struct.Struct(f"{_KEY_INLINE}s").pack  # a short key and the zeros after it


def _ref(key_bytes):
    """The string object's offset in the key bytes of an entry tagged ``TAG_REF``."""
    return _U64.unpack_from(key_bytes)[0]


class _TableView:
    """Cached views of one TABLE object: header, indices, entries (and the raw map for lookups)."""

    __slots__ = ("head", "indices", "entries", "mask", "capacity", "entries_at", "raw", "base", "fast")

    def __init__(self, heap, offset, esize):
        type_id, _, _, _, nslots, used, filled, capacity = F.TABLE.unpack_from(
            heap.mapping.view(offset, F.TABLE.size))
        if not nslots or nslots & (nslots - 1) or capacity >= nslots or used > capacity or filled > capacity:
            raise CorruptStorageError(f"{heap.name}: hash table at {offset:#x} has {nslots} slots, "
                                      f"{used} of {capacity} entries used")
        entries_at = F.TABLE.size + -(-4 * nslots // 8) * 8
        heap.check_offset(offset, entries_at + esize * capacity)
        self.head = heap.mapping.view(offset, F.TABLE.size).cast("Q")
        self.indices = heap.mapping.view(offset + F.TABLE.size, 4 * nslots).cast("I")
        self.entries = heap.mapping.view(offset + entries_at, esize * capacity)
        self.mask = nslots - 1
        self.capacity = capacity
        self.entries_at = entries_at
        segment, local = heap.locate(offset, entries_at + esize * capacity)
        self.raw = segment.map  # read with unpack_from(raw, base + ...): no memoryview slicing
        self.base = local + entries_at
        # what a lookup reads, in one attribute: entry number n (1-based, as an index names it)
        # starts at raw offset ``before + n * esize``
        self.fast = (self.indices, self.mask, self.raw, self.base - esize, capacity)


def _place(hashes, mask):
    """The indices (``array('I')`` of ``mask + 1`` slots) of a table whose entries 1, 2, ... have
    ``hashes``, by linear probing.

    The slots are an ``array``, not a list: a list's slot would point at an
    int object elsewhere in memory, a second cache miss per probe (the array
    measured twice as fast at 10^6 entries).  Placing each slot's first hash
    at C level (``map`` over ``list.__setitem__``) and probing only the rest
    measured slower still than the list.
    """
    indices = array("I", bytes(4 * (mask + 1)))
    for number, hash_ in enumerate(hashes, 1):
        slot = hash_ & mask
        while indices[slot]:
            slot = (slot + 1) & mask
        indices[slot] = number
    return indices


def _write_columns(cls, region, columns, lengths, hashes=None):
    """Write the entries of ``columns`` (keys that fit in an entry) into ``region``, a zeroed
    memoryview of ``len(columns)`` entries of class ``cls``, one column at a time: every hash with
    one strided assignment, then every tag, key and value cell (``lengths``: of the string keys,
    a list, or one int when every key has that length; None for number keys; ``hashes``: the
    hashes as uint32 already, if the caller has them).

    Measured at 10^6 entries: about 40 ns an entry, against 150 for one
    ``Struct.pack`` an entry and a join.
    """
    m = len(columns)
    per = cls._ps_esize // 8  # 8-byte words an entry
    words = region.cast("I")
    words[0::2 * per] = array("I", columns.hashes) if hashes is None else hashes
    if lengths is None:  # number keys: tag 1, the key's cell in the third and fourth words
        words[1::2 * per] = array("I", [1]) * m
        code = cls._ps_key.code
        region.cast(code)[1::per] = array(code, columns.keys)
    else:  # string keys: tag TAG_INLINE + length, the key and zeros in words 3 to 6
        if type(lengths) is int:
            words[1::2 * per] = array("I", [_TAG_INLINE + lengths]) * m
        else:
            words[1::2 * per] = array("I", map(operator.add, lengths, itertools.repeat(_TAG_INLINE)))
        # the keys, padded, one after another: BytesIO.writelines, not bytes.join, which first makes
        # a Py_buffer (80 bytes) for every item (measured at 10^6 keys: 9 against 50 ns a key)
        padded = io.BytesIO()
        padded.writelines(columns.keys if lengths == _KEY_INLINE else map(_KEY_FIELD, columns.keys))
        with padded.getbuffer() as joined, joined.cast("Q") as quads:
            field = region.cast("Q")
            field[1::per] = quads[0::2]
            field[2::per] = quads[1::2]
    if cls._ps_has_values:
        code = cls._ps_value.code
        cells = columns.cells
        region.cast(code)[per - 1::per] = cells if type(cells) is array and cells.typecode == code else array(code, cells)
    words.release()


class _Columns:
    """Checked items of a bulk update as columns (see ``PersistentDict._ps_prepare_pairs``): the keys
    (their own stored form: ``bytes`` or ``int``), their stored hashes (an ``array('I')``) and the
    value cells."""

    __slots__ = ("keys", "hashes", "cells")

    def __init__(self, keys, hashes, cells):
        self.keys, self.hashes, self.cells = keys, hashes, cells

    def __len__(self):
        return len(self.keys)


_first, _second = operator.itemgetter(0), operator.itemgetter(1)


class HashCollection(Collection):
    """The hash table shared by Dict and Set (insertion ordered, like ``dict``).

    A proxy keeps the view of its table (``_ps_tv``, set by ``_ps_table``) so
    that a lookup need not find it from the body's offset.  The view it keeps
    is its table's while the view's ``fast`` is not None: whatever frees,
    moves or takes back a table retires its view first (``heap.drop_view``,
    ``heap.forget_views``).
    """

    __slots__ = ("_ps_tv",)
    _ps_has_values = False
    _ps_body_type = F.T_TABLE

    @classmethod
    def _ps_prepare(cls, heap):
        key = cls._ps_key = Key(heap, cls._ps_params[0], cls.__name__, "key")
        strings = cls._ps_strings = key.is_ref
        layout = F.TABLE_STRING_ENTRY if strings else F.TABLE_NUMBER_ENTRY + key.code
        cls._ps_value_at = struct.calcsize(layout)  # where the value cell starts in an entry
        value_code = ""
        if cls._ps_has_values:
            cls._ps_value = Cell(heap, cls._ps_params[1], cls.__name__, "value")
            value_code = cls._ps_value.code
            cls._ps_value_cell = struct.Struct("<" + value_code)
            cls._ps_vdecode = cls._ps_value.decode
        cls._ps_entry = struct.Struct(layout + value_code)
        cls._ps_equals = heap.string_equals if strings else None
        cls._ps_esize = cls._ps_entry.size
        cls._ps_blank = bytes(cls._ps_esize)
        cls._ps_key_of = _key_reader(cls, heap, key)
        cls._ps_readers = _entry_readers(cls)
        # the lookup fast path of this class's key type, made once here (see _fast_lookups)
        made = _fast_lookups(cls) or {}
        for name in ("__contains__", "__getitem__", "get"):
            if name in made:
                setattr(cls, name, made[name])
            elif name in cls.__dict__:
                delattr(cls, name)
        if cls._ps_has_values:
            setitem = _fast_setitem(cls)
            if setitem is not None:
                cls.__setitem__ = setitem
            elif "__setitem__" in cls.__dict__:
                del cls.__setitem__

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
        """The view of this collection's table (it has one: its body is not 0), kept as ``_ps_tv``."""
        try:
            view = self._ps_tv
            if view.fast is not None:
                return view
        except AttributeError:  # (none kept yet)
            pass
        body = self._ps_body
        heap = type(self)._heap
        view = heap.tables.get(body)
        if view is None or view.fast is None:
            self._ps_check_internal(body, F.T_TABLE, F.TABLE.size)
            try:
                view = _TableView(heap, body, type(self)._ps_esize)
            except IndexError:
                raise self._ps_bad(f"its hash table at {body:#x} crosses the end of a mapped segment") from None
            heap.tables[body] = view
        self._ps_tv = view
        return view

    def _ps_probe(self, data):
        """``(tag, probe, equals)`` an entry holding key ``data`` has: its tag, and its key field equal
        to ``probe`` (``equals`` None), or naming a string object for which ``equals(offset, data)``."""
        cls = type(self)
        if not cls._ps_strings:
            return 1, data, None
        n = len(data)
        if n <= _KEY_INLINE:
            return _TAG_INLINE + n, data + _PAD[n], None
        return _TAG_REF, None, cls._ps_equals

    def _ps_find(self, table, hash_, data):
        """``(slot, entry, fields)`` of the key ``data`` with ``hash_``, or ``(free slot, -1, None)``."""
        cls = type(self)
        indices, mask, raw, base, capacity = table.indices, table.mask, table.raw, table.base, table.capacity
        unpack, esize = cls._ps_entry.unpack_from, cls._ps_esize
        tag, probe, equals = self._ps_probe(data)
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
                fields = unpack(raw, base + (index - 1) * esize)
                if fields[0] == hash_ and fields[1] == tag and (
                        fields[2] == probe if equals is None else equals(_ref(fields[2]), data)):
                    return slot, index - 1, fields
            slot = (slot + 1) & mask
        if free >= 0:
            return free, -1, None
        raise self._ps_bad("its hash table has no free slot")

    def _ps_lookup(self, key):
        """``(table, slot, entry, fields)`` of ``key``; raises Missing."""
        body = self._ps_body
        if not body:
            unhashable(key)
            raise Missing
        cls = type(self)
        hash_, data = cls._ps_key.lookup(key)
        table = self._ps_table()
        slot, entry, fields = self._ps_find(table, hash_, data)
        if entry < 0:
            raise Missing
        return table, slot, entry, fields

    def _ps_rebuild(self, heap, wanted):
        """Move the live entries to a new table with room for ``wanted`` entries (compacting)."""
        view, hashes = self._ps_move(heap, wanted)
        if hashes:
            view.indices[:] = _place(hashes, view.mask)
        return view

    def _ps_move(self, heap, wanted):
        """:meth:`_ps_rebuild` but for the indices: ``(view, hashes)``, the new table with the live
        entries copied, its indices still empty, and their hashes in entry order (the caller
        places them, alone or with the entries it adds)."""
        cls = type(self)
        nslots, capacity = _table_shape(max(wanted, self._ps_count))
        entries_at = F.TABLE.size + -(-4 * nslots // 8) * 8
        new = self._ps_internal(heap, F.T_TABLE, entries_at + cls._ps_esize * capacity)
        F.TABLE.pack_into(heap.mapping.view(new, F.TABLE.size), 0, F.T_TABLE, 1, cls._ps_type_id, 0,
                          nslots, 0, 0, capacity)
        view = _TableView(heap, new, cls._ps_esize)
        esize = cls._ps_esize
        old = self._ps_body
        hashes = []
        if old:
            table = self._ps_table()
            end = table.head[3] * esize
            source = table.entries
            words = source[:end].cast("I")  # an entry's first two uint32 are its hash and tag
            per = esize // 4
            hashes = words[::per].tolist()
            tags = words[1::per].tolist()
            words.release()
            if self._ps_count == len(hashes):  # no dead entries: one copy
                view.entries[:end] = source[:end]
            else:
                live = [entry for entry, tag in enumerate(tags) if tag]
                for number, entry in enumerate(live):
                    view.entries[number * esize:(number + 1) * esize] = source[entry * esize:(entry + 1) * esize]
                hashes = [hashes[entry] for entry in live]
        view.head[3] = view.head[4] = len(hashes)
        heap.tables[new] = view
        self._ps_body = new
        self._ps_tv = view
        if old:
            heap.drop_internal(old)
        return view, hashes

    def _ps_insert(self, heap, key, value_cell=None, stored=None):
        """Add ``key``; ``stored`` is ``_ps_key.store(key)`` if the caller has it already.

        Returns ``(table, -1)`` for a new key, ``(table, entry)`` for one already present.
        A by-reference ``value_cell`` is stored with the reference the caller took
        before the call (first, so that an object with too many references is
        refused before anything changes).
        A string key of at most ``KEY_INLINE`` bytes goes into the entry itself;
        a longer one is a string object (a new one, or the proxy's, gaining a reference).
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
            table = self._ps_rebuild(heap, _room_to_grow(self._ps_count, table.mask + 1))
            slot, _, _ = self._ps_find(table, hash_, data)
            used = table.head[3]
        if not cls._ps_strings:
            tag, cell = 1, data
        elif len(data) <= _KEY_INLINE:
            tag, cell = _TAG_INLINE + len(data), data
        else:  # (a new string object, or the key's own gaining a reference: before the table changes)
            tag, cell = _TAG_REF, _U64.pack(key_type.new_cell(key, data))
        if table.indices[slot] == F.TABLE_EMPTY:
            table.head[4] += 1
        fields = (hash_, tag, cell) if value_cell is None else (hash_, tag, cell, value_cell)
        cls._ps_entry.pack_into(table.entries, used * cls._ps_esize, *fields)
        table.indices[slot] = used + 1
        table.head[3] = used + 1
        self._ps_count += 1
        self._ps_aux += 1
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
        if cls._ps_strings and fields[1] == _TAG_REF:
            heap.decref(_ref(fields[2]))
        if cls._ps_has_values and cls._ps_value.is_ref and fields[3]:
            heap.decref(fields[3])
        count = self._ps_count
        if count == 0:
            old = self._ps_body
            heap.drop_view(old)  # (first: cut short before the free, a kept view must not outlive the body)
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

    def _ps_key_refs(self, fields):
        """The string object a live entry's key names (``[offset]``), or ``[]``."""
        if type(self)._ps_strings and fields[1] == _TAG_REF:
            return [_ref(fields[2])]
        return []

    def __iter__(self):
        key_of = type(self)._ps_key_of
        for fields in self._ps_live_entries():
            yield key_of(fields)

    def __contains__(self, key):
        """``key in c``.

        Runtime: O(1) average, as ``d[key]``.
        """
        try:
            self._ps_lookup(key)
        except Missing:
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
        heap.drop_view(old)  # (first: cut short before the free, a kept view must not outlive the body)
        self._ps_body = 0
        self._ps_count = 0
        self._ps_aux += 1
        heap.drop_internal(old)
        value_ref = cls._ps_has_values and cls._ps_value.is_ref
        for fields in removed:
            for offset in self._ps_key_refs(fields):
                heap.decref(offset)
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
        key_ref = cls._ps_strings
        value_ref = cls._ps_has_values and cls._ps_value.is_ref
        for entry in range(view.head[3]):
            fields = unpack(view.entries, entry * esize)
            if fields[1]:
                if key_ref and fields[1] == _TAG_REF:
                    refs.append(_ref(fields[2]))
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
                data = self._ps_check_string_key(fields, referenced, fail, where)
                expected = F.string_hash(key_type.string_type, data)
            else:
                if fields[1] != 1:
                    fail(f"{where}: tag {fields[1]}, a number key's entry has 1")
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

    def _ps_check_string_key(self, fields, referenced, fail, where):
        """The bytes of a live entry's string key, its inline form or its reference checked."""
        cls = type(self)
        key_type = cls._ps_key
        tag, key_bytes = fields[1], fields[2]
        if tag == _TAG_REF:
            if any(key_bytes[8:]):
                fail(f"{where}: the key bytes after its reference are not zero")
            offset = _ref(key_bytes)
            referenced(offset, key_type.type, where + " key")
            data = cls._heap.string_data(offset)
            if len(data) <= _KEY_INLINE:
                fail(f"{where}: a key of {len(data)} bytes is a reference; keys of up to {_KEY_INLINE} "
                     "bytes are inline (a lookup would not find it)")
            return data
        if not _TAG_INLINE <= tag <= _TAG_INLINE + _KEY_INLINE:
            fail(f"{where}: tag {tag} is neither a reference ({_TAG_REF}) nor an inline key length "
                 f"({_TAG_INLINE}..{_TAG_INLINE + _KEY_INLINE})")
        n = tag - _TAG_INLINE
        if any(key_bytes[n:]):
            fail(f"{where}: the bytes after its {n}-byte inline key are not zero")
        data = key_bytes[:n]
        if key_type.string_type == F.T_STRING:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                fail(f"{where}: its inline String key is not UTF-8")
        return data


def _key_reader(cls, heap, key):
    """``key_of(fields)``: the Python key of a live entry's unpacked fields (strings as ``bytes``/``str``)."""
    if not key.is_ref:
        if key.decode is None:
            return operator.itemgetter(2)
        decode = key.decode
        return lambda fields: decode(fields[2])
    string_data = heap.string_data
    text = key.string_type == F.T_STRING
    top = _TAG_INLINE + _KEY_INLINE

    def key_of(fields):
        tag = fields[1]
        if _TAG_INLINE <= tag <= top:
            data = fields[2][:tag - _TAG_INLINE]
        elif tag == _TAG_REF:
            data = string_data(_ref(fields[2]))
        else:
            raise CorruptStorageError(f"{heap.name}: an entry of a {cls.__name__} table has the tag {tag}")
        if not text:
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptStorageError(f"{heap.name}: a String key of a {cls.__name__} table is not "
                                      "UTF-8") from None
    return key_of


def _entry_readers(cls):
    """How a lookup reads an entry of class ``cls``, skipping its hash: for string keys a tuple, by
    key length ``n`` (0..``KEY_INLINE``), of ``(unpack_from, tag)``, where ``unpack_from`` reads
    ``(tag, the key's first n bytes, value cell)`` (no value cell for a Set) and ``tag`` is what the
    entry of an inline key of ``n`` bytes holds; for number keys the one ``unpack_from`` of
    ``(tag, key cell, value cell)``.

    An entry holds key ``data`` if and only if the key field read with the
    reader of ``len(data)`` equals ``data`` and its tag is ``TAG_INLINE +
    len(data)``: the tag says the length (so the zeros after the key are
    not read), and a reference or a free entry has another tag.  Comparing
    the stored hash first saves nothing: it is one more object to make.
    """
    value_code = cls._ps_value.code if cls._ps_has_values else ""
    if cls._ps_key.is_ref:
        return tuple((struct.Struct(f"<4xI{n}s{_KEY_INLINE - n}x{value_code}").unpack_from, _TAG_INLINE + n)
                     for n in range(_KEY_INLINE + 1))
    return struct.Struct(f"<4xI{cls._ps_key.code}{value_code}").unpack_from


#: The lookup of a short key, written once and made per class and per way of asking (see
#: _fast_lookups): ``{...}`` are filled in by what the class's key type and the asking need; the
#: names it reads are the free variables of the function that makes it (cheaper than globals).
_LOOKUP = """
    def {name}(self, key{parameters}):
        if type(key) is exact{in_range}:
            try:
                {encode}
                indices, mask, raw, before, capacity = self._ps_tv.fast
                {reader}
            except (UnicodeEncodeError, AttributeError, TypeError, IndexError):
                # a lone surrogate, no view kept, a retired one (fast None), a long key
                return {slow}
            home = slot = {hash} & mask
            index = indices[slot]
            while index:
                if index <= capacity:
                    {fields} = read(raw, before + index * esize)
                    if found == {data} and tag_ == tag:
                        return {hit}
                elif index != deleted:  # (an index naming no entry: the general way says what is wrong)
                    return {slow}
                slot = (slot + 1) & mask
                if slot == home:
                    return {slow}
                index = indices[slot]
            {miss}
        return {slow}
"""


def _fast_lookups(cls):
    """``{name: function}`` of the lookups made for hash collection class ``cls`` (``__contains__``;
    for a Dict also ``__getitem__`` and ``get``), or None when its key type has none.

    They serve the keys that need no normalising: ``bytes`` (ByteString keys)
    or ``str`` (String keys) of at most ``KEY_INLINE`` bytes, which live in the
    entry itself, and ``int`` keys of an integer key type.  A lookup is then a
    handful of C-level calls, everything else bound once here: the table's
    figures read from the view the proxy keeps (``_ps_tv``), the hash (one
    ``crc32``, or three int operations), one index read and one
    ``unpack_from`` of the entry per probe (see :func:`_entry_readers`), a key
    compare and a tag compare.  Anything else (another key type, a long key,
    no view kept yet, a damaged index, a probe that wraps around) goes the
    general way, which also says what is wrong.  The probe loop is written
    once (``_LOOKUP``) and made per class with its key's parts and each
    way of asking's answer, so that none of them pays a second call.
    ``crc32`` is :mod:`binascii`'s, the same function as :mod:`zlib`'s, with
    a cheaper call.
    """
    key_type = cls._ps_key
    general = {"__contains__": HashCollection.__contains__, "__getitem__": PersistentDict.__getitem__,
               "get": MappingMixin.get}
    bound = {"esize": cls._ps_esize, "deleted": F.TABLE_DELETED, "readers": _entry_readers(cls),
             "decode": cls._ps_vdecode if cls._ps_has_values else None, "slow_getitem": general["__getitem__"],
             "slow_get": general["get"], "slow_contains": general["__contains__"]}
    if key_type.is_ref:
        text = key_type.string_type == F.T_STRING
        bound.update(exact=str if text else bytes, seed=F.STRING_SEED if text else F.BYTES_SEED, crc32=_crc32)
        data = "data" if text else "key"
        parts = {"in_range": "", "encode": 'data = key.encode("utf-8")' if text else "pass",
                 "reader": f"read, tag = readers[len({data})]", "hash": f"crc32({data}, seed)", "data": data}
    elif key_type.exact is int:
        bound.update(exact=int, low=key_type.low, high=key_type.high, mix=F._MIX, mask64=F._MASK64,
                     read=bound["readers"], tag=1)
        parts = {"in_range": " and low <= key <= high", "encode": "pass", "reader": "pass", "data": "key",
                 "hash": "((key & mask64) * mix & mask64) >> 32"}  # F.number_hash of an int
    else:
        return None
    value = "cell" if bound["decode"] is None else "decode(cell)"
    asking = {"__contains__": ("", "slow_contains(self, key)", "True", "return False")}
    if cls._ps_has_values:
        asking["__getitem__"] = ("", "slow_getitem(self, key)", value, "raise KeyError(key)")
        asking["get"] = (", default=None", "slow_get(self, key, default)", value, "return default")
    fields = "tag_, found, cell" if cls._ps_has_values else "tag_, found"
    source = (f"def make({', '.join(bound)}):"
              + "".join(_LOOKUP.format(name=name, parameters=parameters, slow=slow, hit=hit, miss=miss,
                                       fields=fields, **parts)
                        for name, (parameters, slow, hit, miss) in asking.items())
              + f"    return {', '.join(asking)},\n")
    env = {}
    exec(compile(source, f"<lookups of {cls.__name__}>", "exec"), env)
    made = dict(zip(asking, env["make"](**bound)))
    for name, function in made.items():
        function.__doc__ = general[name].__doc__
        function.__qualname__ = f"{cls.__name__}.{name}"
    return made


def _fast_setitem(cls):
    """``__setitem__`` made for Dict class ``cls`` whose keys can live in the entry, or None.

    For a ``bytes`` key of at most ``KEY_INLINE`` bytes (ByteString keys) or an
    ``int`` key of an integer key type, into a table that has room, it is the
    lookup of :func:`_fast_lookups` followed by the writes of ``_ps_insert``
    (the entry, its index, the table's figures, the count) or of the value
    cell, as one change of the storage (see :func:`_types.change`, written
    out here).  A by-reference value is taken as a live proxy of the value
    type, its reference counted (the new value's first, then the replaced
    one's).  Anything else, and a full table, goes the general way.
    """
    key_type, value_type = cls._ps_key, cls._ps_value
    if not (key_type.is_ref and key_type.string_type == F.T_BYTESTRING
            or not key_type.is_ref and key_type.exact is int):
        return None
    heap = cls._heap
    pack_entry = cls._ps_entry.pack_into
    pack_value, value_at = cls._ps_value_cell.pack_into, cls._ps_value_at
    esize, encode = cls._ps_esize, value_type.encode
    slow_set = PersistentDict.__setitem__
    deleted, get_ident, cut_short = F.TABLE_DELETED, T._get_ident, T._CUT_SHORT
    strings, readers = key_type.is_ref, _entry_readers(cls)
    seed, crc32 = F.BYTES_SEED, _crc32
    low, high, mix, mask64 = getattr(key_type, "low", 0), getattr(key_type, "high", 0), F._MIX, F._MASK64

    # a value the cell holds as it is (an int in range, a float) skips the call of encode; a
    # by-reference value is taken here only as a live proxy of the value type (its offset)
    vtype = value_type.type
    vref = vtype if value_type.is_ref else None
    incref, decref = heap.incref, heap.decref
    if vref is not None:
        vexact, vlow, vhigh = None, 0, 0
    elif value_type.raw and vtype.kind == "int":
        vexact, vlow, vhigh = int, vtype.low, vtype.high
    elif value_type.raw:
        vexact, vlow, vhigh = float, float("-inf"), float("inf")
    else:
        vexact, vlow, vhigh = None, 0, 0

    def __setitem__(self, key, value):
        if strings:
            if type(key) is not bytes or len(key) > _KEY_INLINE:
                return slow_set(self, key, value)
            read, tag = readers[len(key)]
            hash_ = crc32(key, seed)
        else:
            if type(key) is not int or not low <= key <= high:
                return slow_set(self, key, value)
            hash_, read, tag = ((key & mask64) * mix & mask64) >> 32, readers, 1
        try:
            table = self._ps_tv
            indices, mask, raw, before, capacity = table.fast
        except (AttributeError, TypeError):  # no view kept, a retired one (fast None)
            return slow_set(self, key, value)
        if heap._changing or heap.readonly:
            return slow_set(self, key, value)
        # a wrong value fails here, before anything changes
        if vref is not None:
            if type(value) is not vref:
                return slow_set(self, key, value)
            cell = value._ps_oid
        else:
            cell = value if type(value) is vexact and vlow <= value <= vhigh else encode(value)
        home = slot = hash_ & mask
        free = -1
        index = indices[slot]
        while index:
            if index <= capacity:
                at = before + index * esize
                fields = read(raw, at)
                if fields[1] == key and fields[0] == tag:
                    heap._changing = get_ident()
                    if vref is None:
                        pack_value(raw, at + value_at, cell)  # an existing key: its value replaced
                    else:
                        try:
                            incref(cell)  # (first: it refuses an object with too many references)
                            pack_value(raw, at + value_at, cell)
                            if fields[2]:  # (tag, key, value cell): the replaced value
                                decref(fields[2])
                        except Exception as exc:
                            if not isinstance(exc, cut_short):
                                heap._changing = 0
                            raise
                    heap._changing = 0
                    return
            elif index != deleted:
                return slow_set(self, key, value)
            elif free < 0:
                free = slot
            slot = (slot + 1) & mask
            if slot == home:
                return slow_set(self, key, value)
            index = indices[slot]
        head = table.head
        used = head[3]
        if used >= capacity or (free < 0 and head[4] >= capacity):
            return slow_set(self, key, value)  # full: the general way rebuilds the table
        heap._changing = get_ident()
        try:
            if vref is not None:
                incref(cell)
            used += 1
            pack_entry(raw, before + used * esize, hash_, tag, key, cell)  # (a short key padded with zeros)
            if free < 0:
                head[4] += 1
            else:
                slot = free
            indices[slot] = head[3] = used
            self._ps_count += 1
            self._ps_aux += 1
        except Exception as exc:
            if not isinstance(exc, cut_short):
                heap._changing = 0
            raise
        heap._changing = 0

    __setitem__.__doc__ = slow_set.__doc__
    __setitem__.__qualname__ = f"{cls.__name__}.__setitem__"
    return __setitem__


class PersistentDict(MappingMixin, HashCollection):
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
            cls._ps_value_check = staticmethod(value_checker(heap, cls._ps_params[1], f"{cls.__name__} value"))

    def __getitem__(self, key):
        """``d[key]``; ``KeyError`` if absent.

        Runtime: O(1) average: one hash, usually one probe and one key compare.
        A ``bytes`` or ``str`` key of at most 16 bytes (UTF-8) in a Dict of
        such keys, or an ``int`` key of an integer key type, is found by a
        lookup made for the class when its schema is made (see
        :func:`_fast_lookups`): its hash, then per probe one index read and
        one unpack of the entry's tag, key and value.  At most a third of the
        index slots are in use, so most lookups take one probe.
        """
        try:
            fields = self._ps_lookup(key)[3]
        except Missing:
            raise KeyError(key) from None
        decode = type(self)._ps_vdecode
        return fields[3] if decode is None else decode(fields[3])

    def __setitem__(self, key, value):
        """``d[key] = value``; a wrong key or value changes nothing.

        Runtime: O(1) average, amortised (a full table is rebuilt at twice its size).
        """
        heap = self._ps_storage()
        cls = type(self)
        stored = cls._ps_key.store(key)  # a wrong key fails before the value creates anything
        value_type = cls._ps_value
        cell = value_type.encode(value)
        referenced = value_type.is_ref and cell
        if referenced:
            heap.incref(cell)  # (first: it refuses an object with too many references)
        try:
            table, entry = self._ps_insert(heap, key, cell, stored)
        except Exception:  # (a full disk growing the table: nothing stored)
            if referenced:
                heap.decref(cell)
            raise
        if entry >= 0:  # an existing key: replace the value
            at = entry * cls._ps_esize + cls._ps_value_at
            old = cls._ps_value_cell.unpack_from(table.entries, at)[0]
            cls._ps_value_cell.pack_into(table.entries, at, cell)
            if value_type.is_ref and old:
                heap.decref(old)

    def _ps_prepare_pairs(self, heap, pairs):
        """The checked pairs, as ``_Columns`` when the keys are all ``bytes`` (ByteString keys) or all
        ``int`` (integer keys) and the values by value: every key and value is checked with a few
        C-level passes over the lists (``map``, ``set``, ``min``, ``max``, an ``array`` of the value
        type's C type) instead of one call each."""
        cls = type(self)
        key_type, value_type = cls._ps_key, cls._ps_value
        if value_type.is_ref:
            return super()._ps_prepare_pairs(heap, pairs)
        keys = list(map(_first, pairs))
        kinds = set(map(type, keys))
        if key_type.is_ref and key_type.string_type == F.T_BYTESTRING and kinds == {bytes}:
            # (an array, not a list: no int object kept a hash, none freed at the end, cold)
            hashes = array("I", map(_crc32, keys, itertools.repeat(F.BYTES_SEED)))
        elif not key_type.is_ref and key_type.exact is int and kinds == {int} and (
                key_type.low <= min(keys) and max(keys) <= key_type.high):
            hashes = array("I", map(F.number_hash, keys))
        else:
            return super()._ps_prepare_pairs(heap, pairs)
        values = list(map(_second, pairs))
        vtype = value_type.type
        exact = (int if vtype.kind == "int" else float) if value_type.raw else None
        fits = set(map(type, values)) == {exact}
        if fits and exact is int:
            # the range checked by an array of the type's own C type (which the cells' column
            # is already, for a 64-bit type: _write_columns takes it as it is)
            try:
                typed = array(vtype.code, values)
            except OverflowError:
                fits = False
            else:
                if vtype.code == value_type.code:
                    values = typed
        if not fits:
            values = list(map(value_type.encode, values))  # raises what a single store would
        return _Columns(keys, hashes, values)

    def _ps_bulk_store(self, heap, prepared):
        """Store checked items (see ``update``): ``(key, stored, value cell, holder)`` tuples or
        ``_Columns``.  Room for all of them is made once, then each is inserted or overwrites
        its key's value.

        ``_Columns`` of distinct short keys, none in the table yet, into a
        table without tombstones (one just grown, or empty) are written at
        once (:meth:`_ps_fill_columns`): the indices placed by one loop over
        the hashes, the entries written a column at a time.  Otherwise an item whose key lives
        in the entry (a number, a string of at most ``KEY_INLINE`` bytes) and
        whose value is by value is placed by the loop here, the table's
        figures kept in locals and written once at the end; any other item
        goes through ``_ps_insert``.
        """
        cls = type(self)
        wanted = self._ps_count + len(prepared)
        grow = not self._ps_body or self._ps_table().capacity < wanted
        if type(prepared) is _Columns:
            if grow:  # the old entries and the new placed in one pass (else the old, if they must stay alone)
                table, hashes = self._ps_move(heap, min(wanted, _MAX_ENTRIES))
                if self._ps_fill_columns(prepared, hashes):
                    return
                if hashes:
                    table.indices[:] = _place(hashes, table.mask)
            elif self._ps_fill_columns(prepared):
                return
            prepared = zip(prepared.keys, zip(prepared.hashes, prepared.keys), prepared.cells,
                           itertools.repeat(None))
        elif grow:
            self._ps_rebuild(heap, min(wanted, _MAX_ENTRIES))
        value_ref = cls._ps_value.is_ref
        value_at, value_cell = cls._ps_value_at, cls._ps_value_cell
        strings, esize = cls._ps_strings, cls._ps_esize
        readers, pack_entry, pack_value = cls._ps_readers, cls._ps_entry.pack_into, value_cell.pack_into
        deleted = F.TABLE_DELETED
        table = self._ps_table()
        indices, mask, raw, before, capacity = table.fast
        head = table.head
        used, filled, added = head[3], head[4], 0
        if value_ref:  # every new value's reference first (all or none), before anything is stored
            prepared = list(prepared)
            heap.incref_all(cell for _, _, cell, _ in prepared)
        stored_so_far = 0
        try:
            for key, stored, cell, _ in prepared:
                hash_, data = stored
                if value_ref or used >= capacity or filled >= capacity or (strings and len(data) > _KEY_INLINE):
                    # the general way, with the figures of the table written back first
                    head[3], head[4] = used, filled
                    self._ps_count += added
                    self._ps_aux += added
                    added = 0
                    table, entry = self._ps_insert(heap, key, cell, stored)
                    stored_so_far += 1
                    if entry >= 0:  # an existing key: replace the value
                        at = entry * esize + value_at
                        old = value_cell.unpack_from(table.entries, at)[0]
                        value_cell.pack_into(table.entries, at, cell)
                        if value_ref and old:
                            heap.decref(old)
                    indices, mask, raw, before, capacity = table.fast
                    head = table.head
                    used, filled = head[3], head[4]
                    continue
                if strings:
                    read, tag = readers[len(data)]
                else:
                    read, tag = readers, 1
                home = slot = hash_ & mask
                free = -1
                index = indices[slot]
                while index:
                    if index <= capacity:
                        at = before + index * esize
                        fields = read(raw, at)
                        if fields[1] == data and fields[0] == tag:
                            break
                    elif index != deleted:
                        raise self._ps_bad(f"hash slot {slot} names entry {index - 1}")
                    elif free < 0:
                        free = slot
                    slot = (slot + 1) & mask
                    if slot == home:
                        raise self._ps_bad("its hash table has no free slot")
                    index = indices[slot]
                if index:  # an existing key: replace the value (by value: nothing to count)
                    pack_value(raw, at + value_at, cell)
                    continue
                if free < 0:
                    filled += 1
                else:
                    slot = free
                used += 1
                pack_entry(raw, before + used * esize, hash_, tag, data, cell)  # (a short key padded with zeros)
                indices[slot] = used
                added += 1
        except Exception:
            if value_ref:  # (a full disk on the way) the values not stored give their references back
                for _, _, cell, _ in prepared[stored_so_far:]:
                    if cell:
                        heap.decref(cell)
            raise
        finally:
            head[3], head[4] = used, filled
            self._ps_count += added
            self._ps_aux += added

    def _ps_fill_columns(self, columns, moved=None):
        """Append ``columns`` to the table at once if it has room for them, no tombstone and no dead
        entry, and their keys are short, distinct and not in it already; whether it did (if not,
        nothing changed).  ``moved``: the hashes of the table's entries when its indices are still
        empty (a table :meth:`_ps_move` just made): they are placed here too, first.

        The new keys are placed first, into a copy of the indices (in a table
        just moved: into its own empty indices, emptied again if the keys do
        not fit), by one loop over their hashes; a probe that meets an occupied
        slot compares the hashes (all of them in one ``array``: one read, no
        int object to follow), then the keys (:meth:`_ps_same_key`), so a
        repeated or present key gives up before anything is written.  Then the
        entries are written a column at a time (:func:`_write_columns`) and
        the indices copied in.
        """
        cls = type(self)
        table = self._ps_table()
        head = table.head
        used, m = head[3], len(columns)
        keys, hashes = columns.keys, columns.hashes
        if head[4] != used or used != self._ps_count or used + m > table.capacity:
            return False
        if cls._ps_strings:
            lengths = set(map(len, keys))  # (a set first: the keys of a bulk load often have one length)
            if max(lengths) > _KEY_INLINE:
                return False
            lengths = lengths.pop() if len(lengths) == 1 else list(map(len, keys))
        else:
            lengths = None
        mask, esize = table.mask, cls._ps_esize
        # every entry's hash by its number (1-based, as an index names it): the table's, then the new
        every = array("I", (0,))
        if moved is None:
            indices = array("I")
            indices.frombytes(table.indices.cast("B"))  # a copy: the table changes only once all is placed
            with table.entries[:used * esize].cast("I") as words, words[::esize // 4] as stored:
                every.frombytes(stored.tobytes())
        else:
            indices = table.indices  # empty: placed in place (emptied again if the keys do not fit)
            every.fromlist(moved)
        every.extend(hashes)
        number = 0 if moved is not None else used
        placed = False
        try:
            if moved is not None:  # the table's own entries: distinct keys, no comparison
                for slot in map(operator.and_, moved, itertools.repeat(mask)):
                    number += 1
                    while indices[slot]:
                        slot = (slot + 1) & mask
                    indices[slot] = number
            for slot in map(operator.and_, hashes, itertools.repeat(mask)):  # (the homes, at C level)
                number += 1
                other = indices[slot]
                if other:  # a collision: rare, at most a third of the slots are in use
                    hash_ = every[number]
                    home = slot
                    while other:
                        if every[other] == hash_ and self._ps_same_key(table, used, columns, other, number):
                            return False
                        slot = (slot + 1) & mask
                        if slot == home:  # no empty slot (damage): the general way says what is wrong
                            return False
                        other = indices[slot]
                indices[slot] = number
            placed = True
        except IndexError:  # an index that names no entry: the general way says what is wrong
            return False
        finally:
            if not placed and moved is not None:
                indices.cast("B")[:] = bytes(4 * (mask + 1))
        with memoryview(every)[used + 1:] as column:
            _write_columns(cls, table.entries[used * esize:(used + m) * esize], columns, lengths, column)
        if moved is None:
            table.indices[:] = indices
        head[3] = head[4] = used + m
        self._ps_count += m
        self._ps_aux += m
        return True

    def _ps_same_key(self, table, used, columns, other, number):
        """Whether entry ``other`` (a table entry up to ``used``, else an entry of ``columns``) may hold
        the key of entry ``number`` (of ``columns``): an equal key, or an index that names no entry."""
        key = columns.keys[number - used - 1]
        if other > used:
            return columns.keys[other - used - 1] == key
        if other > table.capacity:
            return True
        indices, mask, raw, before, capacity = table.fast
        if type(self)._ps_strings:
            read, tag = type(self)._ps_readers[len(key)]
        else:
            read, tag = type(self)._ps_readers, 1
        fields = read(raw, before + other * type(self)._ps_esize)
        return fields[1] == key and fields[0] == tag

    def __delitem__(self, key):
        """``del d[key]``; ``KeyError`` if absent.

        Runtime: O(1) average, amortised (a table an eighth full shrinks).
        """
        heap = self._ps_storage()
        try:
            table, slot, entry, fields = self._ps_lookup(key)
        except Missing:
            raise KeyError(key) from None
        self._ps_delete(heap, table, slot, entry, fields)

    def _ps_items(self):
        cls = type(self)
        key_of, vdecode = cls._ps_key_of, cls._ps_vdecode
        for fields in self._ps_live_entries():
            yield key_of(fields), fields[3] if vdecode is None else vdecode(fields[3])

    def _ps_iter_values(self):
        vdecode = type(self)._ps_value.decode
        for fields in self._ps_live_entries():
            yield fields[3] if vdecode is None else vdecode(fields[3])

    def popitem(self):
        """Remove and return the last inserted ``(key, value)``; ``KeyError`` if empty.

        Runtime: O(1) average.
        """
        heap = self._ps_storage()
        if not self._ps_count:
            raise KeyError("popitem(): dictionary is empty")
        cls = type(self)
        table, slot, entry, fields = self._ps_last_entry()
        vdecode = cls._ps_vdecode
        item = cls._ps_key_of(fields), fields[3] if vdecode is None else vdecode(fields[3])
        self._ps_delete(heap, table, slot, entry, fields)
        return item

    def pop(self, key, default=MappingMixin._MARKER):
        """Remove ``key`` and return its value (or ``default``; ``KeyError`` without one).

        Runtime: O(1) average.
        """
        heap = self._ps_storage()
        try:
            table, slot, entry, fields = self._ps_lookup(key)
        except Missing:
            if default is MappingMixin._MARKER:
                raise KeyError(key) from None
            return default
        vdecode = type(self)._ps_value.decode
        value = fields[3] if vdecode is None else vdecode(fields[3])
        self._ps_delete(heap, table, slot, entry, fields)
        return value

    def copy(self):
        """A plain ``dict`` with the same items.

        Runtime: O(n).
        """
        return dict(self._ps_items())


class PersistentSet(HashCollection):
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
        """Add ``key`` (no effect if present).

        Runtime: O(1) average, amortised.
        """
        self._ps_insert(self._ps_storage(), key)

    def discard(self, key):
        """Remove ``key`` if present.

        Runtime: O(1) average.
        """
        heap = self._ps_storage()
        try:
            table, slot, entry, fields = self._ps_lookup(key)
        except Missing:
            return
        self._ps_delete(heap, table, slot, entry, fields)

    def remove(self, key):
        """Remove ``key``; ``KeyError`` if absent.

        Runtime: O(1) average.
        """
        heap = self._ps_storage()
        try:
            table, slot, entry, fields = self._ps_lookup(key)
        except Missing:
            raise KeyError(key) from None
        self._ps_delete(heap, table, slot, entry, fields)

    def pop(self):
        """Remove and return the last added element; ``KeyError`` if empty.

        Runtime: O(1) average.
        """
        heap = self._ps_storage()
        if not self._ps_count:
            raise KeyError("pop from an empty set")
        table, slot, entry, fields = self._ps_last_entry()
        key = type(self)._ps_key_of(fields)
        self._ps_delete(heap, table, slot, entry, fields)
        return key

    def __ior__(self, other):
        """``s |= other``: add every element of the set ``other``; nothing is added if one cannot be stored.

        Runtime: O(m).
        """
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
        """Add the elements of every iterable in ``others``.

        Runtime: O(m) for ``m`` elements in all.
        """
        self._ps_storage()
        self._ps_add_all([key for other in others for key in other])

    def __iand__(self, other):
        """``s &= other``: keep the elements also in ``other``.

        Runtime: O(n) lookups in ``other``.
        """
        self._ps_storage()
        if not isinstance(other, abc.Set):
            return NotImplemented
        for key in [k for k in self if k not in other]:
            self.discard(key)
        return self

    def __isub__(self, other):
        """``s -= other``: remove the elements of ``other``.

        Runtime: O(m).
        """
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
        """``s ^= other``: keep the elements in exactly one of the two.

        Runtime: O(m).
        """
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
        """``s == other``: the same elements (``other`` any set).

        Runtime: O(n).
        """
        if not isinstance(other, abc.Set):
            return NotImplemented
        return len(self) == len(other) and self.__le__(other)

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def copy(self):
        """A plain ``set`` with the same elements.

        Runtime: O(n).
        """
        return set(self)

    # -- set's named methods: new plain sets, or changes in place --
    def union(self, *others):
        """A plain ``set`` of the elements of this set and of every iterable in ``others`` (``set.union``).

        Runtime: O(n + m).

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

        Runtime: O(n + m).

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

        Runtime: O(n + m).

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

        Runtime: O(n + m).

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

        Runtime: O(n + m).

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
        """Whether every element of iterable ``other`` is in this set (``set.issuperset``; see ``issubset``).

        Runtime: O(n + m).
        """
        return set(self).issuperset(other)

    def intersection_update(self, *others):
        """Keep only the elements also in every iterable of ``others``, in place.

        Runtime: O(n + m).

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

        Runtime: O(n + m).

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

        Runtime: O(m).

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


abc.MutableMapping.register(PersistentDict)
abc.MutableSet.register(PersistentSet)

# Every method that changes a Dict or Set is one change (see _types.change): done once, here.
_CHANGES = {
    HashCollection: ("clear",),
    PersistentDict: ("__setitem__", "__delitem__", "popitem", "pop"),
    PersistentSet: ("add", "discard", "remove", "pop", "__ior__", "update", "__iand__", "__isub__",
                    "__ixor__", "intersection_update", "difference_update", "symmetric_difference_update"),
}
for _cls, _names in _CHANGES.items():
    for _name in _names:
        setattr(_cls, _name, T.change(_cls.__dict__[_name]))
del _CHANGES, _cls, _names, _name
