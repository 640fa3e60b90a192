"""A trained bundle as an MLflow model: log it as ``mlflow.pyfunc``, register it, load it back.

MONAI's ``MLFlowHandler`` tracks runs but has no model-registry support. This wraps a bundle folder
(its ``configs/`` and ``models/model.pt``) in an :class:`mlflow.pyfunc.PythonModel` that runs the
bundle's own ``inference.json`` pieces (network, preprocessing, postprocessing minus the writer), so
a registered model predicts exactly what ``python -m monai.bundle run --config_file
configs/inference.json`` writes, without files::

    gazemonai register --bundle-dir bundles/kvasir_gaze --checkpoint runs/gaze1/models/model.pt \
        --name kvasir_gaze --tracking-uri http://127.0.0.1:5000

    model = mlflow.pyfunc.load_model("models:/kvasir_gaze/1")
    masks = model.predict(images)  # (N, H, W, 3) uint8 -> (N, H, W) uint8 0/1

The ``gazemonai`` package travels with the model (``code_paths``), so loading needs only the few
packages a prediction imports (:data:`SERVING_REQUIREMENTS`, the model's recorded requirements).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

try:  # mlflow is a core dependency; keep the import error readable if it is missing
    import mlflow
    from mlflow.pyfunc import PythonModel
except ImportError as e:  # pragma: no cover
    raise ImportError("gazemonai.serve.registry needs mlflow (pip install mlflow)") from e

from ..errors import CheckpointMismatchError, CheckpointReadError, InvalidInputError, TrackingUnavailableError
from ..train.checkpoints import load_weights, model_weights
from ..train.run_record import RUN_RECORD, inside
from ..train.settings import config_path
from ..train.tracking import check_sqlite_uri, fail_fast_http, is_outage, sqlite_artifact_location
from .staging import (
    check_staged_bundle,
    evaluation_overrides,
    locate_bundle,
    read_run_record,
    stage_bundle,
    trained_settings,
)

__all__ = [
    "BundlePyfuncModel",
    "bundle_predictor",
    "download_registered_bundle",
    "log_bundle_model",
    "register_bundle",
    "run_registered_bundle",
]

logger = logging.getLogger(__name__)

#: names of the registered model's input and output tensors
INPUT_NAME, OUTPUT_NAME = "images", "masks"


class BundlePyfuncModel(PythonModel):
    """An ``mlflow.pyfunc`` model that runs a bundle's ``configs/inference.json`` in memory.

    ``predict`` takes a batch of same-sized images in the bundle's raw intensity range: (N, H, W, C)
    ``uint8`` for RGB endoscopy, (N, H, W) ``float32`` for single-channel images (the registered
    signature says which). It returns (N, H, W) ``uint8`` masks (0/1) at the input size — the same
    masks the bundle's inference writes as PNG files.

    The network runs on the first CUDA device when there is one (else the CPU), on up to
    :attr:`batch_size` images at a time; pre- and postprocessing (resize, its inversion) stay per image.
    """

    #: images per forward pass in :meth:`predict`
    batch_size = 16

    def load_context(self, context) -> None:
        import torch
        from monai.bundle import ConfigParser
        from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, SaveImaged

        bundle = Path(context.artifacts["bundle"])
        check_staged_bundle(bundle)  # its model settings are plain data before MONAI parses them
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["bundle_root"] = str(bundle)
        self.device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        parser["device"] = f"$torch.device('{self.device}')"
        self.network = parser.get_parsed_content("network_def")
        ckpt = bundle / "models" / "model.pt"
        state = model_weights(load_weights(ckpt))
        try:
            self.network.load_state_dict(state)
        except RuntimeError as e:  # missing/unexpected keys, shape mismatches: widths, levels, channels
            raise CheckpointMismatchError(
                f"checkpoint {ckpt} does not fit {bundle}/configs/inference.json: {e}"
            ) from e
        self.network.to(self.device).eval()
        self.in_channels = int(parser.get_parsed_content("in_channels", default=3))
        pre = parser.get_parsed_content("preprocessing")
        # files are loaded by the caller: keep everything after loading and channel handling
        self.preprocessing = Compose(
            [t for t in pre.transforms if not isinstance(t, (LoadImaged, EnsureChannelFirstd))]
        )
        post = parser.get_parsed_content("postprocessing")
        self.postprocessing = Compose([t for t in post.transforms if not isinstance(t, SaveImaged)])
        self.inferer = parser.get_parsed_content("inferer")

    def _as_batch(self, images) -> np.ndarray:
        if isinstance(images, dict):  # the signature's named input: {"images": batch}
            if set(images) != {INPUT_NAME}:
                raise InvalidInputError(f"expected one input named {INPUT_NAME!r}, got {sorted(images)}")
            images = images[INPUT_NAME]
        images = np.asarray(images)
        if images.ndim == 3 and self.in_channels == 1:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise InvalidInputError(
                f"expected images shaped (N, H, W, {self.in_channels})"
                + (" or (N, H, W)" if self.in_channels == 1 else "")
                + f", got {images.shape}"
            )
        return images

    def predict_image(self, image: np.ndarray) -> np.ndarray:
        """One image as read from its file (RGB ``uint8``, or single-channel raw values) -> (H, W) 0/1."""
        a = np.asarray(image)
        if self.in_channels == 1:
            batch = (a if a.ndim == 2 else a[..., 0])[None].astype(np.float32)
        else:
            batch = (a if a.ndim == 3 else np.repeat(a[..., None], self.in_channels, axis=-1))[None]
        return self.predict(None, batch)[0]

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        # the batch, or {"images": batch} (the signature's named input). The hint is what MLflow takes
        # without inferring a schema from it (the registered signature is the schema) and without its
        # "Add type hints to the predict method" warning on every import
        import torch
        from monai.data import MetaTensor

        images = self._as_batch(model_input)
        masks = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                items = []
                for image in images[start : start + self.batch_size]:
                    # (H, W, C) -> (C, H, W), as LoadImaged + EnsureChannelFirstd give the bundle
                    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
                    items.append(self.preprocessing({"image": MetaTensor(torch.as_tensor(chw).float())}))
                batch = torch.stack([d["image"].as_tensor() for d in items]).to(
                    self.device, non_blocking=True
                )
                preds = self.inferer(batch, self.network)
                for data, pred in zip(items, preds):
                    data["pred"] = pred
                    data = self.postprocessing(data)
                    masks.append(np.asarray(data["pred"].detach().cpu())[0].astype(np.uint8))
        return np.stack(masks)


#: the distributions the served model imports when it loads and predicts (gazemonai's own code travels
#: with the model): what ``mlflow models serve`` installs in a fresh environment. The rest of the
#: package's dependencies (pydensecrf2, built from C++ source; itk, nibabel, fire, uvicorn, ...) serve
#: training, gaze and the CLI, never a prediction.
SERVING_REQUIREMENTS = ("torch", "monai", "pytorch-ignite", "mlflow", "numpy", "pillow")


def _pip_requirements() -> list[str]:
    """:data:`SERVING_REQUIREMENTS`, pinned to the versions that logged the model (torch: the package's
    range)."""
    import re
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        declared = [r.split(";")[0].strip() for r in (requires("gazemonai") or []) if "extra ==" not in r]
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        declared = []
    ranges = {re.split(r"[ <>=!~\[(]", r, maxsplit=1)[0].lower(): r for r in declared}
    pinned = []
    for name in SERVING_REQUIREMENTS:
        if name == "torch":  # the package's own range: this machine's build (e.g. +cpu) is not the server's
            pinned.append(ranges.get(name, name))
            continue
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:  # pragma: no cover
            pinned.append(ranges.get(name, name))
    return pinned


def _signature(in_channels: int):
    """Any batch, any height and width: ``images`` (N, H, W, C) uint8 RGB, or (N, H, W) float32
    single-channel, to ``masks`` (N, H, W) uint8 0/1."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    if in_channels > 1:
        inputs = TensorSpec(np.dtype(np.uint8), (-1, -1, -1, in_channels), name=INPUT_NAME)
    else:
        inputs = TensorSpec(np.dtype(np.float32), (-1, -1, -1), name=INPUT_NAME)
    outputs = TensorSpec(np.dtype(np.uint8), (-1, -1, -1), name=OUTPUT_NAME)
    return ModelSignature(Schema([inputs]), Schema([outputs]))


