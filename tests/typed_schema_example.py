"""A small schema in the module-level, annotated style (issue 15, items 5 and 6), with
``from __future__ import annotations``: used by tests/test_schema_module_level.py, and checked by
mypy there when mypy is installed."""

from __future__ import annotations

from permastruct import Int, List, Storage, String, Structure


class Person(Structure):
    """Someone who borrows books."""

    name: String
    age: Int
    friend: Person  # a name the module does not know yet when the annotation is written: itself

    def greeting(self) -> str:
        return f"Hello, {self.name}"


class Members(Storage):
    def populateSchema(self) -> None:
        self.define(Person)
        self.define(List("People")[Person])

        class Root(Structure):  # (the module-level base: a type checker knows it)
            people = self.schema.People


def ages(p: Members) -> int:
    """What a type checker sees: ``person.age`` is an int, ``person.name`` a String proxy."""
    total: int = 0
    for person in p.root.people:
        total += person.age
    return total
