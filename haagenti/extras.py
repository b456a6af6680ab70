"""Optional parts of haagenti, installed as pip extras, and the one line that names the extra
when one of its packages is missing (instead of a ModuleNotFoundError deep in an import)."""
from __future__ import annotations

from importlib.util import find_spec

from haagenti.errors import MissingExtraError

EXTRAS: dict[str, tuple[str, ...]] = {
    "adaptive": ("diffusers", "optimum.quanto"),  # adaptive precision: pipelines, schedulers, run-time INT8/INT4
}


def require(extra: str) -> None:
    """Raise MissingExtraError naming `pip install 'haagenti[extra]'` when any module of the
    extra is not importable. Looks modules up without importing them (diffusers takes seconds)."""
    missing = [m for m in EXTRAS[extra] if not _installed(m)]
    if missing:
        raise MissingExtraError(f"this needs haagenti's {extra!r} extra ({', '.join(missing)} not installed): pip install 'haagenti[{extra}]'")


def _installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ModuleNotFoundError, ValueError):  # a missing parent package ("optimum"), or a module set to None
        return False