def _input_example(in_channels: int) -> dict:
    """One 64x64 image with a bright disc on a dark background, in the signature's dtype."""
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 30) ** 2 + (xx - 34) ** 2 < 14**2).astype(np.float32)
    if in_channels > 1:
        image = (40 + 160 * disc)[..., None].repeat(in_channels, axis=-1).astype(np.uint8)
    else:
        image = (100 + 300 * disc).astype(np.float32)
    return {INPUT_NAME: image[None]}


def _load_staged(bundle: Path, ckpt: Path, overrides: dict | None, dest: Path, training_settings=None):
    """Stage the bundle and load it as the served model would; a checkpoint that does not fit fails."""
    staged = stage_bundle(bundle, dest / "bundle", ckpt, overrides, training_settings)
    model = BundlePyfuncModel()

    class _Context:
        artifacts = {"bundle": str(staged)}

    try:
        model.load_context(_Context())
    except CheckpointMismatchError as e:  # name the user's files, not the staged copies
        raise CheckpointMismatchError(
            f"checkpoint {ckpt} does not fit {bundle}/configs/inference.json"
            f"{' with overrides ' + json.dumps(overrides) if overrides else ''}: {e.__cause__}"
        ) from e.__cause__
    except CheckpointReadError as e:
        raise CheckpointReadError(f"cannot read checkpoint {ckpt} as weights: {e.__cause__}") from e.__cause__
    return staged, model


