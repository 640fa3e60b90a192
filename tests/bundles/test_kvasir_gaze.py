"""The kvasir_gaze bundle run as a user runs it: python -m monai.bundle run, train -> evaluate -> infer."""

import json
import os
import subprocess
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from helpers import KVASIR, KVASIR_CSV, ROOT, bundle, need, torchrun
from PIL import Image

BUNDLE = ROOT / "bundles" / "kvasir_gaze"
CONFIGS = BUNDLE / "configs"
TRAIN = str(CONFIGS / "train.json")
EVALUATE = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']"
PAPER = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'paper_profile.json'}']"
PAPER_LOW_MEMORY = (
    f"['{CONFIGS / 'train.json'}','{CONFIGS / 'paper_profile.json'}','{CONFIGS / 'low_memory.json'}']"
)
SMALL = ["--image_size", "[32,32]", "--batch_size", "2", "--num_workers", "0", "--cache_workers", "1"]


def mlflow_runs(db: Path):
    return helpers.mlflow_runs(db, "kvasir_gaze")


def _artifacts(bundle_root: Path, run, folder: str = "") -> dict[str, bytes]:
    """The files a run logged under ``folder`` (read back from the bundle's MLflow store)."""
    import mlflow

    uri = f"sqlite:///{bundle_root / 'outputs' / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    files = {}
    for info in client.list_artifacts(run.info.run_id, folder or None):
        if not info.is_dir:
            local = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path=info.path, tracking_uri=uri
            )
            files[Path(info.path).name] = Path(local).read_bytes()
    return files


def test_train_evaluate_infer_resume_on_generated_data(synthetic_root, tmp_path):
    data = synthetic_root
    out = tmp_path / "bundle"
    common = [
        "--bundle_root",
        out,
        "--dataset_dir",
        data,
        "--gaze_csv",
        data / "gaze.csv",
        "--val_fraction",
        "0.34",
        "--train_step",
        "levelwise",
    ]
    p = bundle("--config_file", TRAIN, *common, *SMALL, "--epochs", 2)
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "latest.pt").is_file()
    assert "val_dice_level_2" in p.stdout + p.stderr

    runs = mlflow_runs(out / "outputs" / "mlruns.db")
    train_run = [r for r in runs if "val_mean_dice" in r.data.metrics][0]
    metrics = train_run.data.metrics
    assert {"val_mean_dice", "val_dice_level_1", "val_dice_level_2", "train_loss"} <= set(metrics)
    # each level's loss terms, as epoch means, from the engine output (LossTerms)
    terms = {f"train_loss_{t}_{k}" for t in ("dice", "bce", "consistency") for k in (1, 2)}
    assert terms <= set(metrics) and metrics["train_loss_consistency_1"] < 0
    assert train_run.data.params["supervision"] == "gaze" and train_run.data.params["num_levels"] == "2"
    assert train_run.data.params["train_step"] == "levelwise"
    # the run records the config files it was given, the merged config and the resolved settings
    config = _artifacts(out, train_run, "config")
    assert set(config) == {"train.json", "executed_config.json", "resolved_settings.json"}
    assert config["train.json"] == Path(TRAIN).read_bytes()
    executed = json.loads(config["executed_config.json"])
    assert executed["train_step"] == "levelwise" and executed["image_size"] == [32, 32]
    resolved = json.loads(config["resolved_settings.json"])
    assert resolved["output_dir"] == f"{out}/outputs" and resolved["num_levels"] == 2
    assert resolved["device"] == "cpu" and resolved["epochs"] == 2 and "network" not in resolved
    record = json.loads((out / "models" / "mlflow_run.json").read_text())
    assert record["run_id"] == train_run.info.run_id and record["experiment_name"] == "kvasir_gaze"

    # restart with a longer schedule: resumes from latest.pt after epoch 2 and runs epoch 3 only
    p = bundle("--config_file", TRAIN, *common, *SMALL, "--epochs", 3)
    log = p.stdout + p.stderr
    assert "resumed from" in log and "at epoch 2" in log
    assert "Epoch[3] Metrics" in log and "Epoch[1] Metrics" not in log

    # evaluate the best checkpoint on a chosen split at ground-truth size
    bundle("--config_file", EVALUATE, *common, *SMALL, "--eval_split", "test")
    report = json.loads((out / "outputs" / "metrics_test.json").read_text())
    assert report["images"] == 2
    assert set(report["mean"]) == {"ensemble", "level_1", "level_2"}
    assert set(report["per_image"][0]["ensemble"]) == {"dice", "iou"}
    assert [r["id"] for r in report["per_image"]] == ["synth_004", "synth_005"]
    runs = mlflow_runs(out / "outputs" / "mlruns.db")
    evaluation = [r for r in runs if r.info.run_name == "evaluate_test_bundle"]  # <split>_<folder>
    assert len(evaluation) == 1 and evaluation[0].data.metrics["eval_mean_dice"] == pytest.approx(
        report["mean"]["ensemble"]["dice"], abs=1e-5
    )
    assert json.loads(_artifacts(out, evaluation[0])["metrics_test.json"]) == report
    assert set(_artifacts(out, evaluation[0], "config")) >= {"train.json", "evaluate.json"}

    # inference writes one PNG mask per input image, at the input's size
    pred_dir = tmp_path / "preds"
    bundle(
        "--config_file",
        CONFIGS / "inference.json",
        "--bundle_root",
        out,
        "--dataset_dir",
        data / "images",
        "--output_dir",
        pred_dir,
        "--image_size",
        "[32,32]",
    )
    written = sorted(p.name for p in pred_dir.glob("*.png"))
    assert written == sorted(p.name for p in (data / "images").glob("*.png"))
    mask = np.asarray(Image.open(pred_dir / "synth_000.png"))
    assert mask.shape == (96, 128) and set(np.unique(mask)) <= {0, 255}


