"""Schema definition: mistakes caught when a class is created, names in quotes (self and forward
references), collection descriptors used as field types (issue 15, items 3 and 4)."""

import hashlib
import os

import pytest

from permastruct import Dict, List, SchemaError, SortedDict, Storage, Structure


def store_with(body, extra=None):
    """A Storage class whose populateSchema defines ``class A(self.schema.Structure)`` with ``body``."""
    class Bad(Storage):
        def populateSchema(self):
            namespace = {"self": self, "List": List, "Dict": Dict, "Structure": Structure}
            exec("class A(self.schema.Structure):\n    " + body.replace("\n", "\n    "), namespace)
            if extra:
                extra(self)
    return Bad


# -- item 3: mistakes caught at definition --------------------------------------------------------
@pytest.mark.parametrize("body, message", [
    ("name = str", "A.name = str is not a field type of .*write String"),
    ("data = bytes", "A.data = bytes .*ByteString"),
    ("age = int", "A.age = int .*Int"),
    ("ok = bool", "A.ok = bool .*Bool"),
    ("items = list", "A.items = list .*List"),
    ("when = complex", "A.when = complex .*builtin Python type"),
    ("hint = list[int]", r"A.hint = list\[int\] .*type hint"),
    ("next = self.schema.Structure", "A.next = Structure .*Structure itself is only a base class"),
    ("next = Structure", "A.next = Structure .*Structure itself is only a base class"),
    ("import ctypes\nn = ctypes.c_int", "A.n = c_int .*ctypes"),
    ("xs = List('Xs')", r"A.xs: List\('Xs'\) needs its element types"),
    ("xs = List('Xs')[str]", r"A.xs: List\('Xs'\)\[str\]: str is not a permastruct type"),
    ("x = 'Missing'", "A.x = 'Missing' names no type of the schema .*its types: A"),
    ("x = 'Int'", "A.x = 'Int': Int is a by-value type; name it without quotes"),
    ("x = 'two words'", "A.x = 'two words': a field type in quotes is the name of a type"),
    ("x = 'Structure'", "A.x = 'Structure' names no type"),
])
def test_a_class_attribute_that_is_not_a_field_type_is_an_error_naming_it(tmp_path, body, message):
    path = tmp_path / "bad.ps"
    with pytest.raises(SchemaError, match=message):
        store_with(body)(path)
    assert not path.exists() and os.listdir(tmp_path) == []  # nothing left behind


def test_a_class_of_another_storage_is_an_error_naming_the_attribute(tmp_path):
    other = store_with("n = self.schema.Int")(None)
    with pytest.raises(SchemaError, match="B.a: A belongs to .* not to "):
        class Mixed(Storage):
            def populateSchema(self):
                class B(self.schema.Structure):
                    a = other.schema.A
        Mixed(tmp_path / "m.ps")
    other.close()


def test_methods_properties_constants_and_helper_classes_are_not_fields(tmp_path):
    class Fine(Storage):
        def populateSchema(self):
            class Agent(self.schema.Structure):
                age = self.schema.Int
                LIMIT = 120
                factor = 1.5
                codes = (1, 2)

                class Error(Exception):
                    pass

                def older(self, years):
                    return self.age + years

                @property
                def adult(self):
                    return self.age >= 18

                @staticmethod
                def helper():
                    return len
    with Fine(tmp_path / "f.ps") as p:
        agent = p.schema.Agent(age=30)
        assert list(p.schema.Agent._ps_field_types) == ["age"]
        assert agent.older(2) == 32 and agent.adult and agent.LIMIT == 120 and agent.helper() is len
        assert issubclass(agent.Error, Exception)
        p.check()


def test_a_collection_descriptor_as_a_field_type_is_defined_for_it(tmp_path):
    class Auto(Storage):
        def populateSchema(self):
            class Agent(self.schema.Structure):
                name = self.schema.String
                tags = List("Tags")[self.schema.String]
                scores = Dict("Scores")[self.schema.String, self.schema.Float]

            class Root(self.schema.Structure):
                agents = List("Agents")[Agent]
                more = List("Agents")[Agent]  # the same descriptor again: the same type
                tags = List("Tags")[self.schema.String]
    path = tmp_path / "auto.ps"
    with Auto(path) as p:
        assert p.schema.Root._ps_field_types["agents"] is p.schema.Agents
        assert p.schema.Root._ps_field_types["more"] is p.schema.Agents
        assert p.schema.Root._ps_field_types["tags"] is p.schema.Agent._ps_field_types["tags"] is p.schema.Tags
        p.root.agents = [p.schema.Agent(name="Bond", tags=["spy"], scores={"aim": 9.5})]
        p.check()
    with Auto(path) as p:
        assert list(p.root.agents[0].tags) == ["spy"] and dict(p.root.agents[0].scores) == {"aim": 9.5}
        p.check()
    with Storage(path) as p:
        assert list(p.root.agents[0].tags) == ["spy"]


def test_a_descriptor_reusing_a_name_with_other_element_types_is_an_error(tmp_path):
    body = "a = List('Xs')[self.schema.Int]\nb = List('Xs')[self.schema.Float]"
    with pytest.raises(SchemaError, match="A.b: .*already has a type named 'Xs'"):
        store_with(body)(tmp_path / "x.ps")


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_populate_schema_raising_on_a_new_path_leaves_no_file(tmp_path):
    class Broken(Storage):
        def populateSchema(self):
            class Root(self.schema.Structure):
                n = self.schema.Int
            raise RuntimeError("the program's own mistake")
    path = tmp_path / "new.ps"
    with pytest.raises(RuntimeError, match="own mistake"):
        Broken(path)
    assert os.listdir(tmp_path) == []
    with pytest.raises(SchemaError):
        store_with("x = 'Nowhere'")(path)
    assert os.listdir(tmp_path) == []


