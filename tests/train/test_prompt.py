"""The image-label prompt's networks: shapes, gradients, stage 2 using stage 1, stage-1 checkpoints."""

import pytest
import torch
from ignite.engine import Engine, Events

from gazemonai.errors import CheckpointReadError, InvalidInputError, MissingInputError
from gazemonai.train.networks import MultiLevelNet, PromptedFeatureUNet, PyramidClassifier
from gazemonai.train.prompt import PromptWeights, load_prompt_weights

FEATURES = [4, 4, 8, 8, 16, 4]


def prompted(**kwargs):
    torch.manual_seed(0)
    return MultiLevelNet(num_levels=2, features=FEATURES, in_channels=3, prompt_features=FEATURES, **kwargs)


def test_classifier_pyramid_and_logits():
    net = PyramidClassifier(in_channels=3, features=FEATURES, num_classes=1)
    x = torch.rand(2, 3, 48, 32)
    maps = net.pyramid(x)
    assert [tuple(m.shape) for m in maps] == [
        (2, 4, 48, 32),
        (2, 4, 24, 16),
        (2, 8, 12, 8),
        (2, 8, 6, 4),
        (2, 16, 3, 2),
    ]
    assert net.pyramid_channels == (4, 4, 8, 8, 16) and net(x).shape == (2, 1)
    net(x).sum().backward()  # every level feeds the head: every block gets a gradient
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if "weight" in n
    )


def test_classifier_refuses_bad_widths():
    with pytest.raises(InvalidInputError, match="features must be 5 encoder widths"):
        PyramidClassifier(features=[4, 4, 8])
    with pytest.raises(InvalidInputError, match="num_classes"):
        PyramidClassifier(num_classes=0)


def test_prompted_outputs_match_multilevel_shapes():
    net = prompted()
    x = torch.rand(2, 3, 32, 32)
    plain = MultiLevelNet(num_levels=2, features=FEATURES, in_channels=3)
    for output in ("ensemble", "stack"):
        assert net(x, output=output).shape == plain(x, output=output).shape
    train = net(x, output="train")
    assert train["logits"].shape == (2, 1, 32, 32) and len(train["prop_logits"]) == 2
    # the prediction is still the mean of the level logits
    torch.testing.assert_close(train["logits"], torch.stack(train["level_logits"]).mean(0))


def test_stage_two_gradients_flow_and_a_frozen_prompt_gets_none():
    net = prompted()
    net.train()
    assert not net.prompt.training  # frozen: kept in evaluation mode even in training
    out = net(torch.rand(2, 3, 32, 32), output="train")
    (out["logits"].sum() + sum(p.sum() for p in out["prop_logits"])).backward()
    for name, p in net.named_parameters():
        if name.startswith("prompt."):
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    fusions = [n for n, _ in net.named_parameters() if "skips" in n]
    assert len(fusions) == 2 * 2 * 9  # 5 short + 4 long skips per level, weight and bias


