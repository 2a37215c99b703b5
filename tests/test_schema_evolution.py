"""Schema evolution on reopen (issue 15, item 1): new fields and types are added by the open, in one
commit; objects written before read new fields as defaults and take new values; opening stays O(1).

The versions of the schema are module-level Storage classes so that child processes (other
``PYTHONHASHSEED``s, readers, crashes) can import them from this file.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from permastruct import List, ReadOnlyError, SchemaError, Storage
from permastruct._heap import Heap
from permastruct._mapping import FileIO

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


class V1(Storage):
    def populateSchema(self):
        class Node(self.schema.Structure):
            value = self.schema.Int
            next = "Node"

            def double(self):
                return 2 * self.value

        class Spy(Node):
            code = self.schema.Int32

        class Root(self.schema.Structure):
            head = Node
            nodes = List("Nodes")[Node]
            title = self.schema.String


class V2(Storage):
    """New fields anywhere in the class (first, last), the old ones reordered, a new type."""

    def populateSchema(self):
        class Node(self.schema.Structure):
            label = self.schema.String  # new
            next = "Node"
            value = self.schema.Int
            weight = self.schema.Float  # new
            flag = self.schema.Bool  # new
            friend = "Node"  # new, a reference

            def double(self):
                return 2 * self.value

        class Spy(Node):
            code = self.schema.Int32

        class Gadget(self.schema.Structure):  # a new type
            power = self.schema.Int
            owner = Node

        class Root(self.schema.Structure):
            head = Node
            nodes = List("Nodes")[Node]
            title = self.schema.String
            gadgets = List("Gadgets")[Gadget]  # a new field of a new collection type


class V3(Storage):
    """One more field in the base (every Spy's layout changes too) and in the subclass."""

    def populateSchema(self):
        class Node(self.schema.Structure):
            label = self.schema.String
            next = "Node"
            value = self.schema.Int
            weight = self.schema.Float
            flag = self.schema.Bool
            friend = "Node"
            rank = self.schema.UInt16  # new in V3

            def double(self):
                return 2 * self.value

        class Spy(Node):
            code = self.schema.Int32
            alias = self.schema.ByteString  # new in V3

        class Gadget(self.schema.Structure):
            power = self.schema.Int
            owner = Node

        class Root(self.schema.Structure):
            head = Node
            nodes = List("Nodes")[Node]
            title = self.schema.String
            gadgets = List("Gadgets")[Gadget]


def write_v1(path, n=10):
    with V1(path) as p:
        head = None
        for value in range(n, 0, -1):
            head = (p.schema.Spy if value % 2 else p.schema.Node)(value=value, next=head, **(
                {"code": -value} if value % 2 else {}))
        p.root.head = head
        p.root.nodes = [head, head.next]
        p.root.title = "v1"
        p.check()


def chain(p):
    node, out = p.root.head, []
    while node is not None:
        out.append(node)
        node = node.next
    return out


def test_new_fields_read_as_defaults_and_take_values(tmp_path):
    path = tmp_path / "e.ps"
    write_v1(path)
    with V2(path) as p:
        nodes = chain(p)
        assert [n.value for n in nodes] == list(range(1, 11))
        first = nodes[0]
        assert isinstance(first, p.schema.Node) and isinstance(first, p.schema.Spy)
        assert type(first).__name__ == "Spy" and first.double() == 2
        assert (first.label, first.weight, first.flag, first.friend, first.code) == (None, 0.0, False, None, -1)
        assert p.root.gadgets is None and p.root.title == "v1"
        p.check()
        first.label = "one"  # a new field of an old object
        first.friend = nodes[1]
        nodes[1].weight = 2.5
        nodes[2].value = 30  # an old field of an old object
        assert (first.label, first.friend.value, nodes[1].weight, nodes[2].value, first.code) == \
            ("one", 2, 2.5, 30, -1)
        with pytest.raises(TypeError, match="Node.weight is Float"):
            nodes[3].weight = "heavy"
        with pytest.raises(OverflowError):
            nodes[4].code = 2 ** 40
        assert p.check()["types"]["(moved objects)"] == 3  # the failed writes moved nothing
        p.root.gadgets = [p.schema.Gadget(power=9, owner=first)]
        fresh = p.schema.Node(value=99, label="new", next=first)
        assert type(fresh) is p.schema.Node  # new objects: the class populateSchema made
        p.root.nodes.append(fresh)
        assert p.root.nodes[0].isSameAs(first) and p.root.nodes[0] == first
        p.check()
    with V2(path) as p:
        nodes = chain(p)
        assert (nodes[0].label, nodes[0].friend.value, nodes[1].weight, nodes[2].value) == ("one", 2, 2.5, 30)
        assert str(p.root.nodes[2].label) == "new" and p.root.gadgets[0].owner.isSameAs(nodes[0])
        p.check()
    with Storage(path) as p:  # the bare open reads every version
        nodes = chain(p)
        assert [n.value for n in nodes] == [1, 2, 30] + list(range(4, 11))
        assert (nodes[0].label, nodes[1].weight, nodes[3].label) == ("one", 2.5, None)
        p.check()


def test_the_open_that_extends_commits_it_and_changes_nothing_else(tmp_path):
    path = tmp_path / "e.ps"
    write_v1(path)
    with V1(path) as p:
        transaction = p.check()["transaction"]
    p = V2(path)
    assert p.check()["transaction"] == transaction + 1  # one commit: the schema
    assert p.check()["types"].get("(moved objects)", 0) == 0  # no object was touched
    p.rollback()
    assert p.schema.Gadget(power=1).power == 1  # the extension is committed: a rollback keeps it
    p.close()
    with V2(path) as p:
        assert p.check()["transaction"] == transaction + 2  # (the close committed the Gadget's free)


def test_v1_v2_v3_in_processes_with_different_hash_seeds(tmp_path):
    path = str(tmp_path / "e.ps")
    steps = [
        ("1", "write_v1(path)"),
        ("2", """
            with V2(path) as p:
                nodes = chain(p)
                nodes[0].label = "one"; nodes[1].label = "two"; nodes[0].friend = nodes[5]
                p.root.gadgets = [p.schema.Gadget(power=7, owner=nodes[1])]
                p.check()
        """),
        ("3", """
            with V3(path) as p:
                nodes = chain(p)
                assert (str(nodes[0].label), nodes[0].rank, nodes[0].alias, nodes[0].code) == ("one", 0, None, -1)
                assert nodes[0].friend.isSameAs(nodes[5]) and p.root.gadgets[0].owner.isSameAs(nodes[1])
                nodes[0].rank = 65535; nodes[0].alias = b"007"; nodes[2].rank = 3; nodes[1].label = "deux"
                p.check()
        """),
        ("4", """
            with Storage(path) as p:
                nodes = chain(p)
                got = [(n.value, n.label, n.rank, getattr(n, "alias", None), getattr(n, "code", None))
                       for n in nodes[:4]]
                assert got == [(1, "one", 65535, b"007", -1), (2, "deux", 0, None, None),
                               (3, None, 3, None, -3), (4, None, 0, None, None)], got
                p.check()
            with V3(path) as p:
                assert p.check()["types"]["Node"] == 5 and p.check()["types"]["Spy"] == 5
        """),
    ]
    for seed, code in steps:
        run(code, path=path, seed=seed)


def run(code, seed="0", **names):
    """Run ``code`` in a child process with this module's names (and ``names``) imported."""
    script = (f"import sys\nsys.path[:0] = [{SRC!r}, {HERE!r}]\nfrom test_schema_evolution import *\n"
              + "".join(f"{name} = {value!r}\n" for name, value in names.items()) + textwrap.dedent(code))
    env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=SRC)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_an_object_written_twice_after_two_changes_moves_its_body(tmp_path):
    path = tmp_path / "e.ps"
    write_v1(path)
    with V2(path) as p:
        chain(p)[0].weight = 1.5  # a FORWARD to a V2 body
    with V3(path) as p:
        first = chain(p)[0]
        assert (first.weight, first.rank, first.code) == (1.5, 0, -1)
        first.rank = 7  # the V2 body is replaced by a V3 one; the V2 body is freed
        assert (first.weight, first.rank, first.code, first.value) == (1.5, 7, -1, 1)
        p.check()
    with V3(path) as p:
        first = chain(p)[0]
        assert type(first) is p.schema.Spy  # a committed body of the current version: the fast class
        assert (first.weight, first.rank) == (1.5, 7)
        assert p.check()["types"]["(moved objects)"] == 1
        first.rank = 8
        assert p.root.head.rank == 8 and p.root.head.isSameAs(first)
        p.check()


