"""bench/gpu_check.py --device cpu --tiny: the GPU check's own path (CLI smoke path + online run) on a CPU."""

from __future__ import annotations

import json

from helpers import load_bench_script


def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    module = load_bench_script("gpu_check")
    out = tmp_path / "gpu_check_tiny.json"
    result = module.main(["--device", "cpu", "--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    smoke = result["smoke"]
    assert smoke["ok"] and set(smoke["seconds"]) == {"train", "evaluate", "encode", "search"}
    assert "mAP@10" in smoke["evaluate_output"] and 0 <= smoke["map_at_10"] <= 1
    (run,) = result["online"]
    assert run["amp"] == "none" and run["epochs"] == 1 and run["train_images_per_s"] > 0
    assert 0 <= run["map_at_10"] <= 1 and run["final_loss"] == run["final_loss"]  # a number, not NaN
