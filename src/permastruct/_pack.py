"""Whole-store passes that follow references: ``objects()`` (every live object of a type) and ``pack()``.

Layer 11 of the architecture (``docs/architecture.rst``), beside ``_check``:
both walk the heap with :meth:`permastruct._heap.Heap.walk`, the one object
walker, and read references with :meth:`~permastruct._heap.Heap.references`.

Theory of operation
===================

Reference counting frees an object when its count reaches 0, so it never
frees a *cycle*: a tree whose nodes point at their parent keeps every count
above 0 after the tree is unlinked from the root.  :func:`pack` is a mark and
sweep over the whole store:

*Mark.*  The roots are what the root record names (the schema, the string
registry and every string it interns, the root object, the list of held
objects) and every object a live proxy of this process holds.  From them the
mark follows :meth:`~permastruct._heap.Heap.references` (which knows the
internal objects of collections too) with a work list, so deep structures
need no recursion.

*Sweep.*  Every allocated object (:meth:`~permastruct._heap.Heap.walk`) that
was not marked is garbage.  A reference from garbage to a marked object is
taken back (its count goes down: a proxy-held object may reach 0 and is then
recorded as held, as after any unlink); references between garbage objects
are not counted down, since both ends go.  Each garbage object is returned to
the allocator and listed in the commit's freed objects, so a reader's proxy
of it dies when the reader refreshes past the commit.  Then the allocator
merges the free lists (:meth:`~permastruct._alloc.Allocator.merge`), which
drops free pages at the end of the file from the page count.

*Relocation.*  The survivors are still spread over the file, so the free
pages are mostly not at its end.  :func:`_relocate` picks a *cut*: the
lowest page such that everything at or above it fits in the free room below
it (free slots of the same size class, free pages, counted per class).
Every live object at or above the cut is copied into room below it, and
every stored reference to it rewritten (:func:`reference_slots` knows where
each kind of object keeps its references: structure fields, collection
bodies, list cells, hash-table entries, B+tree keys, values, children and
leaf links, the string registry; the root record's slots, the schema's among
them).  Its old place is
freed and listed in the commit's freed objects: a reader's proxy of a moved
object dies at its refresh, as a freed object's does; after the refresh the
reader finds the object at its new place.  The emptied end of the file then
leaves the page count.  The cut counts room, not where it is, so another round
may reach lower: rounds follow while one lowers the page count (``_ROUNDS``).  Cost: one copy of each moved object and one pass
over every live object's references.

*What stays* (pins its page): an object a live proxy of this process holds
(a proxy is laid over the object's bytes), objects made or unlinked in the
pending transaction, the list of held objects, the body of a
forwarded structure whose proxy is live (it may be laid over the body), a
List's array whose cells a memoryview exports, and whatever an object whose
references this pass cannot place refers to.  A pinned object near the end of
the file keeps the file that long.

*Giving pages back.*  The checkpoint after the commit (and every later one,
and the close) gives the file's free end back to the file system, but only
past what every reader's snapshot can still reach (``Engine._give_back``): a
reader on a snapshot from before the pack keeps the file's length until it
refreshes or closes.  While the writer is open the end becomes a hole (its
map must stay backed by the file); its close cuts the file
(``Engine._shrink_file``).

The sweep is one change (``_types.run_change``): cut short by an interrupt,
the transaction cannot be committed and a rollback returns to the last
commit.  The relocation is part of the same change, so :func:`pack` is one
ordinary :meth:`Storage.commit` (which also commits what was pending before
the call): a crash at any point leaves the store as it was before the pack,
or after it, whole.
"""

from . import _format as F
from . import _types as T
from . import collections as C
from ._check import check_storage
from .errors import CorruptStorageError

__all__ = ["pack", "objects", "reference_slots", "verify", "evacuate"]

_INTERNAL = (F.T_ARRAY, F.T_TABLE, F.T_NODE)


