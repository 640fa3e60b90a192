"""MLflow model registry: register a bundle against a real MLflow server on loopback, load it back."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, cli, free_port, invoke_served_model, wait_http
from PIL import Image

BUNDLE = ROOT / "bundles" / "kvasir_gaze"
SIZE = ["--image_size", "[32,32]"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "art"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_register_load_predict_matches_bundle_inference(
    mlflow_server, kvasir_checkpoint, synthetic_root, tmp_path, monkeypatch
):
    import mlflow
    from mlflow.tracking import MlflowClient

    args = ["register", "--bundle-dir", BUNDLE, "--checkpoint", kvasir_checkpoint,
            "--name", "kvasir_gaze_test",
            "--tracking-uri", mlflow_server, "--override", "{'image_size': [32, 32]}"]  # fmt: skip
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.strip().splitlines()[-1])["version"] == "1"
    assert json.loads(second.stdout.strip().splitlines()[-1])["version"] == "2"
    client = MlflowClient(tracking_uri=mlflow_server)
    versions = client.search_model_versions("name='kvasir_gaze_test'")
    assert sorted(v.version for v in versions) == ["1", "2"]

    # the bundle's own inference on the same kvasir_checkpoint writes the reference masks
    bundle_root = kvasir_checkpoint.parent.parent
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", BUNDLE / "configs" / "inference.json",
         "--bundle_root", bundle_root, "--dataset_dir", synthetic_root / "images",
         "--output_dir", tmp_path / "pred", *SIZE],
        check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip

    # not mlflow.set_tracking_uri: it writes os.environ, which later tests' subprocesses would inherit
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    model = mlflow.pyfunc.load_model("models:/kvasir_gaze_test/1")
    names = sorted(p.name for p in (synthetic_root / "images").glob("*.png"))
    images = np.stack([np.asarray(Image.open(synthetic_root / "images" / n).convert("RGB")) for n in names])
    masks = model.predict(images)
    assert masks.shape == images.shape[:3] and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    for name, mask in zip(names, masks):
        expected = np.asarray(Image.open(tmp_path / "pred" / name)) > 0
        assert np.array_equal(mask.astype(bool), expected), name
    # the signature takes any size; a wrong channel count is refused with the expected shape
    assert model.predict(images[:1, :40, :50]).shape == (1, 40, 50)
    with pytest.raises(Exception, match="3"):
        model.predict(images[..., :2])


def test_mlflow_models_serve_answers_over_http(mlflow_server, kvasir_checkpoint, tmp_path):
    """``mlflow models serve`` of a registered version answers /invocations with masks."""
    cli("register", "--bundle-dir", BUNDLE, "--checkpoint", kvasir_checkpoint, "--name", "kvasir_gaze_serve",
        "--tracking-uri", mlflow_server, "--override", "{'image_size': [32, 32]}")  # fmt: skip
    port = free_port()
    # as in an activated environment: mlflow starts the venv's uvicorn by name
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": path}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/kvasir_gaze_serve/1",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc)
        pred = invoke_served_model(port)
        assert pred.shape == (1, 40, 48) and set(np.unique(pred)) <= {0, 1}
    finally:
        proc.terminate()
        proc.wait(30)


def test_register_names_what_is_missing_or_mismatched(kvasir_checkpoint, tmp_path):
    p = cli("register", "--bundle-dir", BUNDLE, "--checkpoint", tmp_path / "nope.pt", "--name", "x",
            "--tracking-uri", f"sqlite:///{tmp_path / 'db'}")  # fmt: skip
    assert p.returncode == 2 and "nope.pt" in p.stderr
    p = cli("register", "--bundle-dir", BUNDLE, "--checkpoint", kvasir_checkpoint, "--name", "x",
            "--tracking-uri", f"sqlite:///{tmp_path / 'db'}",
            "--override", "{'features': [8, 8, 8, 8, 8, 8]}")  # fmt: skip
    assert p.returncode == 2 and "does not fit" in p.stderr and "features" in p.stderr
    assert not (tmp_path / "db").exists()  # nothing was logged
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    p = cli("register", "--bundle-dir", BUNDLE, "--checkpoint", tmp_path / "garbage.pt", "--name", "x",
            "--tracking-uri", f"sqlite:///{tmp_path / 'db'}")  # fmt: skip
    assert p.returncode == 2 and "garbage.pt is not a torch checkpoint" in p.stderr  # the user's file, named
    assert "does not fit" not in p.stderr  # not every failure to load is a mismatch any more


def test_a_mismatch_keeps_its_cause(kvasir_checkpoint, tmp_path):
    from gazemonai.errors import CheckpointMismatchError
    from gazemonai.serve.registry import _load_staged

    with pytest.raises(CheckpointMismatchError, match="does not fit .* with overrides") as info:
        _load_staged(BUNDLE, kvasir_checkpoint, {"features": [8, 8, 8, 8, 8, 8]}, tmp_path)
    assert isinstance(info.value.__cause__, RuntimeError) and "size mismatch" in str(info.value.__cause__)


def test_register_fails_fast_when_the_server_is_down(kvasir_checkpoint, tmp_path):
    started = time.monotonic()
    dead = f"http://127.0.0.1:{free_port()}"
    p = cli("register", "--bundle-dir", BUNDLE, "--checkpoint", kvasir_checkpoint, "--name", "x",
            "--tracking-uri", dead, "--override", "{'image_size': [32, 32]}")  # fmt: skip
    assert p.returncode == 2 and "cannot be reached" in p.stderr and "Traceback" not in p.stderr
    assert time.monotonic() - started < 60  # MLflow's own retries: about four minutes


def test_a_registered_model_is_built_from_code_not_unpickled(mlflow_server, kvasir_checkpoint, monkeypatch):
    """The logged model holds no pickled Python object: loading it runs our code, not the file's."""
    import mlflow

    p = cli("register", "--bundle-dir", BUNDLE, "--checkpoint", kvasir_checkpoint,
            "--name", "kvasir_gaze_code", "--tracking-uri", mlflow_server,
            "--override", "{'image_size': [32, 32]}")  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    local = Path(mlflow.artifacts.download_artifacts("models:/kvasir_gaze_code/1"))
    assert (
        not list(local.rglob("*.pkl"))
        and (local / "model_code.py").is_file()
        or list(local.rglob("model_code.py"))
    )


