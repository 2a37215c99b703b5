"""``p.objects(cls)`` and ``p.pack()``: every object of a type, and garbage collection from the root.

Contract: DESIGN.md 3.10 and issue 14 items 1 and 4.
"""

import os
import subprocess
import sys
import textwrap

import pytest

import permastruct
from permastruct import Dict, List, SortedDict, Storage
from permastruct import _format as F
from permastruct.errors import DeadProxyError, ReadOnlyError, StorageClosedError

SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(permastruct.__file__)))


class Tree(Storage):
    def populateSchema(self):
        s = self.schema

        class Link(s.Structure):  # (a field cannot name its own type yet: a base type stands in)
            name = s.String

        Nodes = self.define(List("Nodes")[Link])

        class Node(Link):
            parent = Link
            label = s.ByteString
            children = Nodes

        class Leaf(Node):
            weight = s.Float

        ByName = self.define(Dict("ByName")[s.String, Node])
        Ranked = self.define(SortedDict("Ranked")[s.String, Node])

        class Root(s.Structure):
            tree = Node
            nodes = Nodes
            by_name = ByName
            ranked = Ranked
            keep = Node


def make_tree(p, name, children=3):
    """A node whose children (in its list) point back at it: a cycle through every child."""
    top = p.schema.Node(name=name, children=[])
    kids = top.children
    for index in range(children):
        kids.append(p.schema.Leaf(name=f"{name}.{index}", parent=top, weight=index))
    top.parent = kids[0]  # and a short one: top -> kid 0 -> top
    return top, kids


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "tree.ps")


def test_objects_of_a_type_and_its_subclasses_in_file_order(path):
    with Tree(path) as p:
        p.root.nodes = p.schema.Nodes()
        for index in range(5):
            p.root.nodes.append(p.schema.Node(name=f"n{index}"))
            p.root.nodes.append(p.schema.Leaf(name=f"l{index}", weight=index))
        p.commit()
        nodes = list(p.objects(p.schema.Node))
        assert len(nodes) == 10
        assert [n._ps_oid for n in nodes] == sorted(n._ps_oid for n in nodes)
        assert {type(n).__name__ for n in nodes} == {"Node", "Leaf"}
        assert sorted(str(n.name) for n in p.objects(p.schema.Leaf)) == [f"l{i}" for i in range(5)]
        assert all(n.isSameAs(m) for n, m in zip(p.objects(p.schema.Node), nodes))
        strings = sorted(str(s) for s in p.objects(p.schema.String))
        assert strings == sorted([f"n{i}" for i in range(5)] + [f"l{i}" for i in range(5)])
        everything = list(p.objects())
        assert len(everything) == 10 + 10 + 2  # nodes, names, the root and its list
        assert [type(o).__name__ for o in p.objects(p.schema.Root)] == ["Root"]
        assert list(p.objects(p.schema.Ranked)) == []
        p.check()


def test_objects_skips_what_the_next_commit_frees(path):
    with Tree(path) as p:
        p.root.keep = p.schema.Node(name="kept")
        p.commit()
        p.root.keep = None  # count 0: freed at the next commit, not live
        assert list(p.objects(p.schema.Node)) == []
        held = p.schema.Node(name="held")  # count 0 but held by a proxy: live
        assert [n.isSameAs(held) for n in p.objects(p.schema.Node)] == [True]


def test_objects_refuses_what_is_not_a_type(path):
    with Tree(path) as p:
        for bad in (3, "Node", p.schema.Int, object):
            with pytest.raises(TypeError, match="objects"):
                list(p.objects(bad))


def test_objects_in_a_reader_and_after_close(path):
    with Tree(path) as p:
        p.root.keep = p.schema.Leaf(name="x")
    with Tree(path, readonly=True) as r:
        assert [str(n.name) for n in r.objects(r.schema.Node)] == ["x"]
    with pytest.raises(StorageClosedError):
        r.objects()


def test_pack_frees_an_unlinked_cycle(path):
    with Tree(path) as p:
        p.root.tree, kids = make_tree(p, "t", children=4)
        p.commit()
        del kids
        before = len(list(p.objects()))
        p.root.tree = None
        p.commit()  # reference counting cannot free it: every node is referenced
        assert len(list(p.objects(p.schema.Node))) == 5
        p.check()
        result = p.pack()
        assert result["objects_freed"] == 5 + 5 + 2  # nodes, their names, the list and its array
        assert result["bytes_freed"] > 0
        assert set(result) >= {"objects_freed", "bytes_freed", "pages_released"}
        assert list(p.objects(p.schema.Node)) == []
        assert len(list(p.objects())) == before - 5 - 5 - 1
        p.check()
        assert p.pack()["objects_freed"] == 0  # nothing left to free
        p.check()
    with Tree(path) as p:
        assert list(p.objects(p.schema.Node)) == []
        p.check()