def test_a_reader_holding_a_moved_object_follows_when_the_writer_moves_it_again(tmp_path):
    path = tmp_path / "e.ps"
    write_v1(path)
    with V2(path) as p:
        chain(p)[0].weight = 1.5
    reader = V2(path, readonly=True)
    first = reader.root.head
    assert first.weight == 1.5 and isinstance(first, reader.schema.Spy)
    with V3(path) as w:
        w.root.head.rank = 9  # a V3 body; the V2 body is freed
        w.commit()
        reader.refresh()
        assert (first.weight, first.value, first.code) == (1.5, 1, -1)
        assert reader.root.head.isSameAs(first)  # (read through the reader's classes: no rank)
        reader.check()
    reader.close()


def test_freeing_old_and_moved_objects_frees_what_they_reference(tmp_path):
    path = tmp_path / "e.ps"
    write_v1(path, n=6)
    with V2(path) as p:
        nodes = chain(p)
        for node in nodes:
            node.label = f"node {node.value}"
        before = p.check()
        p.root.head = None
        p.root.nodes = None
        del nodes, node
        p.commit()
        after = p.check()
        assert "Node" not in after["types"] and "Spy" not in after["types"]
        assert after["types"]["(moved objects)"] == 1  # the root (a Root of V1, written to)
        # the nodes, their bodies, their labels, the list and its array; a body more for the root
        assert before["objects"] - after["objects"] == 6 + 6 + 6 + 2 - 1


