"""MONAI Label's ``train`` task for a gaze bundle: the datastore's gaze in, a better served model out.

One run (``POST /train/<model>``, in MONAI Label's background task process):

1. **Snapshot** the datastore under ``<workdir>/runs/<run>/data`` in the layout the bundle reads:
   ``images/`` (hard links or copies), ``gaze.csv`` (every ``gaze`` label; the ``annotator`` setting picks one
   annotator, ``"all"`` pools every annotator's fixations of an image into its one heatmap, as
   saliency maps pool observers), ``masks/`` and ``train.txt``. Images with a ``final`` mask (3D
   Slicer / OHIF) are the strong labels: with any, the run is ``hybrid`` (``hybrid.json``,
   ``strong_ids``); the other images' ``masks/`` hold their level-1 pseudo-mask (``gazemonai
   pseudo-masks``: the package's gaze code), the reference of the validation Dice where no mask exists.
2. **Evaluate the served model** (if any) on the run's validation split (``evaluate.json``).
3. **Train**: ``python -m monai.bundle run`` on the bundle's ``train.json`` (the same command, so the
   MLflow run is recorded as with any training; tracking store ``<workdir>/mlruns.db`` unless
   ``--conf tracking_uri``), with the served model's settings (``image_size``, ``features``, ...).
4. **Evaluate the new model** on the same split; it replaces the served ``models/model.pt``
   (atomically) only when its validation Dice is higher, or when nothing is served yet.

Every line of the steps' output goes to MONAI Label's ``/train`` status (``details``); the result
(Dice of both, promoted or not) to ``/info``'s ``train_stats``. One run at a time per workdir (a file
lock: a second is refused with a message); a run killed mid-way (server restarted) leaves the served
model as it was, and its folder is removed by the next run.

Steps 1-4 run with ``train_python`` (default: this repository's ``.venv/bin/python``, which has the
training's dependencies that MONAI Label's own environment lacks).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from gazemonai.gaze.fixations import ALL_COLUMNS

logger = logging.getLogger(__name__)

#: train.json values the task sets itself (a request cannot)
PROTECTED = {"bundle_root", "ckpt_dir", "output_dir", "dataset_dir", "gaze_csv", "supervision", "strong_ids",
             "strong_fraction", "tracking_uri", "run_name", "limit", "num_levels", "device"}  # fmt: skip
#: inference.json values the training must share with the served model
MODEL_SETTINGS = ("features", "image_size", "in_channels")
#: the pseudo-mask preset of each bundle (sigma and thresholds of its train.json)
PRESETS = {"kvasir_gaze": "kvasir", "prostate_gaze": "prostate"}
DONE = "done.json"


def read_model_weights(path: str | os.PathLike):
    """The network's state dict in a ``models/model.pt`` (the one place that knows its format)."""
    from gazemonai.train.checkpoints import load_weights, model_weights

    return model_weights(load_weights(path))


def default_train_python() -> str:
    repo = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
    return str(repo) if repo.exists() else sys.executable


def say(line: str) -> None:
    """A line for MONAI Label's ``/train`` status (it reads this process's output)."""
    print(f"[gazemonai train] {line}", flush=True)


