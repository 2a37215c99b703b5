"""Persistent buffers (seed 000): any buffer-protocol object, stored with its format and shape.

``p.schema.Buffer(obj)`` copies ``obj`` into the store (C-contiguous);
``memoryview(buf)`` is a zero-copy view of the stored bytes with the source's
``format``, ``itemsize``, ``ndim``, ``shape`` and ``strides``, writable in a
writable storage; ``numpy.asarray(buf)`` is zero-copy too.  Any format is
kept, also those ``memoryview.cast`` cannot make (``'>i'``, ``'<d'``,
``'T{<i:a:<d:b:}'``), and so are zero extents and 0-d buffers.

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

How it works: ``Buffer.__buffer__`` (PEP 688; called by the interpreter from
3.12 on, by the slot of ``_types.BufferExporter`` below) returns a memoryview
of a :class:`~permastruct._types.MemoryExporter`, which fills the
``Py_buffer`` by hand with the address of the stored bytes, the stored format,
shape and C-contiguous strides.  The exporter holds the proxy (so the object
is not freed) and a memoryview of the object's bytes in the map (so the map
cannot be unmapped); every view made from it holds the exporter.  Views that
outlive ``close()`` keep their (private) memory mapped and reach no file.
"""

import contextlib
import ctypes
import struct

from . import _format as F
from ._types import MemoryExporter, Persistent
from .errors import CorruptStorageError

__all__ = ["Buffer"]


def buffer_source(obj, where=None):
    """``memoryview(obj)``, or the seed's TypeError for objects without the buffer protocol (naming
    ``where`` the buffer was to go, ``"Item.blob"``, when given)."""
    try:
        return memoryview(obj)
    except TypeError:
        if where is not None:
            raise TypeError(f"{where} is Buffer: cannot store a value of type {type(obj).__name__}, which does "
                            "not support the buffer protocol (a Buffer copies bytes, a bytearray, a memoryview, "
                            "an array.array, a numpy array...)") from None
        raise TypeError(f"Objects of type '{type(obj).__name__}' does not support the buffer protocol.") from None


#: The formats memoryview reads natively, with the size of their C type (memoryobject.c,
#: get_native_fmtchar): a stored itemsize must agree, or item reads go past the data.
_NATIVE_FORMATS = b"cbB?hHiIlLqQnNfdeP"


def buffer_problem(nbytes, data_offset, itemsize, ndim, fmt, shape_bytes, room):
    """What is wrong with a stored buffer's metadata, or None.

    ``fmt`` is the stored format, ``shape_bytes`` the bytes that hold the shape
    (``8 * ndim`` of them, fewer if the object is cut short) and ``room`` the
    bytes the object may use.  Checked once per proxy (and by ``check()``):
    afterwards the format, the shape and the data can be read without a
    bounds check.
    """
    if ndim > F.MAX_NDIM:
        return f"{ndim} dimensions (at most {F.MAX_NDIM})"
    shape_at = F.buffer_layout(len(fmt), ndim)[0]
    if data_offset < shape_at + 8 * ndim:
        return f"its data at {data_offset} overlaps its format and shape ({shape_at + 8 * ndim} bytes)"
    if data_offset + nbytes > room:
        return f"its {nbytes} bytes at {data_offset} run past the {room} bytes it has"
    if len(shape_bytes) != 8 * ndim:
        return "its shape is cut short"
    if b"\0" in fmt or not fmt.isascii():
        return f"its format {fmt!r} is not ASCII text"
    native = fmt[1:] if fmt[:1] == b"@" else fmt
    if len(native) == 1 and native in _NATIVE_FORMATS and struct.calcsize(native.decode()) != itemsize:
        # memoryview reads items of these formats with their C size, trusting the itemsize
        return f"its format {fmt!r} has items of {struct.calcsize(native.decode())} bytes, not {itemsize}"
    count = itemsize
    for extent in struct.unpack(f"<{ndim}Q", shape_bytes):
        count *= extent
    if count != nbytes:
        return f"its shape {struct.unpack(f'<{ndim}Q', shape_bytes)} of {itemsize}-byte items is not {nbytes} bytes"
    return None


def _validate(proxy, room):
    """``_ps_validate`` of buffers (run when the heap makes a proxy): the metadata, read from the proxy's address."""
    fmtlen, ndim = proxy._ps_format_length, proxy._ps_ndim
    start = ctypes.addressof(proxy)
    if F.BUFFER.size + fmtlen > room:
        return "its format runs past the end of the map"
    fmt = ctypes.string_at(start + F.BUFFER.size, fmtlen)
    shape_at = F.buffer_layout(fmtlen, ndim)[0]
    shape_bytes = ctypes.string_at(start + shape_at, max(0, min(8 * ndim, room - shape_at)))
    return buffer_problem(proxy._ps_nbytes, proxy._ps_data_offset, proxy._ps_itemsize, ndim, fmt,
                          shape_bytes, room)


