"""``dump``, ``dump --json`` and ``load``: a store as a tree, as portable JSON, and rebuilt from it.

Contract: DESIGN.md 3.12 and issue 14 item 5.
"""

import contextlib
import copy
import io
import json
import math
import os
import random
from array import array

import pytest

from permastruct import Dict, List, Set, SortedDict, Storage, cli
from permastruct import _dump
from permastruct.errors import LoadError


class Every(Storage):
    """Every kind of type: structures with inheritance, every value type, strings, buffers and
    the four collections, with values and references."""

    def populateSchema(self):
        s = self.schema

        class Link(s.Structure):
            name = s.String

        Links = self.define(List("Links")[Link])

        class Node(Link):
            parent = Link
            raw = s.ByteString
            kids = Links
            i8, i16, i32, i64 = s.Int8, s.Int16, s.Int32, s.Int64
            u8, u16, u32, u64 = s.UInt8, s.UInt16, s.UInt32, s.UInt64
            f32, f64, f, i, b = s.Float32, s.Float64, s.Float, s.Int, s.Bool
            buf = s.Buffer

        class Leaf(Node):
            note = s.String

        Names = self.define(Dict("Names")[s.String, Link])
        Counts = self.define(Dict("Counts")[s.Int, s.Float])
        Tags = self.define(Set("Tags")[s.ByteString])
        Scores = self.define(SortedDict("Scores")[s.Float, s.String])
        Nums = self.define(List("Nums")[s.Float])
        Nested = self.define(List("Nested")[Nums])

        class Root(s.Structure):
            top = Node
            names = Names
            counts = Counts
            tags = Tags
            scores = Scores
            nums = Nums
            nested = Nested
            empty = s.Buffer
            grid = s.Buffer
            odd = s.Buffer


def fill(p):
    r = p.root
    top = p.schema.Node(name="top", raw=b"\x00\xff", kids=[], i8=-128, i16=-5, i32=2**31 - 1, i64=-2**63,
                        u8=255, u16=7, u32=2**32 - 1, u64=2**64 - 1, f32=1.5, f64=-0.0, f=math.nan, i=3,
                        b=True, buf=array("d", [1.0, math.inf, -math.inf]))
    r.top = top
    for index in range(3):
        kid = p.schema.Leaf(name=p.stringRegistry.get(f"kid{index}"), parent=top, f=-math.inf, note="é€😀")
        top.kids.append(kid)
    top.kids.append(top.kids[1])  # shared: twice in one list
    top.parent = top.kids[0]  # cycles
    r.names = p.schema.Names()
    r.names["top"] = top
    r.names[p.stringRegistry.get("kid0")] = top.kids[0]  # an interned key, shared with a name
    r.counts = p.schema.Counts({1: 0.5, -2: math.nan, 2**40: math.inf})
    r.tags = p.schema.Tags([b"x", b"", bytes(range(256))])
    r.scores = p.schema.Scores()
    r.scores[1.5] = "a"
    r.scores[-0.0] = top.name  # shared string
    r.scores[-math.inf] = None
    r.nums = p.schema.Nums([math.nan, 0.1, -0.0, 1e308, 5e-324])
    r.nested = p.schema.Nested([r.nums, [], r.nums])
    r.empty = b""
    r.grid = memoryview(bytes(range(24))).cast("B", (2, 3, 4))
    odd = _dump.T.MemoryExporter  # a format memoryview.cast cannot make
    import ctypes
    block = ctypes.create_string_buffer(b"\x00\x01\x00\x02", 4)
    r.odd = odd(ctypes.addressof(block), 4, 2, ">H", (2,), True, keep=block)
    p.stringRegistry.get("lonely")  # interned, reachable from nothing
    p.stringRegistry.get(b"raw bytes")


def text_of(document_or_store):
    stream = io.StringIO()
    _dump.write_json(document_or_store, stream)
    return stream.getvalue()


@pytest.fixture
def every(tmp_path):
    path = str(tmp_path / "every.ps")
    with Every(path) as p:
        fill(p)
    return path


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv, prog="permastruct")
    return status, out.getvalue(), err.getvalue()


