"""What several test files share: paths of the real data, servers on loopback, running commands."""

from __future__ import annotations

import locale
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GAZEMONAI_SHARED_DATA", ROOT.parent / "shared" / "data"))
KVASIR = SHARED_DATA / "kvasir-seg"
GAZE = SHARED_DATA / "gazemedseg"
KVASIR_CSV = GAZE / "kvasir_fixation.csv"
NCI_CSV = GAZE / "nci-isbi_fixation.csv"
PROSTATE158 = SHARED_DATA / "prostate-prostate158"


def need(path: Path):
    """Skip (with the reason) when a real-data path of ../shared/data is absent."""
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (tests read ../shared/data)")
    return path


def free_port() -> int:
    """A free TCP port on loopback, for the servers the tests start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """``torchrun`` with ``nproc`` processes on a free rendezvous port (runs in parallel never collide)."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
    ]  # fmt: skip


def wait_http(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Wait until ``url`` answers, failing early when the server process ``proc`` exits."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            errors = proc.stderr.read()[-2000:] if proc.stderr else "(see its log)"
            raise RuntimeError(f"server exited with {proc.returncode}: {errors}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


def run_module(module: str, *args, ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the repository root, as a user runs it; asserts success with ``ok``."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env
    )
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def cli(*args) -> subprocess.CompletedProcess:
    """``python -m gazemonai ARGS`` as a user runs it; the caller checks the exit status."""
    return run_module("gazemonai", *args, ok=False)


#: the settings the ``trained_kvasir`` fixture trains with, which serving it must be told (or recall)
TRAINED = ["--image_size", "[32,32]", "--features", "[8,8,16,16,32,8]"]


def bundle(*args, ok: bool = True) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run ARGS``."""
    return run_module("monai.bundle", "run", *args, ok=ok)


def mlflow_runs(db: Path, experiment: str):
    """The runs of ``experiment`` in the SQLite MLflow store ``db``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {db}"
    return client.search_runs([exp.experiment_id])


def write_dicom_series(folder, image, spacing=3.0):
    """One DICOM file per slice, with the position and instance number a scanner writes."""
    import itk

    folder.mkdir(parents=True)
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves the C library's locale at "C"
    for i, plane in enumerate(image):
        img = itk.image_from_array(np.ascontiguousarray(plane))
        tags = img.GetMetaDataDictionary()
        tags["0020|0032"] = f"0\\0\\{spacing * i}"  # ImagePositionPatient
        tags["0020|0037"] = "1\\0\\0\\0\\1\\0"  # ImageOrientationPatient
        tags["0020|0013"] = str(i + 1)  # InstanceNumber
        tags["0008|0060"] = "MR"
        tags["0020|000d"], tags["0020|000e"] = "1.2.826.0.1.1", "1.2.826.0.1.1.1"  # study, series
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.imwrite(img, str(folder / f"IM{i:04d}.dcm"), imageio=io)
    locale.setlocale(locale.LC_ALL, saved)


def invoke_served_model(port: int, timeout: float = 120) -> np.ndarray:
    """POST a (1, 40, 48, 3) image with a bright box to ``mlflow models serve`` on ``port``: its masks."""
    import json

    image = np.zeros((1, 40, 48, 3), np.uint8)
    image[0, 10:30, 12:36] = 200
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps({"inputs": image.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return np.asarray(json.loads(r.read())["predictions"])


def slice_named(root, out):
    """``root``'s data set with slice names ``P<patient>_<k>`` (three patients), as prepare-slices writes."""
    import shutil

    names = {f"synth_{i:03d}": f"P{i // 2}_{i % 2 + 1}" for i in range(6)}
    for folder in ("images", "masks"):
        (out / folder).mkdir(parents=True)
        for old, new in names.items():
            shutil.copy(root / folder / f"{old}.png", out / folder / f"{new}.png")
    for name in ("train.txt", "test.txt", "gaze.csv"):
        text = (root / name).read_text()
        for old, new in names.items():
            text = text.replace(old, new)
        (out / name).write_text(text)
    return out


def configs(name: str, *files: str) -> str:
    """A `--config_file` list of bundle `name`'s config files."""
    folder = ROOT / "bundles" / name / "configs"
    return "[" + ",".join(f"'{folder / f}'" for f in files) + "]"
