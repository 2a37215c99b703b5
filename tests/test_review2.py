"""Review of issue 11's object paths: place_pair, Heap.incref's removal from ``unreferenced``,
the written-out List.append and Dict[key] = proxy, and the chunked iteration of objects.

Each test attacks one of them where it could go wrong (an interrupt at any
bytecode, the generated constructor's own included; a slab's last slots; a full
disk at the record's placement; savepoints, pack and undo between making an
object and storing it; a loop that changes the list it reads) and runs
``check()`` and a walk from the root afterwards.  A test marked ``xfail`` shows a
bug found by the review (its reason says where).  ``PERMASTRUCT_STRESS=1`` makes
the interrupt sweep try every opcode instead of a sample.
"""

import os
import sys

import pytest

import permastruct
from permastruct import Dict, List, Storage
from permastruct.errors import DeadProxyError, IncompleteChangeError, StorageFullError

from conftest import _long_run
from test_failures import Failure


class Agents(Storage):
    def populateSchema(self):
        s = self.schema

        class Agent(s.Structure):  # one ByteString field: the constructor uses place_pair
            name = s.ByteString
            age = s.Int

        class Label(s.Structure):  # one String field and a reference to an Agent
            text = s.String
            rank = s.Int
            friend = Agent

        class Wide(s.Structure):  # no string; 280 bytes: a size class of its own
            a = s.Float
            b = s.Float
            c = s.Float
            d = s.Float
            e = s.Float
            f = s.Float
            g = s.Float
            h = s.Float
            i = s.Float
            j = s.Float
            k = s.Float
            l = s.Float  # noqa: E741
            m = s.Float
            n = s.Float
            o = s.Float
            q = s.Float
            r = s.Float
            t = s.Float
            u = s.Float
            v = s.Float
            w = s.Float
            x = s.Float
            y = s.Float
            z = s.Float
            aa = s.Float
            bb = s.Float
            cc = s.Float
            dd = s.Float
            ee = s.Float
            ff = s.Float
            gg = s.Float
            hh = s.Float
            ii = s.Float
            jj = s.Float

        class Note(Wide):  # a short string beside a record of a large size class
            text = s.ByteString

        class Small(s.Structure):
            a = s.Int
            b = s.Int

        self.define(List("AgentList")[Agent])
        self.define(List("NoteList")[Note])
        self.define(List("LabelList")[Label])
        self.define(Dict("AgentsById")[s.Int, Agent])
        self.define(Dict("Texts")[s.ByteString, s.String])

        class Root(s.Structure):
            agents = s.AgentList
            notes = s.NoteList
            labels = s.LabelList
            by_id = s.AgentsById
            texts = s.Texts
            small = Small
            count = s.Int


def _fresh(p):
    p.root.agents, p.root.labels, p.root.by_id, p.root.texts = [], [], {}, {}
    p.root.agents.append(p.schema.Agent(name=b"first", age=1))
    p.root.by_id[1] = p.root.agents[0]
    p.commit()


def _state(p):
    root = p.root
    return ([(bytes(a.name), a.age) if a is not None else None for a in root.agents],
            [(str(x.text), x.rank, None if x.friend is None else bytes(x.friend.name)) for x in root.labels],
            {k: (bytes(v.name), v.age) if v is not None else None for k, v in root.by_id.items()},
            {bytes(k): str(v) for k, v in root.texts.items()})


def _objects(p):
    return sum(1 for _ in p._heap.walk())


# -- interrupts at any bytecode, the generated constructor's included ---------------------------------
_KEEP = []


def _op_make(p):
    _KEEP.append(p.schema.Agent(name=b"new", age=5))


def _op_make_long(p):
    _KEEP.append(p.schema.Agent(name=b"other" * 30, age=6))


def _op_label(p):
    _KEEP.append(p.schema.Label(text="label " * 3, rank=7, friend=p.root.agents[0]))


def _op_append(p):
    p.root.agents.append(_KEEP[-1] if type(_KEEP[-1]) is p.schema.Agent else _KEEP[-2])