class Buffer(Persistent):
    """A persistent buffer (see the module documentation)."""

    _fields_ = [("_ps_nbytes", ctypes.c_uint64), ("_ps_data_offset", ctypes.c_uint32),
                ("_ps_itemsize", ctypes.c_uint32), ("_ps_ndim", ctypes.c_uint8),
                ("_ps_fmtlen", ctypes.c_uint8), ("_ps_fmtlen_high", ctypes.c_uint16)]
    __slots__ = ()
    _ps_kind = "buffer"
    _ps_type_id = F.T_BUFFER
    _ps_validate = staticmethod(_validate)  # metadata checked once, when the proxy is made

    @classmethod
    def _ps_from_python(cls, heap, value, where):
        if isinstance(value, str):
            return super()._ps_from_python(heap, value, where)
        return new_buffer(heap, value, None if where == f"{cls.__name__}()" else where)  # (Buffer(): the seed's words)

    @classmethod
    def _ps_check_python(cls, value, where):
        if isinstance(value, str):
            super()._ps_check_python(value, where)
        buffer_source(value, where).release()

    @property
    def _ps_format_length(self):
        return self._ps_fmtlen | self._ps_fmtlen_high << 8

    @property
    def format(self):
        """The struct-syntax format of the items, as given by the source."""
        start = ctypes.addressof(self) + F.BUFFER.size
        return ctypes.string_at(start, self._ps_format_length).decode("ascii")

    @property
    def itemsize(self):
        return self._ps_itemsize

    @property
    def shape(self):
        """The shape of the source (a tuple of ints)."""
        start = ctypes.addressof(self) + F.buffer_layout(self._ps_format_length, self._ps_ndim)[0]
        return tuple((ctypes.c_uint64 * self._ps_ndim).from_address(start))

    @property
    def nbytes(self):
        return self._ps_nbytes

    def __len__(self):
        return self._ps_nbytes

    def __bytes__(self):
        return ctypes.string_at(ctypes.addressof(self) + self._ps_data_offset, self._ps_nbytes)

    def __eq__(self, other):
        if isinstance(other, Buffer):
            return self.isSameAs(other) or (self.format == other.format and self.shape == other.shape
                                            and bytes(self) == bytes(other))
        return NotImplemented

    __hash__ = None

    def _ps_exporter(self):
        """A MemoryExporter of the stored bytes, holding this proxy and a view of the object in the map."""
        heap = type(self)._heap
        heap.storage._check_open()
        start = ctypes.addressof(self)
        offset = self._ps_oid
        nbytes, data_offset, itemsize, ndim, fmtlen = (self._ps_nbytes, self._ps_data_offset, self._ps_itemsize,
                                                       self._ps_ndim, self._ps_format_length)
        shape_at = F.buffer_layout(fmtlen, ndim)[0]
        if data_offset < shape_at + 8 * ndim or ndim > F.MAX_NDIM:
            raise CorruptStorageError(f"{heap.name}: the Buffer at {offset:#x} has its data at "
                                      f"{data_offset}, inside its metadata, or {ndim} dimensions")
        heap.check_offset(offset, data_offset + nbytes)
        try:
            pin = heap.mapping.view(offset, data_offset + nbytes)  # holds the segment's map
        except IndexError as exc:
            raise CorruptStorageError(f"{heap.name}: the Buffer at {offset:#x} ({data_offset + nbytes} "
                                      "bytes) crosses the end of a mapped segment") from exc
        fmt = pin[F.BUFFER.size:F.BUFFER.size + fmtlen].tobytes()
        shape = struct.unpack_from(f"<{ndim}Q", pin, shape_at)
        try:
            return MemoryExporter(start + data_offset, nbytes, itemsize, fmt, shape, heap.readonly,
                                  keep=(self, pin))
        except ValueError as exc:
            pin.release()
            raise CorruptStorageError(f"{heap.name}: the Buffer at {offset:#x} is inconsistent: "
                                      f"{exc}") from None

    def __buffer__(self, flags=0):
        """The zero-copy memoryview behind ``memoryview(buf)`` (PEP 688).

        It is read-only in a read-only storage; the consumer's ``flags`` are
        applied to it by the interpreter (a writable request on a read-only
        storage gets a BufferError).
        """
        view = memoryview(self._ps_exporter())
        type(self)._heap.exported(view, self._ps_oid)  # (a rollback of its making quarantines its place)
        return view

    def __release_buffer__(self, view):
        with contextlib.suppress(BufferError, ValueError):  # still exported elsewhere: its holders release it
            view.release()


def new_buffer(heap, obj, where=None):
    """The offset of a new Buffer object holding a copy of ``obj`` (anything with the buffer protocol),
    with its format, itemsize and shape; unreferenced until stored.  ``where`` (``"Item.blob"``) is
    named in the errors."""
    source = buffer_source(obj, where)
    fmt = source.format.encode("ascii", "replace")
    if len(fmt) > F.MAX_FORMAT or source.ndim > F.MAX_NDIM:
        raise ValueError(f"{where or 'Buffer()'} is Buffer: a buffer's format is at most {F.MAX_FORMAT} "
                         f"characters and its ndim at most {F.MAX_NDIM}, not {len(fmt)} and {source.ndim}")
    shape_at, data_offset = F.buffer_layout(len(fmt), source.ndim)
    nbytes = source.nbytes
    heap.check_writable()
    offset = heap.allocator.alloc(data_offset + nbytes, zero=False)
    view = heap.mapping.view(offset, data_offset + nbytes)
    view[:data_offset] = bytes(data_offset)
    F.BUFFER.pack_into(view, 0, F.T_BUFFER, 0, nbytes, data_offset, source.itemsize, source.ndim,
                       len(fmt) & 0xFF, len(fmt) >> 8)
    view[F.BUFFER.size:F.BUFFER.size + len(fmt)] = fmt
    for index, extent in enumerate(source.shape or ()):
        F.UINT64.pack_into(view, shape_at + 8 * index, extent)
    if source.c_contiguous:
        try:
            view[data_offset:] = source.cast("B") if source.ndim else source.tobytes()
        except (TypeError, ValueError):
            view[data_offset:] = source.tobytes()
    else:
        view[data_offset:] = source.tobytes()
    heap.created.add(offset)
    heap.unreferenced.add(offset)
    return offset
