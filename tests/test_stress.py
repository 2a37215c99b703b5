"""Seeded random stress tests of allocation, freeing and reuse of space.

Two levels:

* through the public ``Storage``: structures, buffers, byte strings, strings and
  interned strings of sizes from 0 bytes to several pages, shared references,
  overwritten references (which free), random commit / rollback / close+reopen,
  ``p.check()`` after every step and a Python model compared after every step;
* directly on :class:`permastruct._alloc.Allocator` over a ``PageFile``: random
  allocations and frees of 8 bytes .. 5 pages, each object filled with its own
  pattern, so that any overlap or stray write of the allocator shows.

Run longer by hand::

    PYTHONPATH=src python3 -m pytest tests/test_stress.py --seed 7 --iterations 5000
    PERMASTRUCT_STRESS=1 PYTHONPATH=src python3 -m pytest tests/test_stress.py
"""

import copy
import random

import pytest
from conftest import STORE_MODES, open_store, reopen_store

from permastruct import Storage
from permastruct import _format as F
from permastruct._alloc import Allocator
from permastruct.pages import PageFile, PageHeader
from permastruct.strings import new_string

PAGE_SIZES = [256, 512, 4096]

BUFFER_SLOTS = ("b0", "b1", "b2")
BYTES_SLOTS = ("s0", "s1", "s2")
TEXT_SLOTS = ("t0", "t1")
NODE_SLOTS = ("n0", "n1", "n2")
PAIR_SLOTS = ("p0", "p1")
ALL_SLOTS = BUFFER_SLOTS + BYTES_SLOTS + TEXT_SLOTS + NODE_SLOTS + PAIR_SLOTS

#: Overhead charged per live object when computing the live-data bound.
OBJECT_OVERHEAD = 96


class StressStorage(Storage):
    def populateSchema(self):
        s = self.schema

        class Node(s.Structure):
            name = s.ByteString
            data = s.Buffer
            label = s.String
            value = s.Int

        class Pair(s.Structure):
            left = Node
            right = Node
            blob = s.Buffer
            weight = s.Float

        class Root(s.Structure):
            b0 = s.Buffer
            b1 = s.Buffer
            b2 = s.Buffer
            s0 = s.ByteString
            s1 = s.ByteString
            s2 = s.ByteString
            t0 = s.String
            t1 = s.String
            n0 = Node
            n1 = Node
            n2 = Node
            p0 = Pair
            p1 = Pair
            counter = s.Int


# -- the Python model -------------------------------------------------------------------
class BufM:
    """Model of a persistent Buffer (mutable through memoryview, so identity matters)."""

    def __init__(self, data):
        self.data = bytearray(data)


class StrM:
    """Model of a ByteString or String; ``interned`` ones come from the registry."""

    def __init__(self, value, interned=False):
        self.value = value
        self.interned = interned


class NodeM:
    def __init__(self, name=None, data=None, label=None, value=0):
        self.name, self.data, self.label, self.value = name, data, label, value


class PairM:
    def __init__(self, left=None, right=None, blob=None, weight=0.0):
        self.left, self.right, self.blob, self.weight = left, right, blob, weight


def model_size(obj):
    """Bytes an object needs (payload only)."""
    if isinstance(obj, BufM):
        return len(obj.data)
    if isinstance(obj, StrM):
        return len(obj.value.encode("utf-8") if isinstance(obj.value, str) else obj.value)
    return 64


def children(obj):
    if isinstance(obj, NodeM):
        return [obj.name, obj.data, obj.label]
    if isinstance(obj, PairM):
        return [obj.left, obj.right, obj.blob]
    return []


def reachable(model):
    """Every distinct model object reachable from the root slots."""
    seen = {}
    stack = [v for v in model.values() if v is not None]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen[id(obj)] = obj
        stack.extend(children(obj))
    return list(seen.values())