def test_rollback_of_a_move_keeps_the_old_object(tmp_path):
    path = tmp_path / "e.ps"
    write_v1(path)
    with V2(path) as p:
        first = chain(p)[0]
        first.label = "moved"
        first.value = 100
        p.rollback()
        assert (first.label, first.value) == (None, 1)  # the proxy reads the header each time
        assert "(moved objects)" not in p.check()["types"]
        with pytest.raises(ValueError):
            with p.transaction():
                first.weight = 3.0
                raise ValueError("undo")
        assert first.weight == 0.0
        with p.transaction():  # a savepoint inside a transaction that moves the object
            first.weight = 4.0
            with pytest.raises(ValueError):
                with p.transaction():
                    first.label = "inner"
                    raise ValueError("undo the inner block")
        assert (first.weight, first.label) == (4.0, None)
        with pytest.raises(AttributeError, match="'Spy' has no field 'rank'"):
            first.rank = 1
        p.check()
    with V2(path) as p:
        assert chain(p)[0].weight == 4.0


def test_a_reader_sees_the_new_types_after_refresh(tmp_path):
    path = tmp_path / "e.ps"
    write_v1(path)
    reader = V1(path, readonly=True)
    old_first = chain(reader)[0]
    assert old_first.value == 1
    with V2(path) as w:
        w.root.gadgets = [w.schema.Gadget(power=5, owner=chain(w)[0])]
        chain(w)[0].label = "moved"  # the reader's proxy's object becomes a FORWARD
        w.root.head.next.value = 20
        w.commit()
        assert not hasattr(reader.schema, "Gadget")
        assert reader.refresh()
        assert reader.schema.Gadget.__name__ == "Gadget"
        gadget = reader.root.gadgets[0]
        assert gadget.power == 5 and gadget.owner.value == 1 and gadget.owner.label == "moved"
        # (its class is now built from the stored schema: a reader's own classes know no later version)
        assert old_first.value == 1 and old_first.next.value == 20 and type(old_first).__name__ == "Spy"
        reader.check()
        w.root.head.next = w.schema.Node(value=2, label="fresh")  # a V2 object the reader's V1 class cannot read
        w.commit()
        reader.refresh()
        assert reader.root.head.next.label == "fresh"
        reader.check()
    reader.close()


