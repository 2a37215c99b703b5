"""Contract tests for the page layer (DESIGN.md 3.9, seed 004): ``permastruct.pages``."""

import contextlib
import os
import struct

import pytest

from permastruct import pages
from permastruct._mapping import FileIO
from permastruct.errors import (CorruptStorageError, NotAStorageError, PermastructError,
                                ReadOnlyError, StorageClosedError, UnpinnedPageError)
from permastruct.pages import BufferManager, Page, PageFile, PageHeader, PageId

LINK = struct.Struct("<i")


# -- helpers ---------------------------------------------------------------------
@pytest.fixture
def path(tmp_path):
    return tmp_path / "pages.pf"


@pytest.fixture
def pf(path):
    f = PageFile(path, pageSize=512)
    yield f
    f.close()


def content_size(page_file):
    return page_file.page_size - PageHeader.SIZE


def file_bytes(path, page_file, pid, start=0, length=None):
    """Bytes of page ``pid`` as committed: what a new read-only open of the file sees.

    The committed state is the main file plus its write-ahead log, so this
    opens the file read-only rather than reading it with plain open().
    """
    if length is None:
        length = page_file.page_size - start
    reader = PageFile(path, readonly=True)
    try:
        if pid >= reader.page_count:
            return bytes(length)  # not committed yet: a new page reads as zeros
        return bytes(reader.mapping.view(reader.offset(pid) + start, length))
    finally:
        reader.close()


def disk_link(path, page_file, pid):
    """The page header (next_free_pid) of page ``pid`` as stored on disk."""
    return LINK.unpack(file_bytes(path, page_file, pid, 0, 4))[0]


def pattern(pid, n):
    """Distinct content for page ``pid``."""
    return bytes((pid * 31 + i * 7 + 1) & 0xFF for i in range(n))


def read_content(page, offset, size):
    with page.pinned():
        return bytes(page.get_content(offset, size))


def write_content(page, offset, data):
    with page.pinned():
        page.set_content(offset, data)


def header_of(page):
    with page.pinned():
        return page.header.next_free_pid


@contextlib.contextmanager
def count_io():
    """Count FileIO operations (the one I/O layer) while the block runs."""
    calls = []
    previous = FileIO.hook
    FileIO.hook = lambda operation, p, *args: calls.append(operation)
    try:
        yield calls
    finally:
        FileIO.hook = previous


# -- ids and headers -------------------------------------------------------------
def test_page_id_is_an_int_subclass():
    pid = PageId(7)
    assert isinstance(pid, int)
    assert issubclass(PageId, int)
    assert pid == 7 and pid + 1 == 8 and hash(pid) == hash(7)
    assert int(pid) == 7


def test_page_header_constants():
    assert PageHeader.SIZE == 4
    assert PageHeader.NO_NEXT_FREE_PAGE == -1
    assert PageHeader.NOT_IN_FREE_PAGE_LIST == -2


def test_module_exports_the_page_layer():
    for name in ("PageId", "PageHeader", "Page", "BufferManager", "PageFile"):
        assert name in pages.__all__
        assert hasattr(pages, name)


def test_page_attributes(pf):
    page = pf.allocate_page()
    assert isinstance(page, Page)
    assert page.file is pf
    assert isinstance(page.pid, PageId) and page.pid == 0
    assert page.size == pf.page_size == 512
    assert len(page.data) == 512
    assert isinstance(page.header, PageHeader)
    assert isinstance(pf.buffer_manager, BufferManager)
    second = pf.allocate_page()
    assert isinstance(second.pid, PageId) and second.pid == 1
    assert pf.page_count == 2


def test_page_header_is_the_first_four_bytes_of_the_page(pf):
    page = pf.allocate_page()
    with page.pinned():
        assert page.header.next_free_pid == PageHeader.NOT_IN_FREE_PAGE_LIST
        assert LINK.unpack(bytes(page.data[:4]))[0] == PageHeader.NOT_IN_FREE_PAGE_LIST
        # content starts after the header: writing content never touches the header
        page.set_content(0, b"\xAA" * 8)
        assert bytes(page.data[4:12]) == b"\xAA" * 8
        assert page.header.next_free_pid == PageHeader.NOT_IN_FREE_PAGE_LIST


