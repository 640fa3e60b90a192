"""The annotation loop in a real MONAI Label server on loopback: gaze in, a trained model out, next image.

One server (the app started with no model, tiny training settings) serves the whole file; the last
test kills it mid-training and starts it again on the same studies and workdir.
"""

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, free_port
from PIL import Image

from gazemonai.gaze.fixations import read_fixation_csv
from gazemonai.serve.uncertainty import SCORES

MLBIN = ROOT / ".venv-monailabel" / "bin"
MODEL = "kvasir_gaze"
CONF = [
    "--conf", "overrides", '{"image_size":[32,32],"features":[4,4,8,8,16,4]}',
    "--conf", "train", '{"epochs":1,"batch_size":2,"num_workers":0,"cache_workers":1}',
]  # fmt: skip
TRAINED = [f"synth_{i:03d}" for i in range(8)]  # gaze saved before the first training
DURING = {"synth_008": "ann2", "synth_009": "ann3"}  # saved by two annotators while it runs
UNLABELLED = ["synth_010", "synth_011"]
DONE = "done.json"  # written in a run's folder when it finished


def request(url, method="GET", body: bytes | None = None, headers=None, timeout=120):
    """(status, body) of an HTTP request; error statuses are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_json(url, payload=None):
    headers = {"Content-Type": "application/json"}
    status, body = request(url, "POST", json.dumps(payload or {}).encode(), headers)
    return status, json.loads(body or b"null")


def put_label(url, image, tag, filename, data: bytes, params=None):
    """MONAI Label's ``PUT /datastore/label`` with a file, as a client uploads it."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params or {})}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, answer = request(
        f"{url}/datastore/label?image={image}&tag={tag}", "PUT", body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    return status, json.loads(answer)


def gaze_csv(rows, annotator="ann1", drop=(), **changes) -> bytes:
    """One image's fixation rows as an upload (with an ANNOTATOR column unless ``annotator`` is None)."""
    out = io.StringIO()
    columns = [c for c in rows[0] if c not in drop] + ([] if annotator is None else ["ANNOTATOR"])
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for k, r in enumerate(rows):
        row = {**r, **({"ANNOTATOR": annotator} if annotator else {})}
        row.update({c: v for c, v in changes.items() if k == 0})
        writer.writerow(row)
    return out.getvalue().encode()


def infer(url, image):
    status, data = request(f"{url}/infer/{MODEL}?image={image}&output=image", "POST", b"")
    return status, data


def train_status(url):
    status, body = request(f"{url}/train/")
    return json.loads(body) if status == 200 else {}


