"""The object heap: every persistent object's life, from allocation to free, and the proxies that show it.

Layer 7 of the architecture (``docs/architecture.rst``): the types
(:mod:`~permastruct.structure`, :mod:`~permastruct.strings`,
:mod:`~permastruct.buffer`, the collections) make and change their objects
through a :class:`Heap`, and never reach into the storage; the heap reaches
down into the allocator (:mod:`._alloc`) and the mapped file only.

Theory of operation
===================

*Objects.*  Every object starts with ``OBJECT_HEADER`` (``_format``): its
type id and its reference count, the number of references to it stored in
the file.  A new object has count 0 and is *unreferenced*; storing it
somewhere increments the count, replacing or removing it decrements it.  An
object whose count is 0 is not freed at once (it may be stored again in the
same transaction: ``a.x, a.y = a.y, a.x``) but at the next commit
(:meth:`Heap.collect_unreferenced`), unless a live proxy holds it: then the
file records it as *held* (root slot ``SLOT_HELD``) so that a crash or a
rollback cannot leak it.  Freeing an object decrements what it referenced.

*Proxies.*  A proxy is a ``ctypes`` structure laid over the object's bytes in
the map (``from_address``: a read of a by-value field is one C-level read).
Each proxy records its object's file offset in its ``_ps_oid`` slot.  The heap
keeps at most one proxy per object (``proxies``: offset -> proxy), which is
how it knows that an unreferenced object is still held, and which proxies to
kill when their object goes (rollback of its creation, a free, a reader's
refresh past its free).  The map holds its proxies itself, not through weak
references (a weak reference per proxy made was a third of the cost of
making one): a proxy is *held* when something besides the map refers to it,
which its reference count says (:func:`_held`), and the proxies nothing else
holds are dropped about once per doubling of the map (:meth:`Heap._prune`).  A
proxy does not keep the map alive: the writer never unmaps while it is open,
a reader keeps an old map for as long as a proxy points into it, and at
close every class of the storage refuses to be used, so no proxy touches the
memory afterwards.

*Changes.*  ``_changing`` is the change guard of ``_types.change``: the
thread in the middle of a change of this heap, or 0.
"""

import bisect
import contextlib
import ctypes
import struct
import sys
import weakref

from . import _format as F
from . import _types as T
from ._alloc import PageScan
from .errors import CorruptStorageError, PermastructError, ReadOnlyError, StorageClosedError

_refcount = sys.getrefcount

__all__ = ["Heap"]

_OID = T.Persistent.__dict__["_ps_oid"]  # the slot that holds a proxy's file offset (its object id)
_set_oid = _OID.__set__
_TYPE = F.UINT32.unpack_from
_PUT = F.UINT32.pack_into
_REFS_AT = 4
_INTERNAL = (F.T_ARRAY, F.T_TABLE, F.T_NODE)


class _Probe:
    pass


_PROBE = {0: _Probe()}
#: The reference count of a proxy that only the map holds, as ``_refcount(proxies[offset])`` sees it
#: (the map's reference and the argument's: 2 on CPython 3.11), measured rather than assumed.  Every
#: test of whether a proxy is held is written in that form.
_MAP_ONLY = _refcount(_PROBE[0])


class _Exported:
    """What the heap knows of an object whose memory it exported (``Heap.export_places``): whether
    anything made from the export may still point at it."""

    __slots__ = ("at", "owner", "exporters", "proxy", "proxies")

    def __init__(self, at, owner, exporters, proxy, proxies):
        self.at = at  # the offset of that proxy's object
        self.owner = owner  # the List whose array it is, or 0
        self.exporters = exporters  # WeakSet of the MemoryExporters made
        self.proxy = proxy  # weak reference to the proxy the export was made from
        self.proxies = proxies

    def showing(self):
        """Whether an exporter is alive (a view made from it: a memoryview, ``numpy.asarray``), or
        the program holds the proxy the export was made from (``numpy.frombuffer`` lets go of the
        view at once and keeps the proxy, whose memory it goes on using)."""
        if len(self.exporters):
            return True
        proxy = self.proxy()
        if proxy is None:
            return False
        in_map = 1 if self.proxies.get(self.at) is proxy else 0
        return _refcount(proxy) > 2 + in_map  # (this name, the argument; the map's)


