"""Networks of multi-level gaze supervision: a U-Net exposing its features, and N of them together.

GazeSup (Zhong et al., "Weakly-supervised Medical Image Segmentation with Gaze Annotations",
MICCAI 2024) trains one network per pseudo-mask level. Each level network is MONAI's
:class:`~monai.networks.nets.BasicUNet` producing a feature map, followed by a 1x1 classifier. The
*feature propagation* replaces each pixel's feature by a similarity-weighted average of its 5x5
neighbours at dilation 2 (softmax over clamped dot products); the same classifier on the propagated
features gives the *propagated logits* that the cross-level consistency compares with the peers.

The image-label prompt (SKS, Chen et al., arXiv:2406.14958; the method in
:mod:`gazemonai.train.prompt`) adds a stage-1 :class:`PyramidClassifier` whose pyramid features
each level network, then a :class:`PromptedFeatureUNet`, receives: ``MultiLevelNet(prompt_features=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from monai.networks.layers import Conv
from monai.networks.nets import BasicUNet
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

from ..errors import InvalidInputError
from .propagation import (
    check_propagation,
    compiled_feature_propagation,
    fused_feature_propagation,
    resolve_propagation,
)

__all__ = [
    "FeatureUNet",
    "MultiLevelNet",
    "PyramidClassifier",
    "PromptedFeatureUNet",
    "PROMPT_ARCHS",
    "feature_propagation",
    "feature_propagation_unfold",
    "PAPER_FEATURES",
]

#: BasicUNet widths of the paper (the last is the decoder's output width).
PAPER_FEATURES = (64, 128, 256, 512, 1024, 128)
#: BasicUNet's four poolings: :class:`MultiLevelNet` pads its input's sides to a multiple of this
MULTIPLE = 16


def _displacements(kernel_size: int, dilation: int, ndim: int) -> list[tuple[int, ...]]:
    r = (kernel_size // 2) * dilation
    steps = range(-r, r + 1, dilation)
    grid = [()]
    for _ in range(ndim):
        grid = [g + (s,) for g in grid for s in steps]
    return grid


def _overlap(disp: tuple[int, ...], spatial: tuple[int, ...]):
    """Index tuples ``(centre, neighbour)`` of the pixels ``p`` whose neighbour ``p + disp`` is inside.

    Neighbours outside the image have zero features (as ``F.unfold`` with zero padding): their
    similarity is 0 and they add nothing to the output, so only this overlap needs computing.
    Returns None when it is empty.
    """
    centre, neighbour = [slice(None), slice(None)], [slice(None), slice(None)]
    for d, n in zip(disp, spatial):
        lo, hi = max(0, -d), n - max(0, d)
        if hi <= lo:
            return None
        centre.append(slice(lo, hi))
        neighbour.append(slice(lo + d, hi + d))
    return tuple(centre), tuple(neighbour)


#: elements per chunk of :func:`_channel_dot` on a CPU (a CPU cache trick, see there)
CPU_DOT_CHUNK = 1 << 18


def _channel_dot(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, chunk: int | None = None) -> None:
    """``out = (a * b).sum(1)``; on a CPU through a small reused buffer instead of one full-size product.

    ``a`` and ``b`` are (B, C, n1, ...) views. On a CPU (``chunk`` defaults to
    :data:`CPU_DOT_CHUNK`) the product is formed ``chunk`` elements at a time along the first spatial
    axis, so it stays in cache and its memory does not grow with the image. On a GPU that loop would
    launch two kernels per image row (at 224^2, batch 8 and 128 channels: ~11 000 per forward pass),
    so there (``chunk=0``: whole) the product is one kernel and one sum, its memory freed at once.
    """
    if chunk is None:
        chunk = 0 if a.device.type != "cpu" else CPU_DOT_CHUNK
    if chunk <= 0:
        torch.sum(a * b, dim=1, out=out)
        return
    rows = max(1, chunk // max(1, a[:, :, :1].numel()))
    buf = torch.empty(min(rows, a.shape[2]) * a[:, :, :1].numel(), dtype=a.dtype, device=a.device)
    for i in range(0, a.shape[2], rows):
        a_i, b_i = a[:, :, i : i + rows], b[:, :, i : i + rows]
        prod = torch.mul(a_i, b_i, out=buf[: a_i.numel()].view(a_i.shape))
        torch.sum(prod, dim=1, out=out[:, i : i + rows])


class _FeaturePropagation(torch.autograd.Function):
    """Propagation with a hand-written backward that works on the overlapping regions in place.

    Autograd through shifted views would allocate a zero-filled padded gradient per neighbour and
    per use (2 x kernel_size**2 of them). Here no padded copy exists at all: each neighbour is the
    overlap of the map with its shifted self, the saved state is the features, the values, the
    weights and the sign of the similarities, and the backward pass accumulates into one gradient
    per input.
    """

    @staticmethod
    def forward(ctx, feat: torch.Tensor, values: torch.Tensor | None, kernel_size: int, dilation: int):
        spatial = tuple(feat.shape[2:])
        regions = [_overlap(d, spatial) for d in _displacements(kernel_size, dilation, len(spatial))]
        sim = feat.new_zeros((feat.shape[0], len(regions)) + spatial)
        for k, reg in enumerate(regions):
            if reg is not None:
                c, n = reg
                _channel_dot(feat[c], feat[n], sim[:, k][(slice(None),) + c[2:]])
        positive = sim > 0
        weight = torch.softmax(sim.clamp_(min=0), dim=1)
        v = feat if values is None else values
        out = torch.zeros_like(v)
        for k, reg in enumerate(regions):
            if reg is not None:
                c, n = reg
                out[c].addcmul_(weight[:, k : k + 1][c], v[n])
        ctx.save_for_backward(feat, values, weight, positive)
        ctx.conf = (kernel_size, dilation)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        feat, values, weight, positive = ctx.saved_tensors
        kernel_size, dilation = ctx.conf
        spatial = tuple(feat.shape[2:])
        regions = [_overlap(d, spatial) for d in _displacements(kernel_size, dilation, len(spatial))]
        v = feat if values is None else values
        grad_out = grad_out.contiguous()
        # d out / d weight_k = <grad_out, neighbour_k(v)>
        grad_w = torch.zeros_like(weight)
        for k, reg in enumerate(regions):
            if reg is not None:
                c, n = reg
                _channel_dot(grad_out[c], v[n], grad_w[:, k][(slice(None),) + c[2:]])
        # softmax and clamp
        grad_s = weight * (grad_w - (weight * grad_w).sum(dim=1, keepdim=True))
        grad_s.mul_(positive)
        del grad_w
        grad_feat = torch.zeros_like(feat)
        grad_v = grad_feat if values is None else torch.zeros_like(values)
        for k, reg in enumerate(regions):
            if reg is not None:
                c, n = reg
                w_k, s_k = weight[:, k : k + 1][c], grad_s[:, k : k + 1][c]
                grad_v[n].addcmul_(w_k, grad_out[c])  # out = sum_k w_k * neighbour_k(v)
                grad_feat[n].addcmul_(s_k, feat[c])  # sim_k = <f, neighbour_k(f)>: the neighbour's side
                grad_feat[c].addcmul_(s_k, feat[n])  # ... and the centre's
        return grad_feat, None if values is None else grad_v, None, None


def feature_propagation(
    feat: torch.Tensor,
    kernel_size: int = 5,
    dilation: int = 2,
    values: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Similarity-weighted average of each pixel's neighbours, without unfolding.

    For pixel ``p`` with neighbours ``q`` on a ``kernel_size`` x ``kernel_size`` grid at ``dilation``
    (zero beyond the border, as ``F.unfold`` with zero padding):
    ``w_pq = softmax_q(max(<f_p, f_q>, 0))`` and the output is ``sum_q w_pq v_q``, where the values
    ``v`` are the features themselves unless ``values`` is given.

    The reference unfolds the feature map into a ``kernel_size**2`` times larger tensor; here each
    neighbour is the overlap of the map with its shifted self and the backward pass is written out,
    so the extra memory is the ``kernel_size**2`` weights per pixel and one gradient per input.

    Args:
        feat: (B, C, H, W) features, or (B, C, D, H, W) (cubic neighbourhood).
        kernel_size: odd neighbourhood size.
        dilation: spacing between neighbours.
        values: (B, C', ...) maps to average with the weights of ``feat`` (default: ``feat``).
            A linear map of the features commutes with the average, so the propagated logits of a
            1x1 classifier ``W f + b`` are ``feature_propagation(f, values=W f) + b``: C' = 1
            channel to average instead of C.
        impl: which implementation computes it (:mod:`gazemonai.train.propagation`): ``"shifted"``
            (this one), ``"fused"`` (a Triton kernel, CUDA), ``"compiled"`` (``torch.compile``), or
            ``"auto"`` (the default: ``"fused"`` for a 2-D map on CUDA with Triton, else ``"shifted"``).
    """
    if kernel_size % 2 != 1:
        raise InvalidInputError(f"kernel_size must be odd, got {kernel_size}")
    if feat.dim() not in (4, 5):
        raise InvalidInputError(f"feat must be 4-D or 5-D, got shape {tuple(feat.shape)}")
    if values is not None and (values.shape[0] != feat.shape[0] or values.shape[2:] != feat.shape[2:]):
        raise InvalidInputError(
            f"values must match feat in batch and spatial size, got {tuple(values.shape)} "
            f"for features {tuple(feat.shape)}"
        )
    impl = resolve_propagation(impl, feat)
    if impl == "fused":
        return fused_feature_propagation(feat, kernel_size, dilation, values=values)
    if impl == "compiled":
        return compiled_feature_propagation(feat, kernel_size, dilation, values=values)
    return _FeaturePropagation.apply(feat, values, kernel_size, dilation)