def test_a_reader_process_sees_the_new_types_after_refresh(tmp_path):
    path = str(tmp_path / "e.ps")
    write_v1(path)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{SRC!r}, {HERE!r}]
        from test_schema_evolution import *
        reader = Storage({path!r}, readonly=True)
        print(hasattr(reader.schema, "Gadget"), flush=True)
        sys.stdin.readline()
        reader.refresh()
        print(reader.root.gadgets[0].power, reader.root.head.label, flush=True)
        reader.check()
        reader.close()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=SRC))
    assert child.stdout.readline() == "False\n"
    with V2(path) as w:
        w.root.gadgets = [w.schema.Gadget(power=6)]
        w.root.head.label = "head"
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline() == "6 head\n", child.stderr.read()
    assert child.wait(60) == 0


def test_a_read_only_open_cannot_extend(tmp_path):
    path = tmp_path / "e.ps"
    write_v1(path)
    before = path.read_bytes()
    with pytest.raises(SchemaError, match="open it writable once"):
        V2(path, readonly=True)
    assert path.read_bytes() == before
    with V2(path) as p:
        pass
    with V2(path, readonly=True) as p:
        with pytest.raises(ReadOnlyError):
            chain(p)[0].label = "no"
        assert chain(p)[0].label is None


def test_opening_with_new_fields_walks_no_object(tmp_path, monkeypatch):
    path = tmp_path / "e.ps"
    write_v1(path, n=2000)

    def no_walk(*args, **kwargs):
        raise AssertionError("the open walked the objects")
    monkeypatch.setattr(Heap, "walk", no_walk)
    with V2(path) as p:
        assert chain(p)[-1].value == 2000


def test_fields_removed_or_retyped_are_refused_and_the_file_left_alone(tmp_path):
    path = tmp_path / "e.ps"
    write_v1(path)
    before = path.read_bytes()

    class Dropped(Storage):
        def populateSchema(self):
            class Node(self.schema.Structure):
                next = "Node"
                extra = self.schema.Int

            class Spy(Node):
                code = self.schema.Int32

            class Root(self.schema.Structure):
                head = Node
                nodes = List("Nodes")[Node]
                title = self.schema.String

    class Retyped(Storage):
        def populateSchema(self):
            class Node(self.schema.Structure):
                value = self.schema.Float
                next = "Node"

            class Spy(Node):
                code = self.schema.Int32

            class Root(self.schema.Structure):
                head = Node
                nodes = List("Nodes")[Node]
                title = self.schema.String
    with pytest.raises(SchemaError,
                       match=r"Node.value \(Int\) is in the file but not in the class \(which adds extra\)"):
        Dropped(path)
    with pytest.raises(SchemaError, match="Node.value is Float in the class but Int in the file"):
        Retyped(path)
    assert path.read_bytes() == before


CRASH_CHILD = """
import sys
sys.path[:0] = [{src!r}, {here!r}]
from test_schema_evolution import *
from permastruct._mapping import FileIO
kill_at, count = {kill_at!r}, [0]
def hook(operation, path, *args):
    if count[0] == kill_at:
        os._exit(86)
    count[0] += 1
FileIO.hook = hook
p = V2({path!r})
FileIO.hook = None
print(count[0])
os._exit(0)  # a crash right after the open: its commit (made without fsyncs) stands after a process crash
"""


