"""Typing (issue 15, item 6): the package ships ``py.typed``, and a type checker reads the fields of
an annotated module-level structure class as their Python types (``tests/typed_schema_example.py``)."""

import os
import re
import subprocess
import sys

import pytest

import permastruct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PROBE = '''
from typed_schema_example import Person

def probe(person: Person) -> None:
    reveal_type(person.age)
    reveal_type(person.name)
    reveal_type(person.friend)
    reveal_type(person.greeting())
    years: int = person.age + 1


def storage_api(path: str) -> None:
    from typed_schema_example import Members
    with Members(path) as p:
        reveal_type(p)
        reveal_type(p.refresh())
        reveal_type(p.check())
'''


def test_the_package_ships_py_typed():
    assert os.path.isfile(os.path.join(os.path.dirname(permastruct.__file__), "py.typed"))
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as handle:
        assert re.search(r'\[tool\.setuptools\.package-data\]\s*permastruct = \["py\.typed"\]', handle.read())


def test_mypy_sees_field_types(tmp_path):
    pytest.importorskip("mypy", reason="mypy (the test extra) is not installed")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = dict(os.environ, MYPYPATH=os.pathsep.join([os.path.dirname(os.path.dirname(permastruct.__file__)), HERE]))
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull,
                           "--follow-imports=silent", str(probe), os.path.join(HERE, "typed_schema_example.py")],
                          capture_output=True, text=True, env=env, timeout=600)
    revealed = re.findall(r'Revealed type is "([^"]+)"', done.stdout)
    revealed = [name.replace("builtins.", "") for name in revealed]
    assert revealed == ["int", "permastruct.strings.String", "typed_schema_example.Person", "str",
                        "typed_schema_example.Members", "bool", "dict[str, Any]"], done.stdout + done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
