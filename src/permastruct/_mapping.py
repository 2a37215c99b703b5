"""The mapped file: one I/O layer, segments that never move, dirty-page detection.

Every write, sync, allocation and truncation of a store's file goes through
:class:`FileIO`; tests set :data:`FileIO.hook` to fail or stop at the Nth
operation.

:class:`MappedFile` maps the file **privately** (``mmap.ACCESS_COPY``): stores
into the map stay in this process's memory and reach the file only when
:meth:`MappedFile.write_back` copies the changed pages with ``pwrite``.  The
file is mapped in *segments* that are never resized or moved, so proxies and
memoryviews stay valid while the file grows; new space is reserved with
``posix_fallocate`` before it is mapped, so a full disk is an exception and
never a SIGBUS.

Which pages changed is asked of the kernel (``/proc/self/pagemap``: a page of
a private file mapping that was written is no longer a file page), so writes
through proxies cost nothing extra.  The ``PAGEMAP_SCAN`` ioctl (Linux 6.7)
returns the runs of such pages; older kernels give one entry per page, read
and sifted here (8 bytes a page: 8 MB for each commit in a 4 GB map).  Where
pagemap is not available the pages are compared with the file instead.
``PERMASTRUCT_DIRTY=pagemap`` skips the ioctl and ``=compare`` both (tests).  After write-back, ``MADV_DONTNEED``
drops the private copies; the map then shows the file again.
"""

import bisect
import contextlib
import ctypes
import errno
import mmap
import os
import stat
import struct
import sys
import time

from .errors import CorruptStorageError, NotAStorageError, ReadOnlyError, StorageFullError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no fcntl, no byte-range locks of this kind
    raise ImportError(f"permastruct needs a POSIX system: its locks use fcntl, which Python on {sys.platform} "
                      "does not have (Linux is what is tested; see the platforms section of README.md)") from None

OS_PAGE = mmap.PAGESIZE
GRANULE = max(mmap.ALLOCATIONGRANULARITY, OS_PAGE)
MAX_SEGMENT = 1 << 30

_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)

# Top byte of a pagemap entry: bit 63 present, bit 62 swapped, bit 61 file page.
# A page is dirty when it is present and not a file page, or swapped out.
_DIRTY_TABLE = bytes(
    1 if ((b & 0x80 and not b & 0x20) or b & 0x40) else 0 for b in range(256))


class _ScanArg(ctypes.Structure):
    """``struct pm_scan_arg`` of the ``PAGEMAP_SCAN`` ioctl (Linux 6.7 and later)."""
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _PageRegion(ctypes.Structure):
    """``struct page_region``: the pages ``start .. end`` (addresses) share ``categories``."""
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


# _IOWR('f', 16, struct pm_scan_arg); categories PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED.
_PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_ScanArg) << 16) | (ord("f") << 8) | 16
_PAGE_IS_FILE, _PAGE_IS_PRESENT, _PAGE_IS_SWAPPED = 1 << 2, 1 << 3, 1 << 4
_SCAN_REGIONS = 512


# Byte-range locks: open-file-description locks where the system has them (Linux),
# so that two opens in one process exclude each other and closing another
# descriptor of the file keeps them; POSIX record locks elsewhere.
if hasattr(fcntl, "F_OFD_SETLK"):
    _SETLK, _SETLKW, _GETLK = fcntl.F_OFD_SETLK, fcntl.F_OFD_SETLKW, fcntl.F_OFD_GETLK
else:  # pragma: no cover - not Linux
    _SETLK, _SETLKW, _GETLK = fcntl.F_SETLK, fcntl.F_SETLKW, fcntl.F_GETLK
if sys.platform.startswith("linux"):
    _FLOCK = struct.Struct("hhqqi4x")  # l_type, l_whence, l_start, l_len, l_pid

    def _pack_lock(kind, start, length):
        return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)

    def _unpack_lock(raw):
        kind, _, start, length, _ = _FLOCK.unpack(raw)
        return kind, start, length
