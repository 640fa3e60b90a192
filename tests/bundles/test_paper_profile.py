"""paper_profile.json is GazeSup's recipe: read back from the resolved config, and run for real.

GazeSup (med-air/GazeMedSeg): Kvasir-SEG images ``Normalize(ImageNet mean, std)(x / 255)``, NCI-ISBI
slices ``NormalizeIntensityd`` (z-score); the stored refined maps resized bilinearly and thresholded
after; ``--max_ite 15000`` iterations.
"""

import pytest
import torch
from helpers import ROOT, bundle, configs, mlflow_runs
from monai.bundle import ConfigParser

from gazemonai.gaze.transforms import PseudoMaskLevelsd
from gazemonai.train.handlers import IterationLimit
from gazemonai.train.transforms import NormalizeImaged

NAMES = ["kvasir_gaze", "prostate_gaze"]


def _parser(name: str, *files: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "bundles" / name / "configs" / f) for f in files])
    return parser


def _instance(transforms, cls):
    (found,) = [t for t in transforms if isinstance(t, cls)]
    return found


@pytest.mark.parametrize("name", NAMES)
def test_paper_profile_resolves_to_gazesups_preprocessing(name):
    paper = _parser(name, "train.json", "paper_profile.json")
    transforms = paper.get_parsed_content("gaze_transforms")
    norm = _instance(transforms, NormalizeImaged)
    pixel = torch.tensor([[[0.0, 255.0]], [[0.0, 255.0]], [[0.0, 255.0]]])
    if name == "kvasir_gaze":
        assert norm.mode == "imagenet"
        out = norm({"image": pixel})["image"]
        # red: (0 - 0.485) / 0.229, (1 - 0.485) / 0.229; blue: (0 - 0.406) / 0.225, (1 - 0.406) / 0.225
        assert torch.allclose(out[0, 0], torch.tensor([-2.117904, 2.248908]), atol=1e-5)
        assert torch.allclose(out[2, 0], torch.tensor([-1.804444, 2.640000]), atol=1e-5)
    else:  # GazeSup z-scores the one-channel MR slice (its RGB copy only feeds the CRF)
        assert norm.mode == "zscore" and paper["in_channels"] == 1
        out = norm({"image": torch.tensor([[[1.0, 3.0], [5.0, 7.0]]])})["image"]
        assert torch.allclose(out, torch.tensor([[[-3.0, -1.0], [1.0, 3.0]]]) / 5.0**0.5)
    levels = _instance(transforms, PseudoMaskLevelsd).levels
    assert levels.resize is not None and tuple(levels.resize.spatial_size) == (224, 224)
    assert levels.resize.mode == "bilinear" and not levels.resize.anti_aliasing
    # the CPU profile keeps its own: [0, 1] scaling (Kvasir) and masks thresholded at full size
    cpu = _parser(name, "train.json")
    cpu_transforms = cpu.get_parsed_content("gaze_transforms")
    assert _instance(cpu_transforms, NormalizeImaged).mode == ("unit" if name == "kvasir_gaze" else "zscore")
    assert _instance(cpu_transforms, PseudoMaskLevelsd).levels.resize is None
    # evaluation and inference normalise as the training did
    for files in (("train.json", "paper_profile.json", "evaluate.json"), ("inference.json",)):
        parser = _parser(name, *files)
        if files == ("inference.json",):
            parser["image_normalization"] = paper["image_normalization"]  # what staging carries over
        key = "validate#preprocessing" if "evaluate.json" in files else "preprocessing"
        assert _instance(parser.get_parsed_content(key).transforms, NormalizeImaged).mode == norm.mode


