"""haagenti: find the redundancy in model catalogs and remove it, losing nothing."""
from haagenti.store import LIBRARY_FORMAT_VERSION

__version__ = "0.1.0"
__all__ = ["LIBRARY_FORMAT_VERSION", "__version__"]