def test_page_header_requires_a_pin(pf):
    page = pf.allocate_page()
    with pytest.raises(UnpinnedPageError):
        page.header.next_free_pid


# -- create and reopen -------------------------------------------------------------
def test_create_and_reopen_keeps_size_count_contents_and_free_list(path):
    pf = PageFile(path, pageSize=512)
    created = [pf.allocate_page() for _ in range(6)]
    for page in created:
        write_content(page, 0, pattern(page.pid, content_size(pf)))
    pf.free_page(created[2])
    pf.free_page(created[4])
    assert pf.free_pages() == [4, 2]
    pf.close()

    # the page size comes from the file; a different argument is ignored
    pf = PageFile(path, pageSize=4096)
    try:
        assert pf.page_size == 512
        assert pf.page_count == 6
        assert pf.free_pages() == [4, 2]
        assert pf.free_page_count() == 2
        for pid in (0, 1, 3, 5):
            page = pf.get_page(pid)
            assert read_content(page, 0, content_size(pf)) == pattern(pid, content_size(pf))
            assert header_of(page) == PageHeader.NOT_IN_FREE_PAGE_LIST
        assert header_of(pf.get_page(4)) == 2
        assert header_of(pf.get_page(2)) == PageHeader.NO_NEXT_FREE_PAGE
        # the list keeps working after reopen: LIFO from the stored head
        assert pf.allocate_page().pid == 4
        assert pf.allocate_page().pid == 2
        assert pf.allocate_page().pid == 6
    finally:
        pf.close()


def test_flush_makes_pages_and_list_visible_to_a_new_opener(path):
    pf = PageFile(path, pageSize=256)
    try:
        a, b, c = (pf.allocate_page() for _ in range(3))
        write_content(b, 10, b"flushed")
        pf.free_page(c)
        pf.flush()
        reader = PageFile(path, readonly=True)
        try:
            assert reader.page_size == 256
            assert reader.page_count == 3
            assert reader.free_pages() == [2]
            assert read_content(reader.get_page(1), 10, 7) == b"flushed"
        finally:
            reader.close()
    finally:
        pf.close()


def test_reopen_empty_page_file(path):
    PageFile(path, pageSize=1024).close()
    pf = PageFile(path)
    try:
        assert (pf.page_size, pf.page_count, pf.free_pages()) == (1024, 0, [])
        assert pf.allocate_page().pid == 0
    finally:
        pf.close()


@pytest.mark.parametrize("size", [256, 1024, 4096, 65536])
def test_valid_page_sizes(tmp_path, size):
    path = tmp_path / f"p{size}.pf"
    pf = PageFile(path, pageSize=size)
    page = pf.allocate_page()
    write_content(page, size - 4 - 3, b"end")
    pf.close()
    pf = PageFile(path)
    try:
        assert pf.page_size == size
        assert read_content(pf.get_page(0), size - 4 - 3, 3) == b"end"
    finally:
        pf.close()


def test_default_page_size_is_4096(path):
    pf = PageFile(path)
    try:
        assert pf.page_size == 4096
    finally:
        pf.close()


@pytest.mark.parametrize("size", [0, -4096, 100, 128, 255, 300, 4095, 4097, 1 << 17])
def test_invalid_page_size_value(tmp_path, size):
    path = tmp_path / "bad.pf"
    with pytest.raises(ValueError):
        PageFile(path, pageSize=size)
    assert not path.exists()


@pytest.mark.parametrize("size", ["4096", 4096.0, None, True, b"4096"])
def test_invalid_page_size_type(tmp_path, size):
    path = tmp_path / "bad.pf"
    with pytest.raises(TypeError):
        PageFile(path, pageSize=size)
    assert not path.exists()


