"""The floors of P1 and P2: what attribute access to mapped bytes costs in CPython, whoever does it.

Run alone: ``python3 -m benchmarks.floors [--number N] [--repeat R]``.  Not part
of ``python -m benchmarks``: it measures ways of building a field, not stores.
Each line is ns per operation (best of R timings of N unrolled operations, the
empty statement's cost subtracted) and its ratio to a ``__slots__`` attribute:

- ``__slots__``: the reference of P1 and P2;
- ``ctypes``: a field of a ``ctypes.Structure`` over a buffer - the C-level
  descriptor permastruct reads through, and a write that does not check the
  range (``int64`` field <- ``2**64 + 5`` stores ``5``);
- five ways to refuse a value that does not fit, each a Python hook that the
  C-level setattr slot must call: ``__setattr__`` with a dict table, with a
  tuple table, calling ``object.__setattr__`` after the check, packing with
  ``struct.pack_into``, and a ``property`` setter;
- permastruct: the read and the write of a persistent structure's field.

On CPython 3.11 the ctypes read is already 4.5-7x a slot read and every
checking hook costs 150 ns or more, so P1 (<= 4x) and P2 (<= 6x) cannot be met
by a pure-Python library that refuses out-of-range values.
"""

if __package__ in (None, ""):  # run as a script: python3 benchmarks/floors.py
    import os as _os
    import sys as _sys
    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    __package__ = "benchmarks"
    import benchmarks  # noqa: F401

import argparse
import ctypes
import os
import struct
import tempfile
import timeit

from . import _stores as S

LOW, HIGH = -2 ** 63, 2 ** 63 - 1
UNROLL = 10


class Slots:
    __slots__ = ("age",)


def _ctypes_class():
    class Record(ctypes.Structure):
        _fields_ = [("age", ctypes.c_int64), ("weight", ctypes.c_double)]
        __slots__ = ()
    return Record


def _hook_dict_table(cls):
    table = {"age": (cls.age.__set__, int, LOW, HIGH)}

    def __setattr__(self, name, value):
        entry = table[name]
        if type(value) is entry[1] and entry[2] <= value <= entry[3]:
            entry[0](self, value)
            return
        raise TypeError(name)
    return __setattr__


def _hook_tuple_table(cls):
    table = {"age": (cls.age.__set__, int, LOW, HIGH)}

    def __setattr__(self, name, value):
        setter, kind, low, high = table[name]
        if low <= value <= high and type(value) is kind:
            setter(self, value)
            return
        raise TypeError(name)
    return __setattr__


def _hook_generic_setattr(cls):
    table = {"age": (int, LOW, HIGH)}
    generic = ctypes.Structure.__setattr__

    def __setattr__(self, name, value):
        kind, low, high = table[name]
        if type(value) is kind and low <= value <= high:
            generic(self, name, value)
            return
        raise TypeError(name)
    return __setattr__


def _hook_pack_into(cls):
    table = {"age": (struct.Struct("<q").pack_into, cls.age.offset, int, LOW, HIGH)}

    def __setattr__(self, name, value):
        entry = table.get(name)
        if entry is not None and type(value) is entry[2] and entry[3] <= value <= entry[4]:
            entry[0](self, entry[1], value)
            return
        raise TypeError(name)
    return __setattr__


HOOKS = {
    "__setattr__, dict table": _hook_dict_table,
    "__setattr__, tuple table": _hook_tuple_table,
    "__setattr__, then ctypes' own": _hook_generic_setattr,
    "__setattr__, struct.pack_into": _hook_pack_into,
}


def _property_record():
    class Record(ctypes.Structure):
        _fields_ = [("raw_age", ctypes.c_int64)]
        __slots__ = ()
    get, put = Record.raw_age.__get__, Record.raw_age.__set__

    def set_age(self, value):
        if type(value) is int and LOW <= value <= HIGH:
            put(self, value)
            return
        raise TypeError("age")
    Record.age = property(get, set_age)
    return Record.from_buffer(bytearray(ctypes.sizeof(Record)))


def measure(number=200_000, repeat=5):
    """``[(label, read ns or None, write ns or None)]``; the first row is the ``__slots__`` reference."""
    def ns(statement, target):
        timer = timeit.Timer("\n".join([statement] * UNROLL), globals={"x": target})
        empty = timeit.Timer("\n".join(["pass"] * UNROLL))
        best = min(timer.timeit(number) for _ in range(repeat))
        floor = min(empty.timeit(number) for _ in range(repeat))
        return max(best - floor, 0.0) / number / UNROLL * 1e9

    rows = []
    slots = Slots()
    slots.age = 1
    rows.append(("__slots__ attribute", ns("x.age", slots), ns("x.age = 32", slots)))
    record_class = _ctypes_class()
    plain = record_class.from_buffer(bytearray(ctypes.sizeof(record_class)))
    rows.append(("ctypes field (no range check)", ns("x.age", plain), ns("x.age = 32", plain)))
    for label, make in HOOKS.items():
        cls = _ctypes_class()
        cls.__setattr__ = make(cls)
        target = cls.from_buffer(bytearray(ctypes.sizeof(cls)))
        rows.append((label, None, ns("x.age = 32", target)))
    with_property = _property_record()
    rows.append(("property setter (getter too)", ns("x.age", with_property), ns("x.age = 32", with_property)))
    with tempfile.TemporaryDirectory() as folder:
        storage = S.open_ours(os.path.join(folder, "floors.ps"))
        try:
            storage.root.agent = storage.schema.Agent(age=31, weight=72.5)
            agent = storage.root.agent
            rows.append(("permastruct Int field", ns("x.age", agent), ns("x.age = 32", agent)))
            del agent
        finally:
            storage.rollback()
            storage.close()
    return rows


def report(rows):
    reference_read, reference_write = rows[0][1], rows[0][2]
    lines = [f"{'':32} {'read ns':>9} {'ratio':>7} {'write ns':>9} {'ratio':>7}"]
    for label, read, write in rows:
        cells = []
        for value, reference in ((read, reference_read), (write, reference_write)):
            if value is None:
                cells += ["-", "-"]
            else:
                cells += [f"{value:.1f}", f"{value / reference:.1f}x" if reference else "-"]
        lines.append(f"{label:32} {cells[0]:>9} {cells[1]:>7} {cells[2]:>9} {cells[3]:>7}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floors", description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000, help="unrolled operations per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings per figure (the best is kept)")
    args = parser.parse_args(argv)
    print(report(measure(args.number, args.repeat)))


if __name__ == "__main__":
    main()
