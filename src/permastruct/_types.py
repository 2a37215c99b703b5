"""Persistent types: by-value number types, the proxy base class, closed proxies.

A *proxy* is a ``ctypes`` structure instance that lives in the mapped file
(``from_buffer``), so reading a by-value field is a C-level ``ctypes`` field
read.  Every object starts with the two header fields ``_ps_type`` and
``_ps_refs`` (see :mod:`permastruct._format`).  Proxy classes are created per
storage (the class knows its storage), once, when the schema is built.

Writes are checked in Python before they reach the map: ``ctypes`` itself
silently truncates integers that do not fit, which the contract forbids.
"""

import ctypes
import operator
import struct
import sys

from . import _format as F
from .errors import PermastructError, StorageClosedError

CStruct = ctypes.LittleEndianStructure
CMeta = type(CStruct)


# -- by-value types -------------------------------------------------------------
class ValueType:
    """A by-value field type (``Int``, ``Float``, ``Bool``, sized numbers).

    Value types describe fields; they cannot be instantiated on their own.
    """

    def __init__(self, name, type_id, ctype, kind, low=None, high=None, pack=None, code=None):
        self.__name__ = self.name = name
        #: struct code used by the write path (range and type checked in C); None for Bool
        self.code = code
        self.type_id = type_id
        self.ctype = ctype
        self.kind = kind  # "int", "float", "bool"
        self.low, self.high = low, high
        self.pack = pack

    def __repr__(self):
        return f"<permastruct value type {self.name}>"

    def __call__(self, *args, **kwargs):
        raise TypeError(f"{self.name} is a by-value type: it describes a field and cannot be "
                        "instantiated on its own")

    def checker(self, field, owner):
        """A function ``(value) -> value`` that validates a value for a field of this type."""
        name = self.name
        index = operator.index
        if self.kind == "int":
            low, high = self.low, self.high

            def check(value):
                if type(value) is not int:
                    if isinstance(value, float) or not hasattr(type(value), "__index__"):
                        raise TypeError(f"{owner}.{field} is {name}: expected an int, "
                                        f"not {type(value).__name__}")
                    value = index(value)
                if not low <= value <= high:
                    raise OverflowError(f"{owner}.{field} is {name}: {value} is outside "
                                        f"[{low}, {high}]")
                return value
        elif self.kind == "float":
            packer = self.pack

            def check(value):
                if type(value) is not float:
                    if isinstance(value, (str, bytes, bytearray)) or not (
                            hasattr(type(value), "__float__") or hasattr(type(value), "__index__")):
                        raise TypeError(f"{owner}.{field} is {name}: expected a float, "
                                        f"not {type(value).__name__}")
                    value = float(value)
                if packer is not None:
                    try:
                        packer(value)
                    except (OverflowError, struct.error) as exc:
                        raise OverflowError(f"{owner}.{field} is {name}: {value} does not fit") from exc
                return value
        else:
            def check(value):
                if value is True or value is False:
                    return value
                if type(value) is int and value in (0, 1):
                    return bool(value)
                raise TypeError(f"{owner}.{field} is {name}: expected a bool, not {type(value).__name__}")
        return check


def _int(name, type_id, ctype, bits, signed):
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    code = {8: "b", 16: "h", 32: "i", 64: "q"}[bits]
    return ValueType(name, type_id, ctype, "int", low, high, code=code if signed else code.upper())


Int = _int("Int", F.T_INT, ctypes.c_int64, 64, True)
Float = ValueType("Float", F.T_FLOAT, ctypes.c_double, "float", code="d")
Bool = ValueType("Bool", F.T_BOOL, ctypes.c_bool, "bool")
Int8 = _int("Int8", F.T_INT8, ctypes.c_int8, 8, True)
Int16 = _int("Int16", F.T_INT16, ctypes.c_int16, 16, True)
Int32 = _int("Int32", F.T_INT32, ctypes.c_int32, 32, True)
Int64 = _int("Int64", F.T_INT64, ctypes.c_int64, 64, True)
UInt8 = _int("UInt8", F.T_UINT8, ctypes.c_uint8, 8, False)
UInt16 = _int("UInt16", F.T_UINT16, ctypes.c_uint16, 16, False)
UInt32 = _int("UInt32", F.T_UINT32, ctypes.c_uint32, 32, False)
UInt64 = _int("UInt64", F.T_UINT64, ctypes.c_uint64, 64, False)
Float32 = ValueType("Float32", F.T_FLOAT32, ctypes.c_float, "float", pack=struct.Struct("<f").pack, code="f")
Float64 = ValueType("Float64", F.T_FLOAT64, ctypes.c_double, "float", code="d")

VALUE_TYPES = (Int, Float, Bool, Int8, Int16, Int32, Int64, UInt8, UInt16, UInt32, UInt64,
               Float32, Float64)
VALUE_TYPES_BY_ID = {t.type_id: t for t in VALUE_TYPES}


# -- proxies ---------------------------------------------------------------------
class PersistentMeta(CMeta):
    """Metaclass of proxy classes: calling a storage's class creates a persistent object."""

    def __call__(cls, *args, **kwargs):
        storage = cls._storage
        if storage is None:
            raise TypeError(f"{cls.__name__} is not bound to a storage: use p.schema.{cls.__name__}(...)")
        return storage._construct(cls, *args, **kwargs)


