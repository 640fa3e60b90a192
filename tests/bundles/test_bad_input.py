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
}


def _config(kind):
    return {
        "train": str(KVASIR / "train.json"),
        "paper": [str(KVASIR / "train.json"), str(KVASIR / "paper_profile.json")],
        "evaluate": [str(KVASIR / "train.json"), str(KVASIR / "evaluate.json")],
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