def _log_staged(staged: Path, model: BundlePyfuncModel, artifact_path: str, registered_model_name):
    return mlflow.pyfunc.log_model(
        name=artifact_path,
        python_model=str(Path(__file__).with_name("model_code.py")),  # built from code, nothing pickled
        artifacts={"bundle": str(staged)},
        code_paths=[str(Path(__file__).resolve().parents[1])],  # the gazemonai package
        pip_requirements=_pip_requirements(),
        signature=_signature(model.in_channels),
        input_example=_input_example(model.in_channels),
        registered_model_name=registered_model_name,
    )


def log_bundle_model(
    bundle_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    overrides: dict | None = None,
    artifact_path: str = "model",
    registered_model_name: str | None = None,
):
    """Log a bundle and a checkpoint as an ``mlflow.pyfunc`` model in the active run (and register it).

    Only what serving needs is logged: ``configs/`` (with ``overrides`` written into
    ``inference.json``, e.g. the ``image_size`` or ``features`` the checkpoint was trained with) and
    the checkpoint as ``models/model.pt``. The checkpoint is loaded once here, so a mismatch with
    the configs fails before anything is logged. The signature takes any batch size, height and width.

    Returns:
        mlflow's ``ModelInfo`` (``model_uri``, ``registered_model_version``, ...).
    """
    bundle, ckpt = locate_bundle(bundle_dir, checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        staged, model = _load_staged(bundle, ckpt, overrides, Path(tmp))
        return _log_staged(staged, model, artifact_path, registered_model_name)


@contextlib.contextmanager
def _tracking(uri: str):
    """Point mlflow's fluent API at ``uri`` for the block, then restore the caller's settings.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ``, which every
    later subprocess of the caller (e.g. a bundle run) would inherit.
    """
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reachable(uri: str) -> None:
    """Ask a tracking store once, failing fast (MLflow's own retries take minutes).

    Anything but an MLflow store there (a web server of another kind, a file that is not an MLflow
    database, a scheme MLflow has no store for) is one line naming the URI, not MLflow's traceback.
    """
    if uri.startswith(("http://", "https://")):
        fail_fast_http()
    check_sqlite_uri(uri)
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:
        if is_outage(e):
            raise _unreachable(uri) from e
        reason = " ".join(_first_line(e).split())[:200]
        raise InvalidInputError(f"the tracking URI {uri} is not an MLflow tracking store: {reason}") from e


def _unreachable(uri: str) -> TrackingUnavailableError:
    return TrackingUnavailableError(f"the MLflow tracking server at {uri} cannot be reached")


def check_overrides(overrides: dict | None) -> None:
    """Check ``inference.json`` values as the bundle's own settings check will when the model serves.

    Raises:
        InvalidInputError: ``override <the settings check's message>``.
    """
    import inspect

    from ..errors import GazemonaiError
    from ..train.settings import check_settings

    known = set(inspect.signature(check_settings).parameters) - {"choices"}
    for key, value in (overrides or {}).items():
        try:
            check_settings(**{key: value})
        except TypeError:  # a value the settings check does not know (e.g. device)
            if key in known:
                raise
        except GazemonaiError as e:
            raise InvalidInputError(f"override {e}") from e


def register_bundle(
    bundle_dir: str | os.PathLike,
    name: str,
    checkpoint: str | os.PathLike | None = None,
    overrides: dict | None = None,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    run_id: str | None = None,
    aliases: list[str] | tuple[str, ...] = (),
):
    """Register a trained bundle as a new version of model ``name`` in the MLflow model registry.

    The version is linked to the run that trained the checkpoint: training writes
    ``models/mlflow_run.json`` beside ``model.pt`` (tracking URI, run id, the settings it resolved),
    and the model is logged into that run, so the version shows the run's parameters, metrics and
    config files. The version is tagged with the run's best ``val_mean_dice`` (the score of
    ``model.pt``, which is the best checkpoint), the training run id and the checkpoint's SHA-256,
    and gets ``aliases`` (e.g. ``champion``), which move to it from older versions. The training
    run's validation metrics of that epoch are logged on the version's MLflow logged model, and the
    registered model's description (bundle, input and output, load and serve commands, a row per
    version) is rewritten, unless a person edited it (:func:`_describe_registered_model`).

    Args:
        bundle_dir: the bundle folder (``configs/inference.json``), e.g. ``bundles/kvasir_gaze``.
        name: registered model name.
        checkpoint: the trained weights; default ``bundle_dir/models/model.pt``.
        overrides: ``inference.json`` values to use; by default the recorded training's
            ``num_levels``, ``features``, ``in_channels`` and ``image_size``.
        tracking_uri: MLflow tracking/registry URI (a server ``http://...`` or ``sqlite:///...``);
            default: the recorded training's, else ``MLFLOW_TRACKING_URI``, else the store next to
            the checkpoint (``<bundle_root>/outputs/mlruns.db``).
        experiment_name: experiment of a new run, when the model is not logged into the training run
            (no record, or a store that does not hold it); default the recorded training's
            experiment, else ``gazemonai_registry``.
        run_id: log the model into this run instead of the recorded one.
        aliases: registered-model aliases to point at the new version.

    Returns:
        mlflow's ``ModelInfo``; ``registered_model_version`` is the new version.
    """
    from monai.utils import path_to_sqlite_uri

    bundle, ckpt = locate_bundle(bundle_dir, checkpoint)
    record = read_run_record(ckpt)
    aliases = [_alias(a) for a in aliases]
    check_overrides(overrides)  # a value predict would refuse is refused now, before anything is logged
    trained = trained_settings(ckpt, record)
    if tracking_uri is None:
        tracking_uri = (
            _recorded_store(record, ckpt)
            or os.environ.get("MLFLOW_TRACKING_URI")
            or path_to_sqlite_uri(str(ckpt.resolve().parent.parent / "outputs" / "mlruns.db"))
        )
    with tempfile.TemporaryDirectory() as tmp, _tracking(tracking_uri):
        # fails before anything is logged when the checkpoint does not load
        staged, model = _load_staged(bundle, ckpt, overrides or None, Path(tmp), trained)
        _reachable(tracking_uri)
        client = mlflow.MlflowClient()
        training = run_id or _recorded_run(client, record, tracking_uri)
        if training is None:
            experiment = experiment_name or (record or {}).get("experiment_name") or "gazemonai_registry"
            mlflow.set_experiment(experiment_id=_experiment_id(client, experiment, tracking_uri))
        with mlflow.start_run(run_id=training) as run:
            if training is None and record:
                mlflow.set_tag("gazemonai.training_run", f"{record['tracking_uri']} {record['run_id']}")
            info = _log_staged(staged, model, "model", name)
            # the checkpoint's validation metrics on the logged model too (MLflow 3 shows a logged
            # model's metrics on its page and on the registered version's)
            best = _link_validation_metrics(client, training, info.model_id) if training else None
        version = info.registered_model_version
        tags = _version_tags(client, run.info.run_id, ckpt, training is not None, best)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version)
        client.update_model_version(name, version, description=_description(bundle, ckpt, tags))
        _describe_registered_model(client, name, bundle, model.in_channels)
        logger.info(
            "registered %s version %s (run %s%s)%s",
            name,
            version,
            run.info.run_id,
            ", the training run" if training else "",
            "".join(f" @{a}" for a in aliases),
        )
    return info


