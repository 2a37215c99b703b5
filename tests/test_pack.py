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


def test_pack_crash_leaves_the_last_commit(tmp_path):
    """A process killed at moments of a pack and of the close after it (which cuts the file's free
    end) reopens at the commit before the pack or after it."""
    path = str(tmp_path / "crash.ps")
    script = textwrap.dedent(f"""
        import os, random, sys
        sys.path.insert(0, {SRC_DIR!r})
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_pack import Tree, make_tree
        from permastruct._mapping import FileIO
        n = int(sys.argv[1])
        count = [0]
        def hook(operation, path, *args):
            count[0] += 1
            if count[0] == n:
                os._exit(86)
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
