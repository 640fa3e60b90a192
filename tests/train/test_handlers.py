import json

import pytest
import torch
from ignite.engine import Engine, Events

from gazemonai.train.handlers import (
    LossTerms,
    Progress,
    SegmentationReport,
    _sampler_order,
    level_metric,
    level_metrics,
)


def _evaluate(iterations, metrics, handlers=()):
    """Run an engine whose iterations output the given per-image dicts (as MONAI's evaluators leave
    them) with ``metrics`` attached as an evaluator attaches its key and additional metrics."""
    engine = Engine(lambda e, batch: [{"pred": b["pred"], "label": b["label"]} for b in batch])
    for name, metric in metrics.items():
        metric.attach(engine, name)
    for handler in handlers:
        handler.attach(engine)
    engine.run(iterations, max_epochs=1)
    return engine


def test_level_metrics_by_hand():
    pred = torch.zeros(2, 3, 2, 2)  # ensemble + 2 levels
    pred[0, 0, 0, :] = 1  # 2 pixels
    pred[0, 1, 0, 0] = 1
    label = torch.zeros(2, 1, 2, 2)
    label[0, 0, 0, 0] = 1  # image 0: one pixel; image 1: empty label and empty prediction
    images = [{"pred": pred[i], "label": label[i]} for i in range(2)]
    metrics = {"ensemble": level_metric(0), "level_1": level_metric(1), "level_2": level_metric(2)}
    metrics["level_1_iou"] = level_metric(1, iou=True)
    state = _evaluate([images], metrics).state
    assert state.metrics["ensemble"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert state.metrics["level_1"] == pytest.approx(1.0)
    assert state.metrics["level_1_iou"] == pytest.approx(1.0)
    assert state.metrics["level_2"] == pytest.approx((0.0 + 1.0) / 2)  # nothing predicted where 1 pixel is
    assert state.metric_details["ensemble"].reshape(-1).tolist() == pytest.approx([2 / 3, 1.0])
    assert set(level_metrics(2, "test", iou=True)) == {
        "test_dice_level_1",
        "test_dice_level_2",
        "test_iou_level_1",
        "test_iou_level_2",
        "test_mean_iou",
    }
    assert set(level_metrics(2, "val")) == {"val_dice_level_1", "val_dice_level_2"}


def test_segmentation_report(tmp_path):
    pred = torch.zeros(2, 2, 2)
    pred[:, 0, 0] = 1
    label = torch.zeros(1, 2, 2)
    label[0, 0, 0] = 1

    def evaluate(iterations):
        metrics = {"eval_mean_dice": level_metric(0), **level_metrics(1, "eval", iou=True)}
        _evaluate(iterations, metrics, [SegmentationReport(str(tmp_path / "m.json"))])
        return json.loads((tmp_path / "m.json").read_text())

    out = evaluate([[{"id": "a", "pred": pred, "label": label}]])
    assert out["images"] == 1 and out["per_image"][0]["id"] == "a"
    assert out["mean"] == {"ensemble": {"dice": 1.0, "iou": 1.0}, "level_1": {"dice": 1.0, "iou": 1.0}}
    assert "both empty" in out["empty_convention"]
    # an empty prediction against a 1-pixel truth scores 0, a prediction where nothing is 0,
    # nothing where nothing is 1; two iterations, the rows in their order
    out = evaluate(
        [
            [{"id": "b", "pred": torch.zeros(2, 2, 2), "label": label}],
            [
                {"id": "c", "pred": pred, "label": label * 0},
                {"id": "d", "pred": pred * 0, "label": label * 0},
            ],
        ]
    )
    assert [r["id"] for r in out["per_image"]] == ["b", "c", "d"]
    assert out["per_image"][0]["level_1"] == {"dice": 0.0, "iou": 0.0}
    assert out["per_image"][1]["ensemble"] == {"dice": 0.0, "iou": 0.0}  # predicted, nothing there
    assert out["per_image"][2]["ensemble"] == {"dice": 1.0, "iou": 1.0}
    assert out["mean"]["level_1"]["dice"] == pytest.approx(1 / 3)


def test_segmentation_report_needs_the_iou_handlers(tmp_path):
    images = [[{"id": "a", "pred": torch.ones(2, 2, 2), "label": torch.ones(1, 2, 2)}]]
    report = SegmentationReport(str(tmp_path / "m.json"))
    with pytest.raises(ValueError, match="no metric eval_mean_iou"):
        _evaluate(images, {"eval_mean_dice": level_metric(0)}, [report])


def test_sampler_order_interleaves_the_ranks():
    # 5 images on 2 ranks: rank 0 holds 0, 2, 4 (gathered first), rank 1 holds 1, 3
    assert _sampler_order(5, 2) == [0, 3, 1, 4, 2]
    assert _sampler_order(3, 1) == [0, 1, 2]
    assert _sampler_order(3, 4) == [0, 1, 2]  # more ranks than images


def test_level_metrics_on_images_of_different_sizes():
    """Evaluation at each image's own size: a list of (C, H, W) predictions of different H, W."""
    images = [
        {"pred": torch.ones(2, 3, 4), "label": torch.ones(1, 3, 4)},
        {"pred": torch.zeros(2, 5, 2), "label": torch.ones(1, 5, 2)},
    ]
    state = _evaluate([images], {"ensemble": level_metric(0), "level_1": level_metric(1)}).state
    assert state.metrics["ensemble"] == pytest.approx((1.0 + 0.0) / 2)
    assert state.metrics["level_1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="channel 2 asked for"):
        _evaluate([images], {"level_2": level_metric(2)})


@pytest.mark.parametrize("step", ["joint", "levelwise"])
def test_loss_terms_are_epoch_means_of_every_iteration(step):
    from monai.engines import SupervisedTrainer

    from gazemonai.train.engine import MultiLevelPrepareBatch, train_iteration
    from gazemonai.train.losses import MultiLevelGazeLoss
    from gazemonai.train.networks import MultiLevelNet

    torch.manual_seed(0)
    net = MultiLevelNet(2, features=(4, 4, 8, 8, 8, 4))
    loss = MultiLevelGazeLoss()
    batches = [
        {"image": torch.rand(2, 3, 16, 16), "pseudo_label": torch.rand(2, 2, 16, 16).round()}
        for _ in range(3)
    ]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=batches,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        loss_function=loss,
        prepare_batch=MultiLevelPrepareBatch(output="train"),
        iteration_update=train_iteration(step),
    )  # decollate=True, as in the bundles: the output becomes one item per image
    LossTerms(loss).attach(trainer)
    seen, means = [], []
    trainer.add_event_handler(
        Events.ITERATION_STARTED, lambda e: seen.clear() if e.state.iteration % 3 == 1 else None
    )
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: seen.append({k: v.item() for k, v in e.state.loss_terms.items()}),
    )
    losses = []  # the loss the trainer itself computed, each iteration of the second epoch
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: losses.append(float(e.state.output[0]["loss"])) if e.state.epoch == 2 else None,
    )
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: means.append(dict(e.state.metrics)))
    trainer.run()
    assert len(trainer.state.output) == 2 and all(
        set(o) >= {"image", "label", "pred"} for o in trainer.state.output
    )
    assert len(means) == 2 and len(seen) == 3  # the second epoch's three iterations
    expected = {f"train_loss_{k}": sum(s[k] for s in seen) / 3 for k in seen[0]}
    assert set(expected) == {
        f"train_loss_{t}" for t in ("dice_1", "bce_1", "consistency_1", "dice_2", "bce_2", "consistency_2")
    } | {"train_loss_consistency", "train_loss_total"}
    assert means[1] == pytest.approx(expected, rel=1e-6)
    # the logged total is the mean of the losses the trainer optimised, not a nearby number
    assert len(losses) == 3 and means[1]["train_loss_total"] == pytest.approx(sum(losses) / 3, rel=1e-5)


