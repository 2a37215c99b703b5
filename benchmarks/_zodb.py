"""ZODB's record class for the benchmarks (importable by name, as ZODB needs to load it)."""

import persistent


class ZRecord(persistent.Persistent):
    """A record of the record workloads: ``i``, ``f`` and ``name`` or ``payload``."""

    def __init__(self, i=0, f=0.0, name=b"", payload=None):
        self.i = i
        self.f = f
        self.name = name
        self.payload = payload


class ZAgent(persistent.Persistent):
    """The one structure of the field workload."""

    def __init__(self, age=0, weight=0.0):
        self.age = age
        self.weight = weight


class ZNamedAgent(persistent.Persistent):
    """The Agent of the object workloads (W1-W4): ``name``, ``age``, ``weight``."""

    def __init__(self, name=b"", age=0, weight=0.0):
        self.name = name
        self.age = age
        self.weight = weight
