"""What both bundles' configs share: valid metadata, and every name they refer to exists."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

CONFIGS = sorted((ROOT / "bundles").glob("*/configs/*.json"))


@pytest.mark.parametrize("name", ["kvasir_gaze", "prostate_gaze"])
def test_metadata_is_valid_against_shipped_schema(name):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            str(ROOT / "bundles" / name / "configs" / "metadata.json"),
            "--filepath",
            str(ROOT / "bundles" / "schema" / "meta_schema.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


#: metadata.json keys the MONAI bundle specification (docs/source/mb_specification.rst) makes mandatory
SPEC_KEYS = {
    "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
    "description", "authors", "copyright", "network_data_format",
}  # fmt: skip
TENSOR_KEYS = {
    "type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
    "channel_def",
}  # fmt: skip


@pytest.mark.parametrize("name", ["kvasir_gaze", "prostate_gaze"])
def test_metadata_has_what_the_current_bundle_spec_asks(name):
    import gazemonai

    meta = json.loads((ROOT / "bundles" / name / "configs" / "metadata.json").read_text())
    assert SPEC_KEYS <= meta.keys(), SPEC_KEYS - meta.keys()
    assert meta["version"] in meta["changelog"]  # the current version says what changed
    assert meta["required_packages_version"]["gazemonai"] == gazemonai.__version__
    for kind, tensors in meta["network_data_format"].items():
        for tensor in tensors.values():
            assert TENSOR_KEYS <= tensor.keys(), (kind, TENSOR_KEYS - tensor.keys())
            # "[MIN, MAX]" or "[]" if not known: logits (and z-scored images) have no bounds
            assert tensor["value_range"] == [] or len(tensor["value_range"]) == 2
    assert meta["network_data_format"]["outputs"]["pred"]["value_range"] == []
    # the figures are the measured ones the bundle's README reports
    readme = (ROOT / "bundles" / name / "docs" / "README.md").read_text()
    figures = [f"{v:.3f}".rstrip("0") for v in meta["eval_metrics"].values()]
    assert figures and all(f in readme for f in figures), figures


#: the packages the configs import (their ``_target_``s and ``$import``s), as pip names them
CONFIG_PACKAGES = {
    "gazemonai", "pytorch-ignite", "mlflow", "pydensecrf2", "pillow", "itk", "nibabel", "onnxruntime",
}  # fmt: skip


@pytest.mark.parametrize("name", ["kvasir_gaze", "prostate_gaze"])
def test_monai_reads_the_requirements_the_configs_need(name):
    """What MONAI's ConfigParser.read_meta (and the executed config MLflow keeps) sees as requirements."""
    from monai.bundle import ConfigParser

    import gazemonai

    parser = ConfigParser()
    parser.read_meta(str(ROOT / "bundles" / name / "configs" / "metadata.json"))
    meta = parser.get("_meta_")
    assert "optional_packages_version" not in meta  # deprecated: read_meta would replace the list with it
    required = meta["required_packages_version"]
    assert set(required) == CONFIG_PACKAGES
    assert required["gazemonai"] == gazemonai.__version__
    assert all(re.fullmatch(r"\d+(\.\d+)+", v) for v in required.values()), required
    configs = " ".join(p.read_text() for p in (ROOT / "bundles" / name / "configs").glob("*.json"))
    for module in ("gazemonai", "ignite", "OnnxNetwork"):  # imported by the configs, listed above
        assert module in configs


def _strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from ((k, x) for x in [v] if isinstance(v, str))
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, str):
                yield (None, v)
            yield from _strings(v)