def test_dump_load_dump_is_identical(every, tmp_path):
    status, first, _ = run(["dump", "--json", every])
    assert status == 0
    document = json.loads(first)  # strict JSON: NaN and infinities are spelled out
    assert document["format"] == "permastruct-json" and document["version"] == 1
    json_file = tmp_path / "every.json"
    json_file.write_text(first)
    copy_path = str(tmp_path / "copy.ps")
    status, out, err = run(["load", str(json_file), copy_path])
    assert (status, err) == (0, ""), err
    assert "loaded" in out
    status, second, _ = run(["dump", "--json", copy_path])
    assert status == 0
    assert second == first
    assert sorted(os.listdir(tmp_path)) == ["copy.ps", "every.json", "every.ps"]
    with Storage(copy_path, readonly=True) as p:
        p.check()
        top = p.root.top
        assert top.parent.parent.isSameAs(top)  # the cycle
        assert top.kids[1].isSameAs(top.kids[3])  # shared
        assert math.isnan(top.f) and top.u64 == 2**64 - 1 and math.copysign(1, top.f64) == -1
        assert str(top.kids[2].note) == "é€😀"
        assert p.stringRegistry.get("kid0").isSameAs(top.kids[0].name)
        assert "lonely" in p.stringRegistry and b"raw bytes" in p.stringRegistry
        assert p.root.scores[-0.0].isSameAs(top.name)
        assert memoryview(p.root.grid).shape == (2, 3, 4)
        assert memoryview(p.root.odd).format == ">H" and bytes(p.root.odd) == b"\x00\x01\x00\x02"
        assert len(p.root.empty) == 0
        assert p.root.nested[0].isSameAs(p.root.nums)
        assert type(top.kids[0]).__name__ == "Leaf"
    with Every(copy_path) as p:  # the schema binds the program's classes again
        assert type(p.root.top.kids[0]) is p.schema.Leaf
        p.check()


def test_the_json_form_is_written_as_the_store_is_walked(every, monkeypatch):
    """``write_json`` of a store writes each object as the walk reaches it (the document is never
    built), and the text equals the one written from the document."""
    with Storage(every, readonly=True) as p:
        from_document = text_of(_dump.dump_json(p))
        walked, writes = [], []

        class Stream(io.StringIO):
            def write(self, text):
                writes.append(len(walked))  # objects walked before each write
                return super().write(text)
        real = _dump._object

        def counting(proxy, ref):
            walked.append(1)
            return real(proxy, ref)
        monkeypatch.setattr(_dump, "_object", counting)
        monkeypatch.setattr(_dump, "dump_json", None)  # (not called: it would build the document)
        stream = Stream()
        _dump.write_json(p, stream)
        assert stream.getvalue() == from_document
        assert len(set(writes)) > len(walked) // 2  # written along the walk, not at its end


def test_the_json_form_names_types_and_ids(every):
    with Storage(every, readonly=True) as p:
        document = _dump.dump_json(p)
    schema = {entry["name"]: entry for entry in document["schema"]}
    assert schema["Leaf"] == {"name": "Leaf", "kind": "structure", "base": "Node", "fields": [["note", "String"]]}
    assert schema["Names"] == {"name": "Names", "kind": "dict", "params": ["String", "Link"]}
    objects = {entry["id"]: entry for entry in document["objects"]}
    root = objects[document["root"]]
    assert root["type"] == "Root"
    top = objects[root["fields"]["top"]["ref"]]
    assert top["fields"]["f"] == "NaN" and top["fields"]["i64"] == -2**63
    buf = objects[top["fields"]["buf"]["ref"]]
    assert (buf["format"], buf["itemsize"], buf["shape"]) == ("d", 8, [3])
    assert [objects[i]["type"] for i in document["interned"]].count("ByteString") == 1
    assert len(objects) == len(document["objects"])


