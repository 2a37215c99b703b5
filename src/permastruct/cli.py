"""The command line (DESIGN 3.12): ``permastruct demo | info | check | dump | load | pack ...``.

The same commands run as ``python3 -m permastruct ...`` and, once installed,
as the ``permastruct`` console script; usage and help name the program the
way it was started.  Exit status: 0 on success, 1 with a one-line message
on stderr on a library error (a ``PermastructError``, or an ``OSError`` such
as a missing file), 2 on a usage error, 130 on Ctrl-C; no traceback for any
of them.  Output into a pipe that closes early (``| head``) is not an
error: the command stops quietly with status 0.

>>> lines = []
>>> demo(out=lines.append)
0
>>> lines[0].split(" in /")[0], lines[-1].split(" and ")[0]
('1. creating a store', '11. removed the demo store')
"""

import argparse
import itertools
import os
import shlex
import shutil
import sys
import tempfile
import time
from array import array

from . import __version__
from . import _format as F
from . import collections as C
from ._check import _type_name
from ._schema import type_label
from .errors import NotAStorageError, PermastructError
from .storage import Storage

DESCRIPTION = """\
permastruct: an embeddable persistent-object store in one memory-mapped file.
A store is one file, plus a FILE-wal log beside it while it is open for
writing or after a crash."""

EPILOG = """\
Run '%(prog)s COMMAND --help' for what each command does.

exit status:
  0    success
  1    a library error, such as a missing file or a damaged store
       (one line on stderr, no traceback)
  2    a usage error
  130  interrupted (Ctrl-C)
Output into a pipe that closes early (| head) stops quietly with status 0."""

DEMO_HELP = """\
A guided tour: create a store, define a schema, write and commit data, close,
reopen, read it back (a buffer as a zero-copy memoryview), change a field,
run the integrity check, and print what each step did and which files the
store has.

Without PATH the store lives in a new temporary folder, which is removed at
the end, also when a step fails.  With PATH:
  - a new PATH (or an empty file) becomes a new store, which is kept;
  - an existing store made by an earlier demo is opened, its agent's age
    goes up by one, and it is kept;
  - anything else (another store, any other file) is refused unchanged:
    the demo never writes to data it did not create."""

INFO_HELP = """\
Show what a store holds, from its last commit (safe while another process
writes to it): the file's size and pages (in use, free, and preallocated
at the end of the file for growth), the last transaction, the log, whether
a writer and readers have it open, the schema, and the objects per type with
the bytes they take.  Counting the objects reads every page (a progress bar
shows on a terminal)."""

CHECK_HELP = """\
Verify every invariant of a store (Storage.check()): the header, the root
records and the log, every page, the allocator, every object and reference,
the collections, the reference counts and the string registry.  Prints a
one-line summary and exits 0, or names the first problem and exits 1.  A
progress bar shows on a terminal."""

DUMP_HELP = """\
Print the objects reachable from the root of a store as a tree, one line
each: an object is shown once, and a later reference to it as '-> @0x...'
(its offset), so shared objects and cycles are safe.  Strings and numbers
are shown as values.  Reads the last commit (safe while another process
writes).

With --json, print the whole reachable store instead as portable JSON
(schema and data; bytes in base64, buffers with format and shape, NaN and
infinities spelled out, shared objects and cycles by id), which 'load'
turns back into a store; docs/maintenance.rst describes the format."""

LOAD_HELP = """\
Build a new store NEWFILE from the JSON that 'dump --json' printed ('-'
reads it from stdin).  NEWFILE must not exist.  The store is built under a
temporary name and renamed into place when it is complete: a document that
cannot be loaded (the message names the part that is wrong) leaves nothing
behind.  'dump --json' of the new store prints the same JSON."""

PACK_HELP = """\
Free every object the root of a store cannot reach, cycles included
(reference counting alone never frees a cycle), in one commit, and print
what was freed.  Needs the store open for nobody else to write (readers may
keep reading: their snapshot stays as it was until they refresh).  A
progress bar shows on a terminal."""

BACKUP_HELP = """\
Copy the last commit of a store to the new file DEST, from a read-only open:
a writer and readers go on meanwhile, nobody waits.  The copy is written
under a temporary name, synced and then given its name, so a crash or a
full disk leaves no file at DEST; it opens as an ordinary store with no log.
DEST must not exist.

With --compact, copy only the objects the root reaches, into consecutive
pages (every offset renumbered): the copy is about the size of the live
data.  It makes a full copy first (removed at the end) and holds every
object's JSON form in memory."""

