"""Which image to look at next: per-image uncertainty scores of a multi-level model's prediction.

A :class:`~gazemonai.train.networks.MultiLevelNet` holds N level networks, each trained on its own
pseudo-mask level; where they disagree the gaze has not yet pinned the object down. Its ``"stack"``
output, ``(B, 1 + N, ...)`` logits (the mean, then each level), gives two scores per image for active
learning (Settles, "Active Learning Literature Survey", 2009: query-by-committee disagreement and
uncertainty sampling):

* :func:`level_disagreement`: the mean over pixels of the spread (max - min) of the levels'
  foreground probabilities — the level networks as a committee;
* :func:`predictive_entropy`: the mean over pixels of the binary entropy (bits) of the ensemble's
  foreground probability.

Both are 0 for a model sure of every pixel; disagreement is at most 1, entropy at most 1 bit.
"""

from __future__ import annotations

import torch

__all__ = ["level_disagreement", "predictive_entropy", "SCORES"]


def _check(stack: torch.Tensor) -> None:
    if stack.ndim < 3 or stack.shape[1] < 2:
        raise ValueError(f"expected (B, 1 + levels, ...) stacked logits, got shape {tuple(stack.shape)}")


def level_disagreement(stack: torch.Tensor) -> torch.Tensor:
    """(B,) mean pixel-wise spread (max - min) of the level networks' foreground probabilities.

    Args:
        stack: ``MultiLevelNet(output="stack")`` logits, ``(B, 1 + N, ...)``; a one-level model
            (N = 1) has no committee and scores 0.
    """
    _check(stack)
    levels = torch.sigmoid(stack[:, 1:].float())
    spread = levels.amax(dim=1) - levels.amin(dim=1)
    return spread.flatten(1).mean(1)


def predictive_entropy(stack: torch.Tensor) -> torch.Tensor:
    """(B,) mean pixel-wise binary entropy (bits) of the ensemble's foreground probability.

    Args:
        stack: ``MultiLevelNet(output="stack")`` logits, ``(B, 1 + N, ...)``; channel 0 (the mean
            logit, what inference thresholds) is scored.
    """
    _check(stack)
    p = torch.sigmoid(stack[:, 0].float())
    q = 1.0 - p
    h = -(torch.xlogy(p, p) + torch.xlogy(q, q)) / torch.log(torch.tensor(2.0))
    return h.flatten(1).mean(1)


#: the scores by the name MONAI Label's strategies use
SCORES = {"disagreement": level_disagreement, "entropy": predictive_entropy}