def test_register_links_the_training_run_tags_and_aliases_it(trained_kvasir, tmp_path, monkeypatch):
    """No URI, no run id, no overrides: the run record beside model.pt says them all."""
    import mlflow

    ckpt = trained_kvasir / "models" / "model.pt"
    record = json.loads((trained_kvasir / "models" / "mlflow_run.json").read_text())
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    def register(*extra):
        p = subprocess.run(
            [sys.executable, "-m", "gazemonai", "register", "--bundle-dir", str(BUNDLE),
             "--checkpoint", str(ckpt), "--name", "kvasir_linked", *extra],
            capture_output=True, text=True, cwd=cwd,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    first = register("--alias", "champion")
    assert first["version"] == "1" and first["aliases"] == ["champion"]
    assert first["run_id"] == record["run_id"]  # logged into the training run
    client = mlflow.MlflowClient(tracking_uri=record["tracking_uri"])
    version = client.get_model_version("kvasir_linked", "1")
    assert version.run_id == record["run_id"]
    history = client.get_metric_history(record["run_id"], "val_mean_dice")
    best = max(history, key=lambda m: (m.value, -m.step))
    assert version.tags["val_mean_dice"] == f"{best.value:.4f}"
    assert version.tags["val_mean_dice_epoch"] == str(best.step)
    assert version.tags["training_run_id"] == record["run_id"] and version.tags["supervision"] == "gaze"
    assert len(version.tags["checkpoint_sha256"]) == 64 and "validation Dice" in version.description
    assert str(client.get_model_version_by_alias("kvasir_linked", "champion").version) == "1"
    # artifacts next to the store, nothing in the folder register ran from
    assert not any(cwd.iterdir())
    assert list((trained_kvasir / "outputs" / "mlruns").rglob("MLmodel"))

    # the alias moves to a newer version; the recorded 32x32 / narrow widths were used to load it
    second = register("--alias", "[champion,staging]")
    assert second["version"] == "2" and second["aliases"] == ["champion", "staging"]
    assert str(client.get_model_version_by_alias("kvasir_linked", "champion").version) == "2"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", record["tracking_uri"])
    (tmp_path / "dl").mkdir()
    model = mlflow.pyfunc.load_model("models:/kvasir_linked@champion", dst_path=str(tmp_path / "dl"))
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["images"] and sig.outputs.input_names() == ["masks"]
    example = model.metadata.load_input_example(str(tmp_path / "dl"))
    masks = model.predict(example)
    assert masks.shape == (1, 64, 64) and masks.dtype == np.uint8
    assert np.array_equal(model.predict(example["images"]), masks)  # a bare array works too


def test_register_refuses_bad_aliases_before_logging(trained_kvasir, tmp_path):
    for alias in ("v3", "latest", "bad alias"):
        p = cli("register", "--bundle-dir", BUNDLE, "--checkpoint", trained_kvasir / "models" / "model.pt",
                "--name", "x", "--alias", alias,
                "--tracking-uri", f"sqlite:///{tmp_path / 'db'}")  # fmt: skip
        assert p.returncode == 2 and repr(alias) in p.stderr, p.stderr
    assert not (tmp_path / "db").exists()


def test_evaluate_and_predict_a_registered_model_as_the_bundle_does(trained_kvasir, synthetic_root, tmp_path):
    """`gazemonai evaluate/predict --model models:/...` give the report and masks of evaluate.json and
    inference.json on the same checkpoint, with the settings it was trained with (32x32, widths, split)."""
    import shutil

    from helpers import bundle

    record = json.loads((trained_kvasir / "models" / "mlflow_run.json").read_text())
    uri = record["tracking_uri"]
    p = cli("register", "--bundle-dir", BUNDLE, "--checkpoint", trained_kvasir / "models" / "model.pt",
            "--name", "kvasir_eval", "--alias", "champion")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]

    ref = tmp_path / "ref"
    (ref / "models").mkdir(parents=True)
    shutil.copy(trained_kvasir / "models" / "model.pt", ref / "models" / "model.pt")
    trained = ["--image_size", "[32,32]", "--features", "[8,8,16,16,32,8]"]
    configs = f"['{BUNDLE / 'configs' / 'train.json'}','{BUNDLE / 'configs' / 'evaluate.json'}']"
    bundle("--config_file", configs, "--bundle_root", ref, "--dataset_dir", synthetic_root,
           "--eval_split", "val", "--val_fraction", "0.5", *trained)  # fmt: skip
    p = cli("evaluate", "--model", "models:/kvasir_eval@champion", "--tracking-uri", uri,
            "--dataset-dir", synthetic_root, "--eval-split", "val", "--out", tmp_path / "reg")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    expected = json.loads((ref / "outputs" / "metrics_val.json").read_text())
    got = json.loads((tmp_path / "reg" / "outputs" / "metrics_val.json").read_text())
    assert got == expected and got["images"] == 2
    assert json.loads(p.stdout.strip().splitlines()[-1])["mean"] == expected["mean"]

    bundle("--config_file", BUNDLE / "configs" / "inference.json", "--bundle_root", ref,
           "--dataset_dir", synthetic_root / "images", "--output_dir", tmp_path / "ref_masks",
           *trained)  # fmt: skip
    p = cli("predict", "--model", "models:/kvasir_eval@champion", "--tracking-uri", uri,
            "--images", synthetic_root / "images", "--out", tmp_path / "masks")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    names = sorted(f.name for f in (tmp_path / "ref_masks").iterdir())
    assert names and names == sorted(f.name for f in (tmp_path / "masks").iterdir())
    for name in names:
        a = np.asarray(Image.open(tmp_path / "ref_masks" / name))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "masks" / name))), name


