"""Persistent types: by-value number types, the proxy base class, closed proxies.

A *proxy* is a ``ctypes`` structure instance over its object's bytes in the
mapped file (``from_address``: the heap keeps the map in place while the
storage is open), so reading a by-value field is a C-level ``ctypes`` field
read.  Every object starts with the two header fields ``_ps_type`` and
``_ps_refs`` (see :mod:`permastruct._format`).  Proxy classes are created per
storage (the class knows its heap), once, when the schema is built; closing
the storage makes every one of them refuse use (``refuse_all``).

Writes are checked in Python before they reach the map: ``ctypes`` itself
silently truncates integers that do not fit, which the contract forbids.
"""

import ctypes
import dis
import functools
import operator
import struct
import sys
import threading

from . import _format as F
from .errors import ConcurrentUseError, CorruptStorageError, DeadProxyError, StorageClosedError

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
                    try:
                        value = index(value)
                    except Exception as exc:  # (its own __index__ failed: say where)
                        error = _converting(exc, f"{owner}.{field}", name, value, "int")
                        if error is None:
                            raise
                        raise error from exc
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
                    try:
                        value = float(value)
                    except Exception as exc:  # (an int past the doubles, its own __float__ failed)
                        error = _converting(exc, f"{owner}.{field}", name, value, "float")
                        if error is None:
                            raise
                        raise error from exc
                if packer is not None:
                    try:
                        packer(value)
                    except (OverflowError, struct.error) as exc:
                        raise OverflowError(f"{owner}.{field} is {name}: {_short(value)} does not fit") from exc
                return value
        else:
            def check(value):
                if value is True or value is False:
                    return value
                if type(value) is int and value in (0, 1):
                    return bool(value)
                raise TypeError(f"{owner}.{field} is {name}: expected a bool, not {type(value).__name__}")
        return check


def _short(value):
    """``repr(value)``, cut to about 60 characters (an int of a thousand digits, say)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-12:]} ({len(text)} characters)"


def _converting(exc, where, type_name, value, to):
    """An exception of the family of ``exc`` (raised converting ``value`` to an int or a float for
    ``where``) that says where and what; None for another kind (raised as it is)."""
    family = next((cls for cls in (OverflowError, TypeError, ValueError, ArithmeticError) if isinstance(exc, cls)), None)
    if family is None:
        return None
    return family(f"{where} is {type_name}: {_short(value)} (of type {type(value).__name__}) has no {to} value ({exc})")


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


# -- changes: one at a time, and never half of one committed -----------------------
#
# A change to a storage's objects (a collection method, setting a reference
# field, making an object) is a sequence of writes that only together leave
# the file consistent.  ``storage._changing`` holds the id of the thread that
# is in the middle of one (0: none); calls nested inside it (a Dict insert
# that makes its key string) pass through.  A change that ends with an
# ordinary exception (TypeError, KeyError, a full disk...) has left things as
# they were, by the contract of every change; one that is cut short by an
# exception that can strike anywhere (KeyboardInterrupt from a signal,
# MemoryError, RecursionError) leaves ``_changing`` set: the storage then
# refuses to commit until ``rollback()`` (IncompleteChangeError), and a second
# thread that starts a change meanwhile gets ConcurrentUseError.

_get_ident = threading.get_ident
#: Exceptions that can strike in the middle of anything: a change they cut short is half done.
_CUT_SHORT = (MemoryError, RecursionError)


def _concurrent(storage):
    return ConcurrentUseError(
        f"{storage!r} is in the middle of a change made by another thread (or one that was "
        "cut short there): a storage and its objects belong to one thread at a time; use a "
        "lock around its use, or a storage per thread")


def begin_change(storage):
    """Enter a change of ``storage``; False if one is running in this thread (a nested call)."""
    changing = storage._changing
    if changing:
        if changing != _get_ident():
            raise _concurrent(storage)
        return False
    storage._changing = _get_ident()
    return True


def end_change(storage, exc):
    """Leave a change (``exc``: the exception it ended with, or None)."""
    if exc is None or not isinstance(exc, _CUT_SHORT):
        storage._changing = 0


# change() and run_change() are begin_change/end_change written out: they are
# on the path of every append and insert, where a call more is felt.

def change(method):
    """Decorate a proxy method that changes its storage (see above); done once per class.

    The wrapper is generated with the method's own parameters, so a call passes
    its arguments on as they came (a ``*args, **kwargs`` wrapper packed and
    unpacked them: more than half of its cost on an ``append``).
    """
    wrapper = _signature_wrapper(method, _CHANGE_TEMPLATE)
    if wrapper is None:
        wrapper = _general_change(method)
    return functools.wraps(method)(wrapper)


_CHANGE_TEMPLATE = """\
def changing({parameters}):
    _ps_storage = _ps_type({first})._heap
    if _ps_storage._changing:
        if _ps_storage._changing != _ps_ident():
            raise _ps_concurrent(_ps_storage)
        return _ps_method({arguments})
    _ps_storage._changing = _ps_ident()
    try:
        _ps_result = _ps_method({arguments})
    except _ps_Exception as _ps_error:
        if not _ps_isinstance(_ps_error, _ps_CUT_SHORT):
            _ps_storage._changing = 0
        raise
    _ps_storage._changing = 0
    return _ps_result
