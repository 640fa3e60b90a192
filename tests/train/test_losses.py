"""Cross-level consistency and the multi-level gaze loss, by hand."""

import math

import pytest
import torch

from gazemonai.train.losses import CrossLevelConsistencyLoss, MultiLevelGazeLoss
from gazemonai.train.networks import MultiLevelNet

SLIM = (4, 4, 8, 8, 16, 4)


def _const(v, shape=(1, 1, 2, 2)):
    return torch.full(shape, float(v), requires_grad=True)


def test_consistency_pure_by_hand():
    a, b = _const(0.0), _const(math.log(3))  # p = 0.5 and 0.75
    loss = CrossLevelConsistencyLoss("pure", reduction="none")([a, b])
    # level 1: -(0.5*0.25 + 0.5*0.75) = -0.5 ; level 2: -(0.25*0.5 + 0.75*0.5) = -0.5
    assert torch.allclose(loss, torch.tensor([-0.5, -0.5]))
    a2, b2 = _const(math.log(3)), _const(math.log(3))
    assert CrossLevelConsistencyLoss("pure")([a2, b2]).item() == pytest.approx(-2 * (0.25**2 + 0.75**2))


def test_consistency_gradient_does_not_reach_the_peer():
    a, b = _const(0.3), _const(-0.2)
    pa, pb = _const(1.0), _const(2.0)
    CrossLevelConsistencyLoss("prop", reduction="sum")([a, b], [pa, pb]).backward()
    # with "prop" only the propagated logits receive gradient: the peers are stop-gradient targets
    assert a.grad is None and b.grad is None
    assert pa.grad is not None and pb.grad is not None
    # d/dz of -[(1-s)(1-t) + s t] = -s(1-s)(2t-1), with s = sigmoid(1.0), t = sigmoid(-0.2), 4 pixels mean
    s, t = torch.sigmoid(torch.tensor(1.0)), torch.sigmoid(torch.tensor(-0.2))
    expected = -(s * (1 - s) * (2 * t - 1)) / 4
    assert torch.allclose(pa.grad, torch.full_like(pa, expected.item()), atol=1e-6)


def test_multilevel_loss_by_hand():
    z = torch.zeros(1, 1, 2, 2)
    y = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    loss_fn = MultiLevelGazeLoss(consistency="pure", consistency_weight=3.0, smooth_nr=0.0, smooth_dr=1e-9)
    total = loss_fn({"level_logits": [z, z], "prop_logits": []}, y)
    bce = math.log(2)  # sigmoid(0) = 0.5 everywhere
    dice1 = 1 - 2 * 0.5 / (2.0 + 1.0)  # sum p = 2, sum y = 1, intersection 0.5
    dice2 = 1 - 2 * 1.0 / (2.0 + 2.0)
    cons = 2 * -(0.5 * 0.5 + 0.5 * 0.5)
    expected = 0.5 * (dice1 + bce) + 0.5 * (dice2 + bce) + 3.0 * cons
    assert total.item() == pytest.approx(expected, rel=1e-5)
    terms = loss_fn.terms({"level_logits": [z, z], "prop_logits": []}, y)
    assert terms["consistency"].item() == pytest.approx(cons)
    assert terms["dice_1"].item() == pytest.approx(dice1, rel=1e-5)
    assert terms["dice_2"].item() == pytest.approx(dice2, rel=1e-5)
    assert terms["bce_2"].item() == pytest.approx(bce, rel=1e-6)
    assert terms["consistency_1"].item() == pytest.approx(cons / 2)
    assert terms["total"].item() == pytest.approx(expected, rel=1e-5) and not terms["total"].requires_grad
    # forward is the sum of the levels' shares, each from level_terms (one source of truth)
    shares = [loss_fn.level_loss(i, z, None, [z], y) for i in range(2)]
    assert (shares[0] + shares[1]).item() == pytest.approx(total.item(), rel=1e-6)
    with pytest.raises(ValueError, match="2 levels but the target has 3"):
        loss_fn({"level_logits": [z, z]}, torch.zeros(1, 3, 2, 2))


def test_full_mode_is_one_level_without_consistency():
    net = MultiLevelNet(num_levels=1, features=SLIM)
    out = net(torch.randn(1, 3, 16, 16), output="train")
    loss_fn = MultiLevelGazeLoss()
    loss_fn(out, torch.ones(1, 1, 16, 16)).backward()
    assert "consistency" not in loss_fn.terms(out, torch.ones(1, 1, 16, 16))


def test_loss_reads_nothing_back_from_the_device():
    """No host sync: on the "meta" device, where any read of a value raises, the loss still computes.

    (Before, forward kept ``float()`` copies of its parts, one device-to-host read each per step.)
    """
    z = [torch.randn(2, 1, 8, 8, device="meta", requires_grad=True) for _ in range(2)]
    prop = [torch.randn(2, 1, 8, 8, device="meta", requires_grad=True) for _ in range(2)]
    y = torch.zeros(2, 2, 8, 8, device="meta")
    loss_fn = MultiLevelGazeLoss(consistency="prop")
    total = loss_fn({"level_logits": z, "prop_logits": prop}, y)
    assert total.device.type == "meta" and total.dim() == 0
    total.backward()
    assert z[0].grad.device.type == "meta" and prop[1].grad is not None
    terms = loss_fn.terms({"level_logits": z, "prop_logits": prop}, y)
    assert {t.device.type for t in terms.values()} == {"meta"} and not terms["total"].requires_grad
    with pytest.raises(RuntimeError, match="meta"):  # the meta device really refuses reads
        float(total)