COMPACT_HELP = """\
Rewrite a store with only the objects its root reaches, in consecutive
pages, and replace the file with the result in one rename: the file shrinks
to about the size of its live data.  Refuses while anyone (a writer or a
reader) has the store open.  Needs room for two copies meanwhile."""

#: What the demo's Storage class stores (as info prints a schema): an existing
#: store with exactly this schema is one an earlier demo made.
DEMO_SCHEMA = ("Agent(Structure): name: ByteString, age: Int, weight: Float",
               "Root(Structure): agent: Agent, motto: String, samples: Buffer")


class CommandError(Exception):
    """A command refuses to go on: main prints its one-line message and exits with status 1."""


# -- demo ----------------------------------------------------------------------------
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


def demo(path=None, out=print, prog="python3 -m permastruct"):
    """Run the guided demo (see DEMO_HELP), printing each step through ``out``; return 0.

    ``prog`` is how the closing hint names the command line.
    """
    numbers = itertools.count(1)

    def step(text):
        out(f"{next(numbers)}. {text}")

    folder = None
    if path is None:
        folder = tempfile.mkdtemp(prefix="permastruct-demo-")
        path = os.path.join(folder, "demo.ps")
    try:
        _demo_steps(os.fspath(path), step)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    if folder is None:
        step(f"the store stays at {path}; look inside with: {prog} info {shlex.quote(path)}")
    elif os.path.exists(folder):
        raise CommandError(f"demo: could not remove its folder {folder}")
    else:
        step(f"removed the demo store and its folder {folder}")
    return 0


def _demo_steps(path, step):
    existing = _made_by_a_demo(path)
    DemoStorage = _demo_storage_class()
    if existing:
        step(f"opening the store {path}, made by an earlier demo")
    else:
        step(f"creating a store in {path}")
    with DemoStorage(path, fileSize=16000) as p:
        step("its schema: " + "; ".join(_schema_lines(p)))
        if p.root.agent is None:
            p.root.agent = p.schema.Agent(name=b"Felix", age=31, weight=72.5)
            p.root.motto = "Nothing is loaded up front."
            p.root.samples = array("d", [0.5, 1.5, 2.5])
            p.commit()
            step("wrote an Agent, a String and a Buffer of 3 doubles; committed")
        else:
            step("it holds the Agent, String and Buffer an earlier run wrote")
    step(f"closed: the store has {_store_files(path)}")
    with DemoStorage(path) as p:
        agent = p.root.agent
        step(f"reopened: agent {agent.describe()}, weight {agent.weight}, motto {str(p.root.motto)!r}")
        view = memoryview(p.root.samples)
        step(f"the buffer as a zero-copy memoryview: format {view.format!r}, shape {view.shape}, "
             f"values {view.tolist()}")
        view.release()
        agent.age += 1
        p.commit()
        step(f"wrote agent.age = {agent.age} through the map; committed")
        step(f"while it is open for writing, the store has {_store_files(path)}")
        summary = p.check()
        step(f"check(): {summary['objects']} objects in {summary['pages']} pages, no problem found")
    files = _store_files(path)
    step(f"closed: the store has {files}" + ("; a clean close copies the log into the file and removes it"
                                              if files.startswith("one") else ""))


def _made_by_a_demo(path):
    """True if ``path`` is a store an earlier demo made; False if there is nothing there to keep
    (no file, or an empty one); else CommandError: the demo does not touch other data."""
    if not os.path.lexists(path) or (os.path.isfile(path) and os.path.getsize(path) == 0):
        return False
    try:
        with Storage(path, readonly=True) as p:
            if tuple(_schema_lines(p)) == DEMO_SCHEMA:
                return True
            what = "a store the demo did not make"
    except NotAStorageError:
        what = "not a permastruct store"
    raise CommandError(f"demo: {path!r} exists and is {what}; the demo changes only stores it made: "
                       "give it a new PATH, or none for a temporary folder")


def _store_files(path):
    """The files of the store at ``path``, in words: ``one file, demo.ps (69632 bytes)``, or two with its log."""
    try:
        log = os.path.getsize(path + F.WAL_SUFFIX)
    except FileNotFoundError:
        return f"one file, {os.path.basename(path)} ({os.path.getsize(path)} bytes)"
    return (f"two files, {os.path.basename(path)} ({os.path.getsize(path)} bytes) and its write-ahead log "
            f"{os.path.basename(path)}{F.WAL_SUFFIX} ({log} bytes), where a commit goes first")


