"""TorchScript and ONNX export of the bundles' networks: any size, the eager network's outputs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from helpers import ROOT, TRAINED, bundle, cli
from PIL import Image

from gazemonai.train.networks import MultiLevelNet

KVASIR = ROOT / "bundles" / "kvasir_gaze"
PROSTATE = ROOT / "bundles" / "prostate_gaze"


def test_the_network_pads_inside_so_eager_and_scripted_agree_at_any_size():
    """One network, one behaviour: 50x70 (not a multiple of 16) is padded the same way eager and scripted."""
    torch.manual_seed(0)
    for prompt in (None, [8, 8, 16, 16, 32]):
        net = MultiLevelNet(num_levels=2, features=[8, 8, 16, 16, 32, 8], prompt_features=prompt).eval()
        scripted = torch.jit.script(net)  # what the model zoo's ckpt_export does to network_def
        with torch.no_grad():
            odd = torch.rand(1, 3, 50, 70)
            padded = torch.nn.functional.pad(odd, (0, 10, 0, 14), mode="replicate")
            assert torch.equal(net(odd), net(padded)[..., :50, :70])  # pad inside, crop back
            for shape in [(1, 3, 50, 70), (3, 3, 17, 33), (1, 3, 64, 64)]:
                x = torch.rand(shape)
                assert torch.equal(scripted(x), net(x)), shape
            stack = net(odd, output="stack")
            assert stack.shape == (1, 3, 50, 70) and torch.equal(stack[:, :1], net(odd))
            train = net.train()(odd, output="train")
            assert all(t.shape == (1, 1, 50, 70) for t in [train["logits"], *train["prop_logits"]])


def test_the_model_zoo_ckpt_export_command_works_on_a_training_model_pt(tmp_path):
    """The zoo's command, as its users type it, on model.pt as the training's CheckpointSaver writes it."""
    from ignite.engine import Engine
    from monai.bundle import ConfigParser
    from monai.data import load_net_with_metadata
    from monai.handlers import CheckpointSaver

    folder = tmp_path / "kvasir_gaze"
    shutil.copytree(KVASIR / "configs", folder / "configs")
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    torch.manual_seed(2)
    net = parser.get_parsed_content("network_def").eval()
    evaluator = Engine(lambda e, b: None)
    evaluator.state.metrics, evaluator.state.key_metric_name = {"val_mean_dice": 0.5}, "val_mean_dice"
    train = json.loads((KVASIR / "configs" / "train.json").read_text())["validate"]["best_model"]
    assert train["_target_"] == "CheckpointSaver" and train["key_metric_filename"] == "model.pt"
    saver = CheckpointSaver(
        str(folder / "models"), {"model": net}, save_key_metric=True, key_metric_filename="model.pt"
    )
    saver.metrics_completed(evaluator)  # as a training saves it
    p = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", "models/model.ts",
         "--ckpt_file", "models/model.pt", "--meta_file", "configs/metadata.json",
         "--config_file", "configs/inference.json"],
        cwd=folder, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    ts, meta, _ = load_net_with_metadata(str(folder / "models" / "model.ts"))
    assert meta["version"] == json.loads((KVASIR / "configs" / "metadata.json").read_text())["version"]
    for shape in [(1, 3, 64, 64), (1, 3, 50, 70)]:
        x = torch.rand(shape)
        with torch.no_grad():
            assert torch.allclose(ts(x), net(x), atol=1e-5), shape


def test_export_writes_torchscript_and_onnx_that_match_the_network(trained_kvasir, tmp_path):
    from monai.data import load_net_with_metadata

    from gazemonai.serve.export import OnnxNetwork

    out = tmp_path / "models"
    ckpt = trained_kvasir / "models" / "model.pt"
    p = cli("export", "--bundle-dir", KVASIR, "--checkpoint", ckpt, "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Replaced initializer" not in p.stdout + p.stderr  # onnx_ir's ~130 INFO lines are not the user's
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for fmt, name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        assert results[fmt]["path"] == str(out / name)
        assert set(results[fmt]["max_abs_difference"]) == {"32x32", "50x70"}
        assert max(results[fmt]["max_abs_difference"].values()) <= 1e-4
    # the model-zoo TorchScript file: metadata and the inference config it was exported with inside
    ts, meta, extra = load_net_with_metadata(str(out / "model.ts"), more_extra_files=["inference.json"])
    assert meta["version"] == json.loads((KVASIR / "configs" / "metadata.json").read_text())["version"]
    inference = json.loads(extra["inference.json"])
    assert inference["image_size"] == [32, 32] and inference["features"] == [8, 8, 16, 16, 32, 8]  # recorded
    # both files take sizes they were not exported at, and agree
    onnx = OnnxNetwork(out / "model.onnx")
    for shape in [(1, 3, 37, 91), (3, 3, 128, 96)]:
        x = torch.rand(shape)
        with torch.no_grad():
            a, b = ts(x), onnx(x)
        assert a.shape == (shape[0], 1, *shape[2:]) and float((a - b).abs().max()) <= 1e-4


def test_inference_configs_run_the_exported_files_to_the_same_masks(trained_kvasir, synthetic_root, tmp_path):
    root = tmp_path / "bundle_root"
    (root / "models").mkdir(parents=True)
    for name in ("model.pt", "mlflow_run.json"):  # the checkpoint and the record of its training
        shutil.copy(trained_kvasir / "models" / name, root / "models" / name)
    models = root / "models"
    p = cli("export", "--bundle-dir", KVASIR, "--checkpoint", models / "model.pt", "--out", models)
    assert p.returncode == 0, p.stderr[-3000:]
    masks = {}
    overlays = {"pt": [], "ts": ["inference_torchscript.json"], "onnx": ["inference_onnx.json"]}
    for name, extra in overlays.items():
        configs = ",".join(f"'{KVASIR / 'configs' / f}'" for f in ["inference.json", *extra])
        bundle("--config_file", f"[{configs}]", "--bundle_root", root,
               "--dataset_dir", synthetic_root / "images", "--output_dir", tmp_path / name,
               *TRAINED)  # fmt: skip
        masks[name] = {f.name: np.asarray(Image.open(f)) for f in sorted((tmp_path / name).glob("*.png"))}
    assert len(masks["pt"]) == 6
    for name in ("ts", "onnx"):
        assert masks[name].keys() == masks["pt"].keys()
        for file, mask in masks["pt"].items():
            assert np.array_equal(masks[name][file], mask), (name, file)


def test_the_prostate_network_exports_too(tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(PROSTATE / "configs" / "inference.json"))
    torch.manual_seed(1)
    ckpt = tmp_path / "models" / "model.pt"
    ckpt.parent.mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    p = cli("export", "--bundle-dir", PROSTATE, "--checkpoint", ckpt, "--out", tmp_path / "out",
            "--format", "onnx")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(results) == {"onnx"} and max(results["onnx"]["max_abs_difference"].values()) <= 1e-4
    assert not (tmp_path / "out" / "model.ts").exists()


def test_export_refuses_what_it_cannot_do_before_writing(kvasir_checkpoint, tmp_path):
    p = cli("export", "--bundle-dir", KVASIR, "--checkpoint", kvasir_checkpoint, "--out", tmp_path / "a",
            "--format", "tensorrt")  # fmt: skip
    assert p.returncode == 2 and "tensorrt" in p.stderr
    p = cli("export", "--bundle-dir", KVASIR, "--checkpoint", kvasir_checkpoint, "--out", tmp_path / "b",
            "--override", "{'features': [8, 8, 8, 8, 8, 8]}")  # fmt: skip
    assert p.returncode == 2 and "does not fit" in p.stderr
    assert not list((tmp_path / "b").glob("model.*"))
