"""What every run records beside its outputs: config, seed, package versions, git commit (files are written
through :func:`hihpq.atomic.atomic_path`, re-exported here)."""

from __future__ import annotations

import json
import platform
import random
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hihpq.atomic import atomic_path, is_json_file

__all__ = ["atomic_path", "cpu_name", "git_commit", "run_record", "seed_everything", "versions", "write_json"]

_PACKAGES = (
    "hihpq",
    "torch",
    "torchvision",
    "numpy",
    "faiss-cpu",
    "numba",
    "scikit-learn",
    "pillow",
    "openvino",
    "onnxruntime",
)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 -- third-party code still draws from the legacy global RNG
    torch.manual_seed(seed)


def git_commit(path: str | Path | None = None) -> str | None:
    """The git commit of the source tree (with '-dirty' when it has uncommitted changes), or None."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    """The processor's model name (benchmarks record it beside their figures)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """What a run's figures depend on besides its config, seed and commit."""
    return {
        "versions": versions(),
        "platform": platform.platform(),
        # the same seed and code can train to a different mAP (a few tenths) on another CPU: float kernels differ
        # with the instruction set, and training amplifies them; records paired across runs must share it
        "cpu": {"name": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability()},
        "torch_threads": torch.get_num_threads(),
    }


def run_record(config: dict[str, Any] | None = None, seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """A dictionary describing this run, to be written next to its results."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "seed": seed,
        "commit": git_commit(),
        **environment(),
        "config": config,
        **extra,
    }


def write_json(path: str | Path, obj: Any, *, force: bool = False) -> None:
    """Write JSON atomically (numpy scalars and paths are converted); never over a file that is not JSON."""
    with atomic_path(path, looks_like=is_json_file, what="JSON file", force=force) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
