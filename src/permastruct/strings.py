"""Persistent strings (``ByteString``, ``String``) and the string registry.

String proxies are immutable: they compare equal to, and hash like, the
equivalent ``bytes``/``str``, so either can be used as a key.  The registry
interns strings: ``p.stringRegistry.get(b"James Bond")`` returns the same
persistent string for equal contents, in every process, because the hash
stored in the file is a crc32 of the bytes, never Python's ``hash()``.

String proxies act like their values: every method of ``str`` (on a
``String``) or ``bytes`` (on a ``ByteString``) and the operators ``+``,
``*``, ``%``, ``in``, indexing, slicing, iteration and ``format()`` work on
them and return plain ``str``/``bytes`` results, computed from
:attr:`~String.contents`.  The delegating methods are made once, when this
module is imported (``_delegate_methods``); they never hide the proxy's own
API (``contents``, ``isSameAs``, the ``_ps_`` names).  A ``ByteString``
exports its stored bytes read-only through the buffer protocol, so
``memoryview(raw)``, ``bytearray(raw)``, ``b"".join([raw])`` and
``hashlib.sha256(raw)`` read them in place; a ``String``, like ``str``, has no
buffer protocol.  What a proxy cannot be is an instance of ``str``/``bytes``:
an API that insists on one (``", ".join(names)`` with String proxies among
``names``, ``json.dumps``) needs the values: ``str(name)``, ``name.contents``
or :func:`permastruct.to_python`.
"""

import ctypes
from array import array
from itertools import repeat
from zlib import crc32 as _crc32

from . import _format as F
from ._types import MemoryExporter, Persistent, run_change
from .errors import CorruptStorageError, TextEncodeError

__all__ = ["ByteString", "String", "StringRegistry", "storable", "TextEncodeError"]

_PACK_STRING = F.STRING.pack_into
_STRING_SEED, _BYTES_SEED = F.STRING_SEED, F.BYTES_SEED

#: The most bytes a String or ByteString holds (the length in its header is 32 bits).
MAX_BYTES = (1 << 32) - 1


def storable(type_id, value, where):
    """The bytes a new string object of ``type_id`` stores for ``value`` (a ``str`` for a String, a
    bytes-like object for a ByteString), or the error that says why it cannot, naming ``where``
    (``"Item.name"``, ``"Names element"``, ``"String()"``): ``TextEncodeError`` (a
    UnicodeEncodeError) for a lone surrogate, OverflowError past :data:`MAX_BYTES`."""
    if type_id == F.T_STRING:
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TextEncodeError(
                exc.encoding, exc.object, exc.start, exc.end,
                f"{where} is String: cannot store the character {exc.object[exc.start]!r} at position "
                f"{exc.start} ({exc.reason}): a String holds UTF-8 text, which has no lone surrogates "
                "(store such text encoded, as bytes in a ByteString)") from None
    else:
        data = value if type(value) is bytes else bytes(value)
    if len(data) > MAX_BYTES:
        raise OverflowError(f"{where} is {'String' if type_id == F.T_STRING else 'ByteString'}: a persistent "
                            f"string holds at most {MAX_BYTES} bytes (4 GiB), not {len(data)}")
    return data


class _PersistentString(Persistent):
    _fields_ = [("_ps_hash", ctypes.c_uint32), ("_ps_len", ctypes.c_uint32)]
    __slots__ = ()
    _ps_kind = "string"

    @staticmethod
    def _ps_validate(proxy, room):
        """Its length, checked once when the proxy is made: no read of its bytes goes past the map."""
        if F.STRING.size + proxy._ps_len > room:
            return f"its length {proxy._ps_len} runs past the end of the map"
        return None

    @classmethod
    def _ps_from_python(cls, heap, value, where):
        if isinstance(value, cls._ps_python_type):
            return new_string(heap, cls._ps_type_id, storable(cls._ps_type_id, value, where))
        return super()._ps_from_python(heap, value, where)

    @classmethod
    def _ps_check_python(cls, value, where):
        if not isinstance(value, cls._ps_python_type):
            super()._ps_check_python(value, where)

    def _ps_bytes(self):
        return ctypes.string_at(ctypes.addressof(self) + F.STRING.size, self._ps_len)

    def __bytes__(self):
        return self._ps_bytes()

    def _ps_prefix(self, limit):
        """``(the first `limit` characters or bytes of the value, whether it is longer)``, reading no more
        of the map than that needs (4 bytes a character at most)."""
        length = self._ps_len
        if self._ps_type_id != F.T_STRING:
            return ctypes.string_at(ctypes.addressof(self) + F.STRING.size, min(length, limit)), length > limit
        if length <= limit:
            return self.contents, False
        head = ctypes.string_at(ctypes.addressof(self) + F.STRING.size, min(length, 4 * limit + 4))
        text = head.decode("utf-8", "ignore")  # a character cut at the end is dropped
        return text[:limit], len(text) > limit or len(head) < length

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

    def __mul__(self, count):
        if not hasattr(type(count), "__index__"):
            return NotImplemented
        return self.contents * count

    __rmul__ = __mul__

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


