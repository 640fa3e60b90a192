"""Hybrid supervision: full-mask images, instance weights (DII), co-regularisation (DCR), hand-checked."""

import math

import numpy as np
import pytest
import torch

from gazemonai.errors import InvalidInputError
from gazemonai.train.hybrid import (
    DIIUpdate,
    DynamicInstanceIndicator,
    HybridLoss,
    HybridTargetd,
    last_layer_grads,
    strong_ids_of,
)


def test_strong_images_are_a_seeded_fraction_or_named():
    ids = [f"img{i:02d}" for i in range(40)]
    a, b = strong_ids_of(ids, 0.1, seed=0), strong_ids_of(list(reversed(ids)), 0.1, seed=0)
    assert a == b and len(a) == 4 and a <= set(ids)  # the same images whatever the order
    assert strong_ids_of(ids, 0.1, seed=1) != a
    assert len(strong_ids_of(ids[:3], 0.1)) == 1  # at least one
    assert strong_ids_of(ids, None, strong_ids=["img05", "img07"]) == {"img05", "img07"}
    with pytest.raises(InvalidInputError, match="img99"):
        strong_ids_of(ids, None, strong_ids=["img05", "img99"])
    for bad in (0, 1.5, None, True):
        with pytest.raises(InvalidInputError, match="strong_fraction"):
            strong_ids_of(ids, bad)


def test_hybrid_target_is_the_mask_on_strong_images_only():
    t = HybridTargetd(num_levels=2)
    label = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    pseudo = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]])
    strong = t({"label": label, "pseudo_label": pseudo, "strong": 1})
    assert torch.equal(strong["pseudo_label"], torch.cat([label, label]))
    weak = t({"label": label, "pseudo_label": pseudo, "strong": 0})
    assert torch.equal(weak["pseudo_label"], pseudo)
    assert torch.equal(t({"label": label, "strong": 1})["pseudo_label"], torch.cat([label, label]))
    with pytest.raises(InvalidInputError, match="'case7'.*fixations"):
        t({"label": label, "strong": 0, "id": "case7"})


def test_last_layer_grads_are_each_instances_own_gradient():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 1, 1)
    feats = torch.randn(3, 5, 4, 6)
    targets = (torch.rand(3, 1, 4, 6) > 0.5).float()
    z = conv(feats).detach().requires_grad_(True)
    losses = torch.nn.functional.binary_cross_entropy_with_logits(z, targets, reduction="none").mean(
        (1, 2, 3)
    )
    (dz,) = torch.autograd.grad(losses.sum(), z)
    got = last_layer_grads(feats, dz)
    for k in range(3):  # autograd, one instance at a time
        conv.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            conv(feats[k : k + 1]), targets[k : k + 1]
        )
        loss.backward()
        expected = torch.cat([conv.weight.grad.reshape(-1), conv.bias.grad])
        assert torch.allclose(got[k], expected, atol=1e-6)


def _batch(labels, strong, index, conv, feats):
    """A two-level ``output="train"`` dict over fixed features, and the hybrid target dict."""
    logits = conv(feats)
    y_pred = {"level_logits": [logits, logits + 0.1], "features": [feats, feats]}
    target = torch.cat([labels, labels], dim=1)
    return y_pred, {"target": target, "strong": torch.tensor(strong), "index": torch.tensor(index)}