# -- allocation and the free-page list -----------------------------------------------
def test_allocate_grows_when_the_free_list_is_empty(pf):
    for expected in range(5):
        assert pf.free_pages() == []
        page = pf.allocate_page()
        assert page.pid == expected
        assert pf.page_count == expected + 1
        assert header_of(page) == PageHeader.NOT_IN_FREE_PAGE_LIST


def test_allocate_reuses_the_free_list_lifo(pf):
    created = [pf.allocate_page() for _ in range(6)]
    for pid in (1, 4, 2):
        pf.free_page(created[pid])
    assert pf.free_pages() == [2, 4, 1]
    count = pf.page_count
    assert pf.allocate_page().pid == 2
    assert pf.allocate_page().pid == 4
    assert pf.free_pages() == [1]
    pf.free_page(created[5])
    assert pf.allocate_page().pid == 5
    assert pf.allocate_page().pid == 1
    assert pf.page_count == count  # nothing grew while the list had pages
    assert pf.free_pages() == []
    assert pf.allocate_page().pid == count
    assert pf.page_count == count + 1


def test_freed_page_header_links_to_the_previous_head(path):
    pf = PageFile(path, pageSize=256)
    try:
        created = [pf.allocate_page() for _ in range(4)]
        pf.free_page(created[1])
        assert header_of(created[1]) == PageHeader.NO_NEXT_FREE_PAGE
        pf.free_page(created[3])
        assert header_of(created[3]) == 1
        pf.free_page(created[0])
        assert header_of(created[0]) == 3
        assert header_of(created[2]) == PageHeader.NOT_IN_FREE_PAGE_LIST
        for page, free in zip(created, (True, True, False, True)):
            with page.pinned():
                assert page.is_free() is free
        # on disk too, once flushed
        pf.flush()
        assert disk_link(path, pf, 1) == PageHeader.NO_NEXT_FREE_PAGE
        assert disk_link(path, pf, 3) == 1
        assert disk_link(path, pf, 0) == 3
        assert disk_link(path, pf, 2) == PageHeader.NOT_IN_FREE_PAGE_LIST
        # a reused page is marked in use again
        again = pf.allocate_page()
        assert again.pid == 0
        assert header_of(again) == PageHeader.NOT_IN_FREE_PAGE_LIST
        with again.pinned():
            assert not again.is_free()
    finally:
        pf.close()


def test_buffer_manager_allocates_and_frees(pf):
    bm = pf.buffer_manager
    a = bm.allocate_page()
    b = bm.allocate_page()
    assert (a.pid, b.pid) == (0, 1)
    bm.free_page(a)
    assert pf.free_pages() == [0]
    assert header_of(a) == PageHeader.NO_NEXT_FREE_PAGE
    assert bm.allocate_page().pid == 0
    assert bm.get_page(1) is b


def test_get_page_returns_the_same_page_object(pf):
    page = pf.allocate_page()
    assert pf.get_page(page.pid) is page
    assert pf.get_page(int(page.pid)) is page


# -- pins --------------------------------------------------------------------------
def test_pinned_nests(pf):
    page = pf.allocate_page()
    assert not page.is_pinned()
    with page.pinned() as pinned:
        assert pinned is page
        assert page.is_pinned()
        with page.pinned():
            assert page.is_pinned()
            with page.pinned():
                assert page.is_pinned()
            assert page.is_pinned()
        assert page.is_pinned()
        page.get_content(0, 1)  # still usable after inner pins ended
    assert not page.is_pinned()
    with pytest.raises(UnpinnedPageError):
        page.get_content(0, 1)


def test_pin_is_released_on_exception(pf):
    page = pf.allocate_page()
    with pytest.raises(KeyError):
        with page.pinned():
            with page.pinned():
                raise KeyError("boom")
    assert not page.is_pinned()
    with page.pinned():
        assert page.is_pinned()
    assert not page.is_pinned()