# -- the test driver ---------------------------------------------------------------------
class Driver:
    def __init__(self, path, page_size, rng, mode="file"):
        self.path = path
        self.page_size = page_size
        self.rng = rng
        self.p = open_store(StressStorage, mode, path, pageSize=page_size)
        self.root = self.p.root
        self.p.commit()
        self.model = dict.fromkeys(ALL_SLOTS)
        self.counter = 0
        self.committed = copy.deepcopy((self.model, self.counter))
        self.interned = {}  # value -> payload size, every string ever interned
        self.peak_live = 0
        self.history = []
        # a small vocabulary of interned strings, some larger than a page
        self.vocabulary = [b"alpha", b"beta", b"", b"x" * 300, bytes(range(256)) * 5,
                           "gamma", "\u00e9t\u00e9", "\u2603" * 200, "", "z" * 5000]

    # random values --------------------------------------------------------------
    def size(self):
        rng, ps = self.rng, self.page_size
        kind = rng.random()
        if kind < 0.1:
            return 0
        if kind < 0.45:
            return rng.randint(1, 64)
        if kind < 0.75:
            return rng.randint(65, ps)
        if kind < 0.95:
            return rng.randint(ps + 1, 3 * ps)
        return rng.randint(3 * ps, 6 * ps)

    def payload(self, n):
        return self.rng.randbytes(n)

    def text(self):
        n = self.size() // 2
        alphabet = "abcdefghij \u00e9\u00df\u4e2d\u2603\U0001F600"
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    # making persistent objects from model objects ----------------------------------
    def make_buffer(self, data):
        """A value for a Buffer field: plain bytes-like or a persistent Buffer."""
        choice = self.rng.randrange(4)
        if choice == 0:
            return bytes(data)
        if choice == 1:
            return bytearray(data)
        if choice == 2:
            return memoryview(bytes(data))
        return self.p.schema.Buffer(bytes(data))

    def make_bytes(self, m):
        p = self.p
        if m.interned:
            return p.stringRegistry.get(m.value)
        choice = self.rng.randrange(3)
        if choice == 0:
            return m.value
        if choice == 1:
            return p.schema.ByteString(m.value)
        return p._heap.proxy(new_string(p._heap, F.T_BYTESTRING, m.value))

    def make_text(self, m):
        if m.interned:
            return self.p.stringRegistry.get(m.value)
        return m.value if self.rng.random() < 0.5 else self.p.schema.String(m.value)

    def random_bufm(self):
        return BufM(self.payload(self.size()))

    def random_bytesm(self):
        if self.rng.random() < 0.25:
            value = self.rng.choice([v for v in self.vocabulary if isinstance(v, bytes)])
            self.interned[("b", value)] = len(value)
            return StrM(value, interned=True)
        return StrM(self.payload(self.size()))

    def random_textm(self):
        if self.rng.random() < 0.25:
            value = self.rng.choice([v for v in self.vocabulary if isinstance(v, str)])
            self.interned[("s", value)] = len(value.encode("utf-8"))
            return StrM(value, interned=True)
        return StrM(self.text())

    def maybe(self, factory, p_none=0.2):
        return None if self.rng.random() < p_none else factory()

    def new_node(self):
        """A new NodeM and its persistent Node."""
        m = NodeM(name=self.maybe(self.random_bytesm), data=self.maybe(self.random_bufm),
                  label=self.maybe(self.random_textm), value=self.rng.randint(-2**63, 2**63 - 1))
        kwargs = {"value": m.value}
        if m.name is not None:
            kwargs["name"] = self.make_bytes(m.name)
        if m.data is not None:
            kwargs["data"] = self.make_buffer(m.data.data)
        if m.label is not None:
            kwargs["label"] = self.make_text(m.label)
        return m, self.p.schema.Node(**kwargs)

    def existing_node(self):
        """An existing (model, proxy) node reachable from the root, or None."""
        found = []
        for name in NODE_SLOTS:
            if self.model[name] is not None:
                found.append((self.model[name], lambda name=name: getattr(self.root, name)))
        for name in PAIR_SLOTS:
            pm = self.model[name]
            if pm is not None:
                for side in ("left", "right"):
                    if getattr(pm, side) is not None:
                        found.append((getattr(pm, side),
                                      lambda name=name, side=side: getattr(getattr(self.root, name), side)))
        if not found:
            return None
        m, get = self.rng.choice(found)
        return m, get()

    def some_node(self):
        """A node for a reference: an existing one (shared), a new one, or None."""
        r = self.rng.random()
        if r < 0.4:
            existing = self.existing_node()
            if existing is not None:
                return existing
        if r < 0.85:
            return self.new_node()
        return None, None

    # operations -----------------------------------------------------------------
    def op_set_buffer(self):
        slot = self.rng.choice(BUFFER_SLOTS)
        m = self.random_bufm()
        setattr(self.root, slot, self.make_buffer(m.data))
        self.model[slot] = m
        return f"set {slot} = buffer[{len(m.data)}]"

    def op_set_bytes(self):
        slot = self.rng.choice(BYTES_SLOTS)
        m = self.random_bytesm()
        setattr(self.root, slot, self.make_bytes(m))
        self.model[slot] = m
        return f"set {slot} = bytes[{len(m.value)}]{' interned' * m.interned}"

    def op_set_text(self):
        slot = self.rng.choice(TEXT_SLOTS)
        m = self.random_textm()
        setattr(self.root, slot, self.make_text(m))
        self.model[slot] = m
        return f"set {slot} = str[{len(m.value)}]{' interned' * m.interned}"

    def op_set_node(self):
        slot = self.rng.choice(NODE_SLOTS)
        m, proxy = self.some_node()
        setattr(self.root, slot, proxy)
        self.model[slot] = m
        return f"set {slot} = node"

    def op_set_pair(self):
        slot = self.rng.choice(PAIR_SLOTS)
        left_m, left = self.some_node()
        right_m, right = self.some_node()
        blob_m = self.maybe(self.random_bufm, 0.4)
        m = PairM(left_m, right_m, blob_m, self.rng.uniform(-1e9, 1e9))
        kwargs = {"left": left, "right": right, "weight": m.weight}
        if blob_m is not None:
            kwargs["blob"] = self.make_buffer(blob_m.data)
        setattr(self.root, slot, self.p.schema.Pair(**kwargs))
        self.model[slot] = m
        return f"set {slot} = pair"

    def op_copy_reference(self):
        group = self.rng.choice([BUFFER_SLOTS, BYTES_SLOTS, TEXT_SLOTS, NODE_SLOTS, PAIR_SLOTS])
        src, dst = self.rng.choice(group), self.rng.choice(group)
        setattr(self.root, dst, getattr(self.root, src))
        self.model[dst] = self.model[src]
        return f"set {dst} = {src}"

    def op_clear(self):
        slot = self.rng.choice(ALL_SLOTS)
        setattr(self.root, slot, None)
        self.model[slot] = None
        return f"set {slot} = None"

    def op_mutate_node(self):
        existing = self.existing_node()
        if existing is None:
            return self.op_set_node()
        m, node = existing
        what = self.rng.randrange(4)
        if what == 0:
            m.value = self.rng.randint(-2**63, 2**63 - 1)
            node.value = m.value
        elif what == 1:
            m.name = self.maybe(self.random_bytesm)
            node.name = None if m.name is None else self.make_bytes(m.name)
        elif what == 2:
            m.data = self.maybe(self.random_bufm)
            node.data = None if m.data is None else self.make_buffer(m.data.data)
        else:
            m.label = self.maybe(self.random_textm)
            node.label = None if m.label is None else self.make_text(m.label)
        return f"mutate node field {what}"

    def op_mutate_pair(self):
        slot = self.rng.choice(PAIR_SLOTS)
        pm = self.model[slot]
        if pm is None:
            return self.op_set_pair()
        pair = getattr(self.root, slot)
        side = self.rng.choice(("left", "right"))
        m, proxy = self.some_node()
        setattr(pair, side, proxy)
        setattr(pm, side, m)
        return f"set {slot}.{side}"

    def op_write_buffer_in_place(self):
        candidates = [(slot, self.model[slot]) for slot in BUFFER_SLOTS
                      if self.model[slot] is not None and len(self.model[slot].data)]
        if not candidates:
            return self.op_set_buffer()
        slot, m = self.rng.choice(candidates)
        start = self.rng.randrange(len(m.data))
        end = min(len(m.data), start + self.rng.randint(1, 100))
        data = self.payload(end - start)
        with memoryview(getattr(self.root, slot)) as view:
            view[start:end] = data
        m.data[start:end] = data
        return f"write {slot}[{start}:{end}]"

    def op_garbage(self):
        """Objects that nothing references and whose proxies are dropped at once."""
        p = self.p
        kind = self.rng.randrange(3)
        if kind == 0:
            p.schema.Buffer(bytes(self.size()))
        elif kind == 1:
            p.schema.ByteString(self.payload(self.size()))
        else:
            p.schema.Node(name=self.payload(self.size()), data=bytes(self.size()))
        return "garbage"

    def op_counter(self):
        self.counter += 1
        self.root.counter = self.counter
        return "counter"

    def op_commit(self):
        self.p.commit()
        self.committed = copy.deepcopy((self.model, self.counter))
        return "commit"

    def op_rollback(self):
        self.p.rollback()
        self.model, self.counter = copy.deepcopy(self.committed)
        self.root = self.p.root
        return "rollback"

    def op_reopen(self):
        self.p = reopen_store(self.p, StressStorage, self.path)
        self.committed = copy.deepcopy((self.model, self.counter))
        assert self.p.schema.Root is not None
        self.root = self.p.root
        return "close+reopen"

    OPERATIONS = [
        ("op_set_buffer", 10), ("op_set_bytes", 8), ("op_set_text", 5), ("op_set_node", 8),
        ("op_set_pair", 6), ("op_copy_reference", 5), ("op_clear", 6), ("op_mutate_node", 6),
        ("op_mutate_pair", 4), ("op_write_buffer_in_place", 4), ("op_garbage", 4),
        ("op_counter", 2), ("op_commit", 10), ("op_rollback", 2), ("op_reopen", 3),
    ]

    def step(self):
        names, weights = zip(*self.OPERATIONS)
        name = self.rng.choices(names, weights)[0]
        self.history.append(getattr(self, name)())
        self.history = self.history[-12:]

    # verification ---------------------------------------------------------------
    def live_bytes(self):
        live = sum(model_size(obj) + OBJECT_OVERHEAD for obj in reachable(self.model))
        return live + sum(size + OBJECT_OVERHEAD for size in self.interned.values())

    def verify(self):
        self.p.check()
        self.peak_live = max(self.peak_live, self.live_bytes())
        assert self.root.counter == self.counter
        proxies = {}  # id(model object) -> proxy
        for slot in ALL_SLOTS:
            self.compare(self.model[slot], getattr(self.root, slot), slot, proxies)
        # distinct model objects are distinct persistent objects
        offsets = {}
        for key, proxy in proxies.items():
            offset = proxy._ps_oid
            assert offset not in offsets, "two distinct objects share the offset %#x" % offset
            offsets[offset] = key

    def compare(self, m, proxy, where, proxies):
        if m is None:
            assert proxy is None, f"{where}: expected None, found {proxy!r}"
            return
        assert proxy is not None, f"{where}: expected an object, found None"
        # interned strings are one object per value; any other model object is its own object
        key = ("interned", type(m.value), m.value) if isinstance(m, StrM) and m.interned else id(m)
        seen = proxies.get(key)
        if seen is not None:
            assert proxy.isSameAs(seen), f"{where}: a shared object is no longer shared"
            return
        proxies[key] = proxy
        if isinstance(m, BufM):
            assert len(proxy) == len(m.data), f"{where}: buffer length"
            assert bytes(proxy) == bytes(m.data), f"{where}: buffer contents"
        elif isinstance(m, StrM):
            if isinstance(m.value, str):
                assert str(proxy) == m.value, f"{where}: string contents"
            else:
                assert bytes(proxy) == m.value, f"{where}: byte string contents"
            if m.interned:
                assert proxy.isSameAs(self.p.stringRegistry.get(m.value)), f"{where}: not the interned string"
        elif isinstance(m, NodeM):
            assert type(proxy).__name__ == "Node", where
            assert proxy.value == m.value, f"{where}.value"
            self.compare(m.name, proxy.name, where + ".name", proxies)
            self.compare(m.data, proxy.data, where + ".data", proxies)
            self.compare(m.label, proxy.label, where + ".label", proxies)
        elif isinstance(m, PairM):
            assert type(proxy).__name__ == "Pair", where
            assert proxy.weight == m.weight, f"{where}.weight"
            self.compare(m.left, proxy.left, where + ".left", proxies)
            self.compare(m.right, proxy.right, where + ".right", proxies)
            self.compare(m.blob, proxy.blob, where + ".blob", proxies)
        else:  # pragma: no cover
            raise AssertionError(f"unknown model object {m!r}")


