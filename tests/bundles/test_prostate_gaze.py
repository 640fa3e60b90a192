"""The prostate_gaze bundle as a user runs it: volumes -> slices -> gaze -> train -> evaluate -> infer."""

import json

import numpy as np
from helpers import PROSTATE158, ROOT, bundle, need, run_module
from PIL import Image

from gazemonai.prep.slices import patient_of
from gazemonai.train.datalists import validation_split

CONFIGS = ROOT / "bundles" / "prostate_gaze" / "configs"
TRAIN = str(CONFIGS / "train.json")
EVALUATE = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']"
SMALL = ["--image_size", "[32,32]", "--batch_size", "4", "--num_workers", "0", "--cache_workers", "1"]


def test_prostate158_volumes_to_a_trained_evaluated_bundle(tmp_path):
    need(PROSTATE158 / "images")
    data, out = tmp_path / "slices", tmp_path / "bundle"
    run_module("gazemonai", "prepare-slices", "--out", data, "--nifti-images", PROSTATE158 / "images",
        "--nifti-masks", PROSTATE158 / "masks", "--test-patients", "020")  # fmt: skip
    run_module(
        "gazemonai", "simulate-gaze", "--masks", data / "masks", "--out", data / "gaze.csv", "--seed", 0
    )
    common = ["--bundle_root", out, "--dataset_dir", data, "--gaze_csv", data / "gaze.csv"]
    p = bundle("--config_file", TRAIN, *common, *SMALL, "--epochs", 2)
    log = p.stdout + p.stderr
    assert "val_dice_level_2" in log and (out / "models" / "model.pt").is_file()
    # patient-disjoint validation: the train and validation items of the run share no patient
    ids = (data / "train.txt").read_text().split()
    train, val = validation_split(ids, 0.34, 0, group="patient")
    assert {patient_of(i) for i in val} and {patient_of(i) for i in train}.isdisjoint(
        {patient_of(i) for i in val}
    )

    bundle("--config_file", EVALUATE, *common, *SMALL, "--eval_split", "test")
    report = json.loads((out / "outputs" / "metrics_test.json").read_text())
    assert report["images"] == 19 and {patient_of(r["id"]) for r in report["per_image"]} == {"020"}
    assert 0.0 <= report["mean"]["ensemble"]["dice"] <= 1.0

    bundle("--config_file", CONFIGS / "inference.json", "--bundle_root", out,
           "--dataset_dir", data / "images", "--output_dir", tmp_path / "pred",
           "--image_size", "[32,32]")  # fmt: skip
    written = sorted(p.name for p in (tmp_path / "pred").glob("*.png"))
    assert written == sorted(p.name for p in (data / "images").glob("*.png"))
    mask = np.asarray(Image.open(tmp_path / "pred" / "020_10.png"))
    assert mask.shape == np.asarray(Image.open(data / "images" / "020_10.png")).shape