"""


def _signature_wrapper(method, template):
    """``template`` (the source of a function ``changing`` with ``{parameters}``, ``{arguments}`` and
    ``{first}``, the proxy) made for ``method``'s parameters; None for a signature it cannot copy (no
    first positional parameter, a parameter name starting with ``_ps_``)."""
    import inspect

    signature = inspect.signature(method)
    names = list(signature.parameters)
    if not names or signature.parameters[names[0]].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                                 inspect.Parameter.POSITIONAL_OR_KEYWORD) \
            or any(name.startswith("_ps_") for name in names):
        return None
    env = {"_ps_method": method, "_ps_type": type, "_ps_ident": _get_ident, "_ps_concurrent": _concurrent,
           "_ps_Exception": Exception, "_ps_isinstance": isinstance, "_ps_CUT_SHORT": _CUT_SHORT,
           "__builtins__": {}}
    parameters, arguments, positional_only, star = [], [], False, False
    for name, parameter in signature.parameters.items():
        kind = parameter.kind
        text = name
        if parameter.default is not parameter.empty:
            env[f"_ps_default_{name}"] = parameter.default
            text += f"=_ps_default_{name}"
        if kind is parameter.POSITIONAL_ONLY:
            positional_only = True
        elif positional_only:
            parameters.append("/")
            positional_only = False
        if kind is parameter.VAR_POSITIONAL:
            parameters.append("*" + name)
            arguments.append("*" + name)
            star = True
            continue
        if kind is parameter.VAR_KEYWORD:
            parameters.append("**" + name)
            arguments.append("**" + name)
            continue
        if kind is parameter.KEYWORD_ONLY:
            if not star:
                parameters.append("*")
                star = True
            parameters.append(text)
            arguments.append(f"{name}={name}")
            continue
        parameters.append(text)
        arguments.append(name)
    if positional_only:
        parameters.append("/")
    source = template.format(parameters=", ".join(parameters), arguments=", ".join(arguments), first=names[0])
    code = _WRAPPER_CODE.get(source)
    if code is None:  # compiled once per signature (every reference field's setter has the same one)
        code = _WRAPPER_CODE[source] = compile(source, "<change wrapper>", "exec")
    exec(code, env)
    return env["changing"]


#: source -> code object of the wrappers :func:`_signature_wrapper` made so far
_WRAPPER_CODE = {}


def _general_change(method):
    """The wrapper of a method whose signature :func:`_signature_wrapper` cannot copy (none today)."""
    def changing(self, *args, **kwargs):
        return run_change(type(self)._heap, method, self, *args, **kwargs)
    return changing


def run_change(storage, function, *args, **kwargs):
    """Call ``function(*args, **kwargs)`` as one change of ``storage`` (see :func:`change`)."""
    if storage._changing:
        if storage._changing != _get_ident():
            raise _concurrent(storage)
        return function(*args, **kwargs)
    storage._changing = _get_ident()
    try:
        result = function(*args, **kwargs)
    except Exception as exc:
        if not isinstance(exc, _CUT_SHORT):
            storage._changing = 0
        raise
    storage._changing = 0
    return result


def storage_change(method):
    """:func:`change` for the storage's own methods that change objects (making one)."""
    @functools.wraps(method)
    def changing(storage, *args, **kwargs):
        return run_change(storage, method, storage, *args, **kwargs)
    return changing


