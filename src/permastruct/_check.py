"""``Storage.check()``: verify every invariant of a store, or name the first broken one.

Checks, in order: the header and root records on disk; that every page is
exactly one of free, allocator state, slab, run (head or continuation) or
free run; slab headers, slot free lists and partial lists; the free-run bins;
that every allocated object has a known type and fits its space; that Strings
are UTF-8 and buffer metadata is whole (ASCII format without NUL, at most 64
dimensions, shape times itemsize equal to nbytes, the C size of a native
format equal to the itemsize, format and shape before the data); that every
reference points at an allocated object of the field's type; every
collection's own invariants (counts, array capacity, hash placement, B+tree
order, balance, subtree counts and leaf links); that each stored reference
count equals the references found; the string registry's count and hash
placement.  Damage that makes reading itself fail (a view outside the map, a
struct that does not fit) is reported as a CorruptStorageError too.
"""

import ctypes
import zlib

from . import _format as F
from . import _types as T
from . import collections as C
from ._alloc import PageScan
from ._heap import damage_reported
from .buffer import buffer_problem
from .errors import CorruptStorageError
from .structure import Structure, StructureMeta

def check_storage(storage, progress=None, found=None):
    """Verify every invariant of ``storage``; raise CorruptStorageError naming the first broken one.

    ``progress``, if given, is called as ``progress(done, total, what)`` while
    the check advances: over the pages (``what`` is ``"pages"``), then over
    the objects (``"objects"``); each phase ends with a call where ``done``
    equals ``total``.  It is called every few dozen pages or objects, so a
    caller that draws something should throttle itself.  ``found``, a dict,
    receives ``{offset: (capacity, type id)}`` of every allocated object (the
    walk's result, for a pass that goes on from a check: ``pack()``).
    """
    with damage_reported(storage._heap.name, "the check"):
        return _check_storage(storage, progress, found)


