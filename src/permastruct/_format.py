"""The on-disk layout of a permastruct file, written down once.

Theory of operation
===================

All integers are little-endian and naturally aligned.  Nothing in the file is
code or a pickle: the schema is JSON text describing types and fields.

File::

    offset 0      header block, HEADER_BLOCK (4096) bytes
      0    .. 63    static header   (HEADER struct, crc32 over bytes 0..59)
      512  .. 639   root record A   (ROOT struct, crc32 over its first 124 bytes)
      1024 .. 1151  root record B
    offset 4096   page 0, page 1, ... each ``page_size`` bytes

    A page id ``pid`` lives at ``HEADER_BLOCK + pid * page_size``.

Static header: magic ``b"PSTRUCT\\x00"``, format version, flags, page size,
header block size.  It is written once, when the file is created.

Root records: two alternating copies of the state that a commit moves
forward: transaction number, the logical page count, the head of the free-page
list and eight slots for the layers above the page file (schema, root object,
string registry, allocator state page).  Opening picks the valid record with
the higher transaction number; a commit writes the *other* one, so a torn
write of a root record leaves the previous one intact.

Page header (``PAGE_HEADER``, 4 bytes, seed 004): ``next_free_pid`` (int32);
``-1`` ends the free-page list, ``-2`` marks a page that is in use.

Pages owned by the allocator start their content (at page offset 4) with a
kind byte:

``KIND_SLAB``      small objects of one size class.  ``SLAB`` header at page
                   offset 4; slots start at ``SLAB_FIRST_SLOT`` (32).  A free
                   slot holds the index+1 of the next free slot in its first
                   4 bytes (0 ends the list); slots below ``bump`` were handed
                   out at least once.  Pages with free slots form a doubly
                   linked "partial" list per size class.
``KIND_RUN``       the first page of a run of ``npages`` pages holding one
                   large object at page offset ``RUN_OBJECT`` (64).
``KIND_FREE_RUN``  the first page of a free run of ``npages`` pages, linked
                   through ``next``.
``KIND_ALLOC``     the allocator state page: the head of each size class's
                   partial list and the head of the free-run list.

Objects: every object starts with ``OBJECT_HEADER``: its type id (uint32)
and its reference count (uint32: the number of references to it stored in
the file).  A reference is the absolute file offset of an object header
(uint64); 0 means None.  Objects are 8-byte aligned; buffer data is 16-byte
aligned (64 in runs).

``STRING``  (ByteString, String): header, crc32 of the bytes, length, bytes.
``BUFFER``: header, nbytes, data offset (from the object start), itemsize,
            ndim, length of the format; then the format (ASCII), the shape
            (uint64 each), padding, the C-contiguous data.
``REGISTRY`` (interned strings): header, count, capacity, then ``capacity``
            references in an open-addressing table (linear probing by the
            string's crc32).
Structures: header, then the fields in declaration order (base class first),
            each aligned to its size; by-reference fields are uint64 offsets.
"""

import struct
import zlib

MAGIC = b"PSTRUCT\x00"
FORMAT_VERSION = 1
HEADER_BLOCK = 4096
MIN_PAGE_SIZE = 256
MAX_PAGE_SIZE = 65536
DEFAULT_PAGE_SIZE = 4096

# -- static header -----------------------------------------------------------
HEADER = struct.Struct("<8sIIII36xI")  # magic, version, flags, page_size, block, pad, crc
assert HEADER.size == 64

# -- root records ------------------------------------------------------------
ROOT_OFFSETS = (512, 1024)
ROOT_SLOTS = 8
ROOT = struct.Struct("<QQq8Q36xI")  # txn, page_count, free_head, slots[8], pad, crc
assert ROOT.size == 128
SLOT_SCHEMA, SLOT_ROOT, SLOT_REGISTRY, SLOT_ALLOC = 0, 1, 2, 3

# -- pages -------------------------------------------------------------------
PAGE_HEADER = struct.Struct("<i")
NO_NEXT_FREE_PAGE = -1
NOT_IN_FREE_PAGE_LIST = -2

