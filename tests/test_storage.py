"""Storage lifecycle: creation, reopening, schema binding, errors on bad files, close, growth.

Contract: DESIGN.md sections 3.1, 3.4, 3.8 (commit/rollback basics) and 3.11.
"""

import os
import pathlib
import re
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest

import permastruct
from permastruct import Storage
from permastruct.errors import (CorruptStorageError, IncompatibleFormatError, NotAStorageError,
                                PermastructError, SchemaError, StorageClosedError)

PAGE = 4096
SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(permastruct.__file__)))


class MyStorage(Storage):
    def populateSchema(self):
        class Agent(self.schema.Structure):
            name = self.schema.ByteString
            age = self.schema.Int
            weight = self.schema.Float

            def greeting(self):
                return b"Hello, " + self.name.contents

        class Spy(Agent):
            codename = self.schema.String

        class Root(self.schema.Structure):
            count = self.schema.Int
            name = self.schema.ByteString
            text = self.schema.String
            agent = Agent
            buf = self.schema.Buffer


# The same schema with the metaclass spelling of the seed and define().
class SeedSpellingStorage(Storage):
    def populateSchema(self):
        from permastruct.storage import Structure, StructureMeta
        from permastruct.buffer import Buffer
        MyBuffer = self.define(Buffer)

        class Root(Structure, metaclass=StructureMeta):
            myBuffer = MyBuffer


# Variants of MyStorage's schema that differ in one respect each.
class ExtraFieldStorage(Storage):
    def populateSchema(self):
        class Agent(self.schema.Structure):
            name = self.schema.ByteString
            age = self.schema.Int
            weight = self.schema.Float
            height = self.schema.Float

        class Spy(Agent):
            codename = self.schema.String

        class Root(self.schema.Structure):
            count = self.schema.Int
            name = self.schema.ByteString
            text = self.schema.String
            agent = Agent
            buf = self.schema.Buffer


class FieldTypeStorage(Storage):
    def populateSchema(self):
        class Agent(self.schema.Structure):
            name = self.schema.ByteString
            age = self.schema.Int32
            weight = self.schema.Float

        class Spy(Agent):
            codename = self.schema.String

        class Root(self.schema.Structure):
            count = self.schema.Int
            name = self.schema.ByteString
            text = self.schema.String
            agent = Agent
            buf = self.schema.Buffer


class MissingTypeStorage(Storage):
    def populateSchema(self):
        class Agent(self.schema.Structure):
            name = self.schema.ByteString
            age = self.schema.Int
            weight = self.schema.Float

        class Root(self.schema.Structure):
            count = self.schema.Int
            name = self.schema.ByteString
            text = self.schema.String
            agent = Agent
            buf = self.schema.Buffer


class ExtraTypeStorage(Storage):
    def populateSchema(self):
        class Agent(self.schema.Structure):
            name = self.schema.ByteString
            age = self.schema.Int
            weight = self.schema.Float

        class Spy(Agent):
            codename = self.schema.String

        class Gadget(self.schema.Structure):
            power = self.schema.Int

        class Root(self.schema.Structure):
            count = self.schema.Int
            name = self.schema.ByteString
            text = self.schema.String
            agent = Agent
            buf = self.schema.Buffer


class RenamedFieldStorage(Storage):
    def populateSchema(self):
        class Agent(self.schema.Structure):
            nickname = self.schema.ByteString
            age = self.schema.Int
            weight = self.schema.Float

        class Spy(Agent):
            codename = self.schema.String

        class Root(self.schema.Structure):
            count = self.schema.Int
            name = self.schema.ByteString
            text = self.schema.String
            agent = Agent
            buf = self.schema.Buffer


def run_python(code, **env_extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC_DIR + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=120)


def make_store(path):
    """A committed store with some data in it; returns nothing (the store is closed)."""
    p = MyStorage(path, fileSize=16000)
    p.root.count = 42
    p.root.name = b"Felix"
    p.root.text = "Moneypenny \u2764"
    p.root.agent = p.schema.Spy(name=b"James", age=37, weight=80.5, codename="007")
    p.root.buf = p.schema.Buffer(bytes(range(100)))
    p.close()


# -- creation and reopening ------------------------------------------------------------
def test_create_file_rounds_size_to_whole_pages(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path, fileSize=16000)
    try:
        assert path.exists()
        size = os.path.getsize(path)
        assert size >= 16000
        assert size % PAGE == 0
        assert p.fileSize == size
    finally:
        p.close()
    # committed and closed: still whole pages
    assert os.path.getsize(path) % PAGE == 0


