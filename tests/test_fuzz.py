"""R3: hostile files.  Corrupted and fuzzed stores raise only ``PermastructError`` subclasses.

A seeded mutator damages valid store files (and their write-ahead log, when one
exists); a checker opens each damaged file writable and, separately, read-only,
runs ``check()``, walks everything reachable from the root (every field, every
element, every collection iterated forwards and backwards, buffers read
through ``memoryview``, strings read), in the writable open also changes a
little of everything and commits (``PERMASTRUCT_FUZZ_WRITES=0`` leaves that
out), and closes it.  Success, or an exception that is a
:class:`~permastruct.errors.PermastructError`, is fine; anything else is a
failure: another exception type, a segmentation fault, a hang, a huge
allocation, an iteration that does not end.

The checker runs in a subprocess (``sys.executable``) with resource limits
(``RLIMIT_AS``, ``RLIMIT_CPU``) and a wall-clock timeout per case, many cases
per subprocess; it writes a line before and after each case, so a subprocess
that dies still names the case.  Every failure names its seed, its case and the
mutations applied.

The base files
    :class:`FuzzStorage` has structures with every scalar type, inheritance,
    String/ByteString fields, nested structures, buffers with a shape and a
    format, List/Dict/Set/SortedDict of numbers and strings, nested
    collections and interned strings; enough data for many pages, with page
    sizes 4096 and 256, after some churn (so that free pages, free runs and
    partial slabs exist).  One base is a copy taken after a commit while the
    store is still open (with its ``-wal`` file, once the library writes one);
    while the library writes no log, one base gets a log made by hand from the
    layout in :mod:`permastruct._format`, so that log mutations run today.

The mutator (:func:`mutate`) knows the layout (it reads a map of the base file
made with the library: pages, objects, reference slots, length fields) and
applies one to four of: random bit flips anywhere; flips in the static header
and the root records (also with their checksums recomputed, so that the damage
gets past them); hostile values in root records, the allocator page, page
headers, slab, run and free-run headers; type ids and reference counts; counts,
bodies and capacities of collections and their arrays, hash tables and tree
nodes; lengths of strings, buffer metadata (nbytes, data offset, itemsize,
ndim, format, shape); references overwritten with offsets outside the file,
unaligned ones, ones into the middle of objects, at the object itself (cycles),
at objects of other types, lists sharing or swapping their arrays, tree leaves
linked in a cycle; truncation at random and at page boundaries; garbage, zeroed
and duplicated pages; bytes appended; and, when a log exists, the same kinds of
damage in its header, frame headers (with and without fixed checksums),
commit frames and page frames, truncated, reordered, dropped and repeated
frames.

Run::

    PYTHONPATH=src python3 -m pytest tests/test_fuzz.py -s                  # default: a few hundred cases
    PYTHONPATH=src python3 -m pytest tests/test_fuzz.py -s --seed 7 --iterations 2000
    PERMASTRUCT_STRESS=1 PYTHONPATH=src python3 -m pytest tests/test_fuzz.py -s   # thousands

Replay one case in this process, with its full traceback::

    PYTHONPATH=src python3 tests/test_fuzz.py replay SEED CASE
"""

import contextlib
import ctypes
import faulthandler
import json
import mmap
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from array import array

import pytest

import permastruct
from permastruct._schema import type_label
from permastruct import Dict, List, Set, SortedDict, Storage
from permastruct import _format as F
from permastruct import collections as C
from permastruct.errors import CorruptStorageError, PermastructError

SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(permastruct.__file__)))
THIS_FILE = os.path.abspath(__file__)

#: Cases per subprocess; every subprocess pays for starting Python and importing.
BATCH = 100
#: Wall-clock seconds one case may take before it counts as a hang.
CASE_TIMEOUT = 30.0
#: Resource limits of the checker subprocess.
ADDRESS_SPACE = 3 << 30  # the store maps its file: leave room for it
CPU_SECONDS = 600
#: Whether the writable open also changes a little of everything and commits.
WRITES = os.environ.get("PERMASTRUCT_FUZZ_WRITES", "1") not in ("", "0")  # PERMASTRUCT_FUZZ_WRITES=0: off
#: Growth of the peak resident memory within one case that counts as a huge allocation.
HUGE_ALLOCATION = 256 << 20


# =====================================================================================
# The schema and the base files
# =====================================================================================
class FuzzStorage(Storage):
    """Every kind of stored thing, nested."""

    def populateSchema(self):
        s = self.schema

        class Scalars(s.Structure):
            i = s.Int
            f = s.Float
            b = s.Bool
            i8 = s.Int8
            i16 = s.Int16
            i32 = s.Int32
            i64 = s.Int64
            u8 = s.UInt8
            u16 = s.UInt16
            u32 = s.UInt32
            u64 = s.UInt64
            f32 = s.Float32
            f64 = s.Float64

        class Named(Scalars):
            name = s.String
            raw = s.ByteString
            data = s.Buffer

        class Pair(s.Structure):
            left = Named
            right = Named
            weight = s.Float

        Ints = self.define(List("Ints")[s.Int])
        Floats = self.define(List("Floats")[s.Float32])
        Names = self.define(List("Names")[s.String])
        Items = self.define(List("Items")[Named])
        Nested = self.define(List("Nested")[Ints])
        ByName = self.define(Dict("ByName")[s.ByteString, Named])
        Counts = self.define(Dict("Counts")[s.Int, s.Float])
        Tags = self.define(Set("Tags")[s.String])
        Numbers = self.define(Set("Numbers")[s.UInt32])
        Groups = self.define(Dict("Groups")[s.String, Tags])
        ByAge = self.define(SortedDict("ByAge")[s.Int, s.String])
        ByWord = self.define(SortedDict("ByWord")[s.String, Ints])

        class Root(s.Structure):
            scalars = Scalars
            named = Named
            pair = Pair
            title = s.String
            blob = s.ByteString
            matrix = s.Buffer
            big = s.Buffer
            typed = s.Buffer
            ints = Ints
            floats = Floats
            names = Names
            items = Items
            nested = Nested
            by_name = ByName
            counts = Counts
            tags = Tags
            numbers = Numbers
            groups = Groups
            by_age = ByAge
            by_word = ByWord
            count = s.Int


def _named(p, k):
    s = p.schema
    return s.Named(i=k, f=k / 3, b=bool(k & 1), i8=-k % 128, i16=-k * 7, i32=k * 1000, i64=-k << 40,
                   u8=k % 256, u16=k * 3 % 65536, u32=k * 99991 % (1 << 32), u64=(k * 0x9E3779B97F4A7C15) % (1 << 64),
                   f32=k / 7, f64=-k / 11, name=f"named {k} \u00e9\u4e2d", raw=bytes([k % 256]) * (k % 40),
                   data=array("h", range(k % 17)) if k % 3 else None)