def _check_storage(storage, progress, found=None):
    pf = storage._page_file
    alloc = storage._heap.allocator
    path = storage.fileName

    def fail(message):
        raise CorruptStorageError(f"{storage._heap.name}: {message}")

    # -- header and root records on disk --------------------------------------
    head = pf.io.pread(F.HEADER_BLOCK, 0)
    if head[:8] != F.MAGIC or F.HEADER.unpack_from(head)[-1] != zlib.crc32(head[:60]):
        fail("the file header is damaged")
    # (the root records and the log: PageFile.check_files, called by Storage.check)

    # -- pages ------------------------------------------------------------------
    scan = PageScan(storage._page_file, storage._heap.allocator)
    objects = {offset: (capacity, type_id) for offset, capacity, type_id in scan.objects(progress)}
    if found is not None:
        found.update(objects)
    count, owner, slabs_with_room = pf.page_count, scan.owner, scan.slabs_with_room
    for index in range(len(alloc.classes)):
        pid, previous, seen = alloc._head(index), -1, 0
        while pid != -1:
            seen += 1
            if slabs_with_room.pop(pid, None) != index:
                fail(f"page {pid} on the partial list of size class {index} is not a slab of it with room")
            _, _, _, _, _, nxt, prv = F.SLAB.unpack_from(pf.view(pid), F.SLAB_AT)
            if prv != previous:
                fail(f"slab {pid}: back link {prv}, expected {previous}")
            previous, pid = pid, nxt
    if slabs_with_room:
        fail(f"slab {next(iter(slabs_with_room))} has free slots but is on no partial list")

    # -- objects and references ---------------------------------------------------
    classes = storage._heap.classes
    layouts = storage.schema._layouts
    incoming = dict.fromkeys(objects, 0)
    kinds = {}

    def referenced(target, expected, where):
        if target not in objects:
            fail(f"{where} refers to {target:#x}, which is not an allocated object")
        if expected is not None:
            type_id = F.UINT32.unpack_from(pf.mapping.view(target, 4))[0]
            if type_id == F.T_FORWARD:  # an object of an earlier version, moved: its body says its type
                type_id = F.UINT32.unpack_from(pf.mapping.view(
                    F.FORWARD.unpack_from(pf.mapping.view(target, F.FORWARD.size))[2], 4))[0]
            cls = classes.get(type_id)
            if cls is not None and not issubclass(cls, expected) and isinstance(cls, StructureMeta):
                # (a reader's own class and the class it built for a later version of the type)
                cls = expected if expected.__name__ in {k.__name__ for k in cls.__mro__} else cls
            if cls is None or not issubclass(cls, expected):
                fail(f"{where} refers to {target:#x}, which is not a {expected.__name__}")
        incoming[target] += 1

    total = len(objects)
    for done, (offset, (capacity, type_id)) in enumerate(objects.items()):
        if progress is not None and not done & 255:
            progress(done, total, "objects")
        if type_id in (F.T_SCHEMA, F.T_BYTESTRING, F.T_STRING):
            needed = F.STRING.size + storage._heap.string_header(offset)[3]
            if type_id == F.T_STRING and needed <= capacity:
                try:
                    bytes(pf.mapping.view(offset + F.STRING.size, needed - F.STRING.size)).decode("utf-8")
                except UnicodeDecodeError as exc:
                    fail(f"String {offset:#x} is not UTF-8 ({exc.reason} at byte {exc.start})")
        elif type_id == F.T_HELD:
            if capacity < F.HELD.size:
                fail(f"the list of held objects {offset:#x} is in a slot of {capacity} bytes")
            needed = F.HELD.size + 8 * F.HELD.unpack_from(pf.mapping.view(offset, F.HELD.size))[2]
        elif type_id == F.T_REGISTRY:
            if capacity < F.REGISTRY.size:
                fail(f"registry {offset:#x} is in a slot of {capacity} bytes")
            needed = F.REGISTRY.size + 8 * F.REGISTRY.unpack_from(pf.mapping.view(offset, F.REGISTRY.size))[3]
        elif type_id == F.T_BUFFER:
            if capacity < F.BUFFER.size:
                fail(f"buffer {offset:#x} is in a slot of {capacity} bytes")
            _, _, nbytes, data_offset, itemsize, ndim, fmtlen, high = F.BUFFER.unpack_from(
                pf.mapping.view(offset, F.BUFFER.size))
            fmtlen |= high << 8
            if F.BUFFER.size + fmtlen > capacity:
                fail(f"buffer {offset:#x}: its format runs past its {capacity} bytes")
            fmt = bytes(pf.mapping.view(offset + F.BUFFER.size, fmtlen))
            shape_at = F.buffer_layout(fmtlen, ndim)[0]
            shape = bytes(pf.mapping.view(offset + shape_at, max(0, min(8 * ndim, capacity - shape_at))))
            problem = buffer_problem(nbytes, data_offset, itemsize, ndim, fmt, shape, capacity)
            if problem is not None:
                fail(f"buffer {offset:#x}: {problem}")
            needed = data_offset + nbytes
        elif type_id in C.INTERNAL_TYPES:
            owner_type = classes.get(F.UINT32.unpack_from(pf.mapping.view(offset + 8, 4))[0])
            if owner_type is None or owner_type._ps_kind not in C.KINDS:
                fail(f"internal object {offset:#x} names an owner that is not a collection type")
            needed = owner_type._ps_internal_size(storage._heap, offset, type_id)
            if needed is None:
                fail(f"internal object {offset:#x} of type {type_id} does not belong to a {owner_type.__name__}")
        elif type_id in layouts:  # an object of an earlier version of its type: its stored layout
            needed = layouts[type_id].size
        elif type_id in classes:
            needed = ctypes.sizeof(classes[type_id])
        else:
            fail(f"object {offset:#x} has unknown type {type_id}")
        if needed > capacity:
            fail(f"object {offset:#x} needs {needed} bytes but has {capacity}")
        kinds[type_id] = kinds.get(type_id, 0) + 1
        cls = classes.get(type_id)
        if type_id in layouts:
            for name, ftype, at in layouts[type_id].references():
                target = F.UINT64.unpack_from(pf.mapping.view(offset + at, 8))[0]
                if target:
                    referenced(target, ftype, f"{cls.__name__}.{name} of {offset:#x} (an earlier version)")
        elif type_id == F.T_FORWARD:
            body = F.FORWARD.unpack_from(pf.mapping.view(offset, F.FORWARD.size))[2]
            if body not in objects or F.UINT32.unpack_from(pf.mapping.view(body, 4))[0] == F.T_FORWARD:
                fail(f"the forwarded object {offset:#x} has no body at {body:#x}")
            referenced(body, Structure, f"the forwarded object {offset:#x}")
            if F.UINT32.unpack_from(pf.mapping.view(body + 4, 4))[0] != 1:
                fail(f"the body {body:#x} of the forwarded object {offset:#x} is referenced elsewhere")
        elif cls is not None and cls._ps_kind == "structure":
            proxy = storage._heap.view_of(cls, offset)
            for name, ftype in cls._ps_field_types.items():
                if not isinstance(ftype, T.ValueType):
                    target = getattr(proxy, "_ps_ref_" + name)
                    if target:
                        referenced(target, ftype, f"{cls.__name__}.{name} of {offset:#x}")
        elif cls is not None and cls._ps_kind in C.KINDS:
            storage._heap.view_of(cls, offset)._ps_check(referenced, fail)
    slots = pf.slots
    referenced(slots[F.SLOT_SCHEMA], None, "the schema slot")
    if F.UINT32.unpack_from(pf.mapping.view(slots[F.SLOT_SCHEMA], 4))[0] != F.T_SCHEMA:
        fail("the schema slot does not hold the schema")
    registry = slots[F.SLOT_REGISTRY]
    referenced(registry, None, "the registry slot")
    if slots[F.SLOT_ROOT]:
        referenced(slots[F.SLOT_ROOT], Structure, "the root slot")
    type_id, _, stored_count, capacity = F.REGISTRY.unpack_from(pf.mapping.view(registry, F.REGISTRY.size))
    if type_id != F.T_REGISTRY or not capacity or capacity & (capacity - 1):
        fail("the registry slot does not hold a registry")
    entries = pf.mapping.view(registry + F.REGISTRY.size, capacity * 8).cast("Q")
    found = 0
    for index, target in enumerate(entries):
        if not target:
            continue
        found += 1
        referenced(target, None, f"registry entry {index}")
        kind, _, stored_hash, length = storage._heap.string_header(target)
        if kind not in (F.T_BYTESTRING, F.T_STRING):
            fail(f"registry entry {index} is not a string")
        data = bytes(pf.mapping.view(target + F.STRING.size, length))
        if F.string_hash(kind, data) != stored_hash:
            fail(f"string {target:#x} has a wrong stored hash")
        probe = stored_hash & (capacity - 1)
        while probe != index:
            if not entries[probe]:
                fail(f"registry entry {index} cannot be found from its hash position")
            probe = (probe + 1) & (capacity - 1)
    if found != stored_count:
        fail(f"the registry counts {stored_count} strings but holds {found}")
    held = set()
    if slots[F.SLOT_HELD]:
        referenced(slots[F.SLOT_HELD], None, f"root slot {F.SLOT_HELD}")
        if F.UINT32.unpack_from(pf.mapping.view(slots[F.SLOT_HELD], 4))[0] != F.T_HELD:
            fail(f"root slot {F.SLOT_HELD} does not hold the list of held objects")
        held = set(storage._heap.held_objects())
        for target in held:
            if target not in objects:
                fail(f"the list of held objects names {target:#x}, which is not an allocated object")
    # Objects nothing references: the writer's pending ones (freed at its next commit) and the
    # ones the file records as held; any other is space lost for good.
    pending = held | set(storage._heap.unreferenced)
    for offset, refs in ((o, F.UINT32.unpack_from(pf.mapping.view(o + 4, 4))[0]) for o in objects):
        if refs != incoming[offset]:
            fail(f"object {offset:#x} stores {refs} references but {incoming[offset]} were found")
        if not refs and offset not in pending:
            fail(f"object {offset:#x} ({_type_name(classes, F.UINT32.unpack_from(pf.mapping.view(offset, 4))[0])}) "
                 "is referenced by nothing and recorded nowhere: its space is lost")
    if progress is not None:
        progress(total, total, "objects")
    return {
        "file": path,
        "pages": count,
        "page_size": pf.page_size,
        "free_pages": sum(1 for what in owner if what == "free"),
        "objects": len(objects),
        "unreferenced": sum(1 for o in objects if incoming[o] == 0),  # freed at the next commit
        "strings": stored_count,
        "types": _counts_by_name(classes, kinds),
    }


def _counts_by_name(classes, kinds):
    """``{type name: objects}`` (the versions of a type count as the type)."""
    counts = {}
    for type_id, n in sorted(kinds.items()):
        name = _type_name(classes, type_id)
        counts[name] = counts.get(name, 0) + n
    return counts


def _type_name(classes, type_id):
    if type_id in classes and type_id != F.T_FORWARD:
        return classes[type_id].__name__
    return {F.T_SCHEMA: "(schema)", F.T_REGISTRY: "(registry)", F.T_HELD: "(held objects)",
            F.T_FORWARD: "(moved objects)",
            F.T_ARRAY: "(list arrays)",
            F.T_TABLE: "(hash tables)", F.T_NODE: "(tree nodes)"}.get(type_id, str(type_id))