@pytest.mark.parametrize("name", NAMES)
def test_paper_profile_runs_exactly_15000_iterations(name):
    """810 Kvasir-SEG training images at batch 8 are 101 batches: 149 epochs run, the last cut to 52 (one
    spare epoch in ``epochs`` for a resume with a larger ``iterations`` after a cut epoch)."""
    parser = _parser(name, "train.json", "paper_profile.json")
    parser["train#dataloader"] = list(range(101))  # 101 batches per epoch, as the seed-0 split gives
    assert parser.get_parsed_content("iterations") == 15000
    assert parser.get_parsed_content("epochs") == 150  # 148 x 101 = 14 948 < 15 000 <= 149 x 101, + 1
    assert parser.get_parsed_content("train#lr_scheduler#T_max") == 15000  # cosine ends at the last step
    assert parser.get_parsed_content("train#lr_scheduler#eta_min") == 1e-4
    (index,) = [
        i
        for i, h in enumerate(parser["train#handlers"])
        if isinstance(h, dict) and h.get("_target_", "").endswith(".IterationLimit")  # also "@..." entries
    ]
    limit = parser.get_parsed_content(f"train#handlers#{index}")
    assert isinstance(limit, IterationLimit)
    assert limit.max_iterations == 15000
    cpu = _parser(name, "train.json")
    assert cpu["iterations"] is None and cpu["epochs"] == 60
    cpu["train#dataloader"] = list(range(101))
    assert cpu.get_parsed_content("train#lr_scheduler#T_max") == 60 * 101  # the CPU profile counts epochs
    cpu = _parser(name, "train.json")
    cpu["train#dataloader"], cpu["iterations"] = list(range(101)), 500
    assert cpu.get_parsed_content("train#lr_scheduler#T_max") == 500  # --iterations: the cosine ends there


def test_iteration_limit_cuts_the_last_epoch_validates_it_and_resumes(synthetic_root, tmp_path):
    """4 training images at batch 1: --iterations 6 is one epoch and a cut one of 2; the cut epoch is
    validated and saved, the learning rate ends at eta_min, a rerun stops at once, and a longer
    --iterations goes on to exactly that count."""
    out = tmp_path / "run"
    args = ["--config_file", configs("kvasir_gaze", "train.json", "paper_profile.json"), "--bundle_root", out,
            "--dataset_dir", synthetic_root, "--gaze_csv", synthetic_root / "gaze.csv",
            "--val_fraction", "0.34",
            "--features", "[8,8,16,16,32,8]", "--image_size", "[32,32]", "--batch_size", "1",
            "--num_workers", "0", "--cache_workers", "1"]  # fmt: skip
    bundle(*args, "--iterations", 6)
    ckpt = torch.load(out / "models" / "latest.pt", weights_only=True)
    assert (ckpt["trainer"]["epoch"], ckpt["trainer"]["iteration"]) == (2, 6)
    assert ckpt["lr_scheduler"]["last_epoch"] == 6 and ckpt["lr_scheduler"]["T_max"] == 6
    assert abs(ckpt["lr_scheduler"]["_last_lr"][0] - 1e-4) < 1e-12  # the cosine's end, at the last step
    (run,) = [
        r
        for r in mlflow_runs(out / "outputs" / "mlruns.db", "kvasir_gaze")
        if "val_mean_dice" in r.data.metrics
    ]
    assert run.data.params["iterations"] == "6" and run.data.params["epochs"] == "3"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'outputs' / 'mlruns.db'}")
    history = client.get_metric_history(run.info.run_id, "val_mean_dice")
    assert sorted(m.step for m in history) == [1, 2]  # the cut epoch was validated too
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert len([m for m in losses if m.step <= 6]) >= 6

    rerun = bundle(*args, "--iterations", 6)  # complete: nothing trains, the checkpoint stays
    assert "training already complete" in rerun.stdout + rerun.stderr
    trainer = torch.load(out / "models" / "latest.pt", weights_only=True)["trainer"]
    assert (trainer["epoch"], trainer["iteration"]) == (2, 6)

    bundle(*args, "--iterations", 9)  # longer: epoch 3 starts at iteration 7 and is cut after 3 of its 4
    ckpt = torch.load(out / "models" / "latest.pt", weights_only=True)
    assert (ckpt["trainer"]["epoch"], ckpt["trainer"]["iteration"]) == (3, 9)
    assert abs(ckpt["lr_scheduler"]["_last_lr"][0] - 1e-4) < 1e-12  # the schedule was stretched to 9
