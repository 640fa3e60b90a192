"""Stopping and restarting a bundle run as users do: kill -9 mid-epoch, a longer --epochs, torchrun."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from helpers import ROOT, bundle, mlflow_runs, torchrun

from gazemonai.train.checkpoints import model_weights

CONFIGS = ROOT / "bundles" / "kvasir_gaze" / "configs"
TRAIN = str(CONFIGS / "train.json")
SMALL = ["--image_size", "[32,32]", "--batch_size", "1", "--cache_workers", "1", "--val_fraction", "0.34"]


def _common(root, data):
    return ["--bundle_root", root, "--dataset_dir", data, "--gaze_csv", data / "gaze.csv", *SMALL]


def _histories(root):
    """Every metric's (step, value) history of the bundle's training run."""
    from mlflow.tracking import MlflowClient

    run = [
        r
        for r in mlflow_runs(root / "outputs" / "mlruns.db", "kvasir_gaze")
        if "val_mean_dice" in r.data.metrics
    ]
    assert len(run) == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'outputs' / 'mlruns.db'}")
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run[0].info.run_id, k))
        for k in run[0].data.metrics
    }


def _weights(path):
    return model_weights(torch.load(path, weights_only=True))  # model.pt: bare; latest.pt: {"model": ...}


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_mid_epoch_and_resumed_equals_never_interrupted(synthetic_root, tmp_path, workers):
    """SIGKILL in epoch 2 of 3, then the same command again: the same weights, metrics and MLflow history."""
    common = ["--epochs", 3, "--num_workers", workers]
    bundle("--config_file", TRAIN, *_common(tmp_path / "whole", synthetic_root), *common)
    kill = tmp_path / "kill.json"  # the process kills itself with SIGKILL after iteration 5 (epoch 2 of 3)
    kill.write_text(json.dumps({"run": [
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once=5), "
        "lambda e: os.kill(os.getpid(), 9))", "$@train#trainer.run()"]}))  # fmt: skip
    killed = tmp_path / "killed"
    p = bundle("--config_file", f"['{TRAIN}','{kill}']", *_common(killed, synthetic_root), *common, ok=False)
    assert p.returncode == -9, p.stderr[-2000:]
    assert torch.load(killed / "models" / "latest.pt", weights_only=True)["trainer"]["epoch"] == 1
    log = bundle("--config_file", TRAIN, *_common(killed, synthetic_root), *common).stdout
    assert "resumed from" in log and "at epoch 1" in log
    for name in ("model.pt", "latest.pt"):
        whole, resumed = _weights(tmp_path / "whole" / "models" / name), _weights(killed / "models" / name)
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), name
    whole, resumed = _histories(tmp_path / "whole"), _histories(killed)
    assert resumed == whole  # every metric, step and value; no step twice
    assert all(n == 1 for h in resumed.values() for n in Counter(step for step, _ in h).values())


def _crafted(path, marker):
    """A checkpoint whose unpickling would run code (it creates ``marker``), made in another process."""
    script = (
        "import torch\n"
        "class P:\n"
        "    def __reduce__(self):\n"
        f"        return (open, ({str(marker)!r}, 'w'))\n"
        f"torch.save({{'model': P(), 'x': P()}}, {str(path)!r})\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", script], check=True)


def test_a_crafted_latest_checkpoint_is_refused_before_it_runs(synthetic_root, tmp_path):
    marker = tmp_path / "code_ran"
    _crafted(tmp_path / "run" / "models" / "latest.pt", marker)
    common = [*_common(tmp_path / "run", synthetic_root), "--epochs", 1, "--num_workers", 0]
    p = bundle("--config_file", TRAIN, *common, ok=False)
    log = p.stdout + p.stderr
    assert p.returncode != 0 and "cannot read checkpoint" in log and "latest.pt as weights" in log
    assert not marker.exists()


def test_torchrun_resumes_on_every_rank_and_a_single_process_resumes_it(synthetic_root, tmp_path):
    """latest.pt is written by rank 0 without DDP's ``module.`` prefix and loaded by every rank."""
    root = tmp_path / "ddp"
    files = f"['{TRAIN}','{CONFIGS / 'multi_gpu_train.json'}']"

    def train(epochs):
        cmd = [*torchrun(), "-m", "monai.bundle",
               "run", "--config_file", files, "--features", "[8,8,16,16,32,8]",
               *map(str, _common(root, synthetic_root)), "--val_fraction", "0.5", "--epochs", str(epochs),
               "--num_workers", "0"]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    train(1)
    log = train(2)
    assert log.count("resumed from") == 2 and log.count("at epoch 1") == 2  # both ranks
    ckpt = torch.load(root / "models" / "latest.pt", weights_only=True)
    assert ckpt["trainer"]["epoch"] == 2 and not any(k.startswith("module.") for k in ckpt["model"])
    assert len(ckpt["random"]) == 2  # each rank's random streams
    p = bundle("--config_file", TRAIN, "--features", "[8,8,16,16,32,8]", *_common(root, synthetic_root),
               "--val_fraction", "0.5", "--epochs", 3, "--num_workers", 0)  # fmt: skip
    log = p.stdout + p.stderr
    assert "resumed from" in log and "at epoch 2" in log and "random streams restart" in log
    assert torch.load(root / "models" / "latest.pt", weights_only=True)["trainer"]["epoch"] == 3