# -- the buffer protocol through ctypes ------------------------------------------------
#
# Two heap types are built with ``PyType_FromSpecWithBases`` whose
# ``bf_getbuffer`` slot is a ctypes callback:
#
# * ``MemoryExporter`` (every version) fills the caller's ``Py_buffer`` by hand
#   with memory it describes: an address, a format, a shape, C-contiguous
#   strides.  ``view->obj`` is a new reference to the exporter itself, and the
#   exporter holds whatever keeps the memory valid (for a persistent Buffer: the
#   proxy and a memoryview of the object's bytes in the map, which pins the
#   mmap).  ``PyBuffer_Release`` drops that reference exactly once per export,
#   so the exporter - and the map - live as long as the last view made from
#   it.  No ``bf_releasebuffer`` is needed.
# * ``BufferExporter`` (below 3.12 only) gives proxies PEP 688: its slot calls
#   ``obj.__buffer__(flags)`` and forwards to ``PyObject_GetBuffer`` of the
#   memoryview returned.  Python 3.12 calls ``__buffer__`` itself.
#
# A ctypes callback cannot raise: an exception escaping it is printed and
# swallowed, and ``PyErr_SetString`` through ``ctypes.pythonapi`` is no way out
# either, because ctypes turns the error it sets into a Python exception at
# once, inside the callback.  So a failing callback returns ``_failed(exc)``:
# an ``int`` subclass worth -1 that holds a memoryview of a one-off exception
# class (a subclass of ``type(exc)`` whose ``__new__`` returns ``exc``).  The
# metaclass of that class exports a zero-length buffer and has the C function
# ``PyErr_SetNone`` as its ``bf_releasebuffer``.  ctypes converts the returned
# -1 for the C caller and then drops the last reference to it; dropping it
# releases the memoryview, which calls ``PyErr_SetNone(exception class)`` -
# with the GIL held, in C, after the Python code of the callback has returned.
# The caller gets -1 with the exception set: ``exc`` itself.  The mechanism is
# checked once at import; if it ever does not work, callbacks return a plain -1
# and the caller sees a SystemError instead (still an exception, never a crash).

PyBUF_WRITABLE = 0x0001
PyBUF_FORMAT = 0x0004
PyBUF_ND = 0x0008
PyBUF_STRIDES = 0x0010 | PyBUF_ND
PyBUF_F_CONTIGUOUS = 0x0040 | PyBUF_STRIDES
PyBUF_FULL_RO = 0x0100 | PyBUF_STRIDES | PyBUF_FORMAT
PyBUF_MAX_NDIM = 64


