"""Resumable training state with MONAI's checkpoint handlers and our add-ons; only weights are read."""

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from gazemonai.errors import CheckpointMismatchError, CheckpointReadError
from gazemonai.train.checkpoints import (
    BestMetric,
    CheckedCheckpointLoader,
    IntervalCheckpoint,
    RandomStates,
    TrainerState,
    load_weights,
)


def _resumable(engine, path, save_dict, interval=None, lr_scheduler=None):
    """The bundle's wiring: the trainer's state, MONAI's loader when the file exists, the saver."""
    state = TrainerState(str(path), lr_scheduler=lr_scheduler)
    save_dict = {**save_dict, "trainer": state}
    state.attach(engine)
    if path.is_file():
        CheckedCheckpointLoader(str(path), save_dict).attach(engine)
    IntervalCheckpoint(str(path), save_dict, interval=interval).attach(engine)
    return save_dict


def test_latest_checkpoint_round_trip(tmp_path):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    engine = Engine(lambda e, b: None)
    _resumable(engine, tmp_path / "latest.pt", {"model": net, "optimizer": opt})
    engine.run([0, 0], max_epochs=2)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    assert {p.name for p in tmp_path.iterdir()} == {"latest.pt", ".lock"}  # no temporary file left behind
    net2 = torch.nn.Linear(2, 1)
    engine2 = Engine(lambda e, b: None)
    epochs = []
    engine2.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(e.state.epoch))
    _resumable(engine2, tmp_path / "latest.pt", {"model": net2})
    engine2.run([0, 0], max_epochs=3)
    assert epochs == [3]  # resumed after epoch 2
    assert all(torch.equal(saved[k], v) for k, v in net2.state_dict().items())
    engine3 = Engine(lambda e, b: None)
    _resumable(engine3, tmp_path / "latest.pt", {"model": net2})
    with pytest.raises(ValueError, match="trained 3 epochs, more than the 2 of this run; give --epochs 3"):
        engine3.run([0, 0], max_epochs=2)


def test_latest_pt_loads_with_monai_s_own_checkpoint_loader(tmp_path):
    """The zoo's way: MONAI's CheckpointLoader with the same objects resumes the trainer's epoch too."""
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: torch.nn.init.constant_(net.weight, float(e.state.iteration)))
    _resumable(engine, tmp_path / "latest.pt", {"model": net})
    engine.run([0, 0], max_epochs=2)
    net2, engine2 = torch.nn.Linear(2, 1), Engine(lambda e, b: None)
    state = TrainerState(str(tmp_path / "latest.pt"))
    state.attach(engine2)
    CheckpointLoader(str(tmp_path / "latest.pt"), {"model": net2, "trainer": state}).attach(engine2)
    engine2.add_event_handler(Events.STARTED, lambda e: e.terminate())
    engine2.run([0, 0], max_epochs=5)
    assert (engine2.state.epoch, engine2.state.iteration) == (2, 4)
    assert torch.equal(net2.weight, torch.full((1, 2), 4.0))


