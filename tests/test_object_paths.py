"""The written-out paths of issue 11's object workload, against plain Python models.

A structure made with a string field (the string and the record placed side by
side), ``List.append`` of a live proxy, and ``Dict[key] = proxy`` each have a
path written out for the class; everything else they are given goes the
general way.  These tests drive both ways with the same operations, compare the
store with a ``list``/``dict`` model and run ``check()`` (reference counts,
free lists) after every step.
"""

import random
import threading

import pytest

import permastruct
from permastruct import Dict, List, Storage

from conftest import STORE_MODES, open_store, reopen_store


class Agents(Storage):
    def populateSchema(self):
        s = self.schema

        class Agent(s.Structure):
            name = s.ByteString
            age = s.Int
            weight = s.Float

        class Label(s.Structure):  # a String field: made from str
            text = s.String
            rank = s.Int

        self.define(List("Agents")[Agent])
        self.define(Dict("ByName")[s.ByteString, Agent])
        self.define(Dict("ById")[s.Int, Agent])
        self.define(Dict("Labels")[s.ByteString, s.String])

        class Root(s.Structure):
            agents = s.Agents
            by_name = s.ByName
            by_id = s.ById
            labels = s.Labels
            label = Label


def _state(p):
    return ([(a.name, a.age) for a in p.root.agents],
            {k: (v.name, v.age) for k, v in p.root.by_name.items()},
            {k: (v.name, v.age) for k, v in p.root.by_id.items()})


