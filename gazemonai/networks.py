"""Networks of multi-level gaze supervision: a U-Net exposing its features, and N of them together.

GazeSup (Zhong et al., "Weakly-supervised Medical Image Segmentation with Gaze Annotations",
MICCAI 2024) trains one network per pseudo-mask level. Each level network is MONAI's
:class:`~monai.networks.nets.BasicUNet` producing a feature map, followed by a 1x1 classifier. The
*feature propagation* replaces each pixel's feature by a similarity-weighted average of its 5x5
neighbours at dilation 2 (softmax over clamped dot products); the same classifier on the propagated
features gives the *propagated logits* that the cross-level consistency compares with the peers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers import Conv
from monai.networks.nets import BasicUNet
from torch import nn

__all__ = [
    "FeatureUNet",
    "MultiLevelNet",
    "feature_propagation",
    "feature_propagation_unfold",
    "PAPER_FEATURES",
    "CPU_FEATURES",
]

#: BasicUNet widths of the paper (the last is the decoder's output width).
PAPER_FEATURES = (64, 128, 256, 512, 1024, 128)
#: Slim widths for training on a CPU.
CPU_FEATURES = (16, 32, 64, 128, 256, 32)


def _offsets(kernel_size: int, dilation: int, ndim: int) -> list[tuple[int, ...]]:
    steps = range(0, 2 * (kernel_size // 2) * dilation + 1, dilation)
    grid = [()]
    for _ in range(ndim):
        grid = [g + (s,) for g in grid for s in steps]
    return grid


def _window(padded: torch.Tensor, offset: tuple[int, ...], spatial: tuple[int, ...]) -> torch.Tensor:
    return padded[(slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(offset, spatial))]


class _FeaturePropagation(torch.autograd.Function):
    """Propagation with a hand-written backward that accumulates in place into one padded buffer.

    Autograd through shifted views would allocate a zero-filled padded gradient per neighbour and
    per use (2 x kernel_size**2 of them); this keeps the saved state to the features and the weights.
    """

    @staticmethod
    def forward(ctx, feat: torch.Tensor, kernel_size: int, dilation: int):
        spatial = tuple(feat.shape[2:])
        r = (kernel_size // 2) * dilation
        padded = nn.functional.pad(feat, (r, r) * len(spatial))
        offsets = _offsets(kernel_size, dilation, len(spatial))
        sim = torch.empty((feat.shape[0], len(offsets)) + spatial, dtype=feat.dtype, device=feat.device)
        for k, o in enumerate(offsets):
            torch.sum(feat * _window(padded, o, spatial), dim=1, out=sim[:, k])
        positive = sim > 0
        weight = torch.softmax(sim.clamp_(min=0), dim=1)
        out = torch.zeros_like(feat)
        for k, o in enumerate(offsets):
            out.addcmul_(weight[:, k : k + 1], _window(padded, o, spatial))
        ctx.save_for_backward(feat, weight, positive)
        ctx.conf = (kernel_size, dilation)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        feat, weight, positive = ctx.saved_tensors
        kernel_size, dilation = ctx.conf
        spatial = tuple(feat.shape[2:])
        r = (kernel_size // 2) * dilation
        padded = nn.functional.pad(feat, (r, r) * len(spatial))
        offsets = _offsets(kernel_size, dilation, len(spatial))
        grad_out = grad_out.contiguous()
        # d out / d weight_k = <grad_out, window_k>
        grad_w = torch.empty_like(weight)
        for k, o in enumerate(offsets):
            torch.sum(grad_out * _window(padded, o, spatial), dim=1, out=grad_w[:, k])
        # softmax and clamp
        grad_s = weight * (grad_w - (weight * grad_w).sum(dim=1, keepdim=True))
        grad_s.mul_(positive)
        grad_pad = torch.zeros_like(padded)
        grad_feat = torch.zeros_like(feat)
        for k, o in enumerate(offsets):
            win = _window(grad_pad, o, spatial)
            win.addcmul_(weight[:, k : k + 1], grad_out)  # out = sum_k w_k * window_k(f)
            win.addcmul_(grad_s[:, k : k + 1], feat)  # sim_k = <f, window_k(f)>, the neighbour's side
            grad_feat.addcmul_(grad_s[:, k : k + 1], _window(padded, o, spatial))  # ... the centre's side
        grad_feat += _window(grad_pad, (r,) * len(spatial), spatial)
        return grad_feat, None, None


def feature_propagation(feat: torch.Tensor, kernel_size: int = 5, dilation: int = 2) -> torch.Tensor:
    """Similarity-weighted average of each pixel's neighbours, without unfolding.

    For pixel ``p`` with neighbours ``q`` on a ``kernel_size`` x ``kernel_size`` grid at ``dilation``
    (zero features beyond the border, as ``F.unfold`` with zero padding):
    ``w_pq = softmax_q(max(<f_p, f_q>, 0))`` and the output is ``sum_q w_pq f_q``.

    The reference unfolds the feature map into a ``kernel_size**2`` times larger tensor; here each
    neighbour is a shifted view of one padded copy and the backward pass is written out, so the extra
    memory is one padded feature map and the ``kernel_size**2`` weights per pixel.

    Args:
        feat: (B, C, H, W) features, or (B, C, D, H, W) (cubic neighbourhood).
        kernel_size: odd neighbourhood size.
        dilation: spacing between neighbours.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if feat.dim() not in (4, 5):
        raise ValueError(f"feat must be 4-D or 5-D, got shape {tuple(feat.shape)}")
    return _FeaturePropagation.apply(feat, kernel_size, dilation)


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
        norm: str | tuple = ("group", {"num_groups": 4}),
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
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

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feat = self.backbone(x)
        logits = self.classifier(feat)
        return (logits, feat) if return_features else logits