def _alias(alias) -> str:
    """``alias`` checked before anything is logged (MLflow would refuse it after the version exists)."""
    import re

    alias = str(alias)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", alias):
        raise InvalidInputError(f"alias {alias!r}: use letters, digits, '-' and '_'")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise InvalidInputError(f"alias {alias!r} is reserved by MLflow ('latest', v<number>)")
    return alias


def _recorded_store(record: dict | None, ckpt: Path) -> str | None:
    """The tracking store the run record names, where ``register`` may send the model unasked.

    A run folder may come from someone else, and its record could name any server: the model (and
    its weights) go there only when it is the store beside the run (a SQLite file inside the run
    folder) or the one ``MLFLOW_TRACKING_URI`` names; any other needs ``--tracking-uri``.

    Raises:
        InvalidInputError: the record names another store, naming it and how to use it.
    """
    from urllib.parse import unquote

    uri = (record or {}).get("tracking_uri")
    if not uri or uri == os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    run_folder = ckpt.resolve().parent.parent
    if uri.startswith("sqlite:///") and inside(unquote(uri[len("sqlite:///") :]), run_folder):
        return uri
    raise InvalidInputError(
        f"{ckpt.parent / RUN_RECORD} names the tracking store {uri}, which is not the one beside the run: "
        f"register sends the model there only when asked (--tracking-uri {uri}, or MLFLOW_TRACKING_URI)"
    )


