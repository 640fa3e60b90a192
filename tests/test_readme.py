"""Every command in the README and the bundle READMEs, run as written, in a fresh shell.

Each ``bash`` block's commands run from a copy of the repository root (``bundles/``,
``apps/monailabel``, the two virtual environments linked), with ``../shared/data`` beside it holding
small data laid out as the real data sets are, and ``NCI-ISBI/`` where the prostate README expects
the user's download. The command text is the README's, to the character: the shell starts without
any virtual environment on ``PATH``, so ``source .venv/bin/activate`` and ``export`` lines act as they
do for a user. Only the compute is small: the copied bundles' configs train for one epoch (or a few
iterations) at 32x32 with narrow widths, so every command of a README finishes in seconds.

Servers (``mlflow ui``, ``mlflow models serve``, MONAI Label) are started, asked over HTTP on the
README's port, and stopped. ``make demo`` / ``make test`` are not run here: CI runs ``make test``
(``.ci/run``) and ``test_demo.py`` runs the demo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, invoke_served_model, wait_http, write_dicom_series

READMES = ["README.md", "bundles/kvasir_gaze/docs/README.md", "bundles/prostate_gaze/docs/README.md"]
NOT_RUN = {"make demo", "make test"}  # CI's own commands, see the module docstring
#: settings of the copied bundles: the README's commands, small compute
SMALL = {
    "epochs": 1, "iterations": 4, "image_size": [32, 32], "features": [8, 8, 16, 16, 32, 8],
    "batch_size": 2, "num_workers": 0, "cache_workers": 1,
}  # fmt: skip
#: servers: how to recognise the command, the README's port, what to ask
SERVERS = [
    (re.compile(r"^mlflow ui\b"), 5000, "/health"),
    (re.compile(r"^mlflow models serve\b"), 5000, "/ping"),
    (re.compile(r"monailabel\.main start_server\b"), 8000, "/info/"),
]


def readme_commands(path: Path) -> list[str]:
    """The commands of ``path``'s ``bash`` blocks: continuation lines joined, comment lines left out."""
    commands, block, pending = [], False, ""
    for line in path.read_text().splitlines():
        fence = line.strip().startswith("```")
        if fence:
            block = not block and line.strip() == "```bash"
            continue
        if not block or not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        commands.append(pending + line)
        pending = ""
    assert not pending, f"{path}: a command ends in a continuation"
    return commands


def _shrink(configs: Path) -> None:
    for path in configs.glob("*.json"):
        config = json.loads(path.read_text())
        for key, value in SMALL.items():
            if key in config and not (isinstance(config[key], str) and config[key].startswith("$")):
                config[key] = value
        path.write_text(json.dumps(config, indent=4))


def _prostate_volumes(root: Path) -> None:
    """Four small T2-like volumes with zonal labels, named as Prostate158 names them."""
    import itk

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    z, y, x = np.mgrid[:5, :40, :48]
    for i, patient in enumerate(["001", "002", "020", "021"]):
        rng = np.random.default_rng(i)
        gland = (((y - 20 - i) / 9.0) ** 2 + ((x - 22 + i) / 11.0) ** 2 < 1.0) & (z >= 1) & (z <= 3)
        image = (150 + 30 * rng.standard_normal(gland.shape) + 400 * gland).astype(np.int16)
        label = gland.astype(np.uint8) * np.where(x < 22, 1, 2).astype(np.uint8)  # two zones
        names = (f"images/{patient}_t2.nii.gz", f"masks/{patient}_t2_anatomy_reader1.nii.gz")
        for array, name in zip((image, label), names):
            volume = itk.image_from_array(np.ascontiguousarray(array))
            volume.SetSpacing((0.5, 0.5, 3.0))
            itk.imwrite(volume, str(root / name))


def _nci_isbi(root: Path) -> None:
    """Three patients as NCI-ISBI 2013 ships them: a DICOM series each and NRRD label volumes."""
    import itk

    z, y, x = np.mgrid[:5, :24, :20]
    for i, patient in enumerate(["Prostate3T-01-0001", "Prostate3T-01-0002", "ProstateDx-01-0006"]):
        image = (100 + 10 * i + 300 * (((y - 12) / 6.0) ** 2 + ((x - 10) / 5.0) ** 2 < 1)).astype(np.int16)
        write_dicom_series(root / "dicom" / patient / "1.3.6.1" / "series", image)
        label = ((((y - 12) / 6.0) ** 2 + ((x - 10) / 5.0) ** 2 < 1) & (z >= 1) & (z <= 3)).astype(np.uint8)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        itk.imwrite(itk.image_from_array(label), str(root / "labels" / f"{patient}.nrrd"))


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """``<tmp>/repo`` (where the commands run) with ``<tmp>/shared/data`` beside it."""
    from gazemonai.gaze.simulate import GazeSimulator, simulate_gaze_folder
    from gazemonai.prep.synthetic import make_synthetic_dataset

    top = tmp_path_factory.mktemp("fresh")
    repo, data = top / "repo", top / "shared" / "data"
    shutil.copytree(ROOT / "bundles", repo / "bundles")
    for configs in (repo / "bundles").glob("*/configs"):
        _shrink(configs)
    app = ROOT / "apps" / "monailabel"
    shutil.copytree(app, repo / "apps" / "monailabel", ignore=shutil.ignore_patterns("model", "__pycache__"))
    for venv in (".venv", ".venv-monailabel"):
        (repo / venv).symlink_to(ROOT / venv)
    kvasir = make_synthetic_dataset(data / "kvasir-seg", n_images=24, size=(48, 56))
    (data / "gazemedseg").mkdir()
    simulate_gaze_folder(kvasir / "masks", data / "gazemedseg" / "kvasir_fixation.csv", GazeSimulator(seed=1))
    _prostate_volumes(data / "prostate-prostate158")
    _nci_isbi(repo / "NCI-ISBI")
    return repo