def test_the_tree(every):
    status, out, _ = run(["dump", every])
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("Root @0x")
    assert "  top: Node @0x" in lines[1]
    assert any(line.strip().startswith("parent: -> @0x") for line in lines)  # the cycle
    assert any("[3]: -> @0x" in line for line in lines)  # the shared kid
    assert "    name: 'top'" in lines
    assert any("f: nan" in line for line in lines)
    offsets = [line.split("@")[1].split()[0] for line in lines if "@0x" in line and "->" not in line]
    assert len(offsets) == len(set(offsets))  # each object once
    _, short, _ = run(["dump", "--depth", "1", "--items", "1", every])
    assert "    name:" not in short and "  top: Node @0x" in short and short.count("...") >= 2
    assert len(short.splitlines()) < len(lines)
    assert run(["dump", "--depth", "0", every])[1].splitlines()[0].endswith(" ...")
    assert len(run(["dump", "--depth", "0", every])[1].splitlines()) == 1
    _, items, _ = run(["dump", "--items", "1", every])
    assert "...: (3 more)" in items


def test_a_deep_chain_dumps_without_recursion(tmp_path):
    path = str(tmp_path / "chain.ps")
    with Every(path) as p:
        head = None
        for _ in range(5000):
            head = p.schema.Node(parent=head)
        p.root.top = head
    status, out, _ = run(["dump", path])
    assert status == 0 and out.count("Node @0x") == 5000
    status, text, _ = run(["dump", "--json", path])
    copy_path = str(tmp_path / "copy.ps")
    (tmp_path / "chain.json").write_text(text)
    assert run(["load", str(tmp_path / "chain.json"), copy_path])[0] == 0
    assert run(["dump", "--json", copy_path])[1] == text


def test_an_empty_store(tmp_path):
    path = str(tmp_path / "empty.ps")
    Every(path).close()
    assert run(["dump", path])[1] == "(no root object yet)\n"
    status, text, _ = run(["dump", "--json", path])
    assert json.loads(text)["root"] is None
    (tmp_path / "e.json").write_text(text)
    assert run(["load", str(tmp_path / "e.json"), str(tmp_path / "new.ps")])[0] == 0
    assert run(["dump", "--json", str(tmp_path / "new.ps")])[1] == text


def _load_refused(document, tmp_path, match=None):
    target = tmp_path / "target.ps"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(LoadError, match=match):
        _dump.load_json(document, str(target))
    assert sorted(os.listdir(tmp_path)) == before  # nothing left behind
    return True


def test_hostile_documents_are_refused_clearly(every, tmp_path):
    with Storage(every, readonly=True) as p:
        good = _dump.dump_json(p)
    folder = tmp_path / "loads"
    folder.mkdir()

    def changed(change):
        document = copy.deepcopy(good)
        change(document)
        return document

    objects = {entry["type"]: entry for entry in good["objects"]}
    node_index = good["objects"].index(objects["Node"])
    buf_index = good["objects"].index(objects["Buffer"])
    cases = [
        ([1, 2], "not a JSON object"),
        ({"format": "other"}, "not a permastruct dump"),
        (changed(lambda d: d.update(version=2)), "version"),
        (changed(lambda d: d.update(objects={})), "not a list"),
        (changed(lambda d: d["schema"].append({"name": "import", "kind": "structure", "base": "Structure",
                                               "fields": []})), "identifier"),
        (changed(lambda d: d["schema"].append({"name": "X", "kind": "queue", "params": []})), "kind"),
        (changed(lambda d: d["schema"].insert(0, d["schema"].pop(2))), "defined before"),
        (changed(lambda d: d["schema"][0].update(fields=[["__class__", "Int"]])), "field"),
        (changed(lambda d: d["objects"].append(d["objects"][0])), "id"),
        (changed(lambda d: d["objects"][node_index].update(type="Nope")), "does not define"),
        (changed(lambda d: d["objects"][node_index]["fields"].update(i8=1000)), r"i8.*1000"),
        (changed(lambda d: d["objects"][node_index]["fields"].update(i="12")), "not a value"),
        (changed(lambda d: d["objects"][node_index]["fields"].update(parent={"ref": 10**6})), "reference"),
        (changed(lambda d: d["objects"][node_index]["fields"].update(kids={"ref": 1})), "Root"),
        (changed(lambda d: d["objects"][node_index]["fields"].update(secret=1)), "no field"),
        (changed(lambda d: d["objects"][buf_index].update(shape=[10**9, 10**9])), "bytes"),
        (changed(lambda d: d["objects"][buf_index].update(base64="!!")), "base64"),
        (changed(lambda d: d["objects"][buf_index].update(format="")), "format"),
        (changed(lambda d: d.update(root=good["objects"][node_index]["id"])), "Root"),
        (changed(lambda d: d["interned"].append(good["root"])), "String"),
    ]
    for document, match in cases:
        assert _load_refused(document, folder, match)