class Persistent(CStruct, metaclass=PersistentMeta):
    """Base class of every proxy: a view of a persistent object's header in the map."""

    _fields_ = [("_ps_type", ctypes.c_uint32), ("_ps_refs", ctypes.c_uint32)]
    __slots__ = ("__weakref__",)
    _storage = None
    _ps_type_id = 0
    _ps_kind = "abstract"
    _ps_closed = False  # True on the dead variants made by closed_class()

    @property
    def _ps_offset(self):
        return type(self)._storage._mapping.offset_of_address(ctypes.addressof(self))

    def isSameAs(self, other):
        """Whether ``other`` is a proxy of the same persistent object."""
        return (isinstance(other, Persistent) and type(other)._storage is type(self)._storage
                and ctypes.addressof(other) == ctypes.addressof(self))

    def __repr__(self):
        return f"<persistent {type(self).__name__} object @offset {self._ps_offset:#x}>"

    def __reduce_ex__(self, protocol):
        raise TypeError(f"persistent {type(self).__name__} objects cannot be pickled; "
                        "copy the values you need")


# Special methods that a closed proxy must refuse (the interpreter looks them up
# on the type, bypassing __getattribute__).
_GUARDED = ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__len__",
            "__iter__", "__reversed__", "__contains__", "__getitem__", "__setitem__", "__delitem__",
            "__bytes__", "__str__", "__bool__", "__int__", "__float__", "__index__", "__buffer__",
            "__format__", "__call__", "__enter__", "__exit__", "__fspath__")


def closed_class(cls, rolled_back=False):
    """The variant of proxy class ``cls`` that proxies are switched to when they die.

    At ``close()`` every proxy of the storage dies; at ``rollback()`` the
    proxies of objects created in the rolled-back transaction do.
    """
    cache = cls.__dict__.get("_ps_dead_classes")
    if cache is None:
        cache = {}
        cls._ps_dead_classes = cache
    if rolled_back in cache:
        return cache[rolled_back]
    storage_name = repr(cls._storage)
    if rolled_back:
        error, message = PermastructError, (
            f"this persistent {cls.__name__} object was created in a transaction of {storage_name} "
            "that was rolled back; it no longer exists")
    else:
        error, message = StorageClosedError, (
            f"{storage_name} is closed: this persistent {cls.__name__} object can no longer be used")

    def refuse(self, *args, **kwargs):
        raise error(message)

    def closed_repr(self):
        return f"<dead persistent {cls.__name__} object of {storage_name}>"

    namespace = {"__slots__": (), "__getattribute__": refuse, "__setattr__": refuse,
                 "__delattr__": refuse, "__repr__": closed_repr, "_ps_closed": True}
    for name in _GUARDED:
        if any(name in vars(base) for base in cls.__mro__[:-1]):
            namespace[name] = refuse
    if "__hash__" in namespace:
        namespace["__hash__"] = refuse
    bases = (cls,)
    if BufferExporter is not None:
        # Below 3.12 a ctypes instance exports its own bytes through a C slot
        # that __getattribute__ cannot stop; the exporter slot, first in the
        # MRO, refuses closed proxies instead (the caller sees a SystemError).
        bases = (BufferExporter, getattr(cls, "_ps_plain_base", cls))
    closed = PersistentMeta(("rolled-back " if rolled_back else "closed ") + cls.__name__, bases, namespace)
    closed.__qualname__ = f"closed {cls.__qualname__}"
    cache[rolled_back] = closed
    return closed


# -- the buffer protocol below Python 3.12 ------------------------------------------
def _make_exporter():
    """A base class whose C-level buffer slot calls ``obj.__buffer__(flags)`` (PEP 688 for 3.10/3.11).

    Python 3.12 calls ``__buffer__`` itself.  Below 3.12 a heap type is built
    with ``PyType_FromSpecWithBases`` whose ``bf_getbuffer`` slot is a ctypes
    callback that fills the caller's ``Py_buffer`` from the memoryview that
    ``__buffer__`` returns.  A callback cannot raise, so it returns -1 with
    the exception reported as unraisable only when ``__buffer__`` fails, which
    the proxies avoid by checking first (closed proxies are not exporters).
    """
    if sys.version_info >= (3, 12):
        return None

    class Slot(ctypes.Structure):
        _fields_ = [("slot", ctypes.c_int), ("pfunc", ctypes.c_void_p)]

    class Spec(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("basicsize", ctypes.c_int), ("itemsize", ctypes.c_int),
                    ("flags", ctypes.c_uint), ("slots", ctypes.POINTER(Slot))]

    get_buffer = ctypes.pythonapi.PyObject_GetBuffer
    get_buffer.argtypes = (ctypes.py_object, ctypes.c_void_p, ctypes.c_int)
    get_buffer.restype = ctypes.c_int

    def getbuffer(obj, view, flags):
        try:
            if getattr(type(obj), "_ps_closed", False):
                return -1
            return get_buffer(obj.__buffer__(flags), view, flags)
        except BaseException:  # a C callback must not raise; the caller sees the failure
            return -1

    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_void_p, ctypes.c_int)(getbuffer)
    py_bf_getbuffer = 1
    slots = (Slot * 2)(Slot(py_bf_getbuffer, ctypes.cast(callback, ctypes.c_void_p)), Slot(0, None))
    name = b"permastruct.BufferExporter"
    tp_flags_default, tp_flags_basetype = 1 << 18, 1 << 10
    spec = Spec(name, 0, 0, tp_flags_default | tp_flags_basetype, slots)
    from_spec = ctypes.pythonapi.PyType_FromSpecWithBases
    from_spec.argtypes = (ctypes.POINTER(Spec), ctypes.py_object)
    from_spec.restype = ctypes.py_object
    exporter = from_spec(ctypes.byref(spec), (object,))
    exporter._ps_keep_alive = (callback, slots, spec, name, getbuffer)
    return exporter


BufferExporter = _make_exporter()