def test_an_instance_contradicting_the_strong_data_loses_weight_one_agreeing_keeps_it():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 1, 1)
    feats = torch.randn(4, 4, 8, 8)
    truth = (feats[:, :1] > 0).float()  # the features say where the object is
    labels = torch.cat([truth[:2], truth[2:3], 1 - truth[3:4]])  # 2 strong, 1 agreeing, 1 contradicting
    indicator = DynamicInstanceIndicator(num_instances=4, lr=0.1)
    update = DIIUpdate(HybridLoss(indicator))
    history = []
    for _ in range(5):  # "training goes on": the same batch seen again
        update.update(*_batch(labels, [1, 1, 0, 0], [0, 1, 2, 3], conv, feats))
        history.append(indicator.weights.clone())
    agree, contradict = history[-1][2].item(), history[-1][3].item()
    assert contradict < agree and contradict < 1.0
    assert history[0][3] > history[-1][3]  # the weight moved as training went on
    assert torch.equal(history[-1][:2], torch.ones(2))  # strong images carry no weight of their own
    assert int(indicator.updates) == 5

    off = DynamicInstanceIndicator(num_instances=4, lr=0.1, enabled=False)  # "without DII"
    DIIUpdate(HybridLoss(off)).update(*_batch(labels, [1, 1, 0, 0], [0, 1, 2, 3], conv, feats))
    assert torch.equal(off.weights, torch.ones(4))


