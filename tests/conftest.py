"""Shared pytest options for the seeded stress tests.

``--seed N``        run the seeded random tests with seed N only (default: a
                    fixed set of seeds, so every run of the suite is the same).
``--iterations N``  steps per seeded test (default: small, so the suite is fast).

``--case TEXT``      run only this case of a seeded sweep (the failure message of
                    a sweep names its cases: test_diskfull's ``op=152,free=4096,kill``).

``open_store(cls, mode, path, **kwargs)`` opens a store in one of the
:data:`STORE_MODES` (a file, in memory, an overlay on a file), so that one suite
runs over all of them; ``reopen_store`` closes one and opens it again where
the mode can (an in-memory store or an overlay commits instead: closing it
would lose everything).

``PERMASTRUCT_STRESS=1`` in the environment raises the defaults for long runs
(more seeds, more steps).  A failure message always names the seed, so a
failing case can be rerun alone with ``--seed``::

    PYTHONPATH=src python3 -m pytest tests/test_stress.py --seed 1234 --iterations 5000
"""

import dis
import functools
import os
import shutil
import tempfile

import pytest

DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_ITERATIONS = 150
LONG_SEEDS = tuple(range(10))
LONG_ITERATIONS = 3000


def _long_run():
    return os.environ.get("PERMASTRUCT_STRESS", "") not in ("", "0")


def pytest_addoption(parser):
    group = parser.getgroup("permastruct", "permastruct stress tests")
    group.addoption("--seed", type=int, default=None,
                    help="run the seeded random stress tests with this seed only "
                         f"(default: the fixed seeds {DEFAULT_SEEDS}, or {LONG_SEEDS[0]}..{LONG_SEEDS[-1]} "
                         "with PERMASTRUCT_STRESS=1)")
    group.addoption("--iterations", type=int, default=None,
                    help=f"steps per seeded stress test (default {DEFAULT_ITERATIONS}, "
                         f"or {LONG_ITERATIONS} with PERMASTRUCT_STRESS=1)")
    group.addoption("--case", default=None,
                    help="run only this case of a seeded sweep, as its failure message names it "
                         "(test_diskfull: op=N,free=BYTES,kill|free)")


def _seeds(config):
    seed = config.getoption("seed", default=None)
    if seed is not None:
        return (seed,)
    return LONG_SEEDS if _long_run() else DEFAULT_SEEDS


def pytest_generate_tests(metafunc):
    """Parametrize every test that asks for ``stress_seed`` with the selected seeds."""
    if "stress_seed" in metafunc.fixturenames:
        metafunc.parametrize("stress_seed", _seeds(metafunc.config), ids=lambda s: f"seed{s}")


@pytest.fixture
def stress_iterations(request):
    """How many random steps a seeded stress test runs."""
    value = request.config.getoption("iterations", default=None)
    if value is None:
        value = LONG_ITERATIONS if _long_run() else DEFAULT_ITERATIONS
    if value < 1:
        raise pytest.UsageError("--iterations must be at least 1")
    return value


