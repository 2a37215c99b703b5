"""The command line: ``python -m permastruct demo [PATH] | info FILE | check FILE``."""

import argparse
import os
import sys
import tempfile

from . import _format as F
from . import collections as C
from ._check import check_storage
from .errors import PermastructError
from .storage import Storage


def _demo_storage_class():
    class DemoStorage(Storage):
        def populateSchema(self):
            class Agent(self.schema.Structure):
                name = self.schema.ByteString
                age = self.schema.Int
                weight = self.schema.Float

                def describe(self):
                    return f"{self.name.contents.decode()} ({self.age})"

            class Root(self.schema.Structure):
                agent = Agent
                motto = self.schema.String
                samples = self.schema.Buffer

    return DemoStorage


def demo(path=None, out=print):
    """Create a store, write, commit, reopen, read back and check it; print each step."""
    folder = None
    if path is None:
        folder = tempfile.mkdtemp(prefix="permastruct-demo-")
        path = os.path.join(folder, "demo.ps")
    DemoStorage = _demo_storage_class()
    out(f"1. creating a store in {path}")
    with DemoStorage(path, fileSize=16000) as p:
        out("2. schema: Agent(name: ByteString, age: Int, weight: Float), "
            "Root(agent: Agent, motto: String, samples: Buffer)")
        p.root.agent = p.schema.Agent(name=b"Felix", age=31, weight=72.5)
        p.root.motto = "Nothing is loaded up front."
        from array import array
        p.root.samples = array("d", [0.5, 1.5, 2.5])
        p.commit()
        out("3. wrote an Agent, a String and a Buffer of 3 doubles; committed")
    out(f"4. closed; the file has {os.path.getsize(path)} bytes")
    with DemoStorage(path) as p:
        agent = p.root.agent
        out(f"5. reopened: agent {agent.describe()}, weight {agent.weight}, motto {str(p.root.motto)!r}")
        view = memoryview(p.root.samples)
        out(f"6. the buffer as a zero-copy memoryview: format {view.format!r}, shape {view.shape}, "
            f"values {view.tolist()}")
        view.release()
        agent.age += 1
        out(f"7. wrote agent.age = {agent.age} through the map")
        summary = p.check()
        out(f"8. check(): {summary['objects']} objects in {summary['pages']} pages, no problem found")
    if folder is not None:
        os.unlink(path)
        os.rmdir(folder)
        out("9. removed the demo store")
    return 0


def info(path, out=print):
    """Print the format, sizes, schema and counts of a store."""
    with Storage(path, readonly=True) as p:
        pf = p._page_file
        out(f"file:        {p.fileName}")
        out(f"format:      permastruct version {F.FORMAT_VERSION}, page size {pf.page_size}")
        out(f"size:        {p.fileSize} bytes, {pf.page_count} pages, {pf.free_page_count()} free")
        out(f"commit:      transaction {pf.txn}")
        out(f"strings:     {len(p.stringRegistry)} interned")
        out("schema:")
        for cls in p._classes_by_id.values():
            if cls._ps_kind == "structure":
                base = cls.__bases__[0].__name__
                fields = ", ".join(f"{name}: {p._type_name(ftype)}" for name, ftype in cls._ps_own_fields)
                out(f"  {cls.__name__}({base}): {fields or 'no fields'}")
            elif cls._ps_kind in C.KINDS:
                params = ", ".join(p._type_name(t) for t in cls._ps_params)
                out(f"  {cls.__name__} = {C.DESCRIPTORS[cls._ps_kind].__name__}[{params}]")
    return 0


def check(path, out=print):
    """Verify a store; exit status 1 if it is damaged."""
    progress = None
    if sys.stderr.isatty():
        def progress(done, total):
            width = 40
            filled = width * done // max(total, 1)
            sys.stderr.write(f"\rchecking [{'#' * filled}{'.' * (width - filled)}] {done}/{total} pages")
            sys.stderr.flush()
    with Storage(path, readonly=True) as p:
        summary = check_storage(p, progress)
    if progress is not None:
        sys.stderr.write("\n")
    out(f"{path}: OK - {summary['objects']} objects, {summary['pages']} pages "
        f"({summary['free_pages']} free), {summary['strings']} interned strings")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m permastruct", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("demo", help="run a guided demo in a temporary folder (or PATH)")
    command.add_argument("path", nargs="?")
    command = commands.add_parser("info", help="show format, sizes, schema and counts of a store")
    command.add_argument("file")
    command = commands.add_parser("check", help="verify every invariant of a store")
    command.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return demo(args.path)
        if args.command == "info":
            return info(args.file)
        return check(args.file)
    except (PermastructError, OSError) as exc:
        print(f"permastruct: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
