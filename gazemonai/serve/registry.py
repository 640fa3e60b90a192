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

The ``gazemonai`` package travels with the model (``code_paths``), so loading needs only its
dependencies.
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
from ..train.checkpoints import load_weights
from ..train.tracking import fail_fast_http, is_outage
from .staging import locate_bundle, stage_bundle

__all__ = ["BundlePyfuncModel", "log_bundle_model", "register_bundle"]

logger = logging.getLogger(__name__)


class BundlePyfuncModel(PythonModel):
    """An ``mlflow.pyfunc`` model that runs a bundle's ``configs/inference.json`` in memory.

    ``predict`` takes a batch of same-sized images in the bundle's raw intensity range: (N, H, W, C)
    ``uint8`` for RGB endoscopy, (N, H, W) ``float32`` for single-channel images (the registered
    signature says which). It returns (N, H, W) ``uint8`` masks (0/1) at the input size — the same
    masks the bundle's inference writes as PNG files.
    """

    def load_context(self, context) -> None:
        import torch
        from monai.bundle import ConfigParser
        from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

        from ..train.transforms import SaveMaskd

        bundle = Path(context.artifacts["bundle"])
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["bundle_root"] = str(bundle)
        parser["device"] = "$torch.device('cpu')"
        self.device = torch.device("cpu")
        self.network = parser.get_parsed_content("network_def")
        ckpt = bundle / "models" / "model.pt"
        state = load_weights(ckpt)
        try:
            self.network.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        except RuntimeError as e:  # missing/unexpected keys, shape mismatches: widths, levels, channels
            raise CheckpointMismatchError(
                f"checkpoint {ckpt} does not fit {bundle}/configs/inference.json: {e}"
            ) from e
        self.network.eval()
        self.in_channels = int(parser.get_parsed_content("in_channels", default=3))
        pre = parser.get_parsed_content("preprocessing")
        # files are loaded by the caller: keep everything after loading and channel handling
        self.preprocessing = Compose(
            [t for t in pre.transforms if not isinstance(t, (LoadImaged, EnsureChannelFirstd))]
        )
        post = parser.get_parsed_content("postprocessing")
        self.postprocessing = Compose([t for t in post.transforms if not isinstance(t, SaveMaskd)])
        self.inferer = parser.get_parsed_content("inferer")

    def _as_batch(self, images) -> np.ndarray:
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

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch
        from monai.data import MetaTensor

        images = self._as_batch(model_input)
        masks = []
        with torch.no_grad():
            for image in images:
                # (H, W, C) -> (C, H, W), as LoadImaged + EnsureChannelFirstd give the bundle
                chw = np.ascontiguousarray(image.transpose(2, 0, 1))
                data = {"image": MetaTensor(torch.as_tensor(chw).float())}
                data = self.preprocessing(data)
                data["pred"] = self.inferer(data["image"][None].to(self.device), self.network)[0]
                data = self.postprocessing(data)
                masks.append(np.asarray(data["pred"].detach().cpu())[0].astype(np.uint8))
        return np.stack(masks)


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        reqs = [r.split(";")[0].strip() for r in (requires("gazemonai") or []) if "extra ==" not in r]
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        reqs = ["torch", "monai", "pytorch-ignite", "mlflow", "numpy", "scipy", "pillow"]
    pinned = []
    for r in reqs:
        name = r.split(">")[0].split("=")[0].split("<")[0].strip()
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(r)
    return pinned


def _signature(in_channels: int):
    """Any batch, any height and width: (N, H, W, C) uint8 RGB, or (N, H, W) float32 single-channel."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    if in_channels > 1:
        inputs = TensorSpec(np.dtype(np.uint8), (-1, -1, -1, in_channels))
    else:
        inputs = TensorSpec(np.dtype(np.float32), (-1, -1, -1))
    return ModelSignature(Schema([inputs]), Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]))


def _load_staged(bundle: Path, ckpt: Path, overrides: dict | None, dest: Path):
    """Stage the bundle and load it as the served model would; a checkpoint that does not fit fails."""
    staged = stage_bundle(bundle, dest / "bundle", ckpt, overrides)
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
    """Ask a tracking server once, failing fast (MLflow's own retries take minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    fail_fast_http()
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:
        if is_outage(e):
            raise TrackingUnavailableError(f"the MLflow tracking server at {uri} cannot be reached") from e
        raise


def register_bundle(
    bundle_dir: str | os.PathLike,
    name: str,
    checkpoint: str | os.PathLike | None = None,
    overrides: dict | None = None,
    tracking_uri: str | None = None,
    experiment_name: str = "gazemonai_registry",
    run_id: str | None = None,
):
    """Register a trained bundle as a new version of model ``name`` in the MLflow model registry.

    Args:
        bundle_dir: the bundle folder (``configs/inference.json``), e.g. ``bundles/kvasir_gaze``.
        name: registered model name.
        checkpoint: the trained weights; default ``bundle_dir/models/model.pt``.
        overrides: inference.json values the checkpoint was trained with (``image_size``, ...).
        tracking_uri: MLflow tracking/registry URI (a server ``http://...`` or ``sqlite:///...``);
            default: ``MLFLOW_TRACKING_URI``, else the training's store next to the checkpoint
            (``<bundle_root>/outputs/mlruns.db``).
        experiment_name: experiment of the logging run (when ``run_id`` is not given).
        run_id: log the model into this existing run, e.g. the training run the MLflow handler
            created, so that the model version links to its metrics and parameters.

    Returns:
        mlflow's ``ModelInfo``; ``registered_model_version`` is the new version.
    """
    from monai.utils import path_to_sqlite_uri

    bundle, ckpt = locate_bundle(bundle_dir, checkpoint)
    if tracking_uri is None:
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or path_to_sqlite_uri(
            str(ckpt.resolve().parent.parent / "outputs" / "mlruns.db")
        )
    with tempfile.TemporaryDirectory() as tmp, _tracking(tracking_uri):
        staged, model = _load_staged(bundle, ckpt, overrides, Path(tmp))  # fails before a run exists
        _reachable(tracking_uri)
        if run_id is None:
            mlflow.set_experiment(experiment_name)
        with mlflow.start_run(run_id=run_id) as run:
            info = _log_staged(staged, model, "model", name)
            logger.info(
                "registered %s version %s (run %s)", name, info.registered_model_version, run.info.run_id
            )
    return info