def test_a_crash_during_the_open_that_extends_leaves_the_old_or_the_new_schema(tmp_path):
    original = tmp_path / "v1.ps"
    write_v1(original)
    path = tmp_path / "crash" / "e.ps"

    def attempt(kill_at):
        shutil.rmtree(path.parent, ignore_errors=True)
        path.parent.mkdir()
        shutil.copyfile(original, path)
        code = CRASH_CHILD.format(src=SRC, here=HERE, kill_at=kill_at, path=str(path))
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=SRC))

    total = int(attempt(None).stdout)
    assert total > 3
    seen = set()
    for kill_at in list(range(total)) + [None]:
        result = attempt(kill_at)
        assert result.returncode == (0 if kill_at is None else 86), result.stderr
        with Storage(path) as p:
            p.check()
            seen.add(hasattr(p.schema, "Gadget"))
            assert [n.value for n in chain(p)] == list(range(1, 11))
            assert hasattr(p.schema.Node, "label") == hasattr(p.schema, "Gadget")  # whole, or not at all
        with V2(path) as p:
            assert chain(p)[0].label is None and chain(p)[0].code == -1
            p.check()
    assert seen == {False, True}


# == item 2: the explicit changes ==================================================================
class V4(Storage):
    """V3 after rename_field('Gadget', 'power', 'watts'), change_field_type('Spy', 'code', Int64),
    drop_field('Node', 'label')."""

    def populateSchema(self):
        class Node(self.schema.Structure):
            next = "Node"
            value = self.schema.Int
            weight = self.schema.Float
            flag = self.schema.Bool
            friend = "Node"
            rank = self.schema.UInt16

        class Spy(Node):
            code = self.schema.Int64
            alias = self.schema.ByteString

        class Gadget(self.schema.Structure):
            watts = self.schema.Int
            owner = Node

        class Root(self.schema.Structure):
            head = Node
            nodes = List("Nodes")[Node]
            title = self.schema.String
            gadgets = List("Gadgets")[Gadget]


def write_v3(path):
    write_v1(path)
    with V2(path) as p:
        nodes = chain(p)
        nodes[0].label = "one"  # a moved V1 Spy
        nodes[3].label = "four"  # a moved V1 Node
        p.root.gadgets = [p.schema.Gadget(power=7, owner=nodes[1])]
    with V3(path) as p:
        nodes = chain(p)
        nodes[4].alias = b"five"
        p.root.head = p.schema.Spy(value=0, next=p.root.head, code=2 ** 31 - 1, label="zero", alias=b"0")
        p.check()


def test_rename_drop_and_widen_then_reopen_with_the_new_classes(tmp_path):
    path = tmp_path / "e.ps"
    write_v3(path)
    from permastruct import Int64
    with Storage(path) as p:
        strings = p.check()["types"]["String"]
    with pytest.raises(SchemaError, match=r"Storage.drop_field\(path, 'Node', 'label'\)"):
        V4(path)
    Storage.drop_field(path, "Node", "label")
    with pytest.raises(SchemaError, match=r"Storage.change_field_type\(path, 'Spy', 'code', Int64\)"):
        V4(path)
    Storage.change_field_type(path, "Spy", "code", Int64)
    with pytest.raises(SchemaError, match=r"Storage.rename_field\(path, 'Gadget', 'power', new_name\)"):
        V4(path)
    Storage.rename_field(path, "Gadget", "power", "watts")
    with V4(path) as p:
        nodes = chain(p)
        assert [n.value for n in nodes] == list(range(0, 11))
        assert [getattr(n, "code", None) for n in nodes[:4]] == [2 ** 31 - 1, -1, None, -3]
        assert p.root.gadgets[0].watts == 7 and p.root.gadgets[0].owner.isSameAs(nodes[2])
        assert nodes[5].alias == b"five" and not hasattr(nodes[0], "label")
        p.check()
        nodes[0].code = 2 ** 40  # an Int64 now
        for node in nodes:  # each moves (or moves again) and lets its label go
            node.weight = 1.0
        p.commit()
        summary = p.check()
        assert summary["types"]["String"] == strings - 3  # "zero", "one", "four" (title stays)
    with Storage(path) as p:
        assert chain(p)[0].code == 2 ** 40 and p.root.gadgets[0].watts == 7
        p.check()


