"""Fast inference of frozen backbones: the PyTorch module exported once to OpenVINO or ONNX Runtime.

A frozen backbone is a fixed function of its input, so it can run in an inference runtime instead of eager
PyTorch: on this project's 2-core CPU machine OpenVINO fp32 ran EfficientNet-Lite0 several times faster
than PyTorch with the same features (README, "Encoding speed"). :func:`frozen_backbone` is the one entry:

- ``runtime="auto"`` (default): the fastest installed runtime of :data:`AUTO_ORDER`; PyTorch, with a
  one-line warning, when none is installed or the export fails. An explicitly named runtime that is
  missing or fails is an error (the user asked for it).
- ``runtime="torch"``: the PyTorch module itself (the reference, and the only choice on a GPU).
- ``precision="fp32"`` (default) gives features equal to PyTorch's to ~1e-5 relative; OpenVINO's own
  default may pick bf16 on CPUs that have it, so fp32 is set explicitly. ``"bf16"`` (OpenVINO only) is an
  explicit choice; the precision the compiled model really uses goes into :attr:`CompiledBackbone.runtime_id`
  and from there into every feature-cache key, so a changed runtime or precision never reuses a cache.

The exported graph (fixed input side, dynamic batch) is cached on disk under
``$HIHPQ_CACHE/runtimes`` (default ``~/.cache/hihpq/runtimes``), keyed by a content hash of the weights,
the resolution, the runtime with its version and the exporting torch version; it is written in a
temporary directory renamed into place, so a crash never leaves a half-written artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hihpq.models.backbones import Backbone, build_backbone

__all__ = [
    "AUTO_ORDER",
    "PRECISIONS",
    "RUNTIMES",
    "CompiledBackbone",
    "RuntimeUnavailableError",
    "accelerate",
    "compile_backbone",
    "cpu_threads",
    "default_runtime_dir",
    "frozen_backbone",
]

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
PRECISIONS = ("fp32", "bf16")
#: The order "auto" tries, fastest first as measured by bench/encode_speed.py on the project's CPU machine.
AUTO_ORDER = ("openvino", "onnxruntime")
#: Bump when the export procedure changes: old artifacts then stop matching.
EXPORT_FORMAT_VERSION = 1

_PIP = {"openvino": "openvino", "onnxruntime": "onnxruntime onnx onnxscript"}

#: Compiled backbones of this process by their settings: a service encoding request by request compiles once.
_COMPILED: dict[tuple[Any, ...], CompiledBackbone] = {}


class RuntimeUnavailableError(ImportError):
    """The requested inference runtime is not installed; the message says what to install."""


def default_runtime_dir() -> Path:
    """``$HIHPQ_RUNTIME_DIR``, else ``$HIHPQ_CACHE/runtimes`` (default ``~/.cache/hihpq/runtimes``): the
    exported backbones."""
    if os.environ.get("HIHPQ_RUNTIME_DIR"):
        return Path(os.environ["HIHPQ_RUNTIME_DIR"]).expanduser()
    env = os.environ.get("HIHPQ_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "hihpq") / "runtimes"


def cpu_threads() -> int:
    """CPU threads for the runtime: torch's setting (OMP_NUM_THREADS, set_num_threads), capped by the
    cores this process may use (containers and taskset restrict the affinity, not os.cpu_count)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores))


def _import_runtime(runtime: str) -> Any:
    """The runtime's module (openvino, or onnxruntime after checking the exporter's packages)."""
    try:
        if runtime == "onnxruntime":
            importlib.import_module("onnxscript")  # torch.onnx.export (dynamo) needs onnx + onnxscript
            importlib.import_module("onnx")
        return importlib.import_module(runtime)
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"backbone runtime {runtime!r} is not installed ({exc}); install it with "
            f"`pip install {_PIP[runtime]}`, or set backbone.runtime to 'auto' or 'torch'"
        ) from exc


def _runtime_version(runtime: str, module: Any) -> str:
    if runtime == "openvino":
        return str(module.get_version()).split("-")[0]
    return str(module.__version__)