else:  # pragma: no cover - BSD and macOS order
    _FLOCK = struct.Struct("qqihh")  # l_start, l_len, l_pid, l_type, l_whence

    def _pack_lock(kind, start, length):
        return _FLOCK.pack(start, length, 0, kind, os.SEEK_SET)

    def _unpack_lock(raw):
        start, length, _, kind, _ = _FLOCK.unpack(raw)
        return kind, start, length
_BUSY_ERRNOS = (errno.EAGAIN, errno.EACCES)
#: fdatasync where there is one: it syncs the data and the size, not the times.
_datasync = getattr(os, "fdatasync", os.fsync)


class OutsideMapError(CorruptStorageError, IndexError):
    """An offset or range outside the mapped file.

    Offsets come from the file, so in a damaged file this is damage
    (``CorruptStorageError``); callers that probe ranges catch ``IndexError``.
    """


def _full_error(exc, what, path, memory=False):
    """``exc`` as a StorageFullError when it says the disk (or, for ``memory``, the memory) is full."""
    if getattr(exc, "errno", None) in _FULL_ERRNOS or (memory and getattr(exc, "errno", None) == errno.ENOMEM):
        error = StorageFullError(exc.errno, f"{what} failed for {path!r}: {os.strerror(exc.errno)}; "
                                 "the storage is still at its last commit")
        error.filename = path
        return error
    return exc


