"""A trained bundle's network as TorchScript and ONNX files that take any image size.

The exported network is the one users train and infer with, the bundle's ``network_def``
(:class:`~gazemonai.train.networks.MultiLevelNet`, ``output="ensemble"``: the mean of the level
networks' logits). It is scriptable, so the model zoo's own command works on a training's
``models/model.pt`` (a bare state dict)::

    python -m monai.bundle ckpt_export network_def --filepath models/model.ts \
        --ckpt_file models/model.pt --meta_file configs/metadata.json --config_file configs/inference.json

**Any size.** MONAI's ``BasicUNet`` halves the image four times; for a side that is not a multiple of
16 its decoder pads the upsampled maps to fit the skip connections, a shape-dependent branch that a
traced graph freezes at one size. ``MultiLevelNet`` itself pads its input to the next multiple of 16
(replicating the border) and crops the output back, in eager, TorchScript and ONNX form alike, so the
three compute the same thing at every size.

:func:`export_bundle` writes both files with MONAI's exporters, from a bundle's configs and a
checkpoint (the settings of a recorded training are used, as ``gazemonai register`` does), and
checks each file against the eager network on two sizes before it reports success.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointMismatchError, InvalidInputError
from ..train.checkpoints import load_weights, model_weights
from ..train.networks import MultiLevelNet
from .staging import locate_bundle, stage_bundle

__all__ = ["OnnxNetwork", "export_bundle", "FORMATS"]

logger = logging.getLogger(__name__)

#: what :func:`export_bundle` can write, and the file each goes to (model-zoo names)
FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}


class OnnxNetwork(nn.Module):
    """An exported ``model.onnx`` run by onnxruntime, callable like the network in MONAI engines.

    Args:
        path: the ONNX file.
        providers: onnxruntime execution providers (default: CUDA when torch sees a GPU and
            onnxruntime has it, else CPU).
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        if providers is None:
            available = ort.get_available_providers()
            providers = [
                p
                for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                if p in available and (p != "CUDAExecutionProvider" or torch.cuda.is_available())
            ]
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).numpy()
        (out,) = self.session.run(None, {self.input_name: np.ascontiguousarray(array)})
        return torch.from_numpy(out).to(x.device)


def _eager_network(staged: Path) -> tuple[MultiLevelNet, str]:
    """The staged bundle's network with its weights (strict), and the checkpoint's weights key."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(staged / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    state = load_weights(staged / "models" / "model.pt")
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"checkpoint holds a {type(state).__name__}, not a state dict")
    key = "model" if isinstance(state.get("model"), dict) else ""  # bundles < 0.5.0: {"model": weights}
    try:
        network.load_state_dict(model_weights(state))
    except RuntimeError as e:
        raise CheckpointMismatchError(f"checkpoint does not fit the bundle's inference.json: {e}") from e
    return network.eval(), key


@contextlib.contextmanager
def _quiet(name: str, level: int = logging.WARNING):
    """Logger ``name`` shows records of ``level`` and above only, while the block runs."""
    log = logging.getLogger(name)
    previous = log.level
    log.setLevel(max(level, previous))
    try:
        yield
    finally:
        log.setLevel(previous)


def _check_sizes(staged: Path) -> list[list[int]]:
    """The sizes each export is checked at: the bundle's ``image_size`` and 50x70 (not a multiple of 16)."""
    config = json.loads((staged / "configs" / "inference.json").read_text())
    in_channels = int(config.get("in_channels", 3))
    size = [int(s) for s in config.get("image_size", [64, 64])]
    return [[2, in_channels, *size], [1, in_channels, 50, 70]]


def export_bundle(
    bundle_dir: str | os.PathLike,
    out: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    formats: tuple[str, ...] = ("torchscript", "onnx"),
    overrides: dict | None = None,
) -> dict:
    """Export a bundle's trained network as ``model.ts`` (TorchScript) and ``model.onnx``.

    TorchScript goes through MONAI's ``ckpt_export`` (scripted; the bundle's metadata and
    ``inference.json`` are stored in the file, as the model zoo does), ONNX through MONAI's
    ``onnx_export`` (batch, height and width dynamic; input ``image``, output ``pred``). Each file is
    loaded back and compared with the eager network on the bundle's ``image_size`` and on 50x70.

    Args:
        bundle_dir: the bundle folder (``configs/inference.json``, ``configs/metadata.json``).
        out: the folder to write the files to (e.g. the training's ``models/``).
        checkpoint: the trained weights; default ``bundle_dir/models/model.pt``.
        formats: any of :data:`FORMATS`.
        overrides: ``inference.json`` values; by default those of the recorded training
            (``models/mlflow_run.json``, read as checked data) for ``num_levels``, ``features``,
            ``in_channels``, ``image_size``, ``prompt_features``.

    Returns:
        per format: the file, and the largest absolute difference from the eager network per size.

    Raises:
        InvalidInputError: an unknown format.
        CheckpointMismatchError: the checkpoint does not fit the configs, or an export does not
            reproduce the eager network (within 1e-4).
    """
    from monai.bundle import ckpt_export, onnx_export

    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InvalidInputError(f"formats must be among {sorted(FORMATS)}, got {list(formats)}")
    bundle, ckpt = locate_bundle(bundle_dir, checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_bundle(bundle, Path(tmp) / "bundle", ckpt, overrides or None)
        reference, key = _eager_network(staged)  # a checkpoint that does not fit fails here, first
        configs = staged / "configs"
        common = {
            "net_id": "network_def",
            "ckpt_file": str(staged / "models" / "model.pt"),
            "key_in_ckpt": key,
            "meta_file": str(configs / "metadata.json"),
            "config_file": str(configs / "inference.json"),
        }
        sizes = _check_sizes(staged)
        for fmt in formats:
            path = out / FORMATS[fmt]
            if fmt == "torchscript":
                ckpt_export(filepath=str(path), **common)
                exported = torch.jit.load(str(path), map_location="cpu").eval()
            else:
                with _quiet("onnx_ir"):  # its initializer deduplication logs each of ~130 merges at INFO
                    onnx_export(
                        filepath=str(path),
                        input_shape=sizes[0],
                        converter_kwargs={
                            "input_names": ["image"],
                            "output_names": ["pred"],
                            "dynamic_axes": {"image": {0: "batch", 2: "height", 3: "width"}},
                        },
                        **common,
                    )
                exported = OnnxNetwork(path, providers=["CPUExecutionProvider"])
            differences = {}
            torch.manual_seed(0)
            for shape in sizes:
                x = torch.rand(shape)
                with torch.no_grad():
                    got, expected = exported(x), reference(x)
                if got.shape != expected.shape:
                    raise CheckpointMismatchError(f"{path}: output {tuple(got.shape)} for input {shape}")
                differences["x".join(map(str, shape[2:]))] = float((got - expected).abs().max())
            worst = max(differences.values())
            if worst > 1e-4:
                raise CheckpointMismatchError(
                    f"{path} does not reproduce the network: largest difference {worst:.3g} ({differences})"
                )
            logger.info("exported %s: %s (largest difference from eager %s)", fmt, path, differences)
            results[fmt] = {"path": str(path), "max_abs_difference": differences}
    return results
