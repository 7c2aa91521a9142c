"""The GPU check: run it whenever a GPU is at hand (one GPU, under 8 minutes with the defaults).

Run: ``python bench/gpu_check.py --data DIR`` (DIR holds cifar10-jpeg/, or is the cifar10-jpeg.tar.gz tarball,
unpacked to a temporary folder). It runs, all through the ``hihpq`` command line:

1. the CUDA smoke path on a generated colour folder: ``train`` (frozen backbone, cached features; evaluates at the
   end) -> ``evaluate`` -> ``encode`` -> ``search``, each on the GPU (``--device`` wherever a command has it);
2. CIFAR-10 (II) 32 bits trained online through the trainable backbone at 224 px for a few epochs (a reduced
   protocol: --train-per-class, --db-per-class, --queries-per-class), once per AMP mode (default: none, bf16),
   and prints the training images/s (training images x epochs / epoch time) and the mAP reached.

Saves bench/results/gpu_check.json. ``python bench/gpu_check.py --device cpu --tiny`` runs the same steps on
generated data at 32 px in well under a minute (what CI and machines without a GPU can check); it writes
bench/results/gpu_check_tiny.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from hihpq.cli import build_parser
from hihpq.cli import main as hihpq

RESULTS = Path(__file__).parent / "results"
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def _colour_folder(root: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            img = np.clip(np.array(rgb) + rng.normal(0, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{k:03d}.png")
    return root


def _tiny_config(path: Path, images: Path, cache: Path, **sections) -> Path:
    cfg: dict = {
        "base": "cifar10-ii-16",
        "name": "gpu-check-tiny",
        "data": {"dataset": "folder", "root": str(images), "n_query": 9},
        "backbone": {"resolution": 32},
        "features": {"batch_size": 32, "num_workers": 0, "cache_dir": str(cache), "n_views": 2},
        "quantizer": {"bits": 8, "n_codewords": 16, "feature_dim": 8},
        "projector": {"hidden": 64},
        "hierarchy": {"levels": [6, 3], "warmup_epochs": 1},
        "train": {"epochs": 2, "batch_size": 16},
        "eval": {"topk": 10},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _has_option(command: str, option: str) -> bool:
    """Whether ``hihpq COMMAND`` takes ``option`` (so the check runs on versions with and without it)."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return any(option in a.option_strings for a in sub.choices[command]._actions)


def _cli(*argv: str) -> tuple[float, str]:
    """Run ``hihpq ARGV`` in this process: (seconds, stdout); a non-zero exit is an error naming the command."""
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = hihpq(list(argv))
    if code:
        raise RuntimeError(f"`hihpq {' '.join(argv)}` exited with {code}:\n{out.getvalue()[-2000:]}")
    return time.perf_counter() - t0, out.getvalue()


def smoke(device: str, tmp: Path) -> dict:
    """train -> evaluate -> encode -> search on the device, on a generated colour folder (frozen backbone)."""
    images = _colour_folder(tmp / "colours", per_class=10)
    config = _tiny_config(tmp / "smoke.yaml", images, tmp / "cache")
    run, index = tmp / "smoke-run", tmp / "smoke.hpq"
    dev = ["--device", device]
    seconds = {}
    seconds["train"], _ = _cli("train", str(config), "--out", str(run), *dev)
    seconds["evaluate"], text = _cli("evaluate", str(run), *(dev if _has_option("evaluate", "--device") else []))
    enc_dev = dev if _has_option("encode", "--device") else []
    seconds["encode"], _ = _cli("encode", str(run), "--images", str(images), "--out", str(index), *enc_dev)
    query = str(images / "red" / "000.png")
    seconds["search"], found = _cli(
        "search", str(index), "--query", query, "-k", "5", *(dev if _has_option("search", "--device") else [])
    )
    hits = [ln for ln in found.splitlines() if "id=" in ln]
    if len(hits) != 5:
        raise RuntimeError(f"search returned {len(hits)} results instead of 5:\n{found}")
    record = json.loads((run / "run.json").read_text())
    return {"ok": True, "seconds": seconds, "map_at_10": record["eval"]["map_at_10"], "evaluate_output": text.strip()}


