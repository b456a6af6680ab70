"""haagenti: find the redundancy in model catalogs and remove it, losing nothing."""
import fsspec

from haagenti.store import LIBRARY_FORMAT_VERSION

# haagenti://MODEL/FILE reads stored files by range (haagenti.libraryfs); the class loads on first use.
# The package's fsspec.specs entry point does the same for programs that never import haagenti.
fsspec.register_implementation("haagenti", "haagenti.libraryfs.LibraryFileSystem", clobber=True)

__version__ = "0.1.0"
__all__ = ["LIBRARY_FORMAT_VERSION", "__version__"]
