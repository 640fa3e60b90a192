"""Bad settings and files given to the bundles: one line naming the setting, exit 2, nothing lost.

Each case runs the bundle as ``python -m monai.bundle run`` does (MONAI's ``run`` in this process,
and one case in a real subprocess for the exit status), against a run folder that holds a finished
training, which must come out untouched.
"""

import pytest
from helpers import ROOT, bundle

KVASIR = ROOT / "bundles" / "kvasir_gaze" / "configs"
PROSTATE = ROOT / "bundles" / "prostate_gaze" / "configs"

BAD_SETTINGS = {
    # what is wrong: (config file, overrides, the words of the message)
    "image size with a 0": (
        "train",
        {"image_size": [0, 64]},
        "image_size must be 2 integers >= 1 (height, width), got [0, 64]",
    ),
    "a 3-D image size": ("train", {"image_size": [32, 48, 999]}, "image_size must be 2 integers"),
    "image size of one number": (
        "train",
        {"image_size": [64]},
        "image_size must be 2 integers >= 1 (height, width)",
    ),
    "image size not numbers": (
        "train",
        {"image_size": "big"},
        "image_size must be 2 integers >= 1 (height, width)",
    ),
    "threshold above 1": (
        "train",
        {"thresholds": [0.5, 1.5]},
        "thresholds must be a list of numbers in (0, 1]",
    ),
    "no thresholds": ("train", {"thresholds": []}, "thresholds must be a list of numbers in (0, 1]"),
    "batch of 0": ("train", {"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    "no epochs": ("train", {"epochs": 0}, "epochs must be an integer >= 1, got 0"),
    "negative learning rate": ("train", {"learning_rate": -0.01}, "learning_rate must be a number > 0"),
    "validation fraction 1": ("train", {"val_fraction": 1.0}, "val_fraction must be a number in (0, 1)"),
    "negative workers": ("train", {"num_workers": -1}, "num_workers must be an integer >= 0"),
    "three widths": ("train", {"features": [8, 8, 8]}, "features must be 6 integers >= 1"),
    "unknown supervision": ("train", {"supervision": "boxes"}, "supervision must be one of 'gaze', 'full'"),
    "unknown consistency": ("train", {"consistency": "mean"}, "consistency must be one of"),
    "unknown dtype": ("train", {"compute_dtype": "bf16"}, "compute_dtype must be one of 'bfloat16'"),
    "unknown training step": (
        "train",
        {"train_step": "sideways"},
        "train_step must be one of 'joint', 'levelwise'",
    ),
    "CRF resolution 4": ("train", {"crf_max_side": 4}, "crf_max_side must be an integer >= 16"),
    "sigma 0": ("train", {"gaze_sigma": 0}, "gaze_sigma must be a number > 0"),
    "step in backward 'yes'": (
        "train",
        {"step_in_backward": "yes"},
        "step_in_backward must be true or false",
    ),
    "dataset folder missing": (
        "train",
        {"dataset_dir": "/no/such/folder"},
        "dataset_dir '/no/such/folder' is not a folder",
    ),
    "gaze CSV missing": ("train", {"gaze_csv": "/no/gaze.csv"}, "gaze_csv '/no/gaze.csv' does not exist"),
    "paper profile with 0 iterations": ("paper", {"iterations": 0}, "iterations must be an integer >= 1"),
    "evaluation image size": (
        "evaluate",
        {"image_size": [-1, 64]},
        "image_size must be 2 integers >= 1 (height, width)",
    ),
    "inference image size": (
        "inference",
        {"image_size": [0, 1]},
        "image_size must be 2 integers >= 1 (height, width)",
    ),
    "inference folder missing": (
        "inference",
        {"dataset_dir": "/no/images"},
        "dataset_dir '/no/images' is not a folder",
    ),
    "inference widths": ("inference", {"features": [8, 8]}, "features must be 6 integers"),
    "prostate channels 0": ("prostate", {"in_channels": 0}, "in_channels must be an integer >= 1, got 0"),
    "prostate thresholds": (
        "prostate",
        {"thresholds": [0.2, 0]},
        "thresholds must be a list of numbers in (0, 1]",
    ),
    # sizes no machine holds (#26 kind 3): refused at once, naming the bound, not grown until killed
    "a sigma wider than ten canvases": ("train", {"gaze_sigma": 1e12}, "gaze_sigma must be <= 7680"),
    "an image size no memory holds": (
        "train",
        {"image_size": [100000, 100000]},
        "image_size [100000, 100000] needs at least 10.2 TiB for the first layer of one step (batch_size 8",
    ),
    "an inference image size no memory holds": (
        "inference",
        {"image_size": [200000, 200000]},
        "image_size [200000, 200000] needs at least 5.1 TiB",
    ),
    "a hundred thousand loader workers": ("train", {"num_workers": 100000}, "num_workers must be <= "),
    "a hundred thousand cache workers": ("train", {"cache_workers": 100000}, "cache_workers must be <= "),
    # one line where a traceback came (#26 kind 4)
    "a non-square training size (the 90-degree rotations)": (
        "train",
        {"image_size": [32, 48]},
        "image_size must be square for training, got [32, 48]",
    ),
    "an evaluation split that is not there": (
        "evaluate",
        {"eval_split": "holdout"},
        "eval_split 'holdout': split file not found:",
    ),
    "an evaluation split that is not a name": ("evaluate", {"eval_split": 3}, "eval_split must be test, val"),
    "a NaN DII step": ("hybrid", {"dii_lr": float("nan")}, "dii_lr must be a number > 0, got nan"),
    "a NaN consistency weight": ("hybrid", {"dcr_weight": float("nan")}, "dcr_weight must be a number >= 0"),
    "a DII interval of 0": ("hybrid", {"dii_interval": 0}, "dii_interval must be an integer >= 1, got 0"),
    "a negative DCR ramp": ("hybrid", {"dcr_ramp_epochs": -1}, "dcr_ramp_epochs must be an integer >= 0"),
}


def _config(kind):
    return {
        "train": str(KVASIR / "train.json"),
        "paper": [str(KVASIR / "train.json"), str(KVASIR / "paper_profile.json")],
        "evaluate": [str(KVASIR / "train.json"), str(KVASIR / "evaluate.json")],
        "hybrid": [str(KVASIR / "train.json"), str(KVASIR / "hybrid.json")],
        "inference": str(KVASIR / "inference.json"),
        "prostate": str(PROSTATE / "train.json"),
    }[kind]


def _snapshot(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_root):
    root = tmp_path_factory.mktemp("finished") / "run"
    bundle("--config_file", _config("train"), "--bundle_root", root, "--dataset_dir", synthetic_root,
           "--gaze_csv", synthetic_root / "gaze.csv", "--epochs", 1, "--image_size", "[32,32]",
           "--batch_size", 2, "--num_workers", 0, "--cache_workers", 1, "--val_fraction", 0.34)  # fmt: skip
    return root, _snapshot(root)


@pytest.mark.parametrize("problem", list(BAD_SETTINGS))
def test_a_bad_setting_stops_the_bundle_before_any_work(finished_run, synthetic_root, problem, capsys):
    from monai.bundle import run

    root, before = finished_run
    kind, overrides, words = BAD_SETTINGS[problem]
    settings = {
        "bundle_root": str(root),
        "dataset_dir": str(synthetic_root),
        "gaze_csv": str(synthetic_root / "gaze.csv"),
    }
    if kind == "inference":
        settings = {"bundle_root": str(root), "dataset_dir": str(synthetic_root / "images")}
    settings.update(overrides)
    with pytest.raises(SystemExit) as exit_info:
        run(config_file=_config(kind), **settings)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1] == f"error: {err[-1][7:]}" and words in err[-1], err[-3:]
    assert _snapshot(root) == before  # the finished run's checkpoints and MLflow store are untouched


def test_the_exit_status_and_the_one_line_as_a_user_sees_them(finished_run, synthetic_root):
    root, before = finished_run
    p = bundle("--config_file", _config("train"), "--bundle_root", root, "--dataset_dir", synthetic_root,
               "--gaze_csv", synthetic_root / "gaze.csv", "--image_size", "[0,64]", ok=False)  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert (
        p.stderr.strip().splitlines()[-1]
        == "error: image_size must be 2 integers >= 1 (height, width), got [0, 64]"
    )
    assert _snapshot(root) == before


def test_a_missing_split_file_is_named(finished_run, synthetic_root):
    root, before = finished_run
    p = bundle("--config_file", _config("evaluate"), "--bundle_root", root, "--dataset_dir", synthetic_root,
               "--eval_split", "holdout.txt", "--image_size", "[32,32]", ok=False)  # fmt: skip
    assert p.returncode != 0 and "split file not found" in p.stderr and "holdout.txt" in p.stderr
    assert _snapshot(root) == before


def _modes(folder):
    """One image of each mode a folder of 'RGB' images may hold: gray, RGBA, palette, 16-bit gray."""
    import numpy as np
    from PIL import Image

    images = sorted((folder / "images").glob("*.png"))
    gray = np.asarray(Image.open(images[3]).convert("L"))
    Image.open(images[0]).convert("L").save(images[0])
    Image.open(images[1]).convert("RGBA").save(images[1])
    Image.open(images[2]).convert("P").save(images[2])
    Image.fromarray(gray.astype(np.uint16) * 257).save(images[3])
    return [Image.open(p).mode for p in images]


def test_images_of_other_modes_among_rgb_ones_train(synthetic_root, tmp_path):
    """They become 8-bit RGB as pseudo-masks reads them; MONAI's reader gave 1, 2, 3 or 4 channels."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    assert _modes(data)[:4] == ["L", "RGBA", "P", "I;16"]
    p = bundle("--config_file", _config("train"), "--bundle_root", tmp_path / "run", "--dataset_dir", data,
               "--gaze_csv", data / "gaze.csv", "--epochs", 1, "--image_size", "[32,32]", "--batch_size", 2,
               "--num_workers", 0, "--cache_workers", 1, "--val_fraction", 0.34,
               "--features", "[4,4,4,4,4,4]", ok=False)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "run" / "models" / "model.pt").is_file()


def test_a_truncated_jpeg_is_named_by_inference(synthetic_root, kvasir_checkpoint, tmp_path):
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    cut = images / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[:800])
    p = bundle("--config_file", _config("inference"), "--bundle_root", kvasir_checkpoint.parents[1],
               "--dataset_dir", images, "--output_dir", tmp_path / "masks", ok=False)  # fmt: skip
    assert p.returncode != 0
    assert f"ImageReadError: cannot read image {cut}: image file is truncated" in p.stderr, p.stderr[-3000:]


def test_a_text_file_as_latest_pt_is_named(finished_run, synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "run"
    shutil.copytree(finished_run[0], root)
    (root / "models" / "latest.pt").write_text("epoch 3, loss 0.2\n")
    p = bundle("--config_file", _config("train"), "--bundle_root", root, "--dataset_dir", synthetic_root,
               "--gaze_csv", synthetic_root / "gaze.csv", "--epochs", 2, "--image_size", "[32,32]",
               "--batch_size", 2, "--num_workers", 0, "--cache_workers", 1, "--val_fraction", 0.34,
               ok=False)  # fmt: skip
    assert p.returncode != 0
    assert (
        f"CheckpointReadError: cannot read checkpoint {root / 'models' / 'latest.pt'} as weights" in p.stderr
    )


@pytest.mark.parametrize("setting", ["bundle_root", "dataset_dir", "gaze_csv"])
def test_a_path_with_a_hash_is_refused_not_rewritten(synthetic_root, tmp_path, setting):
    """MONAI's parser turns '#' in any config value into '::': the run refuses the path instead of
    writing into (or reading from) a folder the user never named (#26 kind 5)."""
    import shutil

    data = synthetic_root
    if setting != "bundle_root":
        data = tmp_path / "da#ta"
        shutil.copytree(synthetic_root, data)
    root = tmp_path / ("r#un" if setting == "bundle_root" else "run")
    p = bundle("--config_file", _config("train"), "--bundle_root", root, "--dataset_dir", data,
               "--gaze_csv", data / "gaze.csv", "--epochs", 1, "--image_size", "[32,32]", "--batch_size", 1,
               "--num_workers", 0, "--cache_workers", 1, "--val_fraction", 0.34, ok=False)  # fmt: skip
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith("error: ") and "'#'" in last, p.stderr[-2000:]
    assert last.split()[1] in ("bundle_root", "output_dir", "ckpt_dir", "dataset_dir", "gaze_csv")
    assert not any("::" in str(path) for path in tmp_path.rglob("*")), sorted(tmp_path.rglob("*"))
    assert not root.exists()  # nothing written anywhere


def test_inference_refuses_a_hash_in_its_paths(synthetic_root, kvasir_checkpoint, tmp_path):
    out = tmp_path / "ma#sks"
    p = bundle("--config_file", _config("inference"), "--bundle_root", kvasir_checkpoint.parent.parent,
               "--dataset_dir", synthetic_root / "images", "--output_dir", out, ok=False)  # fmt: skip
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last.startswith("error: output_dir") and "'#'" in last, p.stderr[-2000:]
    assert not any("::" in str(path) for path in tmp_path.rglob("*")) and not out.exists()