def _plain(value):
    """``value`` with string proxies replaced by their values (also inside a tuple, as ``startswith`` takes)."""
    if isinstance(value, _PersistentString):
        return value.contents
    if type(value) is tuple:
        return tuple(map(_plain, value))
    return value


#: The special methods of ``str``/``bytes`` a string proxy takes from its value as they are (``+`` and
#: ``*`` are written out below, to answer NotImplemented to other types as binary operators should;
#: ``==``, ``<``, ``hash``, ``len``, ``bytes()``, ``str()`` it has already).
_OPERATORS = ("__mod__", "__rmod__", "__contains__", "__getitem__", "__iter__", "__format__")
#: Alternate constructors: ``ByteString.fromhex(...)`` would return plain bytes and read as if it made
#: a persistent string; ``p.schema.ByteString(bytes.fromhex(...))`` is the way.
_NOT_DELEGATED = frozenset({"fromhex"})


def _delegating(cls, name, impl, python):
    """A method of ``cls`` that calls ``impl(self.contents, ...)`` (string proxies among its arguments
    count as their values)."""
    contents = cls.contents.fget
    if name == "join":
        def method(self, iterable):
            return impl(contents(self), [_plain(item) for item in iterable])
    else:
        def method(self, *args, **kwargs):
            if args:
                args = tuple(map(_plain, args))
            if kwargs:
                kwargs = {key: _plain(value) for key, value in kwargs.items()}
            return impl(contents(self), *args, **kwargs)
    method.__name__ = name
    method.__qualname__ = f"{cls.__qualname__}.{name}"
    method.__module__ = cls.__module__
    method.__doc__ = (f"``s.{name}(...)`` is ``s.contents.{name}(...)``: see ``{python.__name__}.{name}``; "
                      f"the result is a plain Python value.")
    return method


def _delegate_methods(cls, python):
    """Give string proxy class ``cls`` every public method of ``python`` (``str`` or ``bytes``) and its
    operators, each calling the method of the value; once, at import.  A name that ``cls`` or a base
    already defines (``contents``, ``isSameAs``, ``__eq__``, ``__len__``...) is left alone."""
    taken = {name for klass in cls.__mro__ if klass is not object for name in vars(klass)}
    names = [name for name in vars(python) if not name.startswith("_")] + list(_OPERATORS)
    for name in names:
        if name in taken or name in _NOT_DELEGATED:
            continue
        raw = vars(python).get(name)
        if isinstance(raw, staticmethod):  # maketrans: does not use the value
            setattr(cls, name, staticmethod(getattr(python, name)))
        elif isinstance(raw, classmethod) or type(raw).__name__ == "classmethod_descriptor":
            continue
        else:
            setattr(cls, name, _delegating(cls, name, getattr(python, name), python))


