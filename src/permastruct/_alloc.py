"""Object allocation inside pages: size-class slabs for small objects, page runs for large ones.

Layouts are in :mod:`permastruct._format`.  All state lives in the file (the
allocator page, slab headers, free-run headers), so it is written back, and
made atomic, together with the data.  Offsets returned are absolute file
offsets of the object, 16-byte aligned in slabs and at page offset 64 in runs.
"""

import bisect

from . import _format as F
from .errors import CorruptStorageError


class Allocator:
    """Allocates and frees objects in a :class:`permastruct.pages.PageFile`."""

    def __init__(self, page_file, state_pid=None):
        self.pf = page_file
        self.page_size = page_file.page_size
        self.classes = F.size_classes(self.page_size)
        self.max_small = self.classes[-1]
        if state_pid is None:
            state_pid = page_file.allocate_pid()
            view = page_file.view(state_pid, F.ALLOC_AT)
            F.ALLOC.pack_into(view, 0, F.KIND_ALLOC, len(self.classes), F.NO_NEXT_FREE_PAGE)
            for index in range(len(self.classes)):
                F.INT32.pack_into(view, F.ALLOC_HEADS_AT - F.ALLOC_AT + 4 * index, -1)
        self.state_pid = state_pid
        view = page_file.view(state_pid)
        kind, count, _ = F.ALLOC.unpack_from(view, F.ALLOC_AT)
        if kind != F.KIND_ALLOC or count != len(self.classes):
            raise CorruptStorageError(f"{page_file.path!r}: page {state_pid} is not the allocator page")

    # -- allocator page ------------------------------------------------------
    def _head(self, index):
        return F.INT32.unpack_from(self.pf.view(self.state_pid), F.ALLOC_HEADS_AT + 4 * index)[0]

    def _set_head(self, index, pid):
        F.INT32.pack_into(self.pf.view(self.state_pid), F.ALLOC_HEADS_AT + 4 * index, pid)

    def _run_head(self):
        return F.ALLOC.unpack_from(self.pf.view(self.state_pid), F.ALLOC_AT)[2]

    def _set_run_head(self, pid):
        F.INT32.pack_into(self.pf.view(self.state_pid), F.ALLOC_AT + 8, pid)

    # -- public --------------------------------------------------------------
    def alloc(self, size, zero=True):
        """The offset of a new object of ``size`` bytes (zeroed unless ``zero`` is False)."""
        if size <= self.max_small:
            index = bisect.bisect_left(self.classes, size)
            offset = self._alloc_small(index)
            if zero:
                self.pf.mapping.view(offset, self.classes[index])[:] = bytes(self.classes[index])
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

    def _zero(self, offset, size):
        mapping = self.pf.mapping
        step = 1 << 20
        for start in range(offset, offset + size, step):
            length = min(step, offset + size - start)
            mapping.view(start, length)[:] = bytes(length)

    def free(self, offset):
        """Return the object at ``offset`` to the allocator."""
        pid = self.pf.page_of(offset)
        page = self.pf.view(pid)
        kind = page[F.SLAB_AT]
        if kind == F.KIND_SLAB:
            self._free_small(pid, page, offset)
        elif kind == F.KIND_RUN and offset == self.pf.offset(pid) + F.RUN_OBJECT:
            self._free_run(pid, F.RUN.unpack_from(page, F.RUN_AT)[1])
        else:
            raise CorruptStorageError(f"{self.pf.path!r}: freeing {offset:#x}, which is not an allocated object")

    def capacity(self, offset):
        """How many bytes the object at ``offset`` may use."""
        pid = self.pf.page_of(offset)
        page = self.pf.view(pid)
        if page[F.SLAB_AT] == F.KIND_SLAB:
            return self.classes[page[F.SLAB_AT + 1]]
        return F.RUN.unpack_from(page, F.RUN_AT)[1] * self.page_size - F.RUN_OBJECT

    # -- slabs ---------------------------------------------------------------
    def slots_per_page(self, index):
        return (self.page_size - F.SLAB_FIRST_SLOT) // self.classes[index]

    def _alloc_small(self, index):
        pf = self.pf
        pid = self._head(index)
        if pid == -1:
            pid = pf.allocate_pid()
            F.SLAB.pack_into(pf.view(pid), F.SLAB_AT, F.KIND_SLAB, index, 0, 0, 0, -1, -1)
            self._set_head(index, pid)
        page = pf.view(pid)
        kind, cls, used, free_head, bump, nxt, prv = F.SLAB.unpack_from(page, F.SLAB_AT)
        if kind != F.KIND_SLAB or cls != index:
            raise CorruptStorageError(f"{pf.path!r}: page {pid} on the size-class {index} list is not a slab of it")
        size = self.classes[index]
        nslots = self.slots_per_page(index)
        if free_head:
            slot = free_head - 1
            if slot >= bump:
                raise CorruptStorageError(f"{pf.path!r}: slab {pid} free list points at unused slot {slot}")
            free_head = F.UINT32.unpack_from(page, F.SLAB_FIRST_SLOT + slot * size)[0]
        elif bump < nslots:
            slot = bump
            bump += 1
        else:
            raise CorruptStorageError(f"{pf.path!r}: full slab {pid} is on the partial list")
        used += 1
        F.SLAB.pack_into(page, F.SLAB_AT, kind, cls, used, free_head, bump, nxt, prv)
        if used == nslots:
            self._unlink(index, pid, nxt, prv)
        return pf.offset(pid) + F.SLAB_FIRST_SLOT + slot * size

    def _free_small(self, pid, page, offset):
        kind, index, used, free_head, bump, nxt, prv = F.SLAB.unpack_from(page, F.SLAB_AT)
        size = self.classes[index] if index < len(self.classes) else 0
        relative = offset - self.pf.offset(pid) - F.SLAB_FIRST_SLOT
        if not size or relative < 0 or relative % size or relative // size >= bump or used == 0:
            raise CorruptStorageError(f"{self.pf.path!r}: freeing {offset:#x}, which is not a slot of slab {pid}")
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

    def _set_links(self, pid, nxt=None, prv=None):
        page = self.pf.view(pid)
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
    def _alloc_run(self, pages):
        pf = self.pf
        if pages == 1 and pf.free_head != F.NO_NEXT_FREE_PAGE:
            return pf.allocate_pid()
        previous = -1
        pid = self._run_head()
        seen = 0
        while pid != -1:
            seen += 1
            if seen > pf.page_count:
                raise CorruptStorageError(f"{pf.path!r}: the free-run list has a cycle")
            kind, length, following = F.FREE_RUN.unpack_from(pf.view(pid), F.RUN_AT)
            if kind != F.KIND_FREE_RUN or length < 2 or pid + length > pf.page_count:
                raise CorruptStorageError(f"{pf.path!r}: page {pid} on the free-run list is not a free run")
            if length >= pages:
                remaining = length - pages
                if remaining >= 2:
                    F.FREE_RUN.pack_into(pf.view(pid), F.RUN_AT, F.KIND_FREE_RUN, remaining, following)
                else:
                    if previous == -1:
                        self._set_run_head(following)
                    else:
                        F.INT32.pack_into(pf.view(previous), F.RUN_AT + 8, following)
                    pf.view(pid)[F.RUN_AT:F.RUN_AT + F.FREE_RUN.size] = bytes(F.FREE_RUN.size)
                    if remaining == 1:
                        pf.free_pid(pid)
                # The first page of the taken part may have been a continuation
                # page, whose header bytes held object data.
                pf._set_link(pid + remaining, F.NOT_IN_FREE_PAGE_LIST)
                return pid + remaining
            previous, pid = pid, following
        return pf.allocate_pid() if pages == 1 else pf.allocate_pids(pages)

    def _free_run(self, pid, pages):
        pf = self.pf
        if pages == 1:
            pf.view(pid)[F.RUN_AT:F.RUN_AT + F.RUN.size] = bytes(F.RUN.size)
            pf.free_pid(pid)
            return
        F.FREE_RUN.pack_into(pf.view(pid), F.RUN_AT, F.KIND_FREE_RUN, pages, self._run_head())
        self._set_run_head(pid)

    def free_runs(self):
        """``(pid, pages)`` of every free run."""
        runs = []
        pid = self._run_head()
        while pid != -1:
            if len(runs) > self.pf.page_count or not 0 <= pid < self.pf.page_count:
                raise CorruptStorageError(f"{self.pf.path!r}: the free-run list is broken at page {pid}")
            kind, length, following = F.FREE_RUN.unpack_from(self.pf.view(pid), F.RUN_AT)
            if kind != F.KIND_FREE_RUN:
                raise CorruptStorageError(f"{self.pf.path!r}: page {pid} on the free-run list is not a free run")
            runs.append((pid, length))
            pid = following
        return runs