class PyBuffer(ctypes.Structure):
    """``Py_buffer`` (Include/pybuffer.h, unchanged since Python 3.3)."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_void_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


class _Slot(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_int), ("pfunc", ctypes.c_void_p)]


class _Spec(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("basicsize", ctypes.c_int), ("itemsize", ctypes.c_int),
                ("flags", ctypes.c_uint), ("slots", ctypes.POINTER(_Slot))]


_PY_BF_GETBUFFER, _PY_BF_RELEASEBUFFER = 1, 2
_TPFLAGS_BASETYPE, _TPFLAGS_DEFAULT = 1 << 10, 1 << 18
# Private prototypes: setting argtypes on ctypes.pythonapi.X would change them for everyone.
_GETBUFFER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_void_p, ctypes.c_int)
_from_spec = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.POINTER(_Spec), ctypes.py_object)(
    ("PyType_FromSpecWithBases", ctypes.pythonapi))
_get_buffer = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_void_p, ctypes.c_int)(
    ("PyObject_GetBuffer", ctypes.pythonapi))
_incref = ctypes.PYFUNCTYPE(None, ctypes.py_object)(("Py_IncRef", ctypes.pythonapi))
_decref = ctypes.PYFUNCTYPE(None, ctypes.py_object)(("Py_DecRef", ctypes.pythonapi))
_PyErr_SetNone = ctypes.cast(ctypes.pythonapi.PyErr_SetNone, ctypes.c_void_p).value

#: What the heap types point to (names, slot tables, callbacks): kept for the life of the process.
_KEEP_ALIVE = []


def _heap_type(name, slots, bases):
    """A heap type made by ``PyType_FromSpecWithBases``; ``slots`` maps slot ids to C addresses."""
    table = (_Slot * (len(slots) + 1))(*[_Slot(slot, address) for slot, address in slots.items()],
                                       _Slot(0, None))
    spec = _Spec(name, 0, 0, _TPFLAGS_DEFAULT | _TPFLAGS_BASETYPE, table)
    new_type = _from_spec(ctypes.byref(spec), tuple(bases))
    _KEEP_ALIVE.append((name, table, spec))  # tp_name points into `name` below 3.12
    return new_type


def _shielded(function):
    """``function`` made to take no signal at its first instruction (CPython 3.11 and 3.12); returns it.

    A C slot implemented by a Python callback must return -1 with an
    exception set, or 0 with the ``Py_buffer`` filled in.  Its ``try`` covers
    every instruction but the first: CPython runs pending signal handlers
    (a ``KeyboardInterrupt`` from Ctrl-C or an alarm) at the ``RESUME`` that
    starts a function.  An exception raised there leaves the callback before
    it runs; ``ctypes`` then reports it as unraisable and returns whatever
    its return slot held - often 0, "filled in" - and the caller reads an
    unfilled ``Py_buffer``: a crash.  ``RESUME`` with argument 2 (as after a
    ``yield from``) starts the function the same way without that check, so
    a pending signal is handled at the first call inside the ``try``, which
    turns it into the -1 its caller expects.  Other versions: unchanged.
    """
    if sys.implementation.name != "cpython" or sys.version_info[:2] not in ((3, 11), (3, 12)):
        return function
    code = function.__code__
    raw = bytearray(code.co_code)
    at = _first_resume(raw)
    if at is not None and raw[at + 1] == 0:
        raw[at + 1] = 2
        function.__code__ = code.replace(co_code=bytes(raw))
    return function


def _first_resume(raw):
    """The offset of the RESUME that starts code ``raw`` (after the cell set-up before it), or None."""
    resume = dis.opmap["RESUME"]
    before = {dis.opmap[name] for name in ("MAKE_CELL", "COPY_FREE_VARS") if name in dis.opmap}
    for at in range(0, len(raw), 2):
        if raw[at] == resume:
            return at
        if raw[at] not in before:
            return None
    return None


def _callback(function):
    """The C address of a ``bf_getbuffer`` slot calling ``function`` (kept alive; see :func:`_shielded`)."""
    callback = _GETBUFFER(_shielded(function))
    _KEEP_ALIVE.append((function, callback))
    return ctypes.cast(callback, ctypes.c_void_p).value


# -- delivering an exception from a callback --
_EMPTY_SHAPE = (ctypes.c_ssize_t * 1)(0)
_BYTE_STRIDES = (ctypes.c_ssize_t * 1)(1)
_BYTE_FORMAT = ctypes.create_string_buffer(b"B")
_NO_BYTES = ctypes.create_string_buffer(1)


def _export_nothing(obj, view, flags):
    """bf_getbuffer of the exception-carrier metaclass: a zero-length, read-only buffer."""
    try:
        target = PyBuffer.from_address(view)
        target.obj = None
        target.buf = ctypes.addressof(_NO_BYTES)
        target.len, target.itemsize, target.readonly, target.ndim = 0, 1, 1, 1
        target.format = ctypes.addressof(_BYTE_FORMAT)
        target.shape = ctypes.addressof(_EMPTY_SHAPE)
        target.strides = ctypes.addressof(_BYTE_STRIDES)
        target.suboffsets = target.internal = None
        _incref(obj)
        target.obj = id(obj)
        return 0
    except BaseException:  # pragma: no cover - out of memory; a callback must never raise
        return -1


_CarrierMeta = _heap_type(b"permastruct._types.ExceptionCarrierMeta",
                          {_PY_BF_GETBUFFER: _callback(_export_nothing),
                           _PY_BF_RELEASEBUFFER: _PyErr_SetNone}, (type,))


class _Failure(int):
    """-1 for the C caller of a callback; dropping it sets the exception it carries (see above)."""


_deliver_exceptions = True  # cleared if the check at import fails


@_shielded  # (called from the callbacks' except clauses: see _shielded)
def _failed(exc):
    """The value a buffer callback returns when it failed with ``exc``: -1, with ``exc`` set when it is dropped.

    Only the caller of the callback may hold the result: return it at once.
    """
    if not _deliver_exceptions:
        return -1
    try:
        if exc.__traceback__ is not None:  # drop the callback's own frame (its object, a stale view address)
            exc.__traceback__ = exc.__traceback__.tb_next
        base = type(exc)
        try:
            carrier = _CarrierMeta(base.__name__, (base,), {
                "__new__": lambda cls, *args, **kwargs: exc, "__module__": base.__module__,
                "__qualname__": base.__qualname__})
        except Exception:  # a final or oddly built exception class: carry it in a BufferError
            carrier = _CarrierMeta("BufferError", (BufferError,), {
                "__new__": lambda cls, *args, **kwargs: exc, "__module__": "builtins"})
        result = _Failure(-1)
        result.carrier = memoryview(carrier)
        try:
            return result
        finally:  # no frame kept by a tracer or debugger may hold it: only the caller
            del result
    except BaseException:  # pragma: no cover - out of memory: the caller sees a SystemError
        return -1


def _check_delivery():
    """Whether a callback's exception reaches the caller (False: the caller gets a SystemError)."""
    class Probe(Exception):
        pass

    def fail(obj, view, flags):
        try:
            raise Probe("probe")
        except BaseException as exc:
            return _failed(exc)

    probe_type = _heap_type(b"permastruct._types.DeliveryProbe", {_PY_BF_GETBUFFER: _callback(fail)}, (object,))
    try:
        memoryview(probe_type())
    except Probe:
        return True
    except BaseException:
        return False
    return False


