"""A photo library on disk (`Library`, in `core`) and the typed records its answers hold (`reports`)."""

from .core import Library
from .options import default_library_path
from .reports import DuplicateGroups, DuplicatePhoto, FailureRecord, LibraryStatus, PruneReport


__all__ = ["DuplicateGroups", "DuplicatePhoto", "FailureRecord", "Library", "LibraryStatus", "PruneReport", "default_library_path"]