def test_populate_schema_raising_on_an_existing_store_leaves_the_file_unchanged(tmp_path):
    class Good(Storage):
        def populateSchema(self):
            class A(self.schema.Structure):
                n = self.schema.Int
    path = tmp_path / "old.ps"
    with Good(path) as p:
        p.schema.A(n=1)
    before, names = _digest(path), sorted(os.listdir(tmp_path))

    class Raises(Storage):
        def populateSchema(self):
            Good.populateSchema(self)
            raise RuntimeError("boom")
    for attempt in (Raises, store_with("n = self.schema.Int\nm = str"), store_with("n = 'Nope'")):
        with pytest.raises((RuntimeError, SchemaError)):
            attempt(path)
        assert _digest(path) == before and sorted(os.listdir(tmp_path)) == names
    with Good(path) as p:
        p.check()


# -- item 4: self and forward references ------------------------------------------------------------
class Graph(Storage):
    def populateSchema(self):
        class Root(self.schema.Structure):
            head = "Node"  # defined below
            tree = "Tree"
            index = SortedDict("ByValue")[self.schema.Int, "Node"]

        class Node(self.schema.Structure):
            value = self.schema.Int
            next = "Node"

        class Tree(self.schema.Structure):
            key = self.schema.Int
            left = "Tree"
            right = "Tree"
            children = List("Forest")["Tree"]

        class Special(Node):  # a subclass inherits the resolved field types
            label = self.schema.String


def test_names_in_quotes_resolve_to_the_types_when_populate_schema_returns(tmp_path):
    with Graph(tmp_path / "g.ps") as p:
        s = p.schema
        assert s.Node._ps_field_types["next"] is s.Node
        assert s.Root._ps_field_types["head"] is s.Node and s.Root._ps_field_types["tree"] is s.Tree
        assert s.Special._ps_field_types["next"] is s.Node
        assert s.Forest._ps_params == (s.Tree,) and s.ByValue._ps_params == (s.Int, s.Node)
        assert "next: Node" in s.Node.__doc__ and "children: Forest (List[Tree])" in s.Tree.__doc__
        a = s.Node(value=1, next=s.Node(value=2))
        a.next.next = s.Special(value=3, label="three")
        assert a.next.next.label == "three" and isinstance(a.next.next, s.Node)
        with pytest.raises(TypeError, match="Node.next holds Node, not Tree"):
            a.next = s.Tree()
        with pytest.raises(TypeError, match="Node.next holds Node, not Tree"):
            s.Node(next=s.Tree())
        p.root.index = {}
        with pytest.raises(TypeError, match="ByValue value holds Node, not Tree"):
            p.root.index[1] = s.Tree()
        p.root.head = a
        p.root.index[5] = a
        p.check()


def _walk_list(head):
    total, count = 0, 0
    while head is not None:
        total += head.value
        count += 1
        head = head.next
    return count, total


def _walk_tree(tree):
    count, total, stack = 0, 0, [tree]
    while stack:
        node = stack.pop()
        count += 1
        total += node.key
        stack.extend(child for child in (node.left, node.right) if child is not None)
    return count, total


N = 100_000


def test_a_linked_list_and_a_tree_of_self_referential_types_reopened_bare(tmp_path):
    path = tmp_path / "big.ps"
    with Graph(path) as p:
        Node, Tree = p.schema.Node, p.schema.Tree
        head = None
        for value in range(N, 0, -1):
            head = Node(value=value, next=head)
        p.root.head = head
        nodes = [Tree(key=key) for key in range(N)]  # a complete binary tree in heap order
        for key in range(N - 1, 0, -1):
            parent = nodes[(key - 1) // 2]
            if key % 2:
                parent.left = nodes[key]
            else:
                parent.right = nodes[key]
        p.root.tree = nodes[0]
        del nodes, head
        p.commit()
    expected = (N, N * (N + 1) // 2), (N, N * (N - 1) // 2)
    with Storage(path) as p:  # the bare Storage: the classes come from the stored schema alone
        assert p.schema.Node._ps_field_types["next"] is p.schema.Node
        assert p.schema.Root._ps_field_types["head"] is p.schema.Node
        assert (_walk_list(p.root.head), _walk_tree(p.root.tree)) == expected
        assert p.check()["types"]["Node"] == N
    with Graph(path) as p:
        assert (_walk_list(p.root.head), _walk_tree(p.root.tree)) == expected
        p.root.head.next = p.root.head.next.next  # drops one node
    with Storage(path, readonly=True) as p:
        assert _walk_list(p.root.head)[0] == N - 1
        p.check()


def test_collections_naming_types_in_quotes_reopen_bare(tmp_path):
    path = tmp_path / "c.ps"
    with Graph(path) as p:
        root = p.schema.Tree(key=0, children=[p.schema.Tree(key=k) for k in range(1, 4)])
        root.children[0].children = [p.schema.Tree(key=10)]
        p.root.tree = root
        p.root.index = {k: p.schema.Node(value=k) for k in range(5)}
        p.check()
    with Storage(path) as p:
        tree = p.root.tree
        assert [child.key for child in tree.children] == [1, 2, 3]
        assert tree.children[0].children[0].key == 10
        assert [node.value for node in p.root.index.values()] == [0, 1, 2, 3, 4]
        assert type(tree.children) is p.schema.Forest and p.schema.Forest._ps_params == (p.schema.Tree,)
        p.check()


def test_a_string_constant_in_a_structure_is_a_name_and_says_so(tmp_path):
    # A str class attribute is a type named in quotes (the contract): a constant must not be a str.
    with pytest.raises(SchemaError, match="A.kind = 'agent' names no type of the schema"):
        store_with("kind = 'agent'")(tmp_path / "k.ps")
