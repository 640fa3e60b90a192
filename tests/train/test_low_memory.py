"""The opt-in low-memory training pieces: same updates as the plain ones, and what they refuse."""

import os
import sys

import pytest
import torch
from ignite.engine import Events

from gazemonai.train.losses import MultiLevelGazeLoss
from gazemonai.train.low_memory import StepInBackward
from gazemonai.train.networks import MultiLevelNet

SLIM = (4, 4, 8, 8, 16, 4)


def test_step_in_backward_equals_plain_step():
    def run(fused):
        torch.manual_seed(0)
        net = MultiLevelNet(num_levels=2, features=SLIM)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
        if fused:
            StepInBackward.attach(opt)
        x, y = torch.randn(2, 3, 16, 16), (torch.rand(2, 2, 16, 16) > 0.5).float()
        for _ in range(3):
            opt.zero_grad()
            MultiLevelGazeLoss()(net(x, output="train"), y).backward()
            opt.step()
        return [p.detach().clone() for p in net.parameters()], net

    plain, _ = run(False)
    fused, net = run(True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, fused))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("levels,step_in_backward,fused", [(2, False, False), (3, True, True)])
def test_levelwise_step_matches_the_joint_step(levels, step_in_backward, fused):
    """Training the levels one after another gives the joint step's update and loss.

    The joint step is MONAI's default iteration with torch's default SGD; the levelwise step may
    update each parameter inside the backward pass with the fused SGD kernel (the paper profile).
    """
    from monai.engines import SupervisedTrainer

    from gazemonai.train.engine import MultiLevelPrepareBatch, train_iteration
    from gazemonai.train.losses import MultiLevelGazeLoss

    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    y = (torch.rand(2, levels, 16, 16) > 0.5).float()
    init = MultiLevelNet(levels, features=(4, 4, 8, 8, 8, 4)).state_dict()
    results = {}
    for step in ("joint", "levelwise"):
        net = MultiLevelNet(levels, features=(4, 4, 8, 8, 8, 4))
        net.load_state_dict(init)
        lw = step == "levelwise"
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=(lw and fused) or None)
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=2,
            train_data_loader=[{"image": x, "pseudo_label": y}],
            network=net,
            optimizer=opt,
            loss_function=MultiLevelGazeLoss(consistency="prop", consistency_weight=3.0),
            prepare_batch=MultiLevelPrepareBatch(output="train"),
            iteration_update=train_iteration(step, step_in_backward=lw and step_in_backward),
            decollate=False,
        )
        losses = []
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e, out=losses: out.append(e.state.output["loss"].item())
        )
        trainer.run()
        results[step] = (net.state_dict(), losses, trainer.state.output["pred"])
    (joint, joint_losses, joint_pred), (lw, lw_losses, lw_pred) = results["joint"], results["levelwise"]
    assert lw_losses == pytest.approx(joint_losses, rel=1e-5, abs=1e-6)
    assert joint_losses[0] != joint_losses[1]  # the first update changed the model
    for k in joint:
        assert torch.allclose(joint[k], lw[k], atol=1e-5), k
    assert lw_pred["logits"].shape == joint_pred["logits"].shape == (2, 1, 16, 16)
    assert torch.allclose(lw_pred["logits"], joint_pred["logits"], atol=1e-4)


def _tiny_trainer(net, iteration_update, max_epochs=1, batch_size=2):
    """MONAI's SupervisedTrainer on one random batch, with the multi-level gaze loss and plain SGD."""
    from monai.engines import SupervisedTrainer

    from gazemonai.train.engine import MultiLevelPrepareBatch
    from gazemonai.train.losses import MultiLevelGazeLoss

    batch = {
        "image": torch.rand(batch_size, 3, 16, 16),
        "pseudo_label": torch.rand(batch_size, 2, 16, 16).round(),
    }
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=[batch],
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=MultiLevelGazeLoss(),
        prepare_batch=MultiLevelPrepareBatch(output="train"),
        iteration_update=iteration_update,
        decollate=False,
    )