# -- info ----------------------------------------------------------------------------
def info(path, out=print):
    """Print what the store at ``path`` holds (see INFO_HELP); return 0."""
    with Storage(path, readonly=True) as p:
        pf = p._page_file
        page_size, size, committed = pf.page_size, pf.io.size(), pf.page_count
        file_pages, rest = divmod(max(size - F.HEADER_BLOCK, 0), page_size)
        free = _free_pages(p)
        version = F.HEADER.unpack_from(pf.io.pread(F.HEADER.size, 0))[1]
        out(f"file:      {p.fileName}")
        out(f"format:    permastruct format {version}, pages of {page_size} bytes")
        out(f"size:      {_size(size)}: a {F.HEADER_BLOCK}-byte header and {file_pages} pages"
            + (f" and {rest} bytes" if rest else ""))
        out(f"pages:     {committed} in the last commit: {committed - free} in use, {free} free")
        if file_pages > committed:
            out(f"           {file_pages - committed} more preallocated: room at the end of the file "
                "for the store to grow into, not in use yet")
        out(f"commit:    transaction {pf.txn}")
        out(f"log:       {_log_text(pf, pf.txn - pf.main_txn)}")
        writing = pf.io.first_conflict(F.LOCK_WRITER, 1) is not None
        out(f"writer:    {'the store is open for writing' if writing else 'none'}")
        out(f"readers:   {_readers_text(p)}")
        out(f"strings:   {len(p.stringRegistry)} interned")
        out("schema:")
        for line in _schema_lines(p):
            out(f"  {line}")
        counts = _count_objects(p)
        live = sum(nbytes for _, nbytes in counts.values())
        out(f"objects:   {sum(n for n, _ in counts.values())} objects, {live} bytes")
        rows = [(_type_name(p._heap.classes, type_id), str(n), str(nbytes))
                for type_id, (n, nbytes) in sorted(counts.items())]
        widths = [max(map(len, column), default=0) for column in zip(*rows)]
        for name, n, nbytes in rows:
            out(f"  {name:<{widths[0]}}  {n:>{widths[1]}}  {nbytes:>{widths[2]}} bytes")
        used = committed * page_size
        out(f"space:     {used} bytes in the {committed} pages of the last commit:")
        out(f"  live     {live} bytes in objects")
        out(f"  free     {free * page_size} bytes in {free} free pages")
        out(f"  other    {used - live - free * page_size} bytes: page headers, the allocator's page, "
            "and free slots in pages of small objects")
    return 0


def _count_objects(storage):
    """``{type id: [objects, bytes]}`` over every object (a progress bar on a terminal meanwhile)."""
    counts = {}
    bar = _progress_bar(keep=False)
    try:
        for _, capacity, type_id in storage._heap.walk(bar):
            entry = counts.setdefault(type_id, [0, 0])
            entry[0] += 1
            entry[1] += capacity
    finally:
        if bar is not None:
            bar.end()
    return counts


def _free_pages(storage):
    """The free pages of the last commit: on the free-page list and in the allocator's free runs."""
    return storage._page_file.free_page_count() + sum(length for _, length in storage._heap.allocator.free_runs())


def _size(n):
    """``69632 bytes (68.0 KiB)``: the bytes, and from 10 KiB on a rounded size too."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n >= 10 << 10:
            return f"{n} bytes ({n / scale:.1f} {unit})"
    return f"{n} bytes"


def _log_text(pf, pending):
    """The log's size and whether the main file holds every commit; ``pending``: commits only in the log."""
    wal = pf.log_path()
    if wal is None:
        return "none (as after every clean close: the main file holds every commit)"
    held = (f"{pending} commit{'s' if pending != 1 else ''} not yet copied into the main file" if pending
            else "the main file holds every commit")
    return f"{os.path.basename(wal)}, {os.path.getsize(wal)} bytes; {held}"


def _readers_text(storage):
    """Which other read-only opens hold a snapshot: the oldest, how far behind, how much log it keeps."""
    readers = storage.readers()  # this command's own snapshot is not listed
    if not readers:
        return "none (besides this command)"
    oldest = readers[0]
    if not oldest["behind"]:
        return f"{len(readers)}, all at the last commit (transaction {oldest['transaction']})"
    since = ""
    if oldest["since"] is not None:
        since = f" (committed {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(oldest['since']))})"
    behind = oldest["behind"]
    return (f"{len(readers)}; the oldest, process {oldest['pid']}, holds transaction {oldest['transaction']}"
            f"{since}, {behind} commit{'s' if behind != 1 else ''} behind, keeping {_size(oldest['log_bytes'])} "
            "of log until it refreshes or closes")


