import itertools
import math

import pytest
import torch

from gazemonai.train import networks
from gazemonai.train.networks import (
    FeatureUNet,
    MultiLevelNet,
    feature_propagation,
    feature_propagation_unfold,
)

SLIM = (4, 4, 8, 8, 16, 4)


@pytest.mark.parametrize("chunk", [None, 1, 0], ids=["cpu-default", "row-by-row", "whole (the GPU path)"])
def test_propagation_matches_unfold_reference_and_its_gradient(chunk, monkeypatch):
    if chunk is not None:  # the product of the similarities chunked row by row, or in one piece as on a GPU
        monkeypatch.setattr(networks, "CPU_DOT_CHUNK", chunk)
    torch.manual_seed(0)
    f = torch.randn(2, 5, 11, 9, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(feature_propagation(f), feature_propagation_unfold(f), atol=1e-12)
    if chunk is None:  # the gradient against finite differences once; against the reference's below
        assert torch.autograd.gradcheck(lambda x: feature_propagation(x, 5, 2), (f,))
    g = torch.randn(2, 5, 11, 9, dtype=torch.float64)
    (a,) = torch.autograd.grad((feature_propagation(f) * g).sum(), f)
    (b,) = torch.autograd.grad((feature_propagation_unfold(f) * g).sum(), f)
    assert torch.allclose(a, b, atol=1e-10)


def _propagation_by_loops(f, kernel_size, dilation, values=None):
    """The definition, pixel by pixel, with explicit zero padding (any number of spatial dims)."""
    v = f if values is None else values
    r = (kernel_size // 2) * dilation
    fp = torch.nn.functional.pad(f, (r, r) * (f.dim() - 2))
    vp = torch.nn.functional.pad(v, (r, r) * (f.dim() - 2))
    out = torch.zeros_like(v)
    steps = range(0, 2 * r + 1, dilation)
    for p in itertools.product(*(range(n) for n in f.shape[2:])):
        for b in range(f.shape[0]):
            qs = [tuple(pi + o for pi, o in zip(p, off)) for off in itertools.product(steps, repeat=len(p))]
            sims = torch.stack([(f[(b, slice(None)) + p] * fp[(b, slice(None)) + q]).sum() for q in qs])
            w = torch.softmax(sims.clamp(min=0), 0)
            out[(b, slice(None)) + p] = sum(wk * vp[(b, slice(None)) + q] for wk, q in zip(w, qs))
    return out


def test_propagation_3d_and_with_values_against_the_definition():
    torch.manual_seed(0)
    f = torch.randn(1, 3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(feature_propagation(f, 3, 2), _propagation_by_loops(f, 3, 2), atol=1e-12)
    expected = _propagation_by_loops(f, 3, 1, v)
    assert torch.allclose(feature_propagation(f, 3, 1, values=v), expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: feature_propagation(a, 3, 1, values=b), (f, v))
    f2 = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    v2 = torch.randn(2, 1, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: feature_propagation(a, 5, 2, values=b), (f2, v2))
    with pytest.raises(ValueError, match="values must match feat"):
        feature_propagation(f2, values=v2[:, :, :5])


def test_propagating_logits_equals_classifying_propagated_features():
    """A 1x1 classifier commutes with the weighted average: both orders, same values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ramp = torch.linspace(-1, 1, 256, dtype=torch.float64).view(16, 16)
    results = []
    for propagate_logits in (True, False):
        torch.manual_seed(1)
        net = MultiLevelNet(2, features=SLIM, propagate_logits=propagate_logits).double()
        out = net(x, output="train")
        (out["prop_logits"][0] * ramp).sum().backward()
        results.append((out["prop_logits"][0].detach(), [p.grad.clone() for p in net.levels[0].parameters()]))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-12)
    assert all(torch.allclose(u, w, atol=1e-10) for u, w in zip(ga, gb))


def test_propagation_by_hand():
    # 1 channel, 1x2 image, 3x3 neighbourhood at dilation 1: pixel 0 (value 1) sees itself (1*1=1),
    # its neighbour (1*2=2) and 7 zero-padded neighbours (0): weights e^1, e^2, 7*e^0 over the sum
    f = torch.tensor([[[[1.0, 2.0]]]])
    out = feature_propagation(f, kernel_size=3, dilation=1)
    z0 = math.e + math.e**2 + 7
    assert out[0, 0, 0, 0].item() == pytest.approx((math.e * 1 + math.e**2 * 2) / z0, rel=1e-6)
    z1 = math.e**2 + math.e**4 + 7  # pixel 1: <2,1>=2, <2,2>=4
    assert out[0, 0, 0, 1].item() == pytest.approx((math.e**2 * 1 + math.e**4 * 2) / z1, rel=1e-6)
    with pytest.raises(ValueError, match="odd"):
        feature_propagation(f, kernel_size=4)


def test_feature_unet_and_multilevel_outputs():
    net = MultiLevelNet(num_levels=3, features=SLIM, in_channels=1)
    x = torch.randn(2, 1, 32, 32)
    ens = net(x)
    stack = net(x, output="stack")
    train = net(x, output="train")
    assert ens.shape == (2, 1, 32, 32) and stack.shape == (2, 4, 32, 32)
    assert torch.allclose(stack[:, :1], ens, atol=1e-6)
    assert torch.allclose(torch.stack(train["level_logits"]).mean(0), ens, atol=1e-6)
    assert torch.allclose(stack[:, 1:].mean(1, keepdim=True), ens, atol=1e-6)
    assert len(train["prop_logits"]) == 3 and train["prop_logits"][0].shape == (2, 1, 32, 32)
    logits, feat = net.levels[0].forward_features(x)
    assert feat.shape == (2, 4, 32, 32)
    with pytest.raises(ValueError, match="output must be"):
        net(x, output="nope")


def test_levels_are_independent_or_copies():
    torch.manual_seed(0)
    ind = MultiLevelNet(num_levels=2, features=SLIM)
    w = [lvl.classifier.weight for lvl in ind.levels]
    assert not torch.equal(w[0], w[1])
    cp = MultiLevelNet(num_levels=2, features=SLIM, init="copy")
    assert torch.equal(cp.levels[0].classifier.weight, cp.levels[1].classifier.weight)
    assert cp.levels[0].classifier.weight.data_ptr() != cp.levels[1].classifier.weight.data_ptr()
    assert isinstance(cp.levels[0], FeatureUNet)


def test_unet_stage1_classifier_gives_its_decoder_levels_as_the_pyramid():
    """SKS's U-shaped stage 1: pyramid = u1..u4 and the bottleneck, widths (f5, f1, f2, f3, f4)."""
    from gazemonai.train.networks import PyramidClassifier

    torch.manual_seed(0)
    features = (4, 8, 8, 16, 16, 4)
    net = PyramidClassifier(in_channels=3, features=features, arch="unet")
    x = torch.randn(2, 3, 32, 32)
    maps = net.pyramid(x)
    assert [tuple(m.shape) for m in maps] == [
        (2, 4, 32, 32),
        (2, 8, 16, 16),
        (2, 8, 8, 8),
        (2, 16, 4, 4),
        (2, 16, 2, 2),
    ]
    assert net.pyramid_channels == (4, 8, 8, 16, 16) and net.head.in_features == 52
    # the finest level is the decoder's output, not the encoder's first block
    assert not torch.equal(maps[0], net.conv_0(x))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), torch.tensor([[0.0], [1.0]]))
    loss.backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad  # the class loss trains every block, decoder included
    assert any(n.startswith("ups.3.") for n, _ in net.named_parameters())
    # the encoder-only form keeps its former parameters (stage-1 checkpoints of 0.4 load)
    enc = PyramidClassifier(in_channels=3, features=features, arch="encoder")
    assert not any(k.startswith("ups.") for k in enc.state_dict()) and enc.pyramid_channels == (
        4,
        8,
        8,
        16,
        16,
    )
    assert all(k in net.state_dict() for k in enc.state_dict() if k != "head.weight")
    with pytest.raises(ValueError, match="prompt_stage1_arch 'unet' needs BasicUNet's 6 widths"):
        PyramidClassifier(features=(4, 8, 8, 16, 16), arch="unet")
    with pytest.raises(ValueError, match="prompt_stage1_arch must be one of"):
        PyramidClassifier(features=features, arch="resnet")


def test_multilevel_net_with_a_unet_stage1_feeds_its_decoder_pyramid_to_every_level():
    from gazemonai.train.networks import MultiLevelNet

    torch.manual_seed(0)
    features = (4, 8, 8, 16, 16, 4)
    net = MultiLevelNet(
        2, features=features, prompt_features=features, prompt_arch="unet", freeze_prompt=False
    )
    # short skip 0 fuses the encoder's 4 channels with u1's 4 (features[5]); long skip 0 u1 with u2's 8
    assert (
        net.levels[0].short_skips[0].in_channels == 4 + 4 and net.levels[1].long_skips[0].in_channels == 4 + 8
    )
    x = torch.randn(2, 3, 32, 32)
    out = net(x, output="train")
    assert out["logits"].shape == (2, 1, 32, 32) and len(out["prop_logits"]) == 2
    out["logits"].mean().backward()
    assert (
        net.prompt.ups[3].convs.conv_0.conv.weight.grad.abs().sum() > 0
    )  # fine-tuned: reaches stage 1's decoder
    frozen = MultiLevelNet(2, features=features, prompt_features=features, prompt_arch="unet")
    assert not any(p.requires_grad for p in frozen.prompt.parameters())
    assert frozen(x).shape == (2, 1, 32, 32)
