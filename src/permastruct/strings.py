"""Persistent strings (``ByteString``, ``String``) and the string registry.

String proxies are immutable: they compare equal to, and hash like, the
equivalent ``bytes``/``str``, so either can be used as a key.  The registry
interns strings: ``p.stringRegistry.get(b"James Bond")`` returns the same
persistent string for equal contents, in every process, because the hash
stored in the file is a crc32 of the bytes, never Python's ``hash()``.
"""

import ctypes

from . import _format as F
from ._types import Persistent, _damaged, _from_buffer
from .errors import CorruptStorageError

__all__ = ["ByteString", "String", "StringRegistry"]


class _PersistentString(Persistent):
    _fields_ = [("_ps_hash", ctypes.c_uint32), ("_ps_len", ctypes.c_uint32)]
    __slots__ = ()
    _ps_kind = "string"

    @classmethod
    def from_buffer(cls, source, offset=0):
        """The proxy of the string at ``offset`` of ``source`` (a map segment); its length is checked
        once, here, so that reading its bytes never goes past the map (see ``validated_from_buffer``)."""
        try:
            proxy = _from_buffer(cls, source, offset)
        except ValueError:
            raise _damaged(cls, None, offset, "its header crosses the end of the map") from None
        if offset + F.STRING.size + proxy._ps_len > len(source):
            raise _damaged(cls, proxy, offset, f"its length {proxy._ps_len} runs past the end of the map")
        return proxy

    def _ps_bytes(self):
        return ctypes.string_at(ctypes.addressof(self) + F.STRING.size, self._ps_len)

    def __bytes__(self):
        return self._ps_bytes()

    def __hash__(self):
        return hash(self.contents)

    def __eq__(self, other):
        if isinstance(other, _PersistentString):
            if type(other)._ps_type_id != type(self)._ps_type_id:
                return False
            return self._ps_hash == other._ps_hash and self._ps_bytes() == other._ps_bytes()
        if isinstance(other, self._ps_python_type):
            return self.contents == other
        return NotImplemented

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def _ps_order(self, other):
        """``(self's value, other's value)`` for an ordering comparison, or None."""
        if isinstance(other, _PersistentString):
            if type(other)._ps_type_id != type(self)._ps_type_id:
                return None
            return self._ps_bytes(), other._ps_bytes()  # UTF-8 bytes order like code points
        if isinstance(other, self._ps_python_type):
            return self.contents, other
        return None

    def __lt__(self, other):
        pair = self._ps_order(other)
        return NotImplemented if pair is None else pair[0] < pair[1]

    def __le__(self, other):
        pair = self._ps_order(other)
        return NotImplemented if pair is None else pair[0] <= pair[1]

    def __gt__(self, other):
        pair = self._ps_order(other)
        return NotImplemented if pair is None else pair[0] > pair[1]

    def __ge__(self, other):
        pair = self._ps_order(other)
        return NotImplemented if pair is None else pair[0] >= pair[1]


class ByteString(_PersistentString):
    """An immutable persistent ``bytes`` value.

    >>> from permastruct import Storage
    >>> p = Storage(None)
    >>> s = p.schema.ByteString(b"Felix")
    >>> s == b"Felix", hash(s) == hash(b"Felix"), len(s), s.contents
    (True, True, 5, b'Felix')
    """

    __slots__ = ()
    _ps_type_id = F.T_BYTESTRING
    _ps_python_type = (bytes, bytearray, memoryview)

    @property
    def contents(self):
        """The value as ``bytes``."""
        return self._ps_bytes()

    def __len__(self):
        return self._ps_len


class String(_PersistentString):
    """An immutable persistent ``str`` value (stored as UTF-8).

    >>> from permastruct import Storage
    >>> p = Storage(None)
    >>> s = p.schema.String("Moneypenny")
    >>> s == "Moneypenny", str(s), len(s)
    (True, 'Moneypenny', 10)
    """

    __slots__ = ()
    _ps_type_id = F.T_STRING
    _ps_python_type = str

    @property
    def contents(self):
        """The value as ``str``."""
        try:
            return self._ps_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            storage = type(self)._storage
            raise CorruptStorageError(f"{storage.fileName!r}: the String at {self._ps_offset:#x} is not "
                                      f"UTF-8 ({exc.reason} at byte {exc.start})") from None

    def __str__(self):
        return self.contents

    def __len__(self):
        return len(self.contents)