_deliver_exceptions = _check_delivery()


# -- MemoryExporter: a hand-filled Py_buffer --
_PY_BUFFER = struct.Struct("@PPnniiPPPPP")  # the fields of PyBuffer, in one go
assert _PY_BUFFER.size == ctypes.sizeof(PyBuffer)
_OBJ_AT = PyBuffer.obj.offset
_ASKS_EVERYTHING = PyBUF_STRIDES | PyBUF_FORMAT  # what the template answers as it is (ND is in STRIDES)
_memmove = ctypes.memmove
_LAYOUTS = {}  # (ndim, format length) -> struct.Struct of a MemoryExporter's block
_pointer_at = ctypes.c_void_p.from_address


def _export_memory(obj, view, flags):
    """bf_getbuffer of MemoryExporter: copy ``obj``'s filled-in Py_buffer to ``view``; ``view->obj`` = ``obj``."""
    referenced = False
    try:
        template, readonly, fortran = obj._ps_info
        if readonly and flags & PyBUF_WRITABLE:
            raise BufferError("the exported memory is read-only")
        if (flags & PyBUF_F_CONTIGUOUS) == PyBUF_F_CONTIGUOUS and not fortran:
            raise BufferError("the exported memory is C-contiguous, not Fortran contiguous")
        _memmove(view, template, _PY_BUFFER.size)  # view->obj is NULL in the template
        if flags & _ASKS_EVERYTHING != _ASKS_EVERYTHING:
            target = PyBuffer.from_address(view)
            if not flags & PyBUF_ND:  # a consumer that asks for no shape gets the bytes as one dimension
                target.ndim = 1
                target.shape = None
            if (flags & PyBUF_STRIDES) != PyBUF_STRIDES:
                target.strides = None
            if not flags & PyBUF_FORMAT:
                target.format = None
        _incref(obj)
        referenced = True
        _pointer_at(view + _OBJ_AT).value = id(obj)
        return 0
    except BaseException as exc:
        try:
            _pointer_at(view + _OBJ_AT).value = None  # as the protocol wants it on failure
            if referenced:  # interrupted (KeyboardInterrupt) after the reference was taken
                _decref(obj)
        except BaseException:  # pragma: no cover
            pass
        return _failed(exc)


_MemoryExporterBase = _heap_type(b"permastruct._types.MemoryExporterBase",
                                 {_PY_BF_GETBUFFER: _callback(_export_memory)}, (object,))