def test_evaluate_names_a_model_that_is_not_there(trained_kvasir, tmp_path):
    uri = json.loads((trained_kvasir / "models" / "mlflow_run.json").read_text())["tracking_uri"]
    p = cli("evaluate", "--model", "models:/no_such_model/1", "--tracking-uri", uri,
            "--dataset-dir", tmp_path, "--out", tmp_path / "o")  # fmt: skip
    assert p.returncode == 2 and "models:/no_such_model/1" in p.stderr, p.stderr[-2000:]
    p = cli("predict", "--model", "models:/x/1", "--images", tmp_path / "nope", "--out", tmp_path / "o")
    assert p.returncode == 2 and "--images" in p.stderr and "no such folder" in p.stderr


def test_batched_predict_equals_one_image_at_a_time_on_the_model_device(
    kvasir_checkpoint, synthetic_root, tmp_path
):
    import torch

    from gazemonai.serve.registry import bundle_predictor

    model = bundle_predictor(tmp_path / "staged", checkpoint=kvasir_checkpoint, bundle_dir=BUNDLE)
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # the device follows the machine
    assert model.device.type == expected and next(model.network.parameters()).device.type == expected
    names = sorted(p.name for p in (synthetic_root / "images").glob("*.png"))[:5]
    images = np.stack([np.asarray(Image.open(synthetic_root / "images" / n).convert("RGB")) for n in names])
    one_at_a_time = np.stack([model.predict(None, image[None])[0] for image in images])
    sizes = []
    hook = model.network.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    model.batch_size = 2
    batched = model.predict(None, images)
    hook.remove()
    assert sizes == [2, 2, 1]  # one forward pass per batch of up to batch_size images
    assert np.array_equal(batched, one_at_a_time) and batched.shape == images.shape[:3]
    assert 0 < batched.mean() < 1  # masks with both classes, not an all-empty agreement