def _schema_lines(storage):
    """One line per type the store defines: ``Agent(Structure): name: ByteString, age: Int``."""
    lines = []
    for cls in storage._heap.classes.values():
        if cls.__dict__.get("_ps_old"):  # the class of an earlier version: its type is listed once
            continue
        if cls._ps_kind == "structure":
            base = getattr(cls, "_ps_base", cls.__bases__[0]).__name__
            fields = ", ".join(f"{name}: {type_label(ftype)}" for name, ftype in cls._ps_own_fields)
            lines.append(f"{cls.__name__}({base}): {fields or 'no fields'}")
        elif cls._ps_kind in C.KINDS:
            params = ", ".join(type_label(t) for t in cls._ps_params)
            lines.append(f"{cls.__name__} = {C.DESCRIPTORS[cls._ps_kind].__name__}[{params}]")
    return lines


# -- dump, load, pack ---------------------------------------------------------------
def dump(path, out=print, depth=None, items=None, as_json=False):
    """Print the tree (or with ``as_json`` the JSON form) of the store at ``path``; return 0."""
    from . import _dump
    with Storage(path, readonly=True) as p:
        if as_json:
            _dump.write_json(p, sys.stdout if out is print else _Lines(out))
        else:
            _dump.dump_text(p, out, depth, items)
    return 0


class _Lines:
    """A text stream that hands each written line to ``out`` (for tests and doctests)."""

    def __init__(self, out):
        self.out, self.pending = out, ""

    def write(self, text):
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            self.out(line)


def load(source, path, out=print):
    """Build the store ``path`` from the JSON document in file ``source`` ('-': stdin); return 0."""
    import json
    from . import _dump
    from .errors import LoadError
    try:
        if source == "-":
            document = json.load(sys.stdin)
        else:
            with open(source, encoding="utf-8") as stream:
                document = json.load(stream)
    except (ValueError, RecursionError) as exc:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise LoadError(f"{source}: not JSON: {exc}") from None
    made = _dump.load_json(document, path)
    out(f"{path}: loaded {made} objects")
    return 0


def pack(path, out=print):
    """Run ``Storage.pack()`` on the store at ``path`` and print what it freed; return 0."""
    bar = _progress_bar(keep=False)
    try:
        with Storage(path) as p:
            result = p.pack(bar)
    finally:
        if bar is not None:
            bar.end()
    out(f"{path}: freed {result['objects_freed']} objects ({result['bytes_freed']} bytes); "
        f"{result['pages_released']} pages released, {result['pages']} pages in use")
    return 0


def backup(path, dest, out=print, compact=False):
    """Copy the last commit of the store at ``path`` to the new file ``dest``; return 0."""
    with Storage(path, readonly=True) as p:
        result = p.backup(dest, compact=compact)
    out(f"{result['path']}: a {'compact ' if compact else ''}copy of transaction {result['transaction']} of "
        f"{path} ({result['pages']} pages, {result['bytes']} bytes)")
    return 0


def compact(path, out=print):
    """Rewrite the store at ``path`` with only what its root reaches; return 0."""
    from ._backup import compact_in_place
    result = compact_in_place(path)
    out(f"{path}: compacted from {result['before']} to {result['after']} bytes")
    return 0


# -- check ---------------------------------------------------------------------------
def check(path, out=print):
    """Run ``Storage.check()`` on the store at ``path`` and print a summary; return 0.

    A damaged store raises CorruptStorageError (exit status 1 from the command line).
    """
    bar = _progress_bar(keep=True)
    try:
        with Storage(path, readonly=True) as p:
            summary = p.check(bar)
            free = _free_pages(p)
    finally:
        if bar is not None:
            bar.end()
    out(f"{path}: OK - {summary['objects']} objects, {summary['pages']} pages ({free} free), "
        f"{summary['strings']} interned strings")
    return 0


class ProgressBar:
    """Draws ``progress(done, total, what)`` calls as a bar on a terminal, one line per phase.

    The first and the last call of a phase (``done == total``) are always
    drawn, the calls in between at most every ``interval`` seconds, so a
    big store pays for a clock read per call and nothing more.  A phase
    ends on a finished line (``keep``) or is wiped (``keep=False``).

    >>> import io
    >>> stream = io.StringIO()
    >>> bar = ProgressBar(stream, width=10)
    >>> for done in range(0, 5):
    ...     bar(done, 4, "pages")
    >>> stream.getvalue().split("\\r")[-1]
    'pages   [##########] 4/4\\n'
    """

    interval = 0.1

    def __init__(self, stream, keep=True, width=30):
        self.stream, self.keep, self.width = stream, keep, width
        self.what = None  # the phase of the line being drawn (None: no line open)
        self.shown = 0  # the length of that line
        self.drawn_at = 0.0

    def __call__(self, done, total, what):
        now = time.monotonic()
        if what == self.what and done < total and now - self.drawn_at < self.interval:
            return
        if what != self.what:
            self.end()
        self.what, self.drawn_at = what, now
        filled = self.width * min(done, total) // max(total, 1)
        text = f"{what:<8}[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}"
        self.stream.write("\r" + text.ljust(self.shown))
        self.shown = len(text)
        if done >= total:
            self.end()
        self.stream.flush()

    def end(self):
        """Finish (or wipe) the line being drawn, if any."""
        if self.what is None:
            return
        self.stream.write("\n" if self.keep else "\r" + " " * self.shown + "\r")
        self.stream.flush()
        self.what, self.shown = None, 0


