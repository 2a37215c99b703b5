"""Persistent strings, the string registry and persistent buffers.

Contract: DESIGN.md sections 3.5 and 3.6 (and the read-only part of 3.8).
"""

import contextlib
import ctypes
import gc
import os
import struct
import subprocess
import sys
import textwrap
from array import array

import pytest

import permastruct
from permastruct import Storage, _types
from permastruct.errors import CorruptStorageError, PermastructError, ReadOnlyError, StorageClosedError

SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(permastruct.__file__)))


class MyStorage(Storage):
    def populateSchema(self):
        class Agent(self.schema.Structure):
            name = self.schema.ByteString
            title = self.schema.String
            age = self.schema.Int

        class Root(self.schema.Structure):
            name = self.schema.ByteString
            other = self.schema.ByteString
            text = self.schema.String
            buf = self.schema.Buffer
            buf2 = self.schema.Buffer
            agent = Agent
            count = self.schema.Int


@pytest.fixture
def store(tmp_path):
    p = MyStorage(tmp_path / "a.ps")
    yield p
    if not p.closed:
        p.check()
        p.close()


def run_python(code, **env_extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC_DIR + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=120)


# -- strings -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [b"", b"Felix", b"\x00\xff" * 100, bytes(range(256))])
def test_bytestring_proxy(store, value):
    s = store.schema.ByteString(value)
    assert s == value
    assert value == s
    assert not (s != value)
    assert s != value + b"!"
    assert hash(s) == hash(value)
    assert len(s) == len(value)
    assert bytes(s) == value
    assert s.contents == value and type(s.contents) is bytes
    assert s == store.schema.ByteString(value)
    assert s != store.schema.ByteString(value + b"?")
    assert s != value.decode("latin-1")  # bytes never equal str
    store.root.name = s
    assert store.root.name == value


@pytest.mark.parametrize("value", ["", "Moneypenny", "h\u00e9llo w\u00f6rld \u2764 \U0001f600", "a" * 5000])
def test_string_proxy(store, value):
    s = store.schema.String(value)
    assert s == value
    assert value == s
    assert not (s != value)
    assert s != value + "!"
    assert hash(s) == hash(value)
    assert len(s) == len(value)
    assert str(s) == value
    assert s.contents == value and type(s.contents) is str
    assert s == store.schema.String(value)
    store.root.text = s
    assert store.root.text == value


def test_strings_as_dict_keys(store):
    d = {b"Felix": 1, "Moneypenny": 2}
    assert d[store.schema.ByteString(b"Felix")] == 1
    assert d[store.schema.String("Moneypenny")] == 2
    e = {store.schema.ByteString(b"Q"): "gadgets"}
    assert e[b"Q"] == "gadgets"
    assert {store.schema.ByteString(b"x"), b"x"} == {b"x"}


def test_bytestring_and_string_differ(store):
    b = store.schema.ByteString(b"same")
    s = store.schema.String("same")
    assert b != s
    assert b == b"same" and s == "same"
    assert b != "same"
    assert s != b"same"


def test_string_constructors_refuse_wrong_types(store):
    with pytest.raises(TypeError):
        store.schema.ByteString("a str")
    with pytest.raises(TypeError):
        store.schema.String(b"bytes")
    with pytest.raises(TypeError):
        store.schema.String(5)