def _recorded_run(client, record: dict | None, tracking_uri: str) -> str | None:
    """The recorded training run's id, if the store at ``tracking_uri`` holds it."""
    if not record:
        logger.warning(
            "no run record (models/mlflow_run.json) beside the checkpoint: the model is logged into a "
            "new run, not linked to its training"
        )
        return None
    try:
        run = client.get_run(record["run_id"])
    except Exception as e:
        if is_outage(e):
            raise
        logger.warning(
            "the training run %s (recorded in %s) is not in %s: the model is logged into a new run "
            "tagged gazemonai.training_run",
            record["run_id"],
            record["tracking_uri"],
            tracking_uri,
        )
        return None
    if run.info.lifecycle_stage == "deleted":
        logger.warning("training run %s was deleted: the model is logged into a new run", record["run_id"])
        return None
    return run.info.run_id


def _experiment_id(client, experiment: str, tracking_uri: str) -> str:
    """The experiment's id, created with its artifacts next to a SQLite store (not in the cwd)."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(experiment, artifact_location=sqlite_artifact_location(tracking_uri))


def _link_validation_metrics(client, run_id: str, model_id: str) -> dict | None:
    """Log the training run's validation metrics of ``model.pt``'s epoch on the logged model ``model_id``.

    ``model.pt`` is the best checkpoint: its epoch is the step of the best ``val_mean_dice`` (the
    first, on a tie). Every ``val_*`` metric at that step is logged again with ``model_id``, with its
    own value, step and timestamp, so the run's history keeps one point per step (MLflow drops the
    exact duplicate there) and the logged model holds the metrics of the weights it serves.

    Returns:
        the metrics by name (``None`` when the run logged no ``val_mean_dice``).
    """
    history = client.get_metric_history(run_id, "val_mean_dice")
    if not history:
        return None
    step = max(history, key=lambda m: (m.value, -m.step)).step
    linked = {}
    for key in sorted(client.get_run(run_id).data.metrics):
        if not key.startswith("val_"):
            continue
        at = [m for m in client.get_metric_history(run_id, key) if m.step == step]
        if at:
            linked[key] = mlflow.entities.Metric(key, at[-1].value, at[-1].timestamp, step, model_id=model_id)
    client.log_batch(run_id, metrics=list(linked.values()))
    return linked


def _version_tags(client, run_id: str, ckpt: Path, linked: bool, best: dict | None) -> dict[str, str]:
    """The checkpoint's hash; when the model is logged into its training run, the run id, the
    checkpoint's ``val_mean_dice`` and its epoch (``best``: :func:`_link_validation_metrics`) and the
    run's main settings."""
    import hashlib

    tags = {"checkpoint_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    if not linked:
        return tags
    tags["training_run_id"] = run_id
    if best:
        tags["val_mean_dice"] = f"{best['val_mean_dice'].value:.4f}"
        tags["val_mean_dice_epoch"] = str(best["val_mean_dice"].step)
    params = client.get_run(run_id).data.params
    for key in ("supervision", "num_levels", "image_size"):
        if key in params:
            tags[key] = params[key]
    return tags


def _description(bundle: Path, ckpt: Path, tags: dict[str, str]) -> str:
    text = f"gazemonai bundle {bundle.resolve().name}, weights {ckpt.resolve()}"
    if "training_run_id" in tags:
        text += f", trained in run {tags['training_run_id']}"
    if "val_mean_dice" in tags:
        text += f", validation Dice {tags['val_mean_dice']} (epoch {tags['val_mean_dice_epoch']})"
    return text


#: the newest versions the registered model's description lists
DESCRIBED_VERSIONS = 20

#: registered-model tag: the SHA-256 of the description ``register`` last wrote (another one is a person's)
DESCRIPTION_TAG = "gazemonai.description_sha256"


def _describe_registered_model(client, name: str, bundle: Path, in_channels: int) -> None:
    """Write the registered model's description: what it is, how to load and serve it, its versions.

    Rewritten on every new version, unless a person has written it: a description that is not the
    one ``register`` last wrote (its SHA-256 is the tag :data:`DESCRIPTION_TAG`) is kept, with a log
    line; clearing it hands it back to ``register``.
    """
    import hashlib

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    current = client.get_registered_model(name)
    if current.description and sha(current.description) != current.tags.get(DESCRIPTION_TAG):
        logger.info(
            "the description of registered model %s was written by hand: kept (clear it to have "
            "register write it)",
            name,
        )
        return
    versions = client.search_model_versions(f"name='{name}'")
    text = _model_description(name, bundle, in_channels, versions)
    written = client.update_registered_model(name, description=text).description
    client.set_registered_model_tag(name, DESCRIPTION_TAG, sha(written or text))


def _model_description(name: str, bundle: Path, in_channels: int, versions) -> str:
    """Markdown: the bundle (its ``metadata.json``), the model's input and output, how to load,
    serve and run it, and one row per version (newest first) with its supervision and validation Dice."""
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    newest_first = sorted(versions, key=lambda v: -int(v.version))
    uri = f"models:/{name}/{newest_first[0].version}"
    title = meta.get("name") or bundle.resolve().name
    lines = [
        f"**{title}**: the gazemonai bundle `{bundle.resolve().name}`"
        + (f" {meta['version']}" if meta.get("version") else "")
        + " as an `mlflow.pyfunc` model running the bundle's own `configs/inference.json` "
        "(network, preprocessing, postprocessing); the bundle and the gazemonai code travel with the model.",
        "",
    ]
    about = [str(meta[k]).rstrip(". ") + "." for k in ("task", "description", "intended_use") if meta.get(k)]
    lines += [" ".join(about)] if about else []
    if in_channels > 1:
        given = f"(N, H, W, {in_channels}) uint8 {'RGB' if in_channels == 3 else 'channels'}"
    else:
        given = "(N, H, W) float32 raw intensities"
    lines += [
        "",
        f"- **Input** `{INPUT_NAME}`: {given}, any height and width; **output** `{OUTPUT_NAME}`: "
        "(N, H, W) uint8, 1 = "
        + str(meta.get("label_classes", "foreground")).split("1 = ")[-1]
        + ", the masks `inference.json` writes.",
        f'- **Load**: `mlflow.pyfunc.load_model("{uri}").predict(images)`',
        f"- **Serve**: `mlflow models serve -m {uri} --env-manager local` (POST /invocations "
        '`{"inputs": ...}`); a fresh environment (`--env-manager virtualenv`) gets only what serving '
        "imports: " + ", ".join(SERVING_REQUIREMENTS),
        f"- **Run the bundle**: `gazemonai predict --model {uri} --images DIR --out DIR`, "
        f"`gazemonai evaluate --model {uri} --dataset-dir DIR --out DIR`",
        "",
        "| version | supervision | validation Dice (epoch) | training run |",
        "|---|---|---|---|",
    ]
    for v in newest_first[:DESCRIBED_VERSIONS]:
        tags = v.tags or {}
        dice = (
            f"{tags['val_mean_dice']} ({tags.get('val_mean_dice_epoch', '?')})"
            if "val_mean_dice" in tags
            else "-"
        )
        lines.append(
            f"| {v.version} | {tags.get('supervision', '-')} | {dice} | {tags.get('training_run_id', '-')} |"
        )
    if len(newest_first) > DESCRIBED_VERSIONS:
        older = len(newest_first) - DESCRIBED_VERSIONS
        lines.append(f"| ... | {older} older versions: the registry's list of versions | | |")
    lines += [
        "",
        "Written by `gazemonai register` with each new version; a description edited by hand is kept.",
    ]
    return "\n".join(lines)


#: model URIs that name a registry's model or a run's artifact; anything else is a path or a store
REGISTRY_SCHEMES = ("models:/", "runs:/")


def download_registered_bundle(
    model_uri: str, dest: str | os.PathLike, tracking_uri: str | None = None, any_uri: bool = False
) -> Path:
    """The bundle folder (configs + ``models/model.pt``) of a registered gazemonai model.

    Args:
        model_uri: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/model``, ...
        dest: a folder to download into.
        tracking_uri: the registry's tracking URI (default: ``MLFLOW_TRACKING_URI``).
        any_uri: also accept URIs other than ``models:/`` and ``runs:/`` (a local folder, ``file:``,
            ``s3://`` ...), which MLflow reads as paths; refused unless asked for.

    Raises:
        InvalidInputError: the model is not one ``gazemonai register`` logged, or its URI is not a
            registry's and ``any_uri`` is not set.
        TrackingUnavailableError: the tracking server does not answer.
    """
    if not any_uri and not str(model_uri).startswith(REGISTRY_SCHEMES):
        raise InvalidInputError(
            f"model {model_uri!r} is not a registry URI (models:/NAME/VERSION, models:/NAME@ALIAS or "
            "runs:/RUN_ID/model); MLflow would read it as a path: to load it anyway, add --any-model-uri"
        )
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise InvalidInputError(
            f"where is the registry holding {model_uri}? give --tracking-uri or set MLFLOW_TRACKING_URI"
        )
    with _tracking(uri):
        _reachable(uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest)))
        except mlflow.exceptions.MlflowException as e:
            if is_outage(e):
                raise _unreachable(uri) from e
            raise InvalidInputError(f"cannot fetch {model_uri} from {uri}: {_first_line(e)}") from e
    bundle = local / "artifacts" / "bundle"
    if not all((bundle / f).is_file() for f in ("configs/inference.json", "models/model.pt")):
        raise InvalidInputError(f"{model_uri} is not a model gazemonai register logged (no bundle in it)")
    try:
        check_staged_bundle(bundle)
    except InvalidInputError as e:
        raise InvalidInputError(str(e).replace(str(bundle), model_uri)) from e
    return bundle


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_registered_bundle(
    model_uri: str,
    task: str,
    out: str | os.PathLike,
    tracking_uri: str | None = None,
    any_uri: bool = False,
    **overrides,
) -> Path:
    """Run a registered model's bundle: ``evaluate`` (``train.json`` + ``evaluate.json``) or ``inference``.

    Evaluation uses the model and validation-split settings the model was trained with
    (:func:`~gazemonai.serve.staging.evaluation_overrides`) and writes what ``evaluate.json`` writes
    (``<out>/outputs/metrics_<split>.json``, an MLflow run in ``<out>/outputs/mlruns.db``); inference
    writes one mask per image into ``out``.

    Args:
        model_uri: the registered model, e.g. ``models:/kvasir_gaze@champion``.
        task: ``"evaluate"`` or ``"inference"``.
        out: evaluation: the run folder (``bundle_root``); inference: the mask folder.
        tracking_uri: the registry's tracking URI (default: ``MLFLOW_TRACKING_URI``).
        any_uri: accept a model URI that is not a registry's (:func:`download_registered_bundle`).
        overrides: bundle values (``dataset_dir``, ``eval_split``, ...).

    Returns:
        the metrics file (evaluate) or the mask folder (inference).
    """
    from monai.bundle import run

    if task not in ("evaluate", "inference"):
        raise InvalidInputError(f"task must be evaluate or inference, got {task!r}")
    out = Path(config_path("--out", out))
    for name in ("dataset_dir", "gaze_csv", "image_labels"):
        if overrides.get(name) is not None:
            flag = "--images" if task == "inference" else "--" + name.replace("_", "-")
            overrides[name] = config_path(flag, overrides[name])
    with tempfile.TemporaryDirectory() as tmp:
        bundle = download_registered_bundle(model_uri, tmp, tracking_uri, any_uri)
        configs = bundle / "configs"
        logger.info("running %s of %s (%s)", task, model_uri, bundle)
        if task == "evaluate":
            settings = {**evaluation_overrides(bundle), **overrides}
            run(
                config_file=[str(configs / "train.json"), str(configs / "evaluate.json")],
                meta_file=str(configs / "metadata.json"),
                bundle_root=str(out),
                ckpt_dir=str(bundle / "models"),
                **settings,
            )
            split = str(settings.get("eval_split", "test")).replace(".txt", "").replace("/", "_")
            return out / "outputs" / f"metrics_{split}.json"
        run(
            config_file=str(configs / "inference.json"),
            meta_file=str(configs / "metadata.json"),
            bundle_root=str(bundle),
            output_dir=str(out),
            **overrides,
        )
        return out


