"""Seeded stress test of schema evolution: random writes, frees, commits and rollbacks between
reopens that add fields, and explicit renames, drops and widenings, against a plain-Python model.

Each step of the model is checked against the store after every reopen and every few steps, and
``check()`` runs after every commit.  Long runs: ``PERMASTRUCT_STRESS=1``, or
``--seed N --iterations N`` (tests/conftest.py).
"""

import copy
import random

import permastruct
from permastruct import List, Storage, Structure

#: field type name -> (permastruct type, random value maker); "link" and "text" are references.
NUMBERS = {
    "Int": lambda r: r.randint(-2 ** 63, 2 ** 63 - 1),
    "Int32": lambda r: r.randint(-2 ** 31, 2 ** 31 - 1),
    "UInt8": lambda r: r.randint(0, 255),
    "Int16": lambda r: r.randint(-2 ** 15, 2 ** 15 - 1),
    "Float": lambda r: r.choice([0.5, -1.25, 1e300, r.random()]),
    "Bool": lambda r: r.random() < 0.5,
}
DEFAULTS = {"Int": 0, "Int32": 0, "UInt8": 0, "Int16": 0, "Float": 0.0, "Bool": False,
            "link": None, "text": None}
WIDER = {"Int32": "Int", "UInt8": "Int16", "Int16": "Int32"}


def storage_class(item_fields, special_fields):
    """A Storage class for the schema state: ``[(name, kind)]`` of Item and of Special(Item)."""
    def field_type(schema, kind):
        if kind == "link":
            return "Item"
        if kind == "text":
            return schema.String
        return getattr(permastruct, kind)

    class Evolving(Storage):
        def populateSchema(self):
            s = self.schema
            item_namespace = {name: field_type(s, kind) for name, kind in item_fields}
            item_namespace["uid"] = s.Int
            Item = type("Item", (Structure,), item_namespace)
            type("Special", (Item,), {name: field_type(s, kind) for name, kind in special_fields})

            class Root(Structure):
                items = List("Items")["Item"]
    return Evolving


class Model:
    def __init__(self):
        self.items = {}  # uid -> {"special": bool, field: value (a uid for a link)}
        self.order = []  # the uids in the list
        self.next_uid = 1


def read_item(proxy, fields):
    """The model view of a proxy: its fields, a link as the target's uid, a text as str."""
    out = {}
    for name, kind in fields:
        value = getattr(proxy, name)
        if kind == "link":
            value = None if value is None else value.uid
        elif kind == "text":
            value = None if value is None else str(value)
        out[name] = value
    return out


def compare(p, model, item_fields, special_fields, where):
    items = p.root.items
    assert [item.uid for item in items] == model.order, where
    seen = set()
    stack = list(items)
    while stack:
        item = stack.pop()
        if item.uid in seen:
            continue
        seen.add(item.uid)
        expected = model.items[item.uid]
        fields = item_fields + (special_fields if expected["special"] else [])
        got = read_item(item, fields)
        want = {name: expected[name] for name, _ in fields}
        assert got == want, (where, item.uid, got, want)
        for name, kind in item_fields:
            if kind == "link" and getattr(item, name) is not None:
                stack.append(getattr(item, name))


