"""Geometries as modules of pure functions with one interface (lorentz, euclidean, cosine)."""

from __future__ import annotations

from types import ModuleType

from hihpq.geometry import cosine, euclidean, lorentz

GEOMETRIES: dict[str, ModuleType] = {
    "lorentz": lorentz,
    "hyperbolic": lorentz,
    "euclidean": euclidean,
    "cosine": cosine,
}
# Canonical name of each accepted name (what quantizers, indexes and files record).
CANONICAL: dict[str, str] = {
    "lorentz": "lorentz",
    "hyperbolic": "lorentz",
    "euclidean": "euclidean",
    "cosine": "cosine",
}


def get_geometry(name: str) -> ModuleType:
    """The geometry module called ``name`` ('lorentz' / 'hyperbolic', 'euclidean' or 'cosine')."""
    try:
        return GEOMETRIES[name]
    except KeyError:
        raise ValueError(f"unknown geometry {name!r}; expected one of {sorted(GEOMETRIES)}") from None


__all__ = ["CANONICAL", "GEOMETRIES", "cosine", "euclidean", "get_geometry", "lorentz"]
