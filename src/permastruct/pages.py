"""The page layer (seed 004): page ids, page headers, pins, dirty pages, the free-page list.

A :class:`PageFile` is a file of fixed-size pages behind a small header; it
is the bottom layer of every store and usable on its own.  Pages are reached
through a :class:`BufferManager`, which hands out :class:`Page` objects, counts
pins, remembers which pages are dirty and which were used last, and evicts
only unpinned pages.  A page's ``data`` is a zero-copy view of the mapped file.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "pages.pf")
>>> pf = PageFile(path, pageSize=512)
>>> page = pf.allocate_page()
>>> with page.pinned():
...     page.set_content(0, b"hello")
...     bytes(page.get_content(0, 5))
b'hello'
>>> pf.free_page(page)
>>> pf.close()
>>> pf = PageFile(path)
>>> pf.page_size, pf.page_count, pf.free_page_count()
(512, 1, 1)
>>> pf.close()
"""

import collections
import contextlib

from . import _format as F
from ._commit import Engine
from .errors import CorruptStorageError, ReadOnlyError, UnpinnedPageError

__all__ = ["PageId", "PageHeader", "PageData", "Page", "BufferManager", "PageFile"]


class PageId(int):
    """The id of a page: its index in the page file.

    >>> PageId(3) + 1
    4
    """

    __slots__ = ()

    def __repr__(self):
        return f"PageId({int(self)})"


class PageData(bytearray):
    """A copy of part of a page's content, as returned by :meth:`Page.get_content`."""


class PageHeader:
    """A view of the first 4 bytes of a page: the free-page list link.

    >>> PageHeader.SIZE, PageHeader.NO_NEXT_FREE_PAGE, PageHeader.NOT_IN_FREE_PAGE_LIST
    (4, -1, -2)
    """

    NO_NEXT_FREE_PAGE = F.NO_NEXT_FREE_PAGE
    NOT_IN_FREE_PAGE_LIST = F.NOT_IN_FREE_PAGE_LIST
    SIZE = F.PAGE_HEADER.size

    __slots__ = ("page",)

    def __init__(self, page):
        self.page = page

    @property
    def next_free_pid(self):
        """The id of the next free page, or one of the two constants."""
        self.page._require_pin()
        return PageId(F.PAGE_HEADER.unpack_from(self.page.data, 0)[0])

    @next_free_pid.setter
    def next_free_pid(self, pid):
        self.page._require_pin()
        self.page._require_writable()
        F.PAGE_HEADER.pack_into(self.page.data, 0, pid)
        self.page.mark_dirty()


class Page:
    """One page of a :class:`PageFile`: ``file``, ``pid``, ``size``, ``data`` and ``header``.

    Content (the bytes after the 4-byte header) can only be read or written
    while the page is pinned:

    >>> import os, tempfile
    >>> pf = PageFile(os.path.join(tempfile.mkdtemp(), "p.pf"), pageSize=256)
    >>> page = pf.allocate_page()
    >>> page.get_content(0, 1)
    Traceback (most recent call last):
    ...
    permastruct.errors.UnpinnedPageError: page 0 of ... is not pinned; use 'with page.pinned():'
    >>> with page.pinned(), page.pinned():
    ...     page.is_pinned(), page.is_free()
    (True, False)
    >>> page.is_pinned()
    False
    >>> pf.close()
    """

    __slots__ = ("file", "pid", "size", "data", "header", "_buffer_manager", "_dirty", "_pin_count")

    def __init__(self, file, pid, size, data, buffer_manager):
        self.file = file
        self.pid = PageId(pid)
        self.size = size
        self.data = data
        self._buffer_manager = buffer_manager
        self._dirty = False
        self._pin_count = 0
        self.header = PageHeader(self)

    def __repr__(self):
        return f"<Page {int(self.pid)} of {self.file.path!r}>"

    @contextlib.contextmanager
    def pinned(self):
        """Pin the page for the duration of a ``with`` block; pins nest."""
        self.file._check_open()
        self._pin_count += 1
        if self._pin_count == 1:
            self._buffer_manager.touch_page(self)
        try:
            yield self
        finally:
            self._pin_count -= 1
            if self._pin_count == 0:
                self._buffer_manager.touch_page(self)

    def _require_pin(self):
        self.file._check_open()
        if self._pin_count <= 0:
            raise UnpinnedPageError(f"page {int(self.pid)} of {self.file.path!r} is not pinned; "
                                    "use 'with page.pinned():'")

    def _require_writable(self):
        if self.file.readonly:
            raise ReadOnlyError(f"page file {self.file.path!r} is open read-only")

    def _content_range(self, offset, size):
        room = self.size - PageHeader.SIZE
        if not (isinstance(offset, int) and isinstance(size, int)):
            raise TypeError("content offset and size must be integers")
        if offset < 0 or size < 0 or offset + size > room:
            raise IndexError(f"content range {offset}+{size} is outside the page's {room} content bytes")
        return PageHeader.SIZE + offset, PageHeader.SIZE + offset + size

    def get_content(self, offset, size):
        """A copy of ``size`` content bytes at content ``offset``."""
        self._require_pin()
        lo, hi = self._content_range(offset, size)
        return PageData(self.data[lo:hi])

    def set_content(self, offset, data):
        """Overwrite content bytes at ``offset`` with ``data`` and mark the page dirty."""
        self._require_pin()
        self._require_writable()
        data = memoryview(data).cast("B")
        lo, hi = self._content_range(offset, len(data))
        self.data[lo:hi] = data
        self.mark_dirty()

    def clear_content(self):
        """Zero the whole content and mark the page dirty."""
        self._require_pin()
        self._require_writable()
        self.data[PageHeader.SIZE:] = bytes(self.size - PageHeader.SIZE)
        self.mark_dirty()

    def persist(self):
        """Hand the page to the next commit; return whether it was dirty (see ``BufferManager.persist_page``)."""
        return self._buffer_manager.persist_page(self)

    def mark_dirty(self):
        self._dirty = True
        self._buffer_manager._dirty[int(self.pid)] = self
        self._buffer_manager.touch_page(self)

    def clear_dirty(self):
        self._dirty = False
        self._buffer_manager._dirty.pop(int(self.pid), None)

    def is_dirty(self):
        return self._dirty

    def is_pinned(self):
        return self._pin_count > 0

    def is_free(self):
        """Whether the page is on the free-page list (the page must be pinned)."""
        self._require_pin()
        return self.header.next_free_pid != PageHeader.NOT_IN_FREE_PAGE_LIST