def test_explicit_changes_in_processes_with_different_hash_seeds(tmp_path):
    path = str(tmp_path / "e.ps")
    run("write_v3(path)", path=path, seed="11")
    run("Storage.rename_field(path, 'Gadget', 'power', 'watts')", path=path, seed="12")
    run("from permastruct import Int64\nStorage.change_field_type(path, 'Spy', 'code', Int64)", path=path, seed="13")
    run("Storage.drop_field(path, 'Node', 'label')", path=path, seed="14")
    out = run("""
        with V4(path) as p:
            print([n.value for n in chain(p)][:3], p.root.gadgets[0].watts, chain(p)[0].code)
            p.check()
    """, path=path, seed="15")
    assert out == f"[0, 1, 2] 7 {2 ** 31 - 1}\n"


def test_explicit_changes_refuse_what_they_cannot_do_and_leave_the_file(tmp_path):
    from permastruct import Float, Int8, Int16, NotAStorageError, StorageLockedError, String
    path = tmp_path / "e.ps"
    write_v3(path)
    before = path.read_bytes()
    cases = [
        (lambda: Storage.rename_field(path, "Nope", "a", "b"), "has no structure type 'Nope'"),
        (lambda: Storage.rename_field(path, "Nodes", "a", "b"), "has no structure type 'Nodes'"),
        (lambda: Storage.rename_field(path, "Node", "nope", "b"), "Node has no field 'nope' of its own"),
        (lambda: Storage.rename_field(path, "Spy", "value", "b"), "it is a field of Node: name that type"),
        (lambda: Storage.rename_field(path, "Node", "value", "weight"), "already has a field 'weight'"),
        (lambda: Storage.rename_field(path, "Node", "value", "alias"), "already has a field 'alias'"),
        (lambda: Storage.rename_field(path, "Node", "value", "_x"), "'_x' cannot be a field name"),
        (lambda: Storage.rename_field(path, "Node", "value", "a b"), "'a b' cannot be a field name"),
        (lambda: Storage.change_field_type(path, "Node", "value", Int16), "not every Int value is a Int16"),
        (lambda: Storage.change_field_type(path, "Node", "rank", Int8), "not every UInt16 value is a Int8"),
        (lambda: Storage.change_field_type(path, "Node", "value", Float), "not every Int value is a Float"),
        (lambda: Storage.change_field_type(path, "Node", "next", Int16), "only a number field"),
        (lambda: Storage.change_field_type(path, "Node", "value", String), "only a number field"),
        (lambda: Storage.drop_field(path, "Node", "code"), "Node has no field 'code'"),
    ]
    for call, message in cases:
        with pytest.raises(SchemaError, match=message):
            call()
        assert path.read_bytes() == before
    with pytest.raises(NotAStorageError):
        Storage.drop_field(tmp_path / "missing.ps", "Node", "value")
    assert not (tmp_path / "missing.ps").exists()
    with V3(path):
        with pytest.raises(StorageLockedError):
            Storage.drop_field(path, "Node", "label")
    with V3(path) as p:
        p.check()


EXPLICIT_CHILD = """
import sys
sys.path[:0] = [{src!r}, {here!r}]
from test_schema_evolution import *
from permastruct import Int64
from permastruct._mapping import FileIO
kill_at, count = {kill_at!r}, [0]
def hook(operation, path, *args):
    if count[0] == kill_at:
        os._exit(86)
    count[0] += 1
FileIO.hook = hook
{call}
FileIO.hook = None
print(count[0])
"""


@pytest.mark.parametrize("call, changed", [
    ("Storage.rename_field({path!r}, 'Gadget', 'power', 'watts')",
     lambda p: "watts" in p.schema.Gadget._ps_field_types),
    ("Storage.change_field_type({path!r}, 'Spy', 'code', Int64)",
     lambda p: p.schema.Spy._ps_field_types["code"].name == "Int64"),
    ("Storage.drop_field({path!r}, 'Node', 'label')",
     lambda p: "label" not in p.schema.Node._ps_field_types),
])
def test_a_crash_during_an_explicit_change_leaves_the_store_before_or_after_it(tmp_path, call, changed):
    original = tmp_path / "v3.ps"
    write_v3(original)
    path = tmp_path / "crash" / "e.ps"

    def attempt(kill_at):
        shutil.rmtree(path.parent, ignore_errors=True)
        path.parent.mkdir()
        shutil.copyfile(original, path)
        code = EXPLICIT_CHILD.format(src=SRC, here=HERE, kill_at=kill_at, call=call.format(path=str(path)))
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=SRC))

    done = attempt(None)
    total = int(done.stdout or 0)
    assert total > 3, done.stderr
    seen = set()
    for kill_at in range(total):
        result = attempt(kill_at)
        assert result.returncode == (0 if kill_at is None else 86), result.stderr
        with Storage(path) as p:
            p.check()
            seen.add(changed(p))
            assert [n.value for n in chain(p)] == list(range(0, 11))
            assert p.root.gadgets[0].owner.value == 2
    assert seen == {False, True}


