"""`gazemonai report`: the pictures of a run and one self-contained HTML page."""

import json
import re
import shutil

import numpy as np
import pytest
from helpers import ROOT, TRAINED, bundle, cli
from PIL import Image

from gazemonai.gaze.fixations import ImageFixations
from gazemonai.report import Sample, sample_figure

KVASIR = ROOT / "bundles" / "kvasir_gaze"


def test_a_sample_figure_puts_each_fixation_where_it_was_looked_at():
    image = np.zeros((40, 80, 3), np.uint8)
    fx = ImageFixations("a.png", np.array([[0.25, 0.5], [0.75, 0.1]]), np.array([100.0, 300.0]), 40, 80)
    levels = np.zeros((2, 40, 80), np.uint8)
    levels[:, 10:30, 10:30] = 1
    sample = Sample("a", image, fx, np.zeros((40, 80)), np.zeros((40, 80)), levels, levels[0], levels[1])
    fig = sample_figure(sample)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["2 fixations, 0.4 s", "gaze heatmap", "CRF-refined", "pseudo-mask 1", "pseudo-mask 2",
                      "prediction", "ground truth"]  # fmt: skip
    circles = fig.axes[0].collections[0]
    assert np.allclose(circles.get_offsets(), [[20.0, 20.0], [60.0, 4.0]])  # x * width, y * height
    sizes = circles.get_sizes()
    assert sizes[1] == pytest.approx(400.0) and sizes[0] == pytest.approx(40 + 360 / 3)  # area by duration


def test_report_of_a_trained_run(trained_kvasir, synthetic_root, tmp_path):
    ref = tmp_path / "eval"
    (ref / "models").mkdir(parents=True)
    shutil.copy(trained_kvasir / "models" / "model.pt", ref / "models" / "model.pt")
    configs = f"['{KVASIR / 'configs' / 'train.json'}','{KVASIR / 'configs' / 'evaluate.json'}']"
    bundle("--config_file", configs, "--bundle_root", ref, "--dataset_dir", synthetic_root,
           "--eval_split", "train.txt", *TRAINED)  # fmt: skip
    metrics = ref / "outputs" / "metrics_train.json"
    evaluation = json.loads(metrics.read_text())
    out = tmp_path / "report"
    p = cli("report", "--dataset-dir", synthetic_root, "--gaze-csv", synthetic_root / "gaze.csv",
            "--run-dir", trained_kvasir, "--bundle-dir", KVASIR, "--metrics", metrics,
            "--samples", 3, "--out", out)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    # the samples span the evaluation's Dice range: worst, middle, best
    ranked = sorted(evaluation["per_image"], key=lambda r: r["ensemble"]["dice"])
    assert result["samples"][0] == ranked[0]["id"] and result["samples"][-1] == ranked[-1]["id"]
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert names == sorted(["curves.png", "dice.png", *(f"samples/{i}.png" for i in result["samples"])])
    for name in names:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 200
    page = (out / "report.html").read_text()
    sources = re.findall(r"<img src='([^']*)'", page)
    assert len(sources) == len(names) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert f"{evaluation['mean']['ensemble']['dice']:.4f}" in page  # the mean Dice table
    # the prediction's Dice in each caption is the evaluation's (the same network, data and metric)
    by_id = {r["id"]: r["ensemble"]["dice"] for r in evaluation["per_image"]}
    for image_id in result["samples"]:
        caption = re.search(rf"<figcaption>{image_id}[^<]*prediction Dice ([0-9.]+)", page)
        assert caption and float(caption.group(1)) == pytest.approx(by_id[image_id], abs=1e-3)


def test_report_names_what_is_wrong(synthetic_root, tmp_path):
    p = cli("report", "--dataset-dir", tmp_path, "--out", tmp_path / "r")
    assert p.returncode == 2 and "images" in p.stderr
    p = cli("report", "--dataset-dir", synthetic_root, "--out", tmp_path / "r", "--ids", "[nope]")
    assert p.returncode == 2 and "nope" in p.stderr
    (tmp_path / "bad.json").write_text("{}")
    bad = tmp_path / "bad.json"
    p = cli("report", "--dataset-dir", synthetic_root, "--out", tmp_path / "r", "--metrics", bad)
    assert p.returncode == 2 and "bad.json" in p.stderr