def sync_folder(folder):
    """fsync ``folder`` so that a name just linked or renamed in it is durable (best effort: a file
    system that cannot sync a directory is left as it is)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FileIO:
    """The one I/O layer: every write, sync, allocate and truncate of a store's file.

    ``FileIO.hook``, when set, is called as ``hook(operation, path, *args)``
    before each operation; it may raise to simulate a failure, or stop the
    process to simulate a crash.  The operations and their arguments:

    ``"create"`` ()                 the file is about to be created
    ``"pwrite"`` (data, offset)     ``data`` is a bytes-like object
    ``"fsync"`` ()
    ``"fsync_dir"`` ()              the directory holding ``path``
    ``"fallocate"`` (offset, length)
    ``"truncate"`` (length,)
    ``"unlink"`` ()                 the file is about to be removed (:meth:`unlink`)
    ``"link"`` (new path,)          a new file gets its name (:meth:`publish_as`)

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "f")
    >>> io = FileIO.open(path, readonly=False, create=True)
    >>> io.pwrite(b"hello", 0); io.pread(5, 0)
    b'hello'
    >>> io.close()
    """

    hook = None
    #: True for the anonymous file of :meth:`memory` (its ``path`` is only a label)
    in_memory = False

    def __init__(self, fd, path):
        self.fd = fd
        self.path = path
        self.sync_failed = False
        #: True for a file of :meth:`create_unnamed` that has no name yet
        self.unnamed = False
        #: Bytes the last :meth:`pwrite` wrote (all of them, unless it raised)
        self.written = 0

    @classmethod
    def open(cls, path, readonly, create):
        """Open (or with ``create``, create exclusively) the regular file at ``path``.

        Anything but a regular file there (a FIFO, a directory, a device) is
        refused with :class:`NotAStorageError` before a byte is read or
        written; the open itself never blocks (``O_NONBLOCK``, cleared after).
        """
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create:
            if FileIO.hook is not None:
                FileIO.hook("create", path)
            flags |= os.O_CREAT | os.O_EXCL
        flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags, 0o666)
        except IsADirectoryError:
            raise NotAStorageError(f"{path!r} is a directory, not a permastruct store") from None
        except OSError as exc:
            error = _full_error(exc, "creating" if create else "opening", path)
            if error is exc:
                raise
            raise error from exc
        return cls._regular(fd, path)

    @classmethod
    def _regular(cls, fd, path):
        """A FileIO for ``fd``, which must be a regular file (else it is closed and refused)."""
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(
                    mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
                raise NotAStorageError(f"{path!r} is {kind}, not a permastruct store or log; "
                                       "nothing was read from it or written to it")
            if hasattr(os, "O_NONBLOCK"):
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    @classmethod
    def create_unnamed(cls, path):
        """A new, empty file in the folder of ``path`` that has no name yet (see :meth:`publish_as`).

        Linux's ``O_TMPFILE`` makes a file without a name, so a crash leaves
        nothing behind; elsewhere (or on a file system without it) a file
        with a unique temporary name beside ``path``.  The hook sees a
        ``"create"`` of the temporary name.
        """
        folder = os.path.dirname(os.path.abspath(path))
        temporary = f"{path}.creating-{os.getpid()}-{os.urandom(4).hex()}"
        if hasattr(os, "O_TMPFILE"):
            if FileIO.hook is not None:
                FileIO.hook("create", temporary)
            try:
                fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise _full_error(exc, "creating", path) from exc
            else:
                io = cls(fd, temporary)
                io.unnamed = True
                return io
        io = cls.open(temporary, readonly=False, create=True)
        io.unnamed = False
        return io

    @classmethod
    def memory(cls, label="(memory)"):
        """A new, empty file in memory that no name reaches: it is gone when closed or when the process dies.

        Linux's ``memfd_create``; elsewhere a temporary file removed as soon as
        it is made (its space is freed when the last descriptor closes).  A
        failure to find memory for it (``ENOMEM``) is a :class:`StorageFullError`.

        >>> io = FileIO.memory(); io.pwrite(b"abc", 0); io.pread(3, 0), io.path
        (b'abc', '(memory)')
        >>> io.close()
        """
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("permastruct", getattr(os, "MFD_CLOEXEC", 0))
        else:  # pragma: no cover - not Linux
            import tempfile
            fd, name = tempfile.mkstemp(prefix="permastruct-memory-")
            os.unlink(name)
        io = cls(fd, label)
        io.in_memory = True
        return io

    def publish_as(self, path):
        """Give a file made by :meth:`create_unnamed` the name ``path``, atomically.

        Raises ``FileExistsError`` (and leaves ``path`` alone) when something
        is there already.  The hook sees ``"link"`` (the new name), and for a
        named temporary file an ``"unlink"`` of it afterwards.
        """
        self._before("link", path)
        try:
            if self.unnamed:  # linkat(2) of /proc/self/fd/N, following the link to the file itself
                folder = os.open("/proc/self/fd", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    os.link(str(self.fd), path, src_dir_fd=folder, follow_symlinks=True)
                finally:
                    os.close(folder)
            else:
                os.link(self.path, path)
        except FileExistsError:
            raise
        except OSError as exc:
            raise _full_error(exc, "creating", path) from exc
        if not self.unnamed:
            FileIO.unlink(self.path)
        self.path = path
        self.unnamed = False

    def discard_unnamed(self):
        """Close a file made by :meth:`create_unnamed` that was never published, and remove it."""
        temporary, named = self.path, not getattr(self, "unnamed", True)
        self.close()
        if named:
            with contextlib.suppress(OSError):
                os.unlink(temporary)

    def _before(self, operation, *args):
        if FileIO.hook is not None:
            FileIO.hook(operation, self.path, *args)

    def size(self):
        return os.fstat(self.fd).st_size

    def identity(self):
        """``(device, inode)``: the same for every name (path, symlink, hard link) of the file."""
        info = os.fstat(self.fd)
        return info.st_dev, info.st_ino

    def pread(self, length, offset):
        """Read exactly ``length`` bytes (fewer only at the end of the file)."""
        chunks = []
        while length > 0:
            chunk = os.pread(self.fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            length -= len(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def pwrite(self, data, offset):
        """Write all of ``data`` at ``offset``, completing short writes.

        When it raises, ``written`` says how many bytes of ``data`` did reach
        the file (a short write, then an error).
        """
        view = memoryview(data).cast("B")
        self.written = 0
        try:
            self._before("pwrite", view, offset)
            while view:
                written = os.pwrite(self.fd, view, offset)
                if written <= 0:
                    raise OSError(errno.EIO, "pwrite wrote nothing")
                view = view[written:]
                offset += written
                self.written += written
        except OSError as exc:
            raise _full_error(exc, "writing", self.path, self.in_memory) from exc

    def fsync(self):
        """fsync the file; a failure is final (the kernel may have dropped the pages)."""
        try:
            self._before("fsync")
            _datasync(self.fd)
        except OSError:
            self.sync_failed = True
            raise

    def fsync_directory(self):
        """fsync the directory holding the file, so that a new file's name is durable."""
        folder = os.open(os.path.dirname(os.path.abspath(self.path)) or ".", os.O_RDONLY)
        try:
            self._before("fsync_dir")
            os.fsync(folder)
        except OSError:
            self.sync_failed = True
            raise
        finally:
            os.close(folder)

    def fallocate(self, offset, length):
        """Reserve disk space so that touching the range can never SIGBUS."""
        try:
            self._before("fallocate", offset, length)
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self.fd, offset, length)
            else:  # pragma: no cover - platforms without posix_fallocate
                os.ftruncate(self.fd, offset + length)
        except OSError as exc:
            raise _full_error(exc, "growing", self.path, self.in_memory) from exc

    def truncate(self, length):
        try:
            self._before("truncate", length)
            os.ftruncate(self.fd, length)
        except OSError as exc:
            raise _full_error(exc, "resizing", self.path, self.in_memory) from exc

    @staticmethod
    def unlink(path):
        """Remove the file at ``path`` (a store's log at a clean close); a missing file is no error."""
        if FileIO.hook is not None:
            FileIO.hook("unlink", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    # -- byte-range locks (on bytes far past the end of the file, see _format) --
    def lock(self, start, exclusive, wait=False, length=1):
        """Lock bytes ``start .. start + length - 1``; False if another open holds a conflicting lock.

        With ``wait`` the call blocks until the lock is granted.  Locks
        belong to this open file: they are released by :meth:`unlock`, by
        :meth:`close` and when the process dies.
        """
        kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
        try:
            fcntl.fcntl(self.fd, _SETLKW if wait else _SETLK, _pack_lock(kind, start, length))
        except OSError as exc:
            if exc.errno in _BUSY_ERRNOS and not wait:
                return False
            raise
        return True

    def lock_waiting(self, start, exclusive, timeout):
        """:meth:`lock`, retrying for up to ``timeout`` seconds (None: wait forever)."""
        if timeout is None:
            return self.lock(start, exclusive, wait=True)
        deadline = time.monotonic() + timeout
        delay = 0.001
        while not self.lock(start, exclusive):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)
        return True

    def unlock(self, start, length=1):
        fcntl.fcntl(self.fd, _SETLK, _pack_lock(fcntl.F_UNLCK, start, length))

    def first_conflict(self, start, length):
        """The start of some lock held by another open on ``start .. start + length - 1``, or None."""
        raw = fcntl.fcntl(self.fd, _GETLK, _pack_lock(fcntl.F_WRLCK, start, length))
        kind, found, _ = _unpack_lock(raw)
        return None if kind == fcntl.F_UNLCK else found

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class OverlayIO:
    """The file of an overlay store: a read-only base below ``boundary``, memory above it.

    Offsets below ``boundary`` are the base file's, which is never written
    (a write there raises ``ReadOnlyError``); the rest lives in an anonymous
    in-memory file (:meth:`FileIO.memory`) that starts with ``tail`` (bytes
    of the base copied at open) and takes all growth.  Locks are the base's:
    an overlay holds a reader's locks on it.  ``fsync`` does nothing.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "f")
    >>> with open(path, "wb") as f: _ = f.write(b"base" * 2048)
    >>> io = OverlayIO(FileIO.open(path, readonly=True, create=False), 4096, b"tail")
    >>> io.size(), io.pread(8, 4094)
    (4100, b'setail')
    >>> io.pwrite(b"new", 4096); io.pread(8, 4094), open(path, "rb").read(8)
    (b'senewl', b'basebase')
    >>> io.close()
    """

    in_memory = True
    unnamed = False

    def __init__(self, base, boundary, tail=b""):
        self.base = base
        self.boundary = boundary
        self.spill = FileIO.memory(f"(overlay of {base.path!r})")
        self.path = base.path
        self.sync_failed = False
        self.written = 0
        if tail:
            self.spill.pwrite(tail, 0)

    @property
    def fd(self):
        return self.base.fd

    def map_source(self, start):
        """``(descriptor, offset)`` to map file offset ``start`` from (a segment never crosses ``boundary``)."""
        if start < self.boundary:
            return self.base.fd, start
        return self.spill.fd, start - self.boundary

    def size(self):
        return self.boundary + self.spill.size()

    def identity(self):
        return self.base.identity()

    def pread(self, length, offset):
        if offset >= self.boundary:
            return self.spill.pread(length, offset - self.boundary)
        low = self.base.pread(min(length, self.boundary - offset), offset)
        if offset + length <= self.boundary:
            return low
        return low + self.spill.pread(offset + length - self.boundary, 0)

    def _refuse(self, offset):
        if offset < self.boundary:
            raise ReadOnlyError(f"{self.path!r} is the base of an overlay: it is never written")

    def pwrite(self, data, offset):
        self._refuse(offset)
        try:
            self.spill.pwrite(data, offset - self.boundary)
        finally:
            self.written = self.spill.written

    def fallocate(self, offset, length):
        self._refuse(offset)
        self.spill.fallocate(offset - self.boundary, length)

    def truncate(self, length):
        self._refuse(length)
        self.spill.truncate(length - self.boundary)

    def fsync(self):
        """Nothing to sync: the changes of an overlay live in memory."""

    def lock(self, *args, **kwargs):
        return self.base.lock(*args, **kwargs)

    def lock_waiting(self, *args):
        return self.base.lock_waiting(*args)

    def unlock(self, *args):
        return self.base.unlock(*args)

    def first_conflict(self, *args):
        return self.base.first_conflict(*args)

    def close(self):
        self.spill.close()
        self.base.close()