def _weights_hash(module: nn.Module) -> str:
    """Content hash of the module's state: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes of any dtype, 0-d included
    return h.hexdigest()[:24]


@contextlib.contextmanager
def _quiet_export():
    """Exporters warn (deprecations, tracer notes) and print progress; none of it is the user's concern,
    and pytest runs with warnings as errors."""
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_onnx_log.setLevel(level)


def _export(module: nn.Module, resolution: int, runtime: str, out_dir: Path) -> Path:
    """Export ``module`` for (B, 3, resolution, resolution) inputs, batch dynamic, into ``out_dir``."""
    example = (torch.zeros(2, 3, resolution, resolution),)  # batch 2: torch.export specialises a batch of 1
    batch = {0: torch.export.Dim("batch", min=1, max=1 << 16)}
    with _quiet_export(), torch.inference_mode(False), torch.no_grad():
        if runtime == "openvino":
            import openvino as ov

            program = torch.export.export(module, example, dynamic_shapes=(batch,))
            path = out_dir / "model.xml"
            ov.save_model(ov.convert_model(program), path, compress_to_fp16=False)
        else:
            path = out_dir / "model.onnx"
            torch.onnx.export(
                module,
                example,
                path,
                input_names=["images"],
                output_names=["features"],
                dynamic_shapes=(batch,),
                dynamo=True,
                external_data=False,
            )
    return path


def _cached_export(module: nn.Module, resolution: int, runtime: str, key_fields: dict[str, Any], root: Path) -> Path:
    """The exported model file for ``key_fields``, exporting it first when absent (atomic directory rename)."""
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
    final = root / f"{key_fields['backbone']}-{resolution}px-{runtime}-{key}"
    name = "model.xml" if runtime == "openvino" else "model.onnx"
    if (final / "key.json").is_file() and (final / name).is_file():
        return final / name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        log.info("exporting %s at %d px to %s (once; cached in %s)", key_fields["backbone"], resolution, runtime, root)
        _export(module, resolution, runtime, tmp)
        (tmp / "key.json").write_text(json.dumps(key_fields, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / name).is_file():  # not a concurrent export that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / name


class CompiledBackbone(nn.Module):
    """A frozen backbone running in an inference runtime, with the torch backbone's interface.

    ``backbone(x)``: (B, 3, R, R) float images normalised as ``mean``/``std`` -> (B, F) float32 features on
    the CPU, R the resolution it was exported for. Attributes as :class:`~hihpq.models.backbones.Backbone`
    (``name``, ``feature_dim``, ``mean``, ``std``, ``weights_id``, ``default_resolution`` = R) plus
    :attr:`runtime_id`, the JSON-able identity of the runtime that feature-cache keys include.
    """

    trainable = "none"
    is_frozen = True

    def __init__(self, reference: Backbone, resolution: int, runtime: str, precision: str, model_path: Path) -> None:
        super().__init__()
        self.name, self.feature_dim = reference.name, int(reference.feature_dim)
        self.mean, self.std, self.weights_id = tuple(reference.mean), tuple(reference.std), reference.weights_id
        self.default_resolution = self.resolution = int(resolution)
        self.runtime, self.model_path, self.threads = runtime, model_path, cpu_threads()
        module = _import_runtime(runtime)
        if runtime == "openvino":
            effective = self._compile_openvino(module, precision)
        else:
            effective = self._compile_onnxruntime(module)
        if effective != precision:
            log.warning(
                "backbone precision %s is not available on this CPU with %s; running %s", precision, runtime, effective
            )
        self.precision = effective
        self.runtime_id = {"runtime": runtime, "version": _runtime_version(runtime, module), "precision": effective}

    def _compile_openvino(self, ov: Any, precision: str) -> str:
        hint = {"fp32": "f32", "bf16": "bf16"}[precision]
        config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": self.threads}
        self._compiled = ov.Core().compile_model(str(self.model_path), "CPU", config)
        self._request = self._compiled.create_infer_request()
        used = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16", ...
        return {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(used, used)

    def _compile_onnxruntime(self, ort: Any) -> str:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3  # errors only
        self._session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        return "fp32"  # the CPU provider computes fp32 graphs in fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) normalised images -> (B, feature_dim) float32 features (CPU)."""
        r = self.resolution
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, r, r):
            raise ValueError(
                f"{self.name} ({self.runtime}) was exported for (B, 3, {r}, {r}) inputs, got {tuple(x.shape)}; "
                f"build it with frozen_backbone(..., resolution={x.shape[-1]}) or use runtime 'torch'"
            )
        if x.shape[0] == 0:
            return torch.zeros(0, self.feature_dim)
        images = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        if self.runtime == "openvino":
            out = self._request.infer([images])[0]
        else:
            out = self._session.run(None, {"images": images})[0]
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))

    def for_inference(self) -> CompiledBackbone:
        """Already the inference form (the torch Backbone's interface)."""
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """None: a compiled backbone is frozen."""
        return []

    def extra_repr(self) -> str:
        return f"name={self.name!r}, resolution={self.resolution}, runtime={self.runtime_id}, threads={self.threads}"