def test_step_in_backward_leaves_no_gradients_and_needs_the_levelwise_step():
    from gazemonai.train.engine import train_iteration

    for bad in ({"step_in_backward": True}, {"release_memory": True}):
        with pytest.raises(ValueError, match="need train_step 'levelwise'"):
            train_iteration("joint", **bad)
    net = MultiLevelNet(2, features=(4, 4, 8, 8, 8, 4))
    before = [p.detach().clone() for p in net.parameters()]
    grads_seen = []
    for p in net.parameters():  # registered before the step's own hooks: sees each gradient first
        p.register_post_accumulate_grad_hook(lambda p: grads_seen.append(p.grad is not None))
    _tiny_trainer(net, train_iteration("levelwise", step_in_backward=True)).run()
    assert len(grads_seen) == len(before) and all(grads_seen)
    assert all(p.grad is None for p in net.parameters())  # each freed right after its update
    assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters()) if p.dim() > 1)


def test_levelwise_step_refuses_distributed_data_parallel(tmp_path):
    """DDP reduces every parameter's gradient in each backward; the levelwise step reaches one level."""
    import torch.distributed as dist

    from gazemonai.train.engine import train_iteration

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = torch.nn.parallel.DistributedDataParallel(MultiLevelNet(2, features=(4, 4, 8, 8, 8, 4)))
        trainer = _tiny_trainer(net, train_iteration("levelwise"))
        with pytest.raises(ValueError, match="use train_step 'joint' for multi-GPU"):
            trainer.run()
    finally:
        dist.destroy_process_group()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm; glibc malloc_trim")
def test_release_freed_memory_returns_freed_heap_pages_to_the_os():
    from gazemonai.train.low_memory import release_freed_memory

    release_freed_memory()
    # 3000 blocks of 64 KiB (below glibc's mmap threshold: heap), every third kept so that the heap
    # cannot shrink from its top: the freed two thirds (~125 MiB) stay resident until released
    blocks = [bytearray(64 * 1024) for _ in range(3000)]
    kept = blocks[::3]
    del blocks
    before = _rss_mb()
    assert release_freed_memory() is True
    after = _rss_mb()
    assert before - after > 80, (before, after)
    assert len(kept) == 1000


def test_levelwise_step_releases_memory_at_each_bottleneck(monkeypatch):
    """Each level's backward calls release_freed_memory once, at the level network's bottleneck."""
    import gazemonai.train.low_memory as low_memory
    from gazemonai.train.engine import train_iteration

    calls = []
    real = low_memory.release_freed_memory
    monkeypatch.setattr(low_memory, "release_freed_memory", lambda: calls.append(1) or real())

    def run(net):
        _tiny_trainer(
            net, train_iteration("levelwise", release_memory=True), max_epochs=3, batch_size=1
        ).run()

    net = MultiLevelNet(2, features=(4, 4, 8, 8, 8, 4))
    assert net.levels[0].bottleneck is net.levels[0].backbone.down_4
    run(net)
    assert len(calls) == 3 * 2  # 3 iterations x 2 level passes; none in the peers' no-grad forward

    class NoBottleneck(MultiLevelNet):  # level networks without a bottleneck are named
        def __init__(self):
            super().__init__(2, features=(4, 4, 8, 8, 8, 4))
            self.levels = torch.nn.ModuleList(torch.nn.Conv2d(3, 1, 1) for _ in range(2))

    with pytest.raises(ValueError, match="'bottleneck' module; Conv2d has none"):
        run(NoBottleneck())


