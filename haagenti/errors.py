"""Errors raised by haagenti. Each says what was wrong and where, in one line."""


class HaagentiError(Exception):
    """Base of every error haagenti raises on purpose."""


class FormatError(HaagentiError):
    """A model file is malformed (truncated, lying header, unknown dtype, ...)."""


class UnsafeFileError(FormatError):
    """A file would need arbitrary code execution (pickle) to be read."""


class ModelIdError(HaagentiError):
    """A model id is invalid (path traversal, separators, length)."""


class FragmentError(HaagentiError):
    """A stored fragment is missing or does not match its content hash."""


class LibraryError(HaagentiError):
    """The library is in a state that forbids the operation (unknown model, version mismatch, ...)."""


class UnknownModelError(LibraryError):
    """The library holds no model of that id (the command line then says how to list them)."""


class MissingExtraError(HaagentiError):
    """An optional part of haagenti is used without the pip extra that installs it."""


class DamagedError(HaagentiError):
    """Something read from a library is damaged or cannot be trusted (an unreadable table file,
    a lying record such as a file name that leaves the output folder)."""