def _resolve(dotted: str):
    """The object a dotted name such as ``gazemonai.train.networks.MultiLevelNet`` names."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parts[-3]}/{p.name}")
def test_every_name_a_config_refers_to_exists(config):
    """Every ``_target_``, ``$import`` and ``gazemonai.…`` name in the configs resolves (moves stay wired)."""
    from monai.bundle.config_item import ComponentLocator

    locator = ComponentLocator()
    names = 0
    for key, value in _strings(json.loads(config.read_text())):
        if key == "_target_":
            names += 1
            if "." in value:
                assert callable(_resolve(value)), value
            else:
                assert locator.get_component_module_name(value), (
                    f"{config.name}: unknown MONAI component {value}"
                )
        elif value.startswith("$import "):
            importlib.import_module(value.split()[1])
        for dotted in re.findall(r"\bgazemonai(?:\.\w+)+", value if value.startswith("$") else ""):
            names += 1
            _resolve(dotted)
    assert names or config.name in (
        "metadata.json",
        "low_memory.json",
        "paper_profile.json",
        "inference_torchscript.json",
        "gpu.json",
    )


#: a Python in which gazemonai cannot be imported, as on a machine with MONAI and not the package: the
#: venv's site-packages without its .pth files (-S), so the editable install's finder is not there
SITE = "import runpy, sys; sys.path.append(sys.argv.pop(1))\n"
MONAI_BUNDLE = SITE + "sys.argv[0] = 'monai.bundle'; runpy.run_module('monai.bundle', run_name='__main__')"


@pytest.mark.parametrize(
    "name, configs",
    [
        ("kvasir_gaze", ["train.json"]),
        ("kvasir_gaze", ["train.json", "evaluate.json"]),
        ("prostate_gaze", ["inference.json"]),
    ],
)
def test_a_bundle_folder_without_the_package_says_what_to_install(name, configs, tmp_path):
    import shutil

    folder = tmp_path / name
    shutil.copytree(ROOT / "bundles" / name, folder)
    files = ",".join(f"'configs/{c}'" for c in configs)
    import monai

    site = str(Path(monai.__file__).parents[1])
    python = [sys.executable, "-I", "-S", "-c"]
    check = subprocess.run([*python, SITE + "import monai, gazemonai", site], capture_output=True, text=True)
    assert "No module named 'gazemonai'" in check.stderr, check.stderr[-2000:]  # MONAI is there, we are not
    proc = subprocess.run(
        [*python, MONAI_BUNDLE, site, "run", "--config_file", f"[{files}]"],
        cwd=folder, capture_output=True, text=True,
    )  # fmt: skip
    version = json.loads((folder / "configs" / "metadata.json").read_text())["required_packages_version"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{name} needs the Python package gazemonai {version['gazemonai']}"), last
    assert f"pip install gazemonai=={version['gazemonai']}" in last
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("name", ["kvasir_gaze", "prostate_gaze"])
def test_validation_reads_no_gaze(name, synthetic_root, tmp_path):
    """Validation scores against masks: a validation image without gaze does not stop the training, and
    no heatmap or CRF is computed for validation images (issue #26)."""
    import csv

    from monai.bundle import ConfigParser

    from gazemonai.train.datalists import split_datalist

    val_ids = {item["id"] for item in split_datalist(synthetic_root, "val", None, 0.5, 0)}
    rows = list(csv.DictReader(open(synthetic_root / "gaze.csv", newline="")))
    gaze = tmp_path / "gaze.csv"
    with open(gaze, "w", newline="") as f:  # the validation images' fixations removed
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["IMAGE"].rsplit(".", 1)[0] not in val_ids)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / name / "configs" / "train.json"))
    data = {"dataset_dir": str(synthetic_root), "gaze_csv": str(gaze)}
    parser.update({**data, "val_fraction": 0.5, "val_group": None, "batch_size": 1})
    items = parser.get_parsed_content("validate#datalist")
    assert {item["id"] for item in items} == val_ids and val_ids
    assert all("fixations" not in item for item in items)  # GazeHeatmapd and the CRF skip them
    assert all(len(item["fixations"]) for item in parser.get_parsed_content("train#datalist"))


@pytest.mark.parametrize("name", ["kvasir_gaze", "prostate_gaze"])
def test_inference_writes_each_mask_as_a_0_255_png_named_after_its_image(name, tmp_path):
    """inference.json's last step (MONAI's SaveImaged): OUTPUT_DIR/<stem>.png, 8-bit 0/255, rows = y,
    at the prediction's size (the input image's, after Invertd); nothing else written."""
    import numpy as np
    import torch
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor
    from PIL import Image

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / name / "configs" / "inference.json"))
    parser["bundle_root"], parser["output_dir"] = str(tmp_path), str(tmp_path / "out")
    save = parser.get_parsed_content("postprocessing").transforms[-1]
    mask = torch.zeros(1, 3, 5)  # 3 rows, 5 columns: a transposed file would be 5 x 3
    mask[0, 1, 4] = 1
    meta = {"filename_or_obj": "/data/images/case_7.jpg"}
    save({"pred": MetaTensor(mask, meta=meta), "image": MetaTensor(torch.zeros(3, 3, 5), meta=meta)})
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["case_7.png"]
    with Image.open(tmp_path / "out" / "case_7.png") as im:
        assert im.mode == "L"
        written = np.asarray(im)
    assert written.shape == (3, 5) and written[1, 4] == 255 and written.sum() == 255


@pytest.mark.parametrize("name", ["kvasir_gaze", "prostate_gaze"])
def test_the_checkpoints_are_monai_s_own_handlers(name, synthetic_root, tmp_path):
    """model.pt is MONAI's CheckpointSaver's, configured as the zoo's bundles do; a run with a latest.pt
    resumes through MONAI's CheckpointLoader, the trainer's place in its save_dict (#25 item 10)."""
    from monai.bundle import ConfigParser
    from monai.handlers import CheckpointLoader, CheckpointSaver

    def parsed(key):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundles" / name / "configs" / "train.json"))
        parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(synthetic_root), "val_group": None,
                       "gaze_csv": str(synthetic_root / "gaze.csv"), "val_fraction": 0.5, "batch_size": 1,
                       "train#dataset#cache_rate": 0.0, "validate#dataset#cache_rate": 0.0})  # fmt: skip
        return parser, parser.get_parsed_content(key)

    parser, saver = parsed("validate#best_model")
    assert isinstance(saver, CheckpointSaver)
    assert parser["validate#best_model"]["key_metric_filename"] == "model.pt"
    assert not any(isinstance(h, CheckpointLoader) for h in parsed("train#handlers")[1])  # nothing to resume
    (tmp_path / "models" / "latest.pt").write_bytes(b"")  # the saver's DiskSaver made the folder
    (loader,) = [h for h in parsed("train#handlers")[1] if isinstance(h, CheckpointLoader)]
    assert loader.load_path == f"{tmp_path}/models/latest.pt"
    assert list(loader.load_dict) == ["model", "optimizer", "lr_scheduler", "best", "trainer", "random"]