def test_full_supervision_mode_is_one_override(synthetic_root, tmp_path):
    out = tmp_path / "full"
    p = bundle(
        "--config_file", TRAIN, "--bundle_root", out, "--dataset_dir", synthetic_root,
        "--gaze_csv", synthetic_root / "gaze.csv", "--supervision", "full", "--epochs", 1, *SMALL,
    )  # fmt: skip
    log = p.stdout + p.stderr
    assert "val_dice_level_1" in log and "val_dice_level_2" not in log
    run = [r for r in mlflow_runs(out / "outputs" / "mlruns.db") if "val_mean_dice" in r.data.metrics][0]
    assert run.data.params["supervision"] == "full" and run.data.params["num_levels"] == "1"


def test_held_out_test_split_fails_with_the_missing_files(tmp_path):
    need(KVASIR / "images")
    p = bundle(
        "--config_file", EVALUATE, "--bundle_root", tmp_path, "--dataset_dir", KVASIR, *SMALL, ok=False
    )  # fmt: skip
    assert p.returncode != 0
    assert "100 file(s) missing under" in p.stderr and "images/cju" in p.stderr


def test_bundle_on_a_tiny_slice_of_real_kvasir(tmp_path):
    need(KVASIR / "images")
    need(KVASIR_CSV)
    out = tmp_path / "real"
    common = ["--bundle_root", out, "--dataset_dir", KVASIR, "--gaze_csv", KVASIR_CSV, "--limit", 6]
    p = bundle("--config_file", TRAIN, *common, *SMALL, "--epochs", 1)
    assert "val_mean_dice" in p.stdout + p.stderr
    bundle("--config_file", EVALUATE, *common, *SMALL, "--eval_split", "val", "--eval_limit", 3)
    report = json.loads((out / "outputs" / "metrics_val.json").read_text())
    assert report["images"] == 3 and 0.0 <= report["mean"]["ensemble"]["dice"] <= 1.0
    images = tmp_path / "in"
    images.mkdir()
    name = report["per_image"][0]["id"] + ".jpg"
    (images / name).symlink_to(KVASIR / "images" / name)
    bundle(
        "--config_file", CONFIGS / "inference.json", "--bundle_root", out, "--dataset_dir", images,
        "--output_dir", tmp_path / "pred", "--image_size", "[32,32]",
    )  # fmt: skip
    with Image.open(KVASIR / "images" / name) as im:
        w, h = im.size
    assert np.asarray(Image.open(tmp_path / "pred" / name.replace(".jpg", ".png"))).shape == (h, w)


