import json
import os
import sys

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from PIL import Image

from gazemonai.data import gaze_datalist, read_split, split_datalist, validation_split
from gazemonai.engine import AutocastInferer
from gazemonai.handlers import ChannelDice, LatestCheckpoint, SegmentationReport, dice_iou, level_metrics
from gazemonai.networks import MultiLevelNet
from gazemonai.transforms import BinarizeMaskd, SaveMaskd


def test_validation_split_is_seeded_disjoint_and_complete():
    ids = [f"id{i:03d}" for i in range(50)]
    tr, va = validation_split(ids, 0.1, seed=3)
    assert len(va) == 5 and len(tr) == 45 and not set(tr) & set(va) and set(tr) | set(va) == set(ids)
    assert validation_split(list(reversed(ids)), 0.1, seed=3) == (tr, va)  # order of the file is irrelevant
    assert validation_split(ids, 0.1, seed=4)[1] != va
    with pytest.raises(ValueError, match="val_fraction"):
        validation_split(ids, 1.0)


def test_datalists(synthetic_root):
    items = split_datalist(synthetic_root, "train", synthetic_root / "gaze.csv", val_fraction=0.25)
    val = split_datalist(synthetic_root, "val", synthetic_root / "gaze.csv", val_fraction=0.25)
    test = split_datalist(synthetic_root, "test")
    assert len(items) == 3 and len(val) == 1 and len(test) == 2
    assert {i["id"] for i in items} | {i["id"] for i in val} == set(read_split(synthetic_root, "train.txt"))
    assert items[0]["fixations"].shape[1] == 3 and "fixations" not in test[0]
    with pytest.raises(FileNotFoundError, match="1 file\\(s\\) missing under .*images/ghost"):
        gaze_datalist(synthetic_root, ["synth_000", "ghost"])
    with pytest.raises(FileNotFoundError, match="split file not found"):
        split_datalist(synthetic_root, "nope.txt")


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


def test_binarize_and_save_mask(tmp_path):
    rgb = np.zeros((3, 4, 5), np.uint8)
    rgb[:, 1, 2] = 200  # JPEG-like 0/255 RGB mask
    rgb[0, 3, 4] = 100  # below 127: background
    d = BinarizeMaskd("label")({"label": MetaTensor(torch.as_tensor(rgb), meta={"filename_or_obj": "m.jpg"})})
    lab = d["label"]
    assert lab.shape == (1, 4, 5) and lab.sum() == 1 and lab[0, 1, 2] == 1
    ones = BinarizeMaskd("label")({"label": torch.tensor([[[0, 1], [1, 0]]])})["label"]
    assert ones.sum() == 2  # 0/1 label maps: foreground > 0
    img = MetaTensor(torch.zeros(3, 4, 5), meta={"filename_or_obj": "/x/case_7.jpg"})
    SaveMaskd("pred", output_dir=str(tmp_path))({"pred": lab, "image": img})
    saved = np.asarray(Image.open(tmp_path / "case_7.png"))
    assert saved.shape == (4, 5) and saved[1, 2] == 255 and saved.sum() == 255


def test_channel_dice_by_hand():
    pred = torch.zeros(2, 3, 2, 2)  # ensemble + 2 levels
    pred[0, 0, 0, :] = 1  # 2 pixels
    pred[0, 1, 0, 0] = 1
    label = torch.zeros(2, 1, 2, 2)
    label[0, 0, 0, 0] = 1  # image 0: one pixel; image 1: empty label and empty prediction
    m = ChannelDice(0, output_transform=lambda o: o)
    m.reset()
    m.update((pred, label))
    assert m.compute() == pytest.approx((2 / 3 + 1.0) / 2)
    m1 = ChannelDice(1, output_transform=lambda o: o)
    m1.reset()
    m1.update((pred, label))
    assert m1.compute() == pytest.approx(1.0)
    assert dice_iou(pred[0, 0], label[0, 0]) == pytest.approx((2 / 3, 1 / 2))
    assert set(level_metrics(2, "test", iou=True)) == {
        "test_dice_level_1",
        "test_dice_level_2",
        "test_iou_level_1",
        "test_iou_level_2",
        "test_mean_iou",
    }