def bundle_predictor(
    dest: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    bundle_dir: str | os.PathLike | None = None,
    model_uri: str | None = None,
    tracking_uri: str | None = None,
    any_uri: bool = False,
) -> BundlePyfuncModel:
    """A loaded :class:`BundlePyfuncModel` from a checkpoint and its bundle, or from a registered model.

    A checkpoint is staged with the settings its recorded training used (``models/mlflow_run.json``).

    Args:
        dest: a folder for the staged or downloaded bundle (kept while the model is used).
        checkpoint: trained weights (with ``bundle_dir``).
        bundle_dir: the checkpoint's bundle, e.g. ``bundles/prostate_gaze``.
        model_uri: a registered model instead (``models:/NAME@ALIAS``).
        tracking_uri: the registry (default ``MLFLOW_TRACKING_URI``).
        any_uri: accept a model URI that is not a registry's (:func:`download_registered_bundle`).
    """
    dest = Path(dest)
    if model_uri is not None:
        staged = download_registered_bundle(model_uri, dest, tracking_uri, any_uri)
    elif checkpoint is not None:
        if bundle_dir is None:
            raise InvalidInputError("a checkpoint needs its bundle: give --bundle-dir (bundles/<name>)")
        bundle, ckpt = locate_bundle(bundle_dir, checkpoint)
        return _load_staged(bundle, ckpt, None, dest)[1]  # with the recorded training's model settings
    else:
        raise InvalidInputError("which model? give a checkpoint (--checkpoint, --bundle-dir) or --model")
    model = BundlePyfuncModel()

    class _Context:
        artifacts = {"bundle": str(staged)}

    model.load_context(_Context())
    return model