def wait_train(url, seconds=600):
    deadline = time.time() + seconds
    while time.time() < deadline:
        task = train_status(url)
        if task.get("status") not in ("SUBMITTED", "RUNNING"):
            return task
        time.sleep(2)
    raise TimeoutError(f"training not done in {seconds} s: {train_status(url)}")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Server:
    """``monailabel start_server`` with the app on loopback, in its own process group."""

    def __init__(self, studies: Path, workdir: Path, logdir: Path):
        self.studies, self.workdir, self.logdir = studies, workdir, logdir
        self.proc = None
        self.url = None
        self.starts = 0

    def start(self):
        self.starts += 1
        port = free_port()
        self.log = open(self.logdir / f"server{self.starts}.log", "w+")
        self.proc = subprocess.Popen(
            [str(MLBIN / "python"), "-m", "monailabel.main", "start_server",
             "--app", str(ROOT / "apps" / "monailabel"), "--studies", str(self.studies),
             "--host", "127.0.0.1", "--port", str(port), "--conf", "workdir", str(self.workdir), *CONF],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"MONAI Label exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/info/", timeout=5):
                    return
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"MONAI Label did not answer in 240 s:\n{self.tail()}")
                time.sleep(1)

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def kill(self, sig=signal.SIGTERM):
        """Signal the server and every process it started (a training), and wait for them."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    if not (MLBIN / "monailabel").exists():
        pytest.skip("MONAI Label environment absent: run `make monailabel-env` (make test builds it)")
    from gazemonai.gaze.simulate import GazeSimulator, simulate_gaze_folder
    from gazemonai.prep.synthetic import make_synthetic_dataset

    base = tmp_path_factory.mktemp("loop")
    data = make_synthetic_dataset(base / "data", n_images=12, size=(64, 80))
    simulate_gaze_folder(data / "masks", data / "gaze.csv", GazeSimulator(seed=1))
    rows = defaultdict(list)
    with open(data / "gaze.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows[Path(r["IMAGE"]).stem].append(r)
    studies = base / "studies"
    studies.mkdir()
    for image in sorted((data / "images").glob("*.png")):
        shutil.copy(image, studies / image.name)
    server = Server(studies, base / "work", base)
    server.start()
    try:
        yield {"server": server, "data": data, "rows": rows}
    finally:
        server.kill()


@pytest.fixture(scope="module")
def first_training(loop):
    """Gaze for 8 images, then ``POST /train``; while it runs: a second start, two annotators saving."""
    server, rows = loop["server"], loop["rows"]
    url = server.url
    for image in TRAINED:
        assert put_label(url, image, "gaze", f"{image}.csv", gaze_csv(rows[image]))[0] == 200
    started, task = post_json(f"{url}/train/{MODEL}")
    assert started == 200, task
    deadline = time.time() + 60
    while request(f"{url}/train/?check_if_running=true")[0] != 200:  # the task's process has started
        assert time.time() < deadline, train_status(url)
        time.sleep(0.2)
    twice = post_json(f"{url}/train/{MODEL}")
    saves = {}

    def save(image, annotator):
        saves[image] = put_label(url, image, "gaze", f"{image}.csv", gaze_csv(rows[image], annotator))

    threads = [threading.Thread(target=save, args=item) for item in DURING.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    running_during_saves = train_status(url).get("status")
    done = wait_train(url)
    status, info = request(f"{url}/info/")
    return {"task": task, "twice": twice, "saves": saves, "running": running_during_saves,
            "done": done, "info": json.loads(info)}  # fmt: skip


def test_a_new_server_has_no_model_and_says_how_to_get_one(loop):
    url = loop["server"].url
    status, body = request(f"{url}/info/")
    info = json.loads(body)
    assert info["models"] == {} and MODEL in info["trainers"]
    assert {"disagreement", "entropy"} <= set(info["strategies"])
    status, body = infer(url, "synth_000")
    assert status == 409
    detail = json.loads(body)["detail"]
    assert "no trained model" in detail and f"POST /train/{MODEL}" in detail and "tag=gaze" in detail
    # active learning without a model: the first unlabelled image, saying why
    status, pick = post_json(f"{url}/activelearning/disagreement")
    assert status == 200 and pick["id"] == "synth_000" and "no model" in pick["reason"]
    # a training with no gaze yet ends at once, saying what it needs
    assert post_json(f"{url}/train/{MODEL}")[0] == 200
    task = wait_train(url)
    assert task["status"] == "ERROR"
    assert any("0 image(s) have gaze" in line and "needs 2 or more" in line for line in task["details"])
    assert not (loop["server"].workdir / MODEL / "models" / "model.pt").exists()


@pytest.mark.parametrize(
    "filename, upload, params, message",
    [
        ("g.csv", dict(CURRENT_FIX_X="1.5"), {}, "line 2: CURRENT_FIX_X=1.5 is outside [0, 1]"),
        ("g.csv", dict(CURRENT_FIX_DURATION="abc"), {}, "line 2: CURRENT_FIX_DURATION='abc' is not a number"),
        ("g.csv", dict(drop=("CURRENT_FIX_Y",)), {}, "missing column(s) CURRENT_FIX_Y"),
        ("g.csv", dict(IMAGE="synth_003.png"), {}, "rows for other image(s) synth_003.png"),
        ("g.csv", dict(IMAGE_HEIGHT="65"), {}, "has size 65x80 here but 64x80 at line 2"),
        ("g.csv", dict(all_size=("32", "40")), {}, "32x40 (line 2) differ from the image's 64x80"),
        ("g.csv", dict(annotator=None), {}, "name one annotator"),
        ("g.csv", dict(), {"annotator": "bob"}, "params name annotator 'bob' but the ANNOTATOR column has"),
        ("g.png", dict(), {}, "a .csv file in the GazeMedSeg columns is expected"),
        ("g.csv", "empty", {}, "the file is empty"),
    ],
)  # fmt: skip
def test_malformed_gaze_is_refused_saying_why_and_nothing_stored(loop, filename, upload, params, message):
    server, rows = loop["server"], loop["rows"]
    image = UNLABELLED[0]
    fixations = [dict(r) for r in rows[image]]
    if upload == "empty":
        data = b""
    else:
        upload = dict(upload)
        size = upload.pop("all_size", None)
        if size:
            fixations = [{**r, "IMAGE_HEIGHT": size[0], "IMAGE_WIDTH": size[1]} for r in fixations]
        if "IMAGE_HEIGHT" in upload:  # the second row (line 3) disagreeing with the first: the reader's check
            fixations[1]["IMAGE_HEIGHT"] = upload.pop("IMAGE_HEIGHT")
        data = gaze_csv(fixations, **upload)
    status, answer = put_label(server.url, image, "gaze", filename, data, params)
    assert status == 422, answer
    assert message in answer["detail"] and f"image {image}" in answer["detail"], answer
    assert request(f"{server.url}/datastore/label?label={image}&tag=gaze")[0] == 404
    assert not any(server.studies.glob(f"labels/gaze/{image}*"))


def test_unknown_image_is_refused(loop):
    upload = gaze_csv(loop["rows"]["synth_000"])
    status, answer = put_label(loop["server"].url, "nope", "gaze", "g.csv", upload)
    assert status == 422 and "no image 'nope'" in answer["detail"]


def test_two_annotators_on_one_image_are_kept_apart_and_a_redo_replaces_only_its_own(loop, tmp_path):
    url, rows = loop["server"].url, loop["rows"]
    image = "synth_001"
    mine, theirs = rows[image], [{**r, "CURRENT_FIX_X": "0.25", "CURRENT_FIX_Y": "0.75"} for r in rows[image]]
    assert put_label(url, image, "gaze", "a.csv", gaze_csv(mine, "ann1"))[0] == 200
    # the second annotator named in params, the file without an ANNOTATOR column
    assert put_label(url, image, "gaze", "b.csv", gaze_csv(theirs, None), {"annotator": "ann2"})[0] == 200

    def stored(annotator):
        status, body = request(f"{url}/datastore/label?label={image}&tag=gaze")
        assert status == 200
        (tmp_path / "s.csv").write_bytes(body)
        return read_fixation_csv(tmp_path / "s.csv", annotator=annotator)[f"{image}.png"]

    assert np.allclose(stored("ann1").xy, [[float(r[f"CURRENT_FIX_{c}"]) for c in "XY"] for r in mine])
    assert np.allclose(stored("ann2").xy, [[0.25, 0.75]] * len(theirs))
    # ann1 redoes the image with one fixation: ann2's rows stay as they were
    redo = [{**mine[0], "CURRENT_FIX_X": "0.5", "CURRENT_FIX_Y": "0.5"}]
    assert put_label(url, image, "gaze", "a.csv", gaze_csv(redo, "ann1"))[0] == 200
    assert np.allclose(stored("ann1").xy, [[0.5, 0.5]])
    assert np.allclose(stored("ann2").xy, [[0.25, 0.75]] * len(theirs))
    _, body = request(f"{url}/datastore/?output=all")
    info = json.loads(body)["objects"][image]["labels"]["gaze"]["info"]
    assert info["annotators"] == ["ann1", "ann2"] and info["fixations"] == 1 + len(theirs)


def test_training_from_gaze_serves_the_first_model(loop, first_training):
    url = loop["server"].url
    assert first_training["task"]["status"] == "SUBMITTED"
    # a second start while it runs is refused, with MONAI Label's message
    status, answer = first_training["twice"]
    assert status == 429 and "Already Running" in answer["detail"]
    # two annotators saved gaze for different images while it ran
    assert first_training["running"] == "RUNNING"
    for image, annotator in DURING.items():
        assert first_training["saves"][image][0] == 200
        _, body = request(f"{url}/datastore/label?label={image}&tag=gaze")
        assert f",{annotator}" in body.decode()
    done = first_training["done"]
    assert done["status"] == "DONE", done
    assert any("validation Dice: new" in line and "served none" in line for line in done["details"])
    stats = first_training["info"]["train_stats"][MODEL]
    assert stats["promoted"] and stats["mode"] == "gaze" and stats["served_val_mean_dice"] is None
    assert stats["images"] >= len(TRAINED) and 0.0 <= stats["val_mean_dice"] <= 1.0
    # now the model is offered, and infer answers a mask at the image's size
    assert MODEL in first_training["info"]["models"]
    status, data = infer(url, UNLABELLED[0])
    assert status == 200
    mask = np.asarray(Image.open(io.BytesIO(data)))
    assert mask.shape == (64, 80) and set(np.unique(mask)) <= {0, 1}
    # the MLflow run is recorded as `monai.bundle run` records it
    import mlflow

    record = stats["mlflow"]
    run = mlflow.MlflowClient(record["tracking_uri"]).get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "1"
    assert "train_loss" in run.data.metrics and run.info.run_name == record["run_name"]


def served_network(workdir: Path):
    """The served model as the bundle's inference builds it, and its preprocessing."""
    from monai.bundle import ConfigParser

    staged = workdir / MODEL
    parser = ConfigParser()
    parser.read_config(str(staged / "configs" / "inference.json"))
    parser["device"] = "cpu"
    net = parser.get_parsed_content("network_def")
    state = torch.load(staged / "models" / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("model", state))  # {"model": ...} or a bare state dict
    return net.eval(), parser.get_parsed_content("preprocessing")


