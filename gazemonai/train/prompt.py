"""Image-label prompts: a classifier trained on image-level labels guides the segmentation network.

Chen, Yang, Lei and Zhang, "Skip and Skip: Segmenting Medical Images with Prompts" (SKS,
arXiv:2406.14958, 2024): clinics hold far more images with an image-level diagnosis than with
masks. A dual U-shaped, two-stage framework:

1. **stage 1** trains a classification network on image-level labels
   (:class:`~gazemonai.train.networks.PyramidClassifier`); its hierarchical (pyramid) features are
   what is kept: by default (``prompt_stage1_arch: unet``) the classifier is itself a U-Net and the
   pyramid is its decoder's levels, as the paper's dual U-shaped design has it; ``encoder`` keeps
   its encoder's levels only;
2. **stage 2** trains a segmentation U-Net on pixel-level labels (full masks, or our gaze
   pseudo-masks) whose encoder and decoder receive the stage-1 pyramid
   (:class:`~gazemonai.train.networks.PromptedFeatureUNet`) through

   * *short skips*, same level: the encoder's level-``i`` feature map ``e_i`` becomes
     ``W [e_i ; g_i] + b`` (the paper's fusion: concatenation, then a learned linear map; here a
     1x1 convolution), and what goes down the encoder and across to the decoder is the fused map;
   * *long skips*, across levels: the decoder's map at level ``i`` (resolution ``1/2^i``) is fused
     with the stage-1 map one level deeper, ``g_{i+1}``, upsampled (bilinear) to its size, so the
     classifier's coarser, more semantic features reach every finer decoder stage.

What differs from the paper, and why: SKS's guidance branch is a Swin Transformer V2 pyramid;
here both branches are built from MONAI's BasicUNet blocks (the stage-1 encoder is a BasicUNet
encoder with the segmentation network's widths), so the prompt costs one extra encoder pass and fits
the CPU profile; the stage-1 head pools every pyramid level (global average) into one linear
classifier, so each level is trained to be discriminative. The stage-1 network is frozen in stage 2
by default (``freeze_prompt``): the few pixel labels of stage 2 then cannot overwrite what the many
image labels taught, and the backward pass skips it.

Stage 2's network is :class:`~gazemonai.train.networks.MultiLevelNet` with ``prompt_features``
set: one shared stage-1 network whose pyramid is computed once per batch for all level networks,
so the gaze levels, the cross-level consistency, full supervision, evaluation, inference and
serving work as they are (``prompt_features`` is a model setting that staging carries). This
module loads stage 1 into it: :class:`PromptWeights` when stage-2 training starts, through
:func:`load_prompt_weights`, which refuses a checkpoint of another shape with the setting to fix.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from ignite.engine import Engine, Events

from ..errors import GazemonaiError, InvalidInputError, MissingInputError
from .checkpoints import load_weights, model_weights, unwrap
from .networks import MultiLevelNet

__all__ = ["load_prompt_weights", "PromptWeights"]

logger = logging.getLogger(__name__)


def _require(path: str | os.PathLike) -> None:
    if not os.path.isfile(path):
        raise MissingInputError(
            f"stage-1 checkpoint {os.fspath(path)!r} not found: train stage 1 first "
            "(configs/prompt_stage1.json) or pass --prompt_checkpoint"
        )


def load_prompt_weights(network: MultiLevelNet, path: str | os.PathLike) -> None:
    """Load a stage-1 checkpoint (a ``PyramidClassifier``'s ``model.pt``) into ``network.prompt``.

    Every parameter must be present with the same shape; a checkpoint of another width, channel
    count or class count is refused with the settings that differ, before anything is loaded.

    Raises:
        MissingInputError: no file at ``path``.
        InvalidInputError: not a stage-1 checkpoint, or one of another shape (names the tensor and
            both shapes).
    """
    network = unwrap(network)
    if not isinstance(network, MultiLevelNet) or network.prompt is None:
        raise InvalidInputError(
            f"the stage-1 prompt loads into a MultiLevelNet with prompt_features, got a "
            f"{type(network).__name__} without one (is configs/prompt_stage2.json in the config list?)"
        )
    _require(path)
    state = model_weights(load_weights(path))  # bare (CheckpointSaver) or {"model": ...} (bundles < 0.5.0)
    if not isinstance(state, Mapping):
        raise InvalidInputError(f"{os.fspath(path)} holds no state dict (a {type(state).__name__})")
    expected = network.prompt.state_dict()
    if any(k.startswith("levels.") for k in state) or "head.weight" not in state:
        raise InvalidInputError(
            f"{os.fspath(path)} is not a stage-1 classifier checkpoint (no 'head.weight'; "
            f"first keys: {', '.join(list(state)[:3])})"
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        found = _widths_of(state)
        parts = []
        if wrong:
            k, got, want = wrong[0]
            parts.append(
                f"{len(wrong)} tensor(s) of another shape, e.g. {k}: checkpoint {got}, network {want}"
            )
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise InvalidInputError(
            f"stage-1 checkpoint {os.fspath(path)} does not fit this stage-2 network: {'; '.join(parts)}. "
            f"The checkpoint's classifier has widths {found['widths']}, {found['in_channels']} input "
            f"channel(s), {found['classes']} class logit(s), form {found['arch']!r}; this network's stage-1 "
            f"part has widths {list(network.prompt.pyramid_channels)}, "
            f"{network.prompt.conv_0.conv_0.conv.in_channels} input channel(s), "
            f"{network.prompt.head.out_features} logit(s), form {network.prompt.arch!r}: set "
            "--prompt_features / --features, --in_channels, --prompt_stage1_arch to those stage 1 was "
            "trained with"
        )
    network.prompt.load_state_dict(state)
    logger.info("stage-1 prompt loaded from %s", path)


def _widths_of(state) -> dict:
    """Widths, input channels and logits of a :class:`PyramidClassifier` state dict, as far as it tells."""
    widths = []
    for i in range(5):
        key = "conv_0.conv_1.conv.weight" if i == 0 else f"downs.{i - 1}.convs.conv_1.conv.weight"
        if key in state:
            widths.append(int(state[key].shape[0]))
    first = state.get("conv_0.conv_0.conv.weight")
    head = state.get("head.weight")
    return {
        "arch": "unet" if any(k.startswith("ups.") for k in state) else "encoder",
        "widths": widths or "unknown",
        "in_channels": int(first.shape[1]) if first is not None else "?",
        "classes": int(head.shape[0]) if head is not None else "?",
    }


class PromptWeights:
    """Ignite handler: load the stage-1 checkpoint into the stage-2 network when training starts.

    A resumed run (iteration > 0 once the latest checkpoint is loaded) keeps what it resumed. The
    file is checked when the handler is made (before any training), loaded at ``STARTED``; a
    checkpoint that does not fit stops the run with one line naming it and exit status 2.

    Args:
        load_path: stage 1's ``model.pt``.
        network: the stage-2 :class:`~gazemonai.train.networks.MultiLevelNet` (with ``prompt_features``).
    """

    def __init__(self, load_path: str, network: MultiLevelNet) -> None:
        self.load_path = load_path
        self.network = network
        _require(load_path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._load)

    def _load(self, engine: Engine) -> None:
        if engine.state.iteration > 0:
            logger.info(
                "resumed at iteration %d: the stage-1 prompt comes from the checkpoint",
                engine.state.iteration,
            )
            return
        try:
            load_prompt_weights(self.network, self.load_path)
        except GazemonaiError as e:  # one line and exit status 2, as a bad setting (not a traceback)
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from e