KIND_SLAB = 1
KIND_RUN = 2
KIND_FREE_RUN = 3
KIND_ALLOC = 4

# kind, size class, used, free_head (slot index + 1), bump, next partial, prev partial
SLAB = struct.Struct("<BBHHHii")
SLAB_AT = 4
SLAB_FIRST_SLOT = 32
# kind, pad, npages
RUN = struct.Struct("<B3xI")
RUN_AT = 4
RUN_OBJECT = 64
# kind, pad, npages, next free run
FREE_RUN = struct.Struct("<B3xIi")
# allocator page: kind, pad, number of classes, free run head; then int32 heads
ALLOC = struct.Struct("<B3xIi")
ALLOC_AT = 4
ALLOC_HEADS_AT = 16
INT32 = struct.Struct("<i")
UINT32 = struct.Struct("<I")
UINT64 = struct.Struct("<Q")

#: Object sizes (bytes) of the small-object size classes, before filtering by page size.
SIZE_CLASSES = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448,
                512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 4096,
                5120, 6144, 8192, 10240, 12288, 16384, 20480, 24576, 32768)

# -- objects -----------------------------------------------------------------
OBJECT_HEADER = struct.Struct("<II")  # type id, reference count
STRING = struct.Struct("<IIII")  # type, refs, crc32, length
BUFFER = struct.Struct("<IIQIIBB6x")  # type, refs, nbytes, data offset, itemsize, ndim, fmtlen
assert BUFFER.size == 32
REGISTRY = struct.Struct("<IIQQ")  # type, refs, count, capacity
MAX_FORMAT = 255
MAX_NDIM = 64

# -- type ids ----------------------------------------------------------------
# By-value types (never objects of their own; ids name them in the schema).
T_INT, T_FLOAT, T_BOOL = 1, 2, 3
T_INT8, T_INT16, T_INT32, T_INT64 = 4, 5, 6, 7
T_UINT8, T_UINT16, T_UINT32, T_UINT64 = 8, 9, 10, 11
T_FLOAT32, T_FLOAT64 = 12, 13
# Predefined by-reference types.
T_BYTESTRING, T_STRING, T_BUFFER, T_STRUCTURE = 16, 17, 18, 19
# Internal objects.
T_SCHEMA, T_REGISTRY = 30, 31
FIRST_USER_TYPE = 64
MAX_TYPE_ID = 1 << 20


def page_offset(pid, page_size):
    """The file offset of page ``pid``."""
    return HEADER_BLOCK + pid * page_size


def pack_header(page_size, flags=0):
    """The 64-byte static header for a new file."""
    body = HEADER.pack(MAGIC, FORMAT_VERSION, flags, page_size, HEADER_BLOCK, 0)
    return body[:60] + UINT32.pack(zlib.crc32(body[:60]))


def pack_root(txn, page_count, free_head, slots):
    """A 128-byte root record with its checksum."""
    body = ROOT.pack(txn, page_count, free_head, *slots, 0)
    return body[:124] + UINT32.pack(zlib.crc32(body[:124]))


def unpack_root(data):
    """``(txn, page_count, free_head, slots)`` of a root record, or None if its checksum fails."""
    if len(data) < ROOT.size:
        return None
    fields = ROOT.unpack_from(data)
    if fields[-1] != zlib.crc32(bytes(data[:124])) or fields[0] == 0:
        return None
    return fields[0], fields[1], fields[2], list(fields[3:3 + ROOT_SLOTS])


def string_hash(kind, data):
    """The hash stored for a string: crc32 of a kind byte and the bytes, the same in every process."""
    return zlib.crc32(data, zlib.crc32(b"s" if kind == T_STRING else b"b"))


def size_classes(page_size):
    """The small-object size classes usable with ``page_size`` (at least two slots a page)."""
    room = page_size - SLAB_FIRST_SLOT
    return tuple(size for size in SIZE_CLASSES if room // size >= 2)
