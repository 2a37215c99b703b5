"""The page-run allocator: free runs in bins, merging of free space, reuse of the file's end.

Contract: DESIGN.md 3.7 (a long churn keeps the file size bounded), 3.8 (check(),
commit/rollback), 3.9 (the free-page list) and 4 (``_alloc``); the layout is in
``permastruct._format`` (``ALLOC``, ``RUN_BIN_MIN``, ``MERGE``).

Most tests drive :class:`permastruct._alloc.Allocator` over a bare ``PageFile``
(``Heap`` below keeps a model of the live objects and checks that every page is
accounted for exactly once); the churn tests also go through ``Storage`` with
``check()`` after every step.  Seeded tests take ``--seed`` / ``--iterations``.
"""

from permastruct._mapping import OS_PAGE
import random

import pytest

from permastruct import Storage
from permastruct import _format as F
from permastruct._alloc import Allocator, _bin_of
from permastruct.errors import CorruptStorageError
from permastruct.pages import PageFile


def run_bytes(page_size, pages):
    """The size of an object that needs exactly ``pages`` pages."""
    return pages * page_size - F.RUN_OBJECT


def fill(key, size):
    """Distinct bytes for object ``key``, so that an overlap or a stray write shows."""
    block = key.to_bytes(4, "little") + bytes(range(key % 7, 251, 7))
    return (block * (size // len(block) + 1))[:size]


class Heap:
    """An allocator over a page file, with a model of the live objects."""

    def __init__(self, path, page_size, initial_size=None):
        self.path = path
        self.pf = PageFile(path, pageSize=page_size, sync=False, initial_size=initial_size)
        self.alloc = Allocator(self.pf)
        self.pf.slots[F.SLOT_ALLOC] = self.alloc.state_pid
        self.live = {}  # offset -> (key, size)
        self.next_key = 1
        self.commit()  # as Storage does: the allocator page exists in every committed state

    @property
    def page_size(self):
        return self.pf.page_size

    @property
    def page_count(self):
        return self.pf.page_count

    def new(self, size):
        offset = self.alloc.alloc(size)
        assert offset not in self.live
        assert bytes(self.pf.mapping.view(offset, size)) == bytes(size), "a new object is not zeroed"
        key, self.next_key = self.next_key, self.next_key + 1
        self.pf.mapping.view(offset, size)[:] = fill(key, size)
        self.live[offset] = (key, size)
        return offset

    def run(self, pages):
        """A new object of exactly ``pages`` pages; returns its first page id."""
        return self.pf.page_of(self.new(run_bytes(self.page_size, pages)))

    def offset_of(self, pid):
        return self.pf.offset(pid) + F.RUN_OBJECT

    def free(self, offset):
        del self.live[offset]
        self.alloc.free(offset)

    def free_run(self, pid):
        self.free(self.offset_of(pid))

    def commit(self):
        self.pf.flush()
        self.committed = dict(self.live)

    def rollback(self):
        self.pf.discard()
        self.live = dict(self.committed)

    def reopen(self, readonly=False):
        self.pf.close()
        self.committed = dict(self.live)
        self.pf = PageFile(self.path, readonly=readonly)
        self.alloc = Allocator(self.pf, self.pf.slots[F.SLOT_ALLOC])

    def close(self):
        self.pf.close()

    def runs(self):
        return sorted(self.alloc.free_runs())

    def check(self):
        """Every page is exactly one of: free page, free run, allocator page, slab, live run."""
        pf, alloc = self.pf, self.alloc
        count = pf.page_count
        owner = {}

        def claim(pid, what):
            assert 0 <= pid < count, f"{what} names page {pid} of {count}"
            assert pid not in owner, f"page {pid} is both {owner[pid]} and {what}"
            owner[pid] = what

        for pid in pf.free_pages():
            claim(pid, "free page")
            assert pf._link(pid) != F.NOT_IN_FREE_PAGE_LIST, f"free page {pid} is marked in use"
        starts = {pf.page_of(s.start) for s in pf.mapping.segments if s.start > F.HEADER_BLOCK}
        for pid, length in alloc.free_runs():
            assert length >= 2
            assert pf._link(pid) == F.NOT_IN_FREE_PAGE_LIST, f"free run {pid} has header {pf._link(pid)}"
            for member in range(pid, pid + length):
                claim(member, f"free run {pid}")
                assert member == pid or member not in starts, f"free run {pid} crosses a segment start"
        claim(alloc.state_pid, "allocator")
        for offset, (key, size) in self.live.items():
            pid = pf.page_of(offset)
            assert pf._link(pid) == F.NOT_IN_FREE_PAGE_LIST
            if size > alloc.max_small:
                length = F.RUN.unpack_from(pf.view(pid), F.RUN_AT)[1]
                assert offset == pf.offset(pid) + F.RUN_OBJECT and length * self.page_size >= size + F.RUN_OBJECT
                for member in range(pid, pid + length):
                    claim(member, f"run {pid}")
            elif owner.get(pid) != "slab":
                claim(pid, "slab")
            got = bytes(pf.mapping.view(offset, size))
            assert got == fill(key, size), f"object {key} at {offset:#x} was overwritten"
        missing = [pid for pid in range(count) if pid not in owner]
        # pages of slabs whose objects are all gone are freed at once, so nothing else is left
        assert not missing, f"pages {missing[:10]} are neither free nor in use ({count} pages)"
        return owner

    def free_pages(self):
        return self.pf.free_pages()


@pytest.fixture(params=[256, 4096], ids=lambda size: f"page{size}")
def heap(request, tmp_path):
    h = Heap(tmp_path / "heap.pf", request.param, initial_size=1 << 20)
    yield h
    h.close()


# -- bins ------------------------------------------------------------------------------------
def test_bins_cover_every_length_once():
    assert F.RUN_BIN_MIN[0] == 2
    assert list(F.RUN_BIN_MIN) == sorted(set(F.RUN_BIN_MIN))
    for length in range(2, 5000):
        index = _bin_of(length)
        assert F.RUN_BIN_MIN[index] <= length
        assert index == len(F.RUN_BIN_MIN) - 1 or length < F.RUN_BIN_MIN[index + 1]


def test_freed_runs_are_reused_by_size(heap):
    small, fence1, big, fence2 = heap.run(2), heap.run(1), heap.run(9), heap.run(1)
    heap.free_run(small)
    heap.free_run(big)
    count = heap.page_count
    # a 2-page request takes the 2-page run, not a piece of the 9-page one
    assert heap.run(2) == small
    assert heap.runs() == [(big, 9)]
    # a 4-page request takes the low end of the 9-page run; the rest stays free
    assert heap.run(4) == big
    assert heap.runs() == [(big + 4, 5)]
    assert heap.page_count == count
    heap.check()


def test_one_page_requests_use_free_runs_before_growing(heap):
    first, fence = heap.run(3), heap.run(1)
    heap.free_run(first)
    assert heap.free_pages() == []
    count = heap.page_count
    a = heap.run(1)  # a one-page object
    b = heap.new(16)  # a slab page
    c = heap.run(1)
    assert {a, heap.pf.page_of(b), c} == {first, first + 1, first + 2}
    assert heap.page_count == count
    assert heap.runs() == [] and heap.free_pages() == []
    heap.check()


# -- merging ---------------------------------------------------------------------------------
def test_adjacent_free_runs_merge(heap):
    a, b, fence = heap.run(3), heap.run(4), heap.run(2)
    heap.free_run(a)
    heap.free_run(b)
    assert heap.runs() == [(a, 3), (b, 4)]
    result = heap.alloc.merge()
    assert result["runs"] == 1 and result["released"] == 0
    assert heap.runs() == [(a, 7)]
    heap.check()
    count = heap.page_count
    assert heap.run(7) == a
    assert heap.page_count == count
    heap.check()


def test_a_request_that_only_joined_runs_fit_merges(heap):
    a, b, c, fence = heap.run(2), heap.run(3), heap.run(2), heap.run(1)
    for pid in (b, a, c):
        heap.free_run(pid)
    count = heap.page_count
    assert heap.run(7) == a, "the three neighbouring free runs were not joined for a 7-page object"
    assert heap.page_count == count
    heap.check()


def test_free_pages_next_to_runs_merge(heap):
    one, run, slab_object, other, fence = heap.run(1), heap.run(3), heap.new(16), heap.run(1), heap.run(1)
    slab = heap.pf.page_of(slab_object)
    assert (run, slab, other) == (one + 1, one + 4, one + 5)
    heap.free_run(one)
    heap.free_run(run)
    heap.free(slab_object)  # the slab's last object: its page goes on the free-page list
    heap.free_run(other)
    assert sorted(heap.free_pages()) == [one, slab, other]
    heap.alloc.merge()
    assert heap.free_pages() == []
    assert heap.runs() == [(one, 6)]
    heap.check()
    count = heap.page_count
    assert heap.run(6) == one
    assert heap.page_count == count
    heap.check()


def test_single_pages_keep_their_order_and_are_not_rewritten(heap):
    pids = [heap.run(1) for _ in range(9)]
    for pid in (pids[6], pids[0], pids[3], pids[4], pids[2]):
        heap.free_run(pid)
    assert heap.free_pages() == [pids[2], pids[4], pids[3], pids[0], pids[6]]
    heap.alloc.merge()
    # 2, 3 and 4 became a run; 6 and 0 stay single pages, in their order
    assert heap.free_pages() == [pids[0], pids[6]]
    assert heap.runs() == [(pids[2], 3)]
    heap.check()


def test_free_space_at_the_end_is_reused(heap):
    a, b = heap.run(2), heap.run(3)
    count = heap.page_count
    assert count == b + 3
    heap.free_run(b)
    # 5 pages fit nowhere; the free run at the end is given back and the object starts there
    assert heap.run(5) == b
    assert heap.page_count == b + 5
    heap.check()
    heap.free_run(b)
    heap.free_run(a)
    heap.alloc.merge()
    # everything is free: only the allocator page is left
    assert heap.page_count == heap.alloc.state_pid + 1
    assert heap.runs() == [] and heap.free_pages() == []
    heap.check()
    heap.commit()
    heap.reopen()
    assert heap.page_count == heap.alloc.state_pid + 1
    assert heap.run(4) == heap.alloc.state_pid + 1
    heap.check()


def test_free_pages_at_the_end_are_released_through_several_extents(tmp_path):
    h = Heap(tmp_path / "end.pf", 256, initial_size=1 << 20)
    try:
        pids = [h.run(1) for _ in range(6)]
        keep = h.new(16)  # a slab page after them
        tail = [h.run(2) for _ in range(3)]
        for pid in pids + tail:
            h.free_run(pid)
        h.free(keep)
        result = h.alloc.merge()
        assert result["released"] == 6 + 1 + 6
        assert h.page_count == pids[0]
        h.check()
    finally:
        h.close()


def test_runs_never_join_across_a_segment_boundary(tmp_path):
    h = Heap(tmp_path / "segments.pf", 256)  # no initial size: the map grows in segments
    try:
        segments = len(h.pf.mapping.segments)
        while len(h.pf.mapping.segments) == segments:
            h.run(1)
        boundary = h.pf.page_of(h.pf.mapping.segments[-1].start)
        while h.page_count < boundary + 3:
            h.run(1)
        for pid in (boundary - 2, boundary - 1, boundary, boundary + 1):
            h.free_run(pid)
        h.alloc.merge()
        assert h.runs() == [(boundary - 2, 2), (boundary, 2)], "a free run crosses a segment boundary"
        h.check()
        # a 4-page object must not be put across the boundary
        placed = h.run(4)
        assert not placed < boundary < placed + 4
        assert len(h.pf.mapping.view(h.offset_of(placed), run_bytes(256, 4))) == run_bytes(256, 4)
        h.check()
        # reopened, the whole file is one segment: the two runs join
        h.commit()
        h.reopen()
        h.alloc.merge()
        assert (boundary - 2, 4) in h.runs()
        h.check()
    finally:
        h.close()


def test_merging_is_amortised(tmp_path):
    """A merge runs only after as many new list entries as half of what the last one left."""
    h = Heap(tmp_path / "amortised.pf", 256, initial_size=4 << 20)
    try:
        pids = [h.run(1) for _ in range(400)]
        for pid in pids[1::2]:
            h.free_run(pid)  # 200 single free pages, none next to another
        merges = []
        original = h.alloc.merge
        h.alloc.merge = lambda: merges.append(1) or original()
        remaining = pids[0::2]
        for step in range(100):
            h.free_run(remaining[step])  # joins two or three pages: runs of at most 3
            h.run(8)  # never fits: asks for a merge, then grows
        assert 1 <= len(merges) <= 2, f"{len(merges)} merges for 100 failing requests"
        h.check()
    finally:
        h.close()


def test_merge_with_nothing_to_join_writes_nothing(heap):
    pids = [heap.run(1) for _ in range(6)]
    heap.free_run(pids[1])
    heap.free_run(pids[3])
    heap.commit()
    assert heap.pf.uncommitted() == []
    heap.alloc.merge()
    dirty = heap.pf.uncommitted()
    state = heap.pf.offset(heap.alloc.state_pid)
    assert dirty and all(start <= state < start + OS_PAGE for start in dirty), dirty


# -- commit, rollback, reopen ------------------------------------------------------------------
def test_merge_and_released_end_are_undone_by_rollback(heap):
    a, b, c = heap.run(2), heap.run(3), heap.run(2)
    heap.free_run(a)
    heap.free_run(c)
    heap.commit()
    count, runs, free = heap.page_count, heap.runs(), heap.free_pages()
    heap.free_run(b)
    heap.run(9)  # merges a, b, c; the joined 7 pages are at the end: released, then 9 pages taken
    assert heap.page_count == a + 9
    heap.check()
    heap.rollback()
    assert (heap.page_count, heap.runs(), heap.free_pages()) == (count, runs, free)
    heap.check()
    # the same again, committed this time, then reopened
    heap.free_run(b)
    nine = heap.run(9)
    heap.commit()
    heap.reopen()
    assert heap.page_count == nine + 9
    heap.check()


def test_allocator_state_is_read_from_the_file_after_rollback(heap):
    # the first merge of a file is undone by the rollback; nothing about it may linger in memory
    a, b, fence = heap.run(2), heap.run(2), heap.run(1)
    heap.commit()
    heap.free_run(a)
    heap.free_run(b)
    heap.alloc.merge()
    heap.rollback()
    heap.check()
    heap.free_run(b)
    assert heap.runs() == [(b, 2)]
    assert heap.run(2) == b
    heap.check()


def test_readonly_allocator_reads_the_free_runs(tmp_path):
    h = Heap(tmp_path / "ro.pf", 512, initial_size=1 << 20)
    try:
        a, fence, b, fence2 = h.run(3), h.run(1), h.run(12), h.run(1)
        h.free_run(a)
        h.free_run(b)
        runs = h.runs()
        h.reopen(readonly=True)
        assert h.runs() == runs
        h.check()
    finally:
        h.close()


def make_legacy(h):
    """Rewrite the allocator page as files written before the bins had it: every run on one list."""
    runs = h.runs()
    view = h.pf.view(h.alloc.state_pid)
    view[F.ALLOC_AT + 1] = 0
    view[F.RUN_BINS_AT:F.MERGE_AT + F.MERGE.size] = bytes(F.MERGE_AT + F.MERGE.size - F.RUN_BINS_AT)
    following = -1
    for pid, length in reversed(runs):
        F.FREE_RUN.pack_into(h.pf.view(pid), F.RUN_AT, F.KIND_FREE_RUN, length, following)
        following = pid
    F.INT32.pack_into(view, F.ALLOC_AT + 8, following)
    return runs


def test_files_without_bins_are_read_and_upgraded(tmp_path):
    h = Heap(tmp_path / "legacy.pf", 256, initial_size=1 << 20)
    try:
        pids = [h.run(n) for n in (2, 1, 5, 1, 3, 1, 2, 1)]
        for pid in pids[0::2]:
            h.free_run(pid)
        runs = make_legacy(h)
        h.commit()
        h.reopen(readonly=True)
        assert h.runs() == runs
        h.check()
        h.reopen()
        assert h.runs() == runs
        count = h.page_count
        assert h.run(4) == pids[2], "the first run that fits on the old list is used"
        assert h.pf.view(h.alloc.state_pid)[F.ALLOC_AT + 1] == F.ALLOC_BINNED
        h.check()
        # a rollback undoes the set-up of the bins; the allocator copes with either
        h.rollback()
        assert h.pf.view(h.alloc.state_pid)[F.ALLOC_AT + 1] == 0
        assert h.runs() == runs
        for size in (2, 5, 3, 2):
            h.run(size)
        assert h.page_count == count
        h.check()
        h.commit()
        h.reopen()
        h.check()
    finally:
        h.close()


# -- corrupt lists -------------------------------------------------------------------------------
@pytest.fixture
def two_runs(tmp_path):
    h = Heap(tmp_path / "corrupt.pf", 256, initial_size=1 << 20)
    a, fence, b, fence2 = h.run(3), h.run(1), h.run(3), h.run(1)
    h.free_run(a)
    h.free_run(b)  # the bin of 3-page runs: b -> a
    yield h, a, b
    h.close()


def corrupt_ops(h):
    """Calls that must read both runs (the allocation takes b, then needs a)."""
    def allocate_both():
        h.alloc.alloc(run_bytes(256, 3))
        h.alloc.alloc(run_bytes(256, 3))
    return [h.alloc.free_runs, h.alloc.merge, allocate_both]


def test_a_cycle_on_a_bin_list_is_reported_not_followed(two_runs):
    h, a, b = two_runs
    F.INT32.pack_into(h.pf.view(a), F.RUN_AT + 8, b)  # a -> b -> a
    for op in corrupt_ops(h)[:2]:
        with pytest.raises(CorruptStorageError, match="cycle"):
            op()
    # allocation takes b, then a, then finds b (now in use) on the list again
    with pytest.raises(CorruptStorageError, match=f"page {b} on the free-run list is not a free run"):
        for _ in range(3):
            h.alloc.alloc(run_bytes(256, 3))


@pytest.mark.parametrize("damage, words", [
    (lambda h, a, b: F.INT32.pack_into(h.pf.view(b), F.RUN_AT + 8, 10 ** 6), "links to page 1000000"),
    (lambda h, a, b: F.INT32.pack_into(h.pf.view(b), F.RUN_AT + 8, -7), "links to page -7"),
    (lambda h, a, b: F.UINT32.pack_into(h.pf.view(a), F.RUN_AT + 4, 10 ** 6), "is not a free run"),
    (lambda h, a, b: F.UINT32.pack_into(h.pf.view(a), F.RUN_AT + 4, 1), "is not a free run"),
    (lambda h, a, b: h.pf.view(a).__setitem__(F.RUN_AT, F.KIND_SLAB), "is not a free run"),
], ids=["next-outside", "next-negative", "too-long", "too-short", "wrong-kind"])
def test_a_damaged_free_run_is_reported(two_runs, damage, words):
    h, a, b = two_runs
    damage(h, a, b)
    for op in corrupt_ops(h):
        with pytest.raises(CorruptStorageError, match=words):
            op()


def test_a_run_on_the_wrong_bin_is_reported(two_runs):
    h, a, b = two_runs
    F.UINT32.pack_into(h.pf.view(a), F.RUN_AT + 4, 2)
    with pytest.raises(CorruptStorageError, match=f"free run {a} of 2 pages is on the list for runs of 3"):
        h.alloc.free_runs()


def test_a_page_on_both_lists_is_reported_by_merge(two_runs):
    h, a, b = two_runs
    h.pf.free_pid(a + 1)  # inside the free run at a
    with pytest.raises(CorruptStorageError, match=f"page {a + 1} is on the free lists twice"):
        h.alloc.merge()


def test_a_cycle_on_the_free_page_list_is_reported_by_merge(two_runs):
    h, a, b = two_runs
    h.pf.free_pid(a - 1)
    h.pf.free_pid(b - 1)
    h.pf._set_link(a - 1, b - 1)  # b-1 -> a-1 -> b-1
    with pytest.raises(CorruptStorageError, match="free-page list is broken"):
        h.alloc.merge()


def test_freeing_a_run_with_a_damaged_length_is_reported(tmp_path):
    h = Heap(tmp_path / "len.pf", 256, initial_size=1 << 20)
    try:
        pid = h.run(3)
        F.UINT32.pack_into(h.pf.view(pid), F.RUN_AT + 4, 10 ** 6)
        with pytest.raises(CorruptStorageError, match=f"run at page {pid}"):
            h.alloc.free(h.offset_of(pid))
        with pytest.raises(CorruptStorageError, match="outside the pages"):
            h.alloc.free(h.pf.offset(h.page_count + 5))
    finally:
        h.close()


# -- churn -------------------------------------------------------------------------------------
def pages_of(alloc, size):
    if size <= alloc.max_small:
        return size / alloc.page_size
    return -(-(size + F.RUN_OBJECT) // alloc.page_size)


@pytest.mark.parametrize("page_size", [256, 4096])
def test_allocator_churn_keeps_the_page_count_bounded(tmp_path, page_size, stress_seed, stress_iterations):
    """Mixed-size alloc/free churn with commit, rollback and reopen; every page accounted for
    after every step, and the page count levels off instead of growing with the churn."""
    rng = random.Random(f"churn-{stress_seed}-{page_size}")
    h = Heap(tmp_path / "churn.pf", page_size)
    ps = page_size
    sizes = [lambda: rng.randint(8, h.alloc.max_small), lambda: rng.randint(h.alloc.max_small + 1, ps),
             lambda: rng.randint(ps, 4 * ps), lambda: rng.randint(4 * ps, 16 * ps),
             lambda: rng.choice([2, 4, 8, 16, 32]) * ps - F.RUN_OBJECT]  # doubling arrays
    max_live_pages = 60
    steps = stress_iterations * 4
    counts = []
    peak_live = 0.0
    step = 0
    try:
        for step in range(steps):
            live_pages = sum(pages_of(h.alloc, size) for _, size in h.live.values())
            roll = rng.random()
            if h.live and (live_pages > max_live_pages or roll < 0.45):
                h.free(rng.choice(list(h.live)))
            else:
                h.new(rng.choice(sizes)())
            peak_live = max(peak_live, live_pages)
            roll = rng.random()
            if roll < 0.05:
                h.commit()
            elif roll < 0.08:
                h.rollback()
            elif roll < 0.10:
                h.reopen()
            h.check()
            counts.append(h.page_count)
        # fragmentation costs a small factor of the live data, which does not grow with the churn
        assert max(counts) <= 3 * peak_live + 64, f"{max(counts)} pages for at most {peak_live:.0f} live pages"
        half = len(counts) // 2
        assert max(counts[half:]) <= max(counts[:half]) + peak_live / 2 + 32, (
            f"the page count keeps growing: at most {max(counts[:half])} pages in the first half, "
            f"{max(counts[half:])} in the second (at most {peak_live:.0f} live pages)")
    except BaseException as exc:
        exc.add_note(f"seed={stress_seed} page_size={page_size} step={step}")
        raise
    finally:
        h.close()


class ChurnStorage(Storage):
    def populateSchema(self):
        s = self.schema

        class Item(s.Structure):
            data = s.Buffer
            name = s.ByteString

        class Root(s.Structure):
            a = s.Buffer
            b = s.Buffer
            c = s.ByteString
            d = s.ByteString
            item = Item


def model_pages(model, page_size):
    """Pages the objects of a model need, about (a run's header and the object header included)."""
    total = 0.0
    for name, value in model.items():
        for data in (value if name == "item" else (value,)):
            size = len(data) + 64
            total += -(-(size + F.RUN_OBJECT) // page_size) if size > page_size // 2 else size / page_size
    return total


@pytest.mark.parametrize("page_size", [256, 4096])
def test_storage_churn_with_rollback_and_reopen(tmp_path, page_size, stress_seed, stress_iterations):
    """Replacing objects of mixed sizes, with commits, rollbacks and reopens: check() after every
    step, the data as written, and a page count that stays within the live data seen so far."""
    rng = random.Random(f"storage-churn-{stress_seed}-{page_size}")
    path = tmp_path / "churn.ps"
    p = ChurnStorage(path, pageSize=page_size)
    ps = page_size
    sizes = [0, 5, 40, ps // 2, ps, ps + 1, 2 * ps, 3 * ps + 7, 6 * ps, 13 * ps]
    model = committed = {}
    peak = 0.0
    step = 0

    def value(name):
        if name == "item":
            return bytes(p.root.item.data), bytes(p.root.item.name)
        return bytes(getattr(p.root, name))

    try:
        for step in range(stress_iterations):
            name = rng.choice(["a", "b", "c", "d", "item"])
            data = rng.randbytes(rng.choice(sizes))
            if name == "item":
                label = data[:rng.choice(sizes)]
                p.root.item = p.schema.Item(data=data, name=label)
                model = dict(model, item=(data, label))
            else:
                setattr(p.root, name, data)
                model = dict(model, **{name: data})
            roll = rng.random()
            if roll < 0.5:
                p.commit()
                committed = model
            elif roll < 0.6:
                p.rollback()
                model = committed
            elif roll < 0.65:
                p.close()
                p = ChurnStorage(path)
                committed = model
            p.check()
            for key, expected in model.items():
                assert value(key) == expected, f"{key} after step {step}"
            # objects replaced since the last commit are freed only at the next one: the committed
            # and the current objects can both be live
            peak = max(peak, model_pages(model, ps) + model_pages(committed, ps))
            count = p._page_file.page_count
            assert count <= 1.5 * peak + 64, (
                f"{count} pages after step {step}, for at most {peak:.0f} pages of live objects so far")
        p.commit()
        p.check()
    except BaseException as exc:
        exc.add_note(f"seed={stress_seed} page_size={page_size} step={step}")
        raise
    finally:
        p.close()


def test_a_run_that_does_not_fit_the_last_segment_leaves_its_room_as_one_free_run(tmp_path):
    h = Heap(tmp_path / "room.pf", 256)
    try:
        segments = len(h.pf.mapping.segments)
        while len(h.pf.mapping.segments) == segments:
            h.run(1)
        boundary = h.pf.page_of(h.pf.mapping.segments[-1].start)
        end = h.pf.page_of(h.pf.mapping.size)
        while h.page_count < end - 10:
            h.run(1)
        first = h.page_count
        placed = h.run(12)  # 10 pages are left in the segment: not enough
        assert placed >= end and h.pf.page_of(h.pf.mapping.segments[-1].start) == end
        assert (first, 10) in h.runs() and first not in h.free_pages()
        assert boundary < first
        h.check()
        # a merge released the end of the file into an old segment: the same happens again
        h.free_run(placed)
        h.free_run(first - 1)
        h.alloc.merge()
        assert h.page_count == first - 1
        again = h.run(14)
        assert again >= end
        assert (first - 1, 11) in h.runs()
        h.check()
    finally:
        h.close()