def online(args, amp: str, tmp: Path, data: Path | None) -> dict:
    """One online run (trainable backbone, views augmented by worker processes): images/s and mAP."""
    run = tmp / f"online-{amp}"
    if args.tiny:
        images = _colour_folder(tmp / "online-images", per_class=6)
        n_train = 3 * 6 - 6
        config = str(
            _tiny_config(
                tmp / f"online-{amp}.yaml",
                images,
                tmp / "cache",
                backbone={"trainable": True, "resolution": 32},
                data={"n_query": 6},
                train={"epochs": args.epochs, "batch_size": 6, "lr": 0.005, "amp": amp},
            )
        )
        overrides: list[str] = []
    else:
        n_train = 10 * args.train_per_class
        config = "cifar10-ii-32"
        overrides = [
            "backbone.trainable=true",
            f"backbone.resolution={args.resolution}",
            f"train.epochs={args.epochs}",
            f"train.amp={amp}",
            "hierarchy.warmup_epochs=1",  # the hierarchy losses run within a few epochs
            f"data.train_per_class={args.train_per_class}",
            f"data.database_per_class={args.db_per_class}",
            f"data.queries_per_class={args.queries_per_class}",
            f"features.num_workers={args.workers}",
            "features.batch_size=256",
            "eval.topk=1000",
        ]
    argv = ["train", config, "--out", str(run), "--device", args.device, *[x for o in overrides for x in ("-o", o)]]
    if data is not None:
        argv += ["--data", str(data)]
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    wall, _ = _cli(*argv)
    log = json.loads((run / "log.json").read_text())
    record = json.loads((run / "run.json").read_text())
    train_s = sum(r["epoch_s"] for r in log)
    topk = next(k for k in record["eval"] if k.startswith("map_at_"))
    return {
        "amp": amp,
        "epochs": len(log),
        "n_train": n_train,
        "train_images_per_s": n_train * len(log) / train_s,
        "epoch_s": [r["epoch_s"] for r in log],
        "final_loss": log[-1]["loss"],
        topk: record["eval"][topk],
        "wall_s": wall,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
    }


def _cifar_root(data: Path | None, tmp: Path) -> Path | None:
    if data is None:
        return None
    if data.is_file() and data.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(data) as tar:
            tar.extractall(tmp / "data", filter="data")
        return tmp / "data"
    return data


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", type=Path, default=os.environ.get("HIHPQ_DATA"), help="CIFAR-10 folder or tarball")
    ap.add_argument("--tiny", action="store_true", help="generated data at 32 px: a minute on a CPU")
    ap.add_argument(
        "--amp", nargs="+", default=None, help="AMP modes to compare (default: none bf16 on GPUs, none on CPUs)"
    )
    ap.add_argument("--epochs", type=int, default=None, help="online epochs (default 3; --tiny 1)")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--train-per-class", type=int, default=500, help="CIFAR-10 (II) uses 500")
    ap.add_argument("--db-per-class", type=int, default=500)
    ap.add_argument("--queries-per-class", type=int, default=100)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="augmentation processes")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.epochs = args.epochs or (1 if args.tiny else 3)
    # bf16 convolutions are emulated on most CPUs (minutes per step through the backbone): the CPU check keeps fp32;
    # tests/test_amp.py checks autocast on CPU on the head alone.
    amps = args.amp or (["none", "bf16"] if args.device.startswith("cuda") else ["none"])
    out = args.out or RESULTS / ("gpu_check_tiny.json" if args.tiny else "gpu_check.json")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run `python bench/gpu_check.py --device cpu --tiny` instead")
    if not args.tiny and args.data is None:
        raise SystemExit("--data DIR (a folder with cifar10-jpeg/, or the tarball) is needed without --tiny")

    t0 = time.perf_counter()
    result: dict = {
        "bench": "gpu_check",
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "tiny": args.tiny,
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        result["smoke"] = smoke(args.device, tmp)
        print(f"smoke path train -> evaluate -> encode -> search on {args.device}: ok {result['smoke']['seconds']}")
        data = None if args.tiny else _cifar_root(args.data, tmp)
        result["online"] = []
        for amp in amps:
            row = online(args, amp, tmp, data)
            result["online"].append(row)
            score = {k: v for k, v in row.items() if k.startswith("map_at_")}
            print(
                f"online {'tiny' if args.tiny else 'CIFAR-10 (II) 32 bits'} {args.resolution if not args.tiny else 32}"
                f" px, amp={amp}: {row['train_images_per_s']:.1f} training images/s, {score}, "
                f"loss {row['final_loss']:.3f}"
            )
    base = result["online"][0]["train_images_per_s"]
    for row in result["online"]:
        row["speedup_vs_first"] = row["train_images_per_s"] / base
    result["total_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