def test_default_file_size_is_small_and_whole_pages(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    p.close()
    size = os.path.getsize(path)
    assert 0 < size <= 16 * 1024 * 1024
    assert size % PAGE == 0


def test_sizes_are_ignored_on_reopen(tmp_path):
    path = tmp_path / "a.ps"
    make_store(path)
    size = os.path.getsize(path)
    p = MyStorage(path, fileSize=64 * 1024 * 1024, stringRegistrySize=100000)
    try:
        assert p.fileSize == size
        assert os.path.getsize(path) == size
        assert p.root.count == 42
    finally:
        p.close()
    assert os.path.getsize(path) == size


def test_str_and_pathlike_names(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(str(path))
    p.root.count = 1
    p.close()
    p = MyStorage(pathlib.Path(path))
    assert p.root.count == 1
    p.root.count = 2
    p.close()

    class PathLike:
        def __fspath__(self):
            return str(path)

    p = MyStorage(PathLike())
    assert p.root.count == 2
    assert p.fileName == str(path)
    p.close()


def test_relative_name_becomes_absolute_in_repr(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = MyStorage("rel.ps")
    try:
        assert repr(p) == f"<MyStorage {str(tmp_path / 'rel.ps')!r}>"
    finally:
        p.close()


def test_repr(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    try:
        assert repr(p) == f"<MyStorage '{os.path.abspath(path)}'>"
    finally:
        p.close()
    p = Storage(path)
    try:
        assert repr(p) == f"<Storage '{os.path.abspath(path)}'>"
    finally:
        p.close()


def test_close_is_idempotent(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    p.root.count = 5
    p.close()
    assert p.closed
    p.close()
    p.close()
    assert p.closed
    p = MyStorage(path)
    assert p.root.count == 5
    p.close()


def test_close_commits_pending_changes(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    p.root.count = 11
    p.root.name = b"pending"
    p.close()
    p = MyStorage(path)
    assert p.root.count == 11
    assert p.root.name == b"pending"
    assert p.check()["objects"] >= 2
    p.close()


def test_with_commits_on_normal_exit(tmp_path):
    path = tmp_path / "a.ps"
    with MyStorage(path) as p:
        assert p.closed is False
        p.root.count = 3
        p.root.name = b"Q"
    assert p.closed
    with MyStorage(path) as p:
        assert p.root.count == 3
        assert p.root.name == b"Q"
        p.check()


def test_with_rolls_back_on_exception(tmp_path):
    path = tmp_path / "a.ps"
    with MyStorage(path) as p:
        p.root.count = 3
        p.root.name = b"kept"
    with pytest.raises(KeyError):
        with MyStorage(path) as p:
            p.root.count = 99
            p.root.name = b"lost"
            p.root.agent = p.schema.Agent(name=b"ghost", age=1)
            raise KeyError("boom")
    assert p.closed
    with MyStorage(path) as p:
        assert p.root.count == 3
        assert p.root.name == b"kept"
        assert p.root.agent is None
        summary = p.check()
        assert summary["types"].get("Agent", 0) == 0


def test_commit_and_rollback(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    try:
        p.root.count = 1
        p.root.name = b"one"
        p.root.agent = p.schema.Agent(name=b"A", age=10)
        p.commit()
        objects = p.check()["objects"]

        p.root.count = 2
        p.root.name = b"two"
        p.root.agent.age = 11
        p.root.agent.name = b"B"
        fresh = p.schema.Agent(name=b"new", age=5)
        p.root.text = "created"
        text_proxy = p.root.text
        p.rollback()

        assert p.root.count == 1
        assert p.root.name == b"one"
        assert p.root.agent.age == 10
        assert p.root.agent.name == b"A"
        assert p.root.text is None
        assert p.check()["objects"] == objects

        with pytest.raises(PermastructError):
            fresh.age
        with pytest.raises(PermastructError):
            fresh.age = 3
        with pytest.raises(PermastructError):
            str(text_proxy)
        # the storage is still usable
        p.root.count = 4
        p.commit()
        p.check()
    finally:
        p.close()
    p = MyStorage(path)
    assert p.root.count == 4
    assert p.root.agent.name == b"A"
    p.close()


def test_rollback_keeps_old_proxies_valid(tmp_path):
    p = MyStorage(tmp_path / "a.ps")
    try:
        p.root.agent = p.schema.Agent(name=b"A", age=1)
        p.commit()
        agent = p.root.agent
        agent.age = 5
        agent.name = b"B"
        p.stringRegistry.get(b"rolled back")
        p.rollback()
        assert agent.age == 1
        assert agent.name == b"A"
        assert agent.isSameAs(p.root.agent)
        assert b"rolled back" not in p.stringRegistry
        assert len(p.stringRegistry) == 0
        p.check()
    finally:
        p.close()


def test_rolled_back_proxy_cannot_be_stored(tmp_path):
    p = MyStorage(tmp_path / "a.ps")
    try:
        p.root.count = 1
        p.commit()
        ghost = p.schema.Agent(name=b"ghost", age=3)
        ghost_name = p.schema.ByteString(b"ghost name")
        p.rollback()
        with pytest.raises(PermastructError):
            p.root.agent = ghost
        with pytest.raises(PermastructError):
            p.root.name = ghost_name
        with pytest.raises(PermastructError):
            p.schema.Agent(name=ghost_name)
        assert p.root.agent is None
        assert p.root.name is None
        p.check()
    finally:
        p.close()


def test_transaction_context_manager(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    try:
        with p.transaction():
            p.root.count = 7
        with pytest.raises(RuntimeError):
            with p.transaction():
                p.root.count = 8
                raise RuntimeError
        assert p.root.count == 7
    finally:
        p.close()


def test_root_created_on_first_access_and_stable(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    before = p.check()
    root = p.root
    assert type(root).__name__ == "Root"
    assert isinstance(root, p.schema.Root)
    assert root.count == 0 and root.name is None and root.agent is None
    assert p.root.isSameAs(root)
    after = p.check()
    assert after["types"].get("Root") == 1
    assert before["types"].get("Root", 0) == 0
    r1 = repr(root)
    p.close()
    p = MyStorage(path)
    assert repr(p.root) == r1
    assert p.check()["types"].get("Root") == 1
    p.close()
    p = Storage(path)
    assert repr(p.root) == r1
    p.close()


def test_seed_spelling_schema(tmp_path):
    path = tmp_path / "seed.ps"
    p = SeedSpellingStorage(path, fileSize=16000, stringRegistrySize=32)
    p.root.myBuffer = p.schema.Buffer(b"This is a string.")
    assert re.fullmatch(r"<persistent Buffer object @offset 0x[0-9a-f]+>", repr(p.root.myBuffer))
    p.close()
    p = SeedSpellingStorage(path)
    assert bytes(p.root.myBuffer) == b"This is a string."
    p.close()


def test_schema_namespace(tmp_path):
    p = MyStorage(tmp_path / "a.ps")
    try:
        for name in ("Int", "Float", "Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16",
                     "UInt32", "UInt64", "Float32", "Float64", "ByteString", "String", "Structure",
                     "Buffer", "Agent", "Spy", "Root"):
            assert hasattr(p.schema, name), name
        assert issubclass(p.schema.Spy, p.schema.Agent)
    finally:
        p.close()


def test_bare_storage_reopen_reads_all_data(tmp_path):
    path = tmp_path / "a.ps"
    make_store(path)
    p = Storage(path)
    try:
        root = p.root
        assert type(root).__name__ == "Root"
        assert root.count == 42
        assert root.name == b"Felix"
        assert str(root.text) == "Moneypenny \u2764"
        agent = root.agent
        assert type(agent).__name__ == "Spy"
        assert isinstance(agent, p.schema.Agent)
        assert isinstance(agent, p.schema.Spy)
        assert agent.name == b"James"
        assert agent.age == 37
        assert agent.weight == 80.5
        assert agent.codename == "007"
        assert bytes(root.buf) == bytes(range(100))
        # plain classes: the methods of MyStorage's classes are not there
        assert not hasattr(agent, "greeting")
        # but new objects can be created from the stored schema
        root.agent = p.schema.Agent(name=b"Bare", age=1)
        p.check()
    finally:
        p.close()
    p = MyStorage(path)
    assert p.root.agent.greeting() == b"Hello, Bare"
    p.close()


def test_a_new_field_or_type_extends_the_stored_schema(tmp_path):
    # (Before issue 15 both were a SchemaError; now the open adds them: tests/test_schema_evolution.py.)
    path = tmp_path / "a.ps"
    make_store(path)
    with ExtraFieldStorage(path) as p:
        assert p.root.agent.height == 0.0 and p.root.agent.codename == "007"
        p.check()
    with pytest.raises(SchemaError, match="Agent.height"):  # not dropped silently
        ExtraTypeStorage(path)
    other = tmp_path / "b.ps"
    make_store(other)
    with ExtraTypeStorage(other) as p:
        p.root.agent = p.schema.Agent(name=b"Q")
        assert p.schema.Gadget(power=3).power == 3
        p.check()


@pytest.mark.parametrize("variant, words", [
    (FieldTypeStorage, ["Agent", "age", "Int32"]),
    (MissingTypeStorage, ["Spy"]),
    (RenamedFieldStorage, ["Agent", "nickname"]),
])
def test_schema_mismatch_raises_and_leaves_file_unchanged(tmp_path, variant, words):
    path = tmp_path / "a.ps"
    make_store(path)
    before = path.read_bytes()
    with pytest.raises(SchemaError) as info:
        variant(path)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert isinstance(info.value, TypeError)
    assert path.read_bytes() == before
    # the store still opens with the right schema
    p = MyStorage(path)
    assert p.root.count == 42
    p.check()
    p.close()


def _not_a_store_files():
    return {
        "empty": b"",
        "short": b"PST",
        "short_magic": b"PSTRUCT\x00\x01",
        "random": bytes((i * 7919 + 13) % 256 for i in range(10000)),
        "text": ("Lorem ipsum dolor sit amet\n" * 400).encode(),
        "zeros": bytes(8192),
    }


@pytest.mark.parametrize("kind", sorted(_not_a_store_files()))
def test_not_a_store_file_is_refused_and_unchanged(tmp_path, kind):
    path = tmp_path / f"{kind}.bin"
    data = _not_a_store_files()[kind]
    path.write_bytes(data)
    for cls in (MyStorage, Storage) if kind != "empty" else ():  # empty: test_an_empty_file_becomes_a_store
        with pytest.raises((NotAStorageError, CorruptStorageError)) as info:
            cls(path)
        assert str(path.name) in str(info.value)
        assert path.read_bytes() == data
    with pytest.raises((NotAStorageError, CorruptStorageError)):
        MyStorage(path, readonly=True)
    assert path.read_bytes() == data


def test_truncated_store_is_refused_and_unchanged(tmp_path):
    path = tmp_path / "a.ps"
    make_store(path)
    whole = path.read_bytes()
    # the file is preallocated past its last committed page: cut inside the committed pages
    for cut in (100, 4096 + 100, 4096 + 2 * PAGE + 100):
        path.write_bytes(whole[:cut])
        with pytest.raises((NotAStorageError, CorruptStorageError)):
            MyStorage(path)
        assert path.read_bytes() == whole[:cut]


def _with_version(data, version):
    head = bytearray(data[:64])
    struct.pack_into("<I", head, 8, version)
    struct.pack_into("<I", head, 60, zlib.crc32(bytes(head[:60])))
    return bytes(head) + data[64:]


def test_higher_format_version_is_incompatible(tmp_path):
    path = tmp_path / "a.ps"
    make_store(path)
    data = path.read_bytes()
    assert data[:8] == b"PSTRUCT\x00"
    version = struct.unpack_from("<I", data, 8)[0]
    newer = _with_version(data, version + 1)
    path.write_bytes(newer)
    for cls in (MyStorage, Storage):
        with pytest.raises(IncompatibleFormatError):
            cls(path)
        assert path.read_bytes() == newer
    # putting the version back makes it readable again
    path.write_bytes(_with_version(newer, version))
    p = MyStorage(path)
    assert p.root.count == 42
    p.close()


def test_error_hierarchy():
    from permastruct import errors
    for name in ("StorageClosedError", "ReadOnlyError", "StorageLockedError", "NotAStorageError",
                 "CorruptStorageError", "IncompatibleFormatError", "SchemaError",
                 "UnpinnedPageError", "StorageFullError"):
        assert issubclass(getattr(errors, name), errors.PermastructError), name
    assert issubclass(errors.StorageClosedError, ValueError)
    assert issubclass(errors.SchemaError, TypeError)
    assert issubclass(errors.StorageFullError, OSError)


# -- closed storages --------------------------------------------------------------------
def test_stale_proxies_raise_after_close(tmp_path):
    path = tmp_path / "a.ps"
    make_store(path)
    p = MyStorage(path)
    root = p.root
    agent = root.agent
    name = root.name
    text = root.text
    buf = root.buf
    view = memoryview(buf)
    assert view[3] == 3
    p.close()
    with pytest.raises(StorageClosedError) as info:
        p.root
    # a memoryview taken before close must not crash and must not write into the closed file
    # (it may be released - ValueError - or detached from the file)
    try:
        view[3] = 9
    except ValueError:
        pass
    assert "closed" in str(info.value)
    assert str(path) in str(info.value)
    checks = [
        lambda: root.count,
        lambda: root.name,
        lambda: agent.age,
        lambda: agent.name,
        lambda: agent.greeting(),
        lambda: bytes(name),
        lambda: name == b"Felix",
        lambda: hash(name),
        lambda: len(name),
        lambda: str(text),
        lambda: len(buf),
        lambda: bytes(buf),
        lambda: agent.isSameAs(agent),
    ]
    for check in checks:
        with pytest.raises(StorageClosedError) as info:
            check()
        assert "closed" in str(info.value)
        assert str(path) in str(info.value)
    writes = [
        lambda: setattr(root, "count", 5),
        lambda: setattr(root, "name", b"x"),
        lambda: setattr(agent, "age", 1),
        lambda: setattr(root, "agent", None),
    ]
    for write in writes:
        with pytest.raises(StorageClosedError):
            write()
    with pytest.raises(StorageClosedError):
        memoryview(buf)
    with pytest.raises(StorageClosedError):
        p.commit()
    with pytest.raises(StorageClosedError):
        p.schema.Agent(age=1)
    with pytest.raises(StorageClosedError):
        p.check()
    # nothing was written after close
    p2 = MyStorage(path)
    assert p2.root.count == 42
    assert p2.root.agent.age == 37
    assert bytes(p2.root.buf) == bytes(range(100))
    p2.check()
    p2.close()


def test_stale_proxies_after_close_in_subprocess(tmp_path):
    path = tmp_path / "a.ps"
    make_store(path)
    code = f"""
        import sys
        from permastruct import Storage
        from permastruct.errors import StorageClosedError
        p = Storage({str(path)!r})
        root = p.root
        agent = root.agent
        name = root.name
        buf = root.buf
        m = memoryview(buf)
        p.close()
        results = []
        for label, action in [
            ("read int", lambda: root.count),
            ("read ref", lambda: root.agent),
            ("read agent", lambda: agent.age),
            ("write int", lambda: setattr(root, "count", 1)),
            ("write ref", lambda: setattr(root, "name", b"zz")),
            ("write agent", lambda: setattr(agent, "age", 2)),
            ("bytes", lambda: bytes(name)),
            ("buf bytes", lambda: bytes(buf)),
            ("buf len", lambda: len(buf)),
        ]:
            try:
                action()
            except StorageClosedError:
                results.append(label)
            else:
                print("NO ERROR:", label)
                sys.exit(3)
        try:
            m[0]
        except ValueError:
            pass
        else:
            print("memoryview still usable after close")
        try:
            m[0] = 1
        except (ValueError, TypeError):
            pass
        import gc; gc.collect()
        print("OK", len(results))
    """
    result = run_python(code)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "OK 9" in result.stdout
    p = MyStorage(path)
    assert p.root.count == 42
    assert p.root.name == b"Felix"
    assert p.root.agent.age == 37
    p.close()


def test_stale_proxies_after_rollback_in_subprocess(tmp_path):
    """Proxies of objects made in a rolled-back transaction raise DeadProxyError, even after new
    objects took their places; the process never crashes (issue 11: proxies no longer pin the map)."""
    path = tmp_path / "a.ps"
    make_store(path)
    code = f"""
        import sys
        from permastruct import Storage
        from permastruct.errors import DeadProxyError
        p = Storage({str(path)!r})
        root = p.root
        Agent = type(root.agent)
        made = [Agent(age=i) for i in range(200)]
        root.agent = made[0]
        name = root.name = b"x" * 100
        name = root.name
        p.rollback()
        reused = [Agent(age=-i) for i in range(400)]  # the freed slots are handed out again
        dead = 0
        for proxy in made + [name]:
            try:
                proxy.age if proxy is not name else bytes(proxy)
            except DeadProxyError:
                dead += 1
            else:
                print("NO ERROR for", type(proxy).__name__)
                sys.exit(3)
        assert root.agent.age == 37 and root.name == b"Felix", (root.agent.age, bytes(root.name))
        assert [a.age for a in reused[:3]] == [0, -1, -2]
        p.rollback()
        p.check()
        p.close()
        print("OK", dead)
    """
    result = run_python(code)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "OK 201" in result.stdout
    with MyStorage(path) as p:
        assert p.root.agent.age == 37
        p.check()


def test_check_returns_summary(tmp_path):
    path = tmp_path / "a.ps"
    make_store(path)
    p = MyStorage(path)
    try:
        summary = p.check()
        assert isinstance(summary, dict)
        assert summary["objects"] >= 6  # root, agent, 3 strings, buffer (+ schema)
        assert summary["types"]["Spy"] == 1
        assert summary["types"]["Root"] == 1
        assert summary["page_size"] == PAGE
    finally:
        p.close()


# -- growth ------------------------------------------------------------------------------
class GrowStorage(Storage):
    def populateSchema(self):
        class Agent(self.schema.Structure):
            name = self.schema.ByteString
            age = self.schema.Int

        class Node(self.schema.Structure):
            agent = Agent
            payload = self.schema.Buffer

        class LinkedNode(Node):
            next = Node

        class Root(self.schema.Structure):
            buf = self.schema.Buffer
            first = Node


def test_growth_keeps_views_valid(tmp_path):
    path = tmp_path / "big.ps"
    pattern = bytes(range(256)) * 16
    p = GrowStorage(path, fileSize=16000)
    assert p.fileSize < 1024 * 1024
    early = p.schema.Buffer(pattern)
    m = memoryview(early)
    p.root.buf = early
    early_node = p.schema.LinkedNode(agent=p.schema.Agent(name=b"early", age=-1))
    p.root.first = early_node

    chunk = bytes(range(256)) * 4096  # 1 MiB
    i = 0
    n = 0
    while p.fileSize <= 50 * 1024 * 1024:
        for j in range(50):
            node = p.schema.LinkedNode(agent=p.schema.Agent(name=b"agent-%d" % n, age=n),
                                       next=p.root.first)
            if j == 0:
                node.payload = bytearray([i % 256]) + chunk[1:]
            p.root.first = node
            n += 1
        i += 1
        assert i < 200
        assert m[:256].tobytes() == bytes(range(256))
    assert os.path.getsize(path) > 50 * 1024 * 1024
    assert m.tobytes() == pattern
    assert early_node.agent.name == b"early"
    m[0] = 200
    assert bytes(p.root.buf)[0] == 200
    p.commit()
    summary = p.check()
    assert summary["types"]["LinkedNode"] == n + 1
    assert summary["types"]["Buffer"] == i + 1
    m.release()
    del m, early, early_node, node
    p.close()

    p = GrowStorage(path)
    try:
        assert os.path.getsize(path) > 50 * 1024 * 1024
        data = bytes(p.root.buf)
        assert data[0] == 200 and data[1:] == pattern[1:]
        node = p.root.first
        expected = n - 1
        buffers = 0
        while node.next is not None:
            assert type(node).__name__ == "LinkedNode"
            assert node.agent.age == expected
            assert node.agent.name == b"agent-%d" % expected
            if node.payload is not None:
                buffers += 1
                assert len(node.payload) == 1024 * 1024
                raw = bytes(node.payload)
                assert raw[0] == (expected // 50) % 256
                assert raw[1:] == chunk[1:]
            expected -= 1
            node = node.next
        assert expected == -1
        assert node.agent.name == b"early"
        assert buffers == i
        summary = p.check()
        assert summary["types"]["Agent"] == n + 1
    finally:
        p.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_refuses_the_parents_storage(tmp_path):
    """DESIGN 3.8: a storage used in a forked child refuses with a clear error; the parent goes on."""
    import permastruct
    p = permastruct.Storage(tmp_path / "fork.ps")
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what happened through the pipe, never run pytest code
        os.close(reader)
        outcome = "no error"
        try:
            p.commit()
        except permastruct.PermastructError as exc:
            outcome = "refused: " + str(exc)
        p.close()  # allowed, and must not write or unlock anything
        os.write(writer, outcome.encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    assert outcome.startswith("refused: ") and "forked" in outcome, outcome
    p.stringRegistry.get("after the fork")
    p.commit()
    p.close()
    with permastruct.Storage(tmp_path / "fork.ps") as again:
        assert "after the fork" in again.stringRegistry


# -- the files of a store (issue 17 items 1, 2; issue 16 items 11, 12) ---------------------------
def test_a_clean_close_leaves_only_the_store(tmp_path):
    path = tmp_path / "only.ps"
    with MyStorage(path) as p:
        p.root.count = 1
        p.commit()
        assert os.path.exists(f"{path}-wal")  # the commit went through the log
        p.root.count = 2
    assert sorted(os.listdir(tmp_path)) == ["only.ps"]
    with MyStorage(path) as p:
        assert p.root.count == 2


def test_the_log_stays_while_a_reader_holds_an_older_snapshot(tmp_path):
    path = tmp_path / "held.ps"
    p = MyStorage(path)
    p.root.count = 1
    p.commit()
    reader = MyStorage(path, readonly=True)
    p.root.count = 2
    p.close()  # the reader's snapshot (transaction of count=1) keeps the last commit in the log
    assert os.path.exists(f"{path}-wal")
    assert reader.root.count == 1
    reader.refresh()
    assert reader.root.count == 2
    reader.close()
    with MyStorage(path) as p:
        assert p.root.count == 2
    assert sorted(os.listdir(tmp_path)) == ["held.ps"]


def test_an_empty_file_becomes_a_store(tmp_path):
    """tempfile.mkstemp() users: an existing empty file is taken as a new store, in place."""
    import tempfile
    handle, name = tempfile.mkstemp(dir=tmp_path, suffix=".ps")
    os.close(handle)
    inode = os.stat(name).st_ino
    with MyStorage(name) as p:
        p.root.name = b"kept"
    assert os.stat(name).st_ino == inode
    with MyStorage(name) as p:
        assert p.root.name == b"kept"
        p.check()


def test_an_empty_file_is_refused_by_a_reader_and_left_empty(tmp_path):
    path = tmp_path / "empty.ps"
    path.write_bytes(b"")
    with pytest.raises(NotAStorageError):
        MyStorage(path, readonly=True)
    assert path.read_bytes() == b""


def test_an_unfinished_creation_in_an_empty_file_is_created_again(tmp_path):
    """Creation in place writes the header block without its magic, syncs, then the magic."""
    path = tmp_path / "half.ps"
    with MyStorage(tmp_path / "model.ps") as p:
        pass
    block = (tmp_path / "model.ps").read_bytes()[:4096]
    path.write_bytes(bytes(8) + block[8:])  # everything but the magic reached the disk
    with pytest.raises(NotAStorageError):
        MyStorage(path, readonly=True)
    with MyStorage(path) as p:
        p.root.count = 3
    with MyStorage(path) as p:
        assert p.root.count == 3


def test_a_failed_schema_on_a_new_path_leaves_nothing(tmp_path):
    class Broken(Storage):
        def populateSchema(self):
            class Root(self.schema.Structure):
                count = self.schema.Int
            raise RuntimeError("a mistake in populateSchema")

    with pytest.raises(RuntimeError):
        Broken(tmp_path / "new.ps")
    assert os.listdir(tmp_path) == []
    # the same process can try again at once: no lock or descriptor was left behind
    with MyStorage(tmp_path / "new.ps") as p:
        p.root.count = 1
    (tmp_path / "empty.ps").write_bytes(b"")
    with pytest.raises(RuntimeError):
        Broken(tmp_path / "empty.ps")
    assert (tmp_path / "empty.ps").read_bytes() == b""  # an empty file is empty again


def test_a_failed_creation_can_be_retried_in_the_same_process(tmp_path):
    path = tmp_path / "big.ps"
    with pytest.raises((OverflowError, OSError, ValueError)):
        MyStorage(path, fileSize=2 ** 50)  # no file system holds this
    assert os.listdir(tmp_path) == []
    with MyStorage(path) as p:
        p.root.count = 5
    with MyStorage(path) as p:
        assert p.root.count == 5


def test_two_processes_creating_one_path_make_one_store(tmp_path):
    """Creation is atomic (a file with a name is linked whole): of two processes racing to
    create a store, one creates it and the other opens that store (waiting for its lock)."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {SRC_DIR!r})
        from permastruct import Storage
        class Race(Storage):
            def populateSchema(self):
                class Root(self.schema.Structure):
                    who = self.schema.String
                    count = self.schema.Int
        start = float(sys.argv[2])
        while time.time() < start:
            pass
        with Race(sys.argv[1], timeout=30) as p:
            if p.root.who is None:
                p.root.who = sys.argv[3]
            p.root.count += 1
        print("ok")
    """)
    for round_ in range(6):
        path = str(tmp_path / f"race{round_}.ps")
        start = __import__("time").time() + 0.5
        children = [subprocess.Popen([sys.executable, "-c", script, path, str(start), name],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for name in ("a", "b")]
        for child in children:
            out, err = child.communicate(timeout=120)
            assert child.returncode == 0 and out.strip() == "ok", err[-2000:]
        with Storage(path) as p:
            assert p.root.count == 2 and str(p.root.who) in ("a", "b")
            p.check()
        assert sorted(os.listdir(tmp_path))[-1] == f"race{round_}.ps"
    assert not [name for name in os.listdir(tmp_path) if "creating" in name]


def test_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "fifo.ps"
    os.mkfifo(path)
    for readonly in (True, False):
        with pytest.raises(NotAStorageError, match="FIFO"):
            MyStorage(path, readonly=readonly)
    with pytest.raises(NotAStorageError, match="directory"):
        MyStorage(tmp_path)


# -- lifecycle and error classes (issue 17 items 5, 6) ---------------------------------------------
def test_a_storage_dropped_without_close_warns_and_releases_its_lock(tmp_path):
    import gc
    import warnings
    path = tmp_path / "dropped.ps"
    with MyStorage(path) as p:
        p.root.count = 1
    p = MyStorage(path)
    p.root.count = 2  # never committed: lost, as documented
    proxy = p.root
    del p, proxy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) and "dropped.ps" in str(w.message) for w in caught)
    with MyStorage(path) as p:  # the lock was released: the same process can open it again
        assert p.root.count == 1


def test_a_closed_storage_gives_no_warning(tmp_path):
    import gc
    import warnings
    p = MyStorage(tmp_path / "closed.ps")
    p.close()
    del p
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_opening_twice_for_writing_in_one_process_says_so(tmp_path):
    from permastruct.errors import StorageLockedError
    path = tmp_path / "twice.ps"
    p = MyStorage(path)
    try:
        with pytest.raises(StorageLockedError, match="already open for writing in this process"):
            MyStorage(path)
        link = tmp_path / "link.ps"
        os.symlink(path, link)
        with pytest.raises(StorageLockedError, match="already open for writing in this process"):
            MyStorage(link)
        with pytest.raises(StorageLockedError, match="already open for writing in this process"):
            MyStorage(path, timeout=0.05)
    finally:
        p.close()


def test_a_lock_held_by_another_process_names_the_wait_only_when_there_was_one(tmp_path):
    from permastruct.errors import StorageLockedError
    path = tmp_path / "other.ps"
    MyStorage(path).close()
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {SRC_DIR!r})
        from permastruct import Storage
        p = Storage({str(path)!r})
        print("open", flush=True)
        sys.stdin.readline()
        p.close()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "open"
        with pytest.raises(StorageLockedError) as info:
            MyStorage(path)
        assert "another process" in str(info.value) and "pass timeout=" in str(info.value)
        with pytest.raises(StorageLockedError) as info:
            MyStorage(path, timeout=0.05)
        assert "after waiting 0.05 s" in str(info.value) and "pass timeout=" not in str(info.value)
    finally:
        child.communicate("\n", timeout=60)


def test_each_condition_has_its_own_error_class():
    from permastruct import errors
    assert issubclass(errors.SyncFailedError, OSError) and issubclass(errors.SyncFailedError, PermastructError)
    assert issubclass(errors.ForkedProcessError, RuntimeError)
    assert issubclass(errors.DeadProxyError, ReferenceError)
    for name in errors.__all__:
        assert getattr(permastruct, name) is getattr(errors, name)


def test_a_proxy_of_a_rolled_back_object_raises_dead_proxy_error(tmp_path):
    from permastruct.errors import DeadProxyError
    with MyStorage(tmp_path / "dead.ps") as p:
        agent = p.schema.Agent(age=3)
        p.rollback()
        with pytest.raises(DeadProxyError, match="rolled back"):
            agent.age


def test_a_failed_fsync_refuses_commits_with_sync_failed_error(tmp_path, monkeypatch):
    import errno
    from permastruct._mapping import FileIO
    from permastruct.errors import SyncFailedError
    path = tmp_path / "sync.ps"
    MyStorage(path).close()
    p = MyStorage(path)
    p.root.count = 1

    def fail(operation, file, *args):
        if operation == "fsync":
            raise OSError(errno.EIO, "injected")
    monkeypatch.setattr(FileIO, "hook", fail)
    with pytest.raises(OSError):
        p.commit()
    monkeypatch.setattr(FileIO, "hook", None)
    with pytest.raises(SyncFailedError):
        p.commit()
    p.close()


# -- bad arguments and use after close (issue 16 items 14, 16) ------------------------------------
@pytest.mark.parametrize("kwargs, error", [
    ({"pageSize": "4096"}, TypeError), ({"pageSize": 1000}, ValueError), ({"pageSize": True}, TypeError),
    ({"timeout": -1}, ValueError), ({"timeout": float("nan")}, ValueError), ({"timeout": "1"}, ValueError),
])
def test_bad_arguments_are_refused_alike_on_create_reopen_and_read(tmp_path, kwargs, error):
    path = tmp_path / "args.ps"
    with pytest.raises(error):
        MyStorage(path, **kwargs)  # create
    assert not path.exists()
    MyStorage(path).close()
    with pytest.raises(error):
        MyStorage(path, **kwargs)  # reopen
    with pytest.raises(error):
        MyStorage(path, readonly=True, **kwargs)
    with pytest.raises(error):
        MyStorage(None, **kwargs)


def test_the_string_registry_of_a_closed_storage_says_closed(tmp_path):
    p = MyStorage(tmp_path / "reg.ps")
    registry = p.stringRegistry
    registry.get("x")
    p.close()
    for use in (lambda: len(registry), lambda: registry.get("y"), lambda: "x" in registry,
                lambda: list(registry)):
        with pytest.raises(StorageClosedError):
            use()


def test_deleting_a_field_is_an_attribute_error(tmp_path):
    with MyStorage(tmp_path / "del.ps") as p:
        for name in ("count", "name", "agent", "nothing"):
            with pytest.raises(AttributeError):
                delattr(p.root, name)
        assert p.root.count == 0


def test_a_dict_size_hint_beyond_what_a_table_holds_is_refused(tmp_path):
    from permastruct import Dict

    class D(Storage):
        def populateSchema(self):
            self.define(Dict("Counts")[self.schema.Int, self.schema.Int])

    with D(tmp_path / "d.ps") as p:
        with pytest.raises(OverflowError):
            p.schema.Counts(size=2 ** 40)
        with pytest.raises(TypeError):
            p.schema.Counts(size=-1)
        p.check()
