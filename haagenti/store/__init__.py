"""Where a library lives: Delta Lake tables behind a URL (local path, file://, s3://, gs://, az://)."""
from haagenti.store.delta import LibraryStore
from haagenti.store.schema import LIBRARY_FORMAT_VERSION, SCHEMAS

__all__ = ["LIBRARY_FORMAT_VERSION", "SCHEMAS", "LibraryStore"]