@pytest.mark.parametrize("config", ["evaluate", "inference"])
def test_a_crafted_or_foreign_model_is_refused_by_evaluation_and_inference(synthetic_root, tmp_path, config):
    marker = tmp_path / "code_ran"
    _crafted(tmp_path / "run" / "models" / "model.pt", marker)
    files = (
        f"['{TRAIN}','{CONFIGS / 'evaluate.json'}']"
        if config == "evaluate"
        else str(CONFIGS / "inference.json")
    )
    args = ["--bundle_root", tmp_path / "run", "--image_size", "[32,32]"]
    data = (
        ["--dataset_dir", synthetic_root]
        if config == "evaluate"
        else ["--dataset_dir", synthetic_root / "images"]
    )
    p = bundle("--config_file", files, *args, *data, "--output_dir", tmp_path / "out", ok=False)
    log = p.stdout + p.stderr
    assert p.returncode != 0 and "cannot read checkpoint" in log and "model.pt as weights" in log, log[-2000:]
    assert not marker.exists()
    torch.save({"model": torch.nn.Linear(2, 1).state_dict()}, tmp_path / "run" / "models" / "model.pt")
    p = bundle("--config_file", files, *args, *data, "--output_dir", tmp_path / "out", ok=False)
    log = p.stdout + p.stderr
    assert p.returncode != 0 and "model.pt does not fit the network the configs build" in log, log[-2000:]


def test_a_second_training_into_the_same_bundle_root_is_refused(synthetic_root, tmp_path):
    from gazemonai.prep.io import exclusive_folder

    (tmp_path / "run" / "models").mkdir(parents=True)
    with exclusive_folder(tmp_path / "run" / "models", "training", "--bundle_root"):  # as a running training
        p = bundle("--config_file", TRAIN, *_common(tmp_path / "run", synthetic_root), "--epochs", 1,
                   "--num_workers", 0, ok=False)  # fmt: skip
    log = p.stdout + p.stderr
    assert p.returncode != 0 and "models is being written by another training" in log, log[-2000:]
    assert not (tmp_path / "run" / "models" / "latest.pt").exists()


def test_a_resume_with_another_batch_size_is_refused_naming_both_values(synthetic_root, tmp_path):
    """latest.pt of a --batch_size 1 run, resumed with --batch_size 2: refused, nothing written (#26)."""
    root = tmp_path / "run"
    bundle("--config_file", TRAIN, *_common(root, synthetic_root), "--epochs", 1, "--num_workers", 0)
    before = (root / "models" / "latest.pt").read_bytes()
    p = bundle("--config_file", TRAIN, *_common(root, synthetic_root), "--epochs", 2, "--num_workers", 0,
               "--batch_size", 2, ok=False)  # fmt: skip
    log = p.stdout + p.stderr
    assert p.returncode != 0, log[-2000:]
    assert "cannot resume from" in log and "--batch_size is 2 but was 1" in log, log[-2000:]
    assert (root / "models" / "latest.pt").read_bytes() == before
    # the same settings still resume
    log = bundle("--config_file", TRAIN, *_common(root, synthetic_root), "--epochs", 2, "--num_workers", 0)
    assert "resumed from" in log.stdout + log.stderr
    assert torch.load(root / "models" / "latest.pt", weights_only=True)["trainer"]["epoch"] == 2