def objects(storage, cls=None):
    """Proxies of every live object of type ``cls`` or a subclass (every object when None), in file order.

    The offsets are collected first (one walk of the pages), then proxies
    are made one at a time as the caller iterates.  Internal objects (the
    schema, the registry, collection bodies) are never listed; objects that
    nothing references and no proxy holds (freed at the next commit) are not
    live and are not listed.  Unlinked cycles are live until :func:`pack`.
    A pack that moves objects while an iteration is under way makes its
    next step raise ``RuntimeError`` (the offsets it found are stale).
    """
    heap = storage._heap
    classes = heap.classes
    if cls is not None:
        if not isinstance(cls, type) or not issubclass(cls, T.Persistent):
            raise TypeError(f"objects() takes a persistent type (a Structure, String, Buffer or collection "
                            f"class of the schema) or None, not {cls!r}")
        wanted = {type_id for type_id, klass in classes.items() if issubclass(klass, cls)}
    else:
        wanted = set(classes)
    pending = heap.unreferenced
    found = [(offset, type_id) for offset, _, type_id in heap.walk() if type_id in wanted]
    return _proxies(heap, found, pending)


def _proxies(heap, found, pending):
    relocations = heap.relocations
    for offset, type_id in found:
        if heap.relocations != relocations:  # (the offsets found are stale: moved, or another's now)
            raise RuntimeError("pack() moved objects during an iteration of objects(): call objects() again")
        if offset in pending and heap.live_proxy(offset) is None and heap.refcount(offset) == 0:
            continue  # freed at the next commit: not live
        if heap.type_at(offset) != type_id:
            continue  # freed (and perhaps reused) since the walk
        yield heap.proxy(offset)


def roots(storage):
    """The offsets a pack keeps whatever refers to them: the root record's objects, the interned
    strings, and every object a live proxy of this process holds."""
    heap, pf = storage._heap, storage._page_file
    slots = pf.slots
    found = [slots[F.SLOT_SCHEMA], slots[F.SLOT_REGISTRY], slots[F.SLOT_ROOT], slots[F.SLOT_HELD]]
    registry = slots[F.SLOT_REGISTRY]
    if registry:
        heap.check_offset(registry, F.REGISTRY.size)
        capacity = F.REGISTRY.unpack_from(heap.mapping.view(registry, F.REGISTRY.size))[3]
        heap.check_offset(registry, F.REGISTRY.size + 8 * capacity)
        found.extend(heap.mapping.view(registry + F.REGISTRY.size, 8 * capacity).cast("Q"))
    found.extend(heap.held_offsets())
    return [offset for offset in found if offset]


def mark(storage, allocated, progress=None):
    """The set of offsets reachable from :func:`roots` (each checked against ``allocated``)."""
    heap = storage._heap
    marked = set()
    work = [offset for offset in roots(storage) if offset in allocated]
    total = len(allocated)
    references = heap.references
    while work:
        offset = work.pop()
        if offset in marked:
            continue
        marked.add(offset)
        if progress is not None and not len(marked) & 1023:
            progress(len(marked), total, "marking")
        for child in references(offset):
            if child not in marked and child in allocated:
                work.append(child)
    return marked