def _fresh_env() -> dict:
    """A login shell's environment: no virtual environment active, no MLflow settings."""
    path = os.environ.get("PATH", "").split(os.pathsep)
    path = [p for p in path if p and not (Path(p).parent / "pyvenv.cfg").exists()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = os.pathsep.join(path or ["/usr/bin", "/bin"])
    return env


def _start_background(script: str, port: int, route: str, cwd: Path, env: dict, log: Path):
    """A server a README starts with a trailing ``&``: it serves the README's later commands."""
    out = open(log, "w+")
    proc = subprocess.Popen(
        ["bash", "-ec", script.rstrip().rstrip("&")], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}{route}", proc, seconds=240)
    except BaseException:
        _stop_background(proc, out)
        raise
    return proc, out


def _kill_group(proc) -> None:
    """End a server started in its own session, with everything it started."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _stop_background(proc, out) -> None:
    _kill_group(proc)
    out.seek(0)
    print(out.read()[-3000:])  # shown when a later command failed
    out.close()


def _run_server(script: str, port: int, route: str, cwd: Path, env: dict, log: Path) -> None:
    with open(log, "w+") as out:
        proc = subprocess.Popen(
            ["bash", "-ec", script],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            try:
                wait_http(f"http://127.0.0.1:{port}{route}", proc, seconds=240)
            except BaseException:
                out.seek(0)
                print(out.read()[-4000:])
                raise
            if route == "/ping":  # the served model answers, too
                masks = invoke_served_model(port)
                assert masks.shape == (1, 40, 48) and set(np.unique(masks)) <= {0, 1}
        finally:
            _kill_group(proc)


def test_the_readme_blocks_hold_the_commands_a_user_runs():
    commands = readme_commands(ROOT / "README.md")
    assert [c.split("#")[0].strip() for c in commands[:2]] == ["make demo", "make test"]
    assert "source .venv/bin/activate" in commands
    joined = readme_commands(ROOT / "bundles" / "kvasir_gaze" / "docs" / "README.md")
    assert any(c.startswith("gazemonai register --bundle-dir bundles/kvasir_gaze") for c in joined)
    assert not any("..." in c.split(" #")[0] for c in joined), "a command a user cannot run as written"


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "activate").exists(), reason="no .venv: run `make venv`")
def test_every_readme_command_runs_as_written(checkout, tmp_path, request):
    env, ran, logs = _fresh_env(), [], tmp_path / "logs"
    logs.mkdir()
    for readme in READMES:
        setup = []  # `source` / `export` lines: the shell state later commands of that README run in
        for command in readme_commands(ROOT / readme):
            if command.split("#")[0].strip() in NOT_RUN:
                continue
            script = "\n".join([*setup, command])
            if command.startswith(("source ", "export ")):
                setup.append(command)
            server = next(((p, r) for rx, p, r in SERVERS if rx.search(command)), None)
            if server:
                port = int(re.search(r"--port (\d+)", command).group(1)) if "--port" in command else server[0]
            if server and command.rstrip().endswith("&"):  # serves the later commands, stopped at the end
                log = logs / f"background{len(ran)}.log"
                running = _start_background(script, port, server[1], checkout, env, log)
                request.addfinalizer(lambda running=running: _stop_background(*running))
            elif server:
                _run_server(script, port, server[1], checkout, env, logs / f"server{len(ran)}.log")
            else:
                p = subprocess.run(
                    ["bash", "-ec", script],
                    cwd=checkout,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert p.returncode == 0, f"{readme}: {command}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
            ran.append(command)
    assert len(ran) >= 30, ran

    # what the commands promise is there
    images = sorted(p.stem for p in (checkout.parent / "shared/data/kvasir-seg/images").glob("*.png"))
    for preds in ("preds/kvasir", "preds/kvasir_ts", "preds/kvasir_onnx", "preds/champion"):
        assert sorted(p.stem for p in (checkout / preds).glob("*.png")) == images, preds
    for path in (
        "runs/kvasir/outputs/metrics_val.json", "runs/champion/outputs/metrics_val.json",
        "runs/kvasir/models/model.ts", "runs/kvasir/models/model.onnx", "runs/kvasir/report/report.html",
        "runs/kvasir_ddp/outputs/metrics_val.json", "runs/kvasir_full/models/model.pt",
        "runs/kvasir_paper_lowmem/models/model.pt", "pseudo_masks/kvasir/manifest.json",
        "runs/kvasir_hybrid/models/model.pt", "runs/kvasir_full10/models/model.pt",
        "pseudo_masks/p158/manifest.json", "data/nci_slices/train.txt",
        "runs/prostate/outputs/metrics_test.json", "runs/prostate/020_gland.nii.gz",
    ):  # fmt: skip
        assert (checkout / path).is_file(), path
    assert any((checkout / "preds" / "prostate").glob("020_*.png"))
