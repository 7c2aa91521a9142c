"""Geometries as modules of pure functions with one interface (lorentz, euclidean)."""

from __future__ import annotations

from types import ModuleType

from hihpq.geometry import euclidean, lorentz

GEOMETRIES: dict[str, ModuleType] = {"lorentz": lorentz, "hyperbolic": lorentz, "euclidean": euclidean}


def get_geometry(name: str) -> ModuleType:
    """The geometry module called ``name`` ('lorentz' / 'hyperbolic' or 'euclidean')."""
    try:
        return GEOMETRIES[name]
    except KeyError:
        raise ValueError(f"unknown geometry {name!r}; expected one of {sorted(GEOMETRIES)}") from None


__all__ = ["GEOMETRIES", "euclidean", "get_geometry", "lorentz"]
