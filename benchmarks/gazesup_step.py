"""GazeSup's training step, reimplemented from its published recipe (the baseline of ``train_step.py``).

Zhong et al., "Weakly-supervised medical image segmentation with gaze annotations", MICCAI 2024
(github.com/med-air/GazeMedSeg). Written here from the recipe, not copied; what it reproduces, step
for step, and which the timing depends on:

* per level, a MONAI ``BasicUNet`` (features 64..1024, 128 output channels, GroupNorm with 4
  groups) giving a 128-channel feature map, and a 1x1 convolution to one logit; the code also builds
  a two-layer 1x1 "head" that its forward pass never uses (kept: its parameters are in the
  optimizer); level 2.. start as deep copies of level 1;
* the propagation of the *features* (not of the logits): both unfolded over the 5x5 neighbourhood at
  dilation 2 (``F.unfold``, materialised), dot products, ``clamp(min=0)``, softmax over the 25
  neighbours, weighted sum of the unfolded features; the same classifier on the result;
* the loss: per level, BCE with logits against that level's pseudo-mask (the Kvasir criterion),
  plus 3 x the propagated consistency (``-sum_{j != i} mean(<p_prop_i, stopgrad(p_j)>) / (N - 1)``
  with ``p = [1 - sigmoid, sigmoid]``), summed over levels;
* its loop: ``torch.autocast`` around forward and loss (``fp16`` in the original; here the dtype
  asked for), ``zero_grad``, ``backward``, ``step``; SGD momentum 0.99, Nesterov, torch's default
  (non-fused) implementation; no MONAI engine.

:func:`build` returns ``(model, optimizer)``, :func:`step` runs one iteration.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

FEATURES = (64, 128, 256, 512, 1024, 128)


class _Level(nn.Module):
    def __init__(self, in_channels: int, features, feat_dim: int):
        super().__init__()
        from monai.networks.nets import BasicUNet

        self.encoder = BasicUNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=feat_dim,
            features=tuple(features),
            norm=("group", {"num_groups": 4}),
        )
        self.head = nn.Sequential(  # built, never called (as in the original)
            nn.Conv2d(feat_dim, feat_dim, 1),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(feat_dim, feat_dim, 1),
        )
        self.classifier = nn.Conv2d(feat_dim, 1, 1)

    def forward(self, x):
        feat = self.encoder(x)
        return self.classifier(feat), feat


def _neighbours(x: torch.Tensor, kernel_size: int = 5, dilation: int = 2) -> torch.Tensor:
    pad = dilation * (kernel_size - 1) // 2
    b, c, h, w = x.shape
    return F.unfold(x, kernel_size, dilation=dilation, padding=pad).view(b, c, kernel_size**2, h, w)


def propagate(feat: torch.Tensor) -> torch.Tensor:
    """Unfolded feature propagation: softmax over clamped dot products with the 25 neighbours.

    The features are unfolded twice, once as keys and once as values (the same tensor, two copies,
    as in the original): the memory the reference holds is part of what is compared.
    """
    keys, values = _neighbours(feat), _neighbours(feat)
    weight = torch.softmax(torch.einsum("bchw,bcnhw->bhwn", feat, keys).clamp(min=0), dim=-1)
    return torch.einsum("bcnhw,bhwn->bchw", values, weight)


class GazeSupModel(nn.Module):
    """The multi-level model: N copies of one level network; logits and propagated logits per level."""

    def __init__(self, in_channels: int = 3, num_levels: int = 2, features=FEATURES):
        super().__init__()
        first = _Level(in_channels, features, features[-1])
        self.levels = nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(num_levels - 1)])

    def forward(self, x):
        out = []
        for level in self.levels:
            logits, feat = level(x)
            out.append((logits, level.classifier(propagate(feat))))
        return out


def loss_fn(outputs, targets: torch.Tensor, weight: float = 3.0) -> torch.Tensor:
    """BCE per level + ``weight`` x the propagated consistency, summed over levels."""
    n = len(outputs)
    loss = sum(
        F.binary_cross_entropy_with_logits(lg, targets[:, i : i + 1]) for i, (lg, _) in enumerate(outputs)
    )
    if n > 1:
        prob = [torch.cat([1 - torch.sigmoid(lg), torch.sigmoid(lg)], 1) for lg, _ in outputs]
        prop = [torch.cat([1 - torch.sigmoid(pl), torch.sigmoid(pl)], 1) for _, pl in outputs]
        for i in range(n):
            cons = -sum((prop[i] * prob[j].detach()).sum(1).mean() for j in range(n) if j != i) / (n - 1)
            loss = loss + weight * cons
    return loss


def build(num_levels: int = 2, features=FEATURES, lr: float = 1e-2, weight_decay: float = 4e-4):
    model = GazeSupModel(num_levels=num_levels, features=features)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay, momentum=0.99, nesterov=True)
    return model, opt


def step(model, opt, image: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype | None = None) -> float:
    """One training iteration (autocast to ``dtype`` unless ``None``/float32); returns the loss."""
    model.train()
    enabled = dtype not in (None, torch.float32)
    with torch.autocast(image.device.type, dtype=dtype or torch.bfloat16, enabled=enabled):
        loss = loss_fn(model(image), targets)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()