class _Payload:
    """Unpickling this runs code: what a crafted latest.pt or model.pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def test_a_crafted_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"model": {}, "trainer": {"epoch": 1}, "x": _Payload(marker)}, tmp_path / "latest.pt")
    engine = Engine(lambda e, b: None)
    _resumable(engine, tmp_path / "latest.pt", {"model": torch.nn.Linear(2, 1)})
    with pytest.raises(CheckpointReadError, match="cannot read checkpoint .*latest.pt as weights"):
        engine.run([0], max_epochs=1)
    assert not marker.exists()
    with pytest.raises(CheckpointReadError):
        load_weights(tmp_path / "latest.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "latest.pt").read_bytes()[:100])  # a truncated file
    with pytest.raises(CheckpointReadError, match="cut.pt"):
        load_weights(tmp_path / "cut.pt")
    engine = Engine(lambda e, b: None)
    CheckedCheckpointLoader(str(tmp_path / "cut.pt"), {"model": torch.nn.Linear(2, 1)}).attach(engine)
    with pytest.raises(CheckpointReadError, match="cannot read checkpoint .*cut.pt as weights: not a torch"):
        engine.run([0], max_epochs=1)
    assert not marker.exists()


class _Scripted:
    """A key metric (an ignite Metric) whose value at each evaluation is the next of ``scores``."""

    def __new__(cls, scores):
        from ignite.metrics import Metric

        it = iter(scores)

        class Scripted(Metric):
            def reset(self):
                pass

            def update(self, output):
                pass

            def compute(self):
                return next(it)

        return Scripted()


def _run(tmp_path, net, scores, epochs):
    """A trainer that changes ``net`` each epoch; MONAI's evaluator with scripted scores and its saver."""
    from monai.engines import SupervisedEvaluator
    from monai.handlers import ValidationHandler

    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=[{"image": torch.zeros(1, 1), "label": torch.zeros(1, 1)}],
        network=net,
        key_val_metric={"dice": _Scripted(scores)},
    )
    saver = CheckpointSaver(
        str(tmp_path), {"model": net}, save_key_metric=True, key_metric_filename="model.pt"
    )  # as the bundles' train.json configures it
    saver.attach(evaluator)
    trainer = Engine(lambda e, b: torch.nn.init.constant_(net.weight, float(e.state.iteration)))
    ValidationHandler(1, evaluator).attach(trainer)
    _resumable(trainer, tmp_path / "latest.pt", {"model": net, "best": BestMetric(evaluator, saver)})
    trainer.run([0], max_epochs=epochs)
    return evaluator


def test_the_best_model_survives_a_resume(tmp_path):
    net = torch.nn.Linear(1, 1, bias=False)
    _run(tmp_path, net, [0.5, 0.8], epochs=2)  # best at epoch 2: weight 2
    # model.pt is the bare state dict, as MONAI's CheckpointSaver writes one object (the zoo's ckpt_export)
    assert list(torch.load(tmp_path / "model.pt", weights_only=True)) == ["weight"]
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == 2.0
    # a longer run: the first validation after the resume (0.6) is worse than the best before it
    _run(tmp_path, net, [0.6, 0.9], epochs=4)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == 4.0  # epoch 4's
    evaluator = _run(tmp_path, net, [0.7], epochs=5)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == 4.0  # kept
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["best"] == {"best": 0.9, "best_epoch": 4}
    # what MONAI's evaluator reports as the best so far is restored with it
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.9, 4)


def _lrs(tmp_path, epochs, iterations_per_epoch=4, planned_epochs=None):
    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=(planned_epochs or epochs) * iterations_per_epoch, eta_min=0.01
    )
    trainer = Engine(lambda e, b: (opt.step(), sched.step()))
    lrs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lrs.append(opt.param_groups[0]["lr"]))
    save_dict = {"model": net, "optimizer": opt, "lr": sched}
    _resumable(trainer, tmp_path / "latest.pt", save_dict, lr_scheduler=sched)
    trainer.run([0] * iterations_per_epoch, max_epochs=epochs)
    return lrs


def test_a_longer_run_continues_the_schedule_instead_of_warming_up(tmp_path):
    first = _lrs(tmp_path, epochs=2)
    assert first[-1] == pytest.approx(0.01)  # the planned 8 steps ended at eta_min
    more = _lrs(tmp_path, epochs=4)  # --epochs 4: 8 more steps
    assert len(more) == 8 and all(b <= a + 1e-12 for a, b in zip([first[-1]] + more, more))  # never climbs
    assert more[-1] == pytest.approx(0.01)
    # resumed mid-schedule with the run made longer: from the current rate down to eta_min, no jump
    (tmp_path / "latest.pt").unlink()
    half = _lrs(tmp_path, epochs=1, planned_epochs=2)
    rest = _lrs(tmp_path, epochs=4, planned_epochs=4)
    assert (
        rest[0] < half[-1]
        and all(b <= a + 1e-12 for a, b in zip(rest, rest[1:]))
        and rest[-1] == pytest.approx(0.01)
    )
    # the same plan resumed: exactly the uninterrupted schedule
    (tmp_path / "latest.pt").unlink()
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    whole = _lrs(tmp_path / "a", epochs=3)
    _lrs(tmp_path / "b", epochs=1, planned_epochs=3)
    assert _lrs(tmp_path / "b", epochs=3) == whole[4:]