class MultiLevelNet(nn.Module):
    """N level networks trained together on N pseudo-mask levels; the prediction is their mean logit.

    Args:
        num_levels: number of levels (networks); 1 gives a plain network (full supervision).
        init: ``"independent"`` (each level initialised on its own, as the paper describes) or
            ``"copy"`` (all levels start as copies of the first, as the reference code does).
        propagate: compute the propagated logits in ``output="train"``.
        kernel_size: propagation neighbourhood.
        dilation: propagation dilation.
        output: default output, ``"ensemble"`` (B, 1, ...) mean logits — what inference, MONAI Label
            and export see; ``"stack"`` (B, 1 + N, ...) the mean then each level's logits (evaluation
            per level); ``"train"`` a dict with ``logits``, ``level_logits`` and ``prop_logits``.
        unet_kwargs: passed to each :class:`FeatureUNet` (``in_channels``, ``features``, ...).
    """

    OUTPUTS = ("ensemble", "stack", "train")

    def __init__(
        self,
        num_levels: int = 2,
        init: str = "independent",
        propagate: bool = True,
        kernel_size: int = 5,
        dilation: int = 2,
        output: str = "ensemble",
        **unet_kwargs,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if init not in ("independent", "copy"):
            raise ValueError(f"init must be 'independent' or 'copy', got {init!r}")
        if output not in self.OUTPUTS:
            raise ValueError(f"output must be one of {self.OUTPUTS}, got {output!r}")
        self.num_levels = int(num_levels)
        self.levels = nn.ModuleList(FeatureUNet(**unet_kwargs) for _ in range(self.num_levels))
        if init == "copy":
            for level in self.levels[1:]:
                level.load_state_dict(self.levels[0].state_dict())
        self.propagate = propagate
        self.propagation = feature_propagation
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.output = output

    def forward_level(self, x: torch.Tensor, level: int, propagate: bool | None = None):
        """Level ``level``'s ``(logits, propagated logits or None)`` (one network of the N)."""
        propagate = self.propagate if propagate is None else propagate
        net = self.levels[level]
        if not propagate:
            return net(x), None
        logits, feat = net(x, return_features=True)
        return logits, net.classifier(self.propagation(feat, self.kernel_size, self.dilation))

    def forward(self, x: torch.Tensor, output: str | None = None):
        output = output or self.output
        if output not in self.OUTPUTS:
            raise ValueError(f"output must be one of {self.OUTPUTS}, got {output!r}")
        if output != "train":
            level_logits = [level(x) for level in self.levels]
            mean = torch.stack(level_logits).mean(0)
            return mean if output == "ensemble" else torch.cat([mean, *level_logits], dim=1)
        level_logits, prop_logits = [], []
        for i in range(self.num_levels):
            logits, prop = self.forward_level(x, i)
            level_logits.append(logits)
            if prop is not None:
                prop_logits.append(prop)
        return {
            "logits": torch.stack(level_logits).mean(0),
            "level_logits": level_logits,
            "prop_logits": prop_logits,
        }