@pytest.mark.parametrize("strategy", ["disagreement", "entropy"])
def test_activelearning_answers_the_image_the_model_is_least_sure_of(loop, first_training, strategy):
    server = loop["server"]
    net, pre = served_network(server.workdir)
    expected = {}
    with torch.no_grad():
        for image in UNLABELLED:
            x = pre({"image": str(server.studies / f"{image}.png")})["image"]
            stack = net(torch.as_tensor(x)[None].float(), output="stack")
            expected[image] = float(SCORES[strategy](stack)[0])
    status, pick = post_json(f"{server.url}/activelearning/{strategy}")
    assert status == 200
    assert set(pick["scores"]) == set(UNLABELLED)  # labelled images are never proposed
    assert pick["scores"] == pytest.approx(expected, abs=1e-5)
    assert pick["id"] == max(expected, key=expected.get) and pick["name"] == f"{pick['id']}.png"
    # the plain strategies skip gaze-labelled images too
    assert post_json(f"{server.url}/activelearning/first")[1]["id"] == UNLABELLED[0]
    assert post_json(f"{server.url}/activelearning/random")[1]["id"] in UNLABELLED


def test_restart_mid_training_keeps_the_served_model_and_the_next_run_compares(loop, first_training):
    server, data = loop["server"], loop["data"]
    model = server.workdir / MODEL / "models" / "model.pt"
    # a constructed served model that predicts background everywhere (validation Dice exactly 0)
    state = torch.load(model, map_location="cpu", weights_only=True)
    weights = state.get("model", state)
    for key, value in weights.items():
        if value.is_floating_point():
            value.zero_()
            if key.endswith("classifier.bias"):
                value.fill_(-20.0)
    torch.save(state, model.with_suffix(".tmp"))
    os.replace(model.with_suffix(".tmp"), model)
    status, mask = infer(server.url, UNLABELLED[0])
    assert status == 200 and not np.asarray(Image.open(io.BytesIO(mask))).any()
    # a full mask (as 3D Slicer / OHIF save it, tag final): the next run is hybrid
    mask_png = (data / "masks" / "synth_002.png").read_bytes()
    assert put_label(server.url, "synth_002", "final", "synth_002.png", mask_png)[0] == 200

    before = sha(model)
    assert post_json(f"{server.url}/train/{MODEL}")[0] == 200
    runs = server.workdir / "runs" / MODEL
    deadline = time.time() + 120

    def unfinished():
        return [r for r in runs.iterdir() if (r / "data/gaze.csv").is_file() and not (r / DONE).is_file()]

    while not unfinished():
        assert time.time() < deadline, train_status(server.url)
        time.sleep(0.5)
    (stale,) = unfinished()
    server.kill(signal.SIGKILL)  # the machine goes down mid-training
    assert sha(model) == before
    server.start()
    _, body = request(f"{server.url}/info/")
    assert MODEL in json.loads(body)["models"]  # the served model survived

    assert post_json(f"{server.url}/train/{MODEL}")[0] == 200
    done = wait_train(server.url)
    assert done["status"] == "DONE", done
    assert not stale.exists()  # the run the restart cut short is removed by the next one
    _, body = request(f"{server.url}/info/")
    stats = json.loads(body)["train_stats"][MODEL]
    assert stats["mode"] == "hybrid" and stats["strong"] == 1
    assert stats["served_val_mean_dice"] == 0.0  # the constructed model, evaluated on the same split
    assert stats["promoted"] == (stats["val_mean_dice"] > 0.0)
    assert (sha(model) != before) == stats["promoted"]