class BufferManager:
    """Hands out the :class:`Page` objects of a page file; pins, recency, dirty pages, eviction.

    At most ``capacity`` page objects are kept; beyond that the least recently
    used unpinned page is persisted (if dirty) and dropped.
    """

    def __init__(self, page_file, capacity=1024):
        self.page_file = page_file
        self.capacity = capacity
        self._pages = collections.OrderedDict()
        self._dirty = {}

    def get_page(self, pid):
        pid = int(pid)
        page = self._pages.get(pid)
        if page is None:
            pf = self.page_file
            pf._check_page(pid)
            data = pf.mapping.view(pf.offset(pid), pf.page_size)
            page = Page(pf, pid, pf.page_size, data, self)
            self._evict(self.capacity - 1)  # before inserting: the new page is never the victim
            self._pages[pid] = page
        return page

    def touch_page(self, page):
        """Mark ``page`` as the most recently used."""
        if self._pages.get(int(page.pid)) is page:
            self._pages.move_to_end(int(page.pid))

    def _evict(self, limit):
        while len(self._pages) > limit:
            for pid, page in self._pages.items():
                if not page.is_pinned():
                    break
            else:
                return  # everything is pinned: keep them all
            self.persist_page(page)
            del self._pages[pid]

    def persist_page(self, page):
        """Hand a dirty page to the next commit; return whether it was dirty.

        A page's bytes live in the privately mapped file, so there is nothing
        to copy: the commit (``PageFile.flush``) logs every changed page, and
        writing one page into the file on its own would break the atomicity
        of commits.  What is dropped is the page's dirty mark.
        """
        self.page_file._check_open()
        if not page.is_dirty():
            return False
        page._require_writable()
        page.clear_dirty()
        return True

    def allocate_page(self):
        """A new page: the head of the free-page list, or a new page at the end of the file."""
        return self.get_page(self.page_file.allocate_pid())

    def free_page(self, page):
        """Put a page on the head of the free-page list."""
        self.page_file.free_pid(page.pid)

    def flush(self):
        """Persist every dirty page."""
        for page in list(self._dirty.values()):
            self.persist_page(page)

    def forget(self):
        self._pages.clear()
        self._dirty.clear()