def test_random_states_round_trip_with_the_transforms():
    import random

    import numpy as np
    from monai.transforms import Compose, RandFlipd, RandRotate90d

    transforms = Compose([RandFlipd("x", prob=0.5), RandRotate90d("x", prob=0.5)])
    transforms.set_random_state(3)
    states = RandomStates(transforms)
    saved = states.state_dict()

    def draws():
        return (
            torch.rand(3).tolist(),
            np.random.rand(3).tolist(),  # noqa: NPY002 - MONAI's legacy global stream
            random.random(),
            [t.R.rand() for t in transforms.transforms],
        )

    first = draws()
    states.load_state_dict(saved)
    assert draws() == first
    with pytest.raises(ValueError, match="3 random transform states but the training transforms have 4"):
        RandomStates(Compose([*transforms.transforms, RandFlipd("x", prob=0.5)])).load_state_dict(saved)


def test_latest_checkpoint_every_n_iterations_saves_at_epoch_ends(tmp_path):
    """``interval``: the first epoch end >= N iterations after the last save, and the last epoch."""
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    saved_at = []
    _resumable(engine, tmp_path / "latest.pt", {"model": net}, interval=5)

    def record(e):
        if (tmp_path / "latest.pt").is_file():
            saved_at.append(torch.load(tmp_path / "latest.pt", weights_only=True)["trainer"]["iteration"])
            (tmp_path / "latest.pt").unlink()

    engine.add_event_handler(Events.EPOCH_COMPLETED, record)
    engine.run([0, 0], max_epochs=7)  # 2 iterations an epoch
    assert saved_at == [6, 12, 14]  # 6 - 0 >= 5, 12 - 6 >= 5, then the last epoch
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        IntervalCheckpoint(str(tmp_path / "latest.pt"), {"model": net}, interval=0)


def test_the_loader_reads_a_bare_model_pt_and_the_nested_form_of_gazemonai_0_4(tmp_path):
    source = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(source.weight, 3.0)
    torch.save(source.state_dict(), tmp_path / "bare.pt")  # what MONAI's CheckpointSaver writes
    torch.save({"model": source.state_dict()}, tmp_path / "nested.pt")  # bundles <= 0.4.1's model.pt
    for name in ("bare.pt", "nested.pt"):
        net = torch.nn.Linear(2, 1)
        engine = Engine(lambda e, b: None)
        CheckedCheckpointLoader(str(tmp_path / name), {"model": net}).attach(engine)
        engine.run([0], max_epochs=1)
        assert torch.equal(net.weight, source.weight) and torch.equal(net.bias, source.bias), name
    engine = Engine(lambda e, b: None)
    CheckedCheckpointLoader(str(tmp_path / "bare.pt"), {"model": torch.nn.Linear(3, 1)}).attach(engine)
    with pytest.raises(CheckpointMismatchError, match="bare.pt does not fit the network the configs build"):
        engine.run([0], max_epochs=1)


def test_a_latest_pt_of_gazemonai_0_4_resumes(tmp_path):
    """LatestCheckpoint's layout: the trainer's place as a plain dict, data and schedules beside it."""
    net = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(net.weight, 7.0)
    old = {"model": net.state_dict(), "trainer": {"epoch": 2, "iteration": 4}}
    old |= {"random": RandomStates().state_dict(), "data": {"epoch_length": 2}, "schedules": {}}
    torch.save(old, tmp_path / "latest.pt")
    net2, engine = torch.nn.Linear(2, 1), Engine(lambda e, b: None)
    epochs = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(e.state.epoch))
    _resumable(engine, tmp_path / "latest.pt", {"model": net2, "random": RandomStates()})
    engine.run([0, 0], max_epochs=3)
    assert epochs == [3] and torch.equal(net2.weight, net.weight)
    # another training set is still refused, from the old file's own record
    torch.save({"model": net.state_dict(), "trainer": {"epoch": 2, "iteration": 6}}, tmp_path / "latest.pt")
    engine = Engine(lambda e, b: None)
    _resumable(engine, tmp_path / "latest.pt", {"model": torch.nn.Linear(2, 1)})
    with pytest.raises(ValueError, match="the iterations per epoch is 2 but was 3"):
        engine.run([0, 0], max_epochs=3)