class Segment:
    """A fixed range of the file mapped once: ``start`` and ``length`` in bytes."""

    __slots__ = ("start", "length", "end", "map", "address", "view")

    def __init__(self, start, length, fileno, at=None):
        self.start = start
        self.length = length
        self.end = start + length
        self.map = mmap.mmap(fileno, length, access=mmap.ACCESS_COPY, offset=start if at is None else at)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(anchor)
        del anchor
        #: A view of the whole segment, sliced by MappedFile.view (released at close).
        self.view = memoryview(self.map)


class MappedFile:
    """A file mapped privately in segments; grows on demand and writes back changed pages.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "f")
    >>> m = MappedFile(FileIO.open(path, readonly=False, create=True), readonly=False)
    >>> m.grow(10000)
    >>> m.size >= 10000
    True
    >>> m.view(5000, 3)[:] = b"abc"
    >>> m.dirty_ranges()
    [(4096, 4096)]
    >>> m.write_back(m.dirty_ranges()); m.release_private(); m.io.pread(3, 5000)
    b'abc'
    >>> m.close(); m.io.close()
    """

    def __init__(self, io, readonly, origin=0, unit=GRANULE):
        self.io = io
        self.readonly = readonly
        #: Segment ends are ``origin + k * unit``: page boundaries of the page file.
        self.origin = origin
        self.unit = max(unit, GRANULE)
        self.segments = []
        self._starts = []
        self._hot = None
        self.size = 0
        self._pagemap = None
        self._written = []
        self._retired = []  # a reader's earlier maps, still used by proxies
        #: offset -> length of page images written into this map only (a reader's log pages)
        self.private = {}
        #: ``(scan argument, result regions)`` while PAGEMAP_SCAN is to be tried; None: read the entries.
        self._scan = None
        mode = os.environ.get("PERMASTRUCT_DIRTY", "scan")
        if mode in ("scan", "pagemap"):
            try:
                self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self._pagemap = None
        if self._pagemap is not None and mode == "scan":
            regions = (_PageRegion * _SCAN_REGIONS)()
            arg = _ScanArg(size=ctypes.sizeof(_ScanArg), vec=ctypes.addressof(regions), vec_len=_SCAN_REGIONS,
                           category_inverted=_PAGE_IS_FILE, category_mask=_PAGE_IS_FILE,
                           category_anyof_mask=_PAGE_IS_PRESENT | _PAGE_IS_SWAPPED,
                           return_mask=_PAGE_IS_FILE | _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED)
            self._scan = (arg, regions)
        physical = io.size()
        boundary = getattr(io, "boundary", None)  # an overlay: no segment crosses it
        if boundary is not None:
            self._map(0, boundary)
            self._map(boundary, self._round_down(physical) - boundary)
        elif physical >= origin:
            self._map(0, self._round_down(physical))

    def _round_down(self, end):
        return self.origin + (end - self.origin) // self.unit * self.unit

    def _round_up(self, end):
        return self.origin + -(-(end - self.origin) // self.unit) * self.unit

    # -- segments ------------------------------------------------------------
    def _map(self, start, length):
        if length <= 0:
            return
        fd, at = self.io.map_source(start) if hasattr(self.io, "map_source") else (self.io.fd, start)
        segment = Segment(start, length, fd, at)
        # One step (no call in between, so no interrupt either): a segment the lists do
        # not show is only unmapped memory, a half-recorded one would be a hole in the map.
        self.segments, self._starts, self.size = self.segments + [segment], self._starts + [start], start + length

    def grow(self, minimum):
        """Make the mapped size at least ``minimum`` bytes, in one new segment.

        The new segment is at least as large as what is needed and, to keep the
        number of segments small, about half the current size (at most 1 GiB).
        """
        if minimum <= self.size:
            return
        start = self.size
        wanted = max(minimum, start + min(start // 2, MAX_SEGMENT), start + 16 * GRANULE)
        length = self._round_up(wanted) - start
        try:
            self.io.fallocate(start, length)
        except OSError:
            self._restore_length(start)
            raise
        try:
            self._map(start, length)
        except (OSError, ValueError) as exc:
            self._restore_length(start)
            if getattr(exc, "errno", None) == errno.ENOMEM:
                error = StorageFullError(errno.ENOMEM, f"mapping {length} more bytes of {self.io.path!r} "
                                         "failed: out of memory or address space; the storage is still "
                                         "at its last commit")
                error.filename = self.io.path
                raise error from exc
            raise _full_error(exc, "mapping", self.io.path, self.io.in_memory) from exc

    def _restore_length(self, length):
        try:
            if self.io.size() > length:
                self.io.truncate(length)
        except OSError:
            pass

    def segment_of(self, offset):
        segment = self._hot  # the segment of the previous look-up: most look-ups hit it
        if segment is not None and segment.start <= offset < segment.start + segment.length:
            return segment
        segment = self.segments[bisect.bisect_right(self._starts, offset) - 1]
        if offset >= segment.start + segment.length or offset < 0:
            raise OutsideMapError(f"{self.io.path!r}: offset {offset:#x} is outside the mapped file "
                                  f"({self.size:#x} bytes)")
        self._hot = segment
        return segment

    def view(self, offset, length):
        """A writable memoryview of ``length`` bytes at file ``offset`` (within one segment)."""
        segment = self._hot
        if segment is None or not segment.start <= offset < segment.start + segment.length:
            segment = self.segment_of(offset)
        local = offset - segment.start
        if local + length > segment.length:
            raise OutsideMapError(f"{self.io.path!r}: range {offset:#x}+{length} crosses the end of a "
                                  "segment of the map")
        return segment.view[local:local + length]

    def _primary_view(self, offset, length):
        segment = self.segment_of(offset)
        return segment.view[offset - segment.start:offset - segment.start + length]

    def extend(self, force=False):
        """(Readers) Map the whole file again when it has grown (``force``: in any case); return
        whether it was mapped again.

        A reader cannot map only the new part, as the writer does: a later
        writer maps the file in one piece and may put an object across the
        reader's boundary.  So the new map covers the whole file; the old
        ones stay (for the proxies that still point into them) until
        :meth:`close_retired` finds nothing uses them.  Call it with no
        private page images (after drop_private).
        """
        physical = self._round_down(self.io.size())
        if physical <= self.size and not force:
            return False
        retired = self._retired + self.segments
        self.segments, self._starts, self.size, self._hot, self._retired = [], [], 0, None, retired
        self._map(0, physical)
        return True

    def close_retired(self, addresses):
        """Unmap the earlier maps of a reader that no proxy points into (``addresses``: every live
        proxy's) and no view of the program holds."""
        still = []
        for segment in self._retired:
            low, high = segment.address, segment.address + segment.length
            if any(low <= address < high for address in addresses):
                still.append(segment)
                continue
            segment.view.release()
            try:
                segment.map.close()
            except BufferError:  # a view of it is still out there
                segment.view = memoryview(segment.map)
                still.append(segment)
        self._retired = still

    # -- private page images (a reader's view of the log) ------------------------
    def write_private(self, offset, data):
        """Store ``data`` at ``offset`` in this process's map only (every map covering it)."""
        length = len(data)
        self._primary_view(offset, length)[:] = data
        for old in self._retired:
            if old.start <= offset and offset + length <= old.start + old.length:
                old.view[offset - old.start:offset - old.start + length] = data
        self.private[offset] = length

    def drop_private(self):
        """Forget every private page image: the map shows the file again."""
        for offset, length in self.private.items():
            for segment in self.segments + self._retired:
                if segment.start <= offset and offset + length <= segment.start + segment.length:
                    segment.map.madvise(mmap.MADV_DONTNEED, offset - segment.start, length)
        self.private.clear()

    def from_buffer(self, ctype, offset):
        """A ctypes instance of ``ctype`` living in the map at file ``offset``."""
        segment = self.segment_of(offset)
        try:
            return ctype.from_buffer(segment.map, offset - segment.start)
        except ValueError as exc:  # the object would cross the end of the segment
            raise OutsideMapError(f"{self.io.path!r}: an object at {offset:#x} crosses the end of a "
                                  f"segment of the map ({exc})") from None

    def offset_of_address(self, address):
        """The file offset of a memory address inside this map (or a reader's earlier map of it)."""
        for segment in self.segments + self._retired:
            if segment.address <= address < segment.address + segment.length:
                return segment.start + address - segment.address
        raise ValueError("address is not inside this file's map")

    # -- dirty pages and write-back -----------------------------------------
    def dirty_ranges(self):
        """``(offset, length)`` ranges of OS pages changed in the map since the last write-back.

        A segment that lies wholly before ``origin`` is not looked at: what is
        there (a store's header block) is written with ``pwrite`` only, never
        through the map.  (A store made in this process has its header block
        as its first segment: a commit then asks the kernel once less.)
        """
        ranges = []
        origin = self.origin
        for segment in self.segments:
            if segment.start + segment.length <= origin:
                continue
            for first, count in self._dirty(segment):
                ranges.append((segment.start + first * OS_PAGE, count * OS_PAGE))
        return ranges

    def _dirty(self, segment):
        """``(first page, count)`` runs of changed pages of ``segment``, the best way the system offers."""
        pages = segment.length // OS_PAGE
        if self._pagemap is None:
            return self._dirty_compare(segment, pages)
        if self._scan is not None:
            try:
                return list(self._dirty_scan(segment))
            except OSError:  # no PAGEMAP_SCAN (before Linux 6.7): read the pagemap entries
                self._scan = None
        return self._dirty_pagemap(segment, pages)

    def _dirty_scan(self, segment):
        """The same answer as :meth:`_dirty_pagemap`, from the kernel's ``PAGEMAP_SCAN``.

        The kernel returns runs of matching pages (not a flag per page), so a
        commit in a large map no longer reads and sifts 8 bytes per page.
        """
        arg, regions = self._scan
        end = segment.address + segment.length
        arg.start = segment.address
        while True:
            arg.end, arg.walk_end = end, 0
            found = fcntl.ioctl(self._pagemap, _PAGEMAP_SCAN, arg)
            for region in regions[:found]:
                yield (region.start - segment.address) // OS_PAGE, (region.end - region.start) // OS_PAGE
            if found < _SCAN_REGIONS or not arg.start < arg.walk_end < end:
                return  # the walk reached the end (a full result array stops it early, at walk_end)
            arg.start = arg.walk_end

    def _dirty_pagemap(self, segment, pages):
        step = 1 << 20
        first_entry = segment.address // OS_PAGE
        for chunk_start in range(0, pages, step):
            count = min(step, pages - chunk_start)
            raw = os.pread(self._pagemap, count * 8, (first_entry + chunk_start) * 8)
            flags = raw[7::8].translate(_DIRTY_TABLE)
            index = flags.find(1)
            while index >= 0:
                end = flags.find(0, index)
                if end < 0:
                    end = count
                yield chunk_start + index, end - index
                index = flags.find(1, end)

    def _dirty_compare(self, segment, pages):
        chunk = 256
        view = memoryview(segment.map)
        for first in range(0, pages, chunk):
            count = min(chunk, pages - first)
            on_disk = self.io.pread(count * OS_PAGE, segment.start + first * OS_PAGE)
            for page in range(count):
                lo = page * OS_PAGE
                mapped = view[(first + page) * OS_PAGE:(first + page + 1) * OS_PAGE]
                if mapped != on_disk[lo:lo + OS_PAGE]:
                    yield first + page, 1
        view.release()

    def write_back(self, ranges):
        """pwrite the given ranges of the map into the file."""
        for offset, length in ranges:
            self.io.pwrite(self.view(offset, length), offset)
            self._written.append((offset, length))

    def release_private(self):
        """Drop the private copies of written-back pages: the map shows the file again."""
        for offset, length in self._written:
            segment = self.segment_of(offset)
            segment.map.madvise(mmap.MADV_DONTNEED, offset - segment.start, length)
        self._written.clear()

    def discard_changes(self, ranges=None):
        """Forget the changes in ``ranges`` (default: every change since the last write-back).

        A range may cross from one segment into the next (``madvise`` of one
        segment would silently stop at its end): each segment's part is
        dropped in turn.
        """
        for offset, length in self.dirty_ranges() if ranges is None else ranges:
            while length > 0:
                segment = self.segment_of(offset)
                part = min(length, segment.start + segment.length - offset)
                segment.map.madvise(mmap.MADV_DONTNEED, offset - segment.start, part)
                offset, length = offset + part, length - part

    def close(self):
        """Unmap what can be unmapped; segments still referenced by proxies stay until collected."""
        for segment in self.segments + self._retired:
            try:
                segment.view.release()
                segment.map.close()
            except BufferError:  # a view of it is still out there: it stays mapped until that goes
                pass
        self.segments = []
        self._retired = []
        self._starts = []
        self._hot = None
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None