@pytest.mark.parametrize("operation", [
    lambda page: page.get_content(0, 4),
    lambda page: page.set_content(0, b"x"),
    lambda page: page.clear_content(),
    lambda page: page.is_free(),
], ids=["get_content", "set_content", "clear_content", "is_free"])
def test_content_operations_refuse_an_unpinned_page(pf, operation):
    page = pf.allocate_page()
    write_content(page, 0, b"keep")
    page.persist()
    assert not page.is_dirty()
    with pytest.raises(UnpinnedPageError):
        operation(page)
    assert read_content(page, 0, 4) == b"keep"
    assert not page.is_dirty()


def test_unpinned_error_is_a_permastruct_error(pf):
    page = pf.allocate_page()
    with pytest.raises(PermastructError) as info:
        page.get_content(0, 1)
    assert isinstance(info.value, UnpinnedPageError)
    assert "pin" in str(info.value)


# -- content -----------------------------------------------------------------------
def test_set_and_get_content(pf):
    page = pf.allocate_page()
    room = content_size(pf)
    with page.pinned():
        page.set_content(0, b"head")
        page.set_content(room - 4, b"tail")
        page.set_content(100, bytearray(b"middle"))
        page.set_content(200, memoryview(b"view"))
        assert page.get_content(0, 4) == b"head"
        assert page.get_content(room - 4, 4) == b"tail"
        assert page.get_content(100, 6) == b"middle"
        assert page.get_content(200, 4) == b"view"
        assert page.get_content(50, 0) == b""
        whole = page.get_content(0, room)
        assert len(whole) == room


def test_get_content_returns_a_copy(pf):
    page = pf.allocate_page()
    with page.pinned():
        page.set_content(0, b"abcd")
        copy = page.get_content(0, 4)
        assert isinstance(copy, bytearray)
        copy[0:4] = b"zzzz"
        assert page.get_content(0, 4) == b"abcd"


def test_set_content_marks_dirty(pf):
    page = pf.allocate_page()
    pf.flush()
    assert not page.is_dirty()
    with page.pinned():
        page.set_content(3, b"x")
    assert page.is_dirty()


def test_clear_content_zeroes_and_marks_dirty(pf):
    page = pf.allocate_page()
    room = content_size(pf)
    write_content(page, 0, b"\xFF" * room)
    pf.flush()
    assert not page.is_dirty()
    with page.pinned():
        page.clear_content()
        assert page.is_dirty()
        assert page.get_content(0, room) == bytes(room)
        # the header is not content
        assert page.header.next_free_pid == PageHeader.NOT_IN_FREE_PAGE_LIST
    pf.flush()
    assert file_bytes(pf.path, pf, page.pid, 4) == bytes(room)
    assert disk_link(pf.path, pf, page.pid) == PageHeader.NOT_IN_FREE_PAGE_LIST


def test_mark_and_clear_dirty(pf):
    page = pf.allocate_page()
    pf.flush()
    assert page.is_dirty() is False
    page.mark_dirty()
    assert page.is_dirty() is True
    page.clear_dirty()
    assert page.is_dirty() is False


@pytest.mark.parametrize("offset,size", [
    (-1, 1), (0, -1), ("room", 1), ("room-1", 2), (0, "room+1"), (10**6, 1), ("room+1", 0),
])
def test_get_content_outside_the_page_raises_index_error(pf, offset, size):
    page = pf.allocate_page()
    room = content_size(pf)
    resolve = {"room": room, "room-1": room - 1, "room+1": room + 1}
    offset = resolve.get(offset, offset)
    size = resolve.get(size, size)
    with page.pinned():
        with pytest.raises(IndexError):
            page.get_content(offset, size)


