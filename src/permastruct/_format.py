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
      2048 .. 4095  where the log is (LOG_AT_RECORD, then the path)
    offset 4096   page 0, page 1, ... each ``page_size`` bytes

    A page id ``pid`` lives at ``HEADER_BLOCK + pid * page_size``.

Static header: magic ``b"PSTRUCT\\x00"``, format version, flags, page size,
header block size, a random 64-bit store id (0 in files made before it
existed).  It is written once, when the file is created.

Root records: two alternating copies of the state that a commit moves
forward: transaction number, the logical page count (the allocator lowers
it when a merge finds the last pages free), the head of the free-page list,
eight slots for the layers above the page file (schema, root object,
string registry, allocator state page) and the *chain* of that transaction:
the checksum of its commit frame in the log it came from (0 for the first
transaction and in files made before it was kept).  Opening picks the valid record with
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
``KIND_FREE_RUN``  the first page of a free run of ``npages`` (>= 2) pages,
                   linked through ``next`` into the bin of its length (see
                   below); its page header says ``-2``.  The other pages of
                   a free run keep whatever bytes they had.
``KIND_ALLOC``     the allocator state page: the head of each size class's
                   partial list, the heads of the free-run bins and the
                   merge counters.

Free space is the free-page list (single pages, LIFO) plus the free runs,
kept in bins by length: bin ``i`` holds runs of ``RUN_BIN_MIN[i]`` up to
``RUN_BIN_MIN[i + 1] - 1`` pages, the last bin (whose head is the ``ALLOC``
free-run head) longer ones.  Allocating ``n`` pages takes the low end of the
first run found from the smallest bin that can fit ``n`` upward; the rest of
the run goes back into the bin of its new length (one page: the free-page
list).  Freed runs are pushed on their bin, freed pages on the free-page list,
and neither is joined with its neighbours at once.  When a run request finds
no fit and at least half as many list entries were added since the last merge
as that merge left (``MERGE``: added, left), a *merge* collects both lists,
sorts them by page id, joins adjacent extents (never across a boundary of
the current mapping's segments, so a run is always viewable in one piece),
drops an extent that ends at the page count by lowering the page count (the
root record's page count can go down; pages past it are unused bytes), and
rebuilds the bins in address order and the free-page list in its previous
order.  The ``ALLOC`` flags byte says whether the bins and counters are in
use: files written before them have 0 there and every run on the last bin's
list; the writer sets it up on its first change.

Objects: every object starts with ``OBJECT_HEADER``: its type id (uint32)
and its reference count (uint32: the number of references to it stored in
the file).  A reference is the absolute file offset of an object header
(uint64); 0 means None.  Objects are 8-byte aligned; buffer data is 16-byte
aligned (64 in runs).

``STRING``  (ByteString, String): header, crc32 of the bytes, length, bytes.
``BUFFER``: header, nbytes, data offset (from the object start), itemsize,
            ndim, length of the format (a low byte, then 16 high bits); then
            the format (ASCII), the shape (uint64 each, 8-aligned), padding,
            the C-contiguous data (see ``buffer_layout``).
``REGISTRY`` (interned strings): header, count, capacity, then ``capacity``
            references in an open-addressing table (linear probing by the
            string's crc32).
Structures: header, then the fields in their stored order (base class first;
            a type's fields in the order they were first defined, fields
            added later after them), each aligned to its size (the C
            layout); by-reference fields are uint64 offsets.  The stored
            schema (JSON text, ``T_SCHEMA``) gives each structure type its
            current type id, its own fields and, once its layout changed,
            its earlier *versions*: ``[type id, size, [[field, field type
            id, offset], ...]]``, the whole layout of objects written
            before.  An object keeps the type id of the version it was
            written with.
``FORWARD`` (``FORWARD`` struct: header, body offset): an object of an
            earlier version that was written to after its type changed.
            It keeps its place (references to it are unchanged) and its
            reference count; its fields now live in the *body*, an object
            of the current version referenced by the forward alone
            (reference count 1).
``HELD``    (the object in root slot 4, or none): the objects that nothing in
            the file referenced at this commit but that the writer's program
            still held (a proxy of a new buffer, say): header, count, then
            their offsets.  They are not references.  A writer that opens
            the file, and a rollback, free them unless something refers to
            them by then; every other object with no reference is damage.

Collections (``COLLECTION``, 32 bytes): header, ``count`` (elements),
``body`` (offset of the internal object holding the elements, 0 when there
is none yet) and ``aux`` (List: the capacity of its array; Dict, Set and
SortedDict: a modification number that iterators watch).  Every element,
key and value is an 8-byte *cell*: signed integers and Bool as int64,
unsigned integers as uint64, floats as double (Float32 values rounded to
single precision), references as uint64 offsets (0 is None).

Internal objects belong to exactly one collection (reference count 1) and
name the type id of their owner, so the cells can be decoded without it:

``ARRAY`` (List)      header, owner type id, capacity; then ``capacity`` cells.
``TABLE`` (Dict, Set) header, owner type id, ``nslots`` (a power of two),
                      ``used`` (entries appended so far, minus deleted
                      ones at the end), ``filled`` (indices that are not
                      empty: live and deleted; always below ``nslots``,
                      so a probe ends), ``capacity`` (entries); then
                      ``nslots`` uint32 indices (0 empty,
                      0xFFFFFFFF deleted, else entry number + 1), padding to
                      8 bytes, then ``capacity`` entries in insertion order:
                      hash (uint32), a *tag* (uint32, 0 for an entry that is
                      not live), the key, then (Dict) the value cell.
                      Number keys: the tag is 1 and the key is its cell
                      (``TABLE_NUMBER_ENTRY``: 16 or 24 bytes).  String keys
                      (ByteString, String) take 16 bytes
                      (``TABLE_STRING_ENTRY``: 24 or 32 bytes): a key of at
                      most ``KEY_INLINE`` (16) bytes (UTF-8 for String) is
                      stored *inline*, its bytes then zeros, with the tag
                      ``TAG_INLINE + length``; a longer key is a reference to
                      its string object in the first 8 bytes, zeros after,
                      with the tag ``TAG_REF``.  A key that fits inline is
                      always inline, so a lookup compares a short key with
                      the entry alone.  Hashes are a fixed function of the
                      key (crc32 for strings, a multiplicative hash for
                      numbers), never Python's ``hash()``.  Lookup probes
                      linearly from ``hash & (nslots - 1)``.
``NODE`` (SortedDict) a B+tree node in a one-page run: header, owner type
                      id, leaf flag, key count ``n``, next and previous leaf
                      (leaves only); then ``order + 1`` key cells, then for
                      a leaf ``order + 1`` value cells, for an inner node
                      ``order + 2`` child offsets and ``order + 2`` subtree
                      element counts.  Keys of an inner node separate its
                      children: every key of child ``i`` is below key ``i``,
                      every key of child ``i + 1`` is at least key ``i``.
                      String keys are references, counted once per cell that
                      holds them (leaf and separators).

Format versions
===============

``FORMAT_VERSION`` in the static header names the layout of everything in
the main file.  The rule: a change that a reader of the previous version
would misread (a new meaning for bytes it reads) bumps it; a change that
older readers cannot see (a new object kind they never meet in old files, a
field in bytes they leave alone and that were zero before) does not.  A
store opens only with the version that wrote it: a newer file raises
``IncompatibleFormatError`` saying to upgrade permastruct, an older one
``IncompatibleFormatError`` saying to convert it: ``dump --json`` with a
permastruct release that reads it, then ``load`` with this one (see
:func:`version_problem`).  A refused file is never written.  The log
has its own ``WAL_VERSION``.

Versions: 1, the first; 2, short Dict and Set string keys inline in their
hash table entries (``TABLE``).

Write-ahead log (the file ``<store>-wal``)
==========================================

A commit never writes the main file directly.  It appends to the log one
*page frame* for each changed stretch of ``unit`` bytes (the OS page size,
written in the log header), then one *commit frame* holding the new root
state, and (with ``sync=True``) fsyncs the log.  A *checkpoint* later copies
the frames into the main file, fsyncs it, writes the main file's next root
record, fsyncs again and only then *resets* the log: a new header with a new
salt and the transaction number the main file now holds.

``WAL_HEADER`` (64 bytes at offset 0): magic ``b"PSTWAL\x00\x00"``, version,
unit, salt, base transaction (the main file's transaction at the reset), the
store id, the base transaction's chain, the main file's device and inode,
crc32 of the first 60 bytes.  A log counts for a main file only if it
continues its history: it starts at the main file's transaction with the same
chain, or holds that transaction with that chain (zeros, not recorded, pass).

Where the log is: a store can be opened through several names (symlinks,
hard links, renames); its log is named after the name the writer that made
it used, ``<real path>-wal``, and that path is recorded in the main file's
header block (``LOG_AT_RECORD`` at ``LOG_AT``: magic, length, crc32 of the
UTF-8 path, then the path) before the log gets its first commit.  An open
looks there first (and takes that log only if it records this very file:
store id, device, inode), then at its own name's log (which must have this
store's id: a copy of both files is a store too).  Frames follow from offset 64, each ``FRAME`` (32
bytes) then its data: kind (1 page, 2 commit), salt, transaction, for a page
the file offset of its data and for a commit the number of page frames of the
transaction, data length, crc32 of the first 28 header bytes and the data,
*chained*: started from the previous frame's crc32 (from the salt for the
first frame), so that a frame left over from before a rewrite of the log's
tail never continues the new frames.  A writer that opens a log whose
commits the main file already holds starts it over with a new salt.  A
commit frame's data is ``COMMIT`` (page count, free-page head, root slots),
then (version 2) the uint64 offsets of the objects the transaction freed: a
reader that moves past the commit knows which of its proxies died, even where
a new object of the same type took the place.  Version 3 puts ``COMMIT_TAIL``
(the number of freed offsets, the length of the metadata) between the two and
the transaction's metadata after the offsets: UTF-8 JSON text, an object with
the keys ``user``, ``description`` (strings) and ``extension`` (an object of
strings, numbers and booleans) when given (``pack_txn_meta``).  A commit with
neither freed objects nor metadata is ``COMMIT`` alone in every version.  A
writer that appends to a log of an older version (its header says so: the
log was not started over since) writes that version's frames, without the
metadata.

Recovery reads frames from the start and accepts a transaction only when its
commit frame and all its page frames are whole: right salt, right checksum,
transaction numbers following ``base + 1, base + 2, ...`` without a gap, and
as many page frames as the commit frame says.  The first frame that fails
any of this ends the log; nothing after it is looked at.  Transactions not
newer than the main file's root record are skipped (a checkpoint already
copied them).  A torn header means the log holds nothing the main file lacks:
the header is only rewritten after a checkpoint has been synced.

Version 4 adds two frame kinds, written only by a store that keeps history
(root slot ``SLOT_HISTORY`` > 0): before a transaction's page frames, one
``FRAME_HISTORY`` frame (``HISTORY_ENTRY``: the root state before the
transaction and the bytes it changed) and one ``FRAME_BEFORE`` frame per unit
it changes that some retained state holds, with the unit's image before the
transaction.  They are chained and checked like page frames and do not count
in the commit frame's number of page frames.

History file (``<store>-history``)
==================================

A store with ``history=`` keeps the before-images of its last transactions
after the log is started over in the file ``<store>-history``: a checkpoint
appends the log's history of the transactions it copied and fsyncs it before
it resets the log (an open that finds such a log does the same).  It starts
with ``HISTORY_HEADER`` (magic, version, unit, store id, crc32 of the first 60
bytes); then records, each ``HISTORY_RECORD`` (magic ``PSHR``, number of
images, transaction, its commit time in microseconds, bytes changed,
metadata length, number of objects freed), ``COMMIT``: the root state before
the transaction, the metadata, the images' uint64 file offsets, the uint64
offsets of the objects the transaction freed, the images, and a crc32 of the
record.  Records are in transaction order; the first
record that does not check ends the file.  It is rewritten whole (under a
temporary name, renamed) when most of its records are older than what is
kept.  A record of a transaction newer than the store's is ignored.

Locks (byte-range locks on the main file, far past its end, never data):
``LOCK_WRITER`` is held exclusively by the one writable open.
``LOCK_CHECKPOINT`` is held exclusively while a checkpoint writes the main
file, and shared while a reader takes a snapshot (reads the root and the log).
``LOCK_INTENT`` gives the checkpoint precedence: a checkpoint takes it
exclusively before it waits for ``LOCK_CHECKPOINT``, and a reader takes and
drops it (shared) before it takes ``LOCK_CHECKPOINT``, so readers that
refresh all the time cannot keep a checkpoint waiting.
A reader whose snapshot is transaction ``t`` holds a shared lock on
``LOCK_READERS + t``; a checkpoint copies only transactions no newer than the
oldest such lock, because a reader reads every page the log does not
override from the main file.  It also holds ``LOCK_WHO`` plus its process id
and ``t`` (see there), so that anyone can list the readers (open-file-
description locks do not say their process).  Root slot 5 holds the time of
each commit (microseconds since the epoch), so a snapshot's age is known.
"""

import json
import math
import struct
import zlib

MAGIC = b"PSTRUCT\x00"
FORMAT_VERSION = 2  # see "Format versions" above
HEADER_BLOCK = 4096
MIN_PAGE_SIZE = 256
MAX_PAGE_SIZE = 65536
DEFAULT_PAGE_SIZE = 4096

# -- static header -----------------------------------------------------------
HEADER = struct.Struct("<8sIIIIQ28xI")  # magic, version, flags, page_size, block, store id, pad, crc
assert HEADER.size == 64

# -- root records ------------------------------------------------------------
ROOT_OFFSETS = (512, 1024)
ROOT_SLOTS = 8
ROOT = struct.Struct("<QQq8QI32xI")  # txn, page_count, free_head, slots[8], chain, pad, crc
assert ROOT.size == 128
SLOT_SCHEMA, SLOT_ROOT, SLOT_REGISTRY, SLOT_ALLOC, SLOT_HELD, SLOT_TIME = 0, 1, 2, 3, 4, 5
#: Root slot 6: how many committed transactions the store keeps undoable (``history=``; 0: none).
SLOT_HISTORY = 6

# -- where the log is ---------------------------------------------------------
LOG_AT = 2048
LOG_AT_MAGIC = b"PSTLOGAT"
LOG_AT_RECORD = struct.Struct("<8sHHI")  # magic, length of the path, pad, crc32 of the path
MAX_LOG_PATH = 4096 - LOG_AT - LOG_AT_RECORD.size

# -- write-ahead log and locks ------------------------------------------------
WAL_SUFFIX = "-wal"
WAL_MAGIC = b"PSTWAL\x00\x00"
#: 2: a commit frame lists the objects freed; 3: and the transaction's metadata, after a
#: COMMIT_TAIL; 4: history and before-image frames (logs of versions 1 to 3 are read too)
WAL_VERSION = 4
# magic, version, unit, salt, base txn, store id, base chain, device and inode of the main file, pad, crc
WAL_HEADER = struct.Struct("<8sIIIQQIQQ4xI")
assert WAL_HEADER.size == 64
FRAME = struct.Struct("<IIQQII")  # kind, salt, txn, offset or page-frame count, length, crc
assert FRAME.size == 32
FRAME_PAGE, FRAME_COMMIT = 1, 2
#: (Version 4, a store with ``history=``) a transaction's HISTORY_ENTRY, then one before-image frame
#: per unit it changes (``offset``: the unit's file offset), both before its page frames.
FRAME_HISTORY, FRAME_BEFORE = 5, 6
#: The state before a transaction: page count, free-page head, root slots, then the bytes it changed.
HISTORY_ENTRY = struct.Struct("<Qq8QQ")
COMMIT = struct.Struct("<Qq8Q")  # page count, free-page head, root slots
COMMIT_TAIL = struct.Struct("<II")  # (version 3) number of freed offsets, bytes of metadata
#: The most bytes of metadata (user, description, extension) a transaction may carry.
MAX_TXN_META = 1 << 16
# -- the history file ``<store>-history`` (see "History file" above) ---------------------------
HISTORY_SUFFIX = "-history"
HISTORY_MAGIC = b"PSTHIST\x00"
HISTORY_VERSION = 1
HISTORY_HEADER = struct.Struct("<8sIIQ36xI")  # magic, version, unit, store id, pad, crc
assert HISTORY_HEADER.size == 64
#: magic, number of images, txn, its commit time (us), bytes changed, metadata length, number of
#: freed offsets; then COMMIT (the root state before it)
HISTORY_RECORD = struct.Struct("<4sIQQQII")
HISTORY_RECORD_MAGIC = b"PSHR"
LOCK_WRITER = 1 << 62
LOCK_CHECKPOINT = LOCK_WRITER + 1
LOCK_INTENT = LOCK_WRITER + 2
LOCK_READERS = LOCK_WRITER + 3
#: A reader also holds ``LOCK_WHO + (pid << WHO_TXN_BITS) + (txn mod 2**WHO_TXN_BITS)``: who holds what.
LOCK_WHO = LOCK_WRITER + (1 << 61)
WHO_TXN_BITS = 38

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
#: The first five SLAB fields (kind, class, used, free_head, bump), and the three counts alone at
#: SLAB_COUNTS_AT: what taking a never-used slot reads and writes.
SLAB_HEAD = struct.Struct("<BBHHH")
SLAB_COUNTS = struct.Struct("<HHH")
SLAB_COUNTS_AT = SLAB_AT + 2
SLAB_FIRST_SLOT = 32
# kind, pad, npages
RUN = struct.Struct("<B3xI")
RUN_AT = 4
RUN_OBJECT = 64
# kind, pad, npages, next free run
FREE_RUN = struct.Struct("<B3xIi")
# allocator page: kind, flags, pad, number of classes, head of the last free-run bin;
# then the int32 partial-list heads of the size classes
ALLOC = struct.Struct("<BB2xIi")
ALLOC_AT = 4
ALLOC_HEADS_AT = 16
#: ALLOC flags: the free-run bins at RUN_BINS_AT and the MERGE counters are in use
#: (0 in files written before they existed: every free run is on the last bin's list).
ALLOC_BINNED = 1
#: Smallest length (pages) of the runs in each free-run bin; a bin holds lengths up to
#: the next bin's minimum minus one, the last bin everything longer.
RUN_BIN_MIN = (2, 3, 4, 5, 6, 7, 8, 9, 17, 33, 65, 129, 257, 513, 1025, 2049)
#: int32 heads of the free-run bins 0 .. len(RUN_BIN_MIN) - 2 (-1: empty), after the
#: largest possible table of size-class heads; the last bin's head is in ALLOC.
RUN_BINS_AT = 160
#: merge counters: list entries (free pages and free runs) added since the last merge,
#: and the number of entries that merge left; they only decide when to merge again.
MERGE = struct.Struct("<II")
MERGE_AT = 220
INT32 = struct.Struct("<i")
UINT32 = struct.Struct("<I")
UINT64 = struct.Struct("<Q")

#: Object sizes (bytes) of the small-object size classes, before filtering by page size.
SIZE_CLASSES = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448,
                512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 4096,
                5120, 6144, 8192, 10240, 12288, 16384, 20480, 24576, 32768)
assert ALLOC_HEADS_AT + 4 * len(SIZE_CLASSES) <= RUN_BINS_AT
assert RUN_BINS_AT + 4 * (len(RUN_BIN_MIN) - 1) <= MERGE_AT
assert MERGE_AT + MERGE.size <= MIN_PAGE_SIZE

# -- objects -----------------------------------------------------------------
OBJECT_HEADER = struct.Struct("<II")  # type id, reference count
STRING = struct.Struct("<IIII")  # type, refs, crc32, length
# type, refs, nbytes, data offset, itemsize, ndim, format length: its low byte, then its high 16 bits
# (files written before formats could be longer than 255 bytes have zeros there)
BUFFER = struct.Struct("<IIQIIBBH4x")
assert BUFFER.size == 32
REGISTRY = struct.Struct("<IIQQ")  # type, refs, count, capacity
HELD = struct.Struct("<IIQ")  # type, refs, count; then count uint64 offsets
FORWARD = struct.Struct("<IIQ")  # type (T_FORWARD), refs, body offset
COLLECTION = struct.Struct("<IIQQQ")  # type, refs, count, body, aux
INTERNAL = struct.Struct("<III")  # type, refs, owner type: how ARRAY, TABLE and NODE start
ARRAY = struct.Struct("<IIIIQ")  # type, refs, owner type, pad, capacity
TABLE = struct.Struct("<IIIIQQQQ")  # type, refs, owner type, pad, nslots, used, filled, capacity
NODE = struct.Struct("<IIIBxHQQ")  # type, refs, owner type, leaf, n, next leaf, previous leaf
assert (COLLECTION.size, ARRAY.size, TABLE.size, NODE.size) == (32, 24, 48, 32)
CELL = 8
TABLE_EMPTY, TABLE_DELETED = 0, 0xFFFFFFFF
#: Table entries without the value cell: hash, tag, then the number key's cell or a string key's 16 bytes.
TABLE_NUMBER_ENTRY, TABLE_STRING_ENTRY = "<II", "<II16s"
KEY_INLINE = 16  # the longest string key (in bytes) stored inline in a table entry
TAG_REF, TAG_INLINE = 1, 2  # entry tags: a string key by reference; TAG_INLINE + length: inline
MAX_FORMAT = (1 << 24) - 1
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
T_SCHEMA, T_REGISTRY, T_HELD = 30, 31, 35
T_FORWARD = 36  # an object of an earlier structure version, moved to a body of the current one
T_ARRAY, T_TABLE, T_NODE = 32, 33, 34  # internal objects of collections
FIRST_USER_TYPE = 64
MAX_TYPE_ID = 1 << 20


def buffer_layout(format_length, ndim):
    """``(shape_at, data_at)``: where a buffer's shape and data start, from the object's start.

    The format (ASCII) follows the ``BUFFER`` header; the shape (``ndim``
    uint64) starts at the next multiple of 8 after it; the data at the next
    multiple of 16 after the shape.
    """
    shape_at = -(-(BUFFER.size + format_length) // 8) * 8
    return shape_at, -(-(shape_at + 8 * ndim) // 16) * 16


def version_problem(version):
    """What to tell the user about a file of format ``version`` (not ``FORMAT_VERSION``)."""
    if version > FORMAT_VERSION:
        return (f"has format version {version}; this permastruct reads version {FORMAT_VERSION}: "
                "upgrade permastruct to open it")
    return (f"has format version {version}, older than this permastruct's {FORMAT_VERSION}, which cannot "
            f"read it (the file is unchanged): convert it into a new store, with a permastruct release "
            f"that reads version {version} 'python3 -m permastruct dump --json FILE > FILE.json', then "
            "with this one 'python3 -m permastruct load FILE.json NEWFILE'")


def page_offset(pid, page_size):
    """The file offset of page ``pid``."""
    return HEADER_BLOCK + pid * page_size


def pack_header(page_size, flags=0, store_id=0):
    """The 64-byte static header for a new file."""
    body = HEADER.pack(MAGIC, FORMAT_VERSION, flags, page_size, HEADER_BLOCK, store_id, 0)
    return body[:60] + UINT32.pack(zlib.crc32(body[:60]))


def pack_root(txn, page_count, free_head, slots, chain=0):
    """A 128-byte root record with its checksum."""
    body = ROOT.pack(txn, page_count, free_head, *slots, chain, 0)
    return body[:124] + UINT32.pack(zlib.crc32(body[:124]))


def unpack_root(data):
    """``(txn, page_count, free_head, slots)`` of a root record, or None if its checksum fails."""
    record = unpack_root_chain(data)
    return None if record is None else record[:4]


def unpack_root_chain(data):
    """``(txn, page_count, free_head, slots, chain)`` of a root record, or None if its checksum fails."""
    if len(data) < ROOT.size:
        return None
    fields = ROOT.unpack_from(data)
    if fields[-1] != zlib.crc32(bytes(data[:124])) or fields[0] == 0:
        return None
    return fields[0], fields[1], fields[2], list(fields[3:3 + ROOT_SLOTS]), fields[3 + ROOT_SLOTS]


def pack_wal_header(unit, salt, base, store_id=0, base_chain=0, device=0, inode=0):
    """The 64-byte header of a log, with its checksum."""
    body = WAL_HEADER.pack(WAL_MAGIC, WAL_VERSION, unit, salt, base, store_id, base_chain, device, inode, 0)
    return body[:60] + UINT32.pack(zlib.crc32(body[:60]))


def pack_history_header(unit, store_id):
    """The header of a history file (``HISTORY_HEADER``)."""
    body = HISTORY_HEADER.pack(HISTORY_MAGIC, HISTORY_VERSION, unit, store_id, 0)
    return body[:60] + UINT32.pack(zlib.crc32(body[:60]))


def pack_log_at(path):
    """The record in the header block that names the store's log (``path``: str), or None if too long."""
    data = path.encode("utf-8", "surrogateescape")
    if len(data) > MAX_LOG_PATH:
        return None
    return LOG_AT_RECORD.pack(LOG_AT_MAGIC, len(data), 0, zlib.crc32(data)) + data


def unpack_log_at(block):
    """The log path a header block names, or None (no record, or a damaged one)."""
    if len(block) < LOG_AT + LOG_AT_RECORD.size:
        return None
    magic, length, _, crc = LOG_AT_RECORD.unpack_from(block, LOG_AT)
    start = LOG_AT + LOG_AT_RECORD.size
    data = bytes(block[start:start + length])
    if magic != LOG_AT_MAGIC or length > MAX_LOG_PATH or len(data) != length or zlib.crc32(data) != crc:
        return None
    return data.decode("utf-8", "surrogateescape")


STRING_SEED, BYTES_SEED = zlib.crc32(b"s"), zlib.crc32(b"b")


def string_hash(kind, data):
    """The hash stored for a string: crc32 of a kind byte and the bytes, the same in every process."""
    return zlib.crc32(data, STRING_SEED if kind == T_STRING else BYTES_SEED)


DOUBLE = struct.Struct("<d")
_MIX = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: Fibonacci hashing
_MASK64 = (1 << 64) - 1


def number_hash(value):
    """The hash stored for a number key, the same in every process; 1, 1.0 and True hash alike."""
    if type(value) is float:
        if not value.is_integer():
            return zlib.crc32(DOUBLE.pack(value))
        value = int(value)
    return ((value & _MASK64) * _MIX & _MASK64) >> 32


def size_classes(page_size):
    """The small-object size classes usable with ``page_size`` (at least two slots a page)."""
    room = page_size - SLAB_FIRST_SLOT
    return tuple(size for size in SIZE_CLASSES if room // size >= 2)


def pack_txn_meta(description=None, user=None, extension=None):
    """The metadata of a transaction as stored in its commit frame (bytes; empty when there is none).

    ``description`` and ``user`` are strings, ``extension`` a dict of str to
    str, int, float (finite) or bool; anything else is a TypeError (a wrong
    type) or a ValueError (a value JSON cannot hold exactly, text that is not
    UTF-8, more than ``MAX_TXN_META`` bytes), naming the argument.
    """
    meta = {}
    for name, value in (("user", user), ("description", description)):
        if value is not None:
            if not isinstance(value, str):
                raise TypeError(f"the transaction's {name} must be a str or None, not {type(value).__name__}")
            meta[name] = value
    if extension is not None:
        if not isinstance(extension, dict):
            raise TypeError(f"the transaction's extension must be a dict or None, not {type(extension).__name__}")
        for key, value in extension.items():
            if not isinstance(key, str):
                raise TypeError(f"the transaction's extension keys must be str, not {type(key).__name__} ({key!r})")
            if not isinstance(value, (str, int, float, bool)):
                raise TypeError(f"the transaction's extension[{key!r}] must be a str, int, float or bool, "
                                f"not {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"the transaction's extension[{key!r}] must be a finite number, not {value!r}")
        meta["extension"] = dict(extension)
    if not meta:
        return b""
    try:
        data = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the transaction's metadata is not valid text ({exc.reason})") from None
    if len(data) > MAX_TXN_META:
        raise ValueError(f"the transaction's metadata takes {len(data)} bytes, more than the "
                         f"{MAX_TXN_META} a transaction may carry")
    return data


def unpack_txn_meta(data):
    """``(description, user, extension)`` of stored metadata (Nones and ``{}`` for what was not
    given, or for metadata that cannot be read: it never decides what a commit holds)."""
    try:
        meta = json.loads(bytes(data).decode("utf-8")) if data else {}
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    extension = meta.get("extension")
    return meta.get("description"), meta.get("user"), extension if isinstance(extension, dict) else {}
