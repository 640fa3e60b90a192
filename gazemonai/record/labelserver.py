"""Record step 6: the annotation page's MONAI Label client (``gazemonai annotate --server URL``).

The page takes its images from a MONAI Label server's datastore, in the order the server's
active-learning strategy picks them (``POST /activelearning/<strategy>`` before each image), or in
the datastore listing's order, and saves each image's fixations there as the ``gaze`` label
(``PUT /datastore/label?image=ID&tag=gaze``: the GazeMedSeg columns and ``ANNOTATOR``), following
the app's REST contract in ``apps/monailabel/API.md``. Standard library only; the images are
downloaded into a cache folder beside the fixation CSV.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from ..errors import GazemonaiError, InvalidInputError

__all__ = ["LabelServer", "LabelServerError", "STRATEGIES"]

#: the app's active-learning strategies, and ``listing``: the datastore's own images in ``--order``
STRATEGIES = ("disagreement", "entropy", "first", "random", "listing")
#: the keys of MONAI Label's ``GET /info/`` this client needs
INFO_KEYS = ("name", "labels", "models", "strategies")


class LabelServerError(GazemonaiError):
    """The MONAI Label server did not answer, refused a call, or answered something unexpected."""


class LabelServer:
    """A MONAI Label server's datastore, strategy and label upload, for one annotation session.

    Args:
        url: the server, ``http://host:port``.
        strategy: one of :data:`STRATEGIES`.
        cache_dir: where the shown images are downloaded (``<ID><ext>``).
        timeout: seconds each call may take.

    Raises:
        LabelServerError: (from :meth:`connect`) the URL does not answer or is not MONAI Label.
    """

    def __init__(self, url: str, strategy: str = "disagreement", cache_dir=".", timeout: float = 30.0):
        if strategy not in STRATEGIES:
            raise InvalidInputError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        parts = urllib.parse.urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidInputError(f"--server must be an http(s)://host:port URL, got {url!r}")
        self.url = str(url).rstrip("/")
        self.strategy = strategy
        self.cache_dir = Path(cache_dir)
        self.timeout = float(timeout)
        self.info: dict = {}

    # ---------------------------------------------------------------- HTTP
    def call(self, path: str, method: str = "GET", body: bytes | None = None, headers=None):
        """``(status, bytes)``; HTTP errors are answers, a server that cannot be reached raises."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise LabelServerError(f"MONAI Label server {self.url} not reachable ({reason})") from None

    def _json(self, path: str, method: str = "GET", body: bytes | None = None, headers=None):
        status, data = self.call(path, method, body, headers)
        try:
            parsed = json.loads(data) if data else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
        return status, parsed, data

    @staticmethod
    def detail(status: int, parsed, data: bytes) -> str:
        """The server's reason for a refusal: its ``detail`` (422 of the app) or the body's start."""
        if isinstance(parsed, dict) and "detail" in parsed:
            d = parsed["detail"]
            return d if isinstance(d, str) else json.dumps(d)
        text = data.decode("utf-8", "replace").strip().replace("\n", " ")
        return f"HTTP {status}: {text[:200]}"

    # ---------------------------------------------------------------- session start
    def connect(self) -> dict:
        """``GET /info/``: checks the URL is a MONAI Label server offering the strategy; returns the info."""
        status, info, data = self._json("/info/")
        if status != 200 or not isinstance(info, dict) or any(k not in info for k in INFO_KEYS):
            got = f"HTTP {status}" + ("" if isinstance(info, dict) else f", {data[:60]!r}")
            raise LabelServerError(
                f"--server {self.url}: not a MONAI Label server (GET /info/ answered {got})"
            )
        if self.strategy != "listing" and self.strategy not in info["strategies"]:
            offered = ", ".join(sorted(info["strategies"])) or "none"
            raise LabelServerError(
                f"--strategy {self.strategy}: the server {self.url} offers {offered} (or use listing)"
            )
        self.info = info
        return info

    def datastore(self) -> dict:
        """``GET /datastore/?output=all``: ``{ID: {"image": {"ext", ...}, "labels": {TAG: ...}}}``."""
        status, parsed, data = self._json("/datastore/?output=all")
        if status != 200 or not isinstance(parsed, dict) or not isinstance(parsed.get("objects"), dict):
            raise LabelServerError(f"GET {self.url}/datastore/: {self.detail(status, parsed, data)}")
        return parsed["objects"]

    def file_name(self, image_id: str, objects: dict | None = None) -> str:
        """The datastore's file name of ``image_id`` (its id and extension)."""
        obj = (objects if objects is not None else self.datastore()).get(image_id)
        if obj is None:
            raise LabelServerError(f"image {image_id!r} is not in the datastore of {self.url}")
        ext = obj.get("image", {}).get("ext") or ".png"
        return image_id + ext

    # ---------------------------------------------------------------- images
    def next_image(self, annotator: str, exclude: set[str]) -> dict:
        """The strategy's next image not in ``exclude`` (ids): ``{"id", "name", "strategy", ...}``.

        An id the strategy gives again (its gaze is not on the server: an upload was refused or is
        waiting) is replaced by the first image of the listing with no gaze and not excluded.
        ``{}`` when no image is left.
        """
        objects = self.datastore()
        pick: dict = {}
        if self.strategy != "listing":
            body = json.dumps({"client_id": annotator}).encode()
            status, parsed, data = self._json(
                f"/activelearning/{self.strategy}", "POST", body, {"Content-Type": "application/json"}
            )
            if status != 200:
                raise LabelServerError(
                    f"POST {self.url}/activelearning/{self.strategy}: {self.detail(status, parsed, data)}"
                )
            pick = parsed if isinstance(parsed, dict) else {}
        if pick.get("id") and pick["id"] not in exclude and pick["id"] in objects:
            answer = {k: pick[k] for k in ("score", "reason") if k in pick}
            return {"id": pick["id"], "strategy": self.strategy, **answer, "objects": objects}
        if self.strategy != "listing" and not pick.get("id"):
            return {}  # the strategy says every image is labelled
        for image_id in sorted(objects):
            labels = objects[image_id].get("labels") or {}
            if image_id not in exclude and "gaze" not in labels and "final" not in labels:
                reason = (
                    "the datastore listing"
                    if self.strategy == "listing"
                    else (f"the strategy gave {pick['id']}, already shown here: the listing's next instead")
                )
                return {"id": image_id, "strategy": self.strategy, "reason": reason, "objects": objects}
        return {}

    def download(self, image_id: str, name: str) -> Path:
        """``GET /datastore/image?image=ID`` into the cache folder (once); returns the file."""
        path = self.cache_dir / name
        if path.is_file():
            return path
        status, data = self.call("/datastore/image?" + urllib.parse.urlencode({"image": image_id}))
        if status != 200:
            raise LabelServerError(f"GET {self.url}/datastore/image?image={image_id}: HTTP {status}")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    # ---------------------------------------------------------------- gaze
    def put_gaze(self, image_id: str, csv_bytes: bytes) -> dict:
        """``PUT /datastore/label?image=ID&tag=gaze`` with one image's fixation CSV.

        Returns:
            the server's answer (``{"image", "label"}``).

        Raises:
            LabelServerError: refused (the app's 422 ``detail``) or not reachable; nothing stored.
        """
        boundary = uuid.uuid4().hex
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{{}}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="{image_id}.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode()
        body += csv_bytes + f"\r\n--{boundary}--\r\n".encode()
        query = urllib.parse.urlencode({"image": image_id, "tag": "gaze"})
        status, parsed, data = self._json(
            f"/datastore/label?{query}",
            "PUT",
            body,
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        if status != 200:
            raise LabelServerError(
                f"the server refused the gaze of {image_id}: {self.detail(status, parsed, data)}"
            )
        return parsed if isinstance(parsed, dict) else {}

    def get_gaze(self, image_id: str) -> bytes | None:
        """The stored ``gaze`` label of ``image_id`` (every annotator's rows), ``None`` when none."""
        query = urllib.parse.urlencode({"label": image_id, "tag": "gaze"})
        status, data = self.call(f"/datastore/label?{query}")
        return data if status == 200 else None


def image_id(name: str) -> str:
    """The datastore id of a file name: its name without the extension."""
    return re.sub(r"\.[^.]*$", "", name)