def feature_propagation_unfold(feat: torch.Tensor, kernel_size: int = 5, dilation: int = 2) -> torch.Tensor:
    """The reference formulation of :func:`feature_propagation` (2-D), step for step.

    Kept to test and benchmark against. Like the GazeSup code it unfolds the features twice (once as
    values, once as keys), each a (B, C, kernel_size**2, H, W) tensor, and contracts with einsum.
    """
    b, c, h, w = feat.shape
    pad = (kernel_size // 2) * dilation

    def unfold(x):
        return nn.functional.unfold(x, kernel_size, dilation=dilation, padding=pad).reshape(b, c, -1, h, w)

    values = unfold(feat)
    keys = unfold(feat)
    corr = torch.softmax(torch.einsum("bchw,bcnhw->bhwn", feat, keys).clamp(min=0), dim=-1)
    return torch.einsum("bcnhw,bhwn->bchw", values, corr).reshape(b, c, h, w)


#: the blocks' normalisation and activation (the paper's): GroupNorm with 4 groups, LeakyReLU 0.1
_NORM = ("group", {"num_groups": 4})
_ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})


class FeatureUNet(nn.Module):
    """MONAI's BasicUNet producing a feature map, plus a 1x1 convolution classifier.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (3 for RGB endoscopy, 1 for MR).
        out_channels: logits (1 for binary segmentation).
        features: BasicUNet widths, six numbers (the paper's: 64, 128, 256, 512, 1024, 128).
        feature_channels: channels of the exposed feature map (the paper's: 128).
        norm: BasicUNet normalisation (the paper's: GroupNorm with 4 groups).
        act: BasicUNet activation.
        dropout: BasicUNet dropout.
        upsample: BasicUNet upsampling, ``"deconv"``, ``"pixelshuffle"`` or ``"nontrainable"``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        features: Sequence[int] = PAPER_FEATURES,
        feature_channels: int | None = None,
        norm: str | tuple = _NORM,
        act: str | tuple = _ACT,
        dropout: float = 0.0,
        upsample: str = "deconv",
    ) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        self.feature_channels = int(feature_channels or features[-1])
        self.backbone = BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=self.feature_channels,
            features=features,
            act=act,
            norm=norm,
            dropout=dropout,
            upsample=upsample,
        )
        self.classifier = Conv[Conv.CONV, spatial_dims](self.feature_channels, out_channels, kernel_size=1)

    __jit_unused_properties__ = ["bottleneck"]  # TorchScript export (gazemonai.serve.export)

    @property
    def bottleneck(self) -> nn.Module:
        """The U-Net's deepest encoder block, whose weights (and weight gradients) are the largest.

        :class:`~gazemonai.train.low_memory.LevelwiseTrainStep` releases freed memory here.
        """
        return self.backbone.down_4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, feature map)``: the feature map feeds the feature propagation."""
        feat = self.backbone(x)
        return self.classifier(feat), feat