def compile_backbone(
    backbone: Backbone,
    resolution: int,
    runtime: str,
    precision: str = "fp32",
    cache_dir: str | os.PathLike[str] | None = None,
) -> CompiledBackbone:
    """Export the frozen ``backbone`` to ``runtime`` (cached on disk) and compile it for this CPU.

    Raises:
        RuntimeUnavailableError: the runtime is not installed. ValueError: a trainable backbone, or a
        precision the runtime does not offer.
    """
    if runtime not in AUTO_ORDER:
        raise ValueError(f"runtime must be one of {list(AUTO_ORDER)} here, got {runtime!r}")
    if not backbone.is_frozen:
        raise ValueError("only a frozen backbone can run in an inference runtime (its weights must not change)")
    if precision == "bf16" and runtime != "openvino":
        raise ValueError(f"precision bf16 needs runtime 'openvino' ({runtime} computes fp32 on CPU)")
    module = _import_runtime(runtime)
    reference = backbone.for_inference().eval().cpu()  # BatchNorm folded: the graph the runtime optimises
    key_fields = {
        "format": EXPORT_FORMAT_VERSION,
        "backbone": backbone.name,
        "weights_sha256": _weights_hash(reference),
        "resolution": int(resolution),
        "runtime": runtime,
        "runtime_version": _runtime_version(runtime, module),
        "torch": torch.__version__.split("+")[0],
    }
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_runtime_dir()
    path = _cached_export(reference, int(resolution), runtime, key_fields, root)
    return CompiledBackbone(backbone, int(resolution), runtime, precision, path)


def _memo_key(name: str, weights: Any, resolution: int, runtime: str, precision: str, cache_dir: Any) -> tuple | None:
    """Settings that identify a compiled backbone within this process; None (no reuse) for random weights."""
    if weights is None:
        return None
    ident: Any = weights
    if weights != "default":
        try:
            st = Path(weights).expanduser().stat()
        except OSError:
            return None  # build_backbone reports the missing file
        ident = (str(Path(weights).expanduser().resolve()), st.st_size, st.st_mtime_ns)
    root = str(Path(cache_dir).expanduser() if cache_dir is not None else default_runtime_dir())
    return (str(name).lower(), ident, int(resolution), runtime, precision, root)


def frozen_backbone(
    name: str,
    weights: str | os.PathLike[str] | None = "default",
    resolution: int = 112,
    runtime: str = "auto",
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Backbone | CompiledBackbone:
    """The frozen backbone ``name`` for feature extraction, in the fastest allowed runtime.

    Args:
        name, weights: as :func:`~hihpq.models.backbones.build_backbone`.
        resolution: the input side the features are computed at (exports are per resolution).
        runtime: "auto" (fastest installed, else PyTorch with a warning), "torch", "openvino" or
            "onnxruntime" (an error when not installed).
        precision: "fp32" (features equal to PyTorch's) or "bf16" (OpenVINO, where the CPU supports it).
        device: where inputs go; runtimes run on the CPU, so any other device means PyTorch.
        cache_dir: where exports are kept (default :func:`default_runtime_dir`).

    Returns:
        A :class:`CompiledBackbone`, or the PyTorch backbone on ``device`` (runtime "torch", a GPU, or the
        "auto" fallback).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"backbone.runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    if precision not in PRECISIONS:
        raise ValueError(
            f"backbone.precision must be one of {list(PRECISIONS)}, got {precision!r} "
            "(int8 needs a calibration step that is not implemented)"
        )
    if precision == "bf16" and runtime not in ("auto", "openvino"):
        raise ValueError(f"precision bf16 needs backbone.runtime 'openvino' or 'auto', got {runtime!r}")
    on_cpu = torch.device(device).type == "cpu"
    if runtime == "torch" or (runtime == "auto" and not on_cpu):
        if precision != "fp32":
            raise ValueError(f"precision {precision} needs the CPU and OpenVINO; PyTorch runs fp32 on {device}")
        return build_backbone(name, weights=weights).to(device)
    if not on_cpu:
        raise ValueError(f"backbone.runtime {runtime!r} runs on the CPU; use runtime 'torch' on device {device}")
    memo_key = _memo_key(name, weights, resolution, runtime, precision, cache_dir)
    if memo_key is not None and memo_key in _COMPILED:
        return _COMPILED[memo_key]
    fast = accelerate(build_backbone(name, weights=weights), resolution, runtime, precision, cache_dir=cache_dir)
    if memo_key is not None and isinstance(fast, CompiledBackbone):
        _COMPILED[memo_key] = fast
    return fast


def accelerate(
    backbone: Backbone,
    resolution: int,
    runtime: str = "auto",
    precision: str = "fp32",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Backbone | CompiledBackbone:
    """``backbone`` (frozen, on the CPU) compiled in ``runtime``; "auto" tries each installed runtime in turn and
    falls back to ``backbone`` itself with one warning. Used for a backbone already built (a loaded model's)."""
    candidates = AUTO_ORDER if runtime == "auto" else (runtime,)
    if precision == "bf16":
        candidates = ("openvino",)
    problems = []
    for candidate in candidates:
        try:
            return compile_backbone(backbone, resolution, candidate, precision, cache_dir)
        except Exception as exc:  # missing package or a failed export: "auto" tries the next one
            if runtime != "auto":
                raise
            problems.append(f"{candidate}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if precision != "fp32":
        raise RuntimeUnavailableError(f"precision {precision} needs OpenVINO: {'; '.join(problems)}")
    log.warning(
        "backbone.runtime=auto: no inference runtime usable (%s); using PyTorch, several times slower "
        "(`pip install openvino` for the fast path)",
        "; ".join(problems),
    )
    return backbone