def test_the_command_line_lists_each_type_once_after_changes(tmp_path):
    from permastruct import cli
    path = tmp_path / "e.ps"
    write_v3(path)
    lines = []
    cli.info(str(path), out=lines.append)
    text = "\n".join(lines)
    assert text.count("Node(Structure):") == 1 and text.count("Spy(Node):") == 1, text
    assert cli.check(str(path), out=lines.append) == 0


@pytest.mark.parametrize("damage", ["type", "body", "body type"])
def test_damaged_versions_and_forwards_are_reported_not_followed(tmp_path, damage):
    import struct
    from permastruct import CorruptStorageError
    path = tmp_path / "e.ps"
    write_v1(path)
    with V2(path) as p:
        chain(p)[0].label = "moved"
        p.commit()
        first, body = p.root.head._ps_oid, None
        body = struct.unpack_from("<Q", p._heap.mapping.view(first + 8, 8))[0]
    data = bytearray(path.read_bytes())
    if damage == "type":  # a version id the schema does not have
        struct.pack_into("<I", data, chain_offset(path, 1), 9999)
    elif damage == "body":  # a body outside the file
        struct.pack_into("<Q", data, first + 8, len(data) + 4096)
    else:  # a body that is no structure
        struct.pack_into("<I", data, body, 31)
    path.write_bytes(data)
    for cls in (Storage, V2):
        with pytest.raises(CorruptStorageError):
            with cls(path) as p:
                [node.label for node in chain(p)]
        with pytest.raises(CorruptStorageError):
            with cls(path, readonly=True) as p:
                p.check()


def chain_offset(path, index):
    """The file offset of the ``index``-th node of the chain (read with a read-only open)."""
    with Storage(path, readonly=True) as p:
        return chain(p)[index]._ps_oid


def test_a_field_dropped_then_added_again_reads_as_new(tmp_path):
    path = tmp_path / "e.ps"

    def store(fields):
        class Versioned(Storage):
            def populateSchema(self):
                type("Thing", (self.schema.Structure,), {name: getattr(self.schema, kind) for name, kind in fields})

                class Root(self.schema.Structure):
                    things = List("Things")["Thing"]
        return Versioned
    with store([("x", "Int"), ("y", "Int")])(path) as p:
        p.root.things = [p.schema.Thing(x=7, y=8)]
    Storage.drop_field(path, "Thing", "x")
    with store([("y", "Int"), ("x", "Float")])(path) as p:  # a new x: the old one's 7 is not it
        thing = p.root.things[0]
        assert (thing.x, thing.y) == (0.0, 8)
        p.check()
    Storage.rename_field(path, "Thing", "y", "x2")
    Storage.rename_field(path, "Thing", "x", "y")  # the name of a renamed field, in old versions too
    with store([("x2", "Int"), ("y", "Float")])(path) as p:
        thing = p.root.things[0]
        assert (thing.x2, thing.y) == (8, 0.0)
        thing.y = 2.5
        p.check()
    with Storage(path) as p:
        assert (p.root.things[0].x2, p.root.things[0].y) == (8, 2.5)


# == power loss (the crash harness's model of the disk, tests/_crashkit.py) ==========================
def record_operations(folder, action):
    """Run ``action()`` and return the file operations it made (as tests/_crashkit.py replays them)."""
    from permastruct._mapping import FileIO
    operations = []

    def hook(operation, path, *args):
        key = os.path.relpath(path, folder)
        if operation == "pwrite":
            args = (bytes(args[0]), args[1])
        elif operation == "link":
            args = (os.path.relpath(args[0], folder),)
        operations.append((operation, key) + tuple(args))
    FileIO.hook = hook
    try:
        action()
    finally:
        FileIO.hook = None
    return operations


