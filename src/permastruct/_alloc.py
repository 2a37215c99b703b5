"""Object allocation inside pages: size-class slabs for small objects, page runs for large ones.

Layouts are in :mod:`permastruct._format`.  All state lives in the file (the
allocator page, slab headers, free-run headers, the merge counters), so it is
written back, and made atomic, together with the data, and a rollback or a
reopen needs nothing from memory.  Offsets returned are absolute file offsets
of the object, 16-byte aligned in slabs and at page offset 64 in runs.

Free pages and free runs are not joined when they are freed (that would need
to find a page's free neighbours); a merge pass (:meth:`Allocator.merge`)
joins them when a run request finds no fit and enough has been freed since the
previous merge for the pass to pay for itself: its cost is linear in the list
entries (plus a sort), and it runs only after at least half as many entries
were added as the previous merge left.
"""

import bisect
import struct
from array import array

from . import _format as F
from .errors import CorruptStorageError

_BIN_MIN = F.RUN_BIN_MIN
_LAST_BIN = len(_BIN_MIN) - 1
_BIN_HEADS = struct.Struct(f"<{_LAST_BIN}i")
_FREE_RUN_END = F.RUN_AT + F.FREE_RUN.size
_HEAD = F.INT32.unpack_from
_SLAB_FIELDS, _SLAB_PUT = F.SLAB.unpack_from, F.SLAB.pack_into
_SLAB_HEAD, _SLAB_COUNTS = F.SLAB_HEAD.unpack_from, F.SLAB_COUNTS.pack_into
_HEAD_AT = [F.ALLOC_HEADS_AT + 4 * index for index in range(len(F.SIZE_CLASSES))]  # each size class's list head
_SLAB_AT, _SLAB_COUNTS_AT, _FIRST_SLOT, _KIND_SLAB = F.SLAB_AT, F.SLAB_COUNTS_AT, F.SLAB_FIRST_SLOT, F.KIND_SLAB


#: Whole slab pages placed (and later written) as one run at most: a run lies in one segment of
#: the map, and its writing builds the run's bytes in memory first.
_RUN_PAGES = 1024