class _ByteStringBase(_PersistentString):
    __slots__ = ()
    _ps_type_id = F.T_BYTESTRING
    _ps_python_type = (bytes, bytearray, memoryview)
    _ps_encode = staticmethod(bytes)

    @property
    def contents(self):
        """The value as ``bytes``."""
        return self._ps_bytes()

    def __len__(self):
        return self._ps_len

    def __str__(self):
        return str(self._ps_bytes())  # as str(bytes): "b'...'"

    def __add__(self, other):
        other = _plain(other)
        try:
            return self._ps_bytes() + other  # any bytes-like object, as for bytes
        except TypeError:
            return NotImplemented

    def __radd__(self, other):
        if isinstance(other, (bytes, bytearray)):
            return other + self._ps_bytes()
        return NotImplemented

    def __buffer__(self, flags=0):
        """A read-only, zero-copy memoryview of the stored bytes (PEP 688; format ``'B'``).

        The exporter holds this proxy, and the proxy holds the segment of
        the map it lives in (ctypes keeps the export of the segment it was
        made from), so the bytes stay mapped as long as any view made from
        it; the proxy also keeps the string from being freed.  The view is
        read-only even in a writable storage: strings are immutable, and
        their stored hash and interning depend on it.

        >>> from permastruct import Storage
        >>> p = Storage(None)
        >>> raw = p.schema.ByteString(b"Felix")
        >>> m = memoryview(raw)
        >>> m.readonly, m.tobytes(), bytearray(raw), b"-".join([raw, raw])
        (True, b'Felix', bytearray(b'Felix'), b'Felix-Felix')
        >>> m.release()
        """
        heap = type(self)._heap
        heap.storage._check_open()
        length = self._ps_len
        pin = heap.mapping.view(self._ps_oid, F.STRING.size + length)  # keeps the segment mapped
        exporter = MemoryExporter(ctypes.addressof(self) + F.STRING.size, length, 1, "B", (length,),
                                  readonly=True, keep=(self, pin))
        view = memoryview(exporter)
        heap.exported(view, self._ps_oid)  # (a rollback of its making quarantines its place)
        return view

    def __release_buffer__(self, view):
        try:
            view.release()
        except (BufferError, ValueError):  # still exported elsewhere: its holders release it
            pass


class _StringBase(_PersistentString):
    __slots__ = ()
    _ps_type_id = F.T_STRING
    _ps_python_type = str
    _ps_encode = staticmethod(lambda text: text.encode("utf-8"))

    @property
    def contents(self):
        """The value as ``str``."""
        try:
            return self._ps_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptStorageError(f"{type(self)._heap.name}: the String at {self._ps_offset:#x} is not "
                                      f"UTF-8 ({exc.reason} at byte {exc.start})") from None

    def __str__(self):
        return self.contents

    def __len__(self):
        return len(self.contents)

    def __add__(self, other):
        other = _plain(other)
        if isinstance(other, str):
            return self.contents + other
        return NotImplemented

    def __radd__(self, other):
        if isinstance(other, str):
            return other + self.contents
        return NotImplemented

    def __buffer__(self, flags=0):
        """Refused, as by ``str``: a ``String`` is text, not bytes (``bytes(s)`` gives its UTF-8)."""
        raise TypeError(f"a bytes-like object is required, not '{type(self).__name__}' "
                        "(a persistent String is text; bytes(s) gives its UTF-8)")


_delegate_methods(_ByteStringBase, bytes)
_delegate_methods(_StringBase, str)



class ByteString(_ByteStringBase):
    """An immutable persistent ``bytes`` value that acts like its value.

    >>> from permastruct import Storage
    >>> p = Storage(None)
    >>> s = p.schema.ByteString(b"Felix,Leiter")
    >>> s == b"Felix,Leiter", hash(s) == hash(b"Felix,Leiter"), len(s), s.contents
    (True, True, 12, b'Felix,Leiter')

    Every ``bytes`` method and operator works and returns plain ``bytes``
    (or what the ``bytes`` method returns):

    >>> s.split(b","), s.startswith(b"F"), s.decode(), s + b"!", b">" + s, s[:5], s[0], b"Lei" in s
    ([b'Felix', b'Leiter'], True, 'Felix,Leiter', b'Felix,Leiter!', b'>Felix,Leiter', b'Felix', 70, True)
    >>> bytes(s), bytearray(s), str(s), s.hex()[:6]
    (b'Felix,Leiter', bytearray(b'Felix,Leiter'), "b'Felix,Leiter'", '46656c')
    """

    __slots__ = ()


class String(_StringBase):
    """An immutable persistent ``str`` value (stored as UTF-8) that acts like its value.

    >>> from permastruct import Storage
    >>> p = Storage(None)
    >>> s = p.schema.String("Moneypenny")
    >>> s == "Moneypenny", str(s), len(s)
    (True, 'Moneypenny', 10)

    Every ``str`` method and operator works and returns plain ``str`` (or
    what the ``str`` method returns):

    >>> s.upper(), s + "!", "Miss " + s, f"[{s:>12}]", s * 2
    ('MONEYPENNY', 'Moneypenny!', 'Miss Moneypenny', '[  Moneypenny]', 'MoneypennyMoneypenny')
    >>> "penny" in s, s[1:3], list(s)[:3]
    (True, 'on', ['M', 'o', 'n'])
    >>> p.schema.String("%s is %d") % ("M", 60), s.replace("penny", "bags"), s.split("y")
    ('M is 60', 'Moneybags', ['Mone', 'penn', ''])
    """

    __slots__ = ()