def pack(storage, progress=None):
    """Free every object the root cannot reach (cycles included) in one commit; return what was freed.

    See the module documentation.  ``progress(done, total, what)`` is called
    as it goes: ``"pages"`` (the walk), ``"objects"`` (the verification,
    :func:`verify`), ``"marking"``, ``"freeing"``.  A damaged store:
    CorruptStorageError before anything is changed.  The
    result: ``objects_freed`` and ``bytes_freed`` (the objects and the space
    they had, those that reference counting frees at this commit included),
    ``pages_released`` (pages that became free: back on the free lists, or
    dropped from the end of the file), ``pages`` (the page count after) and
    ``objects_moved`` (moves of live objects lower in the file, see
    :func:`_relocate`; an object may move in more than one round).  Then a checkpoint, which gives the free end of the
    file back to the file system when no reader's snapshot still reaches it.
    """
    storage._check_writable()
    storage._check_whole()
    heap, pf = storage._heap, storage._page_file
    free_before, count_before = _free_pages(storage), pf.page_count
    capacity, types = {}, {}
    for offset, (size, type_id) in verify(storage, progress).items():
        capacity[offset], types[offset] = size, type_id
    freed, moved = T.run_change(heap, _sweep, storage, capacity, types, progress)
    storage.commit()
    pf._shrink_at_close = True  # checkpoints and the close give the free end back (see the module doc)
    try:
        pf.checkpoint()  # the free end goes back to the file system now, unless a reader is behind
    except OSError:
        if pf.sync_failed:
            raise  # (else the commit is safe in the log, and a later checkpoint does it)
    result = {
        "objects_freed": len(freed),
        "bytes_freed": sum(capacity.get(offset, 0) for offset in freed),
        "pages_released": _free_pages(storage) + count_before - pf.page_count - free_before,
        "pages": pf.page_count,
        "objects_moved": moved,
    }
    if progress is not None:
        progress(1, 1, "freeing")
    return result


def verify(storage, progress=None):
    """(Before a pack changes anything) Check the store as ``check()`` does, or raise
    CorruptStorageError saying what is wrong, where, and how to save what can be read; return
    ``{offset: (capacity, type id)}`` of every allocated object (the check's walk).

    A pack trusts what it reads: the pages and the allocator's lists (it
    allocates and frees), every object's references (it marks through them,
    counts down what garbage refers to, and rewrites them when it moves their
    targets) and the stored reference counts (one too low and the sweep frees
    a live object).  On a damaged store that trust spreads the damage to
    objects that were sound, so everything ``check()`` verifies of the objects
    is verified first (the root records and the log are not: a pack does not
    read them).  Cost: it adds about a fifth to a pack's time (the walk of the
    pages is shared with the pack; 35 ms on ``benchmarks.pack_shrink 100000``).
    """
    found = {}
    try:
        check_storage(storage, progress, found)
    except CorruptStorageError as exc:
        raise CorruptStorageError(
            f"{exc}; pack() changed nothing: it frees and moves objects by the references and counts "
            "it reads, so on a damaged store it would spread the damage. check() reports the same; "
            "save what can still be read with `python -m permastruct dump --json FILE > saved.json` "
            "and rebuild a store from it with `python -m permastruct load saved.json NEWFILE`") from exc
    return found


def _sweep(storage, capacity, types, progress):
    """(One change) Free what counts already free, then every unmarked object; merge the free lists;
    move the survivors above the cut lower (:func:`_relocate`).

    Returns the offsets of every object freed and the number of moves."""
    heap, alloc = storage._heap, storage._heap.allocator
    before = len(heap.freed)
    heap.collect_unreferenced()  # held objects stay pending (the commit records them)
    allocated = set(capacity).difference(heap.freed[before:])
    marked = mark(storage, allocated, progress)
    garbage = sorted(allocated.difference(marked))
    is_garbage = set(garbage)
    total = len(garbage)
    for done, offset in enumerate(garbage):
        if progress is not None and not done & 1023:
            progress(done, total, "freeing")
        for child in heap.references(offset):
            if child not in is_garbage:
                heap.decref(child)
    for offset in garbage:
        heap.unreferenced.discard(offset)
        heap.created.discard(offset)
        heap.drop_view(offset)
        heap.kill_proxy(offset, rolled_back="freed")
        alloc.free(offset)
        heap.freed.append(offset)
    alloc.merge()  # (also when nothing was freed now: what earlier commits freed joins up too)
    freed = heap.freed[before:]
    pf, moves, live = storage._page_file, 0, marked
    for _ in range(_ROUNDS):  # (the cut is an estimate: a round after a round can reach lower)
        count = pf.page_count
        moved = _relocate(storage, live, capacity, types)
        moves += len(moved)
        if not moved or pf.page_count >= count:
            break
        capacity = {moved.get(offset, offset): capacity[offset] for offset in live}
        types = {moved.get(offset, offset): types[offset] for offset in live}
        live = set(capacity)
    return freed, moves