def test_schema_evolution_stress(tmp_path, stress_seed, stress_iterations):
    rng = random.Random(stress_seed)
    path = tmp_path / "stress.ps"
    item_fields = [("a", "Int32"), ("next", "link")]
    special_fields = [("extra", "UInt8")]

    def fresh_name():
        """A field name not in use now: often one a dropped or renamed field had before."""
        used = {name for name, _ in item_fields + special_fields} | {"uid"}
        free = [f"f{n}" for n in range(16) if f"f{n}" not in used]
        return rng.choice(free) if free else None
    model = Model()
    committed = copy.deepcopy(model)
    p = storage_class(item_fields, special_fields)(path)
    p.root.items = []
    p.commit()

    def value(kind):
        if kind == "link":
            return rng.choice([None] + list(model.items))
        if kind == "text":
            return rng.choice([None, "", "x" * rng.randint(1, 40)])
        return NUMBERS[kind](rng)

    def proxy_of(uid):
        stack, seen = list(p.root.items), set()
        while stack:
            item = stack.pop()
            if item.uid == uid:
                return item
            if item.uid not in seen:
                seen.add(item.uid)
                stack += [getattr(item, name) for name, kind in item_fields
                          if kind == "link" and getattr(item, name) is not None]
        return None

    def store_value(kind, v):
        return proxy_of(v) if kind == "link" and v is not None else v

    for step in range(stress_iterations):
        where = f"seed {stress_seed}, step {step}"
        action = rng.choices(["create", "set", "remove", "commit", "rollback", "reopen"],
                             [4, 8, 2, 2, 1, 1])[0]
        if action == "create" or not model.order and action in ("set", "remove"):
            special = rng.random() < 0.3
            fields = item_fields + (special_fields if special else [])
            values = {name: value(kind) for name, kind in fields if rng.random() < 0.5}
            values = {name: v for name, v in values.items()
                      if dict(fields)[name] != "link" or v is None or proxy_of(v) is not None}
            uid = model.next_uid
            model.next_uid += 1
            cls = p.schema.Special if special else p.schema.Item
            obj = cls(uid=uid, **{name: store_value(dict(fields)[name], v) for name, v in values.items()})
            p.root.items.append(obj)
            model.items[uid] = dict({name: DEFAULTS.get(kind, 0) for name, kind in fields}, special=special,
                                    **values)
            model.order.append(uid)
        elif action == "set":
            uid = rng.choice(model.order)
            fields = item_fields + (special_fields if model.items[uid]["special"] else [])
            name, kind = rng.choice(fields)
            v = value(kind)
            if kind == "link" and v is not None and proxy_of(v) is None:
                continue
            setattr(proxy_of(uid), name, store_value(kind, v))
            model.items[uid][name] = v
        elif action == "remove":
            index = rng.randrange(len(model.order))
            del p.root.items[index]
            model.order.pop(index)
        elif action == "commit":
            p.commit()
            committed = copy.deepcopy(model)
            p.check()
        elif action == "rollback":
            p.rollback()
            model = copy.deepcopy(committed)
        else:  # reopen, most times with a changed schema
            p.close()
            committed = copy.deepcopy(model)
            change = rng.choice(["none", "add", "add special", "rename", "drop", "widen"])
            if change in ("add", "add special", "rename") and fresh_name() is None:
                change = "drop"
            owner, fields = ("Special", special_fields) if rng.random() < 0.3 else ("Item", item_fields)
            own = [(name, kind) for name, kind in fields if name not in ("a", "next")]
            if change.startswith("add"):
                fields = special_fields if change == "add special" else item_fields
                name = fresh_name()
                kind = rng.choice(list(NUMBERS) + ["link", "text"]) if fields is item_fields \
                    else rng.choice(list(NUMBERS) + ["text"])
                fields.insert(rng.randint(0, len(fields)), (name, kind))
                for uid, item in model.items.items():
                    if fields is item_fields or item["special"]:
                        item[name] = DEFAULTS.get(kind, 0)
            elif change == "rename" and own:
                old, kind = rng.choice(own)
                new = fresh_name()
                Storage.rename_field(path, owner, old, new)
                fields[fields.index((old, kind))] = (new, kind)
                for item in model.items.values():
                    if old in item:
                        item[new] = item.pop(old)
            elif change == "drop" and own:
                old, kind = rng.choice(own)
                Storage.drop_field(path, owner, old)
                fields.remove((old, kind))
                for item in model.items.values():
                    item.pop(old, None)
            elif change == "widen":
                candidates = [(name, kind) for name, kind in fields if kind in WIDER]
                if candidates:
                    name, kind = rng.choice(candidates)
                    Storage.change_field_type(path, owner, name, getattr(permastruct, WIDER[kind]))
                    fields[fields.index((name, kind))] = (name, WIDER[kind])
            committed = copy.deepcopy(model)
            if rng.random() < 0.25:
                with Storage(path, readonly=True) as bare:
                    pass  # (the bare open builds every version; it cannot see new fields yet)
            p = storage_class(item_fields, special_fields)(path)
            p.check()
            compare(p, model, item_fields, special_fields, where + " (reopened)")
        if step % 10 == 0:
            compare(p, model, item_fields, special_fields, where)
    compare(p, model, item_fields, special_fields, "the end")
    p.close()
    with Storage(path) as bare:
        bare.check()
        assert [item.uid for item in bare.root.items] == model.order
