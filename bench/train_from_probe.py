"""Issue 14, item 5: does training the top of the backbone from cached activations gain over the frozen head?

    PYTHONPATH=src python bench/train_from_probe.py --data ../shared/data [--sets cifar-half fashion-10pct]
        [--fashion ~/.cache/hihpq/fashion-mnist] [--arms frozen crop train train-crop] [--seed 1 2]

The cut is EfficientNet-Lite0's head: the last MBConv block's output (320 x 7 x 7 at 224 px) is cached, for the
clean images and the 8 augmented views of each training image, by the same feature cache as the pooled features
(OpenVINO, float16). The head conv (1x1, 320 -> 1280, its BatchNorm folded in) + ReLU6 + average pool then runs in
PyTorch at every step, in front of the default projector and quantizer (32-bit defaults, dropout 0.2):

- ``frozen``: the head as cached features would have it (the reference of this run: the default model);
- ``crop``: the frozen head, pooled over a random window of the activation map (sides 5-7 of 7, per image and step):
  a fresh augmentation of the cached activations, which 8 cached views cannot give;
- ``train``: the head conv trains (from the ImageNet weights, the backbone group's step ``train.backbone_lr_scale``);
- ``train-crop``: both.

The tuning sets are the held-out ones of ``bench/defaults_study.py`` (no CIFAR-10 (II) query in either); records go
to ``bench/results/train_from_probe.json`` after every run, and a rerun skips the runs the file holds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from defaults_study import CIFAR_FOLDS, set_overrides  # bench/ is the script's directory, first on sys.path
from hihpq.benchmark import run_learned
from hihpq.config import load_config
from hihpq.data.prepare import make_split, prepare_features, validation_split
from hihpq.models.backbones import EfficientNetLiteBackbone
from hihpq.models.runtime import compile_backbone
from hihpq.runinfo import run_record, write_json

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {  # name -> (smallest window side as a fraction of the map's, head conv trains)
    "frozen": (1.0, False),
    "crop": (5 / 7, False),
    "train": (1.0, True),
    "train-crop": (5 / 7, True),
}


class LiteBlocks(EfficientNetLiteBackbone):
    """EfficientNet-Lite0 without its head: (B, 3, R, R) -> (B, 320 * (R / 32)^2), the last block's output flattened."""

    def __init__(self, resolution: int) -> None:
        super().__init__("default")  # builds the network by the class's name (efficientnet-lite0)
        self.name = "efficientnet-lite0-blocks"  # keys its own feature-cache and export entries
        self.channels = self.net._conv_head.in_channels  # 320
        if resolution % 32:
            raise ValueError(f"resolution must be a multiple of 32, got {resolution}")
        self.side = resolution // 32
        self.feature_dim = self.channels * self.side**2
        self.default_resolution = resolution
        self.set_trainable(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            x = block(x)
        return x.flatten(1)


class LiteHead(nn.Module):
    """Lite0's head conv (BatchNorm folded) + ReLU6 + average pool: (B, 320 * S * S) -> (B, 1280).

    In training, ``min_window`` < 1 pools each image over its own random window (sides from ceil(min_window * S) to
    S): a random crop of the activation map, drawn from torch's generator at every step.
    """

    def __init__(self, blocks: LiteBlocks, min_window: float, trainable: bool) -> None:
        super().__init__()
        net = blocks.net
        self.conv = fuse_conv_bn_eval(net._conv_head.eval(), net._bn1.eval())
        self.conv.requires_grad_(trainable)
        self.channels, self.side, self.min_window = blocks.channels, blocks.side, min_window
        self.feature_dim = self.conv.out_channels  # 1280: the projector's input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[0], self.side
        y = F.relu6(self.conv(x.reshape(b, self.channels, s, s)))
        if not self.training or self.min_window >= 1:
            return y.mean(dim=(2, 3))
        lo = math.ceil(self.min_window * s)
        h, w = torch.randint(lo, s + 1, (2, b))
        top = (torch.rand(b) * (s - h + 1)).long()
        left = (torch.rand(b) * (s - w + 1)).long()
        r = torch.arange(s)
        rows = (r >= top[:, None]) & (r < (top + h)[:, None])
        cols = (r >= left[:, None]) & (r < (left + w)[:, None])
        weights = (rows[:, :, None] & cols[:, None, :]).to(y.dtype) / (h * w).to(y.dtype)[:, None, None]
        return torch.einsum("bchw,bhw->bc", y, weights.to(y.device))


def tuning_set(name: str, args, blocks) -> tuple[list[str], object]:
    """(overrides, PreparedFeatures of the activations) of a held-out tuning set of bench/defaults_study.py; a CIFAR
    fold computes activations for its own images only."""
    over = set_overrides(name, args)
    cfg = load_config("cifar10-ii-32", over)
    split = validation_split(make_split(cfg), **CIFAR_FOLDS[name])[0] if name in CIFAR_FOLDS else None
    return over, prepare_features(cfg, split, backbone=blocks)


def run_arm(cfg, prep, blocks: LiteBlocks, arm: str) -> dict:
    min_window, trainable = ARMS[arm]
    return run_learned(cfg, prep, progress=False, front=LiteHead(blocks, min_window, trainable))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="CIFAR-10 location")
    ap.add_argument("--fashion", help="Fashion-MNIST image folder (bench/fashion_mnist.py)")
    ap.add_argument("--sets", nargs="+", choices=["cifar-half", "fashion-10pct"], default=["cifar-half"])
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--bits", nargs="+", type=int, default=[32])
    ap.add_argument("--seed", type=int, nargs="+", default=[1])
    ap.add_argument("-o", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS / "train_from_probe.json"))
    args = ap.parse_args()
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else []
    done = {(r["bits"], r["arm"], r["tuning_set"], r["seed"], tuple(r["overrides"])) for r in records}
    resolution = load_config("cifar10-ii-32", args.overrides).backbone.resolution
    reference = LiteBlocks(resolution)
    blocks = compile_backbone(reference, resolution, "openvino")
    for set_name in args.sets:
        over, prep = tuning_set(set_name, args, blocks)
        for bits, seed, arm in itertools.product(args.bits, args.seed, args.arms):
            if (bits, arm, set_name, seed, tuple(args.overrides)) in done:
                continue
            # 50 epochs, as the configs trained when the probe ran (they train by train.steps since)
            cfg = load_config(f"cifar10-ii-{bits}", ["train.epochs=50", *over, f"seed={seed}"])
            scores = run_arm(cfg, prep, reference, arm)
            value = float(scores[f"map_at_{cfg.eval.topk}"])
            last = scores["history"][-1]
            print(
                f"{bits:>3} bits  {arm:<11} {set_name:<14} seed {seed}  mAP@{cfg.eval.topk} {100 * value:6.2f}  "
                f"loss {last['loss']:.3f}  ({scores['wall_s']:.0f} s)",
                flush=True,
            )
            records.append(
                run_record(
                    cfg.to_dict(), seed, bits=bits, arm=arm, tuning_set=set_name, overrides=args.overrides,
                    map=round(value, 6), final_loss=round(last["loss"], 4), wall_s=round(scores["wall_s"], 1),
                )
            )  # fmt: skip
            write_json(out, records, force=True)


if __name__ == "__main__":
    main()
