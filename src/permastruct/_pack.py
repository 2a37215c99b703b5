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
drops free pages at the end of the file from the page count.  A list's array
or a hash table that ends the file (a collection that grew last) is moved
into free space lower down, and the merge runs again.  The writer's
close then cuts them off the file (``Engine._shrink_file``), unless a reader
is behind the last commit: then a later close of a writer that packs does.

The sweep is one change (``_types.run_change``): cut short by an interrupt,
the transaction cannot be committed and a rollback returns to the last
commit.  :func:`pack` ends with one ordinary :meth:`Storage.commit`, which
also commits what was pending before the call.
"""

from . import _format as F
from . import _types as T
from . import collections as C

__all__ = ["pack", "objects"]


def objects(storage, cls=None):
    """Proxies of every live object of type ``cls`` or a subclass (every object when None), in file order.

    The offsets are collected first (one walk of the pages), then proxies
    are made one at a time as the caller iterates.  Internal objects (the
    schema, the registry, collection bodies) are never listed; objects that
    nothing references and no proxy holds (freed at the next commit) are not
    live and are not listed.  Unlinked cycles are live until :func:`pack`.
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
    for offset, type_id in found:
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
    as it goes: ``"pages"`` (the walk), ``"marking"``, ``"freeing"``.  The
    result: ``objects_freed`` and ``bytes_freed`` (the objects and the space
    they had, those that reference counting frees at this commit included),
    ``pages_released`` (pages that became free: back on the free lists, or
    dropped from the end of the file), ``pages`` (the page count after) and
    ``objects_moved`` (list arrays and hash tables moved off the end of the
    file, see :func:`_move_tail`).
    """
    storage._check_writable()
    storage._check_whole()
    heap, pf = storage._heap, storage._page_file
    free_before, count_before = _free_pages(storage), pf.page_count
    capacity, types = {}, {}
    for offset, size, type_id in heap.walk(progress):
        capacity[offset], types[offset] = size, type_id
    freed, moved = T.run_change(heap, _sweep, storage, capacity, types, progress)
    storage.commit()
    pf._shrink_at_close = True  # the close cuts the free end of the file (if no reader is behind)
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


def _sweep(storage, capacity, types, progress):
    """(One change) Free what counts already free, then every unmarked object; merge the free lists;
    move the arrays and tables that end the file lower.

    Returns the offsets of every object freed and the number of objects moved."""
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
        heap.views.pop(offset, None)
        heap.kill_proxy(offset, rolled_back="freed")
        alloc.free(offset)
        heap.freed.append(offset)
    alloc.merge()  # (also when nothing was freed now: what earlier commits freed joins up too)
    moved = _move_tail(storage, marked, capacity, types)
    return heap.freed[before:], moved


def _move_tail(storage, live, capacity, types):
    """Move the list arrays and hash tables that end the file into free runs lower down, one at a
    time, merging after each, while the object on the last page is one of them.

    Their one reference is their collection's ``body`` (``_format.COLLECTION``), and no proxy
    points into them (collections find them through ``heap.views``, keyed by offset, dropped
    here; a reader drops its views at refresh).  Anything else on the last page (a slab, a
    structure, a buffer a proxy may point into) ends the moving.  Returns how many moved.
    """
    heap, pf = storage._heap, storage._page_file
    alloc, mapping, classes = heap.allocator, heap.mapping, heap.classes
    owners = {}
    for offset in live:
        cls = classes.get(types.get(offset))
        if cls is not None and cls._ps_kind in C.KINDS:
            body = F.COLLECTION.unpack_from(mapping.view(offset, F.COLLECTION.size))[3]
            if body:
                owners[body] = offset
    ends = {offset + capacity[offset]: offset for offset in owners
            if offset in capacity and types.get(offset) in (F.T_ARRAY, F.T_TABLE)}
    moved = 0
    while True:
        end = F.HEADER_BLOCK + pf.page_count * pf.page_size
        offset = ends.pop(end, None)
        if offset is None:
            return moved
        owner = owners[offset]
        size = classes[types[owner]]._ps_internal_size(heap, offset, types[offset])
        if not size or size > capacity[offset]:
            return moved
        new = alloc.alloc(size, zero=False)
        if new > offset:  # no room lower down (it took pages past the end: give them back)
            alloc.free(new)
            alloc.merge()
            return moved
        mapping.view(new, size)[:] = mapping.view(offset, size)
        heap.views.pop(offset, None)
        F.UINT64.pack_into(mapping.view(owner + 16, 8), 0, new)  # COLLECTION: the body, at byte 16
        alloc.free(offset)
        moved += 1
        alloc.merge()
        # (where it went may end the file now, after a merge: then it moves again, lower still)
        capacity[new], types[new], owners[new] = alloc.capacity(new), types[offset], owner
        ends[new + capacity[new]] = new


def _free_pages(storage):
    return storage._page_file.free_page_count() + sum(length for _, length in storage._heap.allocator.free_runs())