def test_pack_keeps_shared_interned_and_proxy_held_objects(path):
    with Tree(path) as p:
        shared = p.schema.Node(name="shared")
        interned = p.stringRegistry.get("interned")
        p.root.keep = shared
        p.root.by_name = p.schema.ByName()
        p.root.ranked = p.schema.Ranked()
        top, kids = make_tree(p, "garbage")
        kids[1].parent = shared  # garbage refers to a live object
        kids[2].name = interned  # and to an interned string
        p.root.by_name["a"] = shared
        p.root.ranked["b"] = shared
        held_top, held_kids = make_tree(p, "held")  # a cycle only a proxy holds
        del top, kids, held_kids
        p.commit()
        refs = shared._ps_refs
        result = p.pack()
        assert result["objects_freed"] == 4 + 3 + 2  # the garbage tree, names (one is interned), list, array
        assert shared._ps_refs == refs - 1  # garbage's reference to it was taken back
        assert str(p.root.keep.name) == "shared"
        assert p.stringRegistry.get("interned").isSameAs(interned)
        assert str(held_top.name) == "held" and str(held_top.parent.parent.name) == "held"
        p.check()
        del held_top
        p.commit()
        assert p.pack()["objects_freed"] == 4 + 4 + 2
        p.check()
        assert [str(n.name) for n in p.objects(p.schema.Node)] == ["shared"]
        assert "interned" in p.stringRegistry


def test_pack_commits_what_is_pending_in_the_same_commit(path):
    with Tree(path) as p:
        p.root.tree, kids = make_tree(p, "t")
        del kids
        p.commit()
        txn = p._page_file.txn
        p.root.tree = None
        p.root.keep = p.schema.Node(name="new")
        p.pack()
        assert p._page_file.txn == txn + 1
        p.rollback()
        assert str(p.root.keep.name) == "new"
        p.check()


def test_pack_gives_back_pages_and_they_are_reused(path):
    with Tree(path, pageSize=1024) as p:
        p.root.keep = p.schema.Node(name="made first")  # (the pages at the end are the tree's)
        p.root.tree, kids = make_tree(p, "big", children=2000)
        del kids
        p.commit()
        pages = p._page_file.page_count
        p.root.tree = None
        p.commit()
        result = p.pack()
        assert result["objects_freed"] == 1 + 2000 + 2001 + 2
        assert result["pages_released"] > 0
        assert result["pages"] < pages
        p.check()
        p.root.tree, kids = make_tree(p, "again", children=2000)
        del kids
        p.commit()
        assert p._page_file.page_count <= pages + 1
        p.check()


def test_a_readers_proxy_of_a_freed_object_dies_at_refresh(path):
    with Tree(path) as w:
        w.root.tree, kids = make_tree(w, "t")
        del kids
        w.commit()
        r = Tree(path, readonly=True)
        try:
            node = r.root.tree
            kid = node.parent
            assert str(kid.name) == "t.0"
            w.root.tree = None
            w.commit()
            w.pack()
            assert str(kid.name) == "t.0"  # the reader's snapshot still has it
            assert r.refresh()
            with pytest.raises(DeadProxyError):
                kid.name
            with pytest.raises(DeadProxyError):
                node.name
            assert r.root.tree is None
            r.check()
        finally:
            r.close()
        w.check()


def test_pack_refuses_a_reader_and_a_closed_store(path):
    Tree(path).close()
    with Tree(path, readonly=True) as r:
        with pytest.raises(ReadOnlyError):
            r.pack()
    with pytest.raises(StorageClosedError):
        r.pack()


def test_pack_progress_and_a_deep_chain(path):
    with Tree(path) as p:
        head = tail = p.schema.Node()
        for index in range(19999):  # deeper than any recursion could go
            head = p.schema.Node(parent=head)
        p.root.keep = head
        del tail
        p.commit()
        calls = []
        assert p.pack(lambda done, total, what: calls.append(what))["objects_freed"] == 0
        assert {"pages", "marking", "freeing"} <= set(calls)
        tail = head
        while tail.parent is not None:
            tail = tail.parent
        tail.parent = head  # a cycle of 20,000
        p.root.keep = None
        del head, tail
        p.commit()
        assert len(list(p.objects(p.schema.Node))) == 20000
        assert p.pack()["objects_freed"] == 20000
        p.check()


def test_pack_on_a_memory_store():
    p = Tree(None)
    p.root.tree, kids = make_tree(p, "t")
    del kids
    p.root.tree = None
    assert p.pack()["objects_freed"] == 4 + 4 + 2
    p.check()
    p.close()


def test_pack_interrupted_is_rolled_back(path, monkeypatch):
    from permastruct import _pack
    with Tree(path) as p:
        p.root.tree, kids = make_tree(p, "t")
        del kids
        p.commit()
        p.root.tree = None
        p.commit()
        calls = []

        def boom(self, offset):
            calls.append(offset)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return original(self, offset)
        original = type(p._heap.allocator).free
        monkeypatch.setattr(type(p._heap.allocator), "free", boom)
        with pytest.raises(KeyboardInterrupt):
            _pack.pack(p)
        monkeypatch.undo()
        with pytest.raises(permastruct.errors.IncompleteChangeError):
            p.commit()
        p.rollback()
        p.check()
        assert p.pack()["objects_freed"] == 4 + 4 + 2
        p.check()