class MemoryExporter(_MemoryExporterBase):
    """Exports ``nbytes`` at ``address`` through the buffer protocol, described by hand.

    ``memoryview(MemoryExporter(...))`` has the given ``format`` (any struct
    or PEP 3118 string, e.g. ``'<d'``, ``'T{<i:a:<d:b:}'``), ``itemsize``,
    ``shape`` (zero extents and ``()`` allowed), C-contiguous strides and
    ``readonly``; nothing is copied.  ``keep`` is held as long as the exporter,
    and the exporter as long as any view made from it: it must keep the memory
    valid.  The exporter is immutable: views point at the format, shape and
    strides it holds.

    >>> import ctypes
    >>> data = bytearray(b"\\x00\\x01\\x00\\x02\\x00\\x03")
    >>> pin = memoryview(data)
    >>> address = ctypes.addressof(ctypes.c_char.from_buffer(data))
    >>> m = memoryview(MemoryExporter(address, 6, 2, ">H", (3,), readonly=True, keep=pin))
    >>> m.format, m.shape, m.strides, m.readonly, m.cast("B").tolist()
    ('>H', (3,), (2,), True, [0, 1, 0, 2, 0, 3])
    >>> m.release(); pin.release()
    """

    __slots__ = ("_ps_info", "_ps_block", "_ps_keep", "__weakref__")

    def __new__(cls, address, nbytes, itemsize, format, shape, readonly, keep):
        if isinstance(format, str):
            format = format.encode("ascii")
        shape = tuple(map(operator.index, shape))
        ndim = len(shape)
        if not address:
            raise ValueError("the address of exported memory must not be NULL")
        if b"\0" in format:
            raise ValueError(f"buffer format {format!r} contains a NUL byte")
        if ndim > PyBUF_MAX_NDIM:
            raise ValueError(f"a buffer has at most {PyBUF_MAX_NDIM} dimensions, not {ndim}")
        if itemsize < 0 or nbytes < 0 or (shape and min(shape) < 0):
            raise ValueError(f"negative size in itemsize {itemsize}, nbytes {nbytes} or shape {shape}")
        count, long_axes = 1, 0
        for extent in shape:
            count *= extent
            long_axes += extent > 1
        if count * itemsize != nbytes:
            raise ValueError(f"shape {shape} of {itemsize}-byte items is not {nbytes} bytes")
        strides = [itemsize] * ndim
        for axis in range(ndim - 2, -1, -1):  # C order, as CPython and numpy compute them
            strides[axis] = strides[axis + 1] * shape[axis + 1]
        if nbytes > sys.maxsize or (ndim and max(max(shape), strides[0]) > sys.maxsize):
            raise ValueError(f"shape {shape} of {itemsize}-byte items does not fit in a Py_ssize_t")
        fortran = nbytes == 0 or long_axes <= 1
        # One block: the Py_buffer to copy, then shape, strides and the NUL-terminated format.
        key = (ndim, len(format))
        layout = _LAYOUTS.get(key)
        if layout is None:
            layout = struct.Struct(f"@PPnniiPPPPP{ndim}n{ndim}n{len(format) + 1}s")
            if len(_LAYOUTS) < 1024:
                _LAYOUTS[key] = layout
        block = ctypes.create_string_buffer(layout.size)
        base = ctypes.addressof(block)
        shape_at = _PY_BUFFER.size
        strides_at = shape_at + 8 * ndim
        format_at = strides_at + 8 * ndim
        layout.pack_into(block, 0, address, 0, nbytes, itemsize, 1 if readonly else 0, ndim,
                         base + format_at, base + shape_at if ndim else 0, base + strides_at if ndim else 0,
                         0, 0, *shape, *strides, format)
        self = super().__new__(cls)
        init = object.__setattr__
        init(self, "_ps_keep", keep)
        init(self, "_ps_block", block)
        init(self, "_ps_info", (base, bool(readonly), fortran))
        return self

    def __setattr__(self, name, value):
        raise AttributeError(f"a MemoryExporter is immutable: views point at what it holds ({name!r})")

    def __delattr__(self, name):
        self.__setattr__(name, None)

    def __repr__(self):
        try:
            keep = self._ps_keep
        except AttributeError:
            return "<permastruct memory exporter (not initialised)>"
        owner = keep[0] if isinstance(keep, tuple) and keep else keep
        return f"<permastruct memory exporter for {owner!r}>"


# -- BufferExporter: PEP 688 below Python 3.12 --
def _forward_to_buffer(obj, view, flags):
    """bf_getbuffer of BufferExporter: ``PyObject_GetBuffer(obj.__buffer__(flags), view, flags)``."""
    try:
        exported = obj.__buffer__(flags)
        if type(exported) is not memoryview:
            raise TypeError(f"__buffer__ returned non-memoryview object ({type(exported).__name__})")
        _get_buffer(exported, view, flags)  # a failure is raised here by ctypes
        return 0
    except BaseException as exc:
        return _failed(exc)


def _make_exporter():
    """A base class whose C-level buffer slot calls ``obj.__buffer__(flags)`` (PEP 688 for 3.10/3.11).

    Python 3.12 calls ``__buffer__`` itself: None there.  Put it first among
    the bases, so that its slot wins over the one of ``ctypes.Structure``
    (which would export the proxy's own header bytes).  An exception raised by
    ``__buffer__`` (e.g. the StorageClosedError of a closed proxy, whose class
    refuses every attribute) reaches the caller as itself.
    """
    if sys.version_info >= (3, 12):
        return None
    return _heap_type(b"permastruct._types.BufferExporter", {_PY_BF_GETBUFFER: _callback(_forward_to_buffer)},
                      (object,))


BufferExporter = _make_exporter()