def _op_append_label(p):
    p.root.labels.append(_KEEP[-1])


def _op_set(p):
    p.root.by_id[3] = _KEEP[0]


def _op_same(p):
    p.root.by_id[3] = p.root.by_id[3]


def _op_over(p):
    p.root.by_id[1] = p.root.agents[-1]


def _op_del(p):
    del p.root.agents[0]


def _op_text(p):
    p.root.texts[b"a"] = "text"


def _op_text_proxy(p):
    p.root.texts[b"b"] = p.root.texts[b"a"]
    p.root.texts[b"a"] = p.root.texts[b"b"]


def _op_iterate(p):
    for agent in p.root.agents:
        if agent.age == 5:
            p.root.agents.remove(agent)


def _op_clear(p):
    p.root.by_id.clear()


_OPS = [_op_make, _op_append, _op_set, _op_same, _op_over, _op_make_long, _op_append, _op_del, _op_label,
        _op_append_label, _op_text, _op_text_proxy, _op_append, _op_iterate, _op_set, _op_clear, _op_make,
        _op_append]


def _interrupt_at(count, package):
    """conftest.interrupt_at_opcode, but also in code compiled at run time (a class's generated
    constructor, a change wrapper): their file names start with ``<``."""
    seen = [0, False]

    def local(frame, event, arg):
        if event == "opcode":
            seen[0] += 1
            if seen[0] == count and not seen[1]:
                seen[1] = True
                raise KeyboardInterrupt(f"opcode {count}")
        return local

    def tracer(frame, event, arg):
        name = frame.f_code.co_filename
        if name.startswith(package) or name.startswith("<"):
            frame.f_trace_opcodes = True
            return local
        return None
    sys.settrace(tracer)
    return seen


def test_an_interrupt_at_any_opcode_of_the_object_paths_leaves_before_or_after(tmp_path):
    """KeyboardInterrupt at the N-th opcode of a workload of the written-out paths: a commit right
    after either refuses (IncompleteChangeError, then rollback() gives the last commit) or commits
    the state before the interrupted operation or after it; check() passes, nothing leaks once the
    program lets go of its proxies, and a reopen reads the same."""
    package = os.path.dirname(permastruct.__file__)
    with Agents(str(tmp_path / "reference.ps")) as p:
        _fresh(p)
        _KEEP.clear()
        states = [_state(p)]
        for op in _OPS:
            op(p)
            states.append(_state(p))
        _KEEP.clear()
        p.rollback()
    step = 1 if _long_run() else 89
    fired = 0
    for count in range(1, 100000, step):
        path = str(tmp_path / f"i{count}.ps")
        p = Agents(path)
        _fresh(p)
        empty = _objects(p)
        _KEEP.clear()
        seen = _interrupt_at(count, package)
        done = len(_OPS)
        try:
            for done, op in enumerate(_OPS):
                op(p)
            done = len(_OPS)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        if not seen[1]:
            p.close()
            break
        fired += 1
        try:
            p.commit()
        except IncompleteChangeError:
            p.rollback()
            assert _state(p) == states[0], count
        else:
            assert _state(p) in states[done:done + 2], (count, _OPS[done].__name__)
        p.check()
        state = _state(p)
        _KEEP.clear()
        p.commit()
        p.check()
        if state == states[0]:
            assert _objects(p) == empty, count  # what the interrupted transaction made is gone
        p.close()
        with Agents(path) as p:
            p.check()
            assert _state(p) == state
        os.unlink(path)
    assert fired > 30