class StringRegistry:
    """The interned strings of a storage: one persistent string per distinct value.

    A persistent open-addressing hash table (linear probing on the stored
    crc32); it doubles when half full.
    """

    def __init__(self, heap):
        self._heap = heap

    # The table object lives at the offset in the root record's registry slot.
    def _table(self):
        heap = self._heap
        heap.storage._check_open()
        offset = heap.pf.slots[F.SLOT_REGISTRY]
        heap.check_offset(offset, F.REGISTRY.size)
        try:
            type_id, _, count, capacity = F.REGISTRY.unpack_from(heap.mapping.view(offset, F.REGISTRY.size))
        except IndexError:  # not in one mapped segment
            type_id = capacity = 0
        if type_id != F.T_REGISTRY or capacity & (capacity - 1) or not capacity or count > capacity:
            raise CorruptStorageError(f"{heap!r}: the string registry at {offset:#x} is damaged")
        heap.check_offset(offset, F.REGISTRY.size + 8 * capacity)
        return offset, count, capacity

    def _entries(self, offset, capacity):
        try:
            return self._heap.mapping.view(offset + F.REGISTRY.size, capacity * 8).cast("Q")
        except IndexError:
            raise CorruptStorageError(f"{self._heap!r}: the string registry at {offset:#x} crosses the end "
                                      "of a mapped segment") from None

    def _find(self, type_id, data):
        """``(entry index, string offset or 0)`` for ``data`` of string type ``type_id``."""
        heap = self._heap
        offset, count, capacity = self._table()
        entries = self._entries(offset, capacity)
        want = F.string_hash(type_id, data)
        mask = capacity - 1
        index = want & mask
        equals = heap.string_equals  # bounded by the map: a damaged entry cannot read past it
        for _ in range(capacity):
            target = entries[index]
            if not target:
                return index, 0
            if equals(target, data):
                kind, _, stored_hash, _ = heap.string_header(target)
                if kind == type_id and stored_hash == want:
                    return index, target
            index = (index + 1) & mask
        raise CorruptStorageError(f"{heap!r}: the string registry is full without a free entry")

    @staticmethod
    def _key(value):
        if isinstance(value, str):
            return F.T_STRING, storable(F.T_STRING, value, "a stringRegistry entry")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return F.T_BYTESTRING, storable(F.T_BYTESTRING, value, "a stringRegistry entry")
        if isinstance(value, _PersistentString):
            return type(value)._ps_type_id, value._ps_bytes()
        raise TypeError(f"the string registry holds bytes and str, not {type(value).__name__}")

    def get(self, value):
        """The interned persistent string equal to ``value`` (``bytes`` or ``str``), created if new."""
        heap = self._heap
        type_id, data = self._key(value)
        index, target = self._find(type_id, data)
        if target:
            return heap.proxy(target)
        heap.check_writable()
        return heap.proxy(run_change(heap, self._add, heap, type_id, data, index))

    def _add(self, heap, type_id, data, index):
        """Intern a new string at entry ``index`` (one change); its offset."""
        target = new_string(heap, type_id, data, 1)
        offset, count, capacity = self._table()
        self._entries(offset, capacity)[index] = target
        count += 1
        F.UINT64.pack_into(heap.mapping.view(offset + 8, 8), 0, count)
        if count * 2 > capacity:
            self._resize(capacity * 2)
        return target

    def _resize(self, capacity):
        heap = self._heap
        old, count, old_capacity = self._table()
        targets = [t for t in self._entries(old, old_capacity) if t]
        new = heap.allocator.alloc(F.REGISTRY.size + capacity * 8)
        F.REGISTRY.pack_into(heap.mapping.view(new, F.REGISTRY.size), 0, F.T_REGISTRY, 1, count, capacity)
        entries = self._entries(new, capacity)
        mask = capacity - 1
        for target in targets:
            index = heap.string_header(target)[2] & mask
            while entries[index]:
                index = (index + 1) & mask
            entries[index] = target
        heap.pf.slots[F.SLOT_REGISTRY] = new
        heap.allocator.free(old)

    def __len__(self):
        return self._table()[1]

    def __contains__(self, value):
        try:
            type_id, data = self._key(value)
        except (TypeError, UnicodeEncodeError, OverflowError):  # (none can be in it)
            return False
        return bool(self._find(type_id, data)[1])

    def __iter__(self):
        offset, count, capacity = self._table()
        for target in list(self._entries(offset, capacity)):
            if target:
                yield self._heap.proxy(target)

    def __repr__(self):
        return f"<StringRegistry of {self._heap!r}: {len(self)} strings>"