def _killed_at_operation_n(body):
    """A script that runs ``body`` (text) and exits with status 86 just before file operation N
    (its first argument) once ``body`` sets ``FileIO.hook = hook``."""
    return textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {SRC_DIR!r})
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_pack import Records, Tree, make_tree
        from permastruct._mapping import FileIO
        n = int(sys.argv[1])
        count = [0]
        def hook(operation, path, *args):
            count[0] += 1
            if count[0] == n:
                os._exit(86)
    """) + textwrap.dedent(body)


def test_pack_crash_leaves_the_last_commit(tmp_path):
    """A process killed at moments of a pack and of the close after it (which cuts the file's free
    end) reopens at the commit before the pack or after it."""
    path = str(tmp_path / "crash.ps")
    script = _killed_at_operation_n(f"""
        with Tree({path!r}, pageSize=1024) as p:
            if p.root.tree is None and p.root.keep is None:
                p.root.keep = p.schema.Node(name="keep")
                p.root.tree, kids = make_tree(p, "t", children=300)
                del kids
                p.commit()
            p.root.tree = None
            p.commit()
            FileIO.hook = hook
            p.pack()
        FileIO.hook = None  # (the close too: its checkpoint, the log's removal and the file's cut)
        os._exit(0)
    """)
    finished = False
    for n in range(1, 100):  # every file operation (a dozen) until one run finishes
        if os.path.exists(path):
            os.unlink(path)
        for leftover in (path + "-wal",):
            if os.path.exists(leftover):
                os.unlink(leftover)
        status = subprocess.run([sys.executable, "-c", script, str(n)], timeout=60).returncode
        assert status in (0, 86)
        with Tree(path) as p:
            p.check()
            assert str(p.root.keep.name) == "keep"
            nodes = len(list(p.objects(p.schema.Node)))
            assert nodes in (1, 302), nodes  # before the pack (the cycle), or after
            if status == 0:
                finished = True
                assert nodes == 1
            p.pack()
            p.check()
            assert len(list(p.objects(p.schema.Node))) == 1
        if finished:
            break
    assert finished


def _file_end(p):
    """The size a store's file shrinks to: its header and pages, in whole map units."""
    from permastruct._mapping import GRANULE
    pf = p._page_file
    unit = max(GRANULE, pf.page_size)
    return 4096 + -(-(pf.page_count * pf.page_size) // unit) * unit


def test_the_file_shrinks_at_close_after_pack(path):
    with Tree(path, pageSize=1024) as p:
        p.root.keep = p.schema.Node(name="made first")
        p.root.tree, kids = make_tree(p, "big", children=5000)
        del kids
        p.commit()
        p.root.tree = None
        p.commit()
    big = os.path.getsize(path)
    with Tree(path, pageSize=1024) as p:
        p.pack()
        end = _file_end(p)
    assert os.path.getsize(path) == end < big / 10
    with Tree(path) as p:
        p.check()
        assert str(p.root.keep.name) == "made first"
        p.root.tree, kids = make_tree(p, "again", children=5000)  # grows again
        del kids
        p.check()


def test_a_reader_on_an_old_snapshot_delays_the_shrinking(path):
    with Tree(path, pageSize=1024) as p:
        p.root.keep = p.schema.Node(name="made first")
        p.root.tree, kids = make_tree(p, "big", children=5000)
        del kids
    big = os.path.getsize(path)
    old = Tree(path, readonly=True)
    latest = None
    try:
        tree = old.root.tree
        with Tree(path) as p:
            p.root.tree = None
            p.pack()
        assert os.path.getsize(path) >= big  # the old snapshot still has those pages
        assert str(tree.children[4999].name) == "big.4999"
        latest = Tree(path, readonly=True)  # a reader at the last commit does not delay it
        with Tree(path) as p:
            pass
        assert os.path.getsize(path) >= big
        with Tree(path) as p:
            p.pack()  # the old reader is still behind: not yet
        assert os.path.getsize(path) >= big
        old.close()
        with Tree(path) as p:
            latest.refresh()  # at the last commit: it does not delay the cut
            p.pack()  # nothing to free, but the free end goes now
            latest.refresh()
            end = _file_end(p)
        assert os.path.getsize(path) == end < big / 10
        assert str(latest.root.keep.name) == "made first"  # no SIGBUS: nothing past the end is read
        latest.check()
        assert not latest.refresh()
    finally:
        old.close()
        if latest is not None:
            latest.close()


def test_pack_moves_a_list_array_and_a_hash_table_that_end_the_file(path):
    with Tree(path, pageSize=1024) as p:
        p.root.nodes = p.schema.Nodes()
        p.root.by_name = p.schema.ByName()
        nodes, by_name = p.root.nodes, p.root.by_name  # proxies held across the pack
        made = [p.schema.Node(name=f"n{index}") for index in range(300)]
        p.root.tree, kids = make_tree(p, "big", children=3000)  # a cycle in the middle of the file
        del kids
        for node in made:  # then an array and a table that grow at the end of the file
            nodes.append(node)
            by_name[node.name] = node  # (the name string itself: nothing new after the table)
        del made, node
        p.commit()
        reader = Tree(path, readonly=True)
        try:
            assert len(reader.root.nodes) == 300
            pages = p._page_file.page_count
            p.root.tree = None
            result = p.pack()
            assert result["objects_moved"] >= 1
            assert result["pages"] < pages / 2
            p.check()
            assert [str(n.name) for n in nodes][:3] == ["n0", "n1", "n2"] and len(nodes) == 300
            assert str(by_name["n299"].name) == "n299"
            nodes.append(p.schema.Node(name="after"))
            by_name["after"] = nodes[-1]
            p.commit()
            assert len(reader.root.nodes) == 300  # its snapshot
            assert reader.refresh()
            assert [str(n.name) for n in reader.root.nodes][-2:] == ["n299", "after"]
            assert str(reader.root.by_name["after"].name) == "after"
            reader.check()
        finally:
            reader.close()
        p.check()


# -- relocation: the survivors move down, the file shrinks ------------------------------------------

class Records(Storage):
    def populateSchema(self):
        s = self.schema

        class Record(s.Structure):
            id = s.Int
            name = s.String
            score = s.Float

        self.define(Dict("ById")[s.Int, Record])

        class Root(s.Structure):
            records = s.ById
            first = Record


#: What the file may keep beyond its live pages: one growth step of the map (MappedFile.grow
#: grows the file by at least 16 map granules), which also covers the rounding to a whole unit.
def _growth_step():
    from permastruct._mapping import GRANULE
    return 16 * GRANULE


def _live_pages(p):
    """Pages in use (objects and the allocator page): the page count less every free page and run."""
    pf = p._page_file
    return pf.page_count - pf.free_page_count() - sum(n for _, n in p._heap.allocator.free_runs())


def _make_records(path, count, seed=14, keep_every=None):
    """``count`` records in a Dict by id, then 95% of them deleted (random ones, or all but every
    ``keep_every``-th) in a second commit; returns the ids kept."""
    with Records(path) as p:
        return _fill(p, count, seed, keep_every)


def _fill(p, count, seed=14, keep_every=None):
    import random
    rng = random.Random(seed)
    p.root.records = {}
    records = p.root.records
    record = p.schema.Record
    for index in range(count):
        records[index] = record(id=index, name=f"record number {index}", score=index / 3)
    p.commit()
    kept = []
    for index in range(count):
        if (index % keep_every if keep_every else rng.random() < 0.95):
            del records[index]
        else:
            kept.append(index)
    p.commit()
    return kept


def _check_records(p, kept):
    records = p.root.records
    assert len(records) == len(kept)
    for index in kept:
        record = records[index]
        assert record.id == index and str(record.name) == f"record number {index}" and record.score == index / 3


@pytest.mark.parametrize("how", ["random", "every 20th"])
def test_a_store_of_100000_records_95_percent_deleted_shrinks_to_live_pages_plus_a_growth_step(path, how):
    kept = _make_records(path, 100_000, keep_every=20 if how == "every 20th" else None)
    big = os.path.getsize(path)
    with Records(path) as p:
        before = p._page_file.page_count
        result = p.pack()
        live = _live_pages(p)
        assert result["objects_moved"] > 0 and result["pages"] == p._page_file.page_count < before
        assert p._page_file.page_count * p._page_file.page_size <= live * p._page_file.page_size + _growth_step()
        p.check()
        _check_records(p, kept)
        page_size = p._page_file.page_size
    size = os.path.getsize(path)
    assert size <= 4096 + live * page_size + _growth_step(), (size, live)
    assert size < big / 3
    with Records(path) as p:
        p.check()
        _check_records(p, kept)
        records = p.root.records
        for index in range(100_000, 101_000):  # and it grows again
            records[index] = p.schema.Record(id=index, name=f"record number {index}", score=index / 3)
        p.commit()
        p.check()


def test_a_held_proxy_pins_its_object_and_stays_right_after_the_pack(path):
    kept = _make_records(path, 20_000)
    with Records(path) as p:
        last = max(kept)
        held = p.root.records[last]  # made last: near the end of the file
        offset = held._ps_oid
        page = p._page_file.page_of(offset)
        assert page > p._page_file.page_count // 2
        result = p.pack()
        assert result["objects_moved"] > 0
        assert held._ps_oid == offset and p._page_file.page_count > page  # pinned: it kept its page
        assert held.id == last and str(held.name) == f"record number {last}"
        assert p.root.records[last].isSameAs(held)
        held.score = -1.5  # and it is still the object the file has
        p.commit()
        p.check()
        del held
        result = p.pack()  # no longer held: now it moves, and the file's end with it
        assert p._page_file.page_count <= page
        p.check()
    with Records(path) as p:
        assert p.root.records[last].score == -1.5
        p.check()


def test_a_readers_proxy_of_a_moved_object_dies_at_refresh(path):
    kept = _make_records(path, 20_000)
    last = max(kept)
    with Records(path) as w:
        r = Records(path, readonly=True)
        try:
            old = r.root.records[last]
            offset = old._ps_oid
            assert w.pack()["objects_moved"] > 0
            assert w.root.records[last]._ps_oid != offset  # it moved
            assert old.id == last and str(old.name) == f"record number {last}"  # the reader's snapshot
            assert r.refresh()
            with pytest.raises(DeadProxyError):
                old.id
            fresh = r.root.records[last]
            assert fresh._ps_oid == w.root.records[last]._ps_oid
            assert fresh.id == last and str(fresh.name) == f"record number {last}"
            _check_records(r, kept)
            r.check()
        finally:
            r.close()


def test_pack_relocates_every_kind_of_reference(path):
    """Lists, Dicts and SortedDicts of structures and strings, a cycle, interned strings, the root:
    everything moves down under references that are all rewritten."""
    with Tree(path, pageSize=1024) as p:
        p.root.keep = p.schema.Node(name="made first")
        garbage, kids = make_tree(p, "garbage", children=3000)  # the low pages, freed by the pack
        p.root.tree = garbage
        del kids, garbage
        p.commit()
        top, kids = make_tree(p, "live", children=200)
        p.root.nodes = p.schema.Nodes()
        p.root.by_name = {}
        p.root.ranked = {}
        for kid in kids:
            p.root.nodes.append(kid)
            p.root.by_name[str(kid.name)] = kid
            p.root.ranked[str(kid.name) * 3] = kid  # keys longer than a table's inline keys
        p.root.keep.parent = top
        p.root.keep.label = p.stringRegistry.get(b"interned label")  # (a registry entry)
        del kids, kid, top
        p.root.tree = None
        p.commit()
        expected = _tree_state(p)
        pages = p._page_file.page_count
        result = p.pack()
        assert result["objects_moved"] > 200
        assert p._page_file.page_count < pages / 3
        p.check()
        assert _tree_state(p) == expected
    with Tree(path) as p:
        p.check()
        assert _tree_state(p) == expected


def _tree_state(p):
    root = p.root
    top = root.keep.parent
    return (str(root.keep.name), bytes(root.keep.label), str(top.name), [str(k.name) for k in top.children],
            [str(n.name) for n in root.nodes], [str(n.parent.name) for n in root.nodes],
            sorted((str(k), str(v.name)) for k, v in root.by_name.items()),
            [(str(k), str(v.name)) for k, v in root.ranked.items()])


_TOUCHING_READER = """
import sys
sys.path.insert(0, {src!r})
sys.path.insert(0, {tests!r})
from test_pack import Records

def touch(r):
    pf = r._page_file
    total = 0
    for pid in range(pf.page_count):  # every byte of every page of the snapshot
        total += sum(bytes(pf.view(pid))[::512])
    return pf.page_count

with Records({path!r}, readonly=True) as r:
    for line in sys.stdin:
        if line.strip() == "refresh":
            r.refresh()
        pages = touch(r)
        r.check()  # and what it read is its snapshot
        print(pages, flush=True)
"""


def test_a_truncating_checkpoint_waits_for_an_old_snapshot_and_never_cuts_under_a_reader(path):
    """The checkpoint after pack() gives the free end back only past what every reader's snapshot
    reaches; a reader in another process that reads (and checks) every page of its snapshot
    after each truncating checkpoint never gets a SIGBUS (exit code -7)."""
    script = _TOUCHING_READER.format(src=SRC_DIR, tests=os.path.dirname(__file__), path=path)
    child = oldest = None
    try:
        with Records(path) as w:
            pf = w._page_file
            pf.checkpoint_bytes = 1 << 40  # (no checkpoint inside commits: only pack's own)
            w.root.first = w.schema.Record(id=-1, name="first")
            w.commit()
            oldest = Records(path, readonly=True)  # a small snapshot, in the log: checkpoints stop there
            kept = _fill(w, 30_000)  # (a big commit: its fresh pages go straight into the main file)
            child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

            def ask(what="touch"):
                child.stdin.write(what + "\n")
                child.stdin.flush()
                line = child.stdout.readline()
                assert line, f"the reader died: exit code {child.wait()}"
                return int(line)
            big_pages = ask()  # the child's snapshot: the records, 95% deleted
            held = os.stat(path).st_blocks * 512
            w.pack()  # its checkpoint copies up to the oldest snapshot, which is small; the child's is not
            assert pf.page_count < big_pages / 2
            assert ask() == big_pages  # the child's whole snapshot, after that checkpoint
            assert os.stat(path).st_blocks * 512 >= held - _growth_step()
            oldest.close()
            w.pack()  # the checkpoint copies up to the child's snapshot now: still no cut
            assert ask() == big_pages
            assert ask("refresh") == pf.page_count  # now at the pack's commit
            w.pack()  # nothing to free; its checkpoint cuts the end now
            live = _live_pages(w)
            assert os.stat(path).st_blocks * 512 <= 4096 + live * pf.page_size + 2 * _growth_step()
            assert ask() == pf.page_count  # every page of its snapshot after the cut
            w.root.records[10 ** 6] = w.schema.Record(id=-1, name="after the cut")  # the writer grows again
            w.commit()
            assert ask("refresh") == pf.page_count
            w.check()
        assert os.path.getsize(path) <= 4096 + (live + 1) * pf.page_size + _growth_step()
        assert ask() > 0
    finally:
        if oldest is not None:
            oldest.close()
        if child is not None:
            child.stdin.close()
            code = child.wait(timeout=60)
    assert code == 0, f"the reader exited with {code} (-7: SIGBUS)"
    with Records(path) as p:
        p.check()
        assert str(p.root.records[10 ** 6].name) == "after the cut"
        del p.root.records[10 ** 6]
        _check_records(p, kept)


def test_a_crash_anywhere_in_a_relocating_pack_leaves_the_store_before_or_after_it(tmp_path):
    """A process killed before each file operation of a pack that moves objects, of its truncating
    checkpoint and of the close that cuts the file reopens whole, with the same records (a pack
    changes no value), and packs again as small."""
    import shutil
    original = str(tmp_path / "original.ps")
    path = str(tmp_path / "crash.ps")
    with Records(original, pageSize=1024) as p:
        kept = _fill(p, 3000)
        held = p.root.records[max(kept)]
        p.root.first = held  # (a reference the relocation rewrites: a structure field)
        del held
    script = _killed_at_operation_n(f"""
        p = Records({path!r})
        FileIO.hook = hook
        moved = p.pack()["objects_moved"]
        p.close()
        FileIO.hook = None
        print(moved)
        os._exit(0)
    """)
    scratch = str(tmp_path / "scratch.ps")
    shutil.copy(original, scratch)
    with Records(scratch) as p:
        p.pack()
        packed_pages = p._page_file.page_count
    statuses = set()
    for n in range(1, 200):  # every file operation until one run finishes
        for name in (path, path + "-wal"):
            if os.path.exists(name):
                os.unlink(name)
        shutil.copy(original, path)
        if os.path.exists(original + "-wal"):
            shutil.copy(original + "-wal", path + "-wal")
        done = subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True, text=True, timeout=60)
        assert done.returncode in (0, 86), done.stderr[-2000:]
        statuses.add(done.returncode)
        with Records(path) as p:
            p.check()
            _check_records(p, kept)
            assert p.root.first.id == max(kept)
            p.pack()
            p.check()
            assert p._page_file.page_count <= packed_pages
        if done.returncode == 0:
            assert int(done.stdout) > 0  # it did move objects
            break
    assert statuses == {0, 86}