def test_levelwise_step_fires_each_event_where_it_happens():
    """FORWARD < LOSS < BACKWARD < MODEL, each once, with the output the MONAI contract promises."""
    from monai.engines.utils import IterationEvents

    from gazemonai.train.engine import train_iteration

    torch.manual_seed(0)
    net = MultiLevelNet(2, features=(4, 4, 8, 8, 8, 4))
    trainer = _tiny_trainer(net, train_iteration("levelwise"))
    seen = []
    backward_calls = []
    for p in net.parameters():
        p.register_post_accumulate_grad_hook(lambda p: backward_calls.append(1))

    def record(event):
        def handler(engine):
            out = engine.state.output
            grads = sum(p.grad is not None for p in net.parameters())
            seen.append((event, "pred" in out, "loss" in out, len(backward_calls), grads))

        return handler

    for event in ("FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED"):
        trainer.add_event_handler(getattr(IterationEvents, event), record(event))
    trainer.run()
    n_params = len(list(net.parameters()))
    per_level = n_params // 2
    assert [s[0] for s in seen] == [
        "FORWARD_COMPLETED",
        "LOSS_COMPLETED",
        "BACKWARD_COMPLETED",
        "MODEL_COMPLETED",
    ]
    forward, loss, backward, model = seen
    assert forward[1:3] == (True, False)  # the prediction exists, the loss not yet
    assert loss[1:3] == (True, True)
    assert forward[3] == loss[3] == per_level  # only level 2 has run its backward pass so far
    assert backward[3] == n_params and backward[4] == n_params  # every gradient, before the step
    assert torch.is_tensor(trainer.state.output["loss"]) and "dice_1" in trainer.state.loss_terms
    assert model[4] == n_params


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"amp": True}, "does not run AMP"),
        ({"accumulation_steps": 2}, "accumulation_steps=2"),
        ({"compile": True}, "bypassing torch.compile"),
    ],
)
def test_levelwise_step_refuses_what_it_cannot_honour(setting, message):
    from gazemonai.train.engine import train_iteration

    net = MultiLevelNet(2, features=(4, 4, 8, 8, 8, 4))
    trainer = _tiny_trainer(net, train_iteration("levelwise"))
    for name, value in setting.items():  # as SupervisedTrainer(amp=..., ...) would set them
        setattr(trainer, name, value)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=message):
        trainer.run()
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))  # refused before any update


def test_step_in_backward_refuses_gradient_readers_and_other_optimizers():
    from monai.engines.utils import IterationEvents

    from gazemonai.train.engine import train_iteration

    net = MultiLevelNet(2, features=(4, 4, 8, 8, 8, 4))
    trainer = _tiny_trainer(net, train_iteration("levelwise", step_in_backward=True))
    clip = lambda engine: torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # noqa: E731
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, clip)
    with pytest.raises(
        ValueError, match="1 handler\\(s\\) on BACKWARD_COMPLETED \\(e.g. gradient clipping\\)"
    ):
        trainer.run()
    # without step in backward the same clipping handler sees every gradient: allowed
    trainer = _tiny_trainer(net, train_iteration("levelwise"))
    norms = []
    trainer.add_event_handler(
        IterationEvents.BACKWARD_COMPLETED,
        lambda e: norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0))),
    )
    trainer.run()
    assert len(norms) == 1 and norms[0] > 0

    lbfgs = torch.optim.LBFGS(net.parameters())
    with pytest.raises(ValueError, match="LBFGS is not one of them"):
        StepInBackward.attach(lbfgs)


def test_step_in_backward_refuses_an_unfrozen_prompt():
    """The levels share the prompt network: stepping it in each level's backward is not the joint step."""
    from gazemonai.train.engine import train_iteration

    prompt = (4, 4, 8, 8, 8)
    net = MultiLevelNet(2, features=(4, 4, 8, 8, 8, 4), prompt_features=prompt, freeze_prompt=False)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="freeze_prompt true or step_in_backward false"):
        _tiny_trainer(net, train_iteration("levelwise", step_in_backward=True)).run()
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))  # refused before any update
    frozen = MultiLevelNet(2, features=(4, 4, 8, 8, 8, 4), prompt_features=prompt, freeze_prompt=True)
    _tiny_trainer(frozen, train_iteration("levelwise", step_in_backward=True)).run()  # allowed