class StringRegistry:
    """The interned strings of a storage: one persistent string per distinct value.

    A persistent open-addressing hash table (linear probing on the stored
    crc32); it doubles when half full.
    """

    def __init__(self, storage):
        self._storage = storage

    # The table object lives at the offset in the root record's registry slot.
    def _table(self):
        storage = self._storage
        offset = storage._page_file.slots[F.SLOT_REGISTRY]
        storage._check_offset(offset, F.REGISTRY.size)
        try:
            type_id, _, count, capacity = F.REGISTRY.unpack_from(storage._mapping.view(offset, F.REGISTRY.size))
        except IndexError:  # not in one mapped segment
            type_id = capacity = 0
        if type_id != F.T_REGISTRY or capacity & (capacity - 1) or not capacity or count > capacity:
            raise CorruptStorageError(f"{storage!r}: the string registry at {offset:#x} is damaged")
        storage._check_offset(offset, F.REGISTRY.size + 8 * capacity)
        return offset, count, capacity

    def _entries(self, offset, capacity):
        try:
            return self._storage._mapping.view(offset + F.REGISTRY.size, capacity * 8).cast("Q")
        except IndexError:
            raise CorruptStorageError(f"{self._storage!r}: the string registry at {offset:#x} crosses the end "
                                      "of a mapped segment") from None

    def _find(self, type_id, data):
        """``(entry index, string offset or 0)`` for ``data`` of string type ``type_id``."""
        storage = self._storage
        offset, count, capacity = self._table()
        entries = self._entries(offset, capacity)
        want = F.string_hash(type_id, data)
        mask = capacity - 1
        index = want & mask
        equals = storage._string_equals  # bounded by the map: a damaged entry cannot read past it
        for _ in range(capacity):
            target = entries[index]
            if not target:
                return index, 0
            if equals(target, data):
                kind, _, stored_hash, _ = storage._string_header(target)
                if kind == type_id and stored_hash == want:
                    return index, target
            index = (index + 1) & mask
        raise CorruptStorageError(f"{storage!r}: the string registry is full without a free entry")

    @staticmethod
    def _key(value):
        if isinstance(value, str):
            return F.T_STRING, value.encode("utf-8")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return F.T_BYTESTRING, bytes(value)
        if isinstance(value, (ByteString, String)):
            return type(value)._ps_type_id, value._ps_bytes()
        raise TypeError(f"the string registry holds bytes and str, not {type(value).__name__}")

    def get(self, value):
        """The interned persistent string equal to ``value`` (``bytes`` or ``str``), created if new."""
        storage = self._storage
        type_id, data = self._key(value)
        index, target = self._find(type_id, data)
        if target:
            return storage._proxy(target)
        storage._check_writable()
        target = storage._new_string(type_id, data)
        storage._incref(target)
        offset, count, capacity = self._table()
        self._entries(offset, capacity)[index] = target
        count += 1
        F.UINT64.pack_into(storage._mapping.view(offset + 8, 8), 0, count)
        if count * 2 > capacity:
            self._resize(capacity * 2)
        return storage._proxy(target)

    def _resize(self, capacity):
        storage = self._storage
        old, count, old_capacity = self._table()
        targets = [t for t in self._entries(old, old_capacity) if t]
        new = storage._allocator.alloc(F.REGISTRY.size + capacity * 8)
        F.REGISTRY.pack_into(storage._mapping.view(new, F.REGISTRY.size), 0, F.T_REGISTRY, 1, count, capacity)
        entries = self._entries(new, capacity)
        mask = capacity - 1
        for target in targets:
            index = storage._string_header(target)[2] & mask
            while entries[index]:
                index = (index + 1) & mask
            entries[index] = target
        storage._page_file.slots[F.SLOT_REGISTRY] = new
        storage._allocator.free(old)

    def __len__(self):
        return self._table()[1]

    def __contains__(self, value):
        try:
            type_id, data = self._key(value)
        except TypeError:
            return False
        return bool(self._find(type_id, data)[1])

    def __iter__(self):
        offset, count, capacity = self._table()
        for target in list(self._entries(offset, capacity)):
            if target:
                yield self._storage._proxy(target)

    def __repr__(self):
        return f"<StringRegistry of {self._storage!r}: {len(self)} strings>"


def create_registry(storage, size):
    """Allocate an empty registry table for about ``size`` strings; return its offset."""
    capacity = 8
    while capacity < 2 * size:
        capacity *= 2
    offset = storage._allocator.alloc(F.REGISTRY.size + capacity * 8)
    F.REGISTRY.pack_into(storage._mapping.view(offset, F.REGISTRY.size), 0, F.T_REGISTRY, 1, 0, capacity)
    return offset