def build_base(path, page_size, scale=1.0):
    """Fill a new store at ``path``: everything of the schema, some churn, committed; returns it open."""
    n = lambda count: max(2, int(count * scale))  # noqa: E731
    p = FuzzStorage(path, pageSize=page_size)
    s = p.schema
    r = p.root
    r.scalars = s.Scalars(i=-1, f=2.5, b=True, i8=-128, i16=32767, i32=-5, i64=1 << 62, u8=255, u16=1,
                          u32=1 << 31, u64=(1 << 64) - 1, f32=0.25, f64=-0.0)
    r.named = _named(p, 5)
    r.pair = s.Pair(left=_named(p, 1), right=r.named, weight=1.5)
    r.title = "fuzzing \u2603 " * 3
    r.blob = bytes(range(256)) * 2
    r.matrix = memoryview(array("d", [x / 4 for x in range(12)])).cast("B").cast("d", (3, 4))
    r.big = bytes(range(251)) * n(90)  # a run of several pages
    r.typed = memoryview(array("i", range(-10, 14))).cast("B").cast("i", (2, 3, 4))
    r.ints = list(range(-n(600), n(1400)))
    r.floats = [x / 8 for x in range(n(300))]
    r.names = [f"name {x}" for x in range(n(150))]
    r.items = [_named(p, k) for k in range(n(40))]
    r.nested = [list(range(k)) for k in range(n(20))]
    r.by_name = {f"key {k}".encode(): _named(p, k + 100) for k in range(n(60))}
    # keys longer than KEY_INLINE bytes are string objects the entries refer to; shorter ones are inline
    r.by_name.update({f"a key longer than inline {k}".encode(): _named(p, k + 300) for k in range(n(12))})
    r.counts = {k * 7919 % 100003: k / 3 for k in range(n(500))}
    r.tags = {p.stringRegistry.get(f"tag {k}") for k in range(n(80))}  # interned: shared strings
    r.numbers = set(range(0, n(3000), 7))
    r.groups = {f"group {g}": {f"member {g}.{k}" for k in range(g + 1)} for g in range(n(12))}
    r.by_age = {k * 37 % 10007: f"age {k}" for k in range(n(700))}
    r.by_word = {p.stringRegistry.get(f"word {k:04}"): list(range(k % 9)) for k in range(n(120))}
    r.count = 7
    p.commit()
    # churn: frees slots, pages and runs, so that the free lists and partial slabs are not empty
    del r.ints[n(100):n(900)]
    for k in range(0, n(60), 3):
        del r.by_name[f"key {k}".encode()]
    for k in range(0, n(700), 2):
        del r.by_age[k * 37 % 10007]
    for k in range(0, n(80), 4):
        r.tags.discard(f"tag {k}")
    del r.items[::2]
    r.nested[len(r.nested) // 2] = None
    r.names = r.names[::2]
    r.blob = b"short"
    r.big = bytes(range(200)) * n(40)
    p.commit()
    return p


def build_bases(folder):
    """The base files: a list of ``{"path", "map", "label"}``; each has a ``-wal`` next to it if useful."""
    bases = []
    os.makedirs(folder, exist_ok=True)
    for page_size, scale in ((4096, 1.0), (256, 0.4)):
        path = os.path.join(folder, f"closed-{page_size}.ps")
        build_base(path, page_size, scale).close()
        bases.append(path)
    # a copy taken after a commit while the store is open (as after a crash): with its log, if any
    path = os.path.join(folder, "open-256.ps")
    p = build_base(os.path.join(folder, "live-256.ps"), 256, 0.3)
    shutil.copyfile(p.fileName, path)
    if os.path.exists(p.fileName + F.WAL_SUFFIX):
        shutil.copyfile(p.fileName + F.WAL_SUFFIX, path + F.WAL_SUFFIX)
    p.close()
    bases.append(path)
    if not any(os.path.exists(b + F.WAL_SUFFIX) for b in bases):
        # the library writes no log (yet): one made by hand, so that log mutations run
        path = os.path.join(folder, "handmade-wal-4096.ps")
        shutil.copyfile(bases[0], path)
        write_handmade_wal(path)
        bases.append(path)
    result = []
    for path in bases:
        fmap = describe(path)
        map_path = path + ".map.json"
        with open(map_path, "w") as out:
            json.dump(fmap, out)
        result.append({"path": path, "map": map_path, "label": os.path.basename(path)})
    return result


def write_handmade_wal(path, frames=3):
    """A log for the store at ``path`` from the documented layout: one transaction that rewrites
    ``frames`` units of the file with their present bytes, and its commit frame (the present root)."""
    with open(path, "rb") as f:
        data = f.read()
    head = data[:F.HEADER_BLOCK]
    roots = [F.unpack_root(head[o:o + F.ROOT.size]) for o in F.ROOT_OFFSETS]
    txn, page_count, free_head, slots = max(r for r in roots if r is not None)
    unit = mmap.PAGESIZE
    salt = 0x5A17C0DE
    out = [F.pack_wal_header(unit, salt, txn)]
    size = len(data) // unit * unit
    offsets = sorted({F.HEADER_BLOCK + k * unit for k in range(frames)} | {size - unit})
    offsets = [o for o in offsets if F.HEADER_BLOCK <= o <= size - unit]
    for offset in offsets:
        out.append(_frame(F.FRAME_PAGE, salt, txn + 1, offset, data[offset:offset + unit]))
    out.append(_frame(F.FRAME_COMMIT, salt, txn + 1, len(offsets), F.COMMIT.pack(page_count, free_head, *slots)))
    with open(path + F.WAL_SUFFIX, "wb") as f:
        f.write(b"".join(out))


def _frame(kind, salt, txn, where, payload):
    head = F.FRAME.pack(kind, salt, txn, where, len(payload), 0)
    crc = zlib.crc32(payload, zlib.crc32(head[:28]))
    return head[:28] + F.UINT32.pack(crc) + payload


# -- the map of a base file: where the things the mutator aims at are --------------------
def describe(path):
    """Pages, objects, reference slots and length fields of the store at ``path`` (JSON-able)."""
    with FuzzStorage(path, readonly=True) as p:
        pf = p._page_file
        alloc = p._heap.allocator
        view = pf.mapping.view
        u32 = lambda at: F.UINT32.unpack_from(view(at, 4))[0]  # noqa: E731
        u64 = lambda at: F.UINT64.unpack_from(view(at, 8))[0]  # noqa: E731
        page_size = pf.page_size
        fmap = {"file_size": os.path.getsize(path), "page_size": page_size, "page_count": pf.page_count,
                "alloc_pid": alloc.state_pid, "slabs": [], "runs": [], "free": pf.free_pages(),
                "free_runs": [list(r) for r in alloc.free_runs()], "objects": [], "refs": [],
                "fields": [], "lists": [], "nodes": [], "inline_keys": [], "type_ids": sorted(p._heap.classes),
                "strings": [], "buffers": []}
        skip = set(fmap["free"]) | {alloc.state_pid}
        for pid, length in fmap["free_runs"]:
            skip.update(range(pid, pid + length))
        objects = []
        pid = 0
        while pid < pf.page_count:
            if pid in skip:
                pid += 1
                continue
            page = pf.view(pid)
            kind = page[F.SLAB_AT]
            if kind == F.KIND_SLAB:
                fmap["slabs"].append(pid)
                _, index, used, free_head, bump, _, _ = F.SLAB.unpack_from(page, F.SLAB_AT)
                size = alloc.classes[index]
                free = set()
                slot = free_head
                while slot:
                    free.add(slot - 1)
                    slot = F.UINT32.unpack_from(page, F.SLAB_FIRST_SLOT + (slot - 1) * size)[0]
                base = pf.offset(pid) + F.SLAB_FIRST_SLOT
                objects.extend((base + k * size, size) for k in range(bump) if k not in free)
                pid += 1
            elif kind == F.KIND_RUN:
                length = F.RUN.unpack_from(page, F.RUN_AT)[1]
                fmap["runs"].append([pid, length])
                objects.append((pf.offset(pid) + F.RUN_OBJECT, length * page_size - F.RUN_OBJECT))
                pid += length
            else:
                pid += 1
        classes = p._heap.classes
        for offset, capacity in objects:
            type_id = u32(offset)
            refs, fields = fmap["refs"], fmap["fields"]

            def ref(at, what, owner=offset):
                refs.append([at, owner, what])

            def field(at, width, what):
                fields.append([at, width, what])
            field(offset, 4, "type id")
            field(offset + 4, 4, "reference count")
            cls = classes.get(type_id)
            if type_id in (F.T_SCHEMA, F.T_STRING, F.T_BYTESTRING):
                kind = "schema" if type_id == F.T_SCHEMA else "string"
                field(offset + 8, 4, f"{kind} crc")
                field(offset + 12, 4, f"{kind} length")
                fmap["strings"].append([offset, u32(offset + 12)])
            elif type_id == F.T_REGISTRY:
                kind = "registry"
                field(offset + 8, 8, "registry count")
                field(offset + 16, 8, "registry capacity")
                for k in range(u64(offset + 16)):
                    if u64(offset + 24 + 8 * k) or k % 8 == 0:
                        ref(offset + 24 + 8 * k, f"registry entry {k}")
            elif type_id == F.T_BUFFER:
                kind = "buffer"
                _, _, nbytes, data_offset, itemsize, ndim, fmtlen, high = F.BUFFER.unpack_from(view(offset, 32))
                fmtlen |= high << 8
                for at, width, what in ((8, 8, "nbytes"), (16, 4, "data offset"), (20, 4, "itemsize"),
                                        (24, 1, "ndim"), (25, 1, "format length")):
                    field(offset + at, width, f"buffer {what}")
                shape_at = offset + F.buffer_layout(fmtlen, ndim)[0]
                for k in range(ndim):
                    field(shape_at + 8 * k, 8, f"buffer shape[{k}]")
                fmap["buffers"].append([offset, fmtlen, ndim, data_offset, nbytes])
            elif type_id in C.INTERNAL_TYPES:
                owner = classes[u32(offset + 8)]
                field(offset + 8, 4, "owner type id")
                if type_id == F.T_ARRAY:
                    kind = "array"
                    capacity_cells = u64(offset + 16)
                    field(offset + 16, 8, "array capacity")
                    if owner._ps_cell.is_ref:
                        for k in range(capacity_cells):
                            ref(offset + 24 + 8 * k, f"{owner.__name__} cell {k}")
                elif type_id == F.T_TABLE:
                    kind = "table"
                    _, _, _, _, nslots, used, filled, cap = F.TABLE.unpack_from(view(offset, F.TABLE.size))
                    for at, what in ((16, "nslots"), (24, "used"), (32, "filled"), (40, "capacity")):
                        field(offset + at, 8, f"table {what}")
                    for k in range(0, nslots, max(1, nslots // 16)):
                        field(offset + F.TABLE.size + 4 * k, 4, f"table index {k}")
                    entries_at = offset + F.TABLE.size + -(-4 * nslots // 8) * 8
                    esize = owner._ps_esize
                    for k in range(used):
                        at = entries_at + k * esize
                        field(at, 4, f"entry {k} hash")
                        tag = u32(at + 4)
                        if owner._ps_key.is_ref:  # string keys: inline (tag 2 + length) or a reference (tag 1)
                            field(at + 4, 4, f"entry {k} tag (key kind and length)")
                            if tag == F.TAG_REF:
                                ref(at + 8, f"{owner.__name__} entry {k} key")
                            else:
                                for b in range(0, F.KEY_INLINE, 4):
                                    field(at + 8 + b, 4, f"entry {k} inline key bytes {b}..{b + 3}")
                                fmap["inline_keys"].append([at, tag, owner.__name__])
                        else:
                            field(at + 4, 4, f"entry {k} live flag")
                            field(at + 8, 8, f"entry {k} key")
                        if owner._ps_has_values and owner._ps_value.is_ref:
                            ref(at + owner._ps_value_at, f"{owner.__name__} entry {k} value")
                else:
                    kind = "node"
                    order = owner._ps_order
                    leaf, n = view(offset + 12, 1)[0], int.from_bytes(view(offset + 14, 2), "little")
                    field(offset + 12, 1, "node leaf flag")
                    field(offset + 14, 2, "node key count")
                    ref(offset + 16, "node next leaf")
                    ref(offset + 24, "node previous leaf")
                    fmap["nodes"].append([offset, leaf, owner.__name__])
                    keys_at = offset + F.NODE.size
                    values_at = keys_at + 8 * (order + 1)
                    for k in range(n):
                        if owner._ps_key.is_ref:
                            ref(keys_at + 8 * k, f"node key {k}")
                        else:
                            field(keys_at + 8 * k, 8, f"node key {k}")
                    if leaf:
                        if owner._ps_value.is_ref:
                            for k in range(n):
                                ref(values_at + 8 * k, f"node value {k}")
                    else:
                        for k in range(n + 1):
                            ref(values_at + 8 * k, f"node child {k}")
                            field(values_at + 8 * (order + 2) + 8 * k, 8, f"node subtree count {k}")
            elif cls is not None and cls._ps_kind in C.KINDS:
                kind = cls._ps_kind
                field(offset + 8, 8, f"{kind} count")
                field(offset + 24, 8, f"{kind} aux")
                ref(offset + 16, f"{cls.__name__} body")
                if kind == "list":
                    fmap["lists"].append([offset, u64(offset + 16)])
            elif cls is not None and cls._ps_kind == "structure":
                kind = "structure"
                for name in cls._ps_field_types:
                    hidden = getattr(cls, "_ps_ref_" + name, None)
                    if hidden is not None:
                        ref(offset + hidden.offset, f"{cls.__name__}.{name}")
                    else:
                        cfield = getattr(cls, name)
                        field(offset + cfield.offset, cfield.size, f"{cls.__name__}.{name}")
            else:
                kind = f"type {type_id}"
            fmap["objects"].append([offset, capacity, kind])
        slots = pf.slots
        fmap["slots"] = list(slots)
        fmap["txn"] = pf.txn
        fmap["current_root"] = pf._current_root
    wal = path + F.WAL_SUFFIX
    fmap["wal"] = describe_wal(wal) if os.path.exists(wal) else None
    return fmap


def describe_wal(path):
    """The frames of the log at ``path``, read by the documented layout: ``{"size", "frames"}``."""
    with open(path, "rb") as f:
        data = f.read()
    return {"size": len(data), "frames": describe_wal_bytes(data)}


def describe_wal_bytes(data):
    """``[offset, kind, txn, file offset or page-frame count, data length]`` of each whole frame."""
    frames = []
    at = F.WAL_HEADER.size
    while at + F.FRAME.size <= len(data):
        kind, _, txn, where, length, _ = F.FRAME.unpack_from(data, at)
        if kind not in (F.FRAME_PAGE, F.FRAME_COMMIT) or at + F.FRAME.size + length > len(data):
            break
        frames.append([at, kind, txn, where, length])
        at += F.FRAME.size + length
    return frames


# =====================================================================================
# The mutator
# =====================================================================================
class Mutation:
    """The bytes being damaged, the base file's map and a record of what was done."""

    def __init__(self, data, wal, fmap, rng):
        self.data = bytearray(data)
        self.wal = None if wal is None else bytearray(wal)
        self.fmap = fmap
        self.rng = rng
        self.notes = []

    def note(self, text):
        self.notes.append(text)

    # -- primitives --
    def get(self, at, width, buf=None):
        buf = self.data if buf is None else buf
        if at < 0 or at + width > len(buf):
            return None
        return int.from_bytes(buf[at:at + width], "little")

    def put(self, at, width, value, what, buf=None):
        buf = self.data if buf is None else buf
        if at < 0 or at + width > len(buf):
            return False
        old = self.get(at, width, buf)
        value &= (1 << (8 * width)) - 1
        buf[at:at + width] = value.to_bytes(width, "little")
        where = "log " if buf is self.wal else ""
        self.note(f"{where}{what} @{at:#x}: {old:#x} -> {value:#x}")
        return True

    def flip(self, at, what, bits=1, buf=None):
        buf = self.data if buf is None else buf
        if not 0 <= at < len(buf):
            return
        for _ in range(bits):
            bit = self.rng.randrange(8)
            buf[at] ^= 1 << bit
        where = "log " if buf is self.wal else ""
        self.note(f"{where}{what}: flipped {bits} bit(s) of byte {at:#x}")

    def hostile(self, width, current=0):
        """A value for a ``width``-byte unsigned field that a careless reader trusts."""
        top = (1 << (8 * width)) - 1
        size = len(self.data)
        rng = self.rng
        return rng.choice([
            0, 1, 2, 3, 7, 8, top, top - 1, top >> 1, (top >> 1) + 1, current + 1, current - 1,
            current * 2 + 1, current + rng.randrange(1, 1000), current ^ (1 << rng.randrange(8 * width)),
            size, size // 8, size + 1, size * 2, 1 << 31, (1 << 32) - 1, 1 << 32, 64, 65, 255, 256,
            rng.randrange(top + 1), rng.randrange(min(top, 4 * size) + 1)])

    def hostile_ref(self, slot, owner):
        """``(offset, why)``: a reference that points somewhere it must not."""
        rng, fmap = self.rng, self.fmap
        size = len(self.data)
        objects = fmap["objects"]
        other = rng.choice(objects)[0]
        page_size = fmap["page_size"]
        choices = [
            (size + 8 * rng.randrange(0, 1000), "outside the file"),
            (size - 8, "at the last 8 bytes of the file"),
            (size - 16, "16 bytes before the end of the file"),
            (rng.choice([1 << 63, (1 << 64) - 8, (1 << 64) - 1, 1 << 40, 1 << 32]), "far outside"),
            (other + rng.randrange(1, 8), "unaligned"),
            (other + 8 * rng.randrange(1, 4), "into the middle of an object"),
            (owner, "at its own object (a cycle)"),
            (other, "at another object"),
            (rng.choice([8, 512, 1024, 2048, F.HEADER_BLOCK - 8]), "into the header block"),
            (F.HEADER_BLOCK + page_size * rng.randrange(fmap["page_count"] + 1), "at a page header"),
            (F.HEADER_BLOCK + page_size * fmap["alloc_pid"] + 16, "into the allocator page"),
            (slot, "at the reference itself"),
        ]
        if fmap["free"]:
            choices.append((F.HEADER_BLOCK + page_size * rng.choice(fmap["free"]) + 32, "into a free page"))
        return rng.choice(choices)

    def pick_field(self, words):
        fields = [f for f in self.fmap["fields"] if any(w in f[2] for w in words)]
        return self.rng.choice(fields) if fields else None


def _pid_values(m):
    count = m.fmap["page_count"]
    return [-1, -2, -3, 0, count - 1, count, count + 1, 1 << 30, -(1 << 31), m.fmap["alloc_pid"],
            m.rng.randrange(max(count, 1))]


# -- strategies on the store file ---------------------------------------------------------
def s_bitflips(m):
    """Random bit flips anywhere in the file."""
    for _ in range(m.rng.choice([1, 1, 2, 4, 16])):
        m.flip(m.rng.randrange(len(m.data)), "anywhere")


def s_header(m):
    """The static header: flips, or a hostile field with the checksum recomputed."""
    rng = m.rng
    if rng.random() < 0.4:
        m.flip(rng.randrange(F.HEADER.size), "static header", bits=rng.choice([1, 3]))
        return
    at, width, what = rng.choice([(8, 4, "format version"), (12, 4, "flags"), (16, 4, "page size"),
                                  (20, 4, "header block size"), (0, 8, "magic")])
    value = rng.choice([0, 1, 2, 128, 255, 256, 512, 4096, 8192, 65536, 1 << 17, m.hostile(width)])
    m.put(at, width, value, f"static header {what}")
    m.put(60, 4, zlib.crc32(bytes(m.data[:60])), "static header crc (recomputed)")


def _root_at(m, which=None):
    if which is None:
        which = m.rng.randrange(2)
    return F.ROOT_OFFSETS[which], "AB"[which]


def s_root_flip(m):
    """A root record: random flips (its checksum then fails)."""
    at, name = _root_at(m)
    m.flip(at + m.rng.randrange(F.ROOT.size), f"root record {name}", bits=m.rng.choice([1, 2, 8]))


def s_root_forged(m):
    """The current root record with a hostile field and a valid checksum."""
    rng = m.rng
    at, name = _root_at(m, m.fmap["current_root"] if rng.random() < 0.8 else None)
    slot_names = ["schema", "root", "registry", "allocator"]
    choice = rng.randrange(6)
    if choice == 0:
        m.put(at + 8, 8, rng.choice([0, 1, m.fmap["page_count"] - 1, m.fmap["page_count"] + 1,
                                     (len(m.data) - F.HEADER_BLOCK) // m.fmap["page_size"], 1 << 40,
                                     m.hostile(8, m.fmap["page_count"])]), f"root {name} page count")
    elif choice == 1:
        m.put(at + 16, 8, rng.choice(_pid_values(m)), f"root {name} free-page head")
    elif choice in (2, 3):
        index = rng.randrange(4)
        slot = at + 24 + 8 * index
        if index == 3:
            value = rng.choice(_pid_values(m) + [rng.choice(m.fmap["slabs"] or [0])])
            m.put(slot, 8, value, f"root {name} slot {slot_names[index]} (page id)")
        else:
            value, why = m.hostile_ref(slot, 0)
            if index == 1 and rng.random() < 0.3:
                value, why = 0, "none: the root is created again"
            elif rng.random() < 0.5:
                value = rng.choice([slots for slots in m.fmap["slots"][:3] if slots] or [0])
                why = "another slot's object"
            m.put(slot, 8, value, f"root {name} slot {slot_names[index]} ({why})")
    elif choice == 4:
        m.put(at, 8, rng.choice([0, 1, (1 << 64) - 1, m.fmap["txn"] + 5]), f"root {name} transaction")
    else:
        m.put(at + 24 + 8 * rng.randrange(4, 8), 8, m.hostile(8), f"root {name} spare slot")
    m.put(at + 124, 4, zlib.crc32(bytes(m.data[at:at + 124])), f"root {name} crc (recomputed)")


def _page_at(m, pid):
    return F.HEADER_BLOCK + pid * m.fmap["page_size"]


def s_alloc_page(m):
    """The allocator page: kind, flags, class count, partial-list heads, bin heads, merge counters."""
    rng = m.rng
    base = _page_at(m, m.fmap["alloc_pid"])
    choice = rng.randrange(5)
    if choice == 0:
        at, width, what = rng.choice([(4, 1, "kind"), (5, 1, "flags"), (8, 4, "class count")])
        m.put(base + at, width, rng.choice([0, 1, 2, 3, 255, m.hostile(width)]), f"allocator page {what}")
    elif choice == 1:
        index = rng.randrange(len(F.size_classes(m.fmap["page_size"])))
        m.put(base + F.ALLOC_HEADS_AT + 4 * index, 4, rng.choice(_pid_values(m) + m.fmap["slabs"][:3]),
              f"allocator partial-list head of class {index}")
    elif choice == 2:
        index = rng.randrange(len(F.RUN_BIN_MIN))
        at = base + 12 if index == len(F.RUN_BIN_MIN) - 1 else base + F.RUN_BINS_AT + 4 * index
        runs = [r[0] for r in m.fmap["runs"]] + [r[0] for r in m.fmap["free_runs"]]
        m.put(at, 4, rng.choice(_pid_values(m) + runs[:4]), f"allocator free-run bin {index} head")
    elif choice == 3:
        m.put(base + F.MERGE_AT + 4 * rng.randrange(2), 4, m.hostile(4), "allocator merge counter")
    else:
        m.flip(base + rng.randrange(m.fmap["page_size"]), "allocator page", bits=4)


def s_page_headers(m):
    """Page headers (free-page links): hostile values, a cycle on the free-page list."""
    rng = m.rng
    count = m.fmap["page_count"]
    if m.fmap["free"] and rng.random() < 0.5:
        pid = rng.choice(m.fmap["free"])
        target = rng.choice([pid, m.fmap["free"][0], -2, count, 1 << 30, -7])
        m.put(_page_at(m, pid), 4, target, f"free page {pid} link (cycle or out of range)")
        return
    pid = rng.randrange(count)
    m.put(_page_at(m, pid), 4, rng.choice(_pid_values(m)), f"page {pid} header")


def s_slab_header(m):
    """A slab header: kind, size class, used, free head, bump, partial links."""
    rng = m.rng
    if not m.fmap["slabs"]:
        return s_bitflips(m)
    pid = rng.choice(m.fmap["slabs"])
    base = _page_at(m, pid) + F.SLAB_AT
    at, width, what = rng.choice([(0, 1, "kind"), (1, 1, "size class"), (2, 2, "used"), (4, 2, "free head"),
                                  (6, 2, "bump"), (8, 4, "next partial"), (12, 4, "previous partial")])
    value = rng.choice(_pid_values(m)) if width == 4 else m.hostile(width)
    m.put(base + at, width, value, f"slab {pid} {what}")


def s_run_header(m):
    """A run or free-run header: kind, length, next."""
    rng = m.rng
    runs = [("run", r) for r in m.fmap["runs"]] + [("free run", r) for r in m.fmap["free_runs"]]
    if not runs:
        return s_bitflips(m)
    kind, (pid, length) = rng.choice(runs)
    base = _page_at(m, pid)
    choice = rng.randrange(3)
    if choice == 0:
        m.put(base + 4, 1, rng.choice([0, 1, 2, 3, 4, 9]), f"{kind} {pid} kind")
    elif choice == 1:
        m.put(base + 8, 4, rng.choice([0, 1, length - 1, length + 1, m.fmap["page_count"], 1 << 31,
                                       m.hostile(4, length)]), f"{kind} {pid} length")
    else:
        m.put(base + 12, 4, rng.choice(_pid_values(m) + [pid]), f"{kind} {pid} next")


def s_type_ids(m):
    """Object type ids (another known type, an internal type, garbage) and owner type ids."""
    rng = m.rng
    offset, _, kind = rng.choice(m.fmap["objects"])
    known = m.fmap["type_ids"] + list(C.INTERNAL_TYPES) + [F.T_SCHEMA, F.T_REGISTRY]
    value = rng.choice(known + [0, 1, 63, 1 << 20, 0xFFFFFFFF, m.hostile(4)])
    if kind in ("array", "table", "node") and rng.random() < 0.4:
        m.put(offset + 8, 4, value, f"owner type id of the {kind} at {offset:#x}")
    else:
        m.put(offset, 4, value, f"type id of the {kind} at {offset:#x}")


def s_refcounts(m):
    """Reference counts: 0, 1, the maximum, off by one."""
    rng = m.rng
    offset, _, kind = rng.choice(m.fmap["objects"])
    current = m.get(offset + 4, 4) or 0
    m.put(offset + 4, 4, rng.choice([0, 1, current - 1, current + 1, 0xFFFFFFFF, 0xFFFFFFFE]),
          f"reference count of the {kind} at {offset:#x}")


def s_fields(words, doc):
    def strategy(m):
        found = m.pick_field(words)
        if found is None:
            return s_bitflips(m)
        at, width, what = found
        m.put(at, width, m.hostile(width, m.get(at, width) or 0), what)
    strategy.__doc__ = doc
    strategy.__name__ = "s_" + words[0].replace(" ", "_")
    return strategy


s_collection_headers = s_fields(["count", " aux"], "Collection counts and modification numbers.")
s_internal_sizes = s_fields(["array capacity", "table ", "node key count", "node leaf", "subtree count"],
                            "Capacities of arrays, hash table sizes, tree node key counts and subtree counts.")
s_string_lengths = s_fields(["string length", "string crc", "schema length", "registry"],
                            "String lengths and hashes, the registry's count and capacity.")
s_buffer_meta = s_fields(["buffer"], "Buffer nbytes, data offset, itemsize, ndim, format length, shape.")
s_entries = s_fields(["entry", "node key "], "Hash table entries (hash, live flag, number keys), number keys of nodes.")


def s_inline_keys(m):
    """Short string keys inline in hash table entries: the tag (kind and length), the key bytes."""
    rng = m.rng
    keys = m.fmap["inline_keys"]
    if not keys:
        return s_entries(m)
    at, tag, owner = rng.choice(keys)
    choice = rng.randrange(5)
    if choice == 0:  # a length past the 16 bytes, or a tag of no kind
        m.put(at + 4, 4, rng.choice([F.TAG_INLINE + F.KEY_INLINE + 1, 0x7FFFFFFF, 0xFFFFFFFF, 3 + rng.randrange(64)]),
              f"{owner} entry at {at:#x}: tag {tag} -> a length out of range")
    elif choice == 1:  # says "a reference": the key bytes become an offset
        m.put(at + 4, 4, F.TAG_REF, f"{owner} entry at {at:#x}: inline key claimed to be a reference")
    elif choice == 2:  # bytes after the key's length not zero
        m.put(at + 8 + F.KEY_INLINE - 1, 1, 0x41, f"{owner} entry at {at:#x}: a byte after the inline key")
    elif choice == 3:  # not UTF-8 (a String key) or another key (a ByteString key)
        m.put(at + 8, 2, 0xFFFF, f"{owner} entry at {at:#x}: inline key bytes 0xff 0xff")
    else:  # the live flag of a number entry given to a string entry, or the key made shorter
        m.put(at + 4, 4, rng.choice([1, F.TAG_INLINE, max(F.TAG_INLINE, tag - 1)]),
              f"{owner} entry at {at:#x}: tag {tag} changed")
s_scalars = s_fields(["Scalars.", "Named.", "Pair.weight"], "Scalar fields of structures (any value is valid).")


def s_buffer_format(m):
    """The format text of a buffer: NUL bytes, non-ASCII, nonsense, shortened."""
    rng = m.rng
    if not m.fmap["buffers"]:
        return s_bitflips(m)
    offset, fmtlen, ndim, data_offset, nbytes = rng.choice(m.fmap["buffers"])
    start = offset + F.BUFFER.size
    garbage = rng.choice([b"\x00", b"\xff", b"\xe9", b"T{", b"(", b"x", b"Q", b"@", b"0", b"<Zq", b"h", b"e",
                          b"?", b"c", b"P", b"d", b"b"])
    if fmtlen == 0:
        m.put(offset + 25, 1, len(garbage), "buffer format length (was 0)")
    where = start + rng.randrange(max(fmtlen, 1))
    m.data[where:where + len(garbage)] = garbage
    m.note(f"buffer {offset:#x} format byte(s) @{where:#x} set to {garbage!r}")


def s_schema(m):
    """The stored schema (JSON text): hostile ids, names, kinds, bases and field types, bad JSON."""
    rng = m.rng
    offset = m.fmap["slots"][0]
    capacity = next((o[1] for o in m.fmap["objects"] if o[0] == offset), 0)
    length = m.get(offset + 12, 4)
    if not capacity or length is None:
        return s_bitflips(m)
    text = bytes(m.data[offset + 16:offset + 16 + length])
    try:
        schema = json.loads(text)
        types = schema["types"]
        if not (isinstance(types, list) and types
                and all(isinstance(t, dict) and "id" in t and "name" in t for t in types)):
            raise ValueError("not a list of types")
        entry = rng.choice(types)
    except (ValueError, KeyError, TypeError, RecursionError):
        return s_bitflips(m)  # an earlier mutation of this case broke it already
    structures = [t for t in types if isinstance(t, dict) and t.get("kind") == "structure"
                  and isinstance(t.get("fields"), list) and t["fields"]
                  and all(isinstance(f, list) and len(f) == 2 for f in t["fields"])]
    choice = rng.randrange(10)
    if choice == 0:
        entry["id"] = rng.choice([1e400, -1e400, -5, 0, 19, 63, 1 << 40, "64", None, [64], 1.5, types[0]["id"]])
        what = f"type {entry['name']} id -> {entry['id']!r}"
    elif choice == 1:
        entry["name"] = rng.choice(["", "not an identifier", "Structure", "__class__", "_storage", "Root",
                                    "schema", types[0]["name"], "\u00e9t\u00e9", 7, None, "None", "class"])
        what = f"a type name -> {entry['name']!r}"
    elif choice == 2 and structures:
        victim = rng.choice(structures)
        field = rng.choice(victim["fields"])
        field[0] = rng.choice(["__slots__", "_fields_", "_ps_x", "", "9", "mro", "__init__", "_storage",
                               "__class__", "isSameAs", "_b_base_", victim["fields"][0][0]])
        what = f"a field name of {victim['name']} -> {field[0]!r}"
    elif choice == 3 and structures:
        victim = rng.choice(structures)
        field = rng.choice(victim["fields"])
        field[1] = rng.choice([0, 14, 15, 19, 20, 30, 31, 32, 34, 63, victim["id"], 1 << 33, -1, 1e400, "1", None]
                              + [t["id"] for t in types])
        what = f"a field type of {victim['name']} -> {field[1]!r}"
    elif choice == 4:
        entry["kind"] = rng.choice(["structure", "list", "dict", "set", "sorteddict", "tuple", None, 5])
        what = f"kind of {entry.get('name')!r} -> {entry['kind']!r}"
    elif choice == 5:
        if "params" in entry:
            entry["params"] = rng.choice([[], [1, 2, 3], [entry["id"]], [19], [18, 1], [65, 1], ["x"], None,
                                          [t["id"] for t in types][:2]])
            what = f"params of {entry['name']} -> {entry['params']!r}"
        else:
            entry["base"] = rng.choice([entry["id"], 0, 17, 67, 1 << 40, None, -1, 1e400])
            what = f"base of {entry['name']} -> {entry['base']!r}"
    elif choice == 6:
        victim = rng.choice(structures or types)
        victim["fields"] = rng.choice([None, 5, [[1]], [["a", 1, 2]], [["a", 1]] * 3, "ab", {"a": 1}])
        what = f"fields of {victim['name']} -> {victim['fields']!r}"
    elif choice == 7:
        rng.shuffle(types)
        what = "the types in another order (a base after its subclass)"
    elif choice == 8:
        schema = rng.choice([[], {}, {"types": {}}, {"types": [1, 2]}, {"types": None}, "x", 5, None,
                             {"types": types + types}])
        what = f"the schema -> {json.dumps(schema)[:60]}"
    else:
        raw = rng.choice([b"[" * 1200, b'{"types":' * 600, b"", b"\xff\xfe", text[:len(text) // 2],
                          b'{"types":[' + b'{"id":64},' * 50 + b"1]}"])
        m.put(offset + 12, 4, len(raw), "schema length")
        m.data[offset + 16:offset + 16 + len(raw)] = raw
        m.note(f"schema text -> {raw[:40]!r}... ({len(raw)} bytes)")
        return
    raw = json.dumps(schema, separators=(",", ":")).encode()
    if len(raw) > capacity - 16:
        raw = raw[:capacity - 16]
        what += " (cut to fit)"
    m.data[offset + 16:offset + 16 + len(raw)] = raw
    m.put(offset + 12, 4, len(raw), "schema length")
    m.put(offset + 8, 4, F.string_hash(F.T_SCHEMA, raw), "schema hash")
    m.note("schema: " + what)


def s_references(m):
    """A reference slot overwritten: outside the file, unaligned, mid-object, a cycle, another type."""
    slot, owner, what = m.rng.choice(m.fmap["refs"])
    value, why = m.hostile_ref(slot, owner)
    m.put(slot, 8, value, f"{what} ({why})")


def s_list_bodies(m):
    """Lists sharing their arrays, or an array cell pointing at the list that (indirectly) holds it."""
    rng = m.rng
    lists = m.fmap["lists"]
    if len(lists) < 2:
        return s_references(m)
    (a, body_a), (b, body_b) = rng.sample(lists, 2)
    choice = rng.randrange(3)
    if choice == 0:
        m.put(a + 16, 8, body_b, f"list {a:#x} body -> the array of list {b:#x} (shared)")
        if rng.random() < 0.5:
            m.put(a + 24, 8, m.get(b + 24, 8), f"list {a:#x} capacity := that of list {b:#x}")
    elif choice == 1:
        m.put(a + 16, 8, body_b, f"list {a:#x} body -> {body_b:#x}")
        m.put(b + 16, 8, body_a, f"list {b:#x} body -> {body_a:#x} (swapped)")
    else:
        cells = [r for r in m.fmap["refs"] if "cell" in r[2]]
        if not cells:
            return s_references(m)
        slot, owner, what = rng.choice(cells)
        target = rng.choice([a, b, owner, rng.choice(lists)[0]])
        m.put(slot, 8, target, f"{what} -> list {target:#x} (cycle through lists)")


def s_tree_links(m):
    """B+tree nodes: leaf links in a cycle, a child that is an ancestor, leaf flags flipped."""
    rng = m.rng
    nodes = m.fmap["nodes"]
    if not nodes:
        return s_references(m)
    offset, leaf, owner = rng.choice(nodes)
    others = [n[0] for n in nodes if n[2] == owner] or [offset]
    choice = rng.randrange(3)
    if choice == 0:
        m.put(offset + 16 + 8 * rng.randrange(2), 8, rng.choice([offset] + others),
              f"{owner} node {offset:#x} leaf link -> a node of the same tree (cycle)")
    elif choice == 1 and not leaf:
        order = (m.fmap["page_size"] - F.RUN_OBJECT - F.NODE.size - 40) // 24
        child = offset + F.NODE.size + 8 * (order + 1) + 8 * rng.randrange(2)
        m.put(child, 8, rng.choice([offset] + others), f"{owner} node {offset:#x} child -> an ancestor or sibling")
    else:
        m.put(offset + 12, 1, 1 - leaf, f"{owner} node {offset:#x} leaf flag flipped")


def s_truncate(m):
    """Truncation: anywhere, at a page boundary, inside the header block, to almost nothing."""
    rng = m.rng
    size, page_size = len(m.data), m.fmap["page_size"]
    if size < 2:
        return
    pages = (size - F.HEADER_BLOCK) // page_size
    pages = max(pages, 4)
    length = rng.choice([
        rng.randrange(size), F.HEADER_BLOCK + page_size * rng.randrange(pages + 1),
        F.HEADER_BLOCK + page_size * (pages - rng.randrange(1, 4)), size - rng.randrange(1, page_size + 1),
        F.HEADER_BLOCK, rng.randrange(F.HEADER_BLOCK), 0, 7, 64, 1100, size - mmap.PAGESIZE,
        size // mmap.PAGESIZE * mmap.PAGESIZE - page_size])
    length = max(0, length)
    del m.data[length:]
    m.note(f"truncated to {length:#x} bytes (was {size:#x})")


def s_extend(m):
    """Bytes appended after the last page: zeros, garbage, a partial page."""
    rng = m.rng
    extra = rng.choice([1, 100, m.fmap["page_size"], 3 * m.fmap["page_size"] + 5, 65536])
    fill = bytes(extra) if rng.random() < 0.5 else rng.randbytes(extra)
    m.data.extend(fill)
    m.note(f"appended {extra} bytes")


def s_pages(m):
    """Whole pages: garbage, zeros, 0xFF, a copy of another page, garbage behind a valid page header."""
    rng = m.rng
    page_size, count = m.fmap["page_size"], m.fmap["page_count"]
    targets = list(range(count))
    pid = rng.choice(targets + [m.fmap["alloc_pid"]] * 3 + m.fmap["slabs"][:5] + [r[0] for r in m.fmap["runs"]][:5])
    start = _page_at(m, pid)
    if rng.random() < 0.05:
        start, page_size, pid = 0, F.HEADER_BLOCK, "header block"
    choice = rng.randrange(5)
    if choice == 0:
        block, how = rng.randbytes(page_size), "random bytes"
    elif choice == 1:
        block, how = bytes(page_size), "zeros"
    elif choice == 2:
        block, how = b"\xff" * page_size, "0xFF bytes"
    elif choice == 3:
        other = rng.randrange(count)
        block, how = bytes(m.data[_page_at(m, other):_page_at(m, other) + page_size]), f"a copy of page {other}"
    else:
        block = bytearray(rng.randbytes(page_size))
        block[:F.SLAB_AT + 2] = m.data[start:start + F.SLAB_AT + 2]  # header and kind kept
        how = "garbage behind its page header and kind"
    m.data[start:start + len(block)] = block[:max(0, len(m.data) - start)]
    m.note(f"page {pid} overwritten with {how}")


# -- strategies on the write-ahead log ----------------------------------------------------
def _wal_frames(m):
    return describe_wal_bytes(m.wal)


def _fix_frame_crc(m, at, length):
    head = bytes(m.wal[at:at + 28])
    data = bytes(m.wal[at + F.FRAME.size:at + F.FRAME.size + length])
    m.put(at + 28, 4, zlib.crc32(data, zlib.crc32(head)), "frame crc (recomputed)", m.wal)


def w_header(m):
    """The log header: flips, or a hostile field with its checksum recomputed."""
    rng = m.rng
    if rng.random() < 0.4:
        m.flip(rng.randrange(F.WAL_HEADER.size), "log header", bits=rng.choice([1, 3]), buf=m.wal)
        return
    at, width, what = rng.choice([(8, 4, "version"), (12, 4, "unit"), (16, 4, "salt"), (24, 8, "base transaction")])
    current = m.get(at, width, m.wal) or 0
    value = rng.choice([0, 1, 2, 255, 4095, 4097, 8192, 1 << 31, current + 1, current - 1, m.hostile(width, current)])
    m.put(at, width, value, f"log header {what}", m.wal)
    m.put(60, 4, zlib.crc32(bytes(m.wal[:60])), "log header crc (recomputed)", m.wal)


def w_frame_header(m):
    """A frame header: kind, salt, transaction, offset or count, length; checksum fixed or not."""
    rng = m.rng
    frames = _wal_frames(m)
    if not frames:
        return w_garbage(m)
    at, kind, txn, where, length = rng.choice(frames)
    field_at, width, what = rng.choice([(0, 4, "kind"), (4, 4, "salt"), (8, 8, "transaction"),
                                        (16, 8, "offset or page-frame count"), (24, 4, "data length")])
    current = m.get(at + field_at, width, m.wal)
    size = len(m.data)
    if field_at == 16 and kind == F.FRAME_PAGE:
        value = rng.choice([size, size + mmap.PAGESIZE, 1 << 62, (1 << 64) - mmap.PAGESIZE, 0, 512,
                            where + 1, where + mmap.PAGESIZE * 1000, m.hostile(8, where)])
    elif field_at == 0:
        value = rng.choice([0, 3, F.FRAME_PAGE, F.FRAME_COMMIT, 0xFFFFFFFF])
    else:
        value = m.hostile(width, current)
    m.put(at + field_at, width, value, f"frame @{at:#x} {what}", m.wal)
    if rng.random() < 0.7:
        _fix_frame_crc(m, at, length)


def w_commit_frame(m):
    """The commit frame's root state: hostile page count, free head, slots; checksum recomputed."""
    rng = m.rng
    commits = [f for f in _wal_frames(m) if f[1] == F.FRAME_COMMIT]
    if not commits:
        return w_frame_header(m)
    at, _, _, _, length = rng.choice(commits)
    data_at = at + F.FRAME.size
    index = rng.randrange(2 + F.ROOT_SLOTS)
    if index == 0:
        m.put(data_at, 8, rng.choice([0, m.fmap["page_count"] + 1, 1 << 40, m.hostile(8, m.fmap["page_count"])]),
              "commit frame page count", m.wal)
    elif index == 1:
        m.put(data_at + 8, 8, rng.choice(_pid_values(m)), "commit frame free-page head", m.wal)
    else:
        value, why = m.hostile_ref(0, 0)
        m.put(data_at + 16 + 8 * (index - 2), 8, value, f"commit frame slot {index - 2} ({why})", m.wal)
    _fix_frame_crc(m, at, length)


def w_page_frame(m):
    """A page frame's data: flips (checksum then fails) or garbage with a valid checksum."""
    rng = m.rng
    pages = [f for f in _wal_frames(m) if f[1] == F.FRAME_PAGE and f[4]]
    if not pages:
        return w_frame_header(m)
    at, _, _, where, length = rng.choice(pages)
    data_at = at + F.FRAME.size
    if rng.random() < 0.3:
        m.flip(data_at + rng.randrange(length), f"page frame @{at:#x} data", bits=3, buf=m.wal)
        return
    # damage the page image the frame would write into the store, then make its checksum right
    start = rng.randrange(length)
    chunk = rng.randbytes(min(length - start, rng.choice([8, 64, length])))
    m.wal[data_at + start:data_at + start + len(chunk)] = chunk
    m.note(f"page frame @{at:#x} (for file offset {where:#x}): {len(chunk)} garbage bytes at +{start}")
    _fix_frame_crc(m, at, length)


def w_truncate(m):
    """The log truncated: anywhere, at a frame boundary, inside the header."""
    rng = m.rng
    frames = _wal_frames(m)
    size = len(m.wal)
    boundaries = [f[0] for f in frames] + [f[0] + F.FRAME.size for f in frames]
    length = rng.choice([rng.randrange(size + 1), rng.randrange(F.WAL_HEADER.size), 0,
                         rng.choice(boundaries or [F.WAL_HEADER.size]), size - 1])
    del m.wal[length:]
    m.note(f"log truncated to {length:#x} bytes (was {size:#x})")


def w_reorder(m):
    """Frames dropped, repeated or swapped."""
    rng = m.rng
    frames = _wal_frames(m)
    if len(frames) < 2:
        return w_garbage(m)
    pieces = [bytes(m.wal[f[0]:f[0] + F.FRAME.size + f[4]]) for f in frames]
    tail = bytes(m.wal[frames[-1][0] + F.FRAME.size + frames[-1][4]:])
    choice = rng.randrange(3)
    i, j = rng.sample(range(len(pieces)), 2)
    if choice == 0:
        del pieces[i]
        what = f"frame {i} dropped"
    elif choice == 1:
        pieces.insert(j, pieces[i])
        what = f"frame {i} repeated at {j}"
    else:
        pieces[i], pieces[j] = pieces[j], pieces[i]
        what = f"frames {i} and {j} swapped"
    m.wal[F.WAL_HEADER.size:] = b"".join(pieces) + tail
    m.note("log " + what)


def w_garbage(m):
    """Garbage appended to the log, or a forged extra transaction with valid checksums."""
    rng = m.rng
    if rng.random() < 0.5:
        extra = rng.randbytes(rng.choice([1, 31, 32, 100, 5000]))
        m.wal.extend(extra)
        m.note(f"log: {len(extra)} garbage bytes appended")
        return
    salt = m.get(16, 4, m.wal) or 0
    frames = _wal_frames(m)
    txn = (max([f[2] for f in frames] + [m.get(24, 8, m.wal) or 0]) + 1) & ((1 << 64) - 1)  # (a forged 2**64-1)
    unit = mmap.PAGESIZE
    where = rng.choice([len(m.data), len(m.data) + 7 * unit, 0, F.HEADER_BLOCK, 1 << 50,
                        F.HEADER_BLOCK + unit * rng.randrange(max(1, len(m.data) // unit))])
    page = rng.randbytes(unit) if rng.random() < 0.5 else bytes(unit)
    value, why = m.hostile_ref(0, 0)
    slots = list(m.fmap["slots"])
    slots[rng.randrange(4)] = value
    commit = F.COMMIT.pack(rng.choice([m.fmap["page_count"], 1 << 33]) & ((1 << 64) - 1),
                           rng.choice([-1, 0, 1 << 30]), *[s & ((1 << 64) - 1) for s in slots])
    count = rng.choice([1, 1, 0, 2, 1 << 40])
    m.wal.extend(_frame(F.FRAME_PAGE, salt, txn, where, page)
                 + _frame(F.FRAME_COMMIT, salt, txn, count, commit))
    m.note(f"log: forged transaction {txn} writing a page at {where:#x}, commit with a slot {why}, "
           f"{count} page frame(s) announced")


STORE_STRATEGIES = [
    (s_bitflips, 8), (s_header, 3), (s_root_flip, 2), (s_root_forged, 6), (s_alloc_page, 5),
    (s_page_headers, 4), (s_slab_header, 5), (s_run_header, 4), (s_type_ids, 6), (s_refcounts, 3),
    (s_collection_headers, 6), (s_internal_sizes, 6), (s_string_lengths, 5), (s_buffer_meta, 6),
    (s_buffer_format, 3), (s_entries, 4), (s_inline_keys, 3), (s_scalars, 1), (s_references, 12), (s_schema, 4), (s_list_bodies, 4),
    (s_tree_links, 4), (s_truncate, 5), (s_extend, 2), (s_pages, 5),
]
WAL_STRATEGIES = [
    (w_header, 3), (w_frame_header, 4), (w_commit_frame, 4), (w_page_frame, 3), (w_truncate, 3),
    (w_reorder, 2), (w_garbage, 3),
]


RESIZING = (s_truncate, s_extend, w_truncate, w_reorder, w_garbage)


def mutate(data, wal, fmap, seed):
    """``(data, wal, notes)``: the base bytes damaged by seeded strategies, and what was done."""
    rng = random.Random(seed)
    m = Mutation(data, wal, fmap, rng)
    count = rng.choice([1, 1, 1, 1, 1, 2, 2, 3, 4])
    chosen = []
    for _ in range(count):
        strategies = STORE_STRATEGIES
        if m.wal is not None and rng.random() < 0.4:
            strategies = WAL_STRATEGIES
        functions, weights = zip(*strategies)
        chosen.append(rng.choices(functions, weights)[0])
    # the strategies that change sizes last: the others aim at offsets of the base file
    chosen.sort(key=lambda strategy: strategy in RESIZING)
    for strategy in chosen:
        before = len(m.notes)
        strategy(m)
        if len(m.notes) == before:
            m.note(f"{strategy.__name__}: nothing to do")
    return bytes(m.data), None if m.wal is None else bytes(m.wal), m.notes


# =====================================================================================
# The checker (runs in the subprocess)
# =====================================================================================
class Runaway(Exception):
    """An iteration yielded far more elements than the file can hold (it does not end)."""


def _walk_storage(p, limit):
    """Read everything reachable from the root; raise Runaway if an iteration does not end."""
    from permastruct.buffer import Buffer
    from permastruct.collections import (PersistentDict, PersistentList, PersistentSet,
                                         PersistentSortedDict)
    from permastruct.strings import ByteString, String
    from permastruct.structure import Structure

    from permastruct._types import Persistent

    seen = set()
    stack = [p.root]
    strings = 0

    def bounded(iterable, what):
        out = []
        for item in iterable:
            out.append(item)
            if len(out) > limit:
                raise Runaway(f"{what} yielded more than {limit} elements")
        return out

    def usable(collection, key):
        """Whether ``key`` (read from ``collection``) has the collection's key type."""
        key_type = type(collection)._ps_key
        if key_type.is_ref and isinstance(collection, (PersistentDict, PersistentSet)):
            return isinstance(key, key_type.exact)  # hash tables give string keys as bytes or str
        if key_type.is_ref:
            return isinstance(key, key_type.type)
        return isinstance(key, (int, float))

    for s in bounded(p.stringRegistry, "the string registry"):
        stack.append(s)
    len(p.stringRegistry)
    while stack:
        value = stack.pop()
        if value is None or isinstance(value, (int, float, bool)):
            continue
        address = ctypes.addressof(value)
        if address in seen:
            continue
        seen.add(address)
        if len(seen) > limit:
            raise Runaway(f"more than {limit} objects reachable")
        if len(seen) < 300:
            repr(value)
        if isinstance(value, Structure):
            for name in type(value)._ps_field_types:
                stack.append(getattr(value, name))
        elif isinstance(value, (ByteString, String)):
            contents = value.contents
            strings += 1
            if strings < 200:  # the rest of a string's methods read the same bytes
                bytes(value), len(value), hash(value)
                assert value == contents
                if isinstance(value, String):
                    str(value)
                contents in p.stringRegistry
        elif isinstance(value, Buffer):
            len(value), value.nbytes, value.itemsize, value.format, value.shape
            bytes(value)
            with memoryview(value) as view:
                view.tobytes(), view.format, view.shape, view.strides, view.nbytes
                view == view  # noqa: B015 - compares item by item, with the format's item size
                try:
                    view.tolist()  # native formats only: NotImplementedError for the others
                except NotImplementedError:
                    pass
                if view.ndim == 1 and view.shape[0]:
                    try:
                        view[-1]
                    except NotImplementedError:
                        pass
        elif isinstance(value, PersistentList):
            n = len(value)
            items = bounded(value, "a List")
            bounded(reversed(value), "a reversed List")
            if n:
                value[0], value[-1], value[:3], value[-2:], value[::max(1, n // 5)]
            stack.extend(item for item in items if isinstance(item, Persistent))
        elif isinstance(value, (PersistentDict, PersistentSortedDict)):
            len(value)
            items = bounded(value.items(), "the items of a mapping")
            bounded(value.values(), "the values of a mapping")
            for key, item in items[:50]:
                if not usable(value, key):
                    continue  # a damaged key cell names an object of another type: check() reports it
                # a damaged hash or key order may hide a key from a lookup: a wrong answer, not a crash
                if key in value:
                    try:
                        value[key]
                    except KeyError:
                        pass
                value.get(key)
            value.get(object()), 12345678 in value
            if isinstance(value, PersistentSortedDict):
                keys = bounded(reversed(value), "a reversed SortedDict")
                if keys and all(usable(value, key) for key in keys):
                    value.peekitem(0), value.peekitem(-1)
                    bounded(value.irange(keys[-1], keys[0]), "an irange")
                    bounded(value.irange(keys[len(keys) // 2], reverse=True), "a reversed irange")
                    value.bisect_left(keys[0]), value.bisect_right(keys[-1])
                    if keys[-1] in value:
                        value.index(keys[-1])
            stack.extend(x for pair in items for x in pair if isinstance(x, Persistent))
        elif isinstance(value, PersistentSet):
            len(value)
            items = bounded(value, "a Set")
            for key in items[:50]:
                if usable(value, key):
                    key in value
            "absent" in value, 7 in value
            stack.extend(item for item in items if isinstance(item, Persistent))


#: root field -> (type name, element type names) that the write step changes
_WRITABLE = {"ints": ("Ints", ["Int"]), "names": ("Names", ["String"]), "counts": ("Counts", ["Int", "Float"]),
             "tags": ("Tags", ["String"]), "by_age": ("ByAge", ["Int", "String"]),
             "by_name": ("ByName", ["ByteString", "Named"])}


def _write_some(p, seed):
    """Change a little of everything (the allocator, every kind of collection, strings, buffers) and commit."""
    from permastruct.structure import Structure

    rng = random.Random(seed)
    root = p.root
    if not isinstance(root, Structure):
        return
    fields = type(root)._ps_field_types

    def field(name):
        want = _WRITABLE.get(name)
        if name not in fields or want is None:
            return None
        value = getattr(root, name)
        if value is None or type(value).__name__ != want[0] or \
                [type_label(t) for t in type(value)._ps_params] != want[1]:
            return None
        return value

    if type_label(fields.get("count", type(None))) == "Int":
        root.count = rng.randrange(1000)
    if type_label(fields.get("title", type(None))) == "String":
        root.title = "written " * rng.randrange(1, 40)
    if type_label(fields.get("big", type(None))) == "Buffer":
        root.big = bytes(rng.randrange(100, 20000))
    ints = field("ints")
    if ints is not None:
        ints.append(1)
        ints.extend(range(rng.randrange(300)))
        ints.insert(0, 5)
        del ints[len(ints) // 2:len(ints) // 2 + rng.randrange(50)]
        ints.pop()
    names = field("names")
    if names is not None:
        names.append("new name")
        if len(names) > 2:
            names[1] = "replaced"
            del names[0]
    counts = field("counts")
    if counts is not None:
        for k in range(rng.randrange(40)):
            counts[k * 13] = k / 2
        for key in list(counts)[:rng.randrange(40)]:
            counts.pop(key, None)
    tags = field("tags")
    if tags is not None:
        tags.add("new tag")
        tags.add(p.stringRegistry.get(f"interned {rng.randrange(5)}"))
        for key in list(tags)[:rng.randrange(10)]:
            tags.discard(key)
    by_age = field("by_age")
    if by_age is not None:
        for k in range(rng.randrange(60)):
            by_age[rng.randrange(20000)] = "new"
        for key in list(by_age)[:rng.randrange(60)]:
            by_age.pop(key, None)
    by_name = field("by_name")
    if by_name is not None and rng.random() < 0.5:
        by_name.clear()
    p.commit()


def _exercise(cls, path, readonly, limit, stages, writes=False):
    """Open, check, walk and close one store; PermastructErrors are outcomes, anything else escapes."""
    stages.append("open")
    try:
        p = cls(path, readonly=readonly, sync=False)
    except PermastructError as exc:
        return f"open refused ({type(exc).__name__})"
    outcome = "ok"
    try:
        stages.append("check")
        try:
            p.check()
        except PermastructError as exc:
            outcome = f"check found damage ({type(exc).__name__})"
        stages.append("walk")
        try:
            _walk_storage(p, limit)
        except PermastructError as exc:
            outcome += f", walk raised {type(exc).__name__}"
        if writes:
            stages.append("write")
            try:
                _write_some(p, writes)
            except PermastructError as exc:
                outcome += f", writing raised {type(exc).__name__}"
    except BaseException:
        try:
            p.close()
        except BaseException:
            pass
        raise
    stages.append("close")
    try:
        p.close()
    except PermastructError as exc:
        outcome += f", close raised {type(exc).__name__}"
    return outcome


def run_case(base, fmap, data, wal, seed, folder, reraise=False, sabotage=None):
    """Damage ``data`` with ``seed`` and exercise it four ways; a dict describing the result."""
    mutated, mutated_wal, notes = mutate(data, wal, fmap, seed)
    path = os.path.join(folder, "case.ps")
    # an upper bound for any honest iteration: every element needs at least 8 bytes of the file
    limit = max(len(mutated), len(data)) // 8 + 1000
    rng = random.Random(seed ^ 0x5EED)
    modes = [(Storage, True), (FuzzStorage, False)] if rng.random() < 0.5 else [(FuzzStorage, True), (Storage, False)]
    outcomes = []
    for cls, readonly in modes:
        for leftover in (path, path + F.WAL_SUFFIX):
            if os.path.exists(leftover):
                os.unlink(leftover)
        with open(path, "wb") as f:
            f.write(mutated)
        if mutated_wal is not None:
            with open(path + F.WAL_SUFFIX, "wb") as f:
                f.write(mutated_wal)
        mode = f"{cls.__name__}({'readonly=True' if readonly else 'writable'})"
        stages = ["start"]
        writes = seed if WRITES and not readonly else False
        try:
            _sabotage(sabotage)
            outcomes.append(f"{mode}: {_exercise(cls, path, readonly, limit, stages, writes)}")
        except Runaway as exc:
            return {"failure": f"{mode}, {stages[-1]}: {exc}", "notes": notes}
        except BaseException as exc:  # the point of the test: nothing but PermastructError may escape
            if isinstance(exc, KeyboardInterrupt) or reraise:
                raise
            frames = traceback.extract_tb(exc.__traceback__)
            where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-6:]))
            return {"failure": f"{mode}, {stages[-1]}: {type(exc).__name__}: {str(exc)[:300]}",
                    "where": where, "exc_type": type(exc).__name__, "notes": notes,
                    "frames": [(os.path.basename(f.filename), f.name) for f in frames]}
    return {"outcomes": outcomes, "notes": notes}


def worker(job_path):
    """The subprocess: run the cases of a job file, writing progress before and after each."""
    faulthandler.enable()
    with open(job_path) as f:
        job = json.load(f)
    bases = []
    for base in job["bases"]:
        with open(base["path"], "rb") as f:
            data = f.read()
        wal = None
        if os.path.exists(base["path"] + F.WAL_SUFFIX):
            with open(base["path"] + F.WAL_SUFFIX, "rb") as f:
                wal = f.read()
        with open(base["map"]) as f:
            bases.append((base, json.load(f), data, wal))
    folder = job["folder"]
    sabotage = dict(item.split("@", 1)[::-1] for item in job.get("sabotage", ()))  # case -> what (tests only)
    import resource
    with open(job["progress"], "a", buffering=1) as progress:
        for case_id, base_index, seed in job["cases"]:
            progress.write(json.dumps({"start": case_id}) + "\n")
            progress.flush()
            base, fmap, data, wal = bases[base_index]
            peak = _peak_rss(resource)
            result = run_case(base, fmap, data, wal, seed, folder, sabotage=sabotage.get(case_id))
            grown = _peak_rss(resource) - peak
            if grown > HUGE_ALLOCATION and "failure" not in result:
                result["failure"] = f"huge allocation: the peak resident memory grew by {grown >> 20} MiB"
            result["end"] = case_id
            progress.write(json.dumps(result) + "\n")
            progress.flush()


def _peak_rss(resource):
    """This process's peak resident memory in bytes since it started.

    ``VmHWM`` where there is one: ``ru_maxrss`` survives ``exec``, so a worker
    started by a large pytest process would begin at the parent's peak and a
    big allocation in it could stay below that and go unnoticed.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sabotage(what):
    """What the harness test makes a case do: die, hang, allocate a lot, raise."""
    if what == "crash":
        ctypes.string_at(1, 1)  # reads address 1: SIGSEGV
    elif what == "hang":
        while True:
            time.sleep(0.01)
    elif what == "memory":
        bytearray(ADDRESS_SPACE)  # MemoryError under RLIMIT_AS
    elif what == "big":
        block = bytearray(HUGE_ALLOCATION + (64 << 20))
        block[::4096] = b"x" * len(block[::4096])  # touched: resident


# =====================================================================================
# The parent: batches, limits, timeouts
# =====================================================================================
def _limits():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS + 10))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_cases(bases, cases, folder, batch=BATCH, case_timeout=CASE_TIMEOUT, sabotage=(), worker_mode="worker"):
    """Run ``cases`` (``(case id, base index, seed)``) in subprocesses; ``(results, failures)``.

    A subprocess that dies or hangs is reported against the case it had
    started, and the remaining cases continue in a new subprocess.
    ``worker_mode``: ``"worker"`` (damaged files) or ``"loadworker"`` (hostile
    JSON for ``load``, :func:`load_worker`).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC_DIR + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONFAULTHANDLER"] = "1"
    results, failures = {}, {}
    pending = list(cases)
    round_number = 0
    while pending:
        round_number += 1
        chunk, pending = pending[:batch], pending[batch:]
        work = os.path.join(folder, f"batch{round_number}")
        os.makedirs(work, exist_ok=True)
        job_path = os.path.join(work, "job.json")
        progress_path = os.path.join(work, "progress.jsonl")
        stderr_path = os.path.join(work, "stderr.txt")
        with open(job_path, "w") as f:
            json.dump({"bases": bases, "cases": chunk, "folder": work, "progress": progress_path,
                       "sabotage": list(sabotage)}, f)
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen([sys.executable, THIS_FILE, worker_mode, job_path], env=env, cwd=work,
                                    stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                    preexec_fn=_limits, start_new_session=True)
            started_case, started_at, hung = None, time.monotonic(), False
            offset = 0
            while True:
                code = proc.poll()
                offset, started_case, started_at = _read_progress(progress_path, offset, results, started_case,
                                                                  started_at)
                if code is not None:
                    break
                if started_case is not None and time.monotonic() - started_at > case_timeout:
                    hung = True
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.02)
            _read_progress(progress_path, offset, results, started_case, started_at)
        done = {c[0] for c in chunk if c[0] in results}
        if started_case is not None and started_case not in results:
            with open(stderr_path, "rb") as f:
                tail = f.read()[-3000:].decode("utf-8", "replace")
            if hung:
                why = f"hang: no result within {case_timeout:.0f} s"
            elif proc.returncode < 0:
                why = f"crash: killed by signal {signal.Signals(-proc.returncode).name}"
            else:
                why = f"crash: the subprocess exited with status {proc.returncode}"
            results[started_case] = {"failure": why, "stderr": tail}
            done.add(started_case)
        elif proc.returncode != 0:
            with open(stderr_path, "rb") as f:
                tail = f.read()[-3000:].decode("utf-8", "replace")
            raise RuntimeError(f"the fuzz subprocess failed outside any case (status {proc.returncode}):\n{tail}")
        # cases after a crash run again in the next subprocess
        pending = [c for c in chunk if c[0] not in done] + pending
    for case_id, result in results.items():
        if "failure" in result:
            failures[case_id] = result
    return results, failures


def _read_progress(path, offset, results, started_case, started_at):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return offset, started_case, started_at
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].splitlines():
        record = json.loads(line)
        if "start" in record:
            started_case, started_at = record["start"], time.monotonic()
        else:
            results[record["end"]] = record
            started_case = None
    return offset + end, started_case, started_at


def case_seed(seed, index):
    """The seed of case ``index`` of run ``seed`` (stable across runs and platforms)."""
    return zlib.crc32(f"{seed}:{index}".encode()) | (seed << 32)


def make_cases(seed, count, nbases, first=0):
    return [(f"{seed}:{index}", index % nbases, case_seed(seed, index)) for index in range(first, first + count)]


# =====================================================================================
# Known failures that need fixes in files this test's author could not change
# =====================================================================================
#: name -> (the fix that is missing, a predicate on a failure record).  A fuzz run whose
#: failures all match one of these is an expected failure (pytest.xfail) naming the fixes;
#: each also has a strict xfail regression test below, which starts to pass (XPASS, an
#: error) when the fix is in: then delete the entry and the marker.
def _frames(failure):
    return [tuple(frame) for frame in failure.get("frames", ())]


def _caller_of_mapping(failure):
    """``(file, function)`` of the frame that called into ``_mapping.py`` when it raised."""
    frames = _frames(failure)
    while frames and frames[-1][0] == "_mapping.py":
        frames.pop()
    return frames[-1] if frames else (None, None)


KNOWN_PENDING = {
    # None today.  An entry: "name": ("the missing fix", lambda failure: matches).
}


def known_pending(failure):
    for name, (fix, matches) in KNOWN_PENDING.items():
        if matches(failure):
            return name
    return None


# =====================================================================================
# The tests
# =====================================================================================
@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory):
    return build_bases(str(tmp_path_factory.mktemp("fuzz-bases")))


def _report(seed, bases, cases, results, failures, elapsed):
    outcomes = {}
    for result in results.values():
        for line in result.get("outcomes", ()):
            kind = line.split(": ", 1)[1].split(" (")[0]
            outcomes[kind] = outcomes.get(kind, 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(outcomes.items(), key=lambda x: -x[1]))
    print(f"\nfuzz seed {seed}: {len(cases)} cases on {len(bases)} base files in {elapsed:.1f} s, "
          f"{len(failures)} failure(s); opens: {summary}")


def _describe_failure(case_id, failure, bases, cases):
    base_index = next(c[1] for c in cases if c[0] == case_id)
    seed, index = case_id.split(":")
    lines = [f"case {case_id} (seed {seed}, case {index}) on {bases[base_index]['label']}: {failure['failure']}"]
    if failure.get("where"):
        lines.append(f"    at {failure['where']}")
    for note in failure.get("notes", ()):
        lines.append(f"    mutation: {note}")
    if failure.get("stderr"):
        lines.append("    stderr: " + failure["stderr"].strip().replace("\n", "\n    | "))
    lines.append(f"    replay: PYTHONPATH=src python3 tests/test_fuzz.py replay {seed} {index}")
    return "\n".join(lines)


def test_fuzz_hostile_files(fuzz_bases, stress_seed, stress_iterations, tmp_path):
    """R3: every damaged file gives success or a PermastructError: no other exception, crash or hang."""
    cases = make_cases(stress_seed, stress_iterations, len(fuzz_bases))
    started = time.monotonic()
    results, failures = run_cases(fuzz_bases, cases, str(tmp_path))
    elapsed = time.monotonic() - started
    _report(stress_seed, fuzz_bases, cases, results, failures, elapsed)
    assert len(results) == len(cases)
    unknown = {c: f for c, f in failures.items() if known_pending(f) is None}
    if unknown:
        text = "\n".join(_describe_failure(c, f, fuzz_bases, cases) for c, f in sorted(unknown.items()))
        pytest.fail(f"{len(unknown)} of {len(cases)} damaged files raised something else than a "
                    f"PermastructError:\n{text}", pytrace=False)
    if failures:
        names = sorted({known_pending(f) for f in failures.values()})
        pytest.xfail(f"{len(failures)} case(s) need fixes outside this test's files: "
                     + "; ".join(f"{name}: {KNOWN_PENDING[name][0]}" for name in names))


def test_fuzz_load_with_hostile_json(stress_seed, stress_iterations, tmp_path):
    """Issue 14: ``load`` of a mutated or hostile JSON document (wrong types, huge numbers, missing
    keys, dangling ids, deep nesting, references to objects of the wrong type and cycles, bad
    base64, bad buffer shapes, damaged text) makes a store that passes check() or raises a
    PermastructError (LoadError naming the part), never anything else, a crash or a hang, and
    leaves no store and no temporary file behind."""
    document = build_load_document(str(tmp_path))
    bases = [{"path": document, "label": "dump --json of a small FuzzStorage store"}]
    cases = make_cases(stress_seed, stress_iterations, 1)
    started = time.monotonic()
    results, failures = run_cases(bases, cases, str(tmp_path), worker_mode="loadworker")
    elapsed = time.monotonic() - started
    _report(stress_seed, bases, cases, results, failures, elapsed)
    assert len(results) == len(cases)
    assert any("loaded" in line for r in results.values() for line in r.get("outcomes", ())), \
        "no mutated document loaded at all: the mutations are all caught at the door"
    if failures:
        shown = []
        for case_id, failure in list(failures.items())[:8]:
            seed, index = case_id.split(":")
            shown.append(_describe_failure(case_id, failure, bases, cases).replace(
                f"tests/test_fuzz.py replay {seed} {index}", f"tests/test_fuzz.py loadreplay {seed} {index}"))
        pytest.fail(f"{len(failures)} of {len(cases)} hostile documents failed:\n" + "\n".join(shown),
                    pytrace=False)


def _only_permastruct_errors(path, folder):
    """Exercise the store at ``path`` every way (copies of it, in this process); let other errors escape."""
    with open(path, "rb") as f:
        data = f.read()
    work = os.path.join(folder, "exercise.ps")
    for cls, readonly in ((Storage, True), (FuzzStorage, True), (Storage, False), (FuzzStorage, False)):
        with open(work, "wb") as f:
            f.write(data)
        _exercise(cls, work, readonly, len(data), [])


def _forge_root(path, **changes):
    """Rewrite the current root record of the store at ``path`` with ``changes`` and a valid checksum."""
    with open(path, "r+b") as f:
        head = f.read(F.HEADER_BLOCK)
        roots = [(F.unpack_root(head[o:o + F.ROOT.size]), o) for o in F.ROOT_OFFSETS]
        (txn, page_count, free_head, slots), at = max((r for r in roots if r[0] is not None), key=lambda r: r[0][0])
        fields = {"txn": txn, "page_count": page_count, "free_head": free_head, "slots": slots}
        fields.update(changes)
        f.seek(at)
        f.write(F.pack_root(fields["txn"], fields["page_count"], fields["free_head"], fields["slots"]))


def _small_store(folder, page_size=4096):
    path = os.path.join(folder, f"small-{page_size}.ps")
    build_base(path, page_size, 0.1).close()
    return path


# -- the damage the fuzzer found, one case each (read in a subprocess: a regression may crash) --
def _expect_damage(path, expression, words=()):
    """In a subprocess: ``expression`` (with ``p`` the open store, ``r`` its root) and ``p.check()``
    raise CorruptStorageError; the messages contain ``words``."""
    code = f"""
import sys
sys.path.insert(0, {os.path.dirname(THIS_FILE)!r})
from test_fuzz import FuzzStorage
from permastruct.errors import CorruptStorageError
p = FuzzStorage({path!r}, readonly=True)
r = p.root
for label, run in (("read", lambda: {expression}), ("check", p.check)):
    try:
        run()
    except CorruptStorageError as exc:
        print(label, "CorruptStorageError", exc)
    else:
        print(label, "no error")
p.close()
"""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC_DIR + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, preexec_fn=_limits)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split(" ", 2)[:2] for line in lines] == [["read", "CorruptStorageError"],
                                                         ["check", "CorruptStorageError"]], done.stdout
    for word in words:
        assert word in lines[0], lines[0]
    return lines


def _damage(path, at, data):
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def _offsets(path, *names):
    """File offsets of root fields ``names`` (dotted paths allowed) of the store at ``path``."""
    found = []
    with FuzzStorage(path, readonly=True) as p:
        for name in names:
            value = p.root
            for part in name.split("."):
                value = getattr(value, part)
            found.append(value._ps_oid)
    return found


@pytest.fixture
def small(tmp_path):
    return _small_store(str(tmp_path))


def test_string_length_past_the_map(small):
    [blob] = _offsets(small, "blob")
    _damage(small, blob + 12, F.UINT32.pack(0xFFFFFFF0))  # was: ctypes.string_at read past the map
    _expect_damage(small, "r.blob", ["length"])


def test_string_that_is_not_utf8(small):
    [title] = _offsets(small, "title")
    _damage(small, title + F.STRING.size, b"\xff\xfe")  # was: UnicodeDecodeError
    lines = _expect_damage(small, "str(r.title)", ["UTF-8"])
    assert "UTF-8" in lines[1]


@pytest.mark.parametrize("field, value", [
    (8, F.UINT64.pack((1 << 64) - 1)),  # nbytes: len() overflowed, bytes() read past the map
    (8, F.UINT64.pack(1 << 20)),  # nbytes past the object
    (16, F.UINT32.pack(8)),  # data offset inside the metadata
    (20, F.UINT32.pack(3)),  # itemsize: shape x itemsize != nbytes
    (24, bytes([65])),  # ndim above 64
    (32, b"\x00"),  # a NUL in the format
    (32, b"\xe9"),  # not ASCII: format raised UnicodeDecodeError
    (32, b"h"),  # items of 2 bytes, itemsize 8: memoryview read them past the data
], ids=["nbytes-huge", "nbytes-past-object", "data-offset", "itemsize", "ndim", "format-nul", "format-ascii",
        "format-size"])
def test_buffer_metadata(small, field, value):
    [matrix] = _offsets(small, "matrix")
    _damage(small, matrix + field, value)
    lines = _expect_damage(small, "memoryview(r.matrix)")
    assert "buffer" in lines[1].lower(), lines


def test_collection_count_beyond_the_file(small):
    [ints] = _offsets(small, "ints")
    _damage(small, ints + 8, F.UINT64.pack(1 << 63))  # was: len() raised OverflowError
    _expect_damage(small, "len(r.ints)", ["counts"])


def test_list_whose_body_is_a_hash_table(small):
    ints, counts = _offsets(small, "ints", "counts")
    with FuzzStorage(small, readonly=True) as p:
        table = p.root.counts._ps_body
    _damage(small, ints + 16, F.UINT64.pack(table))  # was: a cached table view used as list cells
    _expect_damage(small, "(len(r.counts), r.ints[0])", ["hash table"])


@pytest.mark.parametrize("link", ["next", "previous"])
def test_sorted_leaves_linked_in_a_cycle(tmp_path, link):
    path = _small_store(str(tmp_path), page_size=256)  # a tree of several leaves
    with FuzzStorage(path, readonly=True) as p:
        tree = p.root.by_age
        first = tree._ps_edge_leaf(link == "previous")
        second = tree._ps_node(first.head64[2 if link == "next" else 3])
        offset = second.offset
    _damage(path, offset + (16 if link == "next" else 24), F.UINT64.pack(first.offset))  # was: endless
    _expect_damage(path, "list(r.by_age)" if link == "next" else "list(reversed(r.by_age))", ["cycle"])


def test_sorted_child_that_is_an_ancestor(tmp_path):
    path = _small_store(str(tmp_path), page_size=256)
    with FuzzStorage(path, readonly=True) as p:
        tree = p.root.by_age
        root = tree._ps_node(tree._ps_body)
        assert not root.leaf
        child_at = root.offset + F.NODE.size + F.CELL * (type(tree)._ps_order + 1)
    _damage(path, child_at, F.UINT64.pack(root.offset))  # was: an endless descent
    _expect_damage(path, "r.by_age.peekitem(0)", ["deeper than 64"])


def test_stored_field_name_that_ctypes_owns(small):
    with FuzzStorage(small, readonly=True) as p:
        offset = p._page_file.slots[F.SLOT_SCHEMA]
        length = p._heap.string_header(offset)[3]
        text = bytes(p._heap.mapping.view(offset + F.STRING.size, length))
    damaged = text.replace(b'["raw",16]', b'["_fields_",16]')  # was: TypeError from ctypes
    assert len(damaged) == len(text) + 5
    _damage(small, offset + 12, F.UINT32.pack(len(damaged)) + damaged)
    with pytest.raises(permastruct.CorruptStorageError, match="_fields_"):
        Storage(small, readonly=True)


@pytest.mark.parametrize("name", ["from_buffer", "isSameAs", "_fields_"])
def test_a_field_may_not_hide_what_the_class_needs(tmp_path, name):
    class Bad(Storage):
        def populateSchema(self):
            type("Root", (self.schema.Structure,), {name: self.schema.Int})

    with pytest.raises(permastruct.SchemaError, match=name):
        Bad(str(tmp_path / "bad.ps"))


def test_harness_names_the_case_that_crashes_hangs_or_allocates(fuzz_bases, tmp_path):
    """A dead, hung or bloated subprocess is a failure of the case it was running; the others still run."""
    cases = make_cases(99, 8, len(fuzz_bases))
    sabotage = ["crash@99:1", "hang@99:3", "memory@99:5", "big@99:6"]
    results, failures = run_cases(fuzz_bases, cases, str(tmp_path), batch=4, case_timeout=3, sabotage=sabotage)
    assert len(results) == len(cases)
    assert "SIGSEGV" in failures["99:1"]["failure"] and "string_at" in failures["99:1"]["stderr"]
    assert failures["99:3"]["failure"].startswith("hang")
    assert "MemoryError" in failures["99:5"]["failure"]
    assert "huge allocation" in failures["99:6"]["failure"]
    assert all(case_id in failures or "outcomes" in results[case_id] for case_id, _, _ in cases)
    text = _describe_failure("99:1", failures["99:1"], fuzz_bases, cases)
    assert "seed 99, case 1" in text and "replay 99 1" in text


def test_wal_mutations_follow_the_documented_layout(fuzz_bases, tmp_path):
    """A log made by hand from the layout in _format parses back, and every log strategy changes it."""
    path = str(tmp_path / "with-log.ps")
    shutil.copyfile(fuzz_bases[0]["path"], path)
    write_handmade_wal(path)
    with open(fuzz_bases[0]["map"]) as f:
        fmap = json.load(f)
    fmap["wal"] = describe_wal(path + F.WAL_SUFFIX)
    frames = fmap["wal"]["frames"]
    assert frames and frames[-1][1] == F.FRAME_COMMIT and frames[-1][3] == len(frames) - 1
    with open(path, "rb") as f:
        data = f.read()
    with open(path + F.WAL_SUFFIX, "rb") as f:
        wal = f.read()
    header = F.WAL_HEADER.unpack_from(wal)
    assert header[0] == F.WAL_MAGIC and header[-1] == zlib.crc32(wal[:60])
    for at, kind, txn, where, length in frames:
        crc = F.FRAME.unpack_from(wal, at)[-1]
        assert crc == zlib.crc32(wal[at + F.FRAME.size:at + F.FRAME.size + length], zlib.crc32(wal[at:at + 28]))
    for strategy, _ in WAL_STRATEGIES:
        changed = 0
        for seed in range(20):
            m = Mutation(data, wal, fmap, random.Random(seed))
            strategy(m)
            changed += bytes(m.wal) != wal and bytes(m.data) == data
            assert m.notes
        assert changed >= 10, f"{strategy.__name__} changed the log in {changed} of 20 cases"


def test_mutator_is_deterministic(fuzz_bases):
    base = fuzz_bases[1]
    with open(base["map"]) as f:
        fmap = json.load(f)
    with open(base["path"], "rb") as f:
        data = f.read()
    for seed in range(50):
        first, second = mutate(data, None, fmap, seed), mutate(data, None, fmap, seed)
        assert first == second
        assert first[0] != data or any("nothing" in note for note in first[2]) or first[2]


def test_root_record_with_the_last_transaction_number(tmp_path):
    """A root record whose transaction number cannot grow is damage (it once broke flush())."""
    path = _small_store(str(tmp_path))
    _forge_root(path, txn=(1 << 64) - 1)
    _only_permastruct_errors(path, str(tmp_path))


def test_truncated_inside_the_last_mapping_unit(tmp_path):
    """Pages in the file but not mappable (the file ends inside a map unit): refused as truncated."""
    path = _small_store(str(tmp_path), page_size=256)
    with FuzzStorage(path, readonly=True) as p:
        end = F.HEADER_BLOCK + p._page_file.page_count * 256
    unit = max(mmap.PAGESIZE, mmap.ALLOCATIONGRANULARITY)
    assert (end - F.HEADER_BLOCK) % unit, "the last pages must not end on a mapping unit"
    os.truncate(path, end)  # every page is in the file, the last ones are not mapped
    _only_permastruct_errors(path, str(tmp_path))


def test_freeing_an_object_whose_reference_is_outside_the_file(tmp_path):
    """Freeing follows references: one outside the file is damage (it once raised IndexError)."""
    path = _small_store(str(tmp_path))
    [left] = _offsets(path, "pair.left")  # referenced by nothing else
    with FuzzStorage(path, readonly=True) as p:
        field = type(p.root.pair.left)._ps_ref_raw.offset
    _damage(path, left + field, F.UINT64.pack(os.path.getsize(path) + 4096))
    p = FuzzStorage(path)
    try:
        p.root.pair.left = None
        with pytest.raises(CorruptStorageError, match="outside"):
            p.commit()  # frees it: what it referenced loses a reference
        p.rollback()
    finally:
        with contextlib.suppress(PermastructError):
            p.close()


@pytest.mark.parametrize("text", [b'{"format":1,"types":[{"id":1e400}]}', b"[" * 1200], ids=["infinity", "nested"])
def test_schema_text_that_json_cannot_turn_into_types(tmp_path, text):
    """Ids JSON reads as infinity, or nesting deeper than the parser goes: damage, not a crash."""
    path = _small_store(str(tmp_path))
    with FuzzStorage(path, readonly=True) as p:
        offset = p._page_file.slots[F.SLOT_SCHEMA]
    with open(path, "r+b") as f:
        f.seek(offset + 12)
        f.write(F.UINT32.pack(len(text)) + text)
    _only_permastruct_errors(path, str(tmp_path))


# =====================================================================================
# Hostile JSON for load
# =====================================================================================
#
# ``load`` (``python -m permastruct load JSON NEWFILE``, ``_dump.load_json``) rebuilds a store
# from the JSON form.  The base document is the ``dump --json`` of a small FuzzStorage store
# (every kind of type, inheritance, shared objects, interned strings, NaN, buffers with a
# shape, an empty buffer); each case applies one to three mutations (:data:`LOAD_MUTATIONS`)
# to it, or to its text, and loads it through the command line's ``load``.  The outcome
# must be a store that opens and passes ``check()``, or a ``PermastructError`` (``LoadError``
# names the part of the document); nothing else may escape, the process must not die or
# hang, and after an error nothing may be left: no file at the target, no temporary one.

#: Values that are of the wrong kind almost anywhere in a document.
HOSTILE_VALUES = (None, True, 0, -1, 1 << 64, -(1 << 63) - 1, 10 ** 400, 1e308, 0.5, "", "x", "NaN",
                  "Infinity", [], [[]], {}, {"ref": None}, {"ref": 1 << 70}, {"ref": -1}, {"ref": "1"},
                  {"ref": 1.5}, {"id": 1}, "\ud800", "A" * 5000)

#: Stands for a deeply nested value in a document; its text replaces it after json.dumps.
_DEEP = "@@deep@@"


def build_load_document(folder):
    """The base document: ``dump --json`` of a small store of every kind; returns its path."""
    from permastruct import _dump
    path = os.path.join(folder, "load-base.ps")
    p = build_base(path, 4096, scale=0.02)
    try:
        p.root.scalars.f = float("nan")
        p.root.scalars.f64 = float("-inf")
        p.root.typed = array("i")  # an empty buffer
        p.commit()
        document = _dump.dump_json(p)
    finally:
        p.close()
    doc_path = os.path.join(folder, "load-base.json")
    with open(doc_path, "w") as f:
        json.dump(document, f)
    return doc_path


def _nodes(document):
    """``(container, key)`` of every value inside ``document`` (lists and dicts), without recursion."""
    found, work = [], [document]
    while work:
        node = work.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            found.append((node, key))
            if isinstance(value, (dict, list)):
                work.append(value)
    return found


def _objects_of(document, *keys):
    objects = document.get("objects") if isinstance(document, dict) else None
    if not isinstance(objects, list):
        return []
    return [o for o in objects if isinstance(o, dict) and all(k in o for k in keys)]


def j_wrong_type(doc, rng, notes):
    node, key = rng.choice(_nodes(doc))
    value = rng.choice(HOSTILE_VALUES)
    node[key] = value
    notes.append(f"wrong type: [{key!r}] = {str(value)[:40]}")


def j_drop_key(doc, rng, notes):
    dicts = [node for node, _ in _nodes(doc) if isinstance(node, dict) and node] + [doc]
    node = rng.choice(dicts)
    key = rng.choice(sorted(node))
    del node[key]
    notes.append(f"missing key {key!r}")


def j_dangling(doc, rng, notes):
    refs = [node for node, key in _nodes(doc) if isinstance(node, dict) and key == "ref"]
    if not refs:
        return j_wrong_type(doc, rng, notes)
    node = rng.choice(refs)
    count = len(doc.get("objects", ())) if isinstance(doc.get("objects"), list) else 0
    node["ref"] = rng.choice((count + 1, count + 1000, 0, -5, 1 << 63, "2", None, 2.0))
    notes.append(f"dangling id: ref {node['ref']!r}")


def j_huge_number(doc, rng, notes):
    numbers = [(node, key) for node, key in _nodes(doc)
               if isinstance(node[key], (int, float)) and not isinstance(node[key], bool)]
    if not numbers:
        return j_wrong_type(doc, rng, notes)
    node, key = rng.choice(numbers)
    node[key] = rng.choice((1 << 64, (1 << 64) - 1, -(1 << 63) - 1, 10 ** 400, -10 ** 400, 1e308, -1e308,
                            1 << 2000, -1, 256, 65536, 3.5))
    notes.append(f"huge number: [{key!r}] = {str(node[key])[:40]}")


def j_deep(doc, rng, notes):
    node, key = rng.choice(_nodes(doc))
    node[key] = _DEEP
    notes.append("a value nested 100000 deep")


def j_wrong_cycle(doc, rng, notes):
    """A reference to an object of another type, or to the object that holds it (a cycle)."""
    objects = _objects_of(doc, "id", "type")
    holders = [o for o in objects if isinstance(o.get("fields"), dict) or isinstance(o.get("items"), list)]
    if not holders or not objects:
        return j_wrong_type(doc, rng, notes)
    holder = rng.choice(holders)
    target = rng.choice((holder, rng.choice(objects)))
    ref = {"ref": target["id"]}
    if isinstance(holder.get("fields"), dict) and holder["fields"]:
        field = rng.choice(sorted(holder["fields"]))
        holder["fields"][field] = ref
        notes.append(f"object {holder['id']} field {field!r} -> object {target['id']} ({target['type']!r})")
    elif holder.get("items"):
        index = rng.randrange(len(holder["items"]))
        item = holder["items"][index]
        if isinstance(item, list) and item:
            item[rng.randrange(len(item))] = ref
        else:
            holder["items"][index] = ref
        notes.append(f"object {holder['id']} item {index} -> object {target['id']} ({target['type']!r})")
    else:
        holder.setdefault("items", []).append(ref)
        notes.append(f"object {holder['id']} holds itself")


def j_base64(doc, rng, notes):
    objects = _objects_of(doc, "base64")
    if not objects:
        return j_wrong_type(doc, rng, notes)
    target = rng.choice(objects)
    target["base64"] = rng.choice(("!!!!", "abc", "a===", "QUJD\n", 12, None, ["QUJD"], "\u00e9\u00e9\u00e9\u00e9",
                                   "A" * 4001, ""))
    notes.append(f"object {target.get('id')}: base64 {str(target['base64'])[:20]!r}")


def j_buffer(doc, rng, notes):
    objects = _objects_of(doc, "shape")
    if not objects:
        return j_wrong_type(doc, rng, notes)
    target = rng.choice(objects)
    key = rng.choice(("shape", "itemsize", "format"))
    target[key] = rng.choice({
        "shape": ([-1], [1 << 40, 1 << 40], [1 << 64], "x", [1] * 70, [0], [], [2.5], [None], [3, 3]),
        "itemsize": (0, -1, 3, 1 << 40, "4", None, 2.0),
        "format": ("Z", "", "i" * 300, 5, None, "\u00e9", "<" * 1000, "0i", "(3)i", "T{i:x:}")}[key])
    notes.append(f"buffer {target.get('id')}: {key} = {str(target[key])[:30]}")


def j_schema(doc, rng, notes):
    schema = doc.get("schema")
    if not isinstance(schema, list) or not schema:
        return j_wrong_type(doc, rng, notes)
    entry = rng.choice(schema)
    if not isinstance(entry, dict):
        return j_wrong_type(doc, rng, notes)
    names = [e.get("name") for e in schema if isinstance(e, dict)]
    key = rng.choice(("name", "kind", "base", "fields", "params"))
    entry[key] = rng.choice({
        "name": ("class", "_ps_x", "", "1x", rng.choice(names), "Int", "a b", None, "x" * 5000, "__init__"),
        "kind": ("structure", "list", "dict", "tuple", None, 3),
        "base": ("Nothing", entry.get("name"), "Int", "List", None, rng.choice(names)),
        "fields": ([["x", "Nothing"]], [["class", "Int"]], [["x", "Int"], ["x", "Int"]], [["x"]], [[1, "Int"]],
                   [["_ps_oid", "Int"]], [["x", entry.get("name")]], "x", [None]),
        "params": ([], ["Int", "Int", "Int"], ["Nothing"], [entry.get("name")], ["Buffer"], None, [["Int"]])}[key])
    notes.append(f"schema {entry.get('name')!r}: {key} = {str(entry[key])[:40]}")


def j_top(doc, rng, notes):
    key = rng.choice(("format", "version", "root", "interned", "objects", "schema"))
    doc[key] = rng.choice({
        "format": ("sqlite", None, 1), "version": (0, 2, "1", None, 1 << 64),
        "root": ("1", 1 << 40, -1, 0, None, {"ref": 1}, 2.5),
        "interned": ([1 << 40], "x", [None], [1, 1], [-1], {}),
        "objects": ({}, [None], [[]], [{}], "x"), "schema": ({}, [None], "x", [[]])}[key])
    notes.append(f"top level: {key} = {str(doc[key])[:40]}")


def j_duplicate_id(doc, rng, notes):
    objects = _objects_of(doc, "id")
    if len(objects) < 2:
        return j_wrong_type(doc, rng, notes)
    a, b = rng.sample(objects, 2)
    a["id"] = b["id"]
    notes.append(f"two objects with id {b['id']}")


def j_swap_kinds(doc, rng, notes):
    """An object given the type of another kind (its fields or items stay)."""
    objects = _objects_of(doc, "id", "type")
    if len(objects) < 2:
        return j_wrong_type(doc, rng, notes)
    a, b = rng.sample(objects, 2)
    a["type"] = b["type"]
    notes.append(f"object {a['id']} given type {b['type']!r}")


LOAD_MUTATIONS = [j_wrong_type, j_drop_key, j_dangling, j_huge_number, j_deep, j_wrong_cycle, j_base64,
                  j_buffer, j_schema, j_top, j_duplicate_id, j_swap_kinds]


def mutate_document(text, seed):
    """``(bytes of a hostile document, notes)``: the base document's text, mutated by ``seed``."""
    rng = random.Random(seed)
    notes = []
    if rng.random() < 0.1:  # damage the text itself
        data = text.encode()
        how = rng.choice(("truncated", "bad utf-8", "garbage", "deep text"))
        if how == "truncated":
            data = data[:rng.randrange(len(data))]
        elif how == "bad utf-8":
            at = rng.randrange(len(data))
            data = data[:at] + b"\xff\xfe\xc0" + data[at:]
        elif how == "garbage":
            at = rng.randrange(len(data))
            data = data[:at] + bytes(rng.randrange(256) for _ in range(8)) + data[at + 8:]
        else:
            data = b"[" * 200000 + b"]" * 200000
        return data, [f"text: {how}"]
    doc = json.loads(text)
    for _ in range(rng.randint(1, 3)):
        rng.choice(LOAD_MUTATIONS)(doc, rng, notes)
    out = json.dumps(doc)
    if _DEEP in out:
        depth = 100000
        nested = rng.choice(("[" * depth + "]" * depth, '{"ref": ' * depth + "1" + "}" * depth))
        out = out.replace(json.dumps(_DEEP), nested, 1).replace(json.dumps(_DEEP), "null")
    return out.encode("utf-8", "surrogatepass"), notes


def run_load_case(text, seed, folder, reraise=False):
    """Load the mutated document of ``seed``; a dict describing the result (see above)."""
    from permastruct import cli
    data, notes = mutate_document(text, seed)
    source = os.path.join(folder, "case.json")
    target = os.path.join(folder, "case.ps")
    for leftover in os.listdir(folder):  # (what an earlier failing case left)
        os.unlink(os.path.join(folder, leftover))
    with open(source, "wb") as f:
        f.write(data)
    try:
        cli.load(source, target, out=lambda *args: None)
    except PermastructError as exc:
        if reraise:
            raise
        left = sorted(name for name in os.listdir(folder) if name != "case.json")
        if left:
            return {"failure": f"{type(exc).__name__} left files behind: {left}", "notes": notes}
        return {"outcomes": [f"load: {type(exc).__name__}"], "notes": notes}
    except BaseException as exc:  # the point of the test: nothing but PermastructError may escape
        if isinstance(exc, KeyboardInterrupt) or reraise:
            raise
        frames = traceback.extract_tb(exc.__traceback__)
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-6:]))
        return {"failure": f"load: {type(exc).__name__}: {str(exc)[:300]}", "where": where,
                "exc_type": type(exc).__name__, "notes": notes,
                "frames": [(os.path.basename(f.filename), f.name) for f in frames]}
    try:  # loaded: a whole store
        with Storage(target, readonly=True) as p:
            p.check()
    except BaseException as exc:
        if reraise:
            raise
        return {"failure": f"the loaded store: {type(exc).__name__}: {str(exc)[:300]}", "notes": notes}
    os.unlink(target)
    return {"outcomes": ["load: loaded"], "notes": notes}


def load_worker(job_path):
    """The subprocess of the load fuzzer: run the cases of a job file (as :func:`worker`)."""
    faulthandler.enable()
    with open(job_path) as f:
        job = json.load(f)
    with open(job["bases"][0]["path"]) as f:
        text = f.read()
    folder = os.path.join(job["folder"], "load")  # (holds the case's files only)
    os.makedirs(folder, exist_ok=True)
    import resource
    with open(job["progress"], "a", buffering=1) as progress:
        for case_id, _, seed in job["cases"]:
            progress.write(json.dumps({"start": case_id}) + "\n")
            progress.flush()
            peak = _peak_rss(resource)
            result = run_load_case(text, seed, folder)
            grown = _peak_rss(resource) - peak
            if grown > HUGE_ALLOCATION and "failure" not in result:
                result["failure"] = f"huge allocation: the peak resident memory grew by {grown >> 20} MiB"
            result["end"] = case_id
            progress.write(json.dumps(result) + "\n")
            progress.flush()


def load_replay(seed, index, folder=None):
    """Build the base document, mutate case ``index`` of ``seed`` and load it here, with its traceback."""
    folder = folder or tempfile.mkdtemp(prefix="permastruct-loadfuzz-")
    with open(build_load_document(folder)) as f:
        text = f.read()
    case_id, _, cseed = make_cases(seed, 1, 1, first=index)[0]
    work = os.path.join(folder, "replay")
    os.makedirs(work, exist_ok=True)
    print(f"case {case_id}: " + "; ".join(mutate_document(text, cseed)[1]))
    result = run_load_case(text, cseed, work, reraise=True)
    print(json.dumps(result, indent=2))
    return result


# =====================================================================================
# The command line of the subprocess and of replays
# =====================================================================================
def replay(seed, index, folder=None):
    """Build the bases, mutate case ``index`` of ``seed`` and run it here, printing what happens."""
    folder = folder or tempfile.mkdtemp(prefix="permastruct-fuzz-")
    bases = build_bases(os.path.join(folder, "bases"))
    case_id, base_index, cseed = make_cases(seed, 1, len(bases), first=index)[0]
    base = bases[base_index]
    with open(base["path"], "rb") as f:
        data = f.read()
    wal_path = base["path"] + F.WAL_SUFFIX
    wal = open(wal_path, "rb").read() if os.path.exists(wal_path) else None
    with open(base["map"]) as f:
        fmap = json.load(f)
    print(f"case {case_id} on {base['label']}:")
    print("  " + "\n  ".join(mutate(data, wal, fmap, cseed)[2]))
    work = os.path.join(folder, "replay")
    os.makedirs(work, exist_ok=True)
    result = run_case(base, fmap, data, wal, cseed, work, reraise=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2])
    elif sys.argv[1:2] == ["loadworker"]:
        load_worker(sys.argv[2])
    elif sys.argv[1:2] == ["loadreplay"]:
        load_replay(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1:2] == ["replay"]:
        replay(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(__doc__)
