"""Image-label prompts: a classifier trained on image-level labels guides the segmentation network.

Chen, Yang, Lei and Zhang, "Skip and Skip: Segmenting Medical Images with Prompts" (SKS,
arXiv:2406.14958, 2024): clinics hold far more images with an image-level diagnosis than with
masks. A dual U-shaped, two-stage framework:

1. **stage 1** trains a classification network on image-level labels (:class:`PyramidClassifier`);
   its encoder's hierarchical (pyramid) features are what is kept;
2. **stage 2** trains a segmentation U-Net on pixel-level labels (full masks, or our gaze
   pseudo-masks) whose encoder and decoder receive the stage-1 pyramid
   (:class:`PromptedFeatureUNet`) through

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

:class:`PromptedMultiLevelNet` is :class:`~gazemonai.train.networks.MultiLevelNet` with one shared
stage-1 network whose pyramid is computed once per batch for all level networks, so the gaze levels,
the cross-level consistency, full supervision and the bundles' evaluation work as they are.
:class:`PromptWeights` loads the stage-1 checkpoint into it when stage-2 training starts
(:func:`load_prompt_weights` refuses a checkpoint of another shape with the setting to fix).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from monai.networks.nets.basic_unet import Down, TwoConv
from torch import nn

from ..errors import GazemonaiError, InvalidInputError, MissingInputError
from .checkpoints import load_weights
from .networks import FeatureUNet, MultiLevelNet

__all__ = [
    "PyramidClassifier",
    "PromptedFeatureUNet",
    "PromptedMultiLevelNet",
    "load_prompt_weights",
    "PromptWeights",
]

logger = logging.getLogger(__name__)

_NORM = ("group", {"num_groups": 4})
_ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})


def _encoder_widths(features: Sequence[int]) -> tuple[int, ...]:
    features = tuple(int(f) for f in features)
    if len(features) not in (5, 6) or min(features) < 1:
        raise InvalidInputError(
            f"features must be 5 encoder widths or BasicUNet's 6 (the encoder's 5 are used), got {features}"
        )
    return features[:5]


class PyramidClassifier(nn.Module):
    """Stage 1 of SKS (Chen et al., arXiv:2406.14958): an image classifier that keeps its pyramid.

    A BasicUNet encoder (MONAI's ``TwoConv`` and ``Down`` blocks: five levels, resolution 1, 1/2,
    ..., 1/16) whose level maps are each globally averaged and concatenated into one linear layer.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: logits (1: binary, trained with BCE).
        features: the five encoder widths, or BasicUNet's six (the segmentation network's
            ``features``; the first five are used, so the pyramid matches its encoder).
        norm: normalisation of the blocks.
        act: activation of the blocks.
        dropout: dropout of the blocks and before the linear layer.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int = 1,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        norm: str | tuple = _NORM,
        act: str | tuple = _ACT,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise InvalidInputError(f"num_classes must be >= 1, got {num_classes}")
        widths = _encoder_widths(features)
        self.pyramid_channels = widths
        self.spatial_dims = int(spatial_dims)
        self.conv_0 = TwoConv(spatial_dims, in_channels, widths[0], act, norm, True, dropout)
        self.downs = nn.ModuleList(
            Down(spatial_dims, widths[i - 1], widths[i], act, norm, True, dropout) for i in range(1, 5)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(sum(widths), int(num_classes))

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five level maps ``g_0 .. g_4`` (widths :attr:`pyramid_channels`, resolution 1/2^i)."""
        maps = [self.conv_0(x)]
        for down in self.downs:
            maps.append(down(maps[-1]))
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [m.flatten(2).mean(-1) for m in self.pyramid(x)]
        return self.head(self.dropout(torch.cat(pooled, dim=1)))


class PromptedFeatureUNet(FeatureUNet):
    """Stage 2 of SKS: :class:`~gazemonai.train.networks.FeatureUNet` fed a stage-1 pyramid.

    Called as ``net(x, pyramid)`` with ``pyramid`` the five maps of
    :meth:`PyramidClassifier.pyramid`. Short skips fuse ``g_i`` into encoder level ``i``
    (``W [e_i ; g_i] + b``); long skips fuse ``g_{i+1}``, upsampled, into the decoder map at level
    ``i`` (see :mod:`gazemonai.train.prompt`).

    Args:
        prompt_channels: the stage-1 pyramid's five widths (default: the encoder's own).
        unet_kwargs: :class:`~gazemonai.train.networks.FeatureUNet`'s arguments.
    """

    def __init__(self, prompt_channels: Sequence[int] | None = None, **unet_kwargs) -> None:
        super().__init__(**unet_kwargs)
        features = tuple(int(f) for f in unet_kwargs.get("features", (64, 128, 256, 512, 1024, 128)))
        widths = _encoder_widths(features if prompt_channels is None else prompt_channels)
        self.prompt_channels = widths
        dims = int(unet_kwargs.get("spatial_dims", 2))
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        encoder = features[:5]
        decoder = (features[5], features[1], features[2], features[3])  # u1, u2, u3, u4
        self.short_skips = nn.ModuleList(conv(encoder[i] + widths[i], encoder[i], 1) for i in range(5))
        self.long_skips = nn.ModuleList(conv(decoder[i] + widths[i + 1], decoder[i], 1) for i in range(4))

    @staticmethod
    def _fuse(fusion: nn.Module, x: torch.Tensor, g: torch.Tensor, resize: bool = False) -> torch.Tensor:
        if g.shape[2:] != x.shape[2:]:
            if not resize:
                raise InvalidInputError(
                    f"prompt pyramid map of size {tuple(g.shape[2:])} does not match the encoder's "
                    f"{tuple(x.shape[2:])}: was it computed from the same image?"
                )
            mode = "bilinear" if x.dim() == 4 else "trilinear"
            g = nn.functional.interpolate(g, size=x.shape[2:], mode=mode, align_corners=False)
        return fusion(torch.cat([x, g.to(x.dtype)], dim=1))

    def _features(self, x: torch.Tensor, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(pyramid) != 5:
            raise InvalidInputError(f"the prompt pyramid must hold 5 maps, got {len(pyramid)}")
        b, short, long = self.backbone, self.short_skips, self.long_skips
        x0 = self._fuse(short[0], b.conv_0(x), pyramid[0])
        x1 = self._fuse(short[1], b.down_1(x0), pyramid[1])
        x2 = self._fuse(short[2], b.down_2(x1), pyramid[2])
        x3 = self._fuse(short[3], b.down_3(x2), pyramid[3])
        x4 = self._fuse(short[4], b.down_4(x3), pyramid[4])
        u4 = self._fuse(long[3], b.upcat_4(x4, x3), pyramid[4], resize=True)
        u3 = self._fuse(long[2], b.upcat_3(u4, x2), pyramid[3], resize=True)
        u2 = self._fuse(long[1], b.upcat_2(u3, x1), pyramid[2], resize=True)
        u1 = self._fuse(long[0], b.upcat_1(u2, x0), pyramid[1], resize=True)
        return b.final_conv(u1)

    def forward(self, x: torch.Tensor, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self._features(x, pyramid))

    def forward_features(self, x: torch.Tensor, pyramid: Sequence[torch.Tensor]):
        """``(logits, feature map)``, as :meth:`FeatureUNet.forward_features`."""
        feat = self._features(x, pyramid)
        return self.classifier(feat), feat


class PromptedMultiLevelNet(MultiLevelNet):
    """:class:`~gazemonai.train.networks.MultiLevelNet` with its level networks prompted by one stage-1 net.

    SKS (Chen et al., arXiv:2406.14958), stage 2 with gazemonai's levels: the stage-1
    :class:`PyramidClassifier` (attribute ``prompt``) computes its pyramid once per batch and every
    level network (a :class:`PromptedFeatureUNet`) receives it. Outputs are those of
    :class:`MultiLevelNet` (``"ensemble"``, ``"stack"``, ``"train"``), so losses, metrics and the
    bundles' evaluation and inference are unchanged.

    Args:
        prompt_features: the stage-1 network's widths (five, or six as ``features``; default:
            ``features``). Must match the stage-1 checkpoint (:func:`load_prompt_weights`).
        prompt_classes: the stage-1 network's logits (its head is kept, unused in stage 2).
        freeze_prompt: keep the stage-1 network fixed (no gradients, evaluation mode), the default;
            ``False`` fine-tunes it with the segmentation loss.
        kwargs: :class:`MultiLevelNet`'s arguments (``num_levels``, ``features``, ``in_channels``, ...).
    """

    def __init__(
        self,
        prompt_features: Sequence[int] | None = None,
        prompt_classes: int = 1,
        freeze_prompt: bool = True,
        **kwargs,
    ) -> None:
        if not isinstance(freeze_prompt, bool):
            raise InvalidInputError(f"freeze_prompt must be True or False, got {freeze_prompt!r}")
        features = kwargs.get("features", (64, 128, 256, 512, 1024, 128))
        prompt_features = _encoder_widths(features if prompt_features is None else prompt_features)
        super().__init__(prompt_channels=prompt_features, **kwargs)
        self.prompt = PyramidClassifier(
            spatial_dims=kwargs.get("spatial_dims", 2),
            in_channels=kwargs.get("in_channels", 3),
            num_classes=prompt_classes,
            features=prompt_features,
        )
        self.freeze_prompt = freeze_prompt
        if freeze_prompt:
            self.prompt.requires_grad_(False)
            self.prompt.eval()

    def make_level(self, **unet_kwargs) -> nn.Module:
        return PromptedFeatureUNet(**unet_kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_prompt:
            self.prompt.eval()
        return self

    def level_inputs(self, x: torch.Tensor) -> tuple:
        if self.freeze_prompt:
            with torch.no_grad():
                return (x, self.prompt.pyramid(x))
        return (x, self.prompt.pyramid(x))


def load_prompt_weights(network: PromptedMultiLevelNet, path: str | os.PathLike) -> None:
    """Load a stage-1 checkpoint (a :class:`PyramidClassifier`'s ``model.pt``) into ``network.prompt``.

    Every parameter must be present with the same shape; a checkpoint of another width, channel
    count or class count is refused with the settings that differ, before anything is loaded.

    Raises:
        MissingInputError: no file at ``path``.
        InvalidInputError: not a stage-1 checkpoint, or one of another shape (names the tensor and
            both shapes).
    """
    if not isinstance(network, PromptedMultiLevelNet):
        raise InvalidInputError(
            f"the stage-1 prompt loads into a PromptedMultiLevelNet, got {type(network).__name__} "
            "(is configs/prompt_stage2.json in the config list?)"
        )
    if not os.path.isfile(path):
        raise MissingInputError(
            f"stage-1 checkpoint {os.fspath(path)!r} not found: train stage 1 first "
            "(configs/prompt_stage1.json) or pass --prompt_checkpoint"
        )
    state = load_weights(path)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # BestCheckpoint's {"model": state_dict}
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
            f"channel(s), {found['classes']} class logit(s); this network's stage-1 part has widths "
            f"{list(network.prompt.pyramid_channels)}, {network.prompt.conv_0.conv_0.conv.in_channels} input "
            f"channel(s), {network.prompt.head.out_features} logit(s): set --prompt_features / --features, "
            "--in_channels to those stage 1 was trained with"
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
        network: the :class:`PromptedMultiLevelNet` being trained.
    """

    def __init__(self, load_path: str, network: PromptedMultiLevelNet) -> None:
        self.load_path = load_path
        self.network = network
        if not os.path.isfile(load_path):
            raise MissingInputError(
                f"stage-1 checkpoint {os.fspath(load_path)!r} not found: train stage 1 first "
                "(configs/prompt_stage1.json) or pass --prompt_checkpoint"
            )

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
