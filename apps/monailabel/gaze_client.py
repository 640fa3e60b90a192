"""Talk to the app from a shell: upload recorded gaze, train and wait, ask for the next image.

Standard library only (runs in any Python)::

    python apps/monailabel/gaze_client.py upload --server http://127.0.0.1:8000 --gaze-csv gaze.csv
    python apps/monailabel/gaze_client.py train --server http://127.0.0.1:8000 --model kvasir_gaze
    python apps/monailabel/gaze_client.py next --server http://127.0.0.1:8000 --strategy disagreement

``upload`` splits a GazeMedSeg-style CSV (``gazemonai annotate``'s, or the GazeMedSeg release's) into
one ``PUT /datastore/label?image=<id>&tag=gaze`` per image of the server's datastore; rows of
several annotators (``ANNOTATOR``) go up as one upload each; a CSV without that column needs
``--annotator``. Images of the CSV the datastore does not hold are counted and skipped; an upload
the server refuses is printed with its reason, and the exit status is then 1.
``train`` starts ``POST /train/<model>`` (``--set key=value`` for its settings, e.g. ``epochs=10``),
prints the status lines as they come, and exits 0 when it is done, 1 when it failed.
``next`` prints the image the strategy picks (``id``, and ``score`` when a model exists; the id
alone with ``--id-only``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path


def call(url: str, method: str = "GET", body: bytes | None = None, headers=None, timeout=300):
    """``(status, parsed JSON or text)``; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode(errors="replace")


def put_gaze(server: str, image: str, data: bytes, annotator: str | None = None):
    """One image's fixations as the ``gaze`` label (``annotator`` sent in ``params`` when given)."""
    boundary = uuid.uuid4().hex
    params = json.dumps({"annotator": annotator} if annotator else {})
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{params}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="{image}.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    query = urllib.parse.urlencode({"image": image, "tag": "gaze"})
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    return call(f"{server}/datastore/label?{query}", "PUT", body, headers)


def upload(args) -> int:
    status, store = call(f"{args.server}/datastore/?output=all")
    if status != 200:
        print(f"gaze_client: error: {args.server} answered {status}: {store}", file=sys.stderr)
        return 2
    ids = set(store.get("objects", {}))
    with open(args.gaze_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        groups = defaultdict(list)
        for row in reader:
            image = Path((row.get("IMAGE") or "").strip()).stem
            groups[(image, (row.get("ANNOTATOR") or "").strip())].append(row)
    done, refused, absent = 0, 0, set()
    for (image, annotator), rows in sorted(groups.items()):
        if image not in ids:
            absent.add(image)
            continue
        if args.limit is not None and done + refused >= args.limit:
            break
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        who = None if annotator else args.annotator  # an ANNOTATOR column names it itself
        status, answer = put_gaze(args.server, image, out.getvalue().encode(), who)
        if status == 200:
            done += 1
        else:
            refused += 1
            detail = answer.get("detail", answer) if isinstance(answer, dict) else answer
            print(f"refused ({status}): {detail}", file=sys.stderr)
    print(
        f"gaze uploaded for {done} image(s); {refused} refused; "
        f"{len(absent)} image(s) of the CSV not in the datastore"
    )
    return 1 if refused else 0


def train(args) -> int:
    settings = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    status, task = call(f"{args.server}/train/{args.model}", "POST", json.dumps(settings).encode(),
                        {"Content-Type": "application/json"})  # fmt: skip
    if status != 200:
        detail = task.get("detail", task) if isinstance(task, dict) else task
        print(f"gaze_client: error: training not started ({status}): {detail}", file=sys.stderr)
        return 1
    seen: list[str] = []
    while True:
        time.sleep(args.poll)
        _, state = call(f"{args.server}/train/")
        if not isinstance(state, dict) or state.get("id") != task["id"]:
            continue
        details = state.get("details") or []
        overlap = next((k for k in range(len(details), -1, -1) if details[:k] == seen[len(seen) - k :]), 0)
        for line in details[overlap:]:
            print(line)
        seen = details
        if state.get("status") not in ("SUBMITTED", "RUNNING"):
            print(f"training {state.get('status')}")
            return 0 if state.get("status") == "DONE" else 1


def next_image(args) -> int:
    status, pick = call(f"{args.server}/activelearning/{args.strategy}", "POST", b"{}",
                        {"Content-Type": "application/json"})  # fmt: skip
    if status != 200:
        print(f"gaze_client: error: {status}: {pick}", file=sys.stderr)
        return 1
    if not pick:
        print("every image is labelled")
        return 0
    shown = {k: pick[k] for k in ("id", "score", "reason") if k in pick}
    print(pick["id"] if args.id_only else json.dumps(shown))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gaze_client", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("upload", "train", "next"):
        p = sub.add_parser(name)
        p.add_argument("--server", default="http://127.0.0.1:8000")
        if name == "upload":
            p.add_argument("--gaze-csv", required=True)
            p.add_argument("--annotator", help="for a CSV without an ANNOTATOR column")
            p.add_argument("--limit", type=int, help="upload at most this many images")
        elif name == "train":
            p.add_argument("--model", default="kvasir_gaze")
            p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a training setting")
            p.add_argument("--poll", type=float, default=3.0)
        else:
            p.add_argument("--strategy", default="disagreement")
            p.add_argument("--id-only", action="store_true", help="print the image id alone")
    args = parser.parse_args(argv)
    args.server = args.server.rstrip("/")
    return {"upload": upload, "train": train, "next": next_image}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