@pytest.mark.parametrize("offset,length", [(-1, 1), ("room", 1), ("room-2", 3), (0, "room+1")])
def test_set_content_outside_the_page_raises_index_error_and_changes_nothing(pf, offset, length):
    page = pf.allocate_page()
    room = content_size(pf)
    resolve = {"room": room, "room-2": room - 2, "room+1": room + 1}
    offset = resolve.get(offset, offset)
    length = resolve.get(length, length)
    pf.flush()
    before = bytes(page.data)
    with page.pinned():
        with pytest.raises(IndexError):
            page.set_content(offset, b"\x55" * length)
    assert bytes(page.data) == before
    assert not page.is_dirty()
    # neighbour page (the next one in the file) untouched either
    assert pf.page_count == 1


def test_content_boundaries_are_allowed(pf):
    page = pf.allocate_page()
    room = content_size(pf)
    with page.pinned():
        page.set_content(room - 1, b"\x01")
        assert page.get_content(room - 1, 1) == b"\x01"
        page.set_content(room, b"")
        assert page.get_content(room, 0) == b""
        page.set_content(0, bytes(range(256)) * (room // 256) + bytes(room % 256))
        assert len(page.get_content(0, room)) == room


# -- persist -------------------------------------------------------------------------
def test_persist_hands_a_dirty_page_to_the_next_commit(path):
    pf = PageFile(path, pageSize=512)
    try:
        pages_ = [pf.allocate_page() for _ in range(3)]
        pf.flush()
        data = pattern(9, 40)
        write_content(pages_[1], 20, data)
        assert pages_[1].is_dirty()
        # not yet in the file
        assert file_bytes(path, pf, 1, 4 + 20, 40) != data
        assert pages_[1].persist() is True
        assert not pages_[1].is_dirty()
        # persisting hands the page to the next commit: readers see it after flush()
        assert file_bytes(path, pf, 1, 4 + 20, 40) != data
        pf.flush()
        assert file_bytes(path, pf, 1, 4 + 20, 40) == data
        assert file_bytes(path, pf, 1) == bytes(pages_[1].data)
        # the neighbours were not written with it
        assert file_bytes(path, pf, 0, 4, 40) == bytes(40)
        assert file_bytes(path, pf, 2, 4, 40) == bytes(40)
    finally:
        pf.close()


def test_persist_of_a_clean_page_writes_nothing(pf):
    page = pf.allocate_page()
    write_content(page, 0, b"once")
    assert page.persist() is True
    with count_io() as calls:
        assert page.persist() is False
    assert "pwrite" not in calls
    assert pf.buffer_manager.persist_page(page) is False


def test_buffer_manager_persist_page(path):
    pf = PageFile(path, pageSize=256)
    try:
        page = pf.allocate_page()
        write_content(page, 0, b"bm")
        assert pf.buffer_manager.persist_page(page) is True
        pf.flush()
        assert file_bytes(path, pf, 0, 4, 2) == b"bm"
        assert pf.buffer_manager.persist_page(page) is False
    finally:
        pf.close()


def test_flush_persists_every_dirty_page(path):
    pf = PageFile(path, pageSize=256)
    try:
        created = [pf.allocate_page() for _ in range(5)]
        for page in created:
            write_content(page, 0, pattern(page.pid, 60))
        assert all(page.is_dirty() for page in created)
        pf.flush()
        assert not any(page.is_dirty() for page in created)
        for page in created:
            assert file_bytes(path, pf, page.pid, 4, 60) == pattern(page.pid, 60)
            assert disk_link(path, pf, page.pid) == PageHeader.NOT_IN_FREE_PAGE_LIST
        pf.buffer_manager.flush()  # nothing left to do, and no error
    finally:
        pf.close()


# -- buffer manager: recency and eviction --------------------------------------------
def test_touch_page_decides_the_eviction_order(pf):
    bm = pf.buffer_manager
    bm.capacity = 3
    p0, p1, p2 = (pf.allocate_page() for _ in range(3))
    bm.touch_page(p0)  # p0 is now the most recent; p1 the least
    p3 = pf.allocate_page()
    assert pf.get_page(0) is p0
    assert pf.get_page(2) is p2
    assert pf.get_page(3) is p3
    assert pf.get_page(1) is not p1  # p1 was evicted; a new object now


def test_pin_and_last_unpin_touch_the_page(pf):
    bm = pf.buffer_manager
    bm.capacity = 3
    p0, p1, p2 = (pf.allocate_page() for _ in range(3))
    with p0.pinned():
        pass  # pinning and unpinning make p0 the most recent
    p3 = pf.allocate_page()  # evicts p1, the least recently used
    assert pf.get_page(0) is p0
    assert pf.get_page(2) is p2
    assert pf.get_page(3) is p3
    assert pf.get_page(1) is not p1


def test_eviction_keeps_pinned_pages_and_persists_dirty_ones(path):
    pf = PageFile(path, pageSize=256)
    try:
        bm = pf.buffer_manager
        bm.capacity = 4
        with contextlib.ExitStack() as stack:
            pinned = [pf.allocate_page() for _ in range(2)]
            for page in pinned:
                stack.enter_context(page.pinned())
                page.set_content(0, pattern(page.pid, 32))
            dirty = [pf.allocate_page() for _ in range(2)]
            for page in dirty:
                write_content(page, 0, pattern(page.pid, 32))
            assert all(page.is_dirty() for page in dirty)
            # nothing persisted yet
            for page in dirty:
                assert file_bytes(path, pf, page.pid, 4, 32) != pattern(page.pid, 32)
            more = [pf.allocate_page() for _ in range(6)]
            more += [pf.get_page(pid) for pid in range(2, 8)]
            # the pinned pages are still the cached objects, still pinned and dirty
            for page in pinned:
                assert pf.get_page(page.pid) is page
                assert page.is_pinned()
                assert page.is_dirty()
                assert page.get_content(0, 32) == pattern(page.pid, 32)
            # the dirty unpinned pages were evicted, and persisted first (their
            # changes wait in the map for the next commit)
            for page in dirty:
                assert not page.is_dirty()
            pf.flush()
            for page in dirty:
                assert file_bytes(path, pf, page.pid, 4, 32) == pattern(page.pid, 32)
            assert len(bm._pages) <= bm.capacity
        # content of evicted pages is still what was written
        for pid in (2, 3):
            assert read_content(pf.get_page(pid), 0, 32) == pattern(pid, 32)
    finally:
        pf.close()


def test_eviction_never_drops_pinned_pages_even_over_capacity(pf):
    bm = pf.buffer_manager
    bm.capacity = 2
    with contextlib.ExitStack() as stack:
        held = []
        for _ in range(5):
            page = pf.allocate_page()
            stack.enter_context(page.pinned())
            held.append(page)
        for page in held:
            assert pf.get_page(page.pid) is page
            assert page.is_pinned()
    # unpinned now: the next page brings the cache back to capacity
    pf.allocate_page()
    assert len(bm._pages) <= 2


def test_evicted_pages_are_all_in_the_file_after_close(path):
    pf = PageFile(path, pageSize=256)
    pf.buffer_manager.capacity = 4
    for pid in range(20):
        page = pf.allocate_page()
        write_content(page, 0, pattern(pid, 100))
    for pid in range(0, 20, 3):
        pf.free_page(pf.get_page(pid))
    pf.close()
    pf = PageFile(path)
    try:
        assert pf.page_count == 20
        assert sorted(pf.free_pages()) == list(range(0, 20, 3))
        for pid in range(20):
            if pid % 3:
                assert read_content(pf.get_page(pid), 0, 100) == pattern(pid, 100)
    finally:
        pf.close()


# -- close -----------------------------------------------------------------------------
@pytest.mark.parametrize("operation", [
    lambda pf, page: pf.allocate_page(),
    lambda pf, page: pf.get_page(0),
    lambda pf, page: pf.free_page(page),
    lambda pf, page: pf.flush(),
    lambda pf, page: pf.buffer_manager.allocate_page(),
    lambda pf, page: pf.buffer_manager.get_page(0),
    lambda pf, page: page.pinned().__enter__(),
    lambda pf, page: page.persist(),
    lambda pf, page: pf.buffer_manager.persist_page(page),
], ids=["allocate_page", "get_page", "free_page", "flush", "bm.allocate_page", "bm.get_page",
        "pinned", "persist", "bm.persist_page"])
def test_operations_after_close_raise_storage_closed_error(path, operation):
    pf = PageFile(path, pageSize=256)
    page = pf.allocate_page()
    write_content(page, 0, b"data")
    pf.close()
    with pytest.raises(StorageClosedError) as info:
        operation(pf, page)
    assert isinstance(info.value, ValueError)
    assert "closed" in str(info.value)


@pytest.mark.parametrize("operation", [
    lambda page: page.get_content(0, 4),
    lambda page: page.set_content(0, b"late"),
    lambda page: page.clear_content(),
    lambda page: page.header.next_free_pid,
], ids=["get_content", "set_content", "clear_content", "header"])
def test_content_of_a_page_pinned_across_close_raises_storage_closed_error(path, operation):
    pf = PageFile(path, pageSize=256)
    page = pf.allocate_page()
    write_content(page, 0, b"data")
    with page.pinned():
        pf.close()
        with pytest.raises(StorageClosedError):
            operation(page)
    reopened = PageFile(path)
    try:
        assert read_content(reopened.get_page(0), 0, 4) == b"data"
    finally:
        reopened.close()


def test_close_twice_does_nothing(path):
    pf = PageFile(path, pageSize=256)
    pf.allocate_page()
    pf.close()
    before = path.read_bytes()
    pf.close()
    assert path.read_bytes() == before


def test_close_flushes(path):
    pf = PageFile(path, pageSize=256)
    page = pf.allocate_page()
    write_content(page, 0, b"closing")
    pf.close()
    assert file_bytes(path, pf, 0, 4, 7) == b"closing"


# -- read-only -------------------------------------------------------------------------
@pytest.fixture
def readonly_pf(path):
    pf = PageFile(path, pageSize=256)
    for pid in range(3):
        write_content(pf.allocate_page(), 0, pattern(pid, 50))
    pf.free_page(pf.get_page(2))
    pf.close()
    before = path.read_bytes()
    ro = PageFile(path, readonly=True)
    yield ro
    ro.close()
    assert path.read_bytes() == before


def test_readonly_page_file_reads(readonly_pf):
    assert readonly_pf.page_count == 3
    assert readonly_pf.free_pages() == [2]
    assert read_content(readonly_pf.get_page(1), 0, 50) == pattern(1, 50)
    with readonly_pf.get_page(2).pinned() as page:
        assert page.is_free()


@pytest.mark.parametrize("operation", [
    lambda pf: pf.allocate_page(),
    lambda pf: pf.free_page(pf.get_page(0)),
    lambda pf: pf.buffer_manager.allocate_page(),
    lambda pf: _pinned_call(pf.get_page(0), lambda page: page.set_content(0, b"no")),
    lambda pf: _pinned_call(pf.get_page(0), lambda page: page.clear_content()),
    lambda pf: _pinned_call(pf.get_page(0), lambda page: setattr(page.header, "next_free_pid", 5)),
], ids=["allocate_page", "free_page", "bm.allocate_page", "set_content", "clear_content",
        "header"])
def test_readonly_page_file_refuses_writes(readonly_pf, operation):
    with pytest.raises(ReadOnlyError):
        operation(readonly_pf)
    assert readonly_pf.page_count == 3
    assert readonly_pf.free_pages() == [2]
    assert read_content(readonly_pf.get_page(0), 0, 50) == pattern(0, 50)


def _pinned_call(page, function):
    with page.pinned():
        return function(page)


def test_readonly_open_of_a_missing_file(tmp_path):
    path = tmp_path / "missing.pf"
    with pytest.raises(FileNotFoundError):
        PageFile(path, readonly=True)
    assert not path.exists()


# -- files that are not page files -------------------------------------------------------
@pytest.mark.parametrize("content", [
    b"",
    b"hello, world\n",
    b"\x00" * 10000,
    bytes(range(256)) * 40,
    b"PSTRUC",
    b"SQLite format 3\x00" + bytes(5000),
], ids=["empty", "text", "zeros", "binary", "short-magic", "sqlite"])
@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_opening_a_non_page_file_raises_and_leaves_it_unchanged(tmp_path, content, readonly):
    if content == b"" and not readonly:  # it becomes a page file: test_an_empty_file_becomes_a_page_file
        content = b"\x00" * 5000
    path = tmp_path / "other.bin"
    path.write_bytes(content)
    stat = os.stat(path)
    with pytest.raises(NotAStorageError) as info:
        PageFile(path, readonly=readonly)
    assert str(path) in str(info.value) or os.fspath(path) in str(info.value)
    assert path.read_bytes() == content
    assert os.stat(path).st_size == stat.st_size
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns


def test_an_empty_file_becomes_a_page_file(tmp_path):
    """An existing empty file (tempfile.mkstemp) opened writable is created in place, same inode."""
    path = tmp_path / "empty.pf"
    path.write_bytes(b"")
    inode = os.stat(path).st_ino
    pf = PageFile(path, pageSize=512)
    assert pf.created == "in place"
    page = pf.allocate_page()
    with page.pinned():
        page.set_content(0, b"kept")
    pf.close()
    assert os.stat(path).st_ino == inode
    pf = PageFile(path)
    assert (pf.page_size, pf.page_count, pf.created) == (512, 1, None)
    with pf.get_page(0).pinned() as page:
        assert bytes(page.get_content(0, 4)) == b"kept"
    pf.close()


def test_opening_a_truncated_page_file_raises_and_leaves_it_unchanged(tmp_path):
    path = tmp_path / "trunc.pf"
    pf = PageFile(path, pageSize=256)
    for _ in range(4):
        pf.allocate_page()
    pf.close()
    whole = path.read_bytes()
    for length in (100, 600, 4096 + 256):
        path.write_bytes(whole[:length])
        with pytest.raises((NotAStorageError, CorruptStorageError)):
            PageFile(path)
        assert path.read_bytes() == whole[:length]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_three_ways_of_finding_changed_pages_agree(tmp_path, seed):
    """PAGEMAP_SCAN runs, pagemap entries and comparing with the file find the same pages,
    across segments and with more runs than one scan call returns (512)."""
    import random
    from permastruct import _mapping
    io = FileIO.open(str(tmp_path / "m"), readonly=False, create=True)
    m = _mapping.MappedFile(io, readonly=False)
    try:
        m.grow(1 << 20)
        m.grow(9 << 20)  # a second segment
        rng = random.Random(seed)

        def pages(ranges):
            return {offset + i * _mapping.OS_PAGE for offset, length in ranges
                    for i in range(length // _mapping.OS_PAGE)}

        for round_ in range(3):
            written = set()
            for _ in range(rng.choice([1, 40, 1500])):
                offset = rng.randrange(m.size - 4)
                m.view(offset, 1)[:] = bytes([rng.randrange(1, 256)])
                written.add(offset // _mapping.OS_PAGE * _mapping.OS_PAGE)
            scan_state, pagemap = m._scan, m._pagemap
            found = {}
            if pagemap is not None:
                found["first choice"] = pages(m.dirty_ranges())
                m._scan = None
                found["pagemap entries"] = pages(m.dirty_ranges())
                m._scan = scan_state
            m._pagemap = None
            found["compare"] = pages(m.dirty_ranges())
            m._pagemap = pagemap
            for way, result in found.items():
                assert result >= written, way  # every written page (a page may be written twice)
                assert result == found["compare"], way
            m.write_back(m.dirty_ranges())
            m.release_private()
            assert m.dirty_ranges() == []
    finally:
        m.close()
        io.close()
