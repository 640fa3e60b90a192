"""Active-learning scores of a multi-level prediction, against hand-computed values."""

import math

import pytest
import torch

from gazemonai.serve.uncertainty import SCORES, level_disagreement, predictive_entropy


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def stack(mean, *levels):
    """(1, 1 + N, 1, len) logits from per-pixel probabilities."""
    rows = [[logit(p) for p in row] for row in (mean, *levels)]
    return torch.tensor(rows, dtype=torch.float64)[None, :, None, :]


def test_disagreement_is_the_mean_spread_of_the_levels():
    # pixel 1: levels 0.9 / 0.5 / 0.2 -> spread 0.7; pixel 2: all 0.5 -> 0
    s = stack([0.5, 0.5], [0.9, 0.5], [0.5, 0.5], [0.2, 0.5])
    assert level_disagreement(s).item() == pytest.approx(0.35)
    # one level: no committee, nothing to disagree about
    assert level_disagreement(stack([0.3], [0.3])).item() == pytest.approx(0.0)


def test_entropy_is_the_mean_binary_entropy_of_the_ensemble_in_bits():
    s = stack([0.5, 0.9, 1e-9], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1])
    h09 = -(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1))
    assert predictive_entropy(s).item() == pytest.approx((1.0 + h09 + 0.0) / 3, abs=1e-6)


def test_scores_rank_a_batch_and_refuse_a_plain_prediction():
    batch = torch.cat([stack([0.5], [0.5], [0.5]), stack([0.5], [0.99], [0.01])])
    assert level_disagreement(batch).tolist() == pytest.approx([0.0, 0.98])
    assert set(SCORES) == {"disagreement", "entropy"}
    with pytest.raises(ValueError, match="1 \\+ levels"):
        level_disagreement(torch.zeros(1, 1, 4, 4))
