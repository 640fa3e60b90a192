"""The GPU profile (issue #24): configs/gpu.json, the paper profile on CUDA, and the settings behind them.

No GPU here: the settings are resolved with ``device`` set to CUDA (nothing is put on it), and
gpu.json trains on CPU (bf16 autocast, channels-last), which is the same code path."""

import json

import pytest
import torch
from helpers import ROOT, bundle, mlflow_runs

NAMES = ["kvasir_gaze", "prostate_gaze"]
GPU_SETTINGS = (
    "compute_dtype", "amp", "num_workers", "cache_workers", "pin_memory", "non_blocking", "cudnn_benchmark",
    "checkpoint_interval", "mlflow_iteration_log", "features", "image_size",
    "train#dataloader#persistent_workers",
)  # fmt: skip


def _settings(name, files, device, **override):
    from monai.bundle import ConfigParser

    configs = ROOT / "bundles" / name / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / f) for f in files])
    parser.update({"device": f"$torch.device('{device}')", **override})
    parser.get_parsed_content("imports")
    present = [k for k in GPU_SETTINGS if parser.get(k) is not None]  # train.json: no persistent_workers
    return {k: parser.get_parsed_content(k) for k in present}, parser


@pytest.mark.parametrize("name", NAMES)
def test_the_paper_profile_on_cuda_is_the_gpu_profile(name):
    paper, _ = _settings(name, ["train.json", "paper_profile.json"], "cuda")
    gpu, _ = _settings(name, ["train.json", "gpu.json"], "cuda")
    assert paper == gpu
    assert paper["compute_dtype"] == "bfloat16" and paper["amp"] is False
    assert paper["pin_memory"] and paper["non_blocking"] and paper["train#dataloader#persistent_workers"]
    assert paper["num_workers"] == min(8, __import__("os").cpu_count())
    assert paper["checkpoint_interval"] == 1000 and paper["mlflow_iteration_log"] is False
    assert paper["features"] == [64, 128, 256, 512, 1024, 128] and paper["image_size"] == [224, 224]


@pytest.mark.parametrize("name", NAMES)
def test_cpu_keeps_its_profiles(name):
    paper, _ = _settings(name, ["train.json", "paper_profile.json"], "cpu")
    assert paper["compute_dtype"] == "float32" and paper["num_workers"] == 2
    assert not paper["pin_memory"] and not paper["non_blocking"]
    assert paper["checkpoint_interval"] is None and paper["mlflow_iteration_log"] is True
    plain, _ = _settings(name, ["train.json"], "cpu")
    assert plain["compute_dtype"] == "bfloat16" and plain["image_size"][0] < 224  # the CPU profile
    cuda, _ = _settings(name, ["train.json"], "cuda")  # the plain profile on CUDA: pinned, per-epoch MLflow
    assert cuda["pin_memory"] and cuda["non_blocking"] and cuda["mlflow_iteration_log"] is False


def test_channels_last_is_a_setting():
    _, parser = _settings(
        "kvasir_gaze", ["train.json"], "cpu", channels_last=True, features=[4, 4, 8, 8, 16, 4]
    )
    net = parser.get_parsed_content("network")
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)
    _, parser = _settings("kvasir_gaze", ["train.json"], "cpu", features=[4, 4, 8, 8, 16, 4])
    net = parser.get_parsed_content("network")
    assert not next(net.modules().__iter__().__next__().parameters()).is_contiguous(
        memory_format=torch.channels_last
    )


def test_gpu_json_trains_on_cpu_with_bf16_channels_last_and_per_epoch_logging(synthetic_root, tmp_path):
    configs = ROOT / "bundles" / "kvasir_gaze" / "configs"
    out = tmp_path / "bundle"
    files = json.dumps([str(configs / "train.json"), str(configs / "gpu.json")])
    p = bundle(
        "--config_file", files, "--bundle_root", out, "--dataset_dir", synthetic_root,
        "--gaze_csv", synthetic_root / "gaze.csv", "--val_fraction", "0.34", "--features", "[4,4,8,8,16,4]",
        "--image_size", "[32,32]", "--batch_size", "1", "--num_workers", "0", "--cache_workers", "1",
        "--epochs", "2", "--channels_last", "True", "--checkpoint_interval", "1000",
    )  # fmt: skip
    assert "Engine run finished" in p.stdout + p.stderr
    ckpt = torch.load(out / "models" / "latest.pt", weights_only=True)
    per_epoch = ckpt["trainer"]["iteration"] // 2
    assert ckpt["trainer"]["epoch"] == 2 and per_epoch >= 2  # saved once, at the end (1000 > the run)
    runs = mlflow_runs(out / "outputs" / "mlruns.db", "kvasir_gaze")
    run = [r for r in runs if "val_mean_dice" in r.data.metrics][0]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'outputs' / 'mlruns.db'}")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_total")]
    assert steps == [1, 2]  # the epoch means are logged ...
    assert "train_loss" not in run.data.metrics  # ... and no metric per iteration (train.json on CPU has it)
    assert run.data.params["channels_last"] == "True" and run.data.params["compute_dtype"] == "bfloat16"


def test_float16_without_a_scaler_is_refused_by_the_bundle(tmp_path):
    configs = ROOT / "bundles" / "kvasir_gaze" / "configs"
    p = bundle(
        "--config_file", json.dumps([str(configs / "train.json"), str(configs / "gpu.json")]),
        "--bundle_root", tmp_path, "--dataset_dir", tmp_path, "--compute_dtype", "float16", ok=False,
    )  # fmt: skip
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        "error: compute_dtype 'float16' needs a GradScaler: set amp true (--amp True, MONAI's "
        "SupervisedTrainer scales the loss; CUDA only) or use compute_dtype 'bfloat16', "
        "which needs no scaling"
    )