@pytest.mark.parametrize("mode", STORE_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_appends_and_dict_stores_agree_with_a_list_and_a_dict(tmp_path, mode, seed):
    rng = random.Random(seed)
    path = str(tmp_path / "agents.ps")
    p = open_store(Agents, mode, path)
    p.root.agents, p.root.by_name, p.root.by_id = [], {}, {}
    p.commit()
    agents, by_name, by_id = [], {}, {}
    try:
        for step in range(400):
            Agent = p.schema.Agent
            name = b"a%d" % rng.randrange(60) + b"x" * rng.choice([0, 0, 5, 20])  # some keys too long
            agent = Agent(name=name, age=step, weight=step / 2)
            what = rng.random()
            if what < 0.4:
                p.root.agents.append(agent)
                agents.append((name, step))
            elif what < 0.7:
                p.root.by_name[name] = agent
                by_name[name] = (name, step)
            elif what < 0.8:
                key = rng.randrange(50)
                p.root.by_id[key] = agent
                by_id[key] = (name, step)
            elif what < 0.85 and by_name:  # the same proxy stored again under its key
                key = rng.choice(sorted(by_name))
                p.root.by_name[key] = p.root.by_name[key]
            elif what < 0.9 and by_name:
                key = rng.choice(sorted(by_name))
                del p.root.by_name[key]
                del by_name[key]
            elif what < 0.95 and agents:  # a stored agent appended again: two references
                p.root.agents.append(p.root.agents[0])
                agents.append(agents[0])
            else:
                p.rollback() if rng.random() < 0.5 else p.commit()
                if mode == "file" and rng.random() < 0.3:
                    p = reopen_store(p, Agents, path)
                agents, by_name, by_id = (list(x) if isinstance(x, list) else dict(x) for x in _state(p))
            p.check()
            assert _state(p) == (agents, by_name, by_id), step
        p.commit()
        p.check()
    finally:
        p.close()


def test_a_replaced_or_removed_value_is_freed_at_the_commit(tmp_path):
    with Agents(str(tmp_path / "a.ps")) as p:
        p.root.by_name = {}
        first = p.schema.Agent(name=b"first", age=1)
        p.root.by_name[b"k"] = first
        p.commit()
        before = sum(1 for _ in p._heap.walk())
        p.root.by_name[b"k"] = p.schema.Agent(name=b"second", age=2)  # first: now unreferenced
        del first
        p.commit()
        p.check()
        assert sum(1 for _ in p._heap.walk()) == before  # the first agent and its name are gone
        assert p.root.by_name[b"k"].name == b"second"


def test_values_the_written_out_paths_do_not_take_go_the_general_way(tmp_path):
    with Agents(str(tmp_path / "a.ps")) as p, Agents(str(tmp_path / "b.ps")) as other:
        p.root.agents, p.root.by_name, p.root.labels = [], {}, {}
        other_agent = other.schema.Agent(name=b"elsewhere")
        label = p.schema.Label(text="x")
        with pytest.raises(TypeError):
            p.root.agents.append(label)  # another structure type
        with pytest.raises(TypeError):
            p.root.by_name[b"k"] = label
        with pytest.raises((TypeError, ValueError)):
            p.root.agents.append(other_agent)  # another storage's proxy
        with pytest.raises((TypeError, ValueError)):
            p.root.by_name[b"k"] = other_agent
        p.root.labels[b"s"] = "made from str"  # a by-reference value from a plain value
        p.root.labels[b"t"] = p.root.labels[b"s"]  # and a live proxy of it: two references
        p.root.agents.append(None)
        p.root.by_name[b"none"] = None
        assert list(p.root.agents) == [None] and p.root.by_name[b"none"] is None
        assert p.root.labels[b"t"] == "made from str" and len(p.root.by_name) == 1
        p.commit()
        p.check()
        other.rollback()


def test_a_dead_proxy_is_refused_and_changes_nothing(tmp_path):
    with Agents(str(tmp_path / "a.ps")) as p:
        p.root.agents, p.root.by_name = [], {}
        p.commit()
        agent = p.schema.Agent(name=b"gone")
        p.rollback()  # the agent was made in the rolled-back transaction
        with pytest.raises(permastruct.errors.DeadProxyError):
            p.root.agents.append(agent)
        with pytest.raises(permastruct.errors.DeadProxyError):
            p.root.by_name[b"k"] = agent
        assert len(p.root.agents) == 0 and len(p.root.by_name) == 0
        p.check()


def test_a_read_only_storage_or_another_threads_change_is_refused(tmp_path):
    path = str(tmp_path / "a.ps")
    with Agents(path) as p:
        p.root.agents, p.root.by_name = [], {}
        p.root.agents.append(p.schema.Agent(name=b"one"))
        p.commit()
    with Agents(path, readonly=True) as r:
        one = r.root.agents[0]
        with pytest.raises(permastruct.errors.ReadOnlyError):
            r.root.agents.append(one)
        with pytest.raises(permastruct.errors.ReadOnlyError):
            r.root.by_name[b"k"] = one
    with Agents(path) as p:
        one, agents, by_name = p.root.agents[0], p.root.agents, p.root.by_name
        seen = []

        # another thread inside a change: the written-out paths refuse like the general ones
        p._heap._changing = threading.get_ident() + 1
        try:
            for action in (lambda: agents.append(one), lambda: by_name.__setitem__(b"k", one)):
                with pytest.raises(permastruct.errors.ConcurrentUseError):
                    action()
                seen.append(True)
        finally:
            p._heap._changing = 0
        assert seen == [True, True] and len(agents) == 1 and len(by_name) == 0
        p.check()


@pytest.mark.parametrize("text", ["", "short", "sixteen bytes!!!", "a longer text than a slot holds " * 3,
                                  "\u00e9t\u00e9 \u2603"])
def test_a_record_made_with_its_string_reads_back_and_checks(tmp_path, text):
    with Agents(str(tmp_path / "a.ps")) as p:
        p.root.label = p.schema.Label(text=text, rank=7)
        made = [p.schema.Label(text=text * k, rank=k) for k in range(50)]
        p.commit()
        p.check()
        assert p.root.label.text == text and p.root.label.rank == 7
        assert [(m.text, m.rank) for m in made] == [(text * k, k) for k in range(50)]
        del made
        p.commit()
        p.check()


def test_a_string_that_cannot_be_encoded_makes_nothing(tmp_path):
    with Agents(str(tmp_path / "a.ps")) as p:
        p.commit()
        before = sum(1 for _ in p._heap.walk())
        with pytest.raises(UnicodeEncodeError):
            p.schema.Label(text="\ud800", rank=1)
        p.commit()
        p.check()
        assert sum(1 for _ in p._heap.walk()) == before


def test_iteration_keeps_the_chunk_it_reads_alive_through_removals_and_commits(tmp_path):
    """A List of objects is read a chunk at a time with the chunk's proxies made at once: an
    element the loop removes and commits away is still read whole, never a freed place."""
    with Agents(str(tmp_path / "a.ps")) as p:
        p.root.agents = [p.schema.Agent(name=b"n%d" % i, age=i) for i in range(100)]
        p.commit()
        seen = []
        for agent in p.root.agents:
            seen.append((agent.name, agent.age))
            if agent.age % 3 == 0:
                p.root.agents.remove(agent)
                p.schema.Agent(name=b"filler", age=-1)  # a new object that could reuse a freed place
                p.commit()
                p.check()
        assert seen[:16] == [(b"n%d" % i, i) for i in range(16)]  # the first chunk, as it was
        assert all(age >= 0 and name == b"n%d" % age for name, age in seen)
        removed = {age for _, age in seen if age % 3 == 0}
        assert [a.age for a in p.root.agents] == [i for i in range(100) if i not in removed]
        assert [a.age for a in reversed(p.root.agents)] == [a.age for a in p.root.agents][::-1]
        p.check()


def test_the_written_out_paths_of_a_closed_storage_raise(tmp_path):
    p = Agents(str(tmp_path / "a.ps"))
    p.root.agents, p.root.by_name = [], {}
    agent, agents, by_name = p.schema.Agent(name=b"x"), p.root.agents, p.root.by_name
    p.commit()
    p.close()
    for action in (lambda: agents.append(agent), lambda: by_name.__setitem__(b"k", agent),
                   lambda: list(agents), lambda: p.schema.Agent(name=b"y")):
        with pytest.raises(permastruct.errors.StorageClosedError):
            action()
