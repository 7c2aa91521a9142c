"""torchrun: 2 CPU processes on gloo train like 1 process with the same global batch, and resume after a kill.

The runs go through ``python -m torch.distributed.run`` (torchrun) in subprocesses, on cached features of a
generated colour folder (a linear projector: BatchNorm statistics are per process on CPU, see the README), with
the feature dropout: each rank cuts its rows out of one mask of the global batch.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import free_port, write_colour_folder, write_tiny_config
from hihpq import distributed
from hihpq.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
EPOCHS = 4
# Float tolerance between 1 and 2 processes: the same global-batch loss, summed in another order (gathered rows,
# gradients averaged over ranks) drifts by rounding only: ~1e-6 relative per step in fp32, grown to 2e-4 by the
# fourth epoch with the feature dropout. Ranks that drew their own dropout masks differ by 3e-3 in the first
# epoch's loss and 3% by the fourth (measured), so this still tells the two apart.
LOSS_RTOL = 1e-3

KILL_AFTER_FIRST_CHECKPOINT = """
import os, signal
if os.environ.get("RANK") is not None:  # a torchrun worker, not the launcher
    from hihpq.train import Trainer

    _save = Trainer.save_checkpoint

    def save_checkpoint(self, path):
        _save(self, path)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    Trainer.save_checkpoint = save_checkpoint
"""


def _torchrun(config: Path, out: Path, *extra: str, nproc: int = 2, pythonpath=()) -> subprocess.Popen:
    path = [*map(str, pythonpath), str(SRC), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "hihpq", "train", str(config), "--out", str(out), *extra,
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def _final(run: Path) -> tuple[list[float], float]:
    log = json.loads((run / "log.json").read_text())
    record = json.loads((run / "run.json").read_text())
    return [r["loss"] for r in log], record["eval"]["map_at_20"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    images = write_colour_folder(tmp / "images", per_class=20)
    config = write_tiny_config(
        tmp / "tiny.yaml",
        images,
        tmp / "cache",
        "tiny-ddp",
        data={"n_query": 12, "n_train": 48},
        features={"n_views": 2},
        projector={"kind": "linear", "dropout": 0.2},
        # neighbour pairs: every rank must draw the same pairs from the neighbours rank 0 found; re-seeded
        # codewords: every rank must copy the codebooks rank 0 re-seeded (from epoch 2 on); refit codebooks: every
        # rank embeds its shard for rank 0's k-means after the last epoch
        train={
            "epochs": EPOCHS,
            "batch_size": 16,
            "lr": 0.005,
            "neighbours": 3,
            "reseed_codewords": True,
            "refit_codebooks": True,
        },
    )
    one = tmp / "one"
    assert main(["train", str(config), "--out", str(one)]) == 0  # also fills the feature cache
    return tmp, config, one


def test_two_processes_train_like_one_with_the_same_global_batch(setup):
    tmp, config, one = setup
    _finish(_torchrun(config, tmp / "two"))
    loss1, map1 = _final(one)
    loss2, map2 = _final(tmp / "two")
    assert len(loss2) == EPOCHS
    np.testing.assert_allclose(loss2, loss1, rtol=LOSS_RTOL)
    assert abs(map2 - map1) <= 0.01  # codes are argmins: a rounding-level change may flip a near tie
    # only rank 0 wrote: one log, one model, one record
    assert sorted(p.name for p in (tmp / "two").iterdir()) == sorted(p.name for p in one.iterdir())


def test_codebooks_from_data_are_the_same_with_two_processes(setup):
    tmp, config, _ = setup
    init = ["-o", "quantizer.init_from_data=true"]
    assert main(["train", str(config), "--out", str(tmp / "one-init"), *init]) == 0
    _finish(_torchrun(config, tmp / "two-init", *init))
    loss1, map1 = _final(tmp / "one-init")
    loss2, map2 = _final(tmp / "two-init")
    np.testing.assert_allclose(loss2, loss1, rtol=LOSS_RTOL)  # rank 0's k-means reached every rank
    assert abs(map2 - map1) <= 0.01
    assert not np.allclose(loss1, _final(tmp / "one")[0])  # the initialisation did change the run


def test_a_killed_two_process_run_resumes_and_finishes(setup):
    tmp, config, one = setup
    run = tmp / "killed"
    # Fault injection from the test side: right after rank 0 writes the first checkpoint it SIGKILLs the whole
    # process group (launcher and both ranks), as a lost machine would; deterministic, unlike a timed kill.
    inject = tmp / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(KILL_AFTER_FIRST_CHECKPOINT)
    proc = _torchrun(config, run, pythonpath=[inject])
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    done = json.loads((run / "log.json").read_text())
    assert len(done) == 1  # killed right after the first epoch's checkpoint
    assert not (run / "run.json").exists()
    _finish(_torchrun(config, run, "--resume"))
    loss_resumed, map_resumed = _final(run)
    loss1, map1 = _final(one)
    assert len(loss_resumed) == EPOCHS
    np.testing.assert_allclose(loss_resumed, loss1, rtol=LOSS_RTOL)
    assert abs(map_resumed - map1) <= 0.01


def test_shard_bounds_cover_every_row_once():
    for n in (0, 1, 7, 16):
        for world in (1, 2, 3, 5):
            bounds = [distributed.shard_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_single_process_helpers_are_no_ops():
    assert distributed.context() == distributed.Context(0, 1, 0)
    t = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_rows(t) is t
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_true(torch.tensor(True)) and not distributed.all_true(False)
