"""Persistent buffers (seed 000): any buffer-protocol object, stored with its format and shape.

``p.schema.Buffer(obj)`` copies ``obj`` into the store (C-contiguous);
``memoryview(buf)`` is a zero-copy view of the stored bytes with the source's
``format``, ``itemsize``, ``ndim``, ``shape`` and ``strides``, writable in a
writable storage; ``numpy.asarray(buf)`` is zero-copy too.

>>> from permastruct import Storage
>>> p = Storage(None)
>>> from array import array
>>> buf = p.schema.Buffer(array("d", [1.5, 2.5]))
>>> m = memoryview(buf)
>>> m.format, m.shape, m.tolist()
('d', (2,), [1.5, 2.5])
>>> m[0] = 4.0; bytes(buf) == array("d", [4.0, 2.5]).tobytes()
True
>>> m.release()
"""

import ctypes
import struct

from . import _format as F
from ._types import BufferExporter, Persistent

__all__ = ["Buffer"]


def buffer_source(obj):
    """``memoryview(obj)``, or the seed's TypeError for objects without the buffer protocol."""
    try:
        return memoryview(obj)
    except TypeError:
        raise TypeError(f"Objects of type '{type(obj).__name__}' does not support the buffer protocol.") from None


def exposed_format(fmt, itemsize):
    """The format a memoryview can be cast to for stored format ``fmt``, or None.

    ``memoryview.cast`` accepts native single-character formats; ``'<d'`` and
    ``'=d'`` are accepted where they mean the same bytes as native ``'d'``.
    """
    code = fmt
    if code[:1] in "@=<" and len(code) == 2:
        if code[0] in "=<" and struct.pack("=H", 1) != struct.pack("<H", 1):
            return None
        code = code[1]
    if len(code) != 1 or code not in "cbB?hHiIlLqQnNfdeP":
        return None
    if fmt[:1] in "=<" and struct.calcsize(code) != struct.calcsize("<" + code):
        return None
    return code if struct.calcsize(code) == itemsize else None


class _BufferBase(Persistent):
    _fields_ = [("_ps_nbytes", ctypes.c_uint64), ("_ps_data_offset", ctypes.c_uint32),
                ("_ps_itemsize", ctypes.c_uint32), ("_ps_ndim", ctypes.c_uint8),
                ("_ps_fmtlen", ctypes.c_uint8)]
    __slots__ = ()
    _ps_kind = "buffer"
    _ps_type_id = F.T_BUFFER

    @property
    def format(self):
        """The struct-syntax format of the items, as given by the source."""
        start = ctypes.addressof(self) + F.BUFFER.size
        return ctypes.string_at(start, self._ps_fmtlen).decode("ascii")

    @property
    def itemsize(self):
        return self._ps_itemsize

    @property
    def shape(self):
        """The shape of the source (a tuple of ints)."""
        start = ctypes.addressof(self) + F.BUFFER.size + self._ps_fmtlen
        start = -(-start // 8) * 8
        return tuple((ctypes.c_uint64 * self._ps_ndim).from_address(start))

    @property
    def nbytes(self):
        return self._ps_nbytes

    def __len__(self):
        return self._ps_nbytes

    def __bytes__(self):
        return ctypes.string_at(ctypes.addressof(self) + self._ps_data_offset, self._ps_nbytes)

    def __eq__(self, other):
        if isinstance(other, _BufferBase):
            return self.isSameAs(other) or (self.format == other.format and self.shape == other.shape
                                            and bytes(self) == bytes(other))
        return NotImplemented

    __hash__ = None

    def __buffer__(self, flags=0):
        """The zero-copy memoryview behind ``memoryview(buf)`` (PEP 688)."""
        storage = type(self)._storage
        offset = storage._mapping.offset_of_address(ctypes.addressof(self))
        view = storage._mapping.view(offset + self._ps_data_offset, self._ps_nbytes)
        if storage.readonly:
            view = view.toreadonly()
        fmt = exposed_format(self.format, self._ps_itemsize)
        if fmt is not None:
            shape = self.shape
            if len(shape) == 1 or 0 in shape:  # cast() refuses zero extents: show them flat
                view = view.cast(fmt)
            else:
                view = view.cast(fmt, shape)
        storage._exported(view)
        return view

    def __release_buffer__(self, view):
        view.release()


if BufferExporter is not None:
    class Buffer(BufferExporter, _BufferBase):
        """A persistent buffer (see the module documentation)."""

        __slots__ = ()
        _ps_plain_base = _BufferBase
else:  # pragma: no cover - Python 3.12+: __buffer__ is called by the interpreter
    class Buffer(_BufferBase):
        """A persistent buffer (see the module documentation)."""

        __slots__ = ()
        _ps_plain_base = _BufferBase
