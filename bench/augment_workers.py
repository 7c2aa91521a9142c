"""Throughput of the online training views (decode + augment) with 0, 1, 2, ... DataLoader worker processes.

Run: ``python bench/augment_workers.py`` (options: --data DIR for CIFAR-10 JPEGs instead of generated ones,
--resolution, --batch, --steps, --workers). Streams the same seeded steps (two augmented views of a batch, as a
training step asks for) through :class:`hihpq.train.ImageViews` with each worker count, checks that every count
produces identical tensors, and reports images/s (views/s / 2) and the speed-up over 0 workers (augmentation in
the training process) measured in the same run. The LAST line is JSON, also saved to
bench/results/augment_workers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hihpq.data import AugmentConfig, ImageDataset, eval_transform, train_transform
from hihpq.runinfo import cpu_name, run_record, write_json
from hihpq.train import ImageViews

MEAN = STD = (0.5, 0.5, 0.5)


def _generated_images(root: Path, n: int) -> list[Path]:
    """CIFAR-sized (32 x 32) JPEG files of smooth random colour fields."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((32, 32), Image.BILINEAR)
        paths.append(root / f"{i:05d}.jpg")
        img.save(paths[-1], quality=75)
    return paths


def _cifar_images(data: Path, n: int) -> list[Path]:
    root = next((p for p in (data / "cifar10-jpeg" / "train", data / "train") if p.is_dir()), None)
    if root is None:
        raise SystemExit(f"no CIFAR-10 JPEG folder under {data} (expected cifar10-jpeg/train/<class>/*.jpg)")
    return sorted(root.rglob("*.jpg"))[:n]


def _steps(n_images: int, batch: int, n_steps: int) -> list:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_steps):
        idx = rng.choice(n_images, batch, replace=False)
        out.append([(idx, rng.integers(0, np.iinfo(np.int64).max, size=(batch, 2), dtype=np.int64))])
    return out


def _run(source: ImageViews, steps: list) -> tuple[float, list[torch.Tensor]]:
    t0 = time.perf_counter()
    first = None
    for views in source.stream(steps):
        first = first if first is not None else views
    return time.perf_counter() - t0, first


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="folder with cifar10-jpeg/ (default: generated 32 px JPEGs)")
    ap.add_argument("--resolution", type=int, default=224, help="training view size (224: the paper's VGG-16)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "augment_workers.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the training process's own share; workers use one thread each

    n_images = args.batch * args.steps
    with tempfile.TemporaryDirectory() as tmp:
        paths = _cifar_images(args.data, n_images) if args.data else _generated_images(Path(tmp), n_images)
        ds = ImageDataset(paths)
        aug, clean = (
            train_transform(AugmentConfig(resolution=args.resolution), MEAN, STD),
            eval_transform(args.resolution, MEAN, STD),
        )
        steps = _steps(len(paths), args.batch, args.steps)
        rows, reference = [], None
        for w in args.workers:
            source = ImageViews(ds, np.arange(len(paths)), aug, clean, num_workers=w)
            times, first = [], None
            for _ in range(args.repeats):
                t, first = _run(source, steps)
                times.append(t)
            if reference is None:
                reference = first
            identical = all(torch.equal(a, b) for a, b in zip(first, reference, strict=True))
            seconds = statistics.median(times)
            rows.append({"workers": w, "seconds": seconds, "images_per_s": args.batch * args.steps / seconds,
                         "identical_to_first": identical})  # fmt: skip
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup_vs_first"] = r["images_per_s"] / base
        print(
            f"workers {r['workers']}: {r['images_per_s']:8.1f} images/s (2 views each, {args.resolution} px)  "
            f"x{r['speedup_vs_first']:.2f} vs {rows[0]['workers']} workers  identical views: {r['identical_to_first']}"
        )
    result = run_record(  # command, commit, versions, threads beside the figures
        bench="augment_workers",
        cpu=cpu_name(),
        cpu_cores=os.cpu_count(),
        source=str(args.data) if args.data else "generated 32 px JPEG",
        resolution=args.resolution,
        batch=args.batch,
        steps=args.steps,
        repeats=args.repeats,
        rows=rows,
    )
    write_json(args.out, result, force=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