class _Keeper:
    """What holds a quarantined List array in ``Heap.proxies`` (it has no proxy class of its own):
    nothing but its being there; each heap makes a subclass naming its storage (for its dead form)."""

    __slots__ = ()
    _ps_closed = False


def _held(proxies, offset):
    """Whether something besides the map holds the proxy of ``offset`` (False when there is none)."""
    return offset in proxies and _refcount(proxies[offset]) > _MAP_ONLY


class Heap:
    """The objects of one open storage (see the module documentation)."""

    def __init__(self, storage, page_file, allocator):
        self.storage = storage
        self.pf = page_file
        self.mapping = page_file.mapping
        self.allocator = allocator
        self.readonly = storage.readonly
        #: type id -> proxy class of this storage (filled by the schema)
        self.classes = {}
        #: offset -> the one proxy of the object there (held, or not yet pruned)
        self.proxies = {}
        self._prune_at = 1024  # the size of ``proxies`` at which the proxies nothing holds are dropped
        self.unreferenced = set()  # objects whose count is 0: freed at the next commit
        self.created = set()  # objects made in this transaction (their proxies die at rollback)
        self.created_many = []  # arrays of the offsets of objects made many at once, as ``created``
        self.freed = []  # objects freed in this transaction (the commit tells readers)
        self.views = {}  # offset of a collection's internal object -> its cached views
        #: offset of a hash table -> its cached view, which a Dict or Set proxy may also keep
        #: (``_ps_tv``): one leaves only through drop_view or forget_views, which retire it first
        self.tables = {}
        self.moves = 0  # counts the times internal objects may have moved (pack, refresh, rollback, undo)
        self.relocations = 0  # counts the packs that moved objects
        self.exports = weakref.WeakValueDictionary()  # buffer views handed out (released at close)
        self.export_places = {}  # offset of an object a view shows -> (owner List or 0, WeakSet of exporters)
        self._places_at = 64  # the size of ``export_places`` at which the places no view shows go
        self.quarantine = {}  # offset -> [capacity, exported, keeper, bytes] (see quarantine_candidates)
        self.poisoned = {}  # offset -> views that may write into a live object (see quarantine_candidates)
        self._blanks = {}  # (type id, size) -> a new object's bytes: the header, then zeros
        self._changing = 0
        self.closing = False
        self.closed = False
        #: Whether objects may be made and changed now: open, writable, not in a forked child
        #: (kept by the storage; False sends the check to the storage for the error that says why).
        self.writable = not storage.readonly
        self.proxy = self._proxy_function()

    def __repr__(self):
        return repr(self.storage)

    @property
    def name(self):
        """How messages name the store: its path quoted (``'/data/x.ps'``), or
        ``<in-memory storage of MyStorage>`` for ``MyStorage(None)``."""
        path = self.storage.fileName
        return repr(path) if path is not None else f"<in-memory storage of {type(self.storage).__name__}>"

    # -- offsets ---------------------------------------------------------------------
    def check_offset(self, offset, size=8):
        """Refuse an offset read from the file that is not an object's place in the committed pages."""
        pf = self.pf
        end = F.HEADER_BLOCK + pf.page_count * pf.page_size
        if offset < F.HEADER_BLOCK or offset % 8 or offset + size > end:
            raise CorruptStorageError(f"{self.name}: reference {offset:#x} (+{size} bytes) is "
                                      f"outside the file's {pf.page_count} pages")

    def locate(self, offset, size):
        """``(segment, local)`` of the ``size`` bytes at ``offset``, which must lie in one segment."""
        mapping = self.mapping
        segment = mapping._hot
        if segment is None or not segment.start <= offset < segment.start + segment.length:
            try:
                segment = mapping.segment_of(offset)
            except IndexError:
                raise CorruptStorageError(f"{self.name}: reference {offset:#x} is outside the mapped "
                                          "file") from None
        local = offset - segment.start
        if offset < F.HEADER_BLOCK or offset & 7 or local + size > segment.length:
            raise CorruptStorageError(f"{self.name}: an object at {offset:#x} (+{size} bytes) is not "
                                      "in the mapped pages, or crosses the end of a segment of the map")
        return segment, local

    def type_at(self, offset):
        """The type id stored at ``offset``, or None when the offset is outside the map."""
        try:
            return _TYPE(self.mapping.view(offset, 4))[0]
        except IndexError:
            return None

    # -- proxies -----------------------------------------------------------------------
    def _proxy_function(self):
        """``proxy(offset)``: the proxy of the object at ``offset`` (None for 0, the null reference) -
        the live one, or a new one of the type its header names.

        The hot path of every read of a reference, so a closure made once per
        heap, with what it needs bound: it takes the common case (a
        fixed-size object, in the segment of the last look-up or found by a
        bisect of the segments) in a dozen C-level steps and leaves the rest to
        :meth:`_proxy_slow`.
        """
        proxies, classes, mapping = self.proxies, self.classes, self.mapping
        get, set_oid, unpack, header_block = proxies.get, _set_oid, _TYPE, F.HEADER_BLOCK
        slow, bisect_right = self._proxy_slow, bisect.bisect_right
        heap = self

        def proxy(offset):
            if not offset:
                return None
            proxy = get(offset)
            if proxy is not None and not type(proxy)._ps_closed:
                return proxy
            segment = mapping._hot
            if segment is None or not segment.start <= offset < segment.end:
                # another segment of the map (a large store has several): found by one bisect
                found = bisect_right(mapping._starts, offset) - 1
                if found < 0:
                    return slow(offset)
                segment = mapping.segments[found]
                if offset >= segment.end:
                    return slow(offset)
                mapping._hot = segment
            if offset & 7 or offset < header_block:
                return slow(offset)
            local = offset - segment.start
            cls = classes.get(unpack(segment.map, local)[0])
            if cls is None or cls._ps_validate is not None or local + cls._ps_extent > segment.length:
                return slow(offset)
            proxy = cls.from_address(segment.address + local)
            set_oid(proxy, offset)
            proxies[offset] = proxy
            if len(proxies) > heap._prune_at:
                heap._prune()
            return proxy
        return proxy

    def _proxy_slow(self, offset):
        """:meth:`proxy` for what its fast path leaves: another segment, damage, types whose extent
        the file says (checked here), a closed storage."""
        if self.closed:
            raise StorageClosedError(f"{self.storage!r} is closed")
        segment, local = self.locate(offset, 8)
        cls = self.classes.get(_TYPE(segment.map, local)[0])
        if cls is None:
            raise CorruptStorageError(f"{self.name}: the object at {offset:#x} has unknown type "
                                      f"{_TYPE(segment.map, local)[0]}")
        return self.remember(offset, cls._ps_make(segment, local))

    def at(self, cls, offset):
        """A new proxy of class ``cls`` for the object just made at ``offset`` (remembered)."""
        segment, local = self.locate(offset, cls._ps_extent)
        return self.remember(offset, cls.from_address(segment.address + local))

    def view_of(self, cls, offset):
        """A proxy of class ``cls`` at ``offset``, checked like :meth:`proxy` makes them but not
        remembered (for a walk over every object that keeps none of them)."""
        segment, local = self.locate(offset, 8)
        proxy = cls._ps_make(segment, local)
        _set_oid(proxy, offset)
        return proxy

    def remember(self, offset, proxy):
        """Make ``proxy`` the live proxy of the object at ``offset``; return it."""
        _set_oid(proxy, offset)
        proxies = self.proxies
        proxies[offset] = proxy
        if len(proxies) > self._prune_at:
            self._prune()
        return proxy

    def _prune(self):
        """Drop the proxies nothing else holds: about once per doubling of the map, so O(1) each (and
        at a reader's refresh, before it lets go of old maps they may point into)."""
        proxies = self.proxies
        # Deleted in place: an interrupt in between leaves some of them, never a held proxy
        # forgotten (a rollback kills the proxies it finds here; a clear() and update() cut short
        # in between left the held ones out).
        for offset in [offset for offset in proxies if _refcount(proxies[offset]) <= _MAP_ONLY]:  # (_held)
            del proxies[offset]
        self._prune_at = 2 * len(proxies) + 1024

    def created_objects(self):
        """Every object made in this transaction: ``created``, with ``created_many`` folded into it."""
        created = self.created
        for offsets in self.created_many:
            created.update(offsets)
        self.created_many = []
        return created

    def kill_created(self, created):
        """Kill the live proxies of the objects in set ``created`` (the rollback of their making).

        Only the live proxies are looked at when there are fewer of them.  A
        kill cut short leaves ``created`` whole for the retry.
        """
        proxies = self.proxies
        doomed = [offset for offset in proxies if offset in created] if len(proxies) < len(created) else created
        for offset in list(doomed):
            self.kill_proxy(offset, rolled_back=True)

    def forget_views(self):
        """Drop the cached views of internal objects: the map now shows another state (a refresh,
        a rollback, an undo), where they may be elsewhere; a scan in flight finds its place again
        (``moves``), a proxy that kept a table's view makes it again (see :meth:`drop_view`)."""
        for table in self.tables.values():
            table.fast = None
        self.tables.clear()
        self.views.clear()
        self.moves += 1

    def drop_view(self, offset):
        """Drop the cached views of the internal object at ``offset``: it is freed, or moved.

        A hash table's view is retired first (its ``fast`` set to None), then
        forgotten: a proxy that keeps it (``_ps_tv``) reads ``fast`` before
        every lookup, and a retired view sends it the general way, which finds
        the table again from the proxy's body.  Cut short in between, the
        retired view stays cached, still right about a table not yet freed.
        """
        table = self.tables.get(offset)
        if table is not None:
            table.fast = None
            del self.tables[offset]
        self.views.pop(offset, None)

    def live_proxy(self, offset):
        """The proxy of the object at ``offset`` if the program holds one, else None."""
        return self.proxies[offset] if _held(self.proxies, offset) else None

    def held_offsets(self):
        """The offsets of the objects whose proxies the program holds."""
        proxies = self.proxies
        return [offset for offset in list(proxies) if _held(proxies, offset)]

    def kill_proxy(self, offset, rolled_back=False):
        """Make the live proxy of the object at ``offset`` (if any) refuse every use, then forget it.

        Dead first, then forgotten: cut short in between, :meth:`proxy` takes
        a dead one for none.
        """
        proxy = self.proxies.get(offset)
        if proxy is not None:
            object.__setattr__(proxy, "__class__", T.closed_class(type(proxy), rolled_back))
        self.proxies.pop(offset, None)

    def addresses_in_use(self):
        """The addresses of every proxy the program holds (a reader keeps the maps they point into);
        the others are dropped first, since nothing may use them after their map is gone."""
        self._prune()
        return [ctypes.addressof(proxy) for proxy in self.proxies.values()]

    # -- making and freeing --------------------------------------------------------------
    def check_writable(self):
        """Refuse to make or change objects unless the storage is open, writable and this process's."""
        if not self.writable:
            self.storage._check_writable()  # raises the error that says why

    def new_object(self, cls, size):
        """A new zeroed object of ``cls`` (``size`` bytes, header included), not yet referenced."""
        if not self.writable:
            self.storage._check_writable()
        type_id = cls._ps_type_id
        blank = self._blanks.get((type_id, size))
        if blank is None and size <= 1024:  # made once per type and size: the header, then zeros
            blank = self._blanks[type_id, size] = F.OBJECT_HEADER.pack(type_id, 0) + bytes(size - 8)
        if blank is not None:
            offset, view, local, _ = self.allocator.place(size)
            view[local:local + size] = blank
        else:  # a large object: the allocator zeroes it a piece at a time
            offset = self.allocator.alloc(size)
            F.OBJECT_HEADER.pack_into(self.mapping.view(offset, 8), 0, type_id, 0)
        self.created.add(offset)
        self.unreferenced.add(offset)
        return offset

    def drop_internal(self, offset):
        """Free a collection's internal object at once (it was replaced or emptied)."""
        self.drop_view(offset)
        self.allocator.free(offset)

    def free_object(self, offset):
        """Free the object at ``offset`` now; what it referenced loses a reference."""
        for child in self.references(offset):
            self.decref(child)
        self.unreferenced.discard(offset)
        self.drop_view(offset)
        self.kill_proxy(offset, rolled_back=not self.closing)
        self.allocator.free(offset)
        self.freed.append(offset)

    def collect_unreferenced(self, everything=False):
        """Free the objects that nothing in the file references and no live proxy holds.

        Freeing is deferred to commit so that an object can move between
        fields (``a.x, a.y = a.y, a.x``) inside a transaction.
        """
        pending, held = self.unreferenced, []
        while pending:  # freeing an object may add what it referenced: one pass, like a worklist
            offset = pending.pop()
            if self.refcount(offset):
                continue  # stored somewhere again
            if not everything and self.live_proxy(offset) is not None:
                held.append(offset)
                continue
            self.free_object(offset)
        pending.update(held)

    # -- reference counts ------------------------------------------------------------------
    def incref(self, offset):
        segment = self.mapping._hot
        if segment is None or not segment.start <= offset < segment.end or offset & 7:
            segment, _ = self.locate(offset, 8)
        at = offset - segment.start + _REFS_AT
        count = _TYPE(segment.map, at)[0]
        if count == 0xFFFFFFFF:
            raise OverflowError(f"the object at {offset:#x} has too many references")
        _PUT(segment.map, at, count + 1)
        if not count:  # stored at last: the commit need not look at it (``unreferenced`` may hold
            self.unreferenced.discard(offset)  # more than the count-0 objects, never fewer)

    def incref_all(self, offsets):
        """Give each object of ``offsets`` (cells: a 0 is skipped) one more reference, or none of them:
        one with too many references is refused (OverflowError) after the references already given
        are taken back, so that a store can take its references before it writes anything."""
        done = []
        try:
            for offset in offsets:
                if offset:
                    self.incref(offset)
                    done.append(offset)
        except OverflowError:
            for offset in done:
                self.decref(offset)
            raise

    def decref(self, offset):
        segment = self.mapping._hot
        if segment is None or not segment.start <= offset < segment.end or offset & 7:
            segment, _ = self.locate(offset, 8)
        at = offset - segment.start + _REFS_AT
        count = _TYPE(segment.map, at)[0]
        if count == 0:
            raise CorruptStorageError(f"{self.name}: reference count of {offset:#x} is already 0")
        _PUT(segment.map, at, count - 1)
        if count == 1:
            self.unreferenced.add(offset)

    def refcount(self, offset):
        segment, local = self.locate(offset, 8)
        return _TYPE(segment.map, local + _REFS_AT)[0]

    def references(self, offset):
        """The offsets referenced by the object at ``offset`` (for freeing and checking)."""
        segment, local = self.locate(offset, 12)
        type_id = _TYPE(segment.map, local)[0]
        if type_id in _INTERNAL:
            owner = self.classes.get(_TYPE(segment.map, local + 8)[0])
            if owner is None or owner._ps_kind not in ("list", "dict", "set", "sorteddict"):
                raise CorruptStorageError(f"{self.name}: the internal object at {offset:#x} names "
                                          f"owner type {_TYPE(segment.map, local + 8)[0]}")
            return owner._ps_references(self, offset, type_id)
        cls = self.classes.get(type_id)
        if cls is None:
            return []
        return cls._ps_references(self, offset, type_id)

    # -- what is held across a commit -----------------------------------------------------------
    def held_objects(self, check=True):
        """The offsets the committed file records as held by a program and referenced by nothing.

        ``check=False`` leaves out the check that each is inside the pages, for a caller that only
        compares them (a pack may have dropped a page one of them was on: it was freed since)."""
        offset = self.pf.slots[F.SLOT_HELD]
        if not offset:
            return []
        self.check_offset(offset, F.HELD.size)
        type_id, _, count = F.HELD.unpack_from(self.mapping.view(offset, F.HELD.size))
        if type_id != F.T_HELD:
            raise CorruptStorageError(f"{self.name}: root slot {F.SLOT_HELD} does not name the list of "
                                      f"held objects (type {type_id} at {offset:#x})")
        self.check_offset(offset, F.HELD.size + 8 * count)
        held = list(self.mapping.view(offset + F.HELD.size, 8 * count).cast("Q"))
        if check:
            for target in held:
                self.check_offset(target)
        return held

    def record_held(self):
        """(Commit) Record in the file the objects nothing references that live proxies still hold.

        Without it they would outlive a crash or a rollback as allocated space
        nothing knows of; recorded, the next writer's open (or the rollback)
        frees them.  Nothing is written when the set did not change.
        """
        held = sorted(self.unreferenced)
        pf = self.pf
        old = pf.slots[F.SLOT_HELD]
        if held == self.held_objects(check=False):
            return
        new = 0
        if held:
            new = self.allocator.alloc(F.HELD.size + 8 * len(held), zero=False)
            view = self.mapping.view(new, F.HELD.size + 8 * len(held))
            F.HELD.pack_into(view, 0, F.T_HELD, 1, len(held))
            view[F.HELD.size:] = struct.pack(f"<{len(held)}Q", *held)
        pf.slots[F.SLOT_HELD] = new
        if old:
            self.allocator.free(old)

    # -- references between objects ------------------------------------------------------------
    def reference_check(self, ftype, value, where):
        """Check that proxy ``value`` may be stored where ``ftype`` is expected; return its offset."""
        cls = type(value)
        if cls._ps_closed:
            value._ps_type  # a dead proxy raises its own error here
        if cls._heap is not self:
            raise ValueError(f"{where}: {value!r} belongs to {cls._storage!r}, not to {self.storage!r}")
        if not isinstance(value, ftype):
            raise TypeError(f"{where} holds {ftype.__name__}, not {cls.__name__}")
        return value._ps_oid

    def reference_to(self, ftype, value, where):
        """The offset to store for ``value`` in a by-reference slot of type ``ftype`` (0 for None).

        A proxy is checked; a plain Python value becomes a new object of the
        type (``ftype._ps_from_python``).  The caller increfs the result once
        it is stored.
        """
        if value is None:
            return 0
        if isinstance(value, T.Persistent):
            return self.reference_check(ftype, value, where)
        return ftype._ps_from_python(self, value, where)

    def reference_check_value(self, ftype, value, where):
        """Raise the error :meth:`reference_to` would raise for ``value``, without making anything."""
        if value is None:
            return
        if isinstance(value, T.Persistent):
            self.reference_check(ftype, value, where)
            return
        ftype._ps_check_python(value, where)

    # -- strings, read in place -------------------------------------------------------------------
    def string_header(self, offset):
        return F.STRING.unpack_from(self.mapping.view(offset, F.STRING.size))

    def string_data(self, offset):
        """The bytes of the string object at ``offset`` (a hot path of sorted-key searches).

        An object never spans two segments, so bounding the read by the
        segment keeps a damaged offset from reading outside the map.
        """
        segment, local = self.locate(offset, F.STRING.size)
        start = local + F.STRING.size
        end = start + _TYPE(segment.map, local + 12)[0]
        if end > segment.length:
            raise CorruptStorageError(f"{self.name}: string {offset:#x} crosses the end of a segment")
        return segment.map[start:end]

    def string_equals(self, offset, data):
        """Whether the string object at ``offset`` holds ``data`` (a hot path of lookups)."""
        segment = self.mapping._hot  # the segment of the last look-up, inline; else locate()
        if segment is None or not segment.start <= offset <= segment.end - F.STRING.size or offset & 7:
            segment, _ = self.locate(offset, F.STRING.size)
        local = offset - segment.start
        length = _TYPE(segment.map, local + 12)[0]
        if length != len(data):
            return False
        start = local + F.STRING.size
        if start + length > segment.length:
            raise CorruptStorageError(f"{self.name}: string {offset:#x} crosses the end of a segment")
        return segment.map[start:start + length] == data

    # -- buffer views handed out --------------------------------------------------------------------
    def exported(self, view, offset=0, owner=0):
        """Remember a view of the map handed to the program (released at close), and that it shows
        the object at ``offset`` (a List's array: then ``owner`` is the List's offset) for
        :meth:`quarantine_candidates`."""
        self.exports[id(view)] = view
        if offset:
            places = self.export_places
            entry = places.get(offset)
            if entry is None or entry.owner != owner:
                keep = view.obj._ps_keep  # (the proxy the export was made from, and a pin of the map)
                entry = places[offset] = _Exported(owner or offset, owner, weakref.WeakSet(),
                                                   weakref.ref(keep[0]), self.proxies)
            entry.exporters.add(view.obj)  # (the exporter: it lives as long as any view made from it)
            if len(places) > self._places_at:
                for place in [place for place, entry in places.items() if not entry.showing()]:
                    del places[place]
                self._places_at = 2 * len(places) + 64

    # -- quarantine: places a view still shows after their object was taken back ----------------------
    #
    # A view of the buffer protocol points into the map.  When a rollback (or
    # the rollback of a savepoint) takes back the object it shows, its place
    # would be free again, and the view would write into whatever object the
    # allocator put there next.  So the place is *quarantined* instead: claimed
    # again from the allocator as it was (``Allocator.claim``), with the bytes
    # the view showed, as an object nothing references that a keeper in
    # ``proxies`` holds.  The commits record it as held (a crash or a close
    # frees it); the first commit after its last view is gone frees it.
    # ``quarantine``: offset -> [capacity, its ``_Exported``, keeper (None until claimed), the
    # bytes to claim it with (None once a commit has recorded it)].  A place no commit
    # has recorded yet is claimed again after every rollback that takes the
    # claim back.  A place that cannot be claimed (the restored state uses
    # part of it: the transaction had freed what was there and made the
    # object in its place) is *poisoned* instead (``poisoned``: offset -> its ``_Exported``):
    # the view may write into a live object, so no commit is made until the
    # view is gone and a rollback has put the memory back.

    def quarantine_candidates(self, taken):
        """(Before a rollback restores the pages) The places a view shows that the rollback may take
        back: objects in ``taken`` (made since the point it returns to), every exported List array
        (whether its List keeps it is known after) and the quarantined places (the rollback may take
        the claim back too).  Returns ``[(offset, owner, capacity, bytes, exported)]``."""
        found = []
        quarantine = self.quarantine
        for offset in [offset for offset, entry in quarantine.items() if not entry[1].showing()]:
            del quarantine[offset]  # (its keeper goes: the next commit frees the place)
        for offset in [offset for offset, exported in self.poisoned.items() if not exported.showing()]:
            del self.poisoned[offset]  # (the rollback puts back what the view may have written)
        for offset, entry in quarantine.items():
            # (the bytes the view showed: after a rollback cut short the map may show others there)
            data = entry[3] if entry[3] is not None else bytes(self.mapping.view(offset, entry[0]))
            found.append((offset, -1, entry[0], data, entry[1]))
        for offset, exported in list(self.export_places.items()):
            if not exported.showing():
                del self.export_places[offset]
                continue
            owner = exported.owner
            if offset in quarantine:
                continue
            if offset not in self.poisoned and (owner or offset in taken):
                capacity = self.allocator.capacity(offset)
                data = bytes(self.mapping.view(offset, capacity))
                found.append((offset, owner, capacity, data, exported))
                if offset in taken or owner in taken:  # (surely gone: a rollback cut short after the
                    quarantine[offset] = [capacity, exported, None, data]  # restore and retried knows it)
        return found

    def quarantine_places(self, candidates, taken):
        """(After the rollback) Quarantine every candidate whose object is gone: its place is claimed
        again with the bytes it had.  A List's array is gone unless the List is still there (not in
        ``taken``) with that array.  A quarantined place that the restored state holds already
        (recorded as held, or claimed before the savepoint) stays as it is.  The places that could
        not be claimed (something the restored state uses overlaps them) are returned, as
        candidates (for ``_pack.evacuate``, then :meth:`poison`)."""
        lost = []
        for offset, owner, capacity, data, views in candidates:
            if owner < 0:
                if offset in self.unreferenced:
                    continue  # (the restored state has the quarantined place)
                entry = self.quarantine.get(offset) or [None, None, None]
                if entry[2] is not None:  # (its keeper shows what the restored state has there: it goes)
                    if self.proxies.get(offset) is entry[2]:
                        self.kill_proxy(offset, rolled_back=True)
                    entry[2] = None
            if owner > 0 and owner not in taken and self.type_at(owner) is not None and \
                    F.COLLECTION.unpack_from(self.mapping.view(owner, F.COLLECTION.size))[3] == offset:
                continue  # (the List keeps that array: the view still shows its cells)
            if not self.allocator.claim(offset, capacity):
                lost.append((offset, owner, capacity, data, views))
                continue
            self.quarantine_place(offset, capacity, data, views)
        return lost

    def poison(self, lost):
        """Give up on places :meth:`quarantine_places` could not claim (see ``quarantine``)."""
        for offset, _, _, _, exported in lost:
            entry = self.quarantine.pop(offset, None)
            if entry is not None and entry[2] is not None and self.proxies.get(offset) is entry[2]:
                self.kill_proxy(offset, rolled_back=True)  # (its keeper: the place is another's now)
            self.poisoned[offset] = exported

    def quarantine_place(self, offset, capacity, data, views):
        """Make the claimed place at ``offset`` a quarantined object holding ``data``."""
        view = self.mapping.view(offset, capacity)
        view[:] = data
        _PUT(view, _REFS_AT, 0)  # referenced by nothing
        self.drop_view(offset)
        self.proxies.pop(offset, None)
        type_id = _TYPE(view)[0]
        if type_id in self.classes:
            keeper = self.proxy(offset)
        else:  # a List's array: a stand-in that only holds the place
            keeper = self._keeper_class()()
            self.proxies[offset] = keeper
        self.quarantine[offset] = [capacity, views, keeper, data]
        self.unreferenced.add(offset)

    def _keeper_class(self):
        cls = self.__dict__.get("_keeper")
        if cls is None:
            cls = self._keeper = type("QuarantinedPlace", (_Keeper,), {"__slots__": (), "_storage": self.storage})
        return cls

    def release_quarantine(self):
        """(Before a commit) Let go of the quarantined places no view shows any more: the commit frees
        them as it frees any object nothing references and nothing holds."""
        quarantine = self.quarantine
        for offset in [offset for offset, entry in quarantine.items() if not entry[1].showing()]:
            del quarantine[offset]
        if any(entry[3] is not None for entry in quarantine.values()):
            for offset in quarantine.keys() & set(self.held_objects(check=False)):  # (committed: a rollback keeps
                quarantine[offset][3] = None  # them, so their bytes need no copy any more)

    def stale_views(self, gone):
        """(Undo, the restored state in the map) The places a live view shows whose object the
        restored state does not have there: objects in ``gone``, and List arrays their List no
        longer has."""
        stale = []
        for offset, exported in list(self.export_places.items()):
            owner = exported.owner
            if not exported.showing():
                continue
            if offset in gone or owner in gone or (owner and (
                    self.type_at(owner) is None or
                    F.COLLECTION.unpack_from(self.mapping.view(owner, F.COLLECTION.size))[3] != offset)):
                stale.append(offset)
        return stale

    def forget_exports(self):
        """The map was made anew (an undo past a cut): every view shows the old one, no store."""
        self.export_places.clear()
        self.quarantine.clear()
        self.poisoned.clear()

    def poisoned_views(self):
        """Whether a view may have written into a live object since the last rollback (see
        ``quarantine``): then nothing may be committed."""
        return bool(self.poisoned)

    # -- every object ---------------------------------------------------------------------------------
    def walk(self, progress=None):
        """Every allocated object, in file order: ``(offset, capacity, type_id)`` - the one object walker.

        It reads the pages (every page header and every slab's free list),
        not the references, so it also yields objects nothing refers to any
        more (freed at the next commit).  ``capacity`` is the space the object
        has (its slot or run).  Pages that do not add up raise
        CorruptStorageError with the messages of ``check()``;
        ``progress(done, total, "pages")`` is called as it goes.  ``check()``,
        the command line's ``info`` and every later whole-store pass use it.

        >>> import os, tempfile
        >>> from permastruct import Storage
        >>> class Notes(Storage):
        ...     def populateSchema(self):
        ...         class Root(self.schema.Structure):
        ...             title = self.schema.String
        >>> with Notes(os.path.join(tempfile.mkdtemp(), "notes.ps")) as p:
        ...     p.root.title = "first"
        ...     p.commit()
        ...     heap = p._heap
        ...     sorted(heap.classes[t].__name__ for _, _, t in heap.walk() if t in heap.classes)
        ['Root', 'String']
        """
        with damage_reported(self.name, "the object walk"):
            yield from PageScan(self.pf, self.allocator).objects(progress)


#: What reading damaged bytes can raise (a view outside the map, a struct that does not
#: fit, a number too large): reported as damage by :func:`damage_reported`.
READ_ERRORS = (IndexError, KeyError, ValueError, OverflowError, struct.error, RecursionError)


@contextlib.contextmanager
def damage_reported(name, what):
    """Report what reading damaged bytes raises (READ_ERRORS) as a CorruptStorageError (``name``: the
    store as messages name it, ``Heap.name``)."""
    try:
        yield
    except READ_ERRORS as exc:
        if isinstance(exc, PermastructError):
            raise
        raise CorruptStorageError(f"{name}: damage stopped {what}: {type(exc).__name__}: {exc}") from exc


def _refuse_writes(storage):
    if storage.readonly:
        raise ReadOnlyError(f"{storage!r} is open read-only")