def _encoder_widths(features: Sequence[int]) -> tuple[int, ...]:
    features = tuple(int(f) for f in features)
    if len(features) not in (5, 6) or min(features) < 1:
        raise InvalidInputError(
            f"features must be 5 encoder widths or BasicUNet's 6 (the encoder's 5 are used), got {features}"
        )
    return features[:5]


#: the stage-1 classifier's forms (:class:`PyramidClassifier`'s ``arch``)
PROMPT_ARCHS = ("unet", "encoder")


class PyramidClassifier(nn.Module):
    """Stage 1 of SKS (Chen et al., arXiv:2406.14958): an image classifier that keeps its pyramid.

    ``arch="unet"`` (the paper's: its stage 1 is itself U-shaped, the "dual U" with stage 2) is a
    BasicUNet (MONAI's ``TwoConv``, ``Down`` and ``UpCat`` blocks) whose pyramid is its *decoder*'s
    levels: ``u_1 .. u_4`` at resolution 1, 1/2, 1/4, 1/8 and the bottleneck at 1/16, widths
    ``features[5], features[1], features[2], features[3], features[4]``. ``arch="encoder"`` is its
    encoder alone (five levels, resolution 1 .. 1/16, widths ``features[:5]``). Either way each
    pyramid level is globally averaged and the means concatenated into one linear layer, so every
    level is trained to separate the classes (and, with the U-Net, the decoder is trained too).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: logits (1: binary, trained with BCE).
        features: BasicUNet's six widths (the segmentation network's ``features``); the encoder form
            also takes the five encoder widths.
        norm: normalisation of the blocks.
        act: activation of the blocks.
        dropout: dropout of the blocks and before the linear layer.
        arch: ``"unet"`` or ``"encoder"``.
        upsample: the U-Net decoder's upsampling (BasicUNet's ``upsample``).
    """

    __constants__ = ["decoder"]

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int = 1,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        norm: str | tuple = _NORM,
        act: str | tuple = _ACT,
        dropout: float = 0.0,
        arch: str = "encoder",
        upsample: str = "deconv",
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise InvalidInputError(f"num_classes must be >= 1, got {num_classes}")
        if arch not in PROMPT_ARCHS:
            raise InvalidInputError(f"prompt_stage1_arch must be one of {PROMPT_ARCHS}, got {arch!r}")
        widths = _encoder_widths(features)
        self.arch = arch
        self.decoder = arch == "unet"
        self.spatial_dims = int(spatial_dims)
        self.conv_0 = TwoConv(spatial_dims, in_channels, widths[0], act, norm, True, dropout)
        self.downs = nn.ModuleList(
            Down(spatial_dims, widths[i - 1], widths[i], act, norm, True, dropout) for i in range(1, 5)
        )
        self.ups = nn.ModuleList()  # deepest first: BasicUNet's upcat_4 .. upcat_1
        if self.decoder:
            fea = tuple(int(f) for f in features)
            if len(fea) != 6:
                raise InvalidInputError(
                    f"prompt_stage1_arch 'unet' needs BasicUNet's 6 widths (features), got {list(fea)}"
                )
            block = {"act": act, "norm": norm, "bias": True, "dropout": dropout, "upsample": upsample}
            for i in (4, 3, 2):
                self.ups.append(UpCat(spatial_dims, fea[i], fea[i - 1], fea[i - 1], **block))
            self.ups.append(UpCat(spatial_dims, fea[1], fea[0], fea[5], halves=False, **block))
            self.pyramid_channels = (fea[5], fea[1], fea[2], fea[3], fea[4])
        else:
            self.pyramid_channels = widths
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(sum(self.pyramid_channels), int(num_classes))

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five level maps ``g_0 .. g_4`` (widths :attr:`pyramid_channels`, resolution 1/2^i)."""
        maps = [self.conv_0(x)]
        for down in self.downs:
            maps.append(down(maps[-1]))
        if not self.decoder:
            return maps
        u = maps[4]
        decoded = [u]
        for i, up in enumerate(self.ups):
            u = up(u, maps[3 - i])
            decoded.append(u)
        return [decoded[4], decoded[3], decoded[2], decoded[1], decoded[0]]

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
        features = tuple(int(f) for f in unet_kwargs.get("features", PAPER_FEATURES))
        widths = _encoder_widths(features if prompt_channels is None else prompt_channels)
        self.prompt_channels = widths
        dims = int(unet_kwargs.get("spatial_dims", 2))
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        encoder = features[:5]
        decoder = (features[5], features[1], features[2], features[3])  # u1, u2, u3, u4
        self.short_skips = nn.ModuleList(conv(encoder[i] + widths[i], encoder[i], 1) for i in range(5))
        self.long_skips = nn.ModuleList(conv(decoder[i] + widths[i + 1], decoder[i], 1) for i in range(4))

    @staticmethod
    def _with(x: torch.Tensor, g: torch.Tensor, resize: bool = False) -> torch.Tensor:
        """``[x ; g]`` along channels (``g`` resized to ``x`` for the long skips), for a fusion conv."""
        if g.shape[2:] != x.shape[2:]:
            if not resize:
                raise InvalidInputError(
                    f"prompt pyramid map of size {g.shape[2:]} does not match the encoder's "
                    f"{x.shape[2:]}: was it computed from the same image?"
                )
            mode = "bilinear" if x.dim() == 4 else "trilinear"
            g = nn.functional.interpolate(g, size=x.shape[2:], mode=mode, align_corners=False)
        return torch.cat([x, g.to(x.dtype)], dim=1)

    def _features(self, x: torch.Tensor, pyramid: list[torch.Tensor]) -> torch.Tensor:
        if len(pyramid) != 5:
            raise InvalidInputError(f"the prompt pyramid must hold 5 maps, got {len(pyramid)}")
        b = self.backbone
        x0 = self.short_skips[0](self._with(b.conv_0(x), pyramid[0]))
        x1 = self.short_skips[1](self._with(b.down_1(x0), pyramid[1]))
        x2 = self.short_skips[2](self._with(b.down_2(x1), pyramid[2]))
        x3 = self.short_skips[3](self._with(b.down_3(x2), pyramid[3]))
        x4 = self.short_skips[4](self._with(b.down_4(x3), pyramid[4]))
        u4 = self.long_skips[3](self._with(b.upcat_4(x4, x3), pyramid[4], resize=True))
        u3 = self.long_skips[2](self._with(b.upcat_3(u4, x2), pyramid[3], resize=True))
        u2 = self.long_skips[1](self._with(b.upcat_2(u3, x1), pyramid[2], resize=True))
        u1 = self.long_skips[0](self._with(b.upcat_1(u2, x0), pyramid[1], resize=True))
        return b.final_conv(u1)

    def forward(self, x: torch.Tensor, pyramid: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self._features(x, pyramid))

    def forward_features(self, x: torch.Tensor, pyramid: list[torch.Tensor]):
        """``(logits, feature map)``, as :meth:`FeatureUNet.forward_features`."""
        feat = self._features(x, pyramid)
        return self.classifier(feat), feat


class MultiLevelNet(nn.Module):
    """N level networks trained together on N pseudo-mask levels; the prediction is their mean logit.

    Any spatial size: the input is padded (replicating its border) to a multiple of 16 and every
    output cropped back, so the eager network, ``torch.jit.script(network)`` (what the model zoo's
    ``ckpt_export`` makes of ``network_def``) and its ONNX export compute the same thing. Scripted, it
    is an inference network: ``forward(x)`` with the configured ``output``, ``"ensemble"`` or
    ``"stack"``.

    Args:
        num_levels: number of levels (networks); 1 gives a plain network (full supervision).
        init: ``"independent"`` (each level initialised on its own, as the paper describes) or
            ``"copy"`` (all levels start as copies of the first, as the reference code does).
        propagate: compute the propagated logits in ``output="train"``.
        propagate_logits: average the classifier's 1-channel output ``W f`` with the propagation
            weights, then add its bias, instead of averaging the C-channel features and classifying
            them. The two are equal (a 1x1 convolution commutes with a weighted average whose weights
            sum to one), and this one averages 1 channel instead of C (the paper's C: 128) and keeps
            no propagated feature map for the backward pass. ``False`` is the reference's order,
            for a :attr:`propagation` function without ``values`` (the unfold reference).
        kernel_size: propagation neighbourhood.
        dilation: propagation dilation.
        propagation: its implementation (:mod:`gazemonai.train.propagation`): ``"auto"`` (the
            default: the fused Triton kernel on a CUDA device when Triton is installed, the
            ``"shifted"`` CPU implementation elsewhere), ``"shifted"``, ``"fused"`` (CUDA only; an
            error elsewhere) or ``"compiled"`` (``torch.compile``). All compute the same values.
        output: default output, ``"ensemble"`` (B, 1, ...) mean logits — what inference, MONAI Label
            and export see; ``"stack"`` (B, 1 + N, ...) the mean then each level's logits (evaluation
            per level); ``"train"`` a dict with ``logits``, ``level_logits`` and ``prop_logits``.
        return_features: ``output="train"`` also gives ``features``, each level's feature map
            feeding its classifier (the hybrid mode's per-instance gradients,
            :mod:`gazemonai.train.hybrid`); off by default, as an inferer casting outputs to float32
            would copy them.
        prompt_features: the image-label prompt (:mod:`gazemonai.train.prompt`; SKS, Chen et al.,
            arXiv:2406.14958): ``None`` (the default) for none; else the widths of a stage-1
            :class:`PyramidClassifier` (five, or six as ``features``), kept as ``prompt``, whose
            pyramid is computed once per batch and fed to every level network, each then a
            :class:`PromptedFeatureUNet`. Stage 1's weights are loaded by
            :func:`~gazemonai.train.prompt.load_prompt_weights`.
        prompt_classes: the stage-1 network's logits (its head is kept, unused by the segmentation).
        freeze_prompt: keep the stage-1 network fixed (no gradients, evaluation mode), the default;
            ``False`` fine-tunes it with the segmentation loss.
        prompt_arch: the stage-1 network's form, ``"unet"`` (SKS's U-shaped classifier, its decoder's
            levels the pyramid; ``prompt_features`` then BasicUNet's six widths) or ``"encoder"``
            (its encoder alone); see :class:`PyramidClassifier`.
        unet_kwargs: passed to each :class:`FeatureUNet` (``in_channels``, ``features``, ...).
    """

    OUTPUTS = ("ensemble", "stack", "train")

    def __init__(
        self,
        num_levels: int = 2,
        init: str = "independent",
        propagate: bool = True,
        propagate_logits: bool = True,
        kernel_size: int = 5,
        dilation: int = 2,
        propagation: str = "auto",
        output: str = "ensemble",
        return_features: bool = False,
        prompt_features: Sequence[int] | None = None,
        prompt_classes: int = 1,
        freeze_prompt: bool = True,
        prompt_arch: str = "encoder",
        **unet_kwargs,
    ) -> None:
        super().__init__()
        if not isinstance(freeze_prompt, bool):
            raise InvalidInputError(f"freeze_prompt must be True or False, got {freeze_prompt!r}")
        if num_levels < 1:
            raise InvalidInputError(f"num_levels must be >= 1, got {num_levels}")
        if init not in ("independent", "copy"):
            raise InvalidInputError(f"init must be 'independent' or 'copy', got {init!r}")
        if output not in self.OUTPUTS:
            raise InvalidInputError(f"output must be one of {self.OUTPUTS}, got {output!r}")
        self.num_levels = int(num_levels)
        self.prompt: PyramidClassifier | None = None
        if prompt_features is None:
            self.levels = nn.ModuleList(FeatureUNet(**unet_kwargs) for _ in range(self.num_levels))
        else:
            self.prompt = PyramidClassifier(
                spatial_dims=unet_kwargs.get("spatial_dims", 2),
                in_channels=unet_kwargs.get("in_channels", 3),
                num_classes=prompt_classes,
                features=prompt_features,
                arch=prompt_arch,
            )
            channels = self.prompt.pyramid_channels
            self.levels = nn.ModuleList(
                PromptedFeatureUNet(prompt_channels=channels, **unet_kwargs) for _ in range(self.num_levels)
            )
            self.prompt.head.requires_grad_(False)  # the class head is not on the segmentation's path
            if freeze_prompt:
                self.prompt.requires_grad_(False)
                self.prompt.eval()
        self.freeze_prompt = freeze_prompt
        if init == "copy":
            for level in self.levels[1:]:
                level.load_state_dict(self.levels[0].state_dict())
        self.propagate = propagate
        self.propagate_logits = propagate_logits
        self.propagation_impl = check_propagation(propagation)
        self.propagation = partial(feature_propagation, impl=self.propagation_impl)
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.output = output
        self.return_features = bool(return_features)
        self.multiple = MULTIPLE

    def train(self, mode: bool = True):
        super().train(mode)
        if self.prompt is not None and self.freeze_prompt:
            self.prompt.eval()  # a frozen prompt stays in evaluation mode (dropout off)
        return self

    def level_inputs(self, x: torch.Tensor) -> tuple:
        """What each level network is called with, computed once per batch for all levels.

        ``(x,)``, or with an image-label prompt ``(x, pyramid)`` (without gradients when frozen).
        """
        if self.prompt is None:
            return (x,)
        if self.freeze_prompt:
            with torch.no_grad():
                return (x, self.prompt.pyramid(x))
        return (x, self.prompt.pyramid(x))

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded (replicating its border) at the end of each spatial axis to a multiple of 16.

        BasicUNet halves the image four times; for other sides its decoder pads the upsampled maps
        to fit the skips, a shape-dependent branch that a traced or exported graph freezes at one
        size. Padding the input once here gives the eager, TorchScript and ONNX forms one behaviour
        at every size (at multiples of 16 nothing changes).
        """
        pads: list[int] = []
        for d in range(x.dim() - 1, 1, -1):  # F.pad's order: the last axis first
            pads += [0, (self.multiple - x.shape[d] % self.multiple) % self.multiple]
        # no shortcut for a zero padding: a branch on the size would fix an exported graph's size
        return nn.functional.pad(x, pads, mode="replicate")

    @staticmethod
    def _cropped(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` cut back to the spatial size of the unpadded input ``x``."""
        for d in range(2, x.dim()):
            y = y.narrow(d, 0, x.shape[d])
        return y

    def forward_level(self, x: torch.Tensor, level: int, propagate: bool | None = None):
        """Level ``level``'s ``(logits, propagated logits or None)`` (one network of the N)."""
        logits, prop, _ = self._train_level(self._padded(x), level, propagate)
        return self._cropped(logits, x), None if prop is None else self._cropped(prop, x)

    @torch.jit.unused
    def _train_level(
        self, x: torch.Tensor, level: int, propagate: bool | None = None, inputs: tuple | None = None
    ):
        """``(logits, propagated logits or None, the feature map feeding the classifier)``."""
        propagate = self.propagate if propagate is None else propagate
        net = self.levels[level]
        logits, feat = net.forward_features(*(self.level_inputs(x) if inputs is None else inputs))
        if not propagate:
            return logits, None, feat
        if not self.propagate_logits:
            return logits, net.classifier(self.propagation(feat, self.kernel_size, self.dilation)), feat
        conv = nn.functional.conv2d if feat.dim() == 4 else nn.functional.conv3d
        values = conv(feat, net.classifier.weight)  # W f, no bias
        prop = self.propagation(feat, self.kernel_size, self.dilation, values=values)
        bias = net.classifier.bias
        return logits, prop if bias is None else prop + bias.view((1, -1) + (1,) * (feat.dim() - 2)), feat

    def _predict(self, x: torch.Tensor, stack: bool) -> torch.Tensor:
        """The mean of the level logits (``stack``: then each level's), at the input's size."""
        padded = self._padded(x)
        level_logits: list[torch.Tensor] = []
        if self.prompt is None:
            for level in self.levels:
                level_logits.append(level(padded))
        else:
            if self.freeze_prompt:
                with torch.no_grad():
                    pyramid = self.prompt.pyramid(padded)
            else:
                pyramid = self.prompt.pyramid(padded)
            for level in self.levels:
                level_logits.append(level(padded, pyramid))
        mean = torch.stack(level_logits).mean(0)
        out = torch.cat([mean] + level_logits, dim=1) if stack else mean
        return self._cropped(out, x)

    def forward(self, x: torch.Tensor, output: str | None = None):
        if torch.jit.is_scripting():  # TorchScript (model.ts): inference, the configured output
            return self._predict(x, self.output == "stack")
        return self._forward(x, output)

    @torch.jit.unused
    def _forward(self, x: torch.Tensor, output: str | None = None):
        output = output or self.output
        if output not in self.OUTPUTS:
            raise InvalidInputError(f"output must be one of {self.OUTPUTS}, got {output!r}")
        if output != "train":
            return self._predict(x, output == "stack")
        return self._train_output(x)

    @torch.jit.unused
    def _train_output(self, x: torch.Tensor) -> dict:
        """``output="train"``: the mean and level logits, the propagated logits (and features)."""
        padded = self._padded(x)
        inputs = self.level_inputs(padded)
        level_logits, prop_logits, features = [], [], []
        for i in range(self.num_levels):
            logits, prop, feat = self._train_level(padded, i, inputs=inputs)
            level_logits.append(self._cropped(logits, x))
            features.append(self._cropped(feat, x))
            if prop is not None:
                prop_logits.append(self._cropped(prop, x))
        return {
            "logits": torch.stack(level_logits).mean(0),
            "level_logits": level_logits,
            "prop_logits": prop_logits,
            **({"features": features} if self.return_features else {}),
        }
