"""Losses of multi-level gaze supervision (GazeSup, Zhong et al., MICCAI 2024).

* :class:`CrossLevelConsistencyLoss` pulls each level toward its peers' predictions. With
  ``p = [1 - sigmoid(z), sigmoid(z)]`` the two-class probability vector of a logit map, level ``i``'s
  term is ``-1/(N-1) * sum_{j != i} mean_pixels <q_i, stopgrad(p_j)>`` where ``q_i`` is ``p_i``
  (``"pure"``) or the probability of level ``i``'s feature-propagated logits (``"prop"``).
* :class:`MultiLevelGazeLoss` = ``sum_i (w_dice * Dice + w_bce * BCE)(logits_i, pseudo_i)
  + weight * sum_i consistency_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceLoss
from torch import Tensor, nn

from ..errors import InvalidInputError

__all__ = ["CrossLevelConsistencyLoss", "MultiLevelGazeLoss", "detached_terms"]


def detached_terms(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loss terms as detached plain tensors (a MONAI ``MetaTensor`` drops its metadata), for logging."""
    out = {}
    for name, t in terms.items():
        t = t.detach()
        out[name] = t.as_tensor() if hasattr(t, "as_tensor") else t
    return out


def _two_class(logits: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return torch.cat([1.0 - p, p], dim=1)


class CrossLevelConsistencyLoss(nn.Module):
    """Agreement of each level with the (stop-gradient) predictions of the other levels.

    Args:
        mode: ``"prop"`` compares each level's propagated prediction with its peers, ``"pure"`` its
            own prediction.
        reduction: ``"sum"`` over levels (the paper), ``"mean"``, or ``"none"`` for the (N,) vector.
    """

    def __init__(self, mode: str = "prop", reduction: str = "sum") -> None:
        super().__init__()
        if mode not in ("prop", "pure"):
            raise InvalidInputError(f"mode must be 'prop' or 'pure', got {mode!r}")
        if reduction not in ("sum", "mean", "none"):
            raise InvalidInputError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
        self.mode = mode
        self.reduction = reduction

    def forward(
        self, level_logits: Sequence[torch.Tensor], prop_logits: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        n = len(level_logits)
        if n < 2:
            return level_logits[0].new_zeros(()) if self.reduction != "none" else level_logits[0].new_zeros(n)
        if self.mode == "prop":
            if prop_logits is None or len(prop_logits) != n:
                raise InvalidInputError("mode 'prop' needs one propagated logit map per level")
            queries = list(prop_logits)
        else:
            queries = list(level_logits)
        terms = [
            self.level_term(q, [z for j, z in enumerate(level_logits) if j != i])
            for i, q in enumerate(queries)
        ]
        loss = torch.stack(terms)
        if self.reduction == "sum":
            return loss.sum()
        if self.reduction == "mean":
            return loss.mean()
        return loss

    @staticmethod
    def level_term(query_logits: torch.Tensor, peer_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """One level's term: ``-mean_j mean_pixels <p(query), stopgrad(p(peer_j))>``.

        Args:
            query_logits: the level's logits (``"pure"``) or propagated logits (``"prop"``).
            peer_logits: the other levels' logits; detached here.
        """
        return -CrossLevelConsistencyLoss.instance_agreement(query_logits, peer_logits).mean()

    @staticmethod
    def instance_agreement(query_logits: torch.Tensor, peer_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each instance's ``mean_j mean_pixels <p(query), stopgrad(p(peer_j))>``, (B,).

        :meth:`level_term` is minus its batch mean (every instance has the same number of pixels).
        """
        q = _two_class(query_logits)
        agree = sum((q * _two_class(z.detach())).sum(dim=1).flatten(1).mean(1) for z in peer_logits)
        return agree / len(peer_logits)


class MultiLevelGazeLoss(nn.Module):
    """Per-level Dice + BCE against each level's pseudo-mask, plus weighted cross-level consistency.

    GazeSup (Zhong et al., "Weakly-supervised Medical Image Segmentation with Gaze Annotations",
    MICCAI 2024): level ``i``'s share is ``w_dice * Dice_i + w_bce * BCE_i + weight * consistency_i``
    (:meth:`level_loss`, from :meth:`level_terms`); the loss is the sum of the shares.

    Args:
        consistency: ``"prop"``, ``"pure"`` or ``"none"``.
        consistency_weight: the consistency weight (the paper: 3).
        dice_weight: weight of the soft Dice term (the paper: 0.5).
        bce_weight: weight of the BCE-with-logits term (the paper: 0.5).
        smooth_nr: Dice numerator smoothing.
        smooth_dr: Dice denominator smoothing.

    ``forward(y_pred, y)``: ``y_pred`` is :class:`~gazemonai.train.networks.MultiLevelNet`'s
    ``output="train"`` dict (``level_logits``, ``prop_logits``), or a (B, N, ...) tensor of level
    logits (no propagation); ``y`` is (B, N, ...), channel ``i`` the pseudo-mask of level ``i``
    (a single channel is shared by all levels). It returns the total only and reads nothing back
    from the device; :meth:`terms` gives the parts, as tensors, for logging.
    """

    def __init__(
        self,
        consistency: str = "prop",
        consistency_weight: float = 3.0,
        dice_weight: float = 0.5,
        bce_weight: float = 0.5,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        if consistency not in ("prop", "pure", "none"):
            raise InvalidInputError(f"consistency must be 'prop', 'pure' or 'none', got {consistency!r}")
        self.consistency = None if consistency == "none" else CrossLevelConsistencyLoss(consistency, "sum")
        self.consistency_weight = float(consistency_weight)
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.dice = DiceLoss(sigmoid=True, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
        self.bce = nn.BCEWithLogitsLoss()

    def level_terms(
        self, index: int, logits: Tensor, prop_logits: Tensor | None, peer_logits: Sequence[Tensor], y: Tensor
    ) -> dict[str, Tensor]:
        """Level ``index``'s unweighted terms: ``{"dice", "bce"[, "consistency"]}`` (tensors with gradient).

        Args:
            index: the level (0-based).
            logits: its logits (B, 1, ...).
            prop_logits: its propagated logits (``"prop"`` consistency), else ``None``.
            peer_logits: the other N - 1 levels' logits (stop-gradient targets).
            y: (B, N, ...) targets (or one channel shared by all levels).
        """
        n = len(peer_logits) + 1
        y = y.float()
        if y.shape[1] not in (1, n):
            raise InvalidInputError(f"{n} levels but the target has {y.shape[1]} channels")
        t = y[:, index : index + 1] if y.shape[1] == n else y
        terms = {"dice": self.dice(logits, t), "bce": self.bce(logits, t)}
        if self.consistency is not None and n > 1:
            query = prop_logits if self.consistency.mode == "prop" else logits
            if query is None:
                raise InvalidInputError("mode 'prop' needs the level's propagated logits")
            terms["consistency"] = self.consistency.level_term(query, peer_logits)
        return terms

    def level_loss(
        self, index: int, logits: Tensor, prop_logits: Tensor | None, peer_logits: Sequence[Tensor], y: Tensor
    ) -> Tensor:
        """Level ``index``'s share of :meth:`forward`'s total, for training the levels one at a time.

        ``w_dice * Dice + w_bce * BCE`` against the level's target plus ``weight *`` its consistency
        term against ``peer_logits`` (the other levels' logits, stop-gradient). Summed over the
        levels these shares are the total, and each share's gradient reaches only its own level, so
        backpropagating them one after another gives the joint step's gradients. Arguments as
        :meth:`level_terms`.
        """
        return self.combine(self.level_terms(index, logits, prop_logits, peer_logits, y))

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """One level's share from its :meth:`level_terms`: the weighted sum."""
        total = self.dice_weight * terms["dice"] + self.bce_weight * terms["bce"]
        if "consistency" in terms:
            total = total + self.consistency_weight * terms["consistency"]
        return total

    @staticmethod
    def _levels(y_pred) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        if isinstance(y_pred, dict):
            level_logits = list(y_pred["level_logits"])
            prop = list(y_pred.get("prop_logits") or [])
        else:
            level_logits = list(torch.split(y_pred, 1, dim=1))
            prop = []
        return level_logits, prop if len(prop) == len(level_logits) else [None] * len(level_logits)

    def _per_level(self, y_pred):
        """``(index, logits, propagated logits or None, peers' logits)`` of each level."""
        level_logits, prop_logits = self._levels(y_pred)
        for i, (z, prop) in enumerate(zip(level_logits, prop_logits)):
            yield i, z, prop, level_logits[:i] + level_logits[i + 1 :]

    def forward(self, y_pred, y: torch.Tensor) -> torch.Tensor:
        shares = [self.level_loss(i, z, prop, peers, y) for i, z, prop, peers in self._per_level(y_pred)]
        total = shares[0]
        for share in shares[1:]:
            total = total + share
        return total

    def terms(self, y_pred, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts of :meth:`forward`'s total, detached, as 0-d tensors on the logits' device.

        Keys ``dice_k``, ``bce_k`` and (with consistency and several levels) ``consistency_k`` for
        level ``k`` (1-based, unweighted), ``consistency`` (their sum) and ``total``. Computed
        without gradient; nothing is read back to the host.
        """
        out: dict[str, torch.Tensor] = {}
        total, consistency = None, None
        with torch.no_grad():
            for i, z, prop, peers in self._per_level(y_pred):
                terms = detached_terms(self.level_terms(i, z, prop, peers, y))
                for name, value in terms.items():
                    out[f"{name}_{i + 1}"] = value
                if "consistency" in terms:
                    c = terms["consistency"]
                    consistency = c if consistency is None else consistency + c
                share = self.combine(terms).detach()
                total = share if total is None else total + share
        if consistency is not None:
            out["consistency"] = consistency
        out["total"] = total
        return out