def scatter(blob, at, stride, code, values):
    """Write ``values`` (a buffer of ``struct`` format ``code``) into ``blob`` at byte ``at`` of
    every ``stride`` bytes: one field of many objects placed side by side
    (:meth:`Allocator.place_many`), in one C-level slice assignment."""
    size = struct.calcsize(code)
    if at % size or stride % size:
        raise ValueError(f"a field of format {code!r} at byte {at} of every {stride} is not aligned")
    memoryview(blob).cast(code)[at // size::stride // size] = values


def _bin_of(pages):
    """The free-run bin for a run of ``pages`` (>= 2) pages."""
    return bisect.bisect_right(_BIN_MIN, pages) - 1


class Placement:
    """Room for many objects of one size class (:meth:`Allocator.place_many`), and their writing.

    ``pieces`` are ``(whole_pages, offset, view, local, n)``: ``n`` consecutive
    slots of one slab at file offset ``offset`` (``view[local:]``), or ``n``
    whole slab pages from there.  :meth:`write` fills them all from a
    template object and columns of field values, one strided slice
    assignment per field and piece (per field and slot position for a run of
    pages), so its cost grows with the pages, not with the objects.
    """

    def __init__(self, allocator, index, stride, slots):
        self.allocator, self.index, self.stride, self.slots = allocator, index, stride, slots
        self.pieces = []

    def page_header(self):
        """The first bytes of each page of a run of full slabs: the page and slab headers."""
        header = bytearray(F.SLAB_FIRST_SLOT)
        F.PAGE_HEADER.pack_into(header, 0, F.NOT_IN_FREE_PAGE_LIST)
        F.SLAB.pack_into(header, F.SLAB_AT, F.KIND_SLAB, self.index, self.slots, 0, self.slots, -1, -1)
        return bytes(header)

    def offsets(self):
        """``array('Q')`` of the objects' offsets, in the order :meth:`write` fills them."""
        stride, page_size, result = self.stride, self.allocator.page_size, array("Q")
        for whole_pages, offset, _, _, n in self.pieces:
            if whole_pages:
                for page in range(offset, offset + n * page_size, page_size):
                    result.extend(range(page + F.SLAB_FIRST_SLOT, page + F.SLAB_FIRST_SLOT + self.slots * stride,
                                        stride))
            else:
                result.extend(range(offset, offset + n * stride, stride))
        return result

    def write(self, template, columns):
        """Write every object: ``template`` (its bytes, constant fields filled in) with ``columns``,
        ``(at, code, values)`` - the field at byte ``at`` of each object, of ``struct`` format
        ``code``, takes ``values`` (a memoryview, one value per object in :meth:`offsets` order)."""
        stride, slots, page_size = self.stride, self.slots, self.allocator.page_size
        one = bytes(template) + bytes(stride - len(template))
        first = 0
        for whole_pages, _, view, local, n in self.pieces:
            if whole_pages:
                page = self.page_header() + one * slots
                blob = bytearray((page + bytes(page_size - len(page))) * n)
                count = n * slots
                for at, code, values in columns:
                    part = values[first:first + count]
                    for slot in range(slots):
                        scatter(blob, F.SLAB_FIRST_SLOT + slot * stride + at, page_size, code, part[slot::slots])
                view[local:local + n * page_size] = blob
            else:
                count = n
                blob = bytearray(one * n)
                for at, code, values in columns:
                    scatter(blob, at, stride, code, values[first:first + n])
                view[local:local + n * stride] = blob
            first += count


class Allocator:
    """Allocates and frees objects in a :class:`permastruct.pages.PageFile`."""

    def __init__(self, page_file, state_pid=None):
        self.pf = page_file
        self.page_size = page_file.page_size
        self.classes = F.size_classes(self.page_size)
        self.max_small = self.classes[-1]
        self._zeros = [bytes(size) for size in self.classes]
        self._slots = [(self.page_size - F.SLAB_FIRST_SLOT) // size for size in self.classes]
        if state_pid is None:
            state_pid = page_file.allocate_pid()
            view = page_file.view(state_pid)
            view[F.PAGE_HEADER.size:] = bytes(len(view) - F.PAGE_HEADER.size)
            F.ALLOC.pack_into(view, F.ALLOC_AT, F.KIND_ALLOC, F.ALLOC_BINNED, len(self.classes), -1)
            for index in range(len(self.classes)):
                F.INT32.pack_into(view, F.ALLOC_HEADS_AT + 4 * index, -1)
            self._init_bins(view)
        self.state_pid = state_pid
        try:
            view = page_file.view(state_pid)
        except IndexError:  # a damaged root record: the page is not in the map
            raise CorruptStorageError(f"{page_file._label}: the allocator page {state_pid} is not in the "
                                      "mapped file") from None
        kind, flags, count, _ = F.ALLOC.unpack_from(view, F.ALLOC_AT)
        if kind != F.KIND_ALLOC or count != len(self.classes) or flags not in (0, F.ALLOC_BINNED):
            raise CorruptStorageError(f"{page_file._label}: page {state_pid} is not the allocator page")
        #: The size class of each small size, by (size - 1) >> 4: one list index instead of a bisect.
        self._class_of = [bisect.bisect_left(self.classes, size) for size in range(16, self.max_small + 16, 16)]
        #: The allocator page, and per size class the last slab allocated from: ``(pid, view,
        #: address)``.  Views of the map stay valid (its memory never moves while open; a
        #: rollback restores the bytes in place); :meth:`release` gives them back before the map
        #: is closed.
        self._state_view = view
        self._slab_views = [None] * len(self.classes)
        self._last_slot = [slots - 1 for slots in self._slots]  # place(): a slot after this one remains

    def release(self):
        """Let go of the views of the map this allocator keeps (before the map is closed)."""
        self._state_view = None
        self._slab_views = [None] * len(self.classes)

    # -- allocator page ------------------------------------------------------
    def _head(self, index):
        view = self._state_view or self.pf.view(self.state_pid)
        return F.INT32.unpack_from(view, F.ALLOC_HEADS_AT + 4 * index)[0]

    def _set_head(self, index, pid):
        view = self._state_view or self.pf.view(self.state_pid)
        F.INT32.pack_into(view, F.ALLOC_HEADS_AT + 4 * index, pid)

    def _state(self):
        """The allocator page, with the free-run bins and merge counters set up (writer only).

        Checked on every use rather than once: a rollback can undo the set-up.
        """
        view = self.pf.view(self.state_pid)
        if view[F.ALLOC_AT + 1] != F.ALLOC_BINNED:
            self._init_bins(view)
            view[F.ALLOC_AT + 1] = F.ALLOC_BINNED
        return view

    @staticmethod
    def _init_bins(view):
        for index in range(_LAST_BIN):
            F.INT32.pack_into(view, F.RUN_BINS_AT + 4 * index, -1)
        F.MERGE.pack_into(view, F.MERGE_AT, 0, 0)

    def _bin_heads(self, view):
        """The head of every free-run bin (a file without bins has them all on the last one)."""
        last = F.INT32.unpack_from(view, F.ALLOC_AT + 8)[0]
        if view[F.ALLOC_AT + 1] != F.ALLOC_BINNED:
            return [-1] * _LAST_BIN + [last]
        return list(_BIN_HEADS.unpack_from(view, F.RUN_BINS_AT)) + [last]

    @staticmethod
    def _set_bin_head(view, index, pid):
        F.INT32.pack_into(view, F.ALLOC_AT + 8 if index == _LAST_BIN else F.RUN_BINS_AT + 4 * index, pid)

    @staticmethod
    def _count_added(view):
        added, left = F.MERGE.unpack_from(view, F.MERGE_AT)
        if added < 0xFFFFFFFF:
            F.MERGE.pack_into(view, F.MERGE_AT, added + 1, left)

    # -- public --------------------------------------------------------------
    def alloc(self, size, zero=True):
        """The offset of a new object of ``size`` bytes (zeroed unless ``zero`` is False)."""
        if size <= self.max_small:
            index = self._class_of[(size - 1) >> 4] if size > 0 else 0
            offset = self._alloc_small(index)
            if zero:
                self.pf.mapping.view(offset, self.classes[index])[:] = self._zeros[index]
            return offset
        pages = -(-(F.RUN_OBJECT + size) // self.page_size)
        pid = self._alloc_run(pages)
        F.RUN.pack_into(self.pf.view(pid, F.RUN_AT, F.RUN.size), 0, F.KIND_RUN, pages)
        offset = self.pf.offset(pid) + F.RUN_OBJECT
        if zero:
            self._zero(offset, size)
        else:
            self._zero(offset, min(size, 64))
        return offset

    def place(self, size):
        """``(offset, view, local, base)`` of a new object of ``size`` bytes, not zeroed.

        The object is ``view[local:local + size]``, at address ``base + local``:
        its maker writes it through the view it is handed, without looking the
        offset up again.  The common case (the size class's current slab is
        still its list's head and has a never-used slot after this one) is a few
        C calls here, with the slab's figures kept in one tuple per size class
        (see :meth:`_alloc_small`); everything else goes through :meth:`alloc`.
        """
        if 0 < size <= self.max_small:
            hot = self._slab_views[self._class_of[(size - 1) >> 4]]
            if hot is not None:
                pid, page, base, start, state, head_at, last, stride, index = hot
                if _HEAD(state, head_at)[0] == pid:
                    kind, cls, used, free_head, bump = _SLAB_HEAD(page, _SLAB_AT)
                    if used == bump < last and not free_head and kind == _KIND_SLAB and cls == index:
                        _SLAB_COUNTS(page, _SLAB_COUNTS_AT, used + 1, 0, bump + 1)
                        local = _FIRST_SLOT + bump * stride
                        return start + local, page, local, base
        offset = self.alloc(size, zero=False)
        segment = self.pf.mapping.segment_of(offset)
        return offset, segment.map, offset - segment.start, segment.address

    def place_pair(self, size_a, size_b):
        """:meth:`place` of two objects at once: ``(offset_a, view_a, local_a, offset_b, view_b,
        local_b, base_b)`` (a constructor's string and its record).

        Two sizes of one size class take two neighbouring slots of the current
        slab in one step; anything else is two :meth:`place` calls, the first
        given back if the second fails.
        """
        if 0 < size_a <= self.max_small and 0 < size_b <= self.max_small:
            class_of = self._class_of
            index = class_of[(size_a - 1) >> 4]
            hot = self._slab_views[index]
            if hot is not None and class_of[(size_b - 1) >> 4] == index:
                pid, page, base, start, state, head_at, last, stride, _ = hot
                if _HEAD(state, head_at)[0] == pid:
                    kind, cls, used, free_head, bump = _SLAB_HEAD(page, _SLAB_AT)
                    if used == bump < last - 1 and not free_head and kind == _KIND_SLAB and cls == index:
                        _SLAB_COUNTS(page, _SLAB_COUNTS_AT, used + 2, 0, bump + 2)
                        local = _FIRST_SLOT + bump * stride
                        return start + local, page, local, start + local + stride, page, local + stride, base
        first = self.place(size_a)
        try:
            return first[:3] + self.place(size_b)
        except BaseException:
            self.free(first[0])
            raise

    def place_many(self, size, count):
        """A :class:`Placement`: room for ``count`` new objects of ``size`` bytes, to write at once.

        A slab's never-used slots are taken a run at a time; when the partial
        slabs are used up, whole new slabs come as one run of pages, written
        later a run at a time; slots on a slab's free list come one at a
        time, and so does an object too large for a slab (a page run of its
        own).  Either every object is placed or, when the store runs out of
        room, none is (those taken already are given back) and the error
        propagates.
        """
        if size <= 0:
            raise ValueError(f"an object has at least one byte, not {size}")
        pf = self.pf
        if size > self.max_small:
            placement = Placement(self, None, size, 1)
            index = None
        else:
            index = self._class_of[(size - 1) >> 4]
            stride, nslots = self.classes[index], self._slots[index]
            placement = Placement(self, index, stride, nslots)
        pieces = placement.pieces
        try:
            while index is None and count:
                offset = self.alloc(size, zero=False)
                segment = pf.mapping.segment_of(offset)
                pieces.append((False, offset, segment.map, offset - segment.start, 1))
                count -= 1
            while count:
                pid = self._head(index)
                if pid == -1:
                    pages = min(count // nslots, _RUN_PAGES)
                    if pages >= 2 and pf.free_head == F.NO_NEXT_FREE_PAGE:
                        first = self._alloc_run(pages)  # full slabs, off the partial list
                        header = placement.page_header()
                        for pid in range(first, first + pages):
                            pf.view(pid, 0, len(header))[:] = header
                        at = pf.offset(first)
                        segment = pf.mapping.segment_of(at)
                        pieces.append((True, at, segment.map, at - segment.start, pages))
                        count -= pages * nslots
                        continue
                    self._alloc_slab(index)
                    continue
                page = self._page(pid, "the partial list of size class", index)
                kind, cls, used, free_head, bump, nxt, prv = _SLAB_FIELDS(page, F.SLAB_AT)
                if free_head or kind != F.KIND_SLAB or cls != index or not used == bump < nslots:
                    offset = self._alloc_small(index)  # a freed slot, or damage for it to report
                    segment = pf.mapping.segment_of(offset)
                    pieces.append((False, offset, segment.map, offset - segment.start, 1))
                    count -= 1
                    continue
                take = min(count, nslots - bump)
                _SLAB_PUT(page, F.SLAB_AT, kind, cls, used + take, 0, bump + take, nxt, prv)
                if used + take == nslots:
                    self._unlink(index, pid, nxt, prv)
                local = F.SLAB_FIRST_SLOT + bump * stride
                pieces.append((False, F.HEADER_BLOCK + pid * self.page_size + local, page, local, take))
                count -= take
        except Exception:  # (an interrupt leaves the change incomplete: the rollback it needs undoes this)
            for offset in reversed(placement.offsets()):
                self.free(offset)
            raise
        return placement

    def _alloc_slab(self, index):
        """A new empty slab of size class ``index`` at the head of its partial list."""
        pid = self._alloc_page()
        F.SLAB.pack_into(self.pf.view(pid), F.SLAB_AT, F.KIND_SLAB, index, 0, 0, 0, -1, -1)
        self._set_head(index, pid)
        return pid

    def _zero(self, offset, size):
        mapping = self.pf.mapping
        step = 1 << 20
        for start in range(offset, offset + size, step):
            length = min(step, offset + size - start)
            mapping.view(start, length)[:] = bytes(length)

    def free(self, offset):
        """Return the object at ``offset`` to the allocator."""
        pid = self.pf.page_of(offset)
        if not 0 <= pid < self.pf.page_count:
            raise CorruptStorageError(f"{self.pf._label}: freeing {offset:#x}, which is outside the pages")
        page = self.pf.view(pid)
        kind = page[F.SLAB_AT]
        if kind == F.KIND_SLAB:
            self._free_small(pid, page, offset)
        elif kind == F.KIND_RUN and offset == self.pf.offset(pid) + F.RUN_OBJECT:
            pages = F.RUN.unpack_from(page, F.RUN_AT)[1]
            if not 1 <= pages <= self.pf.page_count - pid:
                raise CorruptStorageError(f"{self.pf._label}: run at page {pid} says it has {pages} pages")
            self._free_run(pid, pages)
        else:
            raise CorruptStorageError(f"{self.pf._label}: freeing {offset:#x}, which is not an allocated object")

    def capacity(self, offset):
        """How many bytes the object at ``offset`` may use."""
        pid = self.pf.page_of(offset)
        page = self.pf.view(pid)
        if page[F.SLAB_AT] == F.KIND_SLAB:
            return self.classes[page[F.SLAB_AT + 1]]
        return F.RUN.unpack_from(page, F.RUN_AT)[1] * self.page_size - F.RUN_OBJECT

    # -- slabs ---------------------------------------------------------------
    def slots_per_page(self, index):
        return self._slots[index]

    def _alloc_small(self, index):
        pf = self.pf
        pid = self._head(index)
        if pid == -1:
            pid = self._alloc_slab(index)
        hot = self._slab_views[index]
        if hot is not None and hot[0] == pid:
            page = hot[1]
        else:
            page = self._page(pid, "the partial list of size class", index)
            at = pf.offset(pid)
            segment = pf.mapping.segment_of(at)
            # what place() needs, in one tuple: the slab, its address and file offset, the
            # allocator page and this class's list head in it, the last slot, the slot size
            state = self._state_view
            self._slab_views[index] = None if state is None else (
                pid, page, segment.address + at - segment.start, at, state, _HEAD_AT[index],
                self._last_slot[index], self.classes[index], index)
        kind, cls, used, free_head, bump, nxt, prv = F.SLAB.unpack_from(page, F.SLAB_AT)
        if kind != F.KIND_SLAB or cls != index:
            raise CorruptStorageError(f"{pf._label}: page {pid} on the size-class {index} list is not a slab of it")
        size = self.classes[index]
        nslots = self._slots[index]
        if used >= nslots or bump > nslots:
            raise CorruptStorageError(f"{pf._label}: slab {pid} on the partial list has {used} used and "
                                      f"{bump} handed-out slots of {nslots}")
        if free_head:
            slot = free_head - 1
            if slot >= bump:
                raise CorruptStorageError(f"{pf._label}: slab {pid} free list points at unused slot {slot}")
            free_head = F.UINT32.unpack_from(page, F.SLAB_FIRST_SLOT + slot * size)[0]
            if free_head > bump:
                raise CorruptStorageError(f"{pf._label}: slab {pid} free list links to unused slot {free_head - 1}")
        elif bump < nslots:
            slot = bump
            bump += 1
        else:
            raise CorruptStorageError(f"{pf._label}: full slab {pid} is on the partial list")
        used += 1
        F.SLAB.pack_into(page, F.SLAB_AT, kind, cls, used, free_head, bump, nxt, prv)
        if used == nslots:
            self._unlink(index, pid, nxt, prv)
        return F.HEADER_BLOCK + pid * self.page_size + F.SLAB_FIRST_SLOT + slot * size  # pf.offset, inline

    def _free_small(self, pid, page, offset):
        kind, index, used, free_head, bump, nxt, prv = F.SLAB.unpack_from(page, F.SLAB_AT)
        size = self.classes[index] if index < len(self.classes) else 0
        relative = offset - self.pf.offset(pid) - F.SLAB_FIRST_SLOT
        if not size or relative < 0 or relative % size or relative // size >= bump or used == 0:
            raise CorruptStorageError(f"{self.pf._label}: freeing {offset:#x}, which is not a slot of slab {pid}")
        slot = relative // size
        F.UINT32.pack_into(page, F.SLAB_FIRST_SLOT + slot * size, free_head)
        F.UINT32.pack_into(page, F.SLAB_FIRST_SLOT + slot * size + 4, 0)
        was_full = used == self.slots_per_page(index)
        used -= 1
        F.SLAB.pack_into(page, F.SLAB_AT, kind, index, used, slot + 1, bump, nxt, prv)
        if was_full:
            nxt, prv = self._head(index), -1
            self._push(index, pid)
        if used == 0:
            kind, index, used, free_head, bump, nxt, prv = F.SLAB.unpack_from(page, F.SLAB_AT)
            self._unlink(index, pid, nxt, prv)
            page[F.SLAB_AT:F.SLAB_FIRST_SLOT] = bytes(F.SLAB_FIRST_SLOT - F.SLAB_AT)
            self.pf.free_pid(pid)
            self._count_added(self._state())

    def _page(self, pid, what, index=None):
        """The view of page ``pid``, which ``what`` (of size class ``index``) names, or CorruptStorageError."""
        pf = self.pf
        if 0 <= pid < pf.page_count:
            try:
                return pf.view(pid)
            except IndexError:
                where = "which is not in the mapped file"
        else:
            where = f"outside the {pf.page_count} pages"
        what = what if index is None else f"{what} {index}"
        raise CorruptStorageError(f"{pf._label}: {what} names page {pid}, {where}") from None

    def _set_links(self, pid, nxt=None, prv=None):
        page = self._page(pid, "a partial-list link")
        fields = list(F.SLAB.unpack_from(page, F.SLAB_AT))
        if nxt is not None:
            fields[5] = nxt
        if prv is not None:
            fields[6] = prv
        F.SLAB.pack_into(page, F.SLAB_AT, *fields)

    def _push(self, index, pid):
        head = self._head(index)
        self._set_links(pid, nxt=head, prv=-1)
        if head != -1:
            self._set_links(head, prv=pid)
        self._set_head(index, pid)

    def _unlink(self, index, pid, nxt, prv):
        if prv == -1:
            self._set_head(index, nxt)
        else:
            self._set_links(prv, nxt=nxt)
        if nxt != -1:
            self._set_links(nxt, prv=prv)
        self._set_links(pid, nxt=-1, prv=-1)

    # -- runs ----------------------------------------------------------------
    def _alloc_page(self):
        """One page: the free-page list, else the low end of the shortest free run, else a new page."""
        pf = self.pf
        if pf.free_head == F.NO_NEXT_FREE_PAGE:
            pid = self._take_run(1)
            if pid is not None:
                return pid
        return pf.allocate_pid()

    def _alloc_run(self, pages):
        if pages == 1:
            return self._alloc_page()
        pid = self._take_run(pages)
        if pid is None:
            added, left = F.MERGE.unpack_from(self._state(), F.MERGE_AT)
            if added and 2 * added >= left:
                self.merge()
                pid = self._take_run(pages)
            if pid is None:
                pid = self._grow(pages)
        return pid

    def _grow(self, pages):
        """``pages`` new pages at the end of the file.

        A run must lie in one segment of the map.  When the pages left in the
        segment at the end (after a merge lowered the page count, or a
        rollback left a segment mapped) are too few, they become one free
        run rather than single free pages as ``allocate_pids`` would make them.
        """
        pf = self.pf
        mapping = pf.mapping
        while True:
            start = pf.offset(pf.page_count)
            if start >= mapping.size:
                break
            segment = mapping.segment_of(start)
            room = (segment.start + segment.length - start) // self.page_size
            if room >= pages or room < 2:
                break
            first = pf.page_count
            pf._reserve(first + room)  # (a hole a checkpoint left: blocks first)
            pf.page_count += room
            view = self._state()
            self._push_run(view, first, room)
            self._count_added(view)
        return pf.allocate_pids(pages)

    def _take_run(self, pages):
        """The first of ``pages`` pages taken from the low end of a free run, or None if none fits.

        Looks first in the bins whose every run fits (the smallest such bin
        first), then walks the bin that holds runs of ``pages`` pages.
        """
        view = self._state()
        heads = self._bin_heads(view)
        first = _bin_of(max(pages, 2))
        start = first if _BIN_MIN[first] >= pages else first + 1
        for index in range(start, len(heads)):
            if heads[index] != -1:
                found = self._find(heads[index], pages)
                if found is not None:
                    return self._split(view, index, pages, *found)
        if start != first and heads[first] != -1:
            found = self._find(heads[first], pages)
            if found is not None:
                return self._split(view, first, pages, *found)
        return None

    def _find(self, pid, pages):
        """``(previous, pid, length, next)`` of the first run from ``pid`` on a bin list that fits."""
        count = self.pf.page_count
        previous, steps = -1, 0
        while pid != -1:
            length, following = self._read_free_run(pid, count)
            if length >= pages and self._in_one_segment(pid, pages):
                return previous, pid, length, following
            steps += 1
            if steps > count:
                raise CorruptStorageError(f"{self.pf._label}: the free-run list has a cycle through page {pid}")
            previous, pid = pid, following
        return None

    def _read_free_run(self, pid, count):
        """``(length, next)`` of the free run at ``pid``, checked against ``count`` pages."""
        if not 0 <= pid < count:
            raise CorruptStorageError(f"{self.pf._label}: the free-run list names page {pid}, "
                                      f"outside the {count} pages")
        kind, length, following = F.FREE_RUN.unpack_from(self.pf.view(pid, 0, _FREE_RUN_END), F.RUN_AT)
        if kind != F.KIND_FREE_RUN or not 2 <= length <= count - pid:
            raise CorruptStorageError(f"{self.pf._label}: page {pid} on the free-run list is not a free run "
                                      f"(kind {kind}, {length} pages)")
        if not (following == -1 or 0 <= following < count):
            raise CorruptStorageError(f"{self.pf._label}: free run {pid} links to page {following}, "
                                      f"outside the {count} pages")
        return length, following

    def _in_one_segment(self, pid, pages):
        """Whether pages ``pid .. pid + pages - 1`` are mapped in one segment (a run must be)."""
        start = self.pf.offset(pid)
        segment = self.pf.mapping.segment_of(start)
        return start + pages * self.page_size <= segment.start + segment.length

    def _split(self, view, index, pages, previous, pid, length, following):
        """Take the first ``pages`` pages of run ``pid`` (on bin ``index`` after ``previous``)."""
        pf = self.pf
        rest, remaining = pid + pages, length - pages
        if remaining >= 2 and _bin_of(remaining) == index:
            page = pf.view(rest, 0, _FREE_RUN_END)
            F.PAGE_HEADER.pack_into(page, 0, F.NOT_IN_FREE_PAGE_LIST)
            F.FREE_RUN.pack_into(page, F.RUN_AT, F.KIND_FREE_RUN, remaining, following)
            self._relink(view, index, previous, rest)
        else:
            self._relink(view, index, previous, following)
            if remaining >= 2:
                self._push_run(view, rest, remaining)
            elif remaining == 1:
                pf.free_pid(rest)
        page = pf.view(pid, 0, _FREE_RUN_END)
        page[F.RUN_AT:] = bytes(F.FREE_RUN.size)
        F.PAGE_HEADER.pack_into(page, 0, F.NOT_IN_FREE_PAGE_LIST)
        return pid

    def _relink(self, view, index, previous, pid):
        if previous == -1:
            self._set_bin_head(view, index, pid)
        else:
            F.INT32.pack_into(self.pf.view(previous, F.RUN_AT + 8, 4), 0, pid)

    def _push_run(self, view, pid, pages):
        index = _bin_of(pages)
        page = self.pf.view(pid, 0, _FREE_RUN_END)
        F.PAGE_HEADER.pack_into(page, 0, F.NOT_IN_FREE_PAGE_LIST)
        F.FREE_RUN.pack_into(page, F.RUN_AT, F.KIND_FREE_RUN, pages, self._bin_heads(view)[index])
        self._set_bin_head(view, index, pid)

    def _free_run(self, pid, pages):
        pf = self.pf
        view = self._state()
        if pages == 1:
            pf.view(pid)[F.RUN_AT:F.RUN_AT + F.RUN.size] = bytes(F.RUN.size)
            pf.free_pid(pid)
        else:
            self._push_run(view, pid, pages)
        self._count_added(view)

    def free_runs(self):
        """``(pid, pages)`` of every free run, bin by bin; raises CorruptStorageError on a broken list."""
        count = self.pf.page_count
        runs = []
        for index, pid in enumerate(self._bin_heads(self.pf.view(self.state_pid))):
            # the last bin also holds the runs of files written before the bins, of any length
            low, high = (_BIN_MIN[index], _BIN_MIN[index + 1] - 1) if index < _LAST_BIN else (2, count)
            while pid != -1:
                if len(runs) >= count:
                    raise CorruptStorageError(f"{self.pf._label}: the free-run lists have a cycle "
                                              f"through page {pid}")
                length, following = self._read_free_run(pid, count)
                if not low <= length <= high:
                    raise CorruptStorageError(f"{self.pf._label}: free run {pid} of {length} pages is on "
                                              f"the list for runs of {low}..{high} pages")
                runs.append((pid, length))
                pid = following
        return runs

    # -- taking one given place (a quarantine) ------------------------------------------
    def claim(self, offset, capacity):
        """Allocate exactly the place ``offset`` of ``capacity`` bytes (a slab slot of that size class,
        or a page run) if every byte of it is free now; return whether it was taken.

        For places handed out in a transaction that was taken back while a view
        of the buffer protocol still points there (``Heap.quarantine``): the
        place must not go to another object while the view can write.  Free
        space is taken from wherever it is: pages past the page count (the
        count grows over them), the free-page list, a free run (split around
        it), the free or never-used slots of a slab of the class.  A place
        that anything in use overlaps is left alone (False), and so is one
        that is not a slot or run start of its size.  The object's bytes are
        not touched: the caller writes them.  Cost: a pass over the page
        headers up to the place and a walk of the free lists; nothing on any
        other allocator path.
        """
        pf, page_size = self.pf, self.page_size
        first = pf.page_of(offset)
        if first < 0 or first == self.state_pid:
            return False
        if capacity <= self.max_small:
            if capacity not in self.classes:
                return False
            index = self.classes.index(capacity)
            relative = offset - pf.offset(first) - F.SLAB_FIRST_SLOT
            if relative < 0 or relative % capacity or relative // capacity >= self._slots[index]:
                return False
            slot = relative // capacity
            status = self._page_status(first, 1)
            if status is None:
                return False
            if status[first] == "slab":
                return self._claim_slot(first, pf.view(first), index, slot)
            self._take_pages(first, 1, status)
            page = pf.view(first)
            page[F.SLAB_AT:F.SLAB_FIRST_SLOT] = bytes(F.SLAB_FIRST_SLOT - F.SLAB_AT)
            F.SLAB.pack_into(page, F.SLAB_AT, F.KIND_SLAB, index, 0, 0, 0, -1, -1)
            return self._claim_slot(first, page, index, slot, new=True)
        pages = (F.RUN_OBJECT + capacity) // page_size
        if offset != pf.offset(first) + F.RUN_OBJECT or pages * page_size != F.RUN_OBJECT + capacity:
            return False
        status = self._page_status(first, pages)
        if status is None or "slab" in status.values():
            return False
        self._take_pages(first, pages, status)
        page = pf.view(first, 0, _FREE_RUN_END)
        page[F.RUN_AT:] = bytes(F.FREE_RUN.size)
        F.RUN.pack_into(page, F.RUN_AT, F.KIND_RUN, pages)
        return True

    def _page_status(self, first, count):
        """What each page of ``first .. first + count - 1`` is: ``"slab"`` (in use, a slab),
        ``"single"`` (on the free-page list), ``(run, length)`` (in the free run that starts at
        ``run``) or ``"past"`` (past the page count, in the map); None when any of them is in use
        otherwise (a page run, the allocator page) or cannot be taken (not mapped in one segment).

        Pages are walked from the first one, a run at a time, so that a page inside a run (whose
        own bytes say nothing) is known for what it is."""
        pf = self.pf
        last = first + count - 1
        if pf.offset(last + 1) > pf.mapping.size or not self._in_one_segment(first, count):
            return None
        singles = set(pf.free_pages())
        runs = dict(self.free_runs())
        status = {}
        pid = 0
        while pid <= last and pid < pf.page_count:
            if pid in runs:
                length, what, step = runs[pid], (pid, runs[pid]), runs[pid]
            elif pid in singles:
                length, what, step = 1, "single", 1
            elif pid == self.state_pid:
                length, what, step = 1, None, 1
            else:
                page = pf.view(pid, 0, F.RUN_AT + F.RUN.size)
                kind = page[F.SLAB_AT]
                if kind == F.KIND_RUN:
                    length = max(1, F.RUN.unpack_from(page, F.RUN_AT)[1])
                    what, step = None, length
                elif kind == F.KIND_SLAB:
                    length, what, step = 1, "slab", 1
                else:
                    return None  # (damage: check() names it)
            for member in range(max(pid, first), min(pid + length, last + 1)):
                if what is None:
                    return None
                status[member] = what
            pid += step
        for pid in range(max(first, pf.page_count), last + 1):
            status[pid] = "past"
        return status

    def _take_pages(self, first, count, status):
        """Take the free pages ``first .. first + count - 1`` (:meth:`_page_status` said what each
        is) off the free-page list and out of their free runs, growing the page count over them."""
        pf = self.pf
        last = first + count - 1
        if "single" in status.values():
            kept = [pid for pid in pf.free_pages() if not first <= pid <= last]
            following = F.NO_NEXT_FREE_PAGE
            for pid in reversed(kept):
                if pf._link(pid) != following:
                    pf._set_link(pid, following)
                following = pid
            pf.free_head = following
        view = self._state()
        for start, length in {what for what in status.values() if isinstance(what, tuple)}:
            self._unlink_run(view, start, length)
            for piece, end in ((start, first), (last + 1, start + length)):
                if end - piece >= 2:
                    self._push_run(view, piece, end - piece)
                elif end - piece == 1:
                    pf.free_pid(piece)
        if pf.page_count <= last:  # past the end: the count grows over them
            pf._reserve(last + 1)
            while pf.page_count <= last:
                pid = pf.page_count
                pf.page_count = pid + 1
                if pid < first:
                    pf.free_pid(pid)
        for pid in range(first, last + 1):
            pf._set_link(pid, F.NOT_IN_FREE_PAGE_LIST)

    def _claim_slot(self, pid, page, index, slot, new=False):
        """Take slot ``slot`` of slab ``pid`` (size class ``index``) if it is free (see :meth:`claim`)."""
        kind, cls, used, free_head, bump, nxt, prv = F.SLAB.unpack_from(page, F.SLAB_AT)
        if cls != index:
            return False
        size, nslots = self.classes[index], self._slots[index]
        first_slot = F.SLAB_FIRST_SLOT
        if slot >= bump:  # never used: the ones before it go on the slot free list
            for skipped in range(bump, slot):
                F.UINT32.pack_into(page, first_slot + skipped * size, free_head)
                F.UINT32.pack_into(page, first_slot + skipped * size + 4, 0)
                free_head = skipped + 1
            bump = slot + 1
        else:  # it must be on the slot free list: unlinked from it
            previous, current, steps = None, free_head, 0
            while current and current - 1 != slot:
                if current - 1 >= bump or steps > nslots:
                    raise CorruptStorageError(f"{self.pf.path!r}: slab {pid} has a broken slot free list")
                previous, current = current, F.UINT32.unpack_from(page, first_slot + (current - 1) * size)[0]
                steps += 1
            if not current:
                return False  # in use
            following = F.UINT32.unpack_from(page, first_slot + slot * size)[0]
            if previous is None:
                free_head = following
            else:
                F.UINT32.pack_into(page, first_slot + (previous - 1) * size, following)
        used += 1
        F.SLAB.pack_into(page, F.SLAB_AT, kind, cls, used, free_head, bump, nxt, prv)
        if new:
            if used < nslots:
                self._push(index, pid)
        elif used == nslots:
            self._unlink(index, pid, nxt, prv)
        return True

    def _unlink_run(self, view, start, length):
        """Take the free run at page ``start`` off its bin list."""
        heads = self._bin_heads(view)
        for index in range(len(heads)):
            previous, pid = -1, heads[index]
            while pid != -1:
                _, following = self._read_free_run(pid, self.pf.page_count)
                if pid == start:
                    self._relink(view, index, previous, following)
                    return
                previous, pid = pid, following
        raise CorruptStorageError(f"{self.pf.path!r}: free run {start} of {length} pages is on no bin list")

    # -- merging -------------------------------------------------------------
    def merge(self):
        """Join adjacent free pages and free runs into the longest runs; give back free pages at the end.

        Collects the free-page list and every free run, sorts them by page id
        and joins neighbours (never across a segment boundary of the map).
        Joined extents go into the run bins in address order; single pages
        stay on the free-page list in their previous order (so that pages
        whose link does not change are not written).  Free pages at the end
        of the file are dropped by lowering the page count, where
        :meth:`PageFile.allocate_pids` will take them again.  Returns counts:
        ``{"entries", "free_pages", "runs", "released"}`` (list entries before,
        free pages and runs after, pages dropped from the end).
        """
        pf = self.pf
        pf._check_writable()
        view = self._state()
        count = pf.page_count
        link = self._link_reader()
        singles = []
        pid = pf.free_head
        while pid != F.NO_NEXT_FREE_PAGE:
            if not 0 <= pid < count or len(singles) >= count:
                raise CorruptStorageError(f"{pf._label}: the free-page list is broken at page {pid}")
            singles.append(pid)
            pid = link(pid)
        runs = self.free_runs()
        keys = [pid << 32 | 1 for pid in singles]
        keys.extend(pid << 32 | length for pid, length in runs)
        keys.sort()
        boundaries = self._segment_starts()
        state = self.state_pid
        extents = []
        start = end = -1
        for key in keys:
            first, length = key >> 32, key & 0xFFFFFFFF
            if first < end:
                raise CorruptStorageError(f"{pf._label}: page {first} is on the free lists twice")
            if first <= state < first + length:
                raise CorruptStorageError(f"{pf._label}: the allocator page {state} is on a free list")
            if first == end and first not in boundaries:
                end += length
            else:
                if end >= 0:
                    extents.append((start, end))
                start, end = first, first + length
        if end >= 0:
            extents.append((start, end))
        new_count = count
        while extents and extents[-1][1] == new_count:
            new_count = extents.pop()[0]
        result = {"entries": len(keys), "free_pages": len(singles), "runs": len(runs),
                  "released": count - new_count}
        if len(extents) == len(keys):  # nothing joined, nothing released: the lists stay
            F.MERGE.pack_into(view, F.MERGE_AT, 0, len(keys))
            return result
        # single pages keep their order on the free-page list
        alone = {first for first, last in extents if last - first == 1}
        kept = [pid for pid in singles if pid in alone]
        following = F.NO_NEXT_FREE_PAGE
        for pid in reversed(kept):
            if link(pid) != following:
                pf._set_link(pid, following)
            following = pid
        pf.free_head = following
        # runs: each bin in address order
        bins = [[] for _ in _BIN_MIN]
        for first, last in extents:
            if last - first >= 2:
                bins[_bin_of(last - first)].append((first, last - first))
        for index, members in enumerate(bins):
            following = -1
            for pid, length in reversed(members):
                page = pf.view(pid, 0, _FREE_RUN_END)
                record = F.FREE_RUN.pack(F.KIND_FREE_RUN, length, following)
                if page[F.RUN_AT:] != record:
                    page[F.RUN_AT:] = record
                if F.PAGE_HEADER.unpack_from(page)[0] != F.NOT_IN_FREE_PAGE_LIST:
                    F.PAGE_HEADER.pack_into(page, 0, F.NOT_IN_FREE_PAGE_LIST)
                following = pid
            self._set_bin_head(view, index, following)
        nruns = len(extents) - len(kept)
        F.MERGE.pack_into(view, F.MERGE_AT, 0, len(kept) + nruns)
        pf.page_count = new_count
        result.update(free_pages=len(kept), runs=nruns)
        return result

    def _link_reader(self):
        """A fast ``pid -> page header`` reader for walking the free-page list (pid must be < page_count)."""
        segments = self.pf.mapping.segments
        starts = [segment.start for segment in segments]
        maps = [segment.map for segment in segments]
        unpack, bisect_right = F.PAGE_HEADER.unpack_from, bisect.bisect_right
        origin, page_size = F.HEADER_BLOCK, self.page_size

        def link(pid):
            offset = origin + pid * page_size
            index = bisect_right(starts, offset) - 1
            try:
                return unpack(maps[index], offset - starts[index])[0]
            except (struct.error, IndexError):
                raise CorruptStorageError(f"{self.pf._label}: free page {pid} is not in the mapped file") from None
        return link

    def _segment_starts(self):
        """Page ids at which a segment of the map starts: no run may cross them."""
        starts = set()
        for segment in self.pf.mapping.segments:
            if segment.start > F.HEADER_BLOCK:
                pid, partial = divmod(segment.start - F.HEADER_BLOCK, self.page_size)
                starts.add(pid)
                if partial:
                    starts.add(pid + 1)
        return starts


class PageScan:
    """What every page of a store is, checked page by page; :meth:`objects` yields what the pages hold
    (the one object walker: :meth:`permastruct._heap.Heap.walk` and ``check()`` use it).

    Afterwards ``owner[pid]`` says what page ``pid`` is (``"free"``,
    ``"allocator state"``, ``"free run P"``, ``"slab"``, ``"run P"``) and
    ``slabs_with_room`` maps each slab with a free slot to its size class.
    """

    def __init__(self, page_file, allocator):
        self.pf = page_file
        self.allocator = allocator
        self.owner = []
        self.slabs_with_room = {}

    def fail(self, message):
        raise CorruptStorageError(f"{self.pf._label}: {message}")

    def claim(self, pid, what):
        owner, count = self.owner, len(self.owner)
        if not 0 <= pid < count:
            self.fail(f"{what} names page {pid}, outside the {count} pages")
        if owner[pid] is not None:
            self.fail(f"page {pid} is both {owner[pid]} and {what}")
        owner[pid] = what

    def objects(self, progress=None):
        """Claim every page, checking as it goes; yield ``(offset, capacity, type_id)`` of each object."""
        pf = self.pf
        alloc = self.allocator
        fail, claim = self.fail, self.claim
        view_at, header = pf.mapping.view, F.OBJECT_HEADER
        count = pf.page_count
        owner = self.owner = [None] * count
        slabs_with_room = self.slabs_with_room = {}
        for pid in pf.free_pages():
            claim(pid, "free")
        claim(alloc.state_pid, "allocator state")
        for pid, length in alloc.free_runs():
            for member in range(pid, pid + length):
                claim(member, f"free run {pid}")
        for pid in range(count):
            if progress is not None and not pid & 63:
                progress(pid, count, "pages")
            if owner[pid] is not None:
                if owner[pid] == "free" and pf._link(pid) == F.NOT_IN_FREE_PAGE_LIST:
                    fail(f"free page {pid} is marked in use")
                continue
            if pf._link(pid) != F.NOT_IN_FREE_PAGE_LIST:
                fail(f"page {pid} is in use but its header says {pf._link(pid)}")
            page = pf.view(pid)
            kind = page[F.SLAB_AT]
            if kind == F.KIND_SLAB:
                claim(pid, "slab")
                _, index, used, free_head, bump, _, _ = F.SLAB.unpack_from(page, F.SLAB_AT)
                if index >= len(alloc.classes):
                    fail(f"slab {pid} has size class {index}")
                size = alloc.classes[index]
                nslots = alloc.slots_per_page(index)
                if bump > nslots or used > bump:
                    fail(f"slab {pid}: used {used}, bump {bump}, {nslots} slots")
                free = set()
                slot = free_head
                while slot:
                    if slot - 1 >= bump or slot - 1 in free:
                        fail(f"slab {pid}: broken slot free list at {slot - 1}")
                    free.add(slot - 1)
                    slot = F.UINT32.unpack_from(page, F.SLAB_FIRST_SLOT + (slot - 1) * size)[0]
                if len(free) != bump - used:
                    fail(f"slab {pid}: {used} used and {len(free)} free of {bump} handed-out slots")
                if used < nslots:
                    slabs_with_room[pid] = index
                base = pf.offset(pid) + F.SLAB_FIRST_SLOT
                for slot in range(bump):
                    if slot not in free:
                        offset = base + slot * size
                        yield offset, size, header.unpack_from(view_at(offset, 8))[0]
            elif kind == F.KIND_RUN:
                length = F.RUN.unpack_from(page, F.RUN_AT)[1]
                if length < 1 or pid + length > count:
                    fail(f"run at page {pid} has {length} pages")
                for member in range(pid, pid + length):
                    claim(member, f"run {pid}")
                offset = pf.offset(pid) + F.RUN_OBJECT
                yield offset, length * pf.page_size - F.RUN_OBJECT, header.unpack_from(view_at(offset, 8))[0]
            else:
                fail(f"page {pid} is in use but has unknown kind {kind}")
        if progress is not None:
            progress(count, count, "pages")