def _progress_bar(keep):
    """A ProgressBar on stderr when stderr is a terminal, else None."""
    stream = sys.stderr
    return ProgressBar(stream, keep) if stream is not None and stream.isatty() else None


# -- main ----------------------------------------------------------------------------
def _parser(prog):
    def command(name, summary, text):
        parser = commands.add_parser(name, help=summary, description=text,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.set_defaults(command=name)
        return parser

    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"permastruct {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    command("demo", "run a guided demo in a temporary folder (or at PATH)", DEMO_HELP).add_argument(
        "path", nargs="?", metavar="PATH", help="where to keep the demo store (see above)")
    command("info", "show sizes, pages, schema and object counts of a store", INFO_HELP).add_argument(
        "file", metavar="FILE", help="the store's file")
    command("check", "verify every invariant of a store", CHECK_HELP).add_argument(
        "file", metavar="FILE", help="the store's file")
    sub = command("dump", "print a store's objects as a tree (or as JSON)", DUMP_HELP)
    sub.add_argument("file", metavar="FILE", help="the store's file")
    sub.add_argument("--json", action="store_true", help="print the portable JSON form instead")
    sub.add_argument("--depth", type=_count, metavar="N", help="show N levels below the root at most")
    sub.add_argument("--items", type=_count, metavar="N", help="show N elements of each collection at most")
    sub = command("load", "build a new store from 'dump --json' output", LOAD_HELP)
    sub.add_argument("source", metavar="JSON", help="the JSON file ('-': stdin)")
    sub.add_argument("file", metavar="NEWFILE", help="the new store's file (must not exist)")
    command("pack", "free what the root cannot reach (cycles too)", PACK_HELP).add_argument(
        "file", metavar="FILE", help="the store's file")
    sub = command("backup", "copy a store's last commit to a new file", BACKUP_HELP)
    sub.add_argument("file", metavar="FILE", help="the store's file")
    sub.add_argument("dest", metavar="DEST", help="the copy's file (must not exist)")
    sub.add_argument("--compact", action="store_true", help="copy only what the root reaches, renumbered")
    command("compact", "rewrite a store with only what its root reaches", COMPACT_HELP).add_argument(
        "file", metavar="FILE", help="the store's file")
    return parser


def _count(text):
    """An argparse type: a non-negative int."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def main(argv=None, prog=None):
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    ``prog`` names the program in usage and help (default: the name it was
    started by, as argparse finds it: ``permastruct`` for the console script).

    >>> main(["--version"])
    permastruct ...
    0
    """
    parser = _parser(prog)
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # after --help or --version (0), or a usage error (2)
            status = exc.code
        else:
            status = _run(args, parser.prog)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at interpreter exit
    except BrokenPipeError:
        # The reader went away (| head): not an error.  What is left in
        # stdout's buffer goes to /dev/null, so the flush at exit is quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    return status


def _run(args, prog):
    try:
        if args.command == "demo":
            return demo(args.path, prog=prog)
        if args.command == "info":
            return info(args.file)
        if args.command == "dump":
            if args.json and (args.depth is not None or args.items is not None):
                raise CommandError("dump: --json prints the whole store; --depth and --items are for the tree")
            return dump(args.file, depth=args.depth, items=args.items, as_json=args.json)
        if args.command == "load":
            return load(args.source, args.file)
        if args.command == "pack":
            return pack(args.file)
        if args.command == "backup":
            return backup(args.file, args.dest, compact=args.compact)
        if args.command == "compact":
            return compact(args.file)
        return check(args.file)
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        return 130
    except (PermastructError, OSError, CommandError) as exc:
        print(f"{prog}: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc):
    """The message of a library error on one line, after its class name (an OSError's file once)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None and str(exc.filename) not in text:
            text = f"{exc.filename}: {text}"
    else:
        text = str(exc)
    text = " ".join(text.split())
    return text if isinstance(exc, CommandError) else f"{type(exc).__name__}: {text}"