def test_iteration_limit_cuts_the_last_epoch_and_still_completes_it():
    """6 iterations over 4 batches: epoch 2 is cut after 2; both epochs complete (validation, saving)."""
    from ignite.engine import Engine, Events

    from gazemonai.train.handlers import IterationLimit

    seen, completed = [], []
    engine = Engine(lambda e, batch: seen.append(batch))
    engine.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: completed.append((e.state.epoch, e.state.iteration))
    )
    IterationLimit(6).attach(engine)
    engine.run([0, 1, 2, 3], max_epochs=2)  # ceil(6 / 4) epochs, as the paper profile computes them
    assert seen == [0, 1, 2, 3, 0, 1] and completed == [(1, 4), (2, 6)]
    # more epochs than needed change nothing; a limit on an epoch's end cuts nothing
    seen.clear(), completed.clear()
    engine = Engine(lambda e, batch: seen.append(batch))
    engine.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: completed.append((e.state.epoch, e.state.iteration))
    )
    IterationLimit(8).attach(engine)
    engine.run([0, 1, 2, 3], max_epochs=5)
    assert len(seen) == 8 and completed == [(1, 4), (2, 8)]
    # too few epochs: the epochs decide (an explicit --epochs 1 is one epoch, not 15 000 iterations)
    engine = Engine(lambda e, batch: None)
    IterationLimit(10).attach(engine)
    assert engine.run([0, 1, 2, 3], max_epochs=1).iteration == 4
    # None leaves the epochs alone
    engine = Engine(lambda e, batch: None)
    IterationLimit(None).attach(engine)
    assert engine.run([0, 1, 2, 3], max_epochs=2).iteration == 8
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        IterationLimit(0)


def _engine(n_iter: int, epochs: int):
    engine = Engine(lambda e, b: None)
    return engine, lambda: engine.run(range(n_iter), max_epochs=epochs)


def test_progress_logs_plain_lines_off_a_terminal(tmp_path, caplog):
    engine, run = _engine(10, 2)
    with (tmp_path / "stderr").open("w") as stream:
        Progress("train", lines=4, stream=stream).attach(engine)
        with caplog.at_level("INFO", logger="gazemonai.train.handlers"):
            run()
    assert (tmp_path / "stderr").read_text() == ""  # no bar drawn into a file
    lines = [r.getMessage() for r in caplog.records if r.name == "gazemonai.train.handlers"]
    assert lines == [f"train epoch {e}/2: iteration {i}/10" for e in (1, 2) for i in (3, 6, 9, 10)]


def test_progress_draws_ignite_s_bar_on_a_terminal(caplog):
    import os
    import pty

    main, secondary = pty.openpty()
    engine, run = _engine(5, 1)
    with os.fdopen(secondary, "w") as stream:
        assert stream.isatty()
        Progress("train", stream=stream).attach(engine)
        with caplog.at_level("INFO", logger="gazemonai.train.handlers"):
            run()
    drawn = os.read(main, 65536).decode()
    os.close(main)
    assert "train: [4/5]" in drawn and "\r" in drawn  # tqdm's frames, on the terminal
    assert not [r for r in caplog.records if r.name == "gazemonai.train.handlers"]
