"""Hybrid supervision: a few images with full masks, gaze pseudo-masks for the rest.

Pan et al., "Label-efficient Hybrid-supervised Learning for Medical Image Segmentation", AAAI 2022
(arXiv:2203.05956): every weakly-labelled instance ``k`` gets its own weight ``gamma_k`` in [0, 1],
the *dynamic instance indicator* (DII), moved by how well its loss gradient agrees with the gradient
of the strongly-labelled instances; two networks trained together regularise each other on the
weak instances, *dynamic co-regularisation* (DCR), so that the weak labels' errors do not
accumulate.

How gazemonai builds it on the multi-level gaze machinery:

* the two DCR networks are the two level networks of :class:`~gazemonai.train.networks.MultiLevelNet`
  (``thresholds`` 0.5 and 0.3 on Kvasir): on a weak image each learns from its own gaze pseudo-mask
  level, so the two start from different weak labels, as GazeSup's levels do; on a strong image
  both learn from the mask (:class:`HybridTargetd`). The prediction stays the mean of their logits,
  so evaluation, inference, export and serving are unchanged;
* the loss (:class:`HybridLoss`) of network ``i`` on instance ``k``, with ``l`` = 0.5 Dice + 0.5 BCE::

      strong:  l(z_i, mask)
      weak:    g_k * l(z_i, pseudo_i) + ((1 - gamma_k) + lambda(t)) * c_i(k),   g_k = gamma_k / mean_B(gamma)

  where the co-regularisation term ``c_i(k)`` is, by ``dcr_loss``, GazeSup's cross-level
  consistency on instance ``k`` (``"prop"``: minus the agreement of network ``i``'s
  feature-propagated prediction with the peer's, stop-gradient, as the gaze mode's
  :class:`~gazemonai.train.losses.CrossLevelConsistencyLoss`; ``"pure"``: of its own prediction) or
  ``"label"``: ``l(z_i, sg(sigmoid(z_peer)))``, the peer's prediction taken as a soft label. The
  DII moves an instance's weight from its weak label to the peer (a weak label that pulls against
  the strong data is replaced by the peer), and ``lambda(t)`` (``dcr_weight``, ramped up over
  ``ramp_iterations`` as ``exp(-5 (1 - t/T)^2)``, or at once) co-regularises every weak instance.
  The bundles use ``"prop"`` with GazeSup's weight (3) from the first step: it keeps what makes the
  gaze mode resist gaze noise (``"label"`` with a 10-epoch ramp to 1 measured 0.08 Dice below the
  gaze mode on Kvasir; see the bundle README). Without DCR (``dcr=False``) the peer terms are off;
  without DII (``dii=False``) ``gamma`` stays 1. The label weight ``g_k`` is ``gamma_k`` divided by
  the mean ``gamma`` of the batch's weak instances (``dii_normalize``), so the DII redistributes the
  weak labels' weight among the instances rather than removing it: unnormalised, the weights start
  at their upper bound 1, where any noise in the updates can only lower them, and on Kvasir their
  mean sank to 0.42 in 60 epochs, taking the weak labels' weight with it (see the bundle README);
* the DII update (:class:`DynamicInstanceIndicator`, run by :class:`DIIUpdate` after each loss):
  per-instance gradients of the supervised loss with respect to the last layer (each level's 1x1
  classifier, weights and bias), in closed form from the features that feed it -- no extra pass
  through the networks. The strong direction ``g_S`` is a running mean of the strong instances'
  normalised gradients (a batch seldom holds more than one strong image at 10 %); a weak instance
  in the batch moves by ``gamma_k += lr * cos(g_S, g_k)``, clipped to [0, 1] (the paper's upper-level
  step with the inverse Hessian taken as the identity). ``gamma`` starts at 1: a weak label is
  trusted until the strong data says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.losses import DiceLoss
from monai.transforms import MapTransform
from torch import Tensor, nn

from ..errors import InvalidInputError
from .losses import CrossLevelConsistencyLoss, detached_terms

__all__ = [
    "strong_ids_of",
    "HybridTargetd",
    "DynamicInstanceIndicator",
    "last_layer_grads",
    "HybridLoss",
    "DIIUpdate",
]


def strong_ids_of(
    ids: Sequence[str], fraction: float | None = 0.1, seed: int = 0, strong_ids=None
) -> set[str]:
    """The images of ``ids`` that carry full masks: ``strong_ids`` if given, else a seeded ``fraction``.

    Args:
        ids: the training images.
        fraction: share of ``ids`` with full masks (at least one image), chosen with ``seed``.
        seed: the choice's seed (the same seed, the same images).
        strong_ids: explicit ids instead (all must be among ``ids``).

    Raises:
        InvalidInputError: neither given, a fraction outside (0, 1], ids not among the training images.
    """
    ids = sorted(ids)
    if strong_ids is not None:
        chosen = {str(i) for i in ([strong_ids] if isinstance(strong_ids, str) else strong_ids)}
        unknown = sorted(chosen - set(ids))
        if unknown:
            raise InvalidInputError(
                f"strong_ids not among the {len(ids)} training images: {', '.join(unknown[:5])}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            )
        if not chosen:
            raise InvalidInputError("strong_ids is empty")
        return chosen
    if fraction is None or isinstance(fraction, bool) or not 0.0 < float(fraction) <= 1.0:
        raise InvalidInputError(f"strong_fraction must be in (0, 1], got {fraction!r}")
    n = max(1, int(round(len(ids) * float(fraction))))
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[i] for i in order[:n]}


class HybridTargetd(MapTransform):
    """The training target of hybrid supervision: the mask on strong images, the pseudo-masks elsewhere.

    Pan et al., AAAI 2022 (see :mod:`gazemonai.train.hybrid`). For an item with ``strong`` = 1 the
    ``keys`` entry (the (N, ...) pseudo-masks, one per level) becomes the (1, ...) mask repeated N
    times; weak items keep their pseudo-masks.

    Args:
        keys: the level target key (``"pseudo_label"``).
        label_key: the full mask (1, ...).
        strong_key: 1 for an image with a full mask, 0 for a weak one.
        num_levels: N, the channels of the target.
    """

    def __init__(
        self, keys="pseudo_label", label_key: str = "label", strong_key: str = "strong", num_levels: int = 2
    ):
        super().__init__(keys, allow_missing_keys=True)
        self.label_key, self.strong_key, self.num_levels = label_key, strong_key, int(num_levels)

    def __call__(self, data):
        d = dict(data)
        for key in self.keys:
            if bool(d.get(self.strong_key, 0)):
                label = d[self.label_key]
                d[key] = torch.cat([torch.as_tensor(label)] * self.num_levels, dim=0)
            elif key not in d:
                raise InvalidInputError(
                    f"weak image {d.get('id', '?')!r} has no {key!r}: hybrid supervision needs its fixations"
                )
        return d


def last_layer_grads(features: Tensor, logit_grads: Tensor) -> Tensor:
    """Per-instance gradients of a loss with respect to a 1x1 convolution (weights and bias).

    For ``z = W f + b`` at every pixel, ``dl/dW = sum_p dl/dz(p) f(p)`` and ``dl/db = sum_p dl/dz(p)``.

    Args:
        features: (B, C, ...) the classifier's input.
        logit_grads: (B, 1, ...) ``dl_k/dz`` of each instance's own loss.

    Returns:
        (B, C + 1) per-instance gradients.
    """
    b = features.shape[0]
    f = features.reshape(b, features.shape[1], -1).float()
    g = logit_grads.reshape(b, 1, -1).float()
    return torch.cat([(f * g).sum(-1), g.sum(-1)], dim=1)


class DynamicInstanceIndicator(nn.Module):
    """The dynamic instance indicator: one weight in [0, 1] per weakly-labelled training image.

    Pan et al., "Label-efficient Hybrid-supervised Learning for Medical Image Segmentation",
    AAAI 2022. Kept as buffers, so the weights are saved and resumed with the training checkpoint.

    Args:
        num_instances: training images (indexed 0..M-1 by the datalist's ``index``).
        lr: step of ``gamma_k += lr * cos(g_S, g_k)``.
        momentum: of the running mean of the strong instances' normalised gradients.
        enabled: ``False`` keeps every weight at 1 (the "without DII" ablation).
        strong: per instance, whether it is a full-mask (strong) image (the datalist's ``strong``);
            instances seen as strong in a batch are marked too. The strong images' weights stay 1 and
            are left out of :meth:`weak_mean`.
    """

    def __init__(
        self,
        num_instances: int,
        lr: float = 0.005,
        momentum: float = 0.9,
        enabled: bool = True,
        strong: Sequence[bool] | None = None,
    ):
        super().__init__()
        if int(num_instances) < 1:
            raise InvalidInputError(f"num_instances must be >= 1, got {num_instances}")
        if not lr >= 0 or not 0 <= momentum < 1:
            raise InvalidInputError(f"dii lr must be >= 0 and momentum in [0, 1), got {lr}, {momentum}")
        if strong is not None and len(strong) != int(num_instances):
            raise InvalidInputError(f"strong has {len(strong)} flags for {num_instances} instances")
        self.lr, self.momentum, self.enabled = float(lr), float(momentum), bool(enabled)
        # not a buffer: it follows from the datalist, and checkpoints of earlier versions lack it
        self.strong = torch.zeros(int(num_instances), dtype=torch.bool)
        if strong is not None:
            self.strong[:] = torch.as_tensor([bool(f) for f in strong])
        self.register_buffer("weights", torch.ones(int(num_instances)))
        self.register_buffer("strong_direction", torch.zeros(0))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the strong direction's size is known only after the first update: take the checkpoint's
        saved = state_dict.get(prefix + "strong_direction")
        if saved is not None:
            self.strong_direction = torch.zeros_like(saved, device=self.weights.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, index: Tensor) -> Tensor:
        """The weights of the instances ``index`` (B,)."""
        return self.weights[index.to(self.weights.device).long()]

    @torch.no_grad()
    def mark_strong(self, index: Tensor, strong: Tensor) -> None:
        """Record which of the instances ``index`` are strong (``strong`` (B,) flags)."""
        index = torch.as_tensor(index).as_subclass(torch.Tensor).long().reshape(-1).cpu()
        strong = torch.as_tensor(strong).as_subclass(torch.Tensor).bool().reshape(-1).cpu()
        self.strong[index[strong]] = True

    def weak_mean(self) -> Tensor:
        """The mean weight of the weakly-labelled instances (the strong ones' fixed 1 left out)."""
        weak = ~self.strong.to(self.weights.device)
        return (self.weights[weak] if weak.any() else self.weights).mean()

    @torch.no_grad()
    def update(self, index: Tensor, strong: Tensor, grads: Tensor) -> None:
        """One DII step from a batch: ``grads`` (B, D) per-instance gradients, ``strong`` (B,) flags."""
        self.mark_strong(index, strong)
        if not self.enabled:
            return
        # plain tensors: a MetaTensor's class would end up in the checkpoint (not loadable as weights)
        grads = torch.as_tensor(grads).as_subclass(torch.Tensor).to(self.weights.device).float()
        strong = torch.as_tensor(strong).as_subclass(torch.Tensor).to(self.weights.device).bool().reshape(-1)
        index = torch.as_tensor(index).as_subclass(torch.Tensor).to(self.weights.device).long().reshape(-1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank sees every rank's batch, so the weights stay the same on all ranks
            index, strong, grads = (_all_gather(t) for t in (index, strong, grads))
        unit = grads / grads.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if strong.any():
            mean = unit[strong].mean(0)
            if self.strong_direction.numel() != mean.numel():
                self.strong_direction = mean.clone()
            else:
                self.strong_direction.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)
        if self.strong_direction.numel() == 0 or (~strong).sum() == 0:
            return
        direction = self.strong_direction / self.strong_direction.norm().clamp_min(1e-12)
        weak = index[~strong]
        cos = unit[~strong] @ direction
        self.weights[weak] = (self.weights[weak] + self.lr * cos).clamp(0.0, 1.0)
        self.updates += 1


def _all_gather(tensor: Tensor) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class HybridLoss(nn.Module):
    """The hybrid-supervision loss of N networks (levels): strong masks, DII-weighted weak labels, DCR.

    Pan et al., "Label-efficient Hybrid-supervised Learning for Medical Image Segmentation",
    AAAI 2022; the formula is in :mod:`gazemonai.train.hybrid`.

    Args:
        indicator: the :class:`DynamicInstanceIndicator` (its weights are read, not learnt here).
        dcr: co-regularisation between the networks on weak instances (off: the "without DCR" ablation).
        dcr_loss: the co-regularisation term: ``"prop"`` (GazeSup's consistency of the propagated
            prediction with the peers'; needs ``prop_logits`` in ``y_pred``), ``"pure"`` (of the
            own prediction) or ``"label"`` (Dice + BCE against the peers' mean sigmoid).
        dcr_weight: ``lambda``'s final value.
        dii_normalize: divide the weak instances' label weights by their batch mean (``False``: the
            weights as they are, which lowers the weak labels' total weight as the DII moves).
        ramp_iterations: iterations over which ``lambda`` ramps up (``exp(-5 (1 - t/T)^2)``); 0: at once.
        dice_weight, bce_weight: the weights of ``l``'s Dice and BCE.

    ``forward(y_pred, y)``: ``y_pred`` is ``MultiLevelNet``'s ``output="train"`` dict (or (B, N, ...)
    level logits, for ``dcr_loss`` ``"pure"`` or ``"label"``); ``y`` is
    ``{"target": (B, N, ...), "strong": (B,), "index": (B,)}`` from
    :class:`~gazemonai.train.engine.MultiLevelPrepareBatch` with ``extra_keys=("strong", "index")``.
    Call :meth:`step` once per iteration to advance ``lambda`` (:class:`DIIUpdate` does).
    """

    def __init__(
        self,
        indicator: DynamicInstanceIndicator,
        dcr: bool = True,
        dcr_loss: str = "prop",
        dcr_weight: float = 3.0,
        ramp_iterations: int = 0,
        dii_normalize: bool = True,
        dice_weight: float = 0.5,
        bce_weight: float = 0.5,
    ) -> None:
        super().__init__()
        if dcr_weight < 0 or ramp_iterations < 0:
            raise InvalidInputError(f"dcr_weight and ramp must be >= 0, got {dcr_weight}, {ramp_iterations}")
        if dcr_loss not in ("prop", "pure", "label"):
            raise InvalidInputError(f"dcr_loss must be 'prop', 'pure' or 'label', got {dcr_loss!r}")
        self.indicator, self.dcr_loss, self.dii_normalize = indicator, dcr_loss, bool(dii_normalize)
        self.dcr, self.dcr_weight, self.ramp_iterations = bool(dcr), float(dcr_weight), int(ramp_iterations)
        self.dice_weight, self.bce_weight = float(dice_weight), float(bce_weight)
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)
        self.iteration = 0

    def step(self) -> None:
        self.iteration += 1

    def ramp(self) -> float:
        """``lambda(t)``: 0 -> ``dcr_weight`` over ``ramp_iterations``."""
        if not self.dcr:
            return 0.0
        if self.ramp_iterations == 0:
            return self.dcr_weight
        t = min(1.0, self.iteration / self.ramp_iterations)
        return self.dcr_weight * math.exp(-5.0 * (1.0 - t) ** 2)

    def per_instance(self, logits: Tensor, target: Tensor) -> Tensor:
        """``l`` of each instance (B,): ``dice_weight`` soft Dice + ``bce_weight`` BCE (pixel mean)."""
        dice = self.dice(logits, target).reshape(logits.shape[0], -1).mean(1)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return self.dice_weight * dice + self.bce_weight * bce.reshape(logits.shape[0], -1).mean(1)

    @staticmethod
    def _levels(y_pred) -> list[Tensor]:
        if isinstance(y_pred, dict):
            return list(y_pred["level_logits"])
        return list(torch.split(y_pred, 1, dim=1))

    def _co_regularisation(self, i: int, levels: list[Tensor], y_pred) -> Tensor:
        """``c_i`` of each instance (B,): network ``i`` against its peers (stop-gradient)."""
        peers = [p for j, p in enumerate(levels) if j != i]
        if self.dcr_loss == "label":
            peer = torch.stack([p.detach() for p in peers]).mean(0)
            return self.per_instance(levels[i], torch.sigmoid(peer))
        query = levels[i]
        if self.dcr_loss == "prop":
            prop = y_pred.get("prop_logits") if isinstance(y_pred, dict) else None
            if not prop or len(prop) != len(levels):
                raise InvalidInputError(
                    "dcr_loss 'prop' needs the propagated logits: MultiLevelNet(propagate=True), "
                    "output='train'"
                )
            query = prop[i]
        return -CrossLevelConsistencyLoss.instance_agreement(query, peers)

    def _parts(self, y_pred, y: dict) -> dict[str, Tensor]:
        levels = self._levels(y_pred)
        target = y["target"].float()
        n = len(levels)
        if target.shape[1] not in (1, n):
            raise InvalidInputError(f"{n} networks but the target has {target.shape[1]} channels")
        self.indicator.mark_strong(y["index"], y["strong"])
        strong = y["strong"].to(levels[0].device).float().reshape(-1)
        weak = 1 - strong
        gamma = self.indicator(y["index"]).to(levels[0].device)
        label_gamma = gamma
        if self.dii_normalize:  # no host sync: a batch without weak instances multiplies by weak = 0
            mean = (weak * gamma).sum() / weak.sum().clamp_min(1.0)
            label_gamma = gamma / mean.clamp_min(1e-6)
        w_label = strong + weak * label_gamma
        lam = self.ramp()
        out = {}
        for i, z in enumerate(levels):
            t = target[:, i : i + 1] if target.shape[1] == n else target
            out[f"supervised_{i + 1}"] = (w_label * self.per_instance(z, t)).mean()
            if self.dcr and n > 1:
                w_peer = weak * ((1 - gamma) + lam)
                out[f"dcr_{i + 1}"] = (w_peer * self._co_regularisation(i, levels, y_pred)).mean()
        return out

    def forward(self, y_pred, y: dict) -> Tensor:
        parts = self._parts(y_pred, y)
        return sum(parts.values())

    def terms(self, y_pred, y: dict) -> dict[str, Tensor]:
        """The parts of the total, detached (``supervised_k``, ``dcr_k``, ``total``) and the mean DII."""
        with torch.no_grad():
            out = detached_terms(self._parts(y_pred, y))
            out["total"] = sum(out.values())
            out["dii_mean"] = self.indicator.weak_mean().detach()
        return out


class DIIUpdate:
    """After each loss, a DII step from the batch's last-layer gradients, and ``lambda``'s clock.

    Pan et al., AAAI 2022. On ``LOSS_COMPLETED`` (before the backward pass; nothing in the
    networks' graph is touched) every ``interval`` iterations: each instance's own supervised loss
    ``l(z_i, target_i)`` is differentiated with respect to the level logits (a copy), turned into
    per-instance gradients of every level's classifier (:func:`last_layer_grads`), concatenated over
    the levels, and handed to :meth:`DynamicInstanceIndicator.update`.

    Args:
        loss_function: the trainer's :class:`HybridLoss`.
        interval: iterations between DII steps.
    """

    def __init__(self, loss_function: HybridLoss, interval: int = 1) -> None:
        if int(interval) < 1:
            raise InvalidInputError(f"dii_interval must be >= 1, got {interval}")
        self.loss_function, self.interval = loss_function, int(interval)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = self.loss_function
        # the engine's clock, not a count of calls: a resumed run goes on from its checkpoint's iteration
        loss.iteration = int(engine.state.iteration)
        if not loss.indicator.enabled or engine.state.iteration % self.interval:
            return
        out = engine.state.output
        self.update(out["pred"], out["label"])

    def update(self, y_pred: dict, y: dict) -> None:
        """The DII step for one batch (also usable without an engine)."""
        loss = self.loss_function
        feats = y_pred.get("features") if isinstance(y_pred, dict) else None
        if not feats:
            raise InvalidInputError("the DII needs the networks' features: MultiLevelNet output='train'")
        target = y["target"].float()
        grads = []
        with torch.enable_grad():
            for i, (z, f) in enumerate(zip(y_pred["level_logits"], feats)):
                z = z.detach().float().requires_grad_(True)
                t = target[:, i : i + 1] if target.shape[1] == len(feats) else target
                (dz,) = torch.autograd.grad(loss.per_instance(z, t).sum(), z)
                grads.append(last_layer_grads(f.detach(), dz))
        loss.indicator.update(y["index"], y["strong"], torch.cat(grads, dim=1))