class GazeTrainTask(TrainTask):
    """Trains a gaze bundle on the datastore's ``gaze`` labels (and ``final`` masks); see the module.

    Args:
        name: the bundle's name (``kvasir_gaze``).
        bundle_dir: the bundle folder whose ``configs/train.json`` is run.
        served: the served bundle folder (``configs/``, ``models/model.pt``) the result replaces.
        workdir: runs, the MLflow store, the lock and the statistics.
        train_python: the Python that runs the bundle.
        defaults: the task's default settings (``/info``'s trainer ``config``); a request's values
            win. Keys of ``train.json`` (``epochs``, ``batch_size``, ...) are passed to it (the rest of
            its values stand; a ``batch_size`` above the training images is lowered to their number);
            ``annotator`` picks whose gaze is used (``"all"``: pooled); ``val_fraction`` 0.2.
        tracking_uri: the MLflow store (default ``sqlite:///<workdir>/mlruns.db``).
    """

    def __init__(
        self, name, bundle_dir, served, workdir, train_python=None, defaults=None, tracking_uri=None
    ):
        super().__init__(f"Train {name} from the datastore's gaze (hybrid with its final masks)")
        self.name = name
        self.bundle_dir = Path(bundle_dir)
        self.served = Path(served)
        self.workdir = Path(workdir)
        self.train_python = train_python or default_train_python()
        self.tracking_uri = tracking_uri or f"sqlite:///{(self.workdir / 'mlruns.db').resolve()}"
        self.train_config = json.loads((self.bundle_dir / "configs" / "train.json").read_text())
        hybrid = json.loads((self.bundle_dir / "configs" / "hybrid.json").read_text())
        self.train_keys = set(self.train_config) | set(hybrid)
        self.defaults = {"val_fraction": 0.2, "annotator": "all", **(defaults or {})}

    def config(self):
        return dict(self.defaults)

    @property
    def stats_path(self) -> Path:
        return self.workdir / f"train_stats_{self.name}.json"

    def stats(self):
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    # -- the run ----------------------------------------------------------------------------------
    def __call__(self, request, datastore: Datastore):
        self.workdir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.workdir / f"train_{self.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            message = (
                f"a training of {self.name} is already running on {self.workdir}; try again when it ends"
            )
            say(message)
            raise RuntimeError(message) from None
        try:
            return self._run({**self.defaults, **request}, datastore)
        finally:
            lock.release()

    def _run(self, request, datastore) -> dict:
        runs = self.workdir / "runs" / self.name
        for old in sorted(runs.glob("*")) if runs.is_dir() else []:
            if not (old / DONE).is_file():
                say(f"removing {old.name}, a run that did not finish (server stopped mid-training)")
                shutil.rmtree(old, ignore_errors=True)
        run = runs / time.strftime("%Y%m%d-%H%M%S")
        while run.exists():
            run = run.with_name(run.name + "_")
        data = run / "data"
        started = time.time()
        ids, strong = self.snapshot(datastore, data, str(request.get("annotator") or "all"))
        say(f"run {run.name}: {len(ids)} gaze-labelled image(s), {len(strong)} with full masks")
        overrides = {k: v for k, v in request.items() if k in self.train_keys and k not in PROTECTED}
        overrides.update(self.served_model_settings())
        overrides.setdefault("val_fraction", self.defaults["val_fraction"])
        n_val = max(1, int(round(len(ids) * float(overrides["val_fraction"]))))
        batch = int(overrides.get("batch_size", self.train_config.get("batch_size", 1)))
        if batch > len(ids) - n_val:  # the trainer drops incomplete batches: it would train nothing
            overrides["batch_size"] = max(1, len(ids) - n_val)
            say(f"batch_size {batch} > the {len(ids) - n_val} training image(s): {overrides['batch_size']}")
        self.pseudo_reference(data, ids, strong)
        served_model = self.served / "models" / "model.pt"
        before = (
            self.evaluate(run / "eval_served", self.served / "models", data, overrides)
            if served_model.is_file()
            else None
        )
        configs = [str(self.bundle_dir / "configs" / "train.json")]
        args = {**overrides, "bundle_root": run, "dataset_dir": data, "gaze_csv": data / "gaze.csv",
                "tracking_uri": self.tracking_uri, "run_name": f"monailabel_{run.name}"}  # fmt: skip
        if strong:
            configs.append(str(self.bundle_dir / "configs" / "hybrid.json"))
            args.update({"strong_ids": sorted(strong), "strong_fraction": None})
        settings = json.dumps({k: overrides[k] for k in sorted(overrides)})
        say(f"training ({'hybrid' if strong else 'gaze'}): {settings}")
        self.bundle(configs, args)
        new_model = run / "models" / "model.pt"
        if not new_model.is_file():
            raise RuntimeError(f"the training wrote no {new_model} (no validation ran?)")
        after = self.evaluate(run / "eval_new", run / "models", data, overrides)
        promoted = before is None or after > before
        if promoted:
            self.promote(run)
        result = {
            "model": self.name, "run": run.name, "images": len(ids), "strong": len(strong),
            "mode": "hybrid" if strong else "gaze", "val_mean_dice": after, "served_val_mean_dice": before,
            "promoted": promoted, "seconds": round(time.time() - started, 1), "ts": int(time.time()),
            "mlflow": self._run_record(run),
        }  # fmt: skip
        say(
            f"validation Dice: new {after:.4f}, served {'none' if before is None else f'{before:.4f}'}: "
            + ("the new model is served" if promoted else "the served model stays")
        )
        (run / DONE).write_text(json.dumps(result, indent=2) + "\n")
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, self.stats_path)
        return result

    def snapshot(self, datastore, data: Path, annotator: str) -> tuple[list[str], set[str]]:
        """Write the bundle's dataset layout under ``data``; returns (gaze ids, ids with a full mask)."""
        (data / "images").mkdir(parents=True)
        (data / "masks").mkdir()
        rows, ids, strong, skipped = [], [], set(), []
        lock = datastore.gaze_lock() if hasattr(datastore, "gaze_lock") else None
        if lock is not None:
            lock.acquire()
        try:
            for image_id in sorted(datastore.list_images()):
                path = datastore.gaze_path(image_id) if hasattr(datastore, "gaze_path") else None
                if path is None:
                    if datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL.value):
                        skipped.append(image_id)
                    continue
                with open(path, newline="", encoding="utf-8") as f:
                    mine = [
                        r for r in csv.DictReader(f) if annotator == "all" or r.get("ANNOTATOR") == annotator
                    ]
                if not mine:
                    continue
                image = Path(datastore.get_image_uri(image_id))
                name = image_id + "".join(image.suffixes)
                try:  # a hard link (the bundle's readers refuse links leaving the folder), else a copy
                    os.link(image.resolve(), data / "images" / name)
                except OSError:
                    shutil.copyfile(image, data / "images" / name)
                mine.sort(key=lambda r: (r.get("ANNOTATOR", ""), float(r["CURRENT_FIX_INDEX"])))
                for k, r in enumerate(mine, 1):
                    rows.append(
                        {**{c: r.get(c, "") for c in ALL_COLUMNS}, "IMAGE": name, "CURRENT_FIX_INDEX": k}
                    )
                ids.append(image_id)
                final = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL.value)
                if final:
                    final = Path(datastore.get_label_uri(final, DefaultLabelTag.FINAL.value))
                    shutil.copyfile(final, data / "masks" / (image_id + "".join(final.suffixes)))
                    strong.add(image_id)
        finally:
            if lock is not None:
                lock.release()
        if skipped:
            say(f"{len(skipped)} image(s) with a mask but no gaze are not used: {', '.join(skipped[:5])}")
        if len(ids) < 2:
            who = f"annotator {annotator}" if annotator != "all" else "any annotator"
            raise RuntimeError(
                f"{len(ids)} image(s) have gaze ({who}); "
                "training needs 2 or more (one for validation): save gaze with PUT /datastore/label?tag=gaze"
            )
        with open(data / "gaze.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=ALL_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        (data / "train.txt").write_text("".join(f"{i}\n" for i in ids))
        return ids, strong

    def pseudo_reference(self, data: Path, ids: list[str], strong: set[str]) -> None:
        """Level-1 pseudo-masks as the validation reference of the images without a full mask."""
        weak = [i for i in ids if i not in strong]
        if not weak:
            return
        (data / "weak.txt").write_text("".join(f"{i}\n" for i in weak))
        out = data.parent / "pseudo"
        self.python(["-m", "gazemonai", "pseudo-masks", "--data_root", data, "--gaze_csv", data / "gaze.csv",
                     "--out", out, "--preset", PRESETS.get(self.name, "kvasir"), "--split", data / "weak.txt",
                     "--masks_dir", "no_masks", "--no_maps", "--quiet", "--workers", 1])  # fmt: skip
        for i in weak:
            shutil.copyfile(out / "level_1" / f"{i}.png", data / "masks" / f"{i}.png")

    def evaluate(self, out: Path, ckpt_dir: Path, data: Path, overrides: dict) -> float:
        """The validation Dice (ensemble) of ``ckpt_dir/model.pt`` on the run's split (``evaluate.json``)."""
        configs = [str(self.bundle_dir / "configs" / c) for c in ("train.json", "evaluate.json")]
        keep = ("val_fraction", "seed", "num_workers", "image_size", "features", "in_channels", "thresholds")
        args = {k: overrides[k] for k in keep if k in overrides}
        args.update({"bundle_root": out, "ckpt_dir": ckpt_dir, "output_dir": out, "dataset_dir": data,
                     "eval_split": "val", "tracking_uri": self.tracking_uri})  # fmt: skip
        self.bundle(configs, args)
        metrics = json.loads((out / "metrics_val.json").read_text())
        return float(metrics["mean"]["ensemble"]["dice"])

    def served_model_settings(self) -> dict:
        """The served ``inference.json``'s values of :data:`MODEL_SETTINGS`, as plain data.

        A value the app's ``overrides`` wrote is a literal; the bundle's own ``inference.json`` reads
        the others from the served checkpoint's run record (``$@trained_model[...]``), else
        ``model_defaults``: the same reader gives them here, so a training shares what is served.
        """
        from gazemonai.train.run_record import check_plain_data, trained_settings

        inference = json.loads((self.served / "configs" / "inference.json").read_text())
        model = self.served / "models" / "model.pt"
        recorded = dict(inference.get("model_defaults") or {})
        if model.is_file():
            recorded.update(trained_settings(model))
        settings = {}
        for key in MODEL_SETTINGS:
            value = inference.get(key)
            if isinstance(value, str) and value.startswith("$"):
                value = recorded.get(key)
            if value is not None:
                check_plain_data(value, key)
                settings[key] = value
        return settings

    def promote(self, run: Path) -> None:
        """Serve ``run``'s model: written beside, then renamed over ``models/model.pt`` (atomic)."""
        models = self.served / "models"
        models.mkdir(parents=True, exist_ok=True)
        tmp = models / ".model.pt.tmp"
        shutil.copyfile(run / "models" / "model.pt", tmp)
        record = run / "models" / "mlflow_run.json"
        if record.is_file():
            shutil.copyfile(record, models / "mlflow_run.json")
        (models / "served.json").write_text(json.dumps({"source": "train", "run": str(run)}) + "\n")
        os.replace(tmp, models / "model.pt")

    @staticmethod
    def _run_record(run: Path):
        try:
            return json.loads((run / "models" / "mlflow_run.json").read_text())
        except (OSError, ValueError):
            return None

    # -- subprocesses -----------------------------------------------------------------------------
    def bundle(self, configs: list[str], args: dict) -> None:
        cmd = ["-m", "monai.bundle", "run", "--config_file", repr(configs)]
        for k, v in args.items():
            cmd += [f"--{k}", str(v) if isinstance(v, (str, Path)) else repr(v)]  # fire reads Python literals
        self.python(cmd)

    def python(self, args: list) -> None:
        cmd = [self.train_python, *map(str, args)]
        say("$ " + " ".join(cmd))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        tail = []
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                print(line, flush=True)
                tail = (tail + [line])[-5:]
        if proc.wait() != 0:
            raise RuntimeError(f"{cmd[1:4]} failed with exit status {proc.returncode}: {' | '.join(tail)}")
