"""Images/s of the project's own clean-feature extraction with PyTorch and with the default fast runtime.

Run: ``python bench/encode_speed.py --data ../shared/data`` (CIFAR-10 JPEGs; the tarball is unpacked once into
the hihpq cache) or ``--images DIR`` (any image folder, one sub-folder per class). Options: --n, --resolutions,
--batch-size, --workers, --runtime, --out.

For each resolution (default 112 and 224) the same N images go through
:func:`hihpq.data.extract_clean_features` (decoding, resizing, DataLoader workers, backbone, float16 rows: the
path every feature cache and ``hihpq encode`` take, without the cache) twice in the same run: with the PyTorch
reference (``runtime="torch"``, BatchNorm folded) and with ``runtime="auto"`` (the default). Each pass is
timed after a warm-up pass on a few batches (the export/compile of the runtime is timed separately). Augmented
views/s is :func:`hihpq.data.extract_view_features` with the fast backbone (2 views per image), and the
augmentation alone (decode + augment in this process, no backbone) is timed for the current implementation
and for the plain torchvision Compose it replaced. ``max_rel_diff`` compares float32 features of the same
decoded images through both backbones: max |fast - torch| / max |torch|; ``max_rel_diff_fp16_rows`` compares
the float16 rows the extraction stores.
Prints one line per resolution; the LAST line is the JSON {"resolution": 224, "torch_img_per_s",
"fast_img_per_s", "ratio", "max_rel_diff", "views_per_s"}; everything goes to bench/results/encode_speed.json
with the command, versions, commit and the machine's load average (a busy machine makes all figures noisy; the
ratio is measured in one run and is the robust figure).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from hihpq.data import AugmentConfig, ImageFolderDataset, extract_clean_features, extract_view_features
from hihpq.data.protocols import find_cifar10
from hihpq.data.transforms import eval_transform, seeded_call, train_transform
from hihpq.models import CompiledBackbone, frozen_backbone
from hihpq.runinfo import cpu_name, run_record, write_json

REPO = Path(__file__).resolve().parent.parent


def _dataset(args: argparse.Namespace) -> ImageFolderDataset:
    if args.images is not None:
        return ImageFolderDataset(args.images)
    root = find_cifar10(args.data, download=False)
    if root is None or not (root / "test").is_dir():
        raise SystemExit(
            "no CIFAR-10 JPEG folder found: pass --data DIR holding cifar10-jpeg.tar.gz (e.g. ../shared/data), set "
            "$HIHPQ_DATA, or pass --images DIR (an image folder)"
        )
    return ImageFolderDataset(root / "test")


def _spread(n_total: int, n: int) -> np.ndarray:
    """n indices spread over the dataset (every class of a class-sorted folder)."""
    return np.unique(np.linspace(0, n_total - 1, min(n, n_total)).round().astype(np.int64))


def _rate(fn, n: int) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return n / (time.perf_counter() - t0), out


def _clean_rate(backbone, ds, idx, res: int, args) -> tuple[float, np.ndarray]:
    kw = {"resolution": res, "batch_size": args.batch_size, "cache": None, "progress": False}
    if args.workers is not None:
        kw["num_workers"] = args.workers
    extract_clean_features(backbone, ds, idx[: 2 * args.batch_size], **kw)  # warm-up: workers, runtime caches
    rate, feats = _rate(lambda: extract_clean_features(backbone, ds, idx, **kw), len(idx))
    return rate, np.asarray(feats.features, dtype=np.float32)


def _float32_diff(reference, fast, ds, idx, res: int, batch: int) -> float:
    """max |fast - torch| / max |torch| over float32 features of the same decoded images."""
    tf = eval_transform(res, reference.mean, reference.std)
    worst, scale = 0.0, 0.0
    with torch.inference_mode():
        for start in range(0, len(idx), batch):
            x = torch.stack([tf(ds.load(int(i))) for i in idx[start : start + batch]])
            want, got = reference(x).float(), fast(x).float()
            worst = max(worst, float((got - want).abs().max()))
            scale = max(scale, float(want.abs().max()))
    return worst / max(scale, 1e-30)


def _augment_rate(ds, idx, res: int, old: bool) -> float:
    """Views/s of decoding + augmentation alone, in this process (one core)."""
    cfg = AugmentConfig(resolution=res)
    if old:  # the torchvision Compose of the paper's order, as before this benchmark's change
        from torchvision import transforms as T

        tf = T.Compose(
            [
                T.RandomResizedCrop(res, scale=cfg.crop_scale, interpolation=T.InterpolationMode.BILINEAR),
                T.RandomHorizontalFlip(p=cfg.flip_p),
                T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
                T.RandomGrayscale(p=cfg.grayscale_p),
                T.RandomApply([T.GaussianBlur(cfg.blur_kernel, sigma=cfg.blur_sigma)], p=cfg.blur_p),
                T.ToTensor(),
                T.Normalize((0.5,) * 3, (0.5,) * 3),
            ]
        )
    else:
        tf = train_transform(cfg, (0.5,) * 3, (0.5,) * 3)
    t0 = time.perf_counter()
    for k, i in enumerate(idx):
        seeded_call(tf, k, ds.load(int(i)))
    return len(idx) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("HIHPQ_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--images", type=Path, default=None, help="an image folder instead of CIFAR-10")
    ap.add_argument("--n", type=int, default=2048, help="images per measurement")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[112, 224])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the extractors')")
    ap.add_argument("--runtime", default="auto", help="the fast runtime (default: auto, as backbone.runtime)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encode_speed.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    ds = _dataset(args)
    idx = _spread(len(ds), args.n)
    load_before = os.getloadavg()[0]
    print(f"{len(idx)} images from {ds.root}, torch threads {torch.get_num_threads()}, load {load_before:.1f}")
    records = []
    for res in args.resolutions:
        reference = frozen_backbone("efficientnet-lite0", resolution=res, runtime="torch")
        t0 = time.perf_counter()
        fast = frozen_backbone("efficientnet-lite0", resolution=res, runtime=args.runtime)
        build_s = time.perf_counter() - t0
        runtime = fast.runtime_id if isinstance(fast, CompiledBackbone) else {"runtime": "torch"}
        torch_rate, torch_rows = _clean_rate(reference, ds, idx, res, args)
        fast_rate, fast_rows = _clean_rate(fast, ds, idx, res, args)
        sample = idx[: min(len(idx), 256)]
        diff = _float32_diff(reference, fast, ds, sample, res, args.batch_size)
        diff16 = float(np.abs(fast_rows - torch_rows).max() / np.abs(torch_rows).max())
        vkw = {"n_views": 2, "augment": AugmentConfig(resolution=res), "seed": 0, "cache": None, "progress": False}
        vkw["batch_size"] = args.batch_size
        if args.workers is not None:
            vkw["num_workers"] = args.workers
        half = idx[: max(1, len(idx) // 2)]
        views_rate = _rate(lambda b=fast, h=half, kw=vkw: extract_view_features(b, ds, h, **kw), 2 * len(half))[0]
        aug_sample = idx[: min(len(idx), 256)]
        aug_new, aug_old = _augment_rate(ds, aug_sample, res, False), _augment_rate(ds, aug_sample, res, True)
        rec = {
            "resolution": res,
            "torch_img_per_s": round(torch_rate, 1),
            "fast_img_per_s": round(fast_rate, 1),
            "ratio": round(fast_rate / torch_rate, 2),
            "max_rel_diff": float(f"{diff:.3g}"),
            "views_per_s": round(views_rate, 1),
            "max_rel_diff_fp16_rows": float(f"{diff16:.3g}"),
            "augment_only_views_per_s": {"current": round(aug_new, 1), "torchvision_compose": round(aug_old, 1)},
            "fast_runtime": runtime,
            "fast_build_s": round(build_s, 1),
        }
        records.append(rec)
        print(
            f"{res} px: torch {torch_rate:.1f} img/s, {runtime['runtime']} {fast_rate:.1f} img/s "
            f"(x{fast_rate / torch_rate:.2f}), max rel diff {diff:.2g} (fp16 rows {diff16:.2g}), views "
            f"{views_rate:.1f}/s; augmentation alone {aug_new:.0f} views/s (torchvision Compose {aug_old:.0f})",
            flush=True,
        )
    result = run_record(
        images=str(ds.root),
        n=len(idx),
        batch_size=args.batch_size,
        workers=args.workers,
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        load_avg_1min={"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        results=records,
    )
    write_json(args.out, result, force=True)
    last = next((r for r in records if r["resolution"] == 224), records[-1])
    keys = ("resolution", "torch_img_per_s", "fast_img_per_s", "ratio", "max_rel_diff", "views_per_s")
    print(json.dumps({k: last[k] for k in keys}))
    return result


if __name__ == "__main__":
    main()
