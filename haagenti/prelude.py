"""Everything a user of the library usually needs, in one import: `from haagenti.prelude import *`."""
from haagenti.config import LibraryConfig, LibraryStats, ModelStats
from haagenti.errors import FormatError, FragmentError, HaagentiError, LibraryError, ModelIdError, UnsafeFileError
from haagenti.fragment import Encoding, Fragment, FragmentId, FragmentMetadata, FragmentType
from haagenti.library import FragmentLibrary, IngestReport
from haagenti.loader import ModelLoader
from haagenti.maintenance import VerifyReport
from haagenti.manifest import FragmentRef, LayerMapping, ModelManifest, TensorRef
from haagenti.signature import FragmentSignature, SignatureConfig
from haagenti.similarity import MatchType, SimilarityIndex, SimilarityMatch, SimilarityThreshold
from haagenti.store import LIBRARY_FORMAT_VERSION

__all__ = [
    "LibraryConfig", "LibraryStats", "ModelStats", "FormatError", "FragmentError", "HaagentiError", "LibraryError",
    "ModelIdError", "UnsafeFileError", "Encoding", "Fragment", "FragmentId", "FragmentMetadata", "FragmentType",
    "FragmentLibrary", "IngestReport", "VerifyReport", "ModelLoader", "FragmentRef", "LayerMapping", "ModelManifest",
    "TensorRef", "FragmentSignature", "SignatureConfig", "MatchType", "SimilarityIndex", "SimilarityMatch",
    "SimilarityThreshold", "LIBRARY_FORMAT_VERSION",
]