@pytest.mark.parametrize("mode", STORE_MODES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_storage_random_churn(tmp_path, page_size, mode, stress_seed, stress_iterations):
    """Random structures/buffers/strings churn with check() and model comparison after every step
    (in a file, in memory and in an overlay, where close+reopen is a commit)."""
    rng = random.Random(f"{stress_seed}-{page_size}")
    path = tmp_path / "stress.ps"
    driver = Driver(path, page_size, rng, mode)
    step = 0
    try:
        driver.verify()
        for step in range(stress_iterations):
            driver.step()
            driver.verify()
        # end with a clean close and a final reopen: the committed state is the model
        driver.op_reopen()
        driver.verify()
        summary = driver.p.check()
        assert summary["page_size"] == page_size
        file_size = driver.p.fileSize
    except BaseException as exc:
        exc.add_note(f"seed={stress_seed} page_size={page_size} mode={mode} step={step} "
                     f"last ops: {driver.history}")
        raise
    finally:
        driver.p.close()
    # space is reused: the file stays within a generous bound of the peak live data
    bound = 4 * driver.peak_live + 64 * page_size + 256 * 1024
    assert file_size <= bound, (
        f"file grew to {file_size} bytes for at most {driver.peak_live} live bytes "
        f"(bound {bound}; seed={stress_seed}, page_size={page_size})")


@pytest.mark.parametrize("mode", STORE_MODES)
@pytest.mark.parametrize("page_size", [256, 4096])
def test_storage_churn_keeps_file_size_bounded(tmp_path, page_size, mode, stress_seed):
    """Replacing the same few objects over and over must reuse the freed space (3.7), in every mode."""
    rng = random.Random(stress_seed)
    path = tmp_path / "churn.ps"
    p = open_store(StressStorage, mode, path, pageSize=page_size)
    rounds, warmup = 80, 30
    try:
        root = p.root
        sizes = [0, 1, 17, page_size // 2, page_size, page_size + 1, 3 * page_size, 5 * page_size]
        file_sizes, page_counts = [], []
        for rnd in range(rounds):
            for slot in BUFFER_SLOTS:
                setattr(root, slot, rng.randbytes(rng.choice(sizes)))
            for slot in BYTES_SLOTS:
                setattr(root, slot, rng.randbytes(rng.choice(sizes)))
            root.n0 = p.schema.Node(name=rng.randbytes(rng.choice(sizes)), data=bytes(rng.choice(sizes)))
            root.p0 = p.schema.Pair(left=root.n0, right=p.schema.Node(value=rnd), blob=bytes(rng.choice(sizes)))
            p.commit()
            p.check()
            file_sizes.append(p.fileSize)
            page_counts.append(p._page_file.page_count)
        # at most 10 live objects of <= 6 pages, twice that while a commit is pending:
        # about 120 pages; allow 400 pages plus the fixed part of the file
        bound = 4096 + 400 * page_size + 192 * 1024
        assert max(file_sizes) <= bound, f"file grew to {max(file_sizes)} bytes (bound {bound})"
        # after the warm-up the number of pages must level off, not grow with every round
        assert page_counts[-1] <= 1.25 * page_counts[warmup] + 20, (
            f"page count keeps growing under a constant live set: {page_counts[warmup]} pages "
            f"after {warmup} rounds, {page_counts[-1]} after {rounds}")
    finally:
        p.close()


# -- the allocator directly -----------------------------------------------------------------
def _pattern(key, size):
    """A unique, non-repeating-by-object fill for object ``key``."""
    seed = key.to_bytes(4, "little")
    block = bytes(b ^ seed[i % 4] for i, b in enumerate(range(251))) + seed
    return (block * (size // len(block) + 1))[:size]


class AllocDriver:
    def __init__(self, path, page_size, rng):
        self.path = path
        self.rng = rng
        self.pf = PageFile(path, pageSize=page_size)
        self.alloc = Allocator(self.pf)
        self.pf.slots[F.SLOT_ALLOC] = self.alloc.state_pid
        self.live = {}  # offset -> (key, size)
        self.next_key = 1

    @property
    def page_size(self):
        return self.pf.page_size

    def random_size(self):
        ps, r = self.page_size, self.rng.random()
        if r < 0.5:
            return self.rng.randint(8, 128)
        if r < 0.8:
            return self.rng.randint(129, ps)
        return self.rng.randint(ps + 1, 5 * ps)

    def allocate(self, size=None):
        size = self.random_size() if size is None else size
        offset = self.alloc.alloc(size)
        assert offset % 8 == 0, f"object at {offset:#x} is not 8-byte aligned"
        assert offset >= F.HEADER_BLOCK
        assert offset + size <= F.HEADER_BLOCK + self.pf.page_count * self.page_size
        assert self.alloc.capacity(offset) >= size
        assert offset not in self.live, f"offset {offset:#x} handed out twice"
        assert bytes(self.pf.mapping.view(offset, size)) == bytes(size), "new object is not zeroed"
        key = self.next_key
        self.next_key += 1
        self.pf.mapping.view(offset, size)[:] = _pattern(key, size)
        self.live[offset] = (key, size)
        return offset

    def free(self, offset=None):
        if offset is None:
            offset = self.rng.choice(list(self.live))
        del self.live[offset]
        self.alloc.free(offset)

    def reopen(self):
        self.pf.close()
        self.pf = PageFile(self.path)
        self.alloc = Allocator(self.pf, self.pf.slots[F.SLOT_ALLOC])

    def verify(self):
        spans = sorted((offset, offset + size) for offset, (_, size) in self.live.items())
        for (a_lo, a_hi), (b_lo, b_hi) in zip(spans, spans[1:]):
            assert a_hi <= b_lo, f"objects {a_lo:#x}..{a_hi:#x} and {b_lo:#x}..{b_hi:#x} overlap"
        for offset, (key, size) in self.live.items():
            got = bytes(self.pf.mapping.view(offset, size))
            if got != _pattern(key, size):
                first = next(i for i, (x, y) in enumerate(zip(got, _pattern(key, size))) if x != y)
                raise AssertionError(f"object {key} at {offset:#x} ({size} bytes) was overwritten "
                                     f"at byte {first}")
        self.account(expect_empty=False)

    def account(self, expect_empty):
        """Every page is exactly one of: free page, free run, allocator state, or in use."""
        pf = self.pf
        owner = {}
        for pid in pf.free_pages():
            assert pid not in owner, f"page {pid} twice on the free-page list"
            owner[pid] = "free page"
        for pid, length in self.alloc.free_runs():
            assert length >= 1
            for member in range(pid, pid + length):
                assert member not in owner, f"page {member} is both {owner[member]} and in free run {pid}"
                owner[member] = "free run"
        assert self.alloc.state_pid not in owner
        owner[self.alloc.state_pid] = "allocator"
        used_pages = set()
        for offset, (_, size) in self.live.items():
            first = pf.page_of(offset)
            last = pf.page_of(offset + max(size, 1) - 1)
            for pid in range(first, last + 1):
                assert owner.get(pid) is None, f"live object {offset:#x} is on page {pid}, which is {owner[pid]}"
                used_pages.add(pid)
        # the first page of every live object is a page in use (3.9: NOT_IN_FREE_PAGE_LIST);
        # later pages of a multi-page object hold object bytes where a header would be
        for offset in self.live:
            pid = pf.page_of(offset)
            with pf.get_page(pid).pinned() as page:
                assert page.header.next_free_pid == PageHeader.NOT_IN_FREE_PAGE_LIST, (
                    f"page {pid}, holding the start of live object {offset:#x}, has header "
                    f"{page.header.next_free_pid}")
        # pages on the free-page list say so; the first page of a free run does not
        for pid, what in owner.items():
            with pf.get_page(pid).pinned() as page:
                if what == "free page":
                    assert page.is_free(), f"page {pid} is on the free-page list but not marked free"
        for pid, _ in self.alloc.free_runs():
            with pf.get_page(pid).pinned() as page:
                assert not page.is_free(), f"free run {pid} is marked as on the free-page list"
        # every page is accounted for: free, in a free run, the allocator's, or holding live bytes
        missing = [pid for pid in range(pf.page_count) if pid not in owner and pid not in used_pages]
        if expect_empty:
            assert not used_pages
        assert not missing, (f"pages {missing[:10]} are neither free, nor in a free run, nor the "
                             f"allocator's, nor holding a live object ({len(self.live)} live)")
        return owner


@pytest.mark.parametrize("page_size", [256, 512, 4096])
def test_allocator_random_alloc_free(tmp_path, page_size, stress_seed, stress_iterations):
    rng = random.Random(f"alloc-{stress_seed}-{page_size}")
    d = AllocDriver(tmp_path / "alloc.pf", page_size, rng)
    step = 0
    try:
        max_live = 60
        for step in range(stress_iterations * 4):
            if d.live and (len(d.live) >= max_live or rng.random() < 0.45):
                d.free()
            else:
                d.allocate()
            if step % 7 == 0:
                d.verify()
            if rng.random() < 0.02:
                d.reopen()
                d.verify()
        d.verify()
        peak_pages = d.pf.page_count
        # free everything: every page ends on the free-page list or the free-run list
        for offset in list(d.live):
            d.free(offset)
            if rng.random() < 0.1:
                d.verify()
        d.account(expect_empty=True)
        d.reopen()
        d.account(expect_empty=True)
        assert d.pf.page_count == peak_pages
        # the freed space is reused: one object of every size class needs no new page
        before = d.pf.page_count
        for size in d.alloc.classes:
            d.allocate(size)
        assert d.pf.page_count == before
        d.verify()
    except BaseException as exc:
        exc.add_note(f"seed={stress_seed} page_size={page_size} step={step}")
        raise
    finally:
        d.pf.close()


def test_allocator_reuses_free_runs(tmp_path):
    d = AllocDriver(tmp_path / "runs.pf", 256, random.Random(0))
    try:
        five = d.allocate(5 * 256 - 100)
        fence = d.allocate(3 * 256)  # keeps the run from being at the end of the file
        d.free(five)
        count = d.pf.page_count
        runs = d.alloc.free_runs()
        assert sum(length for _, length in runs) + d.pf.free_page_count() >= 5
        a = d.allocate(2 * 256)  # 3 pages with the run header
        assert d.pf.page_count == count, "a free run of 5 pages was not reused for 3"
        b = d.allocate(256 - 100)  # 1 page from what is left
        assert d.pf.page_count == count, "the rest of a free run was not reused"
        d.verify()
        d.free(a)
        d.free(b)
        d.free(fence)
        d.account(expect_empty=True)
    finally:
        d.pf.close()


@pytest.mark.parametrize("page_size", [256, 4096])
def test_allocator_reuses_freed_single_page_runs(tmp_path, page_size):
    """An object that needs one whole page, allocated and freed in a loop, must not grow the file."""
    d = AllocDriver(tmp_path / "single.pf", page_size, random.Random(3))
    try:
        size = page_size // 2 + 8  # too big for a slab, fits one page with the run header
        assert size > d.alloc.max_small
        d.free(d.allocate(size))
        count = d.pf.page_count
        for _ in range(10):
            d.free(d.allocate(size))
            d.account(expect_empty=True)
        assert d.pf.page_count == count, (
            f"each allocation of a one-page object took a new page: {count} -> {d.pf.page_count} pages, "
            f"free-page list {d.pf.free_pages()}")
    finally:
        d.pf.close()


def test_allocator_reuses_slab_slots(tmp_path):
    d = AllocDriver(tmp_path / "slabs.pf", 512, random.Random(1))
    try:
        first = [d.allocate(24) for _ in range(200)]
        count = d.pf.page_count
        for offset in first[::2]:
            d.free(offset)
        d.verify()
        again = [d.allocate(24) for _ in range(100)]
        assert d.pf.page_count == count, "freed slots were not reused"
        d.verify()
        for offset in list(d.live):
            d.free(offset)
        d.account(expect_empty=True)
        # all slab pages went back to the free-page list
        assert d.pf.free_page_count() == d.pf.page_count - 1
        with d.pf.get_page(d.pf.free_pages()[0]).pinned() as page:
            assert page.header.next_free_pid != PageHeader.NOT_IN_FREE_PAGE_LIST
    finally:
        d.pf.close()


def test_allocator_state_survives_reopen(tmp_path):
    d = AllocDriver(tmp_path / "reopen.pf", 256, random.Random(2))
    try:
        offsets = [d.allocate(size) for size in (8, 100, 200, 300, 1000, 16, 16, 600)]
        d.free(offsets[1])
        d.free(offsets[4])
        d.reopen()
        d.verify()
        count = d.pf.page_count
        d.allocate(100)
        d.allocate(700)
        assert d.pf.page_count == count
        d.verify()
    finally:
        d.pf.close()


def test_large_object_after_rollback_near_a_segment_end(tmp_path):
    """After a rollback shrinks the page count back below a segment boundary, a multi-page
    object placed at the end of the file must still be usable (not straddle two segments)."""
    p = StressStorage(tmp_path / "rollback.ps", pageSize=4096)
    try:
        root = p.root
        p.commit()
        pf, mapping = p._page_file, p._heap.mapping
        keep = []
        # fill until the last mapped segment has exactly one unused page left
        while pf.offset(pf.page_count) + pf.page_size < mapping.size:
            keep.append(p.schema.Buffer(bytes(3000)))
        root.b0 = keep[-1]
        p.commit()
        root.b1 = bytes(10 * 4096)  # needs more room: the file grows by a segment
        p.rollback()
        root = p.root
        data = bytes(range(256)) * 32  # 8 KiB: a 3-page run starting on the last old page
        root.b1 = data
        assert bytes(root.b1) == data
        p.check()
        p.commit()
        p.check()
        assert bytes(root.b1) == data
    finally:
        p.close()