def reference_slots(heap, offset, type_id):
    """The file offsets of the 8-byte cells of the object at ``offset`` that hold a reference (the
    non-zero ones), or None when this pass does not know where its references are.

    Read through the layouts of :mod:`permastruct._format`: a structure's
    reference fields (``_ps_ref_at``), a FORWARD's body, a collection's body,
    the cells of a List's ARRAY, the string keys and value cells of a TABLE's
    entries, the keys, values or children of a B+tree NODE (and a leaf's
    links to its neighbours, which are not counted references), the entries
    of the string registry.  What it finds must be exactly what
    :meth:`~permastruct._heap.Heap.references` lists (else: None), so a
    layout this pass reads wrongly pins the objects instead of corrupting
    them.  An object of an earlier structure version is read through that
    version's layout (the stored schema's, ``Layout.references``).
    """
    view, classes = heap.mapping.view, heap.classes
    links = ()
    if type_id in _INTERNAL:
        owner = classes.get(F.UINT32.unpack_from(view(offset + 8, 4))[0])
        if owner is None:
            return None
        if type_id == F.T_ARRAY:
            if not owner._ps_cell.is_ref:
                return []
            capacity = F.ARRAY.unpack_from(view(offset, F.ARRAY.size))[4]
            base = offset + F.ARRAY.size
            slots = [base + 8 * index for index, cell in enumerate(view(base, 8 * capacity).cast("Q")) if cell]
        elif type_id == F.T_TABLE:
            nslots, used = F.TABLE.unpack_from(view(offset, F.TABLE.size))[4:6]
            esize, value_at = owner._ps_esize, owner._ps_value_at
            key_ref = owner._ps_strings
            value_ref = owner._ps_has_values and owner._ps_value.is_ref
            slots = []
            if key_ref or value_ref:
                entries = offset + F.TABLE.size + -(-4 * nslots // 8) * 8
                raw = view(entries, esize * used)
                for at in range(0, esize * used, esize):
                    tag = F.UINT32.unpack_from(raw, at + 4)[0]
                    if not tag:
                        continue
                    if key_ref and tag == F.TAG_REF:
                        slots.append(entries + at + 8)
                    if value_ref and F.UINT64.unpack_from(raw, at + value_at)[0]:
                        slots.append(entries + at + value_at)
        else:  # T_NODE
            order = owner._ps_order
            leaf, n = F.NODE.unpack_from(view(offset, F.NODE.size))[3:5]
            n = min(n, order + 1)
            keys_at = offset + F.NODE.size
            values_at = keys_at + F.CELL * (order + 1)
            cells = []
            if owner._ps_key.is_ref:
                cells.extend(keys_at + 8 * index for index in range(n))
            if leaf:
                if owner._ps_value.is_ref:
                    cells.extend(values_at + 8 * index for index in range(n))
                links = [offset + 16, offset + 24]  # the next and previous leaf
            else:
                cells.extend(values_at + 8 * index for index in range(n + 1))  # the children
            slots = [at for at in cells if F.UINT64.unpack_from(view(at, 8))[0]]
    elif type_id == F.T_REGISTRY:
        capacity = F.REGISTRY.unpack_from(view(offset, F.REGISTRY.size))[3]
        base = offset + F.REGISTRY.size
        return [base + 8 * index for index, entry in enumerate(view(base, 8 * capacity).cast("Q")) if entry]
    elif type_id in (F.T_SCHEMA, F.T_HELD):
        return []  # (the held objects are not references: they are pinned)
    else:
        cls = classes.get(type_id)
        kind = getattr(cls, "_ps_kind", None)
        if cls is None:
            return None
        if kind == "structure":
            if cls.__dict__.get("_ps_old"):  # an earlier version: its layout is the stored schema's
                layout = getattr(getattr(heap.storage, "schema", None), "_layouts", {}).get(type_id)
                if layout is None:
                    return None
                slots = [offset + at for _, _, at in layout.references()]
            else:
                slots = [offset + at for at in cls._ps_ref_at]
        elif kind == "forward":
            slots = [offset + 8]
        elif kind in C.KINDS:
            slots = [offset + 16]
        else:
            slots = []
        slots = [at for at in slots if F.UINT64.unpack_from(view(at, 8))[0]]
    found = sorted(F.UINT64.unpack_from(view(at, 8))[0] for at in slots)
    if found != sorted(heap.references(offset)):
        return None
    return slots + [at for at in links if F.UINT64.unpack_from(view(at, 8))[0]]


def evacuate(storage, places):
    """Move every object off the pages of ``places`` (``(offset, capacity)`` of slab slots or page
    runs) that keeps the allocator from giving them out whole, every reference to it rewritten;
    return whether all of them moved (else nothing moved).

    For a rollback whose restored state uses a place that a view of the
    buffer protocol still shows (``Heap.quarantine_places``): the transaction
    had freed what was there (a List's array, replaced as it grew) and made
    the viewed object in its place.  What has to go: on a slab of the
    place's own size class, the object in that slot; elsewhere every object
    on the pages the place covers.  Nothing moves when one of them is
    pinned: a proxy of this process holds it, the program holds it
    unreferenced, the root record or the list of held objects names it, a
    FORWARD refers to it, a view shows it, or an object whose references
    this pass cannot read (:func:`reference_slots`) refers to it.  Cost: a
    walk over every object and its references (rollbacks that need this are
    rare).  Part of the caller's change.
    """
    heap, pf = storage._heap, storage._page_file
    alloc, view = heap.allocator, heap.mapping.view
    objects = {offset: (size, type_id) for offset, size, type_id in heap.walk()}

    def pages_of(offset, size):
        return range(pf.page_of(offset), pf.page_of(offset + size - 1) + 1)
    covered, movers = set(), set()
    for place, size in places:
        covered.update(pages_of(place, size))
    same_class = {}
    for place, size in places:
        if size <= alloc.max_small:
            page = pf.view(pf.page_of(place))
            if page[F.SLAB_AT] == F.KIND_SLAB and alloc.classes[page[F.SLAB_AT + 1]] == size:
                same_class[pf.page_of(place)] = (place, size)
    for offset, (size, _) in objects.items():
        pages = pages_of(offset, size)
        if size <= alloc.max_small and pages[0] in same_class:
            place, room = same_class[pages[0]]
            if offset < place + room and place < offset + size:
                movers.add(offset)
        elif any(pid in covered for pid in pages):
            movers.add(offset)
    if not movers:
        return True
    slots = pf.slots
    pinned = {slots[F.SLOT_SCHEMA], slots[F.SLOT_REGISTRY], slots[F.SLOT_ROOT], slots[F.SLOT_HELD]}
    taken = {place for place, _ in places}
    pinned.update(heap.held_objects(check=False), heap.unreferenced, heap.created_objects())
    pinned.update(offset for offset, entry in heap.quarantine.items() if entry[2] is not None and offset not in taken)
    pinned.update(offset for offset, exported in heap.export_places.items()
                  if offset not in taken and exported.showing())
    if movers & pinned or any(heap.live_proxy(offset) is not None for offset in movers):
        return False
    cells = []  # (file offset of a reference cell, the object holding it)
    for offset, (size, type_id) in objects.items():
        found = reference_slots(heap, offset, type_id)
        if found is None:
            if movers.intersection(heap.references(offset)):
                return False
            continue
        for at in found:
            if F.UINT64.unpack_from(view(at, 8))[0] in movers:
                if type_id == F.T_FORWARD:
                    return False
                cells.append((at, offset))
    # Room away from the covered pages (an offer on them is kept aside until the end).
    moved, decoys = {}, []
    for offset in sorted(movers, key=lambda offset: -objects[offset][0]):
        size = objects[offset][0]
        while True:
            new = alloc.alloc(size, zero=False)
            if not any(pid in covered for pid in pages_of(new, size)):
                break
            decoys.append(new)
        view(new, size)[:] = view(offset, size)
        moved[offset] = new
    for at, holder in cells:
        at += moved.get(holder, holder) - holder
        F.UINT64.pack_into(view(at, 8), 0, moved[F.UINT64.unpack_from(view(at, 8))[0]])
    for offset in decoys:
        alloc.free(offset)
    for offset, new in moved.items():
        heap.drop_view(offset)
        heap.proxies.pop(offset, None)  # (one only the map holds: a held one pinned it)
        alloc.free(offset)
        heap.freed.append(offset)  # (a reader's proxy of it dies at its refresh, as a freed one's)
    heap.moves += 1
    heap.relocations += 1
    return True


def _pinned(storage, live, types):
    """The live objects that the relocation leaves where they are.

    Objects a live proxy of this process holds (their proxies point into the
    map: a structure's fields are read in place), objects made or left
    unreferenced in this transaction, the list of held objects with what it
    lists, the body of a
    FORWARD that a live proxy holds (the proxy may be laid over the body), a List's array
    whose cells a memoryview exports, and whatever an object of an unknown
    layout references.  Returns ``(pinned, slots)``: the set, and the
    reference slots of every live object (None where unknown).
    """
    heap, pf = storage._heap, storage._page_file
    storage._root = None  # (the facade's cached root proxy: the root stays only if the program holds it)
    pinned = set(heap.held_offsets())
    held = set(pinned)
    pinned.update(heap.created_objects())
    pinned.update(heap.unreferenced)
    pinned.add(pf.slots[F.SLOT_HELD])
    pinned.update(heap.held_objects(check=False))  # (pinned & live is used: freed ones drop out)
    for cls in set(heap.classes.values()):
        exports = cls.__dict__.get("_ps_exports")
        if exports:
            pinned.update(array for array, exporters in list(exports.items()) if len(exporters))
    slots = {}
    for offset in live:
        type_id = types[offset]
        found = slots[offset] = reference_slots(heap, offset, type_id)
        if found is None or (type_id == F.T_FORWARD and offset in held):
            pinned.update(heap.references(offset))
    return pinned & live, slots


def _cut(storage, live, pinned, capacity):
    """The lowest page id below which everything above it fits (the page count after moving what
    lies at or above it), counted per size class and in pages; the page count when nothing can go."""
    heap, pf = storage._heap, storage._page_file
    alloc = heap.allocator
    page_size, count = pf.page_size, pf.page_count
    class_of = {size: index for index, size in enumerate(alloc.classes)}
    slab_class, used, run_pages = {}, {}, {}
    lowest = alloc.state_pid + 1
    for offset in live:
        pid = (offset - F.HEADER_BLOCK) // page_size
        size = capacity[offset]
        if size in class_of and size <= alloc.max_small:
            slab_class[pid] = class_of[size]
            used[pid] = used.get(pid, 0) + 1
            last = pid
        else:
            pages = (F.RUN_OBJECT + size) // page_size
            last = pid + pages - 1
            run_pages[last] = pages
        if offset in pinned:
            lowest = max(lowest, last + 1)
    in_use = set(slab_class)
    for last, pages in run_pages.items():
        in_use.update(range(last - pages + 1, last + 1))
    in_use.add(alloc.state_pid)
    slots = [alloc.slots_per_page(index) for index in range(len(alloc.classes))]
    room = [0] * len(slots)  # free slots below the cut, per class
    for pid, index in slab_class.items():
        room[index] += slots[index] - used[pid]
    demand = [0] * len(slots)  # objects at or above the cut, per class
    free_below = count - len(in_use)
    need = runs = 0  # new slab pages and run pages what is above needs below
    best = count
    for cut in range(count - 1, lowest - 1, -1):
        if cut in slab_class:
            index = slab_class[cut]
            before = max(0, -(-(demand[index] - room[index]) // slots[index]))
            room[index] -= slots[index] - used[cut]
            demand[index] += used[cut]
            need += max(0, -(-(demand[index] - room[index]) // slots[index])) - before
        elif cut in run_pages:
            runs += run_pages[cut]
        elif cut not in in_use:
            free_below -= 1
        if need + runs <= free_below:
            best = cut
    return best


def _relocate(storage, live, capacity, types):
    """Move every live object at or above the cut (:func:`_cut`) into free room below it, rewrite
    every reference to it, free its old place; returns ``{old offset: new offset}``.

    The allocator places each moved object; a place it offers in the zone
    being emptied is taken and kept aside (a *decoy*) so that the next offer
    is another, until it offers one outside (moved) or has to grow the file
    (no room: the object stays).  A page run above the cut needs that many
    free pages in one piece below it: first a *window* is chosen for it (the
    stretch below the cut with the fewest pages in use and nothing pinned)
    and emptied together with the small objects above the cut; then the runs
    move.  The decoys and the old places are freed after each step and the
    free lists merged, which drops the emptied end of the file from the page
    count.  Objects are moved highest first, each once; every reference is
    rewritten at the end.
    """
    heap, pf = storage._heap, storage._page_file
    alloc, mapping = heap.allocator, heap.mapping
    pinned, slots = _pinned(storage, live, types)
    cut = _cut(storage, live, pinned, capacity)
    page_size, limit = pf.page_size, pf.page_count
    end = F.HEADER_BLOCK + cut * page_size
    movable = [offset for offset in live if offset not in pinned]
    runs = sorted((offset for offset in movable if offset + capacity[offset] > end
                   and capacity[offset] > alloc.max_small), reverse=True)
    # (a run of one page, a B+tree node say, fits in any free page: no window for it)
    windows = _windows(storage, live, pinned, capacity, cut,
                       [capacity[offset] for offset in runs if capacity[offset] >= page_size])

    def in_windows(offset, size):
        return any(low < offset + size and offset < high for low, high in windows)
    later = set(runs)
    first = sorted((offset for offset in movable if offset not in later and (
        offset + capacity[offset] > end or in_windows(offset, capacity[offset]))), reverse=True)
    moved = {}
    _move(storage, first, capacity, moved, limit, lambda new, size: new + size <= end and not in_windows(new, size))
    _move(storage, runs, capacity, moved, limit, lambda new, size: new + size <= end)
    if moved:
        view = mapping.view
        for offset in live:
            found = slots[offset]
            if not found:
                continue
            base = moved.get(offset, offset)
            for at in found:
                at += base - offset
                target = F.UINT64.unpack_from(view(at, 8))[0]
                if target in moved:
                    F.UINT64.pack_into(view(at, 8), 0, moved[target])
                    if types[offset] == F.T_FORWARD:  # the writer's proxy of a FORWARD is laid over its
                        heap.proxies.pop(base, None)  # body (only the map holds it: a held one pins it)
        for slot in (F.SLOT_ROOT, F.SLOT_REGISTRY, F.SLOT_SCHEMA):
            if pf.slots[slot] in moved:
                pf.slots[slot] = moved[pf.slots[slot]]
        schema = getattr(storage, "schema", None)
        if getattr(schema, "_schema_at", None) in moved:  # (where the namespace read it from)
            schema._schema_at = moved[schema._schema_at]
    return moved


def _move(storage, offsets, capacity, moved, limit, accept):
    """Copy each object of ``offsets`` to a place the allocator offers that ``accept(new, size)``
    takes (see :func:`_relocate`); then free the decoys and the old places, and merge."""
    heap = storage._heap
    alloc, mapping, page_size = heap.allocator, heap.mapping, storage._page_file.page_size
    decoys, stuck, done = [], set(), []
    for offset in offsets:
        size = capacity[offset]
        if size in stuck:
            continue
        while True:
            new = alloc.alloc(size, zero=False)
            if accept(new, size):
                break
            if (new - F.HEADER_BLOCK) // page_size >= limit:  # it grew the file: no room
                alloc.free(new)
                stuck.add(size)
                new = None
                break
            decoys.append(new)
        if new is None:
            continue
        mapping.view(new, size)[:] = mapping.view(offset, size)
        moved[offset] = new
        done.append(offset)
    for offset in decoys:
        alloc.free(offset)
    exports = [cls.__dict__["_ps_exports"] for cls in set(heap.classes.values()) if cls.__dict__.get("_ps_exports")]
    for offset in done:
        new = moved[offset]
        heap.drop_view(offset)
        heap.drop_view(new)
        heap.proxies.pop(offset, None)  # (one only the map holds: a held one pins its object)
        heap.proxies.pop(new, None)
        for table in exports:
            table.pop(offset, None)
        alloc.free(offset)
        heap.freed.append(offset)  # a reader's proxy of it dies at refresh, as a freed one's
    if done:
        heap.moves += 1  # (a scan in flight over a B+tree finds its place again by key)
        heap.relocations += 1  # (an iteration of objects() in flight raises)
    alloc.merge()


#: The most relocation rounds a pack makes: another round runs while the last one lowered the
#: page count (the cut counts room per size class, not where it is, so the next can go lower).
_ROUNDS = 4

#: The most page runs a relocation empties a window for (the largest; each costs a pass over the
#: pages below the cut).  Smaller runs move only where the allocator finds a free run for them.
_WINDOWS = 64


def _windows(storage, live, pinned, capacity, cut, sizes):
    """For each page run of ``sizes`` (bytes, largest first) above the cut: ``(low, high)`` file
    offsets of a stretch of pages below the cut to empty for it - the one with the fewest pages in
    use, nothing pinned, not across a segment of the map, not overlapping another."""
    heap, pf = storage._heap, storage._page_file
    page_size = pf.page_size
    weight = [0] * (cut + 1)  # 1 for a page in use, cut + 1 for a page that cannot be emptied
    blocked = cut + 1
    weight[heap.allocator.state_pid] = blocked
    for offset in live:
        pid = (offset - F.HEADER_BLOCK) // page_size
        last = pid + max(1, (F.RUN_OBJECT + capacity[offset]) // page_size) - 1 \
            if capacity[offset] > heap.allocator.max_small else pid
        for page in range(pid, min(last, cut - 1) + 1):
            weight[page] = blocked if offset in pinned else max(weight[page], 1)
    starts = {pid for pid in heap.allocator._segment_starts() if 0 < pid < cut}
    windows = []
    for size in sorted(sizes, reverse=True)[:_WINDOWS]:
        pages = -(-(F.RUN_OBJECT + size) // page_size)
        if pages > cut:
            continue
        prefix = [0]
        for value in weight[:cut]:
            prefix.append(prefix[-1] + value)
        best = None
        for low in range(0, cut - pages + 1):
            cost = prefix[low + pages] - prefix[low]
            if cost < blocked and (best is None or cost < best[0]) and \
                    not any(low < start < low + pages for start in starts):
                best = (cost, low)
                if not cost:
                    break
        if best is None:
            continue
        low = best[1]
        for page in range(low, low + pages):
            weight[page] = blocked
        windows.append((F.HEADER_BLOCK + low * page_size, F.HEADER_BLOCK + (low + pages) * page_size))
    return windows


def _free_pages(storage):
    return storage._page_file.free_page_count() + sum(length for _, length in storage._heap.allocator.free_runs())