# -- place_pair -------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size", [512, 1024, 4096])
def test_strings_and_records_placed_as_pairs_at_every_slot_of_a_slab(tmp_path, page_size):
    """Strings of every length up to past a slab's largest size class, each made 40 times (so that
    the pair lands on every slot of a slab, the last two and a slab with one slot left included),
    with records of other size classes made in between: each reads back, and check() passes
    before and after a commit, a removal of everything and a reopen."""
    path = str(tmp_path / "pairs.ps")
    p = Agents(path, pageSize=page_size)
    try:
        p.root.agents = []
        made = []
        for n in list(range(0, 100, 3)) + [200, 209, 300, 1000, 1024, 1025]:
            data = bytes([n % 251]) * n
            for k in range(40):
                made.append((p.schema.Agent(name=data, age=n * 100 + k), data, n * 100 + k))
                if k % 7 == 0:
                    p.schema.Wide(a=float(k))  # another size class, unreferenced: freed at the commit
                    p.schema.Label(text="\u00e9" * n, rank=k)
        p.root.agents.extend(agent for agent, _, _ in made[::2])
        assert all(agent.name == data and agent.age == age for agent, data, age in made)
        p.check()
        p.commit()
        p.check()
        assert all(agent.name == data and agent.age == age for agent, data, age in made)
        made = None
        p.root.agents.clear()
        p.commit()
        p.check()
        assert p.check()["objects"] < 30
    finally:
        p.close()
    with Agents(path) as p:
        p.check()


@pytest.mark.parametrize("page_size", [512, 4096])
def test_a_full_disk_at_the_records_placement_gives_the_strings_slot_back(tmp_path, page_size):
    """The file cannot grow (fallocate fails with ENOSPC) at its N-th growth while notes (a short
    string beside a record of a large size class: place_pair's two place() calls) are made: the
    StorageFullError leaves everything made before it whole, check() passes, and the commit and a
    reopen keep every note stored.  Most cases fail at the record's placement, after the string's
    went in (place_pair gives the string's slot back)."""
    fallback = 0
    for nth in range(1, 6):
        path = str(tmp_path / f"full{nth}.ps")
        p = Agents(path, pageSize=page_size, fileSize=64 << 10)
        p.root.notes = []
        p.commit()
        empty = _objects(p)
        made = []
        with pytest.MonkeyPatch.context() as patch:
            allocator = type(p._heap.allocator)
            real_pair, real_place, inside, places = allocator.place_pair, allocator.place, [], []

            def place_pair(self, size_a, size_b):
                inside.append(True)
                try:
                    return real_pair(self, size_a, size_b)
                finally:
                    inside.pop()

            def place(self, size):
                result = real_place(self, size)
                places.extend(inside)
                return result
            patch.setattr(allocator, "place_pair", place_pair)
            patch.setattr(allocator, "place", place)
            Failure("syscall", "fallocate", nth, once=True).install(patch)
            with pytest.raises(StorageFullError):
                for k in range(100000):
                    before = len(places)
                    made.append(p.schema.Note(text=b"t%d" % k, a=float(k)))
                    p.root.notes.append(made[-1])
            if len(places) == before + 1 and len(made) == k:  # the string went in, the record did not
                fallback += 1
        p.check()
        assert all(note.text == b"t%d" % k and note.a == k for k, note in enumerate(made))
        assert _objects(p) == empty + 2 * len(made) + 1  # (+ the array): nothing of the failed note is left
        p.commit()
        p.check()
        made = None
        p.close()
        with Agents(path) as p:
            p.check()
            assert [(n.text, n.a) for n in p.root.notes] == [(b"t%d" % k, k) for k in range(len(p.root.notes))]
    assert fallback >= 2