# -- proxies ---------------------------------------------------------------------
class PersistentMeta(CMeta):
    """Metaclass of proxy classes: calling a storage's class creates a persistent object."""

    def __init__(cls, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cls._ps_extent = ctypes.sizeof(cls)  # the bytes a proxy covers (worked out once per class)

    def __call__(cls, *args, **kwargs):
        heap = cls._heap
        if heap is None:
            raise TypeError(f"{cls.__name__} is not bound to a storage: use p.schema.{cls.__name__}(...)")
        return run_change(heap, cls._ps_construct, *args, **kwargs)


class Persistent(*((BufferExporter,) if BufferExporter is not None else ()), CStruct, metaclass=PersistentMeta):
    """Base class of every proxy: a view of a persistent object's header in the map.

    A ctypes instance would export its own bytes (here: the object's header and
    fields, writable) through the buffer protocol; proxies route the protocol to
    ``__buffer__`` instead (PEP 688; below Python 3.12 through the
    ``BufferExporter`` base), which refuses unless the type exports its
    contents (``Buffer``, ``ByteString``).
    """

    _fields_ = [("_ps_type", ctypes.c_uint32), ("_ps_refs", ctypes.c_uint32)]
    #: ``_ps_oid``: the object's file offset (set by the heap when it makes the proxy)
    __slots__ = ("__weakref__", "_ps_oid")
    _storage = None
    _heap = None
    _ps_type_id = 0
    _ps_kind = "abstract"
    _ps_closed = False  # True on the dead variants made by closed_class()

    @property
    def _ps_offset(self):
        return self._ps_oid

    @classmethod
    def _ps_make(cls, segment, local):
        """The proxy of the object of this class at ``local`` in map ``segment`` (its bytes there).

        Types whose extent the file says (strings, buffers, collections)
        check it here, once, with ``_ps_validate``: no later read can then go
        past the map.
        """
        if local + cls._ps_extent > segment.length:
            raise _damaged(cls, None, local, f"its {cls._ps_extent} bytes cross the end of the map")
        proxy = cls.from_address(segment.address + local)
        validate = cls._ps_validate
        if validate is not None:
            problem = validate(proxy, segment.length - local)
            if problem is not None:
                raise _damaged(cls, None, segment.start + local, problem, absolute=True)
        return proxy

    #: ``(proxy, room) -> problem or None``: what is wrong with an object whose extent the file says
    _ps_validate = None

    @classmethod
    def _ps_construct(cls, *args, **kwargs):
        """``cls(...)``: a new object made from plain Python values (each type says how)."""
        if kwargs or len(args) != 1:
            raise TypeError(f"{cls.__name__}() takes exactly one positional argument")
        heap = cls._heap
        return heap.at(cls, cls._ps_from_python(heap, args[0], f"{cls.__name__}()"))

    @classmethod
    def _ps_from_python(cls, heap, value, where):
        """The offset of a new object of this type made from plain Python ``value`` (not yet referenced)."""
        raise TypeError(f"{where} holds {cls.__name__}: cannot store a value of type {type(value).__name__}")

    @classmethod
    def _ps_check_python(cls, value, where):
        """Raise the error ``_ps_from_python`` would raise for ``value``, without making anything."""
        raise TypeError(f"{where} holds {cls.__name__}: cannot store a value of type {type(value).__name__}")

    @classmethod
    def _ps_references(cls, heap, offset, type_id):
        """The offsets the object at ``offset`` references (none, unless the type says otherwise)."""
        return []

    def __buffer__(self, flags=0):
        raise TypeError(f"a bytes-like object is required, not a persistent {type(self).__name__} "
                        "(only Buffer and ByteString objects export their bytes)")

    def isSameAs(self, other):
        """Whether ``other`` is a proxy of the same persistent object."""
        return (isinstance(other, Persistent) and type(other)._heap is type(self)._heap
                and other._ps_oid == self._ps_oid)

    def __repr__(self):
        return f"<persistent {type(self).__name__} object @offset {self._ps_offset:#x}>"

    def __dir__(self):
        """The proxy's API: fields, the type's methods and properties, ``isSameAs``... (not ctypes' internals).

        Worked out once per class, at the first ``dir()``.

        >>> from permastruct import Storage
        >>> p = Storage(None)
        >>> names = dir(p.schema.String("Bond"))
        >>> "contents" in names, "isSameAs" in names, "upper" in names, "_objects" in names
        (True, True, True, False)
        """
        cls = type(self)
        names = cls.__dict__.get("_ps_dir")
        if names is None:
            names = _api_names(cls)
            cls._ps_dir = names
        return list(names)

    def __reduce_ex__(self, protocol):
        raise TypeError(f"persistent {type(self).__name__} objects cannot be pickled; "
                        "copy the values you need")


#: ctypes' class API and class-building names: machinery of every proxy class, not its API.
_NOT_API = frozenset({"from_buffer", "from_buffer_copy", "from_address", "from_param", "in_dll", "__slots__",
                      "__module__", "__qualname__", "__weakref__", "__dict__", "__reduce_ex__", "__signature__",
                      "__release_buffer__", "__init_subclass__", "__subclasshook__", "__abstractmethods__"})


def _api_names(cls):
    """The sorted names ``dir()`` shows for proxies of ``cls``: what the classes of its MRO define (but
    ``object``'s and ctypes'), without private names, ctypes' API and attributes set to None."""
    names = {"__class__", "__doc__", "__dir__"}
    for klass in cls.__mro__:
        if klass is object or klass.__module__ in ("_ctypes", "ctypes"):
            continue
        for name, value in vars(klass).items():
            dunder = name.startswith("__") and name.endswith("__")
            if (name.startswith("_") and not dunder) or name in _NOT_API or value is None:
                continue
            names.add(name)
    return tuple(sorted(names))


def _damaged(cls, proxy, local, problem, absolute=False):
    """The CorruptStorageError for a damaged object of class ``cls`` (``local``: offset in its segment,
    or in the file with ``absolute``)."""
    heap = cls._heap
    name = getattr(heap, "name", "?")
    where = f"at {local:#x}" if absolute else f"at segment offset {local:#x}"
    if proxy is not None:
        try:
            where = f"at {proxy._ps_oid:#x}"
        except AttributeError:
            pass
    return CorruptStorageError(f"{name!r}: the {cls.__name__} {where} is damaged: {problem}")


# Special methods that a closed proxy must refuse (the interpreter looks them up
# on the type, bypassing __getattribute__).
_GUARDED = ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__len__",
            "__iter__", "__reversed__", "__contains__", "__getitem__", "__setitem__", "__delitem__",
            "__bytes__", "__str__", "__bool__", "__int__", "__float__", "__index__", "__buffer__",
            "__format__", "__call__", "__enter__", "__exit__", "__fspath__",
            "__add__", "__radd__", "__iadd__", "__mul__", "__rmul__", "__imul__", "__mod__", "__rmod__",
            "__or__", "__ror__", "__ior__", "__and__", "__rand__", "__iand__", "__sub__", "__rsub__",
            "__isub__", "__xor__", "__rxor__", "__ixor__")