def test_unfrozen_prompt_is_fine_tuned():
    net = prompted(freeze_prompt=False)
    net.train()
    assert net.prompt.training
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    grads = [p.grad for n, p in net.named_parameters() if n.startswith("prompt.") and "head" not in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert net.prompt.head.weight.grad is None  # the class head is not on the segmentation path


def test_stage_two_uses_the_stage_one_features():
    net = prompted().eval()
    x = torch.rand(2, 3, 32, 32)
    before = net(x)
    other = PyramidClassifier(in_channels=3, features=FEATURES)  # other stage-1 weights
    net.prompt.load_state_dict(other.state_dict())
    after = net(x)
    assert (after - before).abs().max() > 1e-4
    # and each pyramid level reaches the output: zeroing one map changes the prediction
    level = net.levels[0]
    pyramid = net.prompt.pyramid(x)
    base = level(x, pyramid)
    for i in range(5):
        changed = [torch.zeros_like(m) if j == i else m for j, m in enumerate(pyramid)]
        assert (level(x, changed) - base).abs().max() > 1e-6, f"pyramid level {i} unused"


def test_level_refuses_a_pyramid_of_another_image():
    level = PromptedFeatureUNet(features=FEATURES, in_channels=3)
    pyramid = PyramidClassifier(features=FEATURES).pyramid(torch.rand(1, 3, 64, 64))
    with pytest.raises(InvalidInputError, match="does not match the encoder"):
        level(torch.rand(1, 3, 32, 32), pyramid)
    with pytest.raises(InvalidInputError, match="5 maps"):
        level(torch.rand(1, 3, 64, 64), pyramid[:4])


def test_stage_one_checkpoint_loads_into_stage_two(tmp_path):
    stage1 = PyramidClassifier(in_channels=3, features=FEATURES)
    torch.save(stage1.state_dict(), tmp_path / "model.pt")  # as CheckpointSaver writes it
    torch.save({"model": stage1.state_dict()}, tmp_path / "old.pt")  # as bundles <= 0.4.1 wrote it
    for name in ("model.pt", "old.pt"):
        net = prompted()
        load_prompt_weights(net, tmp_path / name)
        for key, value in stage1.state_dict().items():
            torch.testing.assert_close(net.prompt.state_dict()[key], value)


@pytest.mark.parametrize(
    "make, words",
    [
        (
            lambda: PyramidClassifier(in_channels=3, features=[4, 4, 8, 8, 32]),
            ["widths [4, 4, 8, 8, 32]", "--features"],
        ),
        (lambda: PyramidClassifier(in_channels=1, features=FEATURES), ["1 input channel", "--in_channels"]),
        (
            lambda: PyramidClassifier(in_channels=3, features=FEATURES, num_classes=3),
            ["3 class logit", "head.weight"],
        ),
    ],
)
def test_stage_two_refuses_a_stage_one_checkpoint_of_another_shape(tmp_path, make, words):
    torch.save({"model": make().state_dict()}, tmp_path / "model.pt")
    net = prompted()
    before = {k: v.clone() for k, v in net.prompt.state_dict().items()}
    with pytest.raises(InvalidInputError, match="does not fit this stage-2 network") as err:
        load_prompt_weights(net, tmp_path / "model.pt")
    for word in words:
        assert word in str(err.value)
    assert all(torch.equal(v, net.prompt.state_dict()[k]) for k, v in before.items())  # nothing loaded


def test_stage_two_refuses_what_is_not_a_stage_one_checkpoint(tmp_path):
    torch.save({"model": MultiLevelNet(num_levels=1, features=FEATURES).state_dict()}, tmp_path / "seg.pt")
    with pytest.raises(InvalidInputError, match="not a stage-1 classifier checkpoint"):
        load_prompt_weights(prompted(), tmp_path / "seg.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointReadError):
        load_prompt_weights(prompted(), tmp_path / "junk.pt")
    with pytest.raises(MissingInputError, match="train stage 1 first"):
        load_prompt_weights(prompted(), tmp_path / "absent.pt")
    with pytest.raises(InvalidInputError, match="without one"):
        load_prompt_weights(MultiLevelNet(num_levels=1, features=FEATURES), tmp_path / "seg.pt")


def test_prompt_weights_handler_loads_at_start_and_not_on_resume(tmp_path):
    stage1 = PyramidClassifier(in_channels=3, features=FEATURES)
    torch.save({"model": stage1.state_dict()}, tmp_path / "model.pt")
    with pytest.raises(MissingInputError, match="not found"):
        PromptWeights(str(tmp_path / "absent.pt"), prompted())

    def started(iteration):
        net = prompted()
        engine = Engine(lambda e, b: None)
        PromptWeights(str(tmp_path / "model.pt"), net).attach(engine)
        engine.state.iteration = iteration
        engine._fire_event(Events.STARTED)
        return torch.equal(net.prompt.head.weight, stage1.head.weight)

    assert started(0) and not started(5)  # a resumed run keeps the weights it resumed


def test_without_prompt_features_the_network_is_unchanged():
    """No prompt: no stage-1 part and the state dict keys of every earlier checkpoint."""
    net = MultiLevelNet(num_levels=2, features=FEATURES, in_channels=3)
    assert net.prompt is None and not any(k.startswith("prompt.") or "skips" in k for k in net.state_dict())
    with pytest.raises(InvalidInputError, match="freeze_prompt must be True or False"):
        MultiLevelNet(num_levels=1, features=FEATURES, prompt_features=FEATURES, freeze_prompt="false")