# -- Heap.unreferenced: savepoints, pack, undo between making and storing -----------------------------
def test_a_savepoint_gives_back_the_unreferenced_entry_a_store_removed(tmp_path):
    """An object made before a nested block is stored inside it (incref takes it out of
    ``unreferenced``); the block fails: it is unreferenced again and goes at the commit. One stored,
    removed and stored again inside a block that succeeds stays."""
    with Agents(str(tmp_path / "s.ps")) as p:
        _fresh(p)
        empty = _objects(p)
        with p.transaction():
            made = p.schema.Agent(name=b"made before the block", age=2)
            try:
                with p.transaction():
                    p.root.agents.append(made)
                    p.root.by_id[7] = made
                    assert made._ps_oid not in p._heap.unreferenced
                    raise ValueError("the block fails")
            except ValueError:
                pass
            assert made._ps_oid in p._heap.unreferenced
            p.check()
            with p.transaction():
                p.root.agents.append(made)
                p.root.agents.remove(made)
                p.root.by_id[8] = made
                p.root.by_id[8] = None
                p.root.by_id[8] = made
            try:
                with p.transaction():
                    del p.root.by_id[8]  # count 0 again: back in unreferenced
                    p.root.agents.append(made)  # and out
                    raise ValueError("this block fails too")
            except ValueError:
                pass
            p.check()
        made = None
        p.commit()
        p.check()
        assert _state(p)[2][8] == (b"made before the block", 2)
        assert _objects(p) == empty + 2  # the agent and its name
        del p.root.by_id[8]
        p.commit()
        p.check()
        assert _objects(p) == empty


def test_an_object_made_then_packed_or_undone_before_it_is_stored(tmp_path):
    """pack() (which commits the object as held) or undo() between making an object and storing it;
    stored, it leaves the list of held objects at the next commit and lives on."""
    path = str(tmp_path / "u.ps")
    with Agents(path, history=10) as p:
        _fresh(p)
        junk = [p.schema.Agent(name=b"junk %d" % i) for i in range(300)]
        p.root.agents.extend(junk)
        p.commit()
        del p.root.agents[1:]
        junk = None
        p.commit()
        made = p.schema.Agent(name=b"made before the pack", age=3)
        label = p.schema.Label(text="made before the pack", friend=made)
        p.pack()
        assert p._heap.held_objects() == [label._ps_oid]  # (made is referenced by label)
        p.root.agents.append(made)
        p.root.labels.append(label)
        p.commit()
        assert p._heap.held_objects() == []
        p.check()
        later = p.schema.Agent(name=b"made before an undo", age=4)
        p.commit()  # held
        p.root.by_id[4] = later
        p.commit()
        p.undo(p.last_transaction)  # back to: made, held
        p.check()
        assert later._ps_oid in p._heap.held_objects() and 4 not in p.root.by_id
        p.root.by_id[5] = later
        made = label = later = None
        p.commit()
        p.check()
    with Agents(path) as p:
        p.check()
        assert p.root.by_id[5].name == b"made before an undo"
        assert [a.name for a in p.root.agents] == [b"first", b"made before the pack"]
        assert p.root.labels[0].friend.name == b"made before the pack"


def test_pack_after_a_held_object_at_the_end_of_the_file_is_let_go(tmp_path):
    with Agents(str(tmp_path / "h.ps")) as p:
        p.root.small = p.schema.Small(a=1)  # (the list of held objects finds room in its slab)
        p.commit()
        wide = p.schema.Wide(a=1.0)  # alone in a slab of its size class: the last page
        p.commit()  # recorded as held
        assert p._heap.held_objects() == [wide._ps_oid]
        del wide
        p.pack()
        p.check()