def test_paper_profile_with_low_memory_trains_levelwise_with_the_step_in_backward(synthetic_root, tmp_path):
    """paper_profile.json + low_memory.json (slim widths here): levelwise step, fused SGD inside backward.

    The memory tricks are opt-in: the paper profile alone keeps MONAI's joint step.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(eval(PAPER))
    assert (parser["train_step"], parser["step_in_backward"], parser["release_memory"]) == (
        "joint",
        False,
        False,
    )
    out = tmp_path / "paper"
    p = bundle(
        "--config_file", PAPER_LOW_MEMORY, "--bundle_root", out, "--dataset_dir", synthetic_root,
        "--gaze_csv", synthetic_root / "gaze.csv", "--features", "[8,8,16,16,32,8]", "--iterations", 2,
        *SMALL,
    )  # fmt: skip
    assert "val_mean_dice" in p.stdout + p.stderr
    run = [r for r in mlflow_runs(out / "outputs" / "mlruns.db") if "val_mean_dice" in r.data.metrics][0]
    params = run.data.params
    assert params["train_step"] == "levelwise" and params["step_in_backward"] == "True"
    assert params["release_memory"] == "True" and params["optimizer"] == "SGD"
    assert {"train_loss_dice_1", "train_loss_consistency_2"} <= set(
        run.data.metrics
    )  # from the levelwise step
    ckpt = torch.load(out / "models" / "latest.pt", weights_only=True)
    state = ckpt["optimizer"]["state"]
    assert ckpt["optimizer"]["param_groups"][0]["fused"] is True
    assert state and all("momentum_buffer" in v for v in state.values())  # every parameter was stepped


@pytest.mark.parametrize("profile", [[], ["paper_profile.json"]], ids=["cpu_profile", "paper_profile"])
def test_multi_gpu_config_runs_two_processes_with_gloo(synthetic_root, tmp_path, profile):
    """multi_gpu_train.json under torchrun: 2 CPU processes (gloo), one MLflow store, rank 0's checkpoints.

    With the paper profile too (its joint step is what DDP needs).
    """
    out = tmp_path / "ddp"
    files = ",".join(f"'{CONFIGS / f}'" for f in ["train.json", *profile, "multi_gpu_train.json"])
    cmd = [
        *torchrun(), "-m", "monai.bundle", "run",
        "--config_file", f"[{files}]", "--features", "[8,8,16,16,32,8]",
        "--bundle_root", str(out), "--dataset_dir", str(synthetic_root),
        "--gaze_csv", str(synthetic_root / "gaze.csv"),
        "--val_fraction", "0.5", "--epochs", "1", "--image_size", "[32,32]", "--batch_size", "1",
        "--num_workers", "0", "--cache_workers", "1",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "latest.pt").is_file()
    runs = [r for r in mlflow_runs(out / "outputs" / "mlruns.db") if "val_mean_dice" in r.data.metrics]
    assert len(runs) == 1  # rank 0 only


def test_multi_gpu_evaluate_gathers_every_rank_in_dataset_order(synthetic_root, kvasir_checkpoint, tmp_path):
    """multi_gpu_evaluate.json under torchrun (2 gloo processes, 3 images: uneven shards) writes the
    same report as evaluate.json in one process: every image once, in dataset order, same means."""
    import shutil

    args = ["--dataset_dir", str(synthetic_root), "--val_fraction", "0.75", "--eval_split", "val"]
    args += [str(a) for a in SMALL]
    single, multi = tmp_path / "single", tmp_path / "multi"
    for root in (single, multi):
        (root / "models").mkdir(parents=True)
        shutil.copy(kvasir_checkpoint, root / "models" / "model.pt")
    bundle("--config_file", EVALUATE, "--bundle_root", single, *args)
    files = ",".join(f"'{CONFIGS / f}'" for f in ["train.json", "evaluate.json", "multi_gpu_evaluate.json"])
    cmd = [
        *torchrun(), "-m", "monai.bundle", "run",
        "--config_file", f"[{files}]", "--bundle_root", str(multi), *args,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = json.loads((single / "outputs" / "metrics_val.json").read_text())
    two = json.loads((multi / "outputs" / "metrics_val.json").read_text())
    assert one["images"] == two["images"] == 3
    assert [r["id"] for r in two["per_image"]] == [r["id"] for r in one["per_image"]]
    for a, b in zip(one["per_image"], two["per_image"]):
        assert a["ensemble"]["dice"] == pytest.approx(b["ensemble"]["dice"], abs=1e-6)
    assert two["mean"]["ensemble"]["dice"] == pytest.approx(one["mean"]["ensemble"]["dice"], abs=1e-6)
    runs = [r for r in mlflow_runs(multi / "outputs" / "mlruns.db") if "eval_mean_dice" in r.data.metrics]
    assert len(runs) == 1  # rank 0 logs
    assert runs[0].data.metrics["eval_mean_dice"] == pytest.approx(one["mean"]["ensemble"]["dice"], abs=1e-5)


def test_a_log_file_holds_plain_lines_and_no_progress_bar_frames(synthetic_root, tmp_path):
    """``monai.bundle run ... > log 2>&1``: no carriage-return frames, every record on its own line."""
    import re
    import sys

    out, log = tmp_path / "bundle", tmp_path / "train.log"
    common = ["--bundle_root", out, "--dataset_dir", synthetic_root, "--gaze_csv",
              synthetic_root / "gaze.csv", "--val_fraction", "0.34", *SMALL]  # fmt: skip
    for configs, extra in ((TRAIN, ["--epochs", 2]), (EVALUATE, ["--eval_split", "val"])):
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, *common, *extra]
        with log.open("a") as f:
            p = subprocess.run(list(map(str, command)), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        assert p.returncode == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "\r" not in text
    records = [line for line in text.splitlines() if " - INFO - " in line]
    assert records and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) for line in records), records
    progress = [line.split(" - INFO - ")[1] for line in records if " - gazemonai.train.handlers - " in line]
    assert any(re.fullmatch(r"train epoch 2/2: iteration (\d+)/\1", p) for p in progress), progress
    assert any(re.fullmatch(r"evaluate val epoch \d+: iteration (\d+)/\1", p) for p in progress), progress