def _l(z, t):
    """0.5 soft Dice + 0.5 BCE of one instance, written out."""
    p = torch.sigmoid(z)
    dice = 1 - (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    return 0.5 * dice + 0.5 * bce


def test_hybrid_loss_against_hand_computed_values_and_the_networks_exchange_targets():
    torch.manual_seed(1)
    z1 = torch.randn(2, 1, 3, 3, requires_grad=True)
    z2 = torch.randn(2, 1, 3, 3, requires_grad=True)
    target = (torch.rand(2, 2, 3, 3) > 0.5).float()
    indicator = DynamicInstanceIndicator(num_instances=5)
    indicator.weights[4] = 0.25  # instance 1 of the batch is weak, with weight 0.25
    loss = HybridLoss(indicator, dcr_loss="label", dcr_weight=2.0, ramp_iterations=0, dii_normalize=False)
    y = {"target": target, "strong": torch.tensor([1, 0]), "index": torch.tensor([0, 4])}
    total = loss({"level_logits": [z1, z2]}, y)

    g, lam = 0.25, 2.0
    sup1 = (_l(z1[0], target[0, 0]) + g * _l(z1[1], target[1, 0])) / 2
    sup2 = (_l(z2[0], target[0, 1]) + g * _l(z2[1], target[1, 1])) / 2
    dcr1 = ((1 - g) + lam) * _l(z1[1], torch.sigmoid(z2[1]).detach()) / 2  # weak instance only
    dcr2 = ((1 - g) + lam) * _l(z2[1], torch.sigmoid(z1[1]).detach()) / 2
    assert torch.allclose(total, sup1 + sup2 + dcr1 + dcr2, atol=1e-5)
    terms = loss.terms({"level_logits": [z1, z2]}, y)
    assert torch.allclose(terms["dcr_1"], dcr1, atol=1e-5) and torch.allclose(
        terms["supervised_2"], sup2, atol=1e-5
    )
    # the mean of the weak instances' weights: instance 0 is strong (seen so in the batch), its 1 left out
    assert math.isclose(float(terms["dii_mean"]), (3 + 0.25) / 4, rel_tol=1e-6)

    # network 1's co-regularisation term reads network 2's prediction, and sends it no gradient
    parts = loss._parts({"level_logits": [z1, z2]}, y)
    (g1, g2) = torch.autograd.grad(parts["dcr_1"], [z1, z2], allow_unused=True)
    assert g2 is None or torch.count_nonzero(g2) == 0
    assert torch.count_nonzero(g1[1]) > 0 and torch.count_nonzero(g1[0]) == 0  # weak instance only
    moved = loss._parts({"level_logits": [z1, z2 + 1.0]}, y)
    assert not torch.allclose(moved["dcr_1"], parts["dcr_1"])
    assert torch.allclose(moved["supervised_1"], parts["supervised_1"])

    no_dcr = HybridLoss(indicator, dcr=False, dii_normalize=False)({"level_logits": [z1, z2]}, y)
    assert torch.allclose(no_dcr, sup1 + sup2, atol=1e-5)


def test_normalised_weights_share_the_weak_labels_weight_out_instead_of_removing_it():
    torch.manual_seed(3)
    z1, z2 = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    target = (torch.rand(3, 2, 4, 4) > 0.5).float()
    indicator = DynamicInstanceIndicator(num_instances=3)
    indicator.weights[:] = torch.tensor([0.25, 0.75, 0.1])  # instance 2 is strong (its weight unused)
    y = {"target": target, "strong": torch.tensor([0, 0, 1]), "index": torch.tensor([0, 1, 2])}
    parts = HybridLoss(indicator, dcr=False)._parts({"level_logits": [z1, z2]}, y)
    # weak weights 0.25 and 0.75, mean 0.5 -> 0.5 and 1.5; the strong instance weighs 1
    expected = (0.5 * _l(z1[0], target[0, 0]) + 1.5 * _l(z1[1], target[1, 0]) + _l(z1[2], target[2, 0])) / 3
    assert torch.allclose(parts["supervised_1"], expected, atol=1e-5)
    raw = HybridLoss(indicator, dcr=False, dii_normalize=False)._parts({"level_logits": [z1, z2]}, y)
    expected = (0.25 * _l(z1[0], target[0, 0]) + 0.75 * _l(z1[1], target[1, 0]) + _l(z1[2], target[2, 0])) / 3
    assert torch.allclose(raw["supervised_1"], expected, atol=1e-5)
    # equal weights, whatever their value, are the same as no DII
    indicator.weights[:2] = 0.3
    same = HybridLoss(indicator, dcr=False)._parts({"level_logits": [z1, z2]}, y)
    unweighted = HybridLoss(DynamicInstanceIndicator(3), dcr=False)._parts({"level_logits": [z1, z2]}, y)
    assert torch.allclose(same["supervised_1"], unweighted["supervised_1"], atol=1e-6)
    # a batch of strong instances only is left as it is
    y_strong = {**y, "strong": torch.tensor([1, 1, 1])}
    full = HybridLoss(indicator, dcr=False)._parts({"level_logits": [z1, z2]}, y_strong)
    assert torch.allclose(full["supervised_1"], sum(_l(z1[k], target[k, 0]) for k in range(3)) / 3, atol=1e-5)


def _agreement(q, peer):
    """mean over pixels of <[1 - s(q), s(q)], [1 - s(peer), s(peer)]>, written out."""
    a, b = torch.sigmoid(q), torch.sigmoid(peer)
    return (a * b + (1 - a) * (1 - b)).mean()


def test_the_consistency_form_of_co_regularisation_against_hand_computed_values():
    """``dcr_loss="prop"``: GazeSup's consistency of each propagated prediction with the peer, weak only."""
    torch.manual_seed(2)
    z1, z2, r1, r2 = (torch.randn(2, 1, 3, 3, requires_grad=True) for _ in range(4))
    target = (torch.rand(2, 2, 3, 3) > 0.5).float()
    indicator = DynamicInstanceIndicator(num_instances=3)
    indicator.weights[2] = 0.5
    y = {"target": target, "strong": torch.tensor([0, 1]), "index": torch.tensor([2, 0])}
    pred = {"level_logits": [z1, z2], "prop_logits": [r1, r2]}
    parts = HybridLoss(indicator, dcr_loss="prop", dcr_weight=3.0)._parts(pred, y)

    w = (1 - 0.5) + 3.0  # the weak instance 0 (gamma 0.5); the strong instance 1 has no peer term
    assert torch.allclose(parts["dcr_1"], -w * _agreement(r1[0], z2[0]) / 2, atol=1e-6)
    assert torch.allclose(parts["dcr_2"], -w * _agreement(r2[0], z1[0]) / 2, atol=1e-6)
    # the batch's only weak instance: its label weight 0.5, divided by the batch's mean weight 0.5
    assert torch.allclose(
        parts["supervised_1"], (_l(z1[0], target[0, 0]) + _l(z1[1], target[1, 0])) / 2, atol=1e-5
    )
    # the query is network 1's propagated prediction; network 2's logits are a stop-gradient target
    g_r1, g_z1, g_z2 = torch.autograd.grad(parts["dcr_1"], [r1, z1, z2], allow_unused=True)
    assert torch.count_nonzero(g_r1[0]) > 0 and torch.count_nonzero(g_r1[1]) == 0
    assert g_z1 is None and g_z2 is None

    pure = HybridLoss(indicator, dcr_loss="pure", dcr_weight=3.0)._parts({"level_logits": [z1, z2]}, y)
    assert torch.allclose(pure["dcr_1"], -w * _agreement(z1[0], z2[0]) / 2, atol=1e-6)
    with pytest.raises(InvalidInputError, match="needs the propagated logits"):
        HybridLoss(indicator)({"level_logits": [z1, z2]}, y)
    with pytest.raises(InvalidInputError, match="dcr_loss must be"):
        HybridLoss(indicator, dcr_loss="peer")


def test_co_regularisation_ramps_up():
    loss = HybridLoss(DynamicInstanceIndicator(1), dcr_weight=3.0, ramp_iterations=100)
    assert math.isclose(loss.ramp(), 3.0 * math.exp(-5), rel_tol=1e-9)
    for _ in range(50):
        loss.step()
    assert math.isclose(loss.ramp(), 3.0 * math.exp(-5 * 0.25), rel_tol=1e-9)
    for _ in range(60):
        loss.step()
    assert loss.ramp() == 3.0
    assert HybridLoss(DynamicInstanceIndicator(1), dcr=False).ramp() == 0.0


def test_dii_mean_is_the_weak_images_mean_weight():
    """Strong images keep weight 1; averaging them in overstated the weak weights (issue #26)."""
    indicator = DynamicInstanceIndicator(num_instances=4, strong=[True, True, False, False])
    indicator.weights[2:] = torch.tensor([0.2, 0.4])
    loss = HybridLoss(indicator, dcr=False)
    y = {"target": torch.zeros(1, 1, 2, 2), "strong": torch.tensor([0]), "index": torch.tensor([2])}
    terms = loss.terms({"level_logits": [torch.zeros(1, 1, 2, 2)]}, y)
    assert math.isclose(float(terms["dii_mean"]), 0.3, rel_tol=1e-6)  # not (1 + 1 + 0.2 + 0.4) / 4
    with pytest.raises(InvalidInputError, match="3 flags for 4"):
        DynamicInstanceIndicator(num_instances=4, strong=[True, False, False])


def test_a_resumed_run_goes_on_with_the_ramp_where_it_was():
    """The DCR ramp follows the trainer's iteration, which a resume restores: it does not start over."""
    from ignite.engine import Engine

    loss = HybridLoss(DynamicInstanceIndicator(2, enabled=False), dcr_weight=3.0, ramp_iterations=100)
    engine = Engine(lambda e, b: None)
    engine.state.iteration = 50  # as CheckpointLoader leaves a trainer resumed at iteration 50
    DIIUpdate(loss)(engine)
    assert loss.iteration == 50
    assert math.isclose(loss.ramp(), 3.0 * math.exp(-5 * 0.25), rel_tol=1e-9)


def test_the_weights_are_saved_and_restored_with_the_checkpoint():
    a = DynamicInstanceIndicator(num_instances=6)
    a.weights[:] = torch.from_numpy(np.linspace(0, 1, 6)).float()
    a.update(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.randn(2, 3))
    b = DynamicInstanceIndicator(num_instances=6)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weights, b.weights) and torch.equal(a.strong_direction, b.strong_direction)
    with pytest.raises(InvalidInputError):
        DynamicInstanceIndicator(num_instances=0)
    with pytest.raises(InvalidInputError, match="dii_interval"):
        DIIUpdate(HybridLoss(a), interval=0)