# -- iteration of a List of objects that the loop changes ------------------------------------------
def test_iterating_objects_while_the_loop_clears_extends_commits_and_rolls_back(tmp_path):
    """A loop over a List of objects clears it, refills it, commits and rolls back as it goes: every
    element it is handed is whole (one the list held at some moment, never a freed place), the
    proxies of the chunk keep theirs through the commit, and check() passes after each step."""
    with Agents(str(tmp_path / "it.ps")) as p:
        _fresh(p)
        p.root.agents = [p.schema.Agent(name=b"a%d" % i, age=i) for i in range(200)]
        p.commit()
        names = {b"a%d" % i for i in range(200)}
        seen = []
        for k, agent in enumerate(p.root.agents):
            try:
                seen.append((bytes(agent.name), agent.age))
            except DeadProxyError:  # made in a transaction the loop rolled back
                seen.append(None)
                continue
            if k == 3:
                p.root.agents.clear()
                p.commit()  # the chunk's agents are held; the others go
                p.check()
            elif k == 5:
                fresh = [p.schema.Agent(name=b"b%d" % i, age=1000 + i) for i in range(100)]
                names.update(b"b%d" % i for i in range(100))
                p.root.agents.extend(fresh)
                fresh = None
            elif k == 20:
                p.rollback()  # the "b" agents die; the list is empty again
                p.check()
                p.root.agents.extend(p.schema.Agent(name=b"c%d" % i, age=2000 + i) for i in range(100))
                names.update(b"c%d" % i for i in range(100))
                p.commit()
                p.check()
            elif k == 85:
                p.root.agents.extend(p.schema.Agent(name=b"d%d" % i, age=3000 + i) for i in range(10))
                names.update(b"d%d" % i for i in range(10))
                p.root.agents.pop(0)
        assert seen[:16] == [(b"a%d" % i, i) for i in range(16)]
        assert seen[80:86] == [(b"c%d" % i, 2000 + i) for i in range(80, 86)]
        assert all(item is None or (item[0] in names and int(item[0][1:]) == item[1] % 1000) for item in seen)
        p.commit()
        p.check()
        assert [a.age for a in reversed(p.root.agents)] == [a.age for a in p.root.agents][::-1]


# -- a process killed in the middle of the object workload -------------------------------------
def _crash_workload(p, k):
    """Transaction ``k`` of a deterministic workload of the written-out paths (run by the child
    and, for the model, by the parent): records made with their strings, appended, stored in a
    Dict, some replaced and removed; ``root.count`` says which transaction the store holds."""
    root = p.root
    Agent, Label = p.schema.Agent, p.schema.Label
    made = [Agent(name=b"k%d-%d" % (k, i) + b"x" * (i * 37 % 300), age=k * 100 + i) for i in range(40)]
    for i, agent in enumerate(made):
        root.agents.append(agent)
        root.by_id[(k * 7 + i) % 50] = agent
        if i % 5 == 0:
            root.labels.append(Label(text="l%d-%d" % (k, i), rank=i, friend=agent))
    if len(root.agents) > 120:
        del root.agents[:60]
    if len(root.labels) > 30:
        root.labels.clear()
    for key in range(k % 3, 50, 9):
        if key in root.by_id:
            root.by_id[key] = root.by_id[key] if k % 2 else None
    root.count = k


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_review2 import Agents, _crash_workload, _fresh
p = Agents({path!r})
_fresh(p)
p.root.count = 0
p.commit()
k = 0
while True:
    k += 1
    _crash_workload(p, k)
    p.commit()
    print(k, flush=True)
"""


def test_a_process_killed_during_the_object_workload_reopens_at_a_commit(tmp_path):
    """SIGKILL at a random moment of a child making records with their strings (place_pair),
    appending them (the written-out append) and storing them in a Dict (the written-out
    __setitem__): the store reopens at the last commit that returned or the one in flight, as the
    model has it, and check() passes."""
    import random
    import signal
    import subprocess
    import time

    import _crashkit
    rng = random.Random(11)
    model = Agents(None)
    _fresh(model)
    states = [_state(model)]
    for k in range(1, 200):
        _crash_workload(model, k)
        model.commit()
        states.append(_state(model))
    model.close()
    tests = os.path.dirname(os.path.abspath(__file__))
    for case in range(3 if not _long_run() else 20):
        path = str(tmp_path / f"crash{case}.ps")
        child = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=tests, path=path)],
                                 stdout=subprocess.PIPE, env=_crashkit.child_env(), text=True)
        try:
            wanted = rng.randrange(2, 12)
            returned = 0
            while returned < wanted:
                line = child.stdout.readline()
                assert line, "the child ended"
                returned = int(line)
            time.sleep(rng.uniform(0, 0.05))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        for line in child.stdout.read().split():
            returned = int(line)
        child.stdout.close()
        with Agents(path) as p:
            p.check()
            found = p.root.count
            assert returned <= found <= returned + 1, (case, returned, found)
            assert _state(p) == states[found], (case, found)
