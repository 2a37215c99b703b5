"""The one exception hierarchy of permastruct.

Every error the library raises on purpose derives from :class:`PermastructError`;
most also derive from the builtin a Python user would already catch, so
``except ValueError`` still works for a closed storage, ``except OSError`` for a
full disk and ``except TypeError`` for a schema mismatch.

>>> from permastruct.errors import StorageClosedError, PermastructError
>>> issubclass(StorageClosedError, ValueError) and issubclass(StorageClosedError, PermastructError)
True
"""

__all__ = [
    "PermastructError",
    "StorageClosedError",
    "ReadOnlyError",
    "StorageLockedError",
    "NotAStorageError",
    "CorruptStorageError",
    "IncompatibleFormatError",
    "SchemaError",
    "UnpinnedPageError",
    "StorageFullError",
    "SyncFailedError",
    "ForkedProcessError",
    "DeadProxyError",
    "IncompleteChangeError",
    "ConcurrentUseError",
    "OverlayError",
    "LoadError",
    "UndoError",
    "TextEncodeError",
]


class PermastructError(Exception):
    """Base class of every error raised by permastruct."""


class StorageClosedError(PermastructError, ValueError):
    """The storage, or the storage of a proxy, has been closed."""


class ReadOnlyError(PermastructError, PermissionError):
    """A write was attempted through a read-only storage."""


class StorageLockedError(PermastructError, BlockingIOError):
    """Another process holds the writer lock of the file."""


class NotAStorageError(PermastructError, ValueError):
    """The file exists but is not a permastruct store (wrong magic, too short)."""


class CorruptStorageError(PermastructError, ValueError):
    """The file is a store, but something in it is inconsistent or damaged."""


class IncompatibleFormatError(PermastructError, ValueError):
    """The file was written by a format version this library cannot read."""


class SchemaError(PermastructError, TypeError):
    """The schema in Python and the schema in the file do not agree, or a schema is invalid."""


class UnpinnedPageError(PermastructError, RuntimeError):
    """Page content was accessed while the page was not pinned."""


class StorageFullError(PermastructError, OSError):
    """The disk is full or a file-size limit was reached while the file grew or committed."""


class SyncFailedError(PermastructError, OSError):
    """An fsync of the store or its log failed earlier: this open refuses to commit.

    The system may have dropped the written pages, so a retry could report
    success for data that is not on disk.  Close the storage and open it
    again: it reopens at its last durable commit.
    """


class ForkedProcessError(PermastructError, RuntimeError):
    """A storage opened before ``os.fork()`` was used in the child process.

    The parent owns the storage's locks and its uncommitted changes; open the
    file again in the child instead.
    """


class DeadProxyError(PermastructError, ReferenceError):
    """A proxy whose object no longer exists: created in a transaction that was rolled back,
    or (in a reader) freed by the writer in a commit the reader has since moved to."""


class IncompleteChangeError(PermastructError, RuntimeError):
    """A change was interrupted before it finished (a KeyboardInterrupt, a MemoryError at any
    point inside it): the transaction holds half of it and cannot be committed.

    Call ``rollback()``; the store is at its last commit.
    """


class ConcurrentUseError(PermastructError, RuntimeError):
    """A storage was changed (or committed) from a second thread while another thread was
    in the middle of a change: a storage and its objects belong to one thread at a time."""


class OverlayError(PermastructError, ValueError):
    """An operation an overlay store (``Storage(path, overlay=True)``) cannot do: ``refresh()``
    (an overlay reads one snapshot of its base for as long as it is open)."""


class LoadError(PermastructError, ValueError):
    """A JSON document that ``load`` cannot rebuild a store from (not a permastruct dump, or a
    part of it that is missing, of the wrong kind, or refers to what the document lacks); the
    message names the part.  No store is left behind."""


class UndoError(PermastructError, ValueError):
    """``undo(id)`` or ``at=id`` that the store's history cannot serve: an unknown id, one the history
    no longer keeps (or never kept: ``history=0``), changes pending, or a transaction in between
    that changed the stored schema; the message says which.  Nothing was changed."""


class TextEncodeError(PermastructError, UnicodeEncodeError):
    """A ``str`` a String cannot hold (a lone surrogate has no UTF-8 form): a ``UnicodeEncodeError``
    whose message says where the text was to go (``reason`` holds all of it)."""

    def __str__(self):
        return self.reason
