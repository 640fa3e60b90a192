"""benchmarks/gpu_check.py on CPU with tiny settings (so the one GPU command never rots), and the
GazeSup step it measures against (benchmarks/gazesup_step.py) checked against our unfold reference."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gazesup_step  # noqa: E402

STAGES = {
    "setup",
    "environment",
    "step_bfloat16",
    "step_float32",
    "bundle",
    "step_compile",
    "step_channels_last",
}


def _check(out, *args, timeout=900):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny", "--out", out,
         "--carry", out / "no-carry", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert (out / "gpu_check.json").read_text().strip() == line  # printed and written: the same line
    return json.loads(line)


def test_gpu_check_runs_every_stage_on_cpu_and_reports_them(tmp_path):
    res = _check(tmp_path, "--steps", "1", "--iterations", "4", "--skip", "channels_last")
    st = res["stages"]
    assert set(st) == STAGES and res["tiny"] is True and res["device"] == "cpu"
    assert res["torch"] == torch.__version__ and res["gpu"] is None
    assert st["setup"]["ok"] and st["setup"]["installed"] is False  # this venv has everything
    for dtype in ("bfloat16", "float32"):
        step = st[f"step_{dtype}"]
        assert step["ok"], step
        assert step["dtype"] == dtype and step["ref"] == "gazesup" and step["step"] == "joint"
        assert step["features"] == [4, 4, 8, 8, 16, 4] and step["size"] == 32 and step["batch"] == 2
        assert step["ms_per_step"] > 0 and step["ref_ms_per_step"] > 0
        assert step["speedup"] == round(step["ref_ms_per_step"] / step["ms_per_step"], 2)
        assert res["summary"][dtype]["ms_per_step"] == step["ms_per_step"]
    # one step of each profiled (bf16): torch.profiler tables of real ops
    for impl in ("ours", "reference"):
        table = (tmp_path / "profiles" / f"profile_{impl}_bfloat16.txt").read_text()
        assert "Self CPU" in table and "aten::" in table
    assert "convolution" in (tmp_path / "profiles" / "profile_reference_bfloat16.txt").read_text()
    # the bundle's paper profile through `python -m monai.bundle run`, timed per iteration:
    # the paper profile's epochs: iterations // iterations an epoch (4 asked for)
    b = st["bundle"]
    assert b["ok"], b
    assert b["configs"] == ["train.json", "paper_profile.json"]  # gpu.json is added on CUDA only
    assert b["epochs"] == 4 // b["iterations_per_epoch"] and b["iterations"] == 4
    assert b["timed_iterations"] == 2 and b["ms_per_iteration"] > 0 and b["median_ms_per_iteration"] > 0
    step = st["step_bfloat16"]["ms_per_step"]
    assert res["summary"]["bundle_over_step"] == round(b["ms_per_iteration"] / step, 2)
    assert res["summary"]["goals"]["bundle_le_1_25"] == (res["summary"]["bundle_over_step"] <= 1.25)
    # a stage that cannot work fails alone, with the reason; a skipped one says so
    assert st["step_compile"]["ok"] is False and "compile does not work on CPU" in st["step_compile"]["error"]
    assert st["step_channels_last"] == {"ok": False, "skipped": "--skip"}
    assert (tmp_path / "logs" / "bundle.log").is_file()


def test_a_failing_stage_is_reported_and_the_others_still_run(tmp_path):
    res = _check(tmp_path, "--skip", "step,compile,channels_last", "--data", tmp_path / "nowhere")
    st = res["stages"]
    assert st["bundle"]["ok"] is False and "gaze.csv not found" in st["bundle"]["error"]
    assert st["setup"]["ok"] and st["environment"]["ok"]
    assert st["step_bfloat16"] == {"ok": False, "skipped": "--skip"}
    assert res["summary"]["goals"] == {}


def test_out_of_time_stages_are_skipped_not_run(tmp_path):
    res = _check(tmp_path, "--budget", "0", "--skip", "setup")
    st = res["stages"]
    assert all(st[s]["skipped"].startswith("out of time") for s in STAGES - {"setup", "environment"})


def test_gazesup_propagation_is_the_unfold_reference():
    from gazemonai.train.networks import feature_propagation_unfold

    torch.manual_seed(0)
    feat = torch.randn(2, 6, 9, 11)
    assert torch.allclose(gazesup_step.propagate(feat), feature_propagation_unfold(feat), atol=1e-6)


def test_gazesup_loss_by_hand():
    """Two levels, logits 0 everywhere: BCE ln 2 per level; p = p_prop = [1/2, 1/2], <p, p> = 1/2 -> -1/2."""
    zero = torch.zeros(1, 1, 4, 4)
    target = torch.ones(1, 2, 4, 4)
    loss = gazesup_step.loss_fn([(zero, zero), (zero, zero)], target, weight=3.0)
    assert loss.item() == pytest.approx(2 * 0.6931471805599453 + 3.0 * 2 * -0.5, abs=1e-6)


def test_gazesup_step_trains_with_levels_as_copies():
    torch.manual_seed(0)
    model, opt = gazesup_step.build(num_levels=2, features=(4, 4, 8, 8, 16, 4))
    a, b = model.levels
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # copies, as GazeSup
    x = torch.rand(2, 3, 16, 16)
    y = (torch.rand(2, 2, 16, 16) > 0.5).float()
    losses = [gazesup_step.step(model, opt, x, y, torch.bfloat16).item() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert a.head[0].weight.grad is None  # the head is built but never used
