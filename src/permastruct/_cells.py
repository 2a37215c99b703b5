"""Cells: how one element, key or value of a collection is stored in 8 bytes.

Every element of a ``List``, every key and value of a ``Dict``, ``Set`` or
``SortedDict`` is one 8-byte cell (layout in :mod:`permastruct._format`):
signed integers and ``Bool`` as int64, unsigned integers as uint64, floats as
a double (``Float32`` values rounded to single precision first), and
by-reference types as the uint64 offset of the object (0 is ``None``).

:class:`Cell` turns Python values into cells and back for one field type
(``encode`` validates and may create a persistent object; ``decode`` is None
when the cell already is the Python value).  :class:`Key` adds what a key
needs: the stored hash (a fixed function of the key, never ``hash()``),
normalising a lookup key the way ``dict`` would find it, and a comparable form
for the B+tree.  A lookup key that cannot be present raises :class:`Missing`.
"""

import numbers
import operator
import struct
from zlib import crc32 as _crc32

from . import _format as F
from . import _types as T
from .errors import SchemaError
from .strings import MAX_BYTES, new_string, storable


class Missing(Exception):
    """A lookup key that cannot be in the collection (wrong type or value)."""


def unhashable(key):
    if type(key).__hash__ is None:
        raise TypeError(f"unhashable type: '{type(key).__name__}'")



# -- cells: how one element type is stored in 8 bytes ------------------------------------
class Cell:
    """Encoding of values of field type ``ftype`` in an 8-byte cell.

    ``encode(value)`` validates (``TypeError``/``OverflowError``) and returns
    the cell; for by-reference types it may create a new persistent object
    (the caller increfs it once it is stored).  ``decode`` is None when the
    cell already is the Python value.
    """

    def __init__(self, heap, ftype, owner, role):
        self.type = ftype
        self.is_ref = not isinstance(ftype, T.ValueType)
        #: every cell is a valid value and the struct code converts exactly like ``encode``
        #: (Int, Int64, UInt64, Float, Float64): cells may be written in bulk, or through a buffer
        self.raw = not self.is_ref and (
            (ftype.kind == "float" and ftype.pack is None)
            or (ftype.kind == "int" and (ftype.low, ftype.high) in ((-1 << 63, (1 << 63) - 1), (0, (1 << 64) - 1))))
        where = self.where = f"{owner} {role}"
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


class Key(Cell):
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
        """``key`` as the stored Python number, or Missing.

        Keys of a Float type are the keys a ``dict`` would find: an int equal
        to the stored double (an int no double equals, like 2**53 + 1, is never
        stored: see :meth:`store`).  Keys of a Float32 type are looked up as
        they are stored, rounded to single precision, so ``d[0.1] = 1; d[0.1]``
        finds what it stored (0.1 has no exact Float32 value).
        """
        kind = self.number_kind
        if not (type(key) is bool or isinstance(key, (int, float))):
            if hasattr(type(key), "__index__"):  # numpy's integers and the like, as store() takes them
                key = operator.index(key)
            elif isinstance(key, numbers.Real):  # numpy's floats, Fraction: found where a dict finds them
                try:
                    as_float = float(key)
                except (OverflowError, ValueError):
                    raise Missing from None
                if as_float != key:
                    raise Missing
                key = as_float
            else:
                raise Missing
        if kind == "float":
            try:
                value = float(key)
            except OverflowError:
                raise Missing from None
            if value != value:  # NaN is never a key
                raise Missing
            if self.f32 is not None:
                try:
                    value = struct.unpack("<f", self.f32(value))[0]
                except (OverflowError, struct.error):
                    raise Missing from None
            elif value != key:  # an int no double equals (2**53 + 1)
                raise Missing
            return value
        if isinstance(key, float):
            if not key.is_integer():
                raise Missing
            key = int(key)
        key = int(key)
        if kind == "bool":
            if key not in (0, 1):
                raise Missing
            return key
        if not self.low <= key <= self.high:
            raise Missing
        return key

    # -- the three ways a key arrives --
    def lookup(self, key):
        """``(hash, data)`` for a lookup; raises Missing if ``key`` cannot be present."""
        kind = type(key)
        if kind is self.exact:  # the common case first: bytes, str or int
            if kind is bytes:
                return _crc32(key, F.BYTES_SEED), key  # F.string_hash, inline
            if kind is str:
                try:
                    data = key.encode("utf-8")
                except UnicodeEncodeError:
                    raise Missing from None
                return F.string_hash(F.T_STRING, data), data
            if self.low <= key <= self.high:
                return F.number_hash(key), key
        unhashable(key)
        if not self.is_ref:
            value = self._number(key)
            return F.number_hash(value), value
        if isinstance(key, T.Persistent):
            if type(key)._ps_kind != "string" or type(key)._ps_type_id != self.string_type:
                raise Missing
            return key._ps_hash, key._ps_bytes()
        if not isinstance(key, self.python):
            raise Missing
        try:
            data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        except UnicodeEncodeError:  # a lone surrogate: no stored String can hold it
            raise Missing from None
        return F.string_hash(self.string_type, data), data

    def store(self, key):
        """``(hash, data)`` for a key about to be stored: TypeError/OverflowError/ValueError if it cannot be."""
        if type(key) is bytes and self.exact is bytes and len(key) <= MAX_BYTES:  # the common case first
            return _crc32(key, F.BYTES_SEED), key
        unhashable(key)
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
        try:
            data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        except UnicodeEncodeError:
            data = None
        if data is None or len(data) > MAX_BYTES:  # a lone surrogate, over 4 GiB: the error that says where
            storable(self.string_type, key, self.where)
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
        except Missing:
            raise TypeError(f"'<' not supported between a {self.type.__name__} key and "
                            f"{type(key).__name__}") from None


def value_checker(heap, ftype, where):
    """Validate a by-reference value without creating anything."""
    def check(value):
        if value is None:
            return
        if isinstance(value, T.Persistent):
            heap.reference_check(ftype, value, where)
            return
        ftype._ps_check_python(value, where)
    return check