def _open_and_commit(path):
    p = V2(path)  # the schema grows without fsyncs; the durable commit after it syncs both
    chain(p)[0].label = "first"
    p.commit()
    p.close()


@pytest.mark.parametrize("change", ["open", "open+commit", "rename", "drop", "widen"])
def test_a_power_loss_during_a_schema_change_leaves_it_before_or_after(tmp_path, change):
    import random
    from _crashkit import PowerLossFiles
    from permastruct import Int64
    folder = tmp_path / "store"
    folder.mkdir()
    path = folder / "e.ps"
    (write_v1 if change.startswith("open") else write_v3)(path)
    initial = {name: bytearray((folder / name).read_bytes()) for name in os.listdir(folder)}
    actions = {
        "open": lambda: V2(path).close(),
        "open+commit": lambda: _open_and_commit(path),
        "rename": lambda: Storage.rename_field(path, "Gadget", "power", "watts"),
        "drop": lambda: Storage.drop_field(path, "Node", "label"),
        "widen": lambda: Storage.change_field_type(path, "Spy", "code", Int64),
    }
    changed = {
        "open": lambda p: hasattr(p.schema, "Gadget"),
        "open+commit": lambda p: hasattr(p.schema, "Gadget"),
        "rename": lambda p: "watts" in p.schema.Gadget._ps_field_types,
        "drop": lambda p: "label" not in p.schema.Node._ps_field_types,
        "widen": lambda p: p.schema.Spy._ps_field_types["code"].name == "Int64",
    }[change]
    operations = record_operations(str(folder), actions[change])
    assert any(op[0] == "fsync" for op in operations)
    scratch = tmp_path / "scratch"
    rng = random.Random(15)
    seen = set()
    for crash_at in range(len(operations) + 1):
        disk = PowerLossFiles()  # the files as they were, all synced (the store was closed)
        disk.current = {name: bytearray(data) for name, data in initial.items()}
        disk.durable = {name: bytearray(data) for name, data in initial.items()}
        disk.pending = {name: [] for name in initial}
        disk.name_durable = dict.fromkeys(initial, True)
        for op in operations[:crash_at]:
            disk.apply(op)
        images = [disk.image(rng, drop_all=True)] + [disk.image(rng) for _ in range(4 if disk.uncertain() else 0)]
        for image in images:
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            for name, data in image.items():
                (scratch / name).write_bytes(bytes(data))
            with Storage(scratch / "e.ps") as p:
                p.check()
                seen.add(changed(p))
                nodes = chain(p)
                label = getattr(nodes[0], "label", None)
                if change == "open+commit" and label is not None:  # the commit: whole
                    assert changed(p) and label == "first"
                assert [n.value for n in nodes][-10:] == list(range(1, 11))
    assert seen == {False, True}


def test_the_open_that_extends_commits_without_fsyncs_and_the_next_commit_syncs_it(tmp_path):
    """The open's commit of a grown schema is idempotent (a power loss that takes it back leaves
    the next open to make it again), so it syncs nothing: that open costs about what an unchanged
    one does.  The next durable commit syncs it with its own: the log's name, then the log (and
    the main file's record of the log's path, when the open had to write it)."""
    path = tmp_path / "sync.ps"
    write_v1(path)
    syncs = []
    FileIO.hook = lambda operation, file, *args: syncs.append((operation, os.path.basename(file))) \
        if operation in ("fsync", "fsync_dir") else None
    try:
        p = V2(path)
        assert syncs == [] and hasattr(p.schema, "Gadget")
        chain(p)[0].label = "first"
        p.commit()
        assert sorted(syncs) == [("fsync", "sync.ps-wal"), ("fsync_dir", "sync.ps-wal")]
    finally:
        FileIO.hook = None
    p.close()
    with V2(path) as p:
        assert chain(p)[0].label == "first"
        p.check()
