"""The library's index behind one interface (`IndexLayout`), its layouts registered by name.

Built in: "bands" (haagenti.index.bands), the LSH band rows and fragment ids of every library
written so far; "two-level" (haagenti.index.two_level), sampled buckets naming shards whose
signatures are read on demand. `open_index` gives the layout a library's config names."""
from __future__ import annotations

from typing import TYPE_CHECKING

from haagenti.index.bands import BandsLayout
from haagenti.index.two_level import TwoLevelLayout
from haagenti.index.layout import LAYOUTS, IndexLayout, layout_class, register_layout

if TYPE_CHECKING:
    from haagenti.config import LibraryConfig
    from haagenti.store import LibraryStore

__all__ = ["LAYOUTS", "BandsLayout", "IndexLayout", "TwoLevelLayout", "layout_class", "open_index", "register_layout"]


def open_index(store: LibraryStore, config: LibraryConfig, keep_footers: bool = True) -> IndexLayout:
    """The index of the library in `store`, in the layout its (settled) config names."""
    return layout_class(config.index)(store, config.signature, keep_footers)