def test_segmentation_report(tmp_path):
    report = SegmentationReport(str(tmp_path / "m.json"))
    engine = Engine(lambda e, b: None)
    report.attach(engine)
    pred = torch.zeros(2, 2, 2)
    pred[:, 0, 0] = 1
    label = torch.zeros(1, 2, 2)
    label[0, 0, 0] = 1
    engine.state.batch = [{"id": "a"}]
    engine.state.output = [{"pred": pred, "label": label}]
    report._collect(engine)
    report._write(engine)
    out = json.loads((tmp_path / "m.json").read_text())
    assert out["images"] == 1 and out["per_image"][0]["id"] == "a"
    assert out["mean"]["ensemble"] == {"dice": 1.0, "iou": 1.0}


def test_latest_checkpoint_round_trip(tmp_path):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    engine = Engine(lambda e, b: None)
    ckpt = LatestCheckpoint(str(tmp_path / "latest.pt"), {"model": net, "optimizer": opt})
    ckpt.attach(engine)
    engine.run([0, 0], max_epochs=2)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    assert (tmp_path / "latest.pt").is_file() and not list(tmp_path.glob("*.tmp"))
    net2 = torch.nn.Linear(2, 1)
    engine2 = Engine(lambda e, b: None)
    epochs = []
    engine2.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(e.state.epoch))
    LatestCheckpoint(str(tmp_path / "latest.pt"), {"model": net2}).attach(engine2)
    engine2.run([0, 0], max_epochs=3)
    assert epochs == [3]  # resumed after epoch 2
    assert all(torch.equal(saved[k], v) for k, v in net2.state_dict().items())


@pytest.mark.parametrize("levels,step_in_backward,fused", [(2, False, False), (3, True, True)])
def test_levelwise_step_matches_the_joint_step(levels, step_in_backward, fused):
    """Training the levels one after another gives the joint step's update and loss.

    The joint step is MONAI's default iteration with torch's default SGD; the levelwise step may
    update each parameter inside the backward pass with the fused SGD kernel (the paper profile).
    """
    from monai.engines import SupervisedTrainer

    from gazemonai.engine import MultiLevelPrepareBatch, train_iteration
    from gazemonai.losses import MultiLevelGazeLoss

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

    from gazemonai.engine import MultiLevelPrepareBatch
    from gazemonai.losses import MultiLevelGazeLoss

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
    from gazemonai.engine import train_iteration

    for bad in ({"step_in_backward": True}, {"release_memory_at": ["backbone.down_4"]}):
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

    from gazemonai.engine import train_iteration

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = torch.nn.parallel.DistributedDataParallel(MultiLevelNet(2, features=(4, 4, 8, 8, 8, 4)))
        trainer = _tiny_trainer(net, train_iteration("levelwise"))
        with pytest.raises(ValueError, match="use train_step 'joint' for multi-GPU"):
            trainer.run()
    finally:
        dist.destroy_process_group()


def test_train_iteration_rejects_unknown_steps():
    from gazemonai.engine import train_iteration

    with pytest.raises(ValueError, match="levelwise"):
        train_iteration("sideways")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm; glibc malloc_trim")
def test_release_freed_memory_returns_freed_heap_pages_to_the_os():
    from gazemonai.engine import release_freed_memory

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


def test_levelwise_step_releases_memory_where_asked(monkeypatch):
    """Each level's backward calls release_freed_memory once at the named submodule; bad names are named."""
    import gazemonai.engine as engine_mod

    calls = []
    real = engine_mod.release_freed_memory
    monkeypatch.setattr(engine_mod, "release_freed_memory", lambda: calls.append(1) or real())

    def run(release_at):
        net = MultiLevelNet(2, features=(4, 4, 8, 8, 8, 4))
        step = engine_mod.train_iteration("levelwise", release_memory_at=release_at)
        _tiny_trainer(net, step, max_epochs=3, batch_size=1).run()

    run(["backbone.down_4"])
    assert len(calls) == 3 * 2  # 3 iterations x 2 level passes; none in the peers' no-grad forward
    with pytest.raises(ValueError, match="no submodule 'backbone.down_9'"):
        run(["backbone.down_9"])
