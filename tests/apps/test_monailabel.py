"""The kvasir_gaze bundle served by a real MONAI Label server (its own venv) on loopback."""

import io
import json
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest
from helpers import KVASIR, ROOT, free_port
from PIL import Image

MLBIN = ROOT / ".venv-monailabel" / "bin"
BUNDLE = ROOT / "bundles" / "kvasir_gaze"


def post_infer(url: str, model: str, image_id: str, params: dict | None = None) -> tuple[bytes, str]:
    """The mask file MONAI Label answers with, and its content type."""
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params or {})}'
        f"\r\n--{boundary}--\r\n"
    ).encode()
    req = urllib.request.Request(
        f"{url}/infer/{model}?image={image_id}&output=image",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read(), r.headers.get("Content-Type", "")


@pytest.fixture(scope="module")
def monailabel_server(kvasir_checkpoint, synthetic_root, tmp_path_factory):
    if not (MLBIN / "monailabel").exists():
        pytest.skip("MONAI Label environment absent: run `make monailabel-env` (make test builds it)")
    studies = tmp_path_factory.mktemp("studies")
    first, second = sorted((synthetic_root / "images").glob("*.png"))[:2]
    shutil.copy(first, studies / first.name)
    Image.open(second).convert("RGB").save(studies / f"{second.stem}.jpg", quality=85)  # a real JPEG
    if (KVASIR / "images").is_dir():  # and real Kvasir-SEG frames when the data is here
        for jpg in sorted((KVASIR / "images").glob("*.jpg"))[:2]:
            shutil.copy(jpg, studies / jpg.name)
    port = free_port()
    log = open(tmp_path_factory.mktemp("mllog") / "server.log", "w+")
    proc = subprocess.Popen(
        [str(MLBIN / "python"), "-m", "monailabel.main", "start_server",
         "--app", str(ROOT / "apps" / "monailabel"), "--studies", str(studies),
         "--host", "127.0.0.1", "--port", str(port),
         "--conf", "checkpoint", str(kvasir_checkpoint), "--conf", "overrides", '{"image_size":[32,32]}'],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"MONAI Label exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/info/", timeout=5) as r:
                    info = json.loads(r.read())
                break
            except OSError:
                if time.time() > deadline:
                    log.seek(0)
                    pytest.fail(f"MONAI Label did not answer in 240 s:\n{log.read()[-4000:]}")
                time.sleep(1)
        yield url, info, studies
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_monailabel_serves_the_bundle_like_its_inference(monailabel_server, kvasir_checkpoint, tmp_path):
    url, info, studies = monailabel_server
    model = info["models"]["kvasir_gaze"]
    assert model["labels"] == {"polyp": 1} and model["type"] == "segmentation"

    # the bundle's own inference on the same checkpoint gives the reference masks
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", BUNDLE / "configs" / "inference.json",
         "--bundle_root", kvasir_checkpoint.parent.parent, "--dataset_dir", studies,
         "--output_dir", tmp_path / "pred", "--image_size", "[32,32]"],
        check=True, capture_output=True, cwd=ROOT,
    )  # fmt: skip
    images = sorted(p for p in studies.iterdir() if p.suffix in (".png", ".jpg"))
    assert any(p.suffix == ".jpg" for p in images)
    for image in images:
        data, content_type = post_infer(url, "kvasir_gaze", image.stem)
        mask = Image.open(io.BytesIO(data))
        assert mask.format == "PNG" and "png" in content_type, (image.name, mask.format, content_type)
        answer = np.asarray(mask)
        expected = np.asarray(Image.open(tmp_path / "pred" / f"{image.stem}.png")) > 0
        assert answer.shape == expected.shape == np.asarray(Image.open(image)).shape[:2]
        assert set(np.unique(answer)) <= set(model["labels"].values()) | {0}  # exactly /info's values
        assert np.array_equal(answer.astype(bool), expected), image.name
    # a lossy format asked for is not honoured: the mask stays exact
    data, _ = post_infer(url, "kvasir_gaze", images[-1].stem, {"result_extension": ".jpg"})
    assert Image.open(io.BytesIO(data)).format == "PNG"
