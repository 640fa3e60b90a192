"""Hybrid supervision through `python -m monai.bundle run`: train, resume, evaluate; bad settings."""

import json

import pytest
import torch
from helpers import bundle, configs, mlflow_runs, slice_named

SMALL = ["--image_size", "[32,32]", "--features", "[8,8,16,16,32,8]", "--batch_size", "2",
         "--num_workers", "0", "--cache_workers", "1", "--val_fraction", "0.34"]  # fmt: skip


@pytest.mark.parametrize("name", ["kvasir_gaze", "prostate_gaze"])
def test_hybrid_trains_resumes_and_evaluates(name, synthetic_root, tmp_path):
    out = tmp_path / "run"
    data = synthetic_root if name == "kvasir_gaze" else slice_named(synthetic_root, tmp_path / "slices")
    channels = [] if name == "kvasir_gaze" else ["--in_channels", "3"]
    common = ["--bundle_root", out, "--dataset_dir", data, "--gaze_csv", data / "gaze.csv", *SMALL, *channels]
    hybrid = configs(name, "train.json", "hybrid.json")
    bundle("--config_file", hybrid, *common, "--epochs", 1, "--strong_fraction", 0.34)
    bundle("--config_file", hybrid, *common, "--epochs", 2, "--strong_fraction", 0.34)  # resumes
    latest = torch.load(out / "models" / "latest.pt", weights_only=True)
    weights = latest["dii"]["weights"]
    assert (
        weights.shape == ((3,) if name == "kvasir_gaze" else (2,))
        and float(weights.min()) >= 0
        and float(weights.max()) <= 1
    )
    assert int(latest["dii"]["updates"]) > 0  # the weights were stepped (and resumed with the run)
    runs = mlflow_runs(out / "outputs" / "mlruns.db", name)
    run, metrics = runs[0], {k for r in runs for k in r.data.metrics}
    assert {
        "train_loss_supervised_1",
        "train_loss_dcr_2",
        "train_loss_dii_mean",
        "val_mean_dice",
    } <= metrics
    params = run.data.params
    assert (
        params["supervision"] == "hybrid"
        and params["strong_fraction"] == "0.34"
        and params["dcr_loss"] == "prop"
        and params["dii_lr"] == "0.005"
        and params["dii_interval"] == "1"
    )

    bundle("--config_file", configs(name, "train.json", "evaluate.json"), *common, "--eval_split", "test")
    report = json.loads((out / "outputs" / "metrics_test.json").read_text())
    assert report["images"] == 2 and 0.0 <= report["mean"]["ensemble"]["dice"] <= 1.0


def test_full_masks_on_the_strong_images_only(synthetic_root, tmp_path):
    """The 'full on 10 %' baseline: the hybrid config's strong images, one network, no gaze CSV."""
    out = tmp_path / "run"
    bundle("--config_file", configs("kvasir_gaze", "train.json", "hybrid.json"), "--bundle_root", out,
           "--dataset_dir", synthetic_root, *SMALL, "--epochs", 1, "--supervision", "full",
           "--strong_only", "True", "--strong_fraction", "0.67")  # fmt: skip
    (run,) = mlflow_runs(out / "outputs" / "mlruns.db", "kvasir_gaze")
    assert run.data.params["num_levels"] == "1" and "train_loss_dcr_1" not in run.data.metrics
    assert torch.load(out / "models" / "latest.pt", weights_only=True)["dii"]["weights"].shape == (2,)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--supervision", "hybrid"], "supervision 'hybrid' needs configs/hybrid.json"),
        (["--strong_fraction", "0"], "strong_fraction must be a number in (0, 1], got 0"),
        (["--dii", "false"], "dii must be true or false (on the command line: --dii True or False)"),
        (["--dcr_loss", "bce"], "dcr_loss must be one of 'prop', 'pure', 'label', got 'bce'"),
    ],
)
def test_bad_hybrid_settings_are_one_line(args, words, synthetic_root, tmp_path):
    files = ("train.json",) if "--supervision" in args else ("train.json", "hybrid.json")
    data = ["--dataset_dir", synthetic_root, "--gaze_csv", synthetic_root / "gaze.csv"]
    p = bundle(
        "--config_file", configs("kvasir_gaze", *files), "--bundle_root", tmp_path, *data, *args, ok=False
    )
    assert p.returncode == 2 and words in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
