"""Everything a user of the library usually needs, in one import: `from haagenti.prelude import *`."""
from haagenti.config import LibraryConfig, LibraryStats, ModelStats
from haagenti.errors import FormatError, FragmentError, HaagentiError, LibraryError, ModelIdError, UnsafeFileError
from haagenti.fragment import Encoding, FragmentId, FragmentType
from haagenti.library import FragmentLibrary, IngestReport
from haagenti.loader import ModelLoader
from haagenti.maintenance import VerifyReport
from haagenti.manifest import FragmentRef, ModelManifest, TensorRef
from haagenti.signature import FragmentSignature, SignatureConfig
from haagenti.similarity import MatchType, SimilarityThreshold
from haagenti.store import LIBRARY_FORMAT_VERSION

__all__ = [
    "LibraryConfig", "LibraryStats", "ModelStats", "FormatError", "FragmentError", "HaagentiError", "LibraryError",
    "ModelIdError", "UnsafeFileError", "Encoding", "FragmentId", "FragmentType",
    "FragmentLibrary", "IngestReport", "VerifyReport", "ModelLoader", "FragmentRef", "ModelManifest",
    "TensorRef", "FragmentSignature", "SignatureConfig", "MatchType", "SimilarityThreshold", "LIBRARY_FORMAT_VERSION",
]