def create_registry(heap, size):
    """Allocate an empty registry table for about ``size`` strings; return its offset."""
    capacity = 8
    while capacity < 2 * size:
        capacity *= 2
    offset = heap.allocator.alloc(F.REGISTRY.size + capacity * 8)
    F.REGISTRY.pack_into(heap.mapping.view(offset, F.REGISTRY.size), 0, F.T_REGISTRY, 1, 0, capacity)
    return offset


def new_string(heap, type_id, data, references=0):
    """The offset of a new string object holding ``data`` (bytes; UTF-8 for a String).

    With ``references=1`` the caller stores it at once (it is born with its
    one reference); with 0 it is unreferenced until stored (freed at the next
    commit if it never is).
    """
    length = len(data)
    if length >= 1 << 32:
        raise OverflowError(f"a persistent string holds at most 4 GiB, not {length} bytes")
    if not heap.writable:
        heap.check_writable()
    size = 16 + length  # F.STRING.size
    offset, view, local, _ = heap.allocator.place(size)
    _PACK_STRING(view, local, type_id, references,
                 _crc32(data, _STRING_SEED if type_id == F.T_STRING else _BYTES_SEED), length)
    view[local + 16:local + size] = data
    heap.created.add(offset)
    if not references:
        heap.unreferenced.add(offset)
    return offset


def new_strings(heap, type_id, datas, references=0):
    """``array('Q')`` of the offsets of new string objects holding ``datas`` (0 for a None).

    :func:`new_string` for many at once: strings of one length are placed
    side by side (``Allocator.place_many``) and written a slab page at a time,
    each field of the headers and the bytes in one strided slice assignment,
    the checksums in one ``map``.  Either every string is made or, when the
    store is full, none is.
    """
    if not heap.writable:
        heap.check_writable()
    count = len(datas)
    offsets = array("Q", bytes(8 * count))
    groups = {}  # length -> indices of the strings of that length (None: all of them, in order)
    lengths = None if None in datas else list(map(len, datas))
    if lengths is not None and (not lengths or min(lengths) == max(lengths)):
        groups = {lengths[0]: None} if lengths else {}
    else:
        for position, data in enumerate(datas):
            if data is not None:
                groups.setdefault(len(data), []).append(position)
    seed = _STRING_SEED if type_id == F.T_STRING else _BYTES_SEED
    made = []
    try:
        for length, positions in groups.items():
            if length > MAX_BYTES:
                raise OverflowError(f"a persistent string holds at most 4 GiB, not {length} bytes")
            group = datas if positions is None else [datas[i] for i in positions]
            if 16 + length > heap.allocator.max_small or length > 128:  # one at a time: the bytes dominate
                placed = [new_string(heap, type_id, data, references) for data in group]
                made.extend(placed)
            else:
                placed = _place_strings(heap, type_id, group, length, references, seed)
                made.extend(placed)
            if positions is None:
                offsets = placed if isinstance(placed, array) else array("Q", placed)
            else:
                for position, offset in zip(positions, placed):
                    offsets[position] = offset
    except Exception:
        for offset in made:  # given back: nothing refers to them (freed at the next commit)
            if references:
                heap.decref(offset)
        raise
    return offsets


def _place_strings(heap, type_id, group, length, references, seed):
    """The offsets (an array) of new strings of ``length`` bytes each holding ``group``, made together."""
    placement = heap.allocator.place_many(16 + length, len(group))
    columns = [(8, "I", memoryview(array("I", map(_crc32, group, repeat(seed)))))]
    word = next(size for size in (8, 4, 2, 1) if length % size == 0)
    if length:  # the bytes: one column per word of them
        code = {8: "Q", 4: "I", 2: "H", 1: "B"}[word]
        words = memoryview(b"".join(group)).cast(code)
        per = length // word
        columns.extend((16 + k * word, code, words[k::per]) for k in range(per))
    placement.write(F.STRING.pack(type_id, references, 0, length), columns)
    offsets = placement.offsets()
    heap.created_many.append(offsets)
    if not references:
        heap.unreferenced.update(offsets)
    return offsets