def refuse_all(cls, error, message):
    """Make every use of proxy class ``cls`` (one of a storage's own classes) raise ``error(message)``.

    Used in a forked child, where the parent's storages must not be used:
    the class is changed in place, so every proxy of it refuses at once.
    """
    def refuse(self, *args, **kwargs):
        raise error(message)

    for name in ("__getattribute__", "__setattr__", "__delattr__") + _GUARDED:
        if name == "__getattribute__" or any(name in vars(base) for base in cls.__mro__[:-1]):
            setattr(cls, name, refuse)


def closed_class(cls, rolled_back=False):
    """The variant of proxy class ``cls`` that proxies are switched to when they die.

    At ``close()`` every proxy of the storage dies; at ``rollback()`` the
    proxies of objects created in the rolled-back transaction do
    (``rolled_back=True``); at a reader's ``refresh()`` the proxies of objects
    the writer has freed since (``rolled_back="freed"``).
    """
    cache = cls.__dict__.get("_ps_dead_classes")
    if cache is None:
        cache = {}
        cls._ps_dead_classes = cache
    if rolled_back in cache:
        return cache[rolled_back]
    storage_name = repr(cls._storage)
    if rolled_back == "freed":
        error, message = DeadProxyError, (
            f"this persistent {cls.__name__} object was freed by the writer of {storage_name}; "
            "it is not in the commit this reader moved to")
    elif rolled_back:
        error, message = DeadProxyError, (
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
    # (Below 3.12 the buffer protocol reaches __buffer__ through the BufferExporter base of
    # every proxy class: refused here too, like every attribute.)
    closed = PersistentMeta(("rolled-back " if rolled_back else "closed ") + cls.__name__, (cls,), namespace)
    closed.__qualname__ = f"closed {cls.__qualname__}"
    cache[rolled_back] = closed
    return closed