def scratch_folder(prefix):
    """A folder for a module's stores, logs and copies, in memory (/dev/shm) when there is one;
    removed with what it holds afterwards (a generator for a module-scoped fixture)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    folder = tempfile.mkdtemp(prefix=prefix, dir=base)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


#: The storage modes a suite can be parametrized over (docs/modes.rst).
STORE_MODES = ("file", "memory", "overlay")


def open_store(cls, mode, path, **kwargs):
    """A new storage of class ``cls``: the file ``path`` ("file"), in memory ("memory", ``path``
    unused) or an overlay whose base is a new empty store at ``path`` ("overlay")."""
    if mode == "memory":
        return cls(None, **kwargs)
    if mode == "overlay":
        if not os.path.exists(path):
            cls(path, **kwargs).close()  # the base: an empty store with the schema
        return cls(path, overlay=True)
    assert mode == "file", mode
    return cls(path, **kwargs)


def reopen_store(p, cls, path):
    """Close ``p`` and open ``path`` again (a file store), or commit (memory, overlay): what the
    caller then sees is the last commit either way."""
    if p.fileName is None or p.overlay:
        p.commit()
        return p
    p.close()
    return cls(path)


#: The instructions where CPython (3.11) delivers a pending signal: it looks for one at a function's
#: entry (``RESUME``), at a backward jump and at a call (as the call returns; an exception the callee
#: raises, or one it checks for before it starts, comes out of the call).  A signal that arrives
#: anywhere else waits for the next of these, so a KeyboardInterrupt never comes between two stores
#: of one tuple assignment, nor between a frame's last instruction and its ``RETURN_VALUE``.  The
#: interrupt injectors fire only at them (see :func:`deliverable`).
_DELIVERY_OPS = frozenset(dis.opmap[name] for name in (
    "RESUME", "JUMP_BACKWARD", "POP_JUMP_BACKWARD_IF_FALSE", "POP_JUMP_BACKWARD_IF_TRUE",
    "POP_JUMP_BACKWARD_IF_NONE", "POP_JUMP_BACKWARD_IF_NOT_NONE", "PRECALL", "CALL", "CALL_FUNCTION_EX")
    if name in dis.opmap)
_CALLS = frozenset(("CALL", "CALL_FUNCTION_EX"))
_RETURN_VALUE = dis.opmap["RETURN_VALUE"]
_DELIVERY = {}  # code object -> the offsets of its instructions where a signal can be delivered


def deliverable(frame):
    """Whether a pending interrupt can be delivered at the instruction ``frame`` is about to run (an
    ``opcode`` trace event): one of ``_DELIVERY_OPS``, or the one right after a call when the same
    exception handler covers both (a signal delivered as a call returns is raised by the call, so
    it meets the call's handler: the next instruction stands for that moment only under the same
    one; after ``return f()`` in a ``try``, the ``RETURN_VALUE`` is outside the block)."""
    code = frame.f_code
    points = _DELIVERY.get(code)
    if points is None:
        # (start, end, target, depth, lasti) per range: a private helper of dis in 3.11 and 3.12;
        # without it, the instruction after a call counts unless it is a RETURN_VALUE
        parse = getattr(dis, "_parse_exception_table", None)
        table = parse(code) if parse is not None else None

        def handler(offset):
            if table is None:
                return code.co_code[offset] != _RETURN_VALUE
            return next(((entry.target, entry.depth) for entry in table if entry.start <= offset < entry.end), None)
        points, call = set(), None
        for instruction in dis.get_instructions(code):
            if instruction.opcode in _DELIVERY_OPS or (
                    call is not None and handler(call) == handler(instruction.offset)):
                points.add(instruction.offset)
            call = instruction.offset if instruction.opname in _CALLS else None
        points = _DELIVERY[code] = frozenset(points)
    return frame.f_lasti in points


def is_generated(filename):
    """Whether code comes from the package's generated functions (a structure's constructor, the
    change wrappers, a hash collection's lookups), which run inside the package as its own files'
    code does."""
    return filename.startswith(("<constructor of ", "<lookups of ")) or filename == "<change wrapper>"


def interrupt_at_opcode(count):
    """Install a trace function that raises KeyboardInterrupt at the ``count``-th opcode run inside
    the permastruct package, or at the next one where CPython would deliver it (:func:`deliverable`:
    a signal arriving at any bytecode, deterministically); returns a callable telling whether it
    fired (its ``opcodes()`` says how many opcodes ran so far).  The caller removes it with
    ``sys.settrace(None)``."""
    import sys

    import permastruct
    package = os.path.dirname(permastruct.__file__)
    seen = [0, False]

    def local(frame, event, arg):
        if event == "opcode":
            seen[0] += 1
            if seen[0] >= count and not seen[1] and deliverable(frame):
                seen[1] = True
                raise KeyboardInterrupt(f"opcode {count}")
        return local

    def tracer(frame, event, arg):
        if frame.f_code.co_filename.startswith(package) or is_generated(frame.f_code.co_filename):
            frame.f_trace_opcodes = True
            return local
        return None

    sys.settrace(tracer)

    def fired():
        return seen[1]
    fired.opcodes = lambda: seen[0]
    return fired


@functools.lru_cache(maxsize=None)
def lookups_storage():
    """The Storage class of the tests of the Dict and Set lookups (test_collections_engine,
    test_review3): a Dict for each kind of key the lookups made per class serve (bytes, str, int,
    a UInt64 with by-reference values), one they do not (Float), and a Set of Int8."""
    from permastruct import Dict, Set, Storage

    class Lookups(Storage):
        def populateSchema(self):
            s = self.schema
            self.define(Dict("ByBytes")[s.ByteString, s.Int])
            self.define(Dict("ByText")[s.String, s.Int])
            self.define(Dict("ByInt")[s.Int, s.Int])
            self.define(Dict("ByCount")[s.UInt64, s.ByteString])
            self.define(Dict("ByReal")[s.Float, s.Int])
            self.define(Set("IntSet")[s.Int8])

            class Root(s.Structure):
                by_bytes = self.schema.ByBytes
                by_text = self.schema.ByText
                by_int = self.schema.ByInt
                by_count = self.schema.ByCount
                by_real = self.schema.ByReal
                int_set = self.schema.IntSet
    return Lookups


@pytest.fixture
def lookups(tmp_path):
    """A store of :func:`lookups_storage` with small pages (so tables are runs of many pages)."""
    p = lookups_storage()(tmp_path / "l.ps", pageSize=256)
    yield p
    p.close()


def assert_lookups_agree(mapping, reference, probes):
    """Every probe is found (or not) in ``mapping`` as in the plain ``reference``, by every way of
    asking: ``in``, ``get`` and ``[]``."""
    for key in probes:
        try:
            expected = reference[key]
        except (KeyError, TypeError):
            expected = KeyError
        if expected is KeyError:
            assert key not in mapping, key
            assert mapping.get(key, "absent") == "absent", key
            with pytest.raises(KeyError):
                mapping[key]
        else:
            assert key in mapping, key
            assert mapping[key] == expected and mapping.get(key) == expected, key


def views_storage():
    """The Storage class of the tests of memoryviews past a rollback or an undo (test_views,
    test_history): a Buffer, two Lists of Int and a ByteString under the root."""
    from permastruct import List, Storage

    class Views(Storage):
        def populateSchema(self):
            s = self.schema
            self.define(List("Ints")[s.Int])

            class Root(s.Structure):
                buf = s.Buffer
                ints = s.Ints
                other = s.Ints
                raw = s.ByteString
    return Views