@pytest.mark.parametrize("where", ["alloc 1", "alloc 200", "merge 2", "merge 3"])
def test_a_relocation_interrupted_anywhere_is_rolled_back(path, monkeypatch, where):
    """KeyboardInterrupt at an allocation of the moves, or at the merge after the small objects
    moved (their old places freed) or after the runs moved (the references not yet rewritten):
    commit() refuses, rollback() returns to the last commit, and the next pack does it all."""
    kept = _make_records(path, 5000)
    with Records(path) as p:
        allocator = type(p._heap.allocator)
        what, at = where.split()
        original = getattr(allocator, what)
        calls = []

        def boom(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == int(at):
                raise KeyboardInterrupt
            return original(self, *args, **kwargs)
        monkeypatch.setattr(allocator, what, boom)
        with pytest.raises(KeyboardInterrupt):
            p.pack()
        monkeypatch.undo()
        with pytest.raises(permastruct.errors.IncompleteChangeError):
            p.commit()
        p.rollback()
        p.check()
        _check_records(p, kept)
        pages = p._page_file.page_count
        assert p.pack()["objects_moved"] > 0 and p._page_file.page_count < pages / 2
        p.check()
        _check_records(p, kept)


def _items_store(added_field):
    """A store of Items; with ``added_field`` the Item type has gained a field (a new version)."""
    class Versioned(Storage):
        def populateSchema(self):
            s = self.schema

            class Item(s.Structure):
                name = s.String
                n = s.Int
                if added_field:  # the objects written before keep their layout
                    extra = s.String

            self.define(List("Items")[Item])

            class Root(s.Structure):
                items = s.Items
                junk = s.Items
    return Versioned


Version1, Version2 = _items_store(False), _items_store(True)


def test_pack_moves_objects_of_earlier_versions_forwarded_ones_and_a_root_made_last(path):
    """Objects of an earlier structure version are read through that version's layout, FORWARDs
    and their bodies move like any object, and the root (made after the junk here: the right
    side is evaluated first) moves although the storage keeps a proxy of it."""
    with Version1(path) as p:
        p.root.junk = [p.schema.Item(name=f"junk {i}", n=i) for i in range(3000)]
        p.root.items = [p.schema.Item(name=f"item {i}", n=i) for i in range(300)]
        root_page = p._page_file.page_of(p.root._ps_oid)
        assert root_page > p._page_file.page_count / 2
    with Version2(path) as p:
        p.root.junk = None
        for index, item in enumerate(p.root.items):
            if index % 3 == 0:
                item.extra = f"extra {index}"  # written to: a FORWARD to a body of the new version
        del item
        p.commit()
        schema_at = p._page_file.slots[F.SLOT_SCHEMA]  # (written again by this open: near the end)
        pages = p._page_file.page_count
        reader = Version2(path, readonly=True)
        try:
            result = p.pack()
            assert result["objects_moved"] > 300 and p._page_file.page_count < pages / 4
            assert p._page_file.page_of(p.root._ps_oid) < root_page
            assert p._page_file.slots[F.SLOT_SCHEMA] != schema_at  # the schema moved too
            p.check()
            assert reader.refresh()  # a reader finds the moved schema and objects
            assert [str(x.name) for x in reader.root.items][-1] == "item 299"
            reader.check()
        finally:
            reader.close()
    with Version2(path) as p:
        p.check()
        items = p.root.items
        assert [str(x.name) for x in items] == [f"item {i}" for i in range(300)]
        assert [x.n for x in items] == list(range(300))
        assert [x.extra and str(x.extra) for x in items] == [f"extra {i}" if i % 3 == 0 else None
                                                             for i in range(300)]


def test_without_pagemap_the_checkpoint_leaves_no_hole_and_the_close_cuts(path, monkeypatch):
    """Where the map's changes are found by comparing every page with the file (no pagemap), a
    hole could be read: the checkpoint cuts only past the writer's map; the close cuts the rest."""
    monkeypatch.setenv("PERMASTRUCT_DIRTY", "compare")
    kept = _make_records(path, 20_000)
    big = os.path.getsize(path)
    with Records(path) as p:
        assert p._page_file.mapping._pagemap is None
        blocks = os.stat(path).st_blocks
        p.pack()
        assert os.stat(path).st_blocks >= blocks and os.path.getsize(path) == big  # no hole
        p.root.records[-1] = p.schema.Record(id=-1, name="after")  # the writer reads and grows its map
        p.commit()
        live = _live_pages(p)
        page_size = p._page_file.page_size
    assert os.path.getsize(path) <= 4096 + (live + 1) * page_size + _growth_step()
    with Records(path) as p:
        p.check()
        del p.root.records[-1]
        _check_records(p, kept)


def test_undo_of_a_relocating_pack_brings_back_the_state_before_it(path):
    """With history, the pack (freeing, moving, the checkpoint's hole) is one transaction that
    undo() takes back whole: the objects at their old places, the file grown into the hole again."""
    with Records(path, history=5) as p:
        kept = _fill(p, 5000)
        p.root.first = p.root.records[max(kept)]
        p.commit()
        pages = p._page_file.page_count
        first_at = p.root.first._ps_oid
        result = p.pack()
        assert result["objects_moved"] > 0 and p._page_file.page_count < pages / 2
        pack_id = p.undo_log()[0]["id"]
        assert p.undo(pack_id) == [pack_id]
        assert p._page_file.page_count == pages and p.root.first._ps_oid == first_at
        p.check()
        _check_records(p, kept)
        p.root.records[-1] = p.schema.Record(id=-1, name="after the undo")
        p.commit()
        p.check()
    with Records(path) as p:
        p.check()
        assert str(p.root.records[-1].name) == "after the undo"
        del p.root.records[-1]
        _check_records(p, kept)


# -- scans in flight across a relocation ----------------------------------------------------------

class Ordered(Storage):
    def populateSchema(self):
        s = self.schema
        self.define(SortedDict("ByNumber")[s.Int, s.Int])
        self.define(SortedDict("ByName")[s.String, s.Int])

        class Junk(s.Structure):
            number = s.Int

        class Root(s.Structure):
            junk = self.define(List("Junks")[Junk])
            by_number = self.schema.ByNumber
            by_name = self.schema.ByName


def _name(index):
    return f"a key of more than sixteen bytes {index:05d}"


def _ordered_store(p):
    """Junk first (the low pages the pack frees), then a SortedDict whose nodes end the file."""
    p.root.junk = [p.schema.Junk(number=index) for index in range(5000)]
    p.commit()
    p.root.by_number = {index: -index for index in range(2000)}
    p.commit()


def _named_store(p):
    p.root.junk = [p.schema.Junk(number=index) for index in range(5000)]
    p.commit()
    p.root.by_name = {_name(index): index for index in range(800)}
    p.commit()


def test_a_sorted_dict_scan_suspended_across_a_relocating_pack_goes_on_where_it_was(path):
    """A B+tree scan holds the leaf it is reading and the link to the next; a pack that moves the
    nodes meanwhile must not send it to their old places (freed: a false damage report, or another
    object's bytes read as keys)."""
    with Ordered(path, pageSize=1024) as p:
        _ordered_store(p)
        by_number = p.root.by_number
        scans = [iter(by_number), reversed(by_number), iter(by_number.items()),
                 by_number.irange(100, 1900), by_number.irange(100, 1900, reverse=True)]
        expected = [list(range(2000)), list(range(1999, -1, -1)), [(i, -i) for i in range(2000)],
                    list(range(100, 1901)), list(range(1900, 99, -1))]
        heads = [[next(scan) for _ in range(150)] for scan in scans]
        p.root.junk = None
        assert p.pack()["objects_moved"] > 50
        p.check()
        for head, scan, want in zip(heads, scans, expected):
            assert head + list(scan) == want


def test_a_scan_of_string_keys_suspended_across_a_relocating_pack_goes_on_where_it_was(path):
    with Ordered(path, pageSize=1024) as p:
        _named_store(p)
        by_name = p.root.by_name
        scans = [iter(by_name), by_name.irange(_name(50), _name(700), inclusive=(False, True)),
                 reversed(by_name)]
        expected = [[_name(i) for i in range(800)], [_name(i) for i in range(51, 701)],
                    [_name(i) for i in range(799, -1, -1)]]
        heads = [[str(next(scan)) for _ in range(150)] for scan in scans]  # (no String proxy held)
        p.root.junk = None
        assert p.pack()["objects_moved"] > 50
        p.check()
        for head, scan, want in zip(heads, scans, expected):
            assert head + [str(key) for key in scan] == want


def test_a_readers_sorted_dict_scan_goes_on_after_a_refresh_past_a_relocating_pack(path):
    with Ordered(path, pageSize=1024) as p:
        _ordered_store(p)
        held = p.root.by_number  # (the writer holds it: its object stays, its nodes move)
        with Ordered(path, readonly=True) as reader:
            scan = iter(reader.root.by_number)
            head = [next(scan) for _ in range(300)]
            p.root.junk = None
            assert p.pack()["objects_moved"] > 50
            assert reader.refresh()
            assert head + list(scan) == list(range(2000))
            reader.check()
        del held


def test_a_forwarded_objects_proxy_kept_by_the_map_is_not_left_over_its_bodys_old_place(path):
    """The writer's proxy of a FORWARD (a committed body of the current version) is laid over the
    body.  A pack that moves the body must not leave that proxy in the identity map: read, it gave
    the zeros of the hole the checkpoint punched; written, the change went to freed memory (lost)."""
    with Version1(path) as p:
        p.root.items = [p.schema.Item(name=f"item {i}", n=i) for i in range(300)]
        p.root.junk = [p.schema.Item(name=f"junk {i}", n=i) for i in range(3000)]
    with Version2(path) as p:
        for index, item in enumerate(p.root.items):
            item.extra = f"extra {index}"  # every Item a FORWARD; the bodies after the junk
    with Version2(path) as p:
        p.root.junk = None
        p.commit()
        items = p.root.items
        assert [x.n for x in items] == list(range(300))  # (proxies the map keeps, over the bodies)
        assert p.pack()["objects_moved"] > 100
        p.check()
        assert [x.n for x in items] == list(range(300))
        for x in items:
            x.n += 1000
        del x
        p.commit()
        p.check()
    with Version2(path) as p:
        p.check()
        assert [x.n for x in p.root.items] == list(range(1000, 1300))
        assert [str(x.extra) for x in p.root.items] == [f"extra {i}" for i in range(300)]


def test_undo_of_a_pack_that_moved_forwarded_bodies_kills_the_proxies_laid_over_them(path):
    """After undo() of a pack that moved FORWARD bodies, the writer's proxies of the FORWARDs made
    meanwhile (laid over the bodies' new places) must not stay in the map: they read another
    object's bytes and their writes were lost."""
    with Version1(path) as p:
        p.root.items = [p.schema.Item(name=f"item {i}", n=i) for i in range(300)]
        p.root.junk = [p.schema.Item(name=f"junk {i}", n=i) for i in range(3000)]
    with Version2(path) as p:
        p.root.junk = None
        p.commit()
        p.pack()  # (the schema this open wrote moves low: the pack below leaves it, so undo can take it)
        p.root.junk = [p.schema.Item(name=f"junk {i}", n=i) for i in range(3000)]
        p.commit()
        for index, item in enumerate(p.root.items):
            item.extra = f"extra {index}"  # FORWARDs, the bodies after the junk
    with Version2(path, history=5) as p:
        p.root.junk = None
        p.commit()
        items = p.root.items
        assert p.pack()["objects_moved"] > 100
        assert [x.n for x in items] == list(range(300))  # proxies over the moved bodies, in the map
        p.undo(p.undo_log()[0]["id"])
        p.check()
        assert [x.n for x in items] == list(range(300))
        for x in items:
            x.n += 1000
        del x
        p.commit()
        p.root.junk = [p.schema.Item(name=f"new {i}", n=-1) for i in range(3000)]
        p.commit()
        p.check()
    with Version2(path) as p:
        p.check()
        assert [x.n for x in p.root.items] == list(range(1000, 1300))


def test_an_iteration_of_objects_across_a_relocating_pack_raises_instead_of_missing_objects(path):
    """objects() collects offsets first: after a pack moved objects they name old places (freed,
    past the file's end, or another object's now).  It went on silently: here it listed none of the
    300 live nodes after the pack; now its next step raises."""
    with Tree(path, pageSize=1024) as p:
        p.root.tree, kids = make_tree(p, "junk", 3000)
        del kids
        p.commit()
        p.root.nodes = [p.schema.Node(name=f"n{i}") for i in range(300)]
        p.commit()
        found = p.objects(p.schema.Node)
        assert [str(next(found).name) for _ in range(5)] == ["junk", "junk.0", "junk.1", "junk.2", "junk.3"]
        p.root.tree = None
        assert p.pack()["objects_moved"] > 100
        with pytest.raises(RuntimeError, match="pack"):
            next(found)
        assert sorted(str(n.name) for n in p.objects(p.schema.Node)) == sorted(f"n{i}" for i in range(300))
        p.check()