def test_pip_requirements_do_not_pin_this_machines_torch_build():
    from gazemonai.serve.registry import _pip_requirements

    reqs = _pip_requirements()
    torch_reqs = [r for r in reqs if r.split(">")[0].split("=")[0].split("<")[0].strip() == "torch"]
    assert len(torch_reqs) == 1 and "==" not in torch_reqs[0] and "+" not in torch_reqs[0], torch_reqs
    assert not any("+cpu" in r for r in reqs)
    assert any(r.startswith("monai==") for r in reqs)  # the rest stays pinned to what trained the model


def test_the_pyfunc_model_raises_no_type_hint_warning():
    """MLflow checks ``predict``'s hints when the class is defined: on every register, load and report."""
    p = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import gazemonai.serve.registry"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "type hint" not in p.stderr.lower(), p.stderr[-2000:]


#: run in a fresh interpreter whose only site-packages is the folder given: load and predict a model
_LOAD_IN_A_BARE_ENVIRONMENT = """
import site, sys
site.addsitedir(sys.argv[1])  # the folder's .pth files too, as an installed environment has them
from importlib.util import find_spec
bare = [m for m in ("pydensecrf", "itk", "nibabel", "fire", "gazemonai") if find_spec(m) is not None]
assert not bare, f"not a bare environment: {bare}"
import numpy as np, mlflow
model = mlflow.pyfunc.load_model(sys.argv[2])
import gazemonai
assert "/code/gazemonai/" in gazemonai.__file__, gazemonai.__file__  # the code logged with the model
masks = model.predict(np.full((1, 40, 48, 3), 90, np.uint8))
assert masks.shape == (1, 40, 48) and masks.dtype == np.uint8, masks.shape
print("predicted", masks.shape)
"""


def _logged_model(client, version):
    """The MLflow 3 logged model a registered version was made from (a SQL registry keeps it as the
    version's source, ``models:/<model_id>``)."""
    return client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))


