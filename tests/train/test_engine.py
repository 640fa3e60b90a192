"""Engine pieces: batch preparation, the autocast inferer, the supervision switch, the step switch."""

import pytest
import torch

from gazemonai.train.engine import AutocastInferer, MultiLevelPrepareBatch, level_label_key, num_levels
from gazemonai.train.networks import MultiLevelNet


def test_prepare_batch():
    batch = {"image": torch.zeros(2, 3, 8, 8), "pseudo_label": torch.ones(2, 2, 8, 8)}
    img, tgt, args, kwargs = MultiLevelPrepareBatch()(batch)
    assert tgt.shape == (2, 2, 8, 8) and args == () and kwargs == {"output": "train"}
    with pytest.raises(KeyError, match="no 'label'"):
        MultiLevelPrepareBatch(label_key="label")(batch)


def test_autocast_inferer_returns_float32_close_to_fp32():
    torch.manual_seed(0)
    net = MultiLevelNet(num_levels=2, features=(4, 4, 8, 8, 16, 4)).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = net(x, output="stack")
        out = AutocastInferer("bfloat16")(x, net, output="stack")
        train = AutocastInferer("bfloat16")(x, net, output="train")
    assert out.dtype == torch.float32 and train["prop_logits"][0].dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
    assert torch.equal(AutocastInferer(None)(x, net), net(x))
    # the convolutions really ran in bfloat16 (an inferer that skipped autocast passes the lines above)
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for m in net.modules()
             if isinstance(m, torch.nn.Conv2d)]  # fmt: skip
    with torch.no_grad():
        AutocastInferer("bfloat16")(x, net)
        assert dtypes and set(dtypes) == {torch.bfloat16}
        dtypes.clear()
        AutocastInferer(None)(x, net)
        assert set(dtypes) == {torch.float32}
    for hook in hooks:
        hook.remove()
    assert not torch.equal(out, ref)


def test_train_iteration_rejects_unknown_steps():
    from gazemonai.train.engine import train_iteration

    with pytest.raises(ValueError, match="levelwise"):
        train_iteration("sideways")


def test_supervision_switch():
    assert num_levels("full", (0.5, 0.3)) == 1 and num_levels("gaze", (0.5, 0.3)) == 2
    assert level_label_key("full") == "label" and level_label_key("gaze") == "pseudo_label"
    with pytest.raises(ValueError, match="supervision"):
        num_levels("boxes", (0.5,))


@pytest.mark.parametrize("benchmark", [True, False])
def test_seeding_leaves_cudnn_autotuning_on_unless_asked(benchmark):
    """MONAI's set_determinism turns cuDNN's autotuner off; the bundles' default keeps it for GPU users."""
    import random

    from gazemonai.train.engine import set_determinism

    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        set_determinism(7, cudnn_benchmark=benchmark)
        first = (random.random(), torch.rand(1).item())
        assert torch.backends.cudnn.benchmark is benchmark
        assert torch.backends.cudnn.deterministic is (not benchmark)
        set_determinism(7, cudnn_benchmark=benchmark)
        assert (random.random(), torch.rand(1).item()) == first  # the streams are seeded all the same
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved
        set_determinism(None, cudnn_benchmark=False)
