"""permastruct: an embeddable persistent-object store in one memory-mapped file.

>>> import os, tempfile
>>> from permastruct import Storage, Structure, StructureMeta, Buffer
>>> class MyStorage(Storage):
...     def populateSchema(self):
...         class Root(self.schema.Structure):
...             greeting = self.schema.String
...             visits = self.schema.Int
>>> path = os.path.join(tempfile.mkdtemp(), "hello.ps")
>>> with MyStorage(path) as p:
...     p.root.greeting = "hello"
...     p.root.visits += 1
>>> with MyStorage(path) as p:
...     str(p.root.greeting), p.root.visits
('hello', 1)
"""

from typing import TYPE_CHECKING

from ._convert import to_python

if TYPE_CHECKING:
    # What a type checker sees a field of each number type as (``age: Int`` in a structure class
    # reads as an int); at run time they are the value types that describe fields.
    Int = int
    Int8 = int
    Int16 = int
    Int32 = int
    Int64 = int
    UInt8 = int
    UInt16 = int
    UInt32 = int
    UInt64 = int
    Float = float
    Float32 = float
    Float64 = float
    Bool = bool
else:
    from ._types import (Bool, Float, Float32, Float64, Int, Int8, Int16, Int32, Int64, UInt8, UInt16,
                         UInt32, UInt64)
from .buffer import Buffer
from .errors import (ConcurrentUseError, CorruptStorageError, DeadProxyError, ForkedProcessError,
                     IncompatibleFormatError, IncompleteChangeError, LoadError, NotAStorageError, OverlayError,
                     PermastructError, ReadOnlyError, SchemaError, StorageClosedError, StorageFullError, StorageLockedError,
                     SyncFailedError, TextEncodeError, UndoError, UnpinnedPageError)
from .collections import Dict, List, Set, SortedDict
from .storage import Storage
from .strings import ByteString, String
from .structure import Structure, StructureMeta

__version__ = "0.1.0"

__all__ = [
    "Storage", "Structure", "StructureMeta", "Buffer", "ByteString", "String",
    "List", "Dict", "Set", "SortedDict",
    "Int", "Float", "Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32",
    "UInt64", "Float32", "Float64",
    "PermastructError", "StorageClosedError", "ReadOnlyError", "StorageLockedError",
    "NotAStorageError", "CorruptStorageError", "IncompatibleFormatError", "SchemaError",
    "UnpinnedPageError", "StorageFullError", "SyncFailedError", "ForkedProcessError", "DeadProxyError",
    "IncompleteChangeError", "ConcurrentUseError", "OverlayError", "LoadError",
    "UndoError", "TextEncodeError",
    "to_python",
]