class PageFile(Engine):
    """A file of pages (seed 004): a header, two root records, a free-page list, pages and a log.

    ``PageFile(path, pageSize=4096)`` creates the file if it is missing (or
    empty) and opens it otherwise (the page size is then read from the file).
    ``PageFile(None)`` is a page file in memory, ``PageFile(path, overlay=True)``
    keeps its changes in memory on top of the file (see ``docs/modes.rst``).
    ``flush()`` commits every change atomically; ``close()`` flushes and
    releases the file.  The transactions themselves (log, checkpoints,
    readers, locks) are :class:`permastruct._commit.Engine`'s.

    One writable open at a time (a second one raises ``StorageLockedError``,
    or waits up to ``timeout`` seconds); any number of ``readonly=True`` opens,
    each seeing the last commit made before it opened or last called
    :meth:`refresh`.
    """

    def __init__(self, path, pageSize=F.DEFAULT_PAGE_SIZE, *, readonly=False, sync=True,
                 initial_size=None, timeout=0, overlay=False, history=None, at=None):
        self.buffer_manager = BufferManager(self)
        super().__init__(path, pageSize, readonly=readonly, sync=sync, initial_size=initial_size,
                         timeout=timeout, overlay=overlay, history=history, at=at)

    def flush(self):
        """Commit: hand every dirty page to the log with the new root state (see ``Engine.commit``)."""
        return self.commit()

    def discard(self):
        """Forget every change since the last commit (the map shows the committed pages again)."""
        return self.rollback()

    def _before_commit(self):
        self.buffer_manager.flush()

    def _forget_pages(self):
        self.buffer_manager.forget()

    def _check_page(self, pid):
        self._check_open()
        if not 0 <= pid < self.page_count:
            raise IndexError(f"page {pid} does not exist in {self.path!r} ({self.page_count} pages)")

    def offset(self, pid):
        """The file offset of page ``pid``."""
        return F.HEADER_BLOCK + int(pid) * self.page_size

    def page_of(self, offset):
        """The id of the page holding file ``offset``."""
        return (offset - F.HEADER_BLOCK) // self.page_size

    def view(self, pid, start=0, length=None):
        """A memoryview of (part of) page ``pid`` in the map."""
        if length is None:
            length = self.page_size - start
        return self.mapping.view(F.HEADER_BLOCK + int(pid) * self.page_size + start, length)  # offset(), inline

    def _link(self, pid):
        return F.INT32.unpack_from(self.view(pid, 0, 4))[0]

    def _set_link(self, pid, value):
        F.INT32.pack_into(self.view(pid, 0, 4), 0, value)

    # -- allocation ----------------------------------------------------------
    def allocate_pid(self):
        """Take a page: the head of the free-page list, else a new page at the end."""
        self._check_writable()
        pid = self.free_head
        if pid != F.NO_NEXT_FREE_PAGE:
            following = self._link(pid)
            if not (following == F.NO_NEXT_FREE_PAGE or 0 <= following < self.page_count):
                raise CorruptStorageError(f"{self._label}: free page {pid} links to {following}, "
                                          "which is not a page")
            self.free_head = following
            self._set_link(pid, F.NOT_IN_FREE_PAGE_LIST)
        else:
            pid = self.allocate_pids(1)  # (which writes the page's link)
        return pid

    def allocate_pids(self, count):
        """Take ``count`` new contiguous pages at the end of the file, all in one segment (for one
        object: only the first page's link is written, the others are left as they are)."""
        self._check_writable()
        mapping = self.mapping
        while True:
            start = self.offset(self.page_count)
            end = start + count * self.page_size
            if start >= mapping.size:
                mapping.grow(end)  # the new segment starts at ``start``
                break
            segment = mapping.segment_of(start)
            segment_end = segment.start + segment.length
            if end <= segment_end:
                self._reserve(self.page_count + count)  # (a hole a checkpoint left: blocks first)
                break
            # The run does not fit in this segment (the last one, or one left
            # mapped by a rollback): free the segment's remaining pages.
            self._reserve(self.page_of(segment_end))
            for pid in range(self.page_count, self.page_of(segment_end)):
                self.page_count += 1
                self.free_pid(pid)
        first = self.page_count
        self.page_count += count
        # Only the first page's link says the run is in use: the pages after it hold the bytes of
        # one object (a run), which cover their link words, and nothing reads a link there (a
        # page scan claims a run's pages from its first page; a freed run is a free run, its
        # first page's header again).  Writing them cost a Python call and a page fault a page.
        self._set_link(first, F.NOT_IN_FREE_PAGE_LIST)
        return first

    def free_pid(self, pid):
        """Push page ``pid`` on the head of the free-page list."""
        self._check_writable()
        self._check_page(pid)
        self._set_link(pid, self.free_head)
        self.free_head = int(pid)

    def free_pages(self):
        """The ids on the free-page list, head first (raises CorruptStorageError on a cycle)."""
        pids = []
        seen = set()
        pid = self.free_head
        while pid != F.NO_NEXT_FREE_PAGE:
            if not 0 <= pid < self.page_count or pid in seen:
                raise CorruptStorageError(f"{self._label}: the free-page list is broken at page {pid}")
            seen.add(pid)
            pids.append(pid)
            pid = self._link(pid)
        return pids

    def free_page_count(self):
        return len(self.free_pages())

    # -- page objects --------------------------------------------------------
    def allocate_page(self):
        """A new :class:`Page` (reusing the free-page list first)."""
        return self.buffer_manager.allocate_page()

    def free_page(self, page):
        """Return ``page`` to the free-page list."""
        self.buffer_manager.free_page(page)

    def get_page(self, pid):
        """The :class:`Page` with id ``pid``."""
        return self.buffer_manager.get_page(pid)

    def __repr__(self):
        return f"<PageFile {self.path!r} {self.page_count} pages of {self.page_size} bytes>"