def test_load_refuses_an_existing_target_and_bad_json(every, tmp_path):
    status, text, _ = run(["dump", "--json", every])
    (tmp_path / "d.json").write_text(text)
    status, out, err = run(["load", str(tmp_path / "d.json"), every])
    assert status == 1 and "exists" in err and len(err.splitlines()) == 1
    (tmp_path / "bad.json").write_text(text[:-40])
    status, out, err = run(["load", str(tmp_path / "bad.json"), str(tmp_path / "new.ps")])
    assert status == 1 and err.startswith("permastruct: LoadError:") and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "new.ps")
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    status, out, err = run(["load", str(tmp_path / "deep.json"), str(tmp_path / "new.ps")])
    assert status == 1 and "LoadError" in err


def test_fuzzed_documents_load_or_are_refused(every, tmp_path):
    """Seeded random damage to a dump: each either loads into a store that passes check(), or
    raises LoadError and leaves nothing."""
    with Storage(every, readonly=True) as p:
        good = _dump.dump_json(p)
    rng = random.Random(14)
    values = [None, 0, -1, 2**70, 1.5, "NaN", "x", [], {}, {"ref": 1}, {"ref": -3}, True, [1, 2]]
    folder = tmp_path / "fuzz"
    folder.mkdir()
    loaded = refused = 0
    for attempt in range(60):
        document = copy.deepcopy(good)
        for _ in range(rng.randint(1, 3)):
            entry = rng.choice(document["objects"] + document["schema"])
            key = rng.choice(sorted(entry))
            target = entry[key]
            if isinstance(target, dict) and target:
                target[rng.choice(sorted(target))] = rng.choice(values)
            elif isinstance(target, list) and target:
                target[rng.randrange(len(target))] = rng.choice(values)
            else:
                entry[key] = rng.choice(values)
        path = folder / f"f{attempt}.ps"
        try:
            _dump.load_json(document, str(path))
        except LoadError:
            refused += 1
            assert not os.path.exists(path)
        else:
            loaded += 1
            with Storage(str(path), readonly=True) as p:
                p.check()
        assert not [name for name in os.listdir(folder) if name.startswith(".")]
    assert refused


def test_commands_refuse_a_locked_or_damaged_store(every, tmp_path):
    with Every(every):
        status, out, err = run(["pack", every])
        assert status == 1 and "StorageLockedError" in err and len(err.splitlines()) == 1
        assert run(["dump", every])[0] == 0  # a reader may dump while the writer works
    damaged = tmp_path / "damaged.ps"
    damaged.write_bytes(b"not a store at all" * 300)
    for argv in (["dump", str(damaged)], ["dump", "--json", str(damaged)], ["pack", str(damaged)]):
        status, out, err = run(argv)
        assert status == 1 and "NotAStorageError" in err and len(err.splitlines()) == 1, argv
    assert damaged.read_bytes() == b"not a store at all" * 300
    assert run(["dump", "--json", "--depth", "2", every])[0] == 1


def test_pack_command(every):
    status, out, err = run(["pack", every])
    assert status == 0 and "freed 0 objects" in out
    with Every(every) as p:
        p.root.top = p.root.names = None  # the tree is a cycle: only pack frees it
    status, out, err = run(["pack", every])
    assert status == 0 and "freed 0 objects" not in out
    with Every(every, readonly=True) as p:
        p.check()
        assert list(p.objects(p.schema.Node)) == []


def test_help(capsys):
    for command in ("dump", "load", "pack"):
        assert cli.main([command, "--help"], prog="permastruct") == 0
        assert "usage: permastruct " + command in capsys.readouterr().out