def _installed_with_dependencies(requirements: list[str]) -> set[str]:
    """The distributions a fresh ``pip install REQUIREMENTS`` holds (as installed here), by name."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    def name(r: str) -> str:
        return re.split(r"[ ;<>=!~\[(]", r.strip(), maxsplit=1)[0].lower().replace("_", "-")

    todo, seen = [name(r) for r in requirements], set()
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            todo += [name(r) for r in requires(dist) or [] if "extra ==" not in r]
        except PackageNotFoundError:  # a marker's platform package (pywin32, ...)
            pass
    return seen


def _site_of(distributions: set[str], folder: Path) -> Path:
    """A site-packages folder holding only ``distributions`` (links to this environment's files)."""
    from importlib.metadata import distributions as installed

    folder.mkdir()
    for dist in installed():
        if dist.metadata["Name"].lower().replace("_", "-") not in distributions:
            continue
        for top in {f.parts[0] for f in dist.files or [] if not f.parts[0].startswith("..")}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


def test_the_registered_model_requires_only_what_serving_imports(kvasir_checkpoint, tmp_path):
    """pydensecrf2 (built from C++ on every fresh ``mlflow models serve``) and the package's other
    non-serving dependencies are not the model's requirements, and what it records is enough: the
    registered model loads and predicts in an interpreter that has only those packages."""
    import mlflow

    from gazemonai.serve.registry import register_bundle

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    size = {"image_size": [32, 32]}
    info = register_bundle(BUNDLE, "kvasir_reqs", kvasir_checkpoint, size, tracking_uri=uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("kvasir_reqs", info.registered_model_version)
    local = Path(_logged_model(client, version).artifact_location.removeprefix("file://"))
    assert local.is_dir() and local.is_relative_to(tmp_path)  # the registry's own files, on disk
    for recorded in ("requirements.txt", "conda.yaml", "MLmodel"):
        assert "pydensecrf" not in (local / recorded).read_text(), recorded
    requirements = (local / "requirements.txt").read_text().split()
    names = {r.split("=")[0].split(">")[0] for r in requirements}
    assert names == {"torch", "monai", "pytorch-ignite", "mlflow", "numpy", "pillow"}, requirements

    closure = _installed_with_dependencies(requirements)
    assert "pydensecrf2" not in closure and "itk" not in closure  # not even through another package
    site = _site_of(closure, tmp_path / "site")
    model_uri = f"models:/kvasir_reqs/{version.version}"
    p = subprocess.run(
        [sys.executable, "-S", "-c", _LOAD_IN_A_BARE_ENVIRONMENT, str(site), model_uri],
        capture_output=True, text=True, cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": uri, "PATH": os.environ["PATH"], "HOME": str(tmp_path),
             "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert p.returncode == 0 and "predicted (1, 40, 48)" in p.stdout, p.stderr[-3000:]


def test_the_registered_model_describes_itself_and_each_versions_validation_dice(trained_kvasir):
    """The registered model (not only its versions) says what it is and how to load and serve it, with
    one row per version; each version's logged model holds its checkpoint's validation metrics; a
    description written by hand is kept."""
    import mlflow

    from gazemonai.serve.registry import register_bundle

    ckpt = trained_kvasir / "models" / "model.pt"
    record = json.loads((trained_kvasir / "models" / "mlflow_run.json").read_text())
    uri = record["tracking_uri"]
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = record["run_id"]
    history = client.get_metric_history(run_id, "val_mean_dice")
    best = max(history, key=lambda m: (m.value, -m.step))
    level_keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith("val_"))
    assert len(level_keys) > 1  # val_mean_dice and the levels' metrics

    for _ in range(2):
        register_bundle(BUNDLE, "kvasir_described", ckpt)
    for number in ("1", "2"):
        version = client.get_model_version("kvasir_described", number)
        logged = _logged_model(client, version)
        assert logged.metrics, f"version {number}: no metrics on its logged model"
        metrics = {m.key: m for m in logged.metrics}
        assert sorted(metrics) == level_keys
        assert metrics["val_mean_dice"].value == best.value and metrics["val_mean_dice"].step == best.step
        for key, metric in metrics.items():  # each is the run's own value at the checkpoint's epoch
            at = [m.value for m in client.get_metric_history(run_id, key) if m.step == best.step]
            assert at == [metric.value], key
    assert len(client.get_metric_history(run_id, "val_mean_dice")) == len(history)  # no point added

    text = client.get_registered_model("kvasir_described").description
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    for part in (meta["name"], "`kvasir_gaze`", "(N, H, W, 3) uint8 RGB",
                 'mlflow.pyfunc.load_model("models:/kvasir_described/2")',
                 "mlflow models serve -m models:/kvasir_described/2",
                 "gazemonai predict --model models:/kvasir_described/2"):  # fmt: skip
        assert part in text, part
    dice = f"{best.value:.4f} ({best.step})"
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows == [f"| 2 | gaze | {dice} | {run_id} |", f"| 1 | gaze | {dice} | {run_id} |"]

    client.update_registered_model("kvasir_described", description="Our polyp model; ask Ana.")
    register_bundle(BUNDLE, "kvasir_described", ckpt)  # version 3
    assert client.get_registered_model("kvasir_described").description == "Our polyp model; ask Ana."
    assert client.get_model_version("kvasir_described", "3").tags["val_mean_dice"] == f"{best.value:.4f}"
    client.update_registered_model("kvasir_described", description="")  # cleared: register's again
    register_bundle(BUNDLE, "kvasir_described", ckpt)  # version 4
    text = client.get_registered_model("kvasir_described").description
    assert "models:/kvasir_described/4" in text and f"| 4 | gaze | {dice} | {run_id} |" in text