def test_strings_round_trip_across_reopen(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    p.root.name = b"\x00binary\xff"
    p.root.text = "\u2764 text"
    p.close()
    p = MyStorage(path)
    assert p.root.name == b"\x00binary\xff"
    assert hash(p.root.name) == hash(b"\x00binary\xff")
    assert p.root.text == "\u2764 text"
    assert len(p.root.text) == 6
    p.close()


# -- the string registry ---------------------------------------------------------------------
def test_registry_interns(store):
    reg = store.stringRegistry
    assert len(reg) == 0
    a = reg.get(b"James Bond")
    b = reg.get(b"James Bond")
    assert a.isSameAs(b)
    assert a == b"James Bond"
    assert type(a).__name__ == "ByteString"
    c = reg.get(bytearray(b"James Bond"))
    assert c.isSameAs(a)
    s = reg.get("James Bond")
    assert type(s).__name__ == "String"
    assert s == "James Bond"
    assert not s.isSameAs(a)
    assert reg.get("James Bond").isSameAs(s)
    # a persistent string with equal contents maps to the interned one
    assert reg.get(store.schema.ByteString(b"James Bond")).isSameAs(a)
    assert len(reg) == 2
    assert b"James Bond" in reg
    assert "James Bond" in reg
    assert b"Dr. No" not in reg
    assert "Dr. No" not in reg
    assert len(reg) == 2  # `in` does not intern
    assert sorted(repr(x.contents) for x in reg) == sorted([repr(b"James Bond"), repr("James Bond")])
    other = reg.get(b"Dr. No")
    assert not other.isSameAs(a)
    assert len(reg) == 3
    store.check()


def test_registry_across_reopen(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    names = [b"James Bond", b"M", b"Q", b"Moneypenny"]
    reprs = {n: repr(p.stringRegistry.get(n)) for n in names}
    text_repr = repr(p.stringRegistry.get("Felix Leiter"))
    p.root.name = p.stringRegistry.get(b"James Bond")
    p.close()
    for cls in (MyStorage, Storage):
        p = cls(path)
        reg = p.stringRegistry
        assert len(reg) == 5
        for n in names:
            assert n in reg
            assert repr(reg.get(n)) == reprs[n]
        assert repr(reg.get("Felix Leiter")) == text_repr
        assert reg.get(b"James Bond").isSameAs(p.root.name)
        assert {x.contents for x in reg} == set(names) | {"Felix Leiter"}
        assert len(reg) == 5
        p.check()
        p.close()


def test_registry_grows(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path, stringRegistrySize=4)
    reg = p.stringRegistry
    keys = [b"key-%d" % i for i in range(1000)]
    first = {}
    for i, k in enumerate(keys):
        first[k] = repr(reg.get(k))
        if i % 250 == 0:
            p.check()
    assert len(reg) == 1000
    for k in keys:
        assert k in reg
        assert repr(reg.get(k)) == first[k]
    assert len(reg) == 1000
    assert {x.contents for x in reg} == set(keys)
    summary = p.check()
    assert summary["strings"] == 1000
    p.close()
    p = MyStorage(path)
    reg = p.stringRegistry
    assert len(reg) == 1000
    for k in keys:
        assert repr(reg.get(k)) == first[k]
    p.check()
    p.close()


def test_registry_refuses_non_strings(store):
    with pytest.raises(TypeError):
        store.stringRegistry.get(5)
    assert 5 not in store.stringRegistry


def test_interned_strings_are_not_freed(store):
    reg = store.stringRegistry
    interned = reg.get(b"Blofeld")
    where = repr(interned)
    store.root.name = interned
    store.root.other = interned
    store.root.agent = store.schema.Agent(name=interned, title=reg.get("Number One"))
    del interned
    store.commit()
    before = store.check()["objects"]
    store.root.name = None
    store.root.other = b"something else"
    store.root.agent = None
    store.commit()
    assert b"Blofeld" in reg
    assert "Number One" in reg
    assert repr(reg.get(b"Blofeld")) == where
    assert reg.get(b"Blofeld") == b"Blofeld"
    summary = store.check()
    # the agent went away, the interned strings stayed, a new ByteString came
    assert summary["objects"] == before
    assert summary["strings"] == 2


def test_registry_hash_is_process_independent(tmp_path):
    path = tmp_path / "a.ps"
    keys = [f"name-{i}" for i in range(200)] + ["James Bond", "\u00e9t\u00e9"]
    write = f"""
        from permastruct import Storage
        class S(Storage):
            def populateSchema(self):
                class Root(self.schema.Structure):
                    name = self.schema.String
        p = S({str(path)!r}, stringRegistrySize=4)
        for k in {keys!r}:
            p.stringRegistry.get(k)
            p.stringRegistry.get(k.encode())
        p.root.name = p.stringRegistry.get("James Bond")
        for k in {keys!r}:
            print(repr(p.stringRegistry.get(k)), repr(p.stringRegistry.get(k.encode())))
        p.check()
        p.close()
    """
    first = run_python(write, PYTHONHASHSEED="1")
    assert first.returncode == 0, first.stderr
    expected = first.stdout
    assert expected.count("persistent String") == len(keys)
    read = f"""
        from permastruct import Storage
        p = Storage({str(path)!r})
        keys = {keys!r}
        for k in keys:
            assert k in p.stringRegistry, k
            assert k.encode() in p.stringRegistry, k
        assert "not there" not in p.stringRegistry
        n = len(p.stringRegistry)
        for k in keys:
            print(repr(p.stringRegistry.get(k)), repr(p.stringRegistry.get(k.encode())))
        assert len(p.stringRegistry) == n == 2 * len(keys), (n, len(keys))
        assert p.stringRegistry.get("James Bond").isSameAs(p.root.name)
        p.check()
        p.close()
    """
    for seed in ("2", "3"):
        result = run_python(read, PYTHONHASHSEED=seed)
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected


# -- buffers ----------------------------------------------------------------------------------
def view_attrs(m):
    return m.format, m.itemsize, m.ndim, m.shape, m.strides


@pytest.mark.parametrize("make", [
    lambda: b"This is a string.",
    lambda: bytearray(b"\x01\x02\x03\x04"),
    lambda: array("d", [1.5, 2.5, -3.0]),
    lambda: array("i", [1, -2, 3, 2 ** 31 - 1]),
    lambda: array("b", range(-5, 5)),
    lambda: array("Q", [2 ** 64 - 1, 0]),
    lambda: memoryview(bytearray(24)).cast("d", (3, 1)),
    lambda: memoryview(bytearray(range(24))).cast("B", (2, 3, 4)),
    lambda: memoryview(array("h", range(12))).cast("B").cast("h", (3, 4)),
], ids=["bytes", "bytearray", "array-d", "array-i", "array-b", "array-Q", "2d-d", "3d-B", "2d-h"])
def test_buffer_metadata(tmp_path, make):
    path = tmp_path / "a.ps"
    source = make()
    expected = memoryview(source)
    p = MyStorage(path)
    buf = p.schema.Buffer(source)
    p.root.buf = buf
    m = memoryview(buf)
    assert view_attrs(m) == view_attrs(expected)
    assert m.readonly is False
    assert m.tobytes() == expected.tobytes()
    assert m.tolist() == expected.tolist()
    assert len(buf) == expected.nbytes
    assert bytes(buf) == expected.tobytes()
    m.release()
    p.check()
    p.close()
    p = MyStorage(path)
    m = memoryview(p.root.buf)
    assert view_attrs(m) == view_attrs(expected)
    assert m.tolist() == expected.tolist()
    assert m.readonly is False
    m.release()
    p.close()


def test_seed_doctest_ported(tmp_path):
    p = MyStorage(tmp_path / "a.ps", fileSize=16000, stringRegistrySize=32)
    s = b"This is a string."
    p.root.buf = p.schema.Buffer(s)
    m = memoryview(p.root.buf)
    assert (m.format, m.itemsize, m.ndim, m.readonly, m.shape, m.strides) == ("B", 1, 1, False, (17,), (1,))
    assert m.tobytes() == s
    del m
    p.close()


def test_non_contiguous_source_is_stored_c_contiguous(store):
    base = bytearray(range(20))
    source = memoryview(base)[::3]
    assert not source.c_contiguous
    buf = store.schema.Buffer(source)
    m = memoryview(buf)
    assert m.c_contiguous
    assert m.format == "B" and m.shape == (7,) and m.strides == (1,)
    assert m.tolist() == list(range(0, 20, 3))
    assert bytes(buf) == bytes(range(0, 20, 3))
    assert len(buf) == 7

    # a 2-D view with a step in the outer dimension: non-contiguous
    source2 = memoryview(array("i", range(24))).cast("B").cast("i", (6, 4))[::2]
    assert not source2.c_contiguous
    buf2 = store.schema.Buffer(source2)
    m2 = memoryview(buf2)
    assert m2.shape == (3, 4)
    assert m2.strides == (16, 4)
    assert m2.tolist() == source2.tolist()
    m.release()
    m2.release()


def test_buffer_copies_its_source(store):
    source = bytearray(b"abcdef")
    buf = store.schema.Buffer(source)
    source[0] = ord("z")
    assert bytes(buf) == b"abcdef"


def test_writes_through_memoryview_persist(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    p.root.buf = array("d", [0.0] * 4)
    p.root.buf2 = bytes(8)
    m = memoryview(p.root.buf)
    m[1] = 2.5
    m[3] = -1.0
    m2 = memoryview(p.root.buf2)
    m2[0:4] = b"\x01\x02\x03\x04"
    assert memoryview(p.root.buf).tolist() == [0.0, 2.5, 0.0, -1.0]
    assert bytes(p.root.buf2)[:4] == b"\x01\x02\x03\x04"
    m.release()
    m2.release()
    p.commit()
    p.close()
    p = MyStorage(path)
    assert memoryview(p.root.buf).tolist() == [0.0, 2.5, 0.0, -1.0]
    assert bytes(p.root.buf2) == b"\x01\x02\x03\x04" + bytes(4)
    p.check()
    p.close()


def test_writes_through_memoryview_roll_back(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    p.root.buf = bytes(16)
    p.commit()
    m = memoryview(p.root.buf)
    m[0] = 7
    m.release()
    p.rollback()
    assert bytes(p.root.buf) == bytes(16)
    p.close()


def test_buffer_refuses_non_buffers(store):
    with pytest.raises(TypeError) as info:
        store.schema.Buffer([1, 2])
    assert str(info.value) == "Objects of type 'list' does not support the buffer protocol."
    with pytest.raises(TypeError) as info:
        store.schema.Buffer(5)
    assert str(info.value) == "Objects of type 'int' does not support the buffer protocol."
    with pytest.raises(TypeError):
        store.root.buf = [1, 2]
    assert store.root.buf is None


def test_buffer_len_and_bytes(store):
    buf = store.schema.Buffer(array("d", [1.0, 2.0]))
    assert len(buf) == 16
    assert bytes(buf) == array("d", [1.0, 2.0]).tobytes()
    empty = store.schema.Buffer(b"")
    assert len(empty) == 0
    assert bytes(empty) == b""
    assert memoryview(empty).nbytes == 0


def test_buffer_equality(store):
    a = store.schema.Buffer(b"xyz")
    b = store.schema.Buffer(b"xyz")
    c = store.schema.Buffer(b"xyw")
    assert a == b
    assert a != c
    assert a.isSameAs(a) and not a.isSameAs(b)


def test_numpy_zero_copy(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    p.root.buf = np.arange(12, dtype=np.float64).reshape(3, 4)
    buf = p.root.buf
    a = np.asarray(buf)
    assert a.shape == (3, 4) and a.dtype == np.float64
    assert a.tolist() == np.arange(12, dtype=np.float64).reshape(3, 4).tolist()
    b = np.asarray(p.root.buf)
    assert np.shares_memory(a, b)
    a[1, 2] = 99.0
    assert b[1, 2] == 99.0
    assert memoryview(p.root.buf)[1, 2] == 99.0
    assert a.flags.writeable
    del a, b, buf
    p.commit()
    p.close()
    p = MyStorage(path)
    c = np.asarray(p.root.buf)
    assert c[1, 2] == 99.0 and c[2, 3] == 11.0
    del c
    p.close()


def test_numpy_source_formats(store):
    np = pytest.importorskip("numpy")
    for source in (np.arange(10, dtype=np.int32), np.ones((2, 3), dtype=np.float32),
                   np.arange(20, dtype=np.int16)[::2], np.zeros(5, dtype=np.uint64)):
        buf = store.schema.Buffer(source)
        back = np.asarray(buf)
        assert back.dtype == source.dtype
        assert back.shape == source.shape
        assert np.array_equal(back, source)
        assert back.flags.c_contiguous


def test_readonly_storage(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    p.root.buf = array("i", [1, 2, 3])
    p.root.name = b"name"
    p.root.agent = p.schema.Agent(name=b"A", age=5)
    p.stringRegistry.get(b"interned")
    p.close()
    before = path.read_bytes()
    for cls in (MyStorage, Storage):
        r = cls(path, readonly=True)
        m = memoryview(r.root.buf)
        assert m.readonly is True
        assert m.tolist() == [1, 2, 3]
        assert m.format == "i"
        with pytest.raises(TypeError):
            m[0] = 5
        m.release()
        root = r.root
        for field, value in (("count", 1), ("name", b"x"), ("name", None), ("buf", b"x"),
                             ("agent", None)):
            with pytest.raises(ReadOnlyError):
                setattr(root, field, value)
        with pytest.raises(ReadOnlyError):
            root.agent.age = 6
        with pytest.raises(ReadOnlyError):
            r.schema.Agent(age=1)
        with pytest.raises(ReadOnlyError):
            r.schema.ByteString(b"new")
        with pytest.raises(ReadOnlyError):
            r.stringRegistry.get(b"not interned yet")
        assert r.stringRegistry.get(b"interned") == b"interned"
        assert root.agent.age == 5 and root.name == b"name" and root.count == 0
        r.check()
        r.close()
    assert path.read_bytes() == before


def test_readonly_numpy_is_readonly(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    p.root.buf = np.arange(4, dtype=np.int64)
    p.close()
    r = MyStorage(path, readonly=True)
    a = np.asarray(r.root.buf)
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 1
    assert a.tolist() == [0, 1, 2, 3]
    del a
    r.close()


# -- any format, zero extents, 0-d: the hand-filled exporter (DESIGN 3.5) ----------------------
_GET_BUFFER = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)(
    ("PyObject_GetBuffer", ctypes.pythonapi))
_RELEASE_BUFFER = ctypes.PYFUNCTYPE(None, ctypes.c_void_p)(("PyBuffer_Release", ctypes.pythonapi))
PyBUF_SIMPLE, PyBUF_WRITABLE, PyBUF_ND = 0, 0x1, 0x8
PyBUF_F_CONTIGUOUS = _types.PyBUF_F_CONTIGUOUS
PyBUF_FULL_RO = _types.PyBUF_FULL_RO


def exported(data, fmt, itemsize, shape, readonly=False):
    """A memoryview of a copy of ``data`` with any ``fmt`` and ``shape`` (a source no stdlib type makes)."""
    backing = bytearray(data) + b"\0"  # never empty: c_char.from_buffer needs a byte
    pin = memoryview(backing)
    address = ctypes.addressof(ctypes.c_char.from_buffer(backing))
    return memoryview(_types.MemoryExporter(address, len(data), itemsize, fmt, shape, readonly,
                                            keep=(backing, pin)))


@contextlib.contextmanager
def raw_buffer(obj, flags):
    """``PyObject_GetBuffer(obj, flags)`` as a PyBuffer structure, released on exit."""
    view = _types.PyBuffer()
    # the object goes by address: ctypes would ask a closed proxy for _as_parameter_ first
    _GET_BUFFER(id(obj), ctypes.addressof(view), flags)  # ctypes raises the exporter's exception
    try:
        yield view
    finally:
        _RELEASE_BUFFER(ctypes.addressof(view))


def live_exporters():
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is _types.MemoryExporter)


def c_strides(itemsize, shape):
    strides = [itemsize] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * shape[axis + 1]
    return tuple(strides)


FORMATS = [
    ("<d", 8, struct.pack("<3d", 1.5, -2.0, 3.25), (3,)),
    (">i", 4, struct.pack(">4i", 1, -2, 3, 2 ** 31 - 1), (2, 2)),
    ("=H", 2, struct.pack("=3H", 1, 2, 65535), (3,)),
    ("2i", 8, struct.pack("6i", *range(6)), (3,)),
    ("T{<i:a:<d:b:}", 12, struct.pack("<id", 1, 1.5) + struct.pack("<id", -2, 2.5), (2,)),
    ("<q", 8, struct.pack("<2q", -1, 2 ** 62), (2, 1)),
    ("?", 1, b"\x01\x00\x01", (3,)),
    ("Zd", 16, struct.pack("<4d", 1, 2, 3, 4), (2,)),  # numpy's complex128, unknown to struct
    (">i", 4, struct.pack(">6i", *range(6)), (1, 2, 3)),
]
FORMAT_IDS = ["<d", ">i", "=H", "2i", "T{}", "<q-2d", "?", "Zd", ">i-3d"]


@pytest.mark.parametrize("fmt, itemsize, data, shape", FORMATS, ids=FORMAT_IDS)
def test_any_format_is_exported_as_stored(tmp_path, fmt, itemsize, data, shape):
    path = tmp_path / "a.ps"
    source = exported(data, fmt, itemsize, shape)
    assert view_attrs(source) == (fmt, itemsize, len(shape), shape, c_strides(itemsize, shape))
    p = MyStorage(path)
    buf = p.schema.Buffer(source)
    p.root.buf = buf
    assert (buf.format, buf.itemsize, buf.shape, len(buf)) == (fmt, itemsize, shape, len(data))
    m = memoryview(buf)
    assert view_attrs(m) == view_attrs(source)
    assert m.readonly is False and m.c_contiguous and m.nbytes == len(data)
    assert m.tobytes() == data == bytes(buf)
    raw = m.cast("B")  # any C-contiguous format casts to bytes
    assert raw.tolist() == list(data)
    if "T{" not in fmt and fmt != "Zd":
        assert m == source  # compared item by item through struct
    raw[0] ^= 0xFF  # zero-copy: the write is in the stored bytes
    assert bytes(buf)[0] == data[0] ^ 0xFF
    raw[0] ^= 0xFF
    raw.release()
    m.release()
    p.commit()
    p.check()
    p.close()
    p = MyStorage(path)
    m = memoryview(p.root.buf)
    assert view_attrs(m) == view_attrs(source)
    assert m.tobytes() == data
    m.release()
    p.close()


@pytest.mark.parametrize("fmt, itemsize, data, shape", FORMATS + [("d", 8, b"", (2, 0)),
                                                                 (">i", 4, struct.pack(">i", 5), ())],
                         ids=FORMAT_IDS + ["zero-extent", "0-d"])
def test_a_persistent_buffer_is_a_source_too(store, fmt, itemsize, data, shape):
    first = store.schema.Buffer(exported(data, fmt, itemsize, shape))
    copy = store.schema.Buffer(first)
    assert not copy.isSameAs(first) and copy == first
    with memoryview(copy) as m, memoryview(first) as n:
        assert view_attrs(m) == view_attrs(n) == (fmt, itemsize, len(shape), shape, c_strides(itemsize, shape))
        assert m.tobytes() == data


def test_memoryview_cast_on_the_view(store):
    buf = store.schema.Buffer(memoryview(array("d", range(6))).cast("B").cast("d", (2, 3)))
    m = memoryview(buf)
    assert m.cast("B").cast("d", (3, 2)).tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    flat = m.cast("B").cast("d")
    flat[5] = 50.0
    assert m[1, 2] == 50.0
    big = store.schema.Buffer(exported(struct.pack(">3i", 1, 2, 3), ">i", 4, (3,)))
    mb = memoryview(big)
    assert mb.cast("B").tobytes() == struct.pack(">3i", 1, 2, 3)
    assert mb.cast("B").cast("I").nbytes == 12
    with pytest.raises(TypeError):  # as for any memoryview: no cast between two non-byte formats
        mb.cast("i")
    with pytest.raises(NotImplementedError):  # memoryview itself cannot index '>i'...
        mb.tolist()
    assert struct.unpack(">3i", mb) == (1, 2, 3)  # ...but struct and numpy read it
    for v in (m, flat, mb):
        v.release()


def test_ctypes_sources_keep_their_format(store):
    class Pair(ctypes.Structure):
        _fields_ = [("a", ctypes.c_int), ("b", ctypes.c_double)]

    class BigPair(ctypes.BigEndianStructure):
        _fields_ = [("a", ctypes.c_int32), ("b", ctypes.c_uint16)]

    sources = [(Pair * 3)((1, 1.5), (2, 2.5), (3, 3.5)), (ctypes.c_uint16 * 3)(1, 2, 3),
               ((ctypes.c_int * 2) * 3)((1, 2), (3, 4), (5, 6)), (BigPair * 2)((1, 2), (3, 4)),
               Pair(7, 7.5)]
    for source in sources:
        expected = memoryview(source)
        buf = store.schema.Buffer(source)
        with memoryview(buf) as m:
            assert view_attrs(m) == view_attrs(expected)
            assert m.tobytes() == bytes(source)
    assert memoryview(Pair(7, 7.5)).ndim == 0  # the last one was 0-d


@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 3), (3, 0, 2), (0, 0)])
def test_zero_extents_keep_their_shape(tmp_path, shape):
    path = tmp_path / "a.ps"
    source = exported(b"", "d", 8, shape)
    p = MyStorage(path)
    p.root.buf = source
    buf = p.root.buf
    assert buf.shape == shape and len(buf) == 0 and bytes(buf) == b""
    m = memoryview(buf)
    assert view_attrs(m) == ("d", 8, len(shape), shape, c_strides(8, shape)) == view_attrs(source)
    assert m.nbytes == 0 and m.c_contiguous and m.f_contiguous
    expected = {(0,): [], (2, 0): [[], []], (0, 3): [], (3, 0, 2): [[], [], []], (0, 0): []}[shape]
    assert m.tolist() == source.tolist() == expected
    m.release()
    p.commit()
    p.close()
    p = MyStorage(path)
    with memoryview(p.root.buf) as m:
        assert m.shape == shape and m.nbytes == 0
    p.check()
    p.close()


def test_zero_size_multidimensional_buffer_exports_an_empty_view(store):
    # once a SystemError: the exporter swallowed cast()'s refusal; then a flat view
    buf = store.schema.Buffer(exported(b"", "d", 8, (2, 0)))
    assert buf.shape == (2, 0) and buf.format == "d"
    m = memoryview(buf)
    assert m.nbytes == 0 and m.format == "d" and m.shape == (2, 0) and m.strides == (0, 8)
    assert m.tolist() == [[], []]
    m.release()


def test_zero_d_buffers(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    p.root.buf = memoryview(bytearray(struct.pack("d", 2.5))).cast("d", [])
    p.root.buf2 = exported(struct.pack(">i", 7), ">i", 4, ())
    m = memoryview(p.root.buf)
    assert (m.ndim, m.shape, m.strides, m.format, m.itemsize) == (0, (), (), "d", 8)
    assert m.tolist() == 2.5 and m[()] == 2.5
    m[()] = 4.0
    assert bytes(p.root.buf) == struct.pack("d", 4.0)
    n = memoryview(p.root.buf2)
    assert (n.ndim, n.shape, n.strides, n.format, n.nbytes) == (0, (), (), ">i", 4)
    assert n.cast("B").tolist() == [0, 0, 0, 7]
    assert struct.unpack(">i", n) == (7,)
    m.release()
    n.release()
    p.commit()
    p.close()
    p = MyStorage(path)
    assert memoryview(p.root.buf)[()] == 4.0
    assert memoryview(p.root.buf2).shape == ()
    p.close()


def test_readonly_storage_views_of_any_format(tmp_path):
    path = tmp_path / "a.ps"
    p = MyStorage(path)
    p.root.buf = exported(struct.pack(">4i", 1, 2, 3, 4), ">i", 4, (2, 2))
    p.root.buf2 = exported(b"", "d", 8, (2, 0))
    p.close()
    r = MyStorage(path, readonly=True)
    for buf, attrs in ((r.root.buf, (">i", 4, 2, (2, 2), (8, 4))), (r.root.buf2, ("d", 8, 2, (2, 0), (0, 8)))):
        m = memoryview(buf)
        assert m.readonly is True
        assert view_attrs(m) == attrs
        with pytest.raises(TypeError):
            m.cast("B")[0:0] = b""  # read-only memory, even empty
        with pytest.raises(BufferError):  # a consumer asking for a writable buffer
            with raw_buffer(buf, PyBUF_WRITABLE):
                pass
        with raw_buffer(buf, PyBUF_FULL_RO) as view:
            assert view.readonly == 1 and view.ndim == 2
        m.release()
    with pytest.raises(TypeError):
        struct.pack_into(">i", r.root.buf, 0, 9)
    assert bytes(r.root.buf) == struct.pack(">4i", 1, 2, 3, 4)
    r.close()


def test_bytes_and_len_are_unchanged(store):
    data = struct.pack(">4i", 1, 2, 3, 4)
    buf = store.schema.Buffer(exported(data, ">i", 4, (2, 2)))
    assert bytes(buf) == data and type(bytes(buf)) is bytes and len(buf) == 16
    with memoryview(buf) as m:
        assert bytes(m) == data
    assert bytearray(buf) == data  # a consumer of the plain buffer protocol


def test_views_keep_their_exporter_and_release_it_once(store):
    buf = store.schema.Buffer(array("d", [0.0, 1.0, 2.0, 3.0]))
    before, refs = live_exporters(), sys.getrefcount(buf)
    m = memoryview(buf)
    assert live_exporters() == before + 1
    part, raw = m[1:3], m.cast("B")
    m.release()  # the slice and the cast still use the exporter
    assert part.tolist() == [1.0, 2.0] and raw.nbytes == 32
    assert live_exporters() == before + 1
    del part
    raw.release()
    assert live_exporters() == before
    assert sys.getrefcount(buf) == refs
    with memoryview(buf) as m2, memoryview(buf) as m3:  # one exporter per export
        assert live_exporters() == before + 2
        assert m2.tolist() == m3.tolist()
    assert live_exporters() == before
    assert sys.getrefcount(buf) == refs


def test_exporter_fills_what_is_asked():
    source = exported(struct.pack(">6i", *range(6)), ">i", 4, (2, 3))
    exporter = source.obj
    refs = sys.getrefcount(exporter)
    with raw_buffer(exporter, PyBUF_FULL_RO) as view:
        assert view.obj == id(exporter) and sys.getrefcount(exporter) > refs  # a new reference
        assert (view.len, view.itemsize, view.readonly, view.ndim) == (24, 4, 0, 2)
        assert ctypes.string_at(view.format) == b">i"
        assert list((ctypes.c_ssize_t * 2).from_address(view.shape)) == [2, 3]
        assert list((ctypes.c_ssize_t * 2).from_address(view.strides)) == [12, 4]
        assert view.suboffsets is None and view.buf == ctypes.addressof(ctypes.c_char.from_buffer(source.cast("B")))
    assert sys.getrefcount(exporter) == refs
    with raw_buffer(exporter, PyBUF_SIMPLE) as view:  # bytes: no format, no shape
        assert (view.len, view.itemsize, view.ndim, view.format, view.shape, view.strides) == (24, 4, 1, None, None,
                                                                                              None)
    with raw_buffer(exporter, PyBUF_ND) as view:
        assert view.ndim == 2 and view.shape and view.strides is None and view.format is None
    assert sys.getrefcount(exporter) == refs  # every export released exactly once
    with pytest.raises(BufferError, match="Fortran"):
        with raw_buffer(exporter, PyBUF_F_CONTIGUOUS):
            pass
    with raw_buffer(exported(b"abc", "B", 1, (3,)).obj, PyBUF_F_CONTIGUOUS) as view:  # 1-D: both orders
        assert view.len == 3
    readonly = exported(b"abc", "B", 1, (3,), readonly=True)
    with pytest.raises(BufferError, match="read-only") as info:
        with raw_buffer(readonly.obj, PyBUF_WRITABLE):
            pass
    assert type(info.value) is BufferError  # the callback's own exception, not a SystemError


def test_exporter_refuses_inconsistent_descriptions():
    data = bytearray(16)
    address = ctypes.addressof(ctypes.c_char.from_buffer(data))
    for args in [(address, 16, 8, "d", (3,)), (address, 16, 8, "d\0", (2,)), (0, 16, 8, "d", (2,)),
                 (address, 16, 8, "d", (-2, -1)), (address, 0, 8, "d", (0, 2 ** 62, 2 ** 62)),
                 (address, 0, 1, "B", (0,) * 65)]:
        with pytest.raises(ValueError):
            _types.MemoryExporter(*args, readonly=False, keep=data)
    with pytest.raises(AttributeError):  # never initialised: the callback's exception reaches the caller
        memoryview(object.__new__(_types.MemoryExporter))
    exporter = _types.MemoryExporter(address, 16, 8, "d", (2,), readonly=False, keep=data)
    with memoryview(exporter) as m:  # what views point at cannot be replaced or freed under them
        exporter.__init__(address, 8, 8, "d", (1,), readonly=False, keep=data)  # built by __new__: no effect
        assert memoryview(exporter).shape == (2,)
        with pytest.raises(AttributeError):
            exporter._ps_format = None
        with pytest.raises(AttributeError):
            del exporter._ps_shape
        assert m.format == "d" and m.shape == (2,)
    assert _types._deliver_exceptions


def test_closed_and_rolled_back_buffers_refuse_views(tmp_path):
    p = MyStorage(tmp_path / "a.ps")
    p.root.buf = b"abc"
    p.commit()
    fresh = p.schema.Buffer(b"new")
    p.rollback()
    with pytest.raises(PermastructError, match="rolled back") as info:
        memoryview(fresh)
    assert not isinstance(info.value, SystemError)
    buf = p.root.buf
    p.close()
    with pytest.raises(StorageClosedError, match="closed"):  # on every version, not a SystemError
        memoryview(buf)
    with pytest.raises(StorageClosedError):
        with raw_buffer(buf, PyBUF_FULL_RO):
            pass


def test_inconsistent_stored_metadata_is_corruption(store):
    buf = store.schema.Buffer(array("i", [1, 2, 3]))
    buf._ps_itemsize = 8  # as a damaged file would have it
    with pytest.raises(CorruptStorageError, match="inconsistent"):
        memoryview(buf)
    buf._ps_itemsize = 4
    with memoryview(buf) as m:
        assert m.tolist() == [1, 2, 3]


def test_close_while_a_view_is_exported(tmp_path):
    path = tmp_path / "a.ps"
    before = live_exporters()
    p = MyStorage(path)
    p.root.buf = exported(struct.pack(">3i", 1, 2, 3), ">i", 4, (3,))
    p.commit()
    m = memoryview(p.root.buf)
    assert len(p._heap.exports) == 1  # what close() tries to release: it cannot while m uses it
    p.close()  # the view keeps its (private) memory mapped; nothing of it reaches the file
    assert m.tobytes() == struct.pack(">3i", 1, 2, 3)
    m.cast("B")[3] = 99
    m.release()
    with pytest.raises(ValueError):
        m.tobytes()
    gc.collect()
    assert len(p._heap.exports) == 0 and live_exporters() == before
    p = MyStorage(path)
    assert bytes(p.root.buf) == struct.pack(">3i", 1, 2, 3)
    p.close()


def test_views_after_close_and_release_in_subprocess(tmp_path):
    """Never a segfault: views used after close, after release and after everything else is gone."""
    path = tmp_path / "a.ps"
    code = f"""
        import gc, struct, sys
        from array import array
        from permastruct import Storage
        from permastruct.errors import StorageClosedError
        try:
            import numpy
        except ImportError:
            numpy = None

        class S(Storage):
            def populateSchema(self):
                class Root(self.schema.Structure):
                    buf = self.schema.Buffer
                    buf2 = self.schema.Buffer

        p = S({str(path)!r})
        p.root.buf = array("d", [1.0, 2.0, 3.0])
        p.root.buf2 = memoryview(bytearray(struct.pack(">3i", 4, 5, 6))).cast("B")
        p.commit()
        buf = p.root.buf
        m = memoryview(buf)
        part = m[1:]
        arr = numpy.asarray(buf) if numpy is not None else None
        released = memoryview(buf)
        released.release()
        p.close()
        try:
            memoryview(buf)
        except StorageClosedError as exc:
            print("closed:", type(exc).__name__)
        try:
            released[0]
        except ValueError as exc:
            print("released:", exc)
        print("after close:", m.tolist(), part.tolist())
        m[0] = 10.0  # private memory: reaches no file
        del p, buf
        gc.collect()
        print("alone:", m.tolist(), part.tolist(), None if arr is None else arr.tolist())
        m.release()
        try:
            m[0]
        except ValueError as exc:
            print("released:", exc)
        print("part:", part.tolist())
        del part, arr
        gc.collect()
        try:
            with open("/proc/self/maps") as maps:
                print("still mapped:", {str(path)!r} in maps.read())
        except OSError:  # not Linux
            print("still mapped: False")
        p = S({str(path)!r})
        print("file:", memoryview(p.root.buf).tolist())
        p.close()
    """
    result = run_python(code)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert "closed: StorageClosedError" in lines
    assert lines.count("released: operation forbidden on released memoryview object") == 2
    assert "after close: [1.0, 2.0, 3.0] [2.0, 3.0]" in lines
    assert any(line.startswith("alone: [10.0, 2.0, 3.0] [2.0, 3.0]") for line in lines)
    assert "part: [2.0, 3.0]" in lines
    assert "still mapped: False" in lines
    assert "file: [1.0, 2.0, 3.0]" in lines


# -- numpy ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [">i4", "<c16", [("a", "<i4"), ("b", "<f8")], "aligned", ">f8-2d",
                                   [("a", "<i4", (2,))], "|b1"],
                         ids=["big-endian-int", "complex", "structured", "structured-aligned", "big-endian-2d",
                              "subarray-field", "bool"])
def test_numpy_non_native_formats_keep_their_dtype(store, dtype):
    np = pytest.importorskip("numpy")
    if dtype == "aligned":
        source = np.zeros(3, dtype=np.dtype([("a", "<i4"), ("b", "<f8")], align=True))
    elif dtype == ">f8-2d":
        source = np.arange(6, dtype=">f8").reshape(2, 3)
    elif isinstance(dtype, list):
        source = np.zeros(3, dtype=dtype)
    else:
        source = np.arange(6).astype(dtype)
    if source.dtype.names:
        source["a"] = [1, 2, 3] if source["a"].ndim == 1 else [[1, 2], [3, 4], [5, 6]]
    buf = store.schema.Buffer(source)
    expected = memoryview(source)
    assert buf.format == expected.format  # stored with the source's format
    assert bytes(buf) == source.tobytes()
    m = memoryview(buf)
    assert (m.format, m.itemsize, m.shape, m.strides) == (expected.format, expected.itemsize,
                                                          expected.shape, expected.strides)
    m.release()
    back = np.asarray(buf)
    assert back.dtype == source.dtype
    assert back.shape == source.shape
    assert np.array_equal(back, source)
    again = np.asarray(buf)
    assert np.shares_memory(back, again)  # zero-copy: both are the stored bytes
    assert back.flags.writeable


@pytest.mark.parametrize("shape", [(2, 0), (0, 3), (3, 0, 2)])
def test_numpy_zero_size_multidimensional(store, shape):
    np = pytest.importorskip("numpy")
    source = np.zeros(shape)
    buf = store.schema.Buffer(source)
    assert len(buf) == 0
    assert bytes(buf) == b""
    m = memoryview(buf)
    assert m.nbytes == 0
    assert m.shape == shape
    assert m.strides == memoryview(source).strides
    m.release()
    assert np.asarray(buf).shape == shape


def test_numpy_zero_d(store):
    np = pytest.importorskip("numpy")
    buf = store.schema.Buffer(np.array(1.5))
    a = np.asarray(buf)
    assert a.shape == () and a.dtype == np.float64 and a[()] == 1.5
    a[()] = 2.5
    assert memoryview(buf)[()] == 2.5


def test_numpy_structured_writes_persist(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "a.ps"
    dtype = np.dtype([("id", "<i4"), ("score", ">f8")])
    p = MyStorage(path)
    p.root.buf = np.zeros(4, dtype=dtype)
    a = np.asarray(p.root.buf)
    a["id"] = [1, 2, 3, 4]
    a["score"][2] = 9.5
    assert np.asarray(p.root.buf)["score"][2] == 9.5
    del a
    p.commit()
    p.close()
    p = MyStorage(path, readonly=True)
    a = np.asarray(p.root.buf)
    assert a.dtype == dtype and a["id"].tolist() == [1, 2, 3, 4] and a["score"][2] == 9.5
    assert not a.flags.writeable
    del a
    p.close()


def test_a_buffer_with_a_long_format_round_trips(tmp_path):
    """A numpy structured dtype of 40 fields has a format of several hundred characters
    (the format length used to be one byte)."""
    numpy = pytest.importorskip("numpy")
    from permastruct import Storage

    class S(Storage):
        def populateSchema(self):
            class Root(self.schema.Structure):
                table = self.schema.Buffer

    dtype = numpy.dtype([(f"column_{i:02d}", "<f8" if i % 2 else "<i4") for i in range(40)])
    rows = numpy.zeros(5, dtype=dtype)
    for i in range(40):
        rows[f"column_{i:02d}"] = numpy.arange(5) * (i + 1)
    assert len(memoryview(rows).format) > 255
    path = tmp_path / "wide.ps"
    with S(path) as p:
        p.root.table = rows
    with S(path) as p:
        back = numpy.asarray(p.root.table)
        assert back.dtype == dtype and (back == rows).all()
        assert p.root.table.format == memoryview(rows).format
        p.check()
        del back


# -- a signal at the entry of a buffer callback ------------------------------------------------
def test_the_buffer_callbacks_take_no_signal_at_their_first_instruction():
    """The C buffer slots are Python callbacks (``_types._callback``): an exception raised before
    their ``try`` (a signal handler's, run at the RESUME that starts a function) would leave the
    slot returning garbage.  On CPython 3.11 and 3.12 each one, and ``_failed`` that their except
    clauses call, starts with RESUME 2, which does not run signal handlers."""
    import dis
    functions = [_types._export_nothing, _types._export_memory, _types._failed]
    if _types.BufferExporter is not None:
        functions.append(_types._forward_to_buffer)
    for function in functions:
        first = next(ins for ins in dis.get_instructions(function) if ins.opname not in ("MAKE_CELL",
                                                                                        "COPY_FREE_VARS"))
        assert first.opname == "RESUME", (function.__name__, first)
        if sys.implementation.name == "cpython" and sys.version_info[:2] in ((3, 11), (3, 12)):
            assert first.arg == 2, f"{function.__name__} starts with RESUME {first.arg}: a signal can land before its try"


def test_keyboard_interrupts_from_a_timer_into_memoryview_of_a_buffer(tmp_path):
    """A SIGALRM handler raising KeyboardInterrupt after random delays of 1-30 us while a loop
    takes ``memoryview()`` of a Buffer: every view is whole, every interrupt comes out as a
    KeyboardInterrupt, and the process never crashes.  (Before the callbacks were shielded, an
    interrupt at the first instruction of the buffer slot's callback left the slot "succeeding"
    with an unfilled Py_buffer: a view of 0 bytes, a SystemError or a segfault, within a second.)"""
    result = run_python(f"""
        import faulthandler, random, signal, time
        faulthandler.enable()
        from permastruct import Storage

        class S(Storage):
            def populateSchema(self):
                class Root(self.schema.Structure):
                    blob = self.schema.Buffer

        p = S({str(tmp_path / "t.ps")!r})
        p.root.blob = bytes(range(256)) * 4
        blob = p.root.blob
        armed = [False]

        def handler(signum, frame):
            if armed[0]:
                armed[0] = False
                raise KeyboardInterrupt

        signal.signal(signal.SIGALRM, handler)
        rng = random.Random(1)
        views = interrupts = 0
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            try:
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, 3e-5))
                for _ in range(200):
                    with memoryview(blob) as m:
                        assert m.nbytes == 1024 and m[5] == 5 and m[1023] == 255, (m.nbytes, m.format)
                    views += 1
                armed[0] = False
            except KeyboardInterrupt:
                interrupts += 1
        signal.setitimer(signal.ITIMER_REAL, 0)
        p.close()
        print("ok", views > 1000, interrupts > 100)
    """)
    assert result.returncode == 0 and result.stdout.split() == ["ok", "True", "True"], (
        result.returncode, result.stdout, result.stderr[-3000:])
    assert "ctypes callback" not in result.stderr, result.stderr[-3000:]
