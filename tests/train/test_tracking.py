"""MLflow tracking against a real server on loopback: outages, restarts and resumed runs."""

import json
import logging
import subprocess
import sys
import time
from collections import Counter

import pytest
from helpers import free_port, wait_http
from ignite.engine import Engine, Events

from gazemonai.train.tracking import MLflowTracking, is_outage


def _server(db, port):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{db}", "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def _stop(proc):
    proc.terminate()
    proc.wait(30)


def _history(uri, run_name="r", key="loss"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("e")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == run_name]
    assert len(runs) == 1, runs
    return runs[0], sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key))


def _trainer(uri, journal, epochs=3, iterations=2, hooks=(), close=True, run_record=None):
    engine = Engine(lambda e, b: {"loss": float(e.state.iteration)})
    for event, hook in hooks:
        engine.add_event_handler(event, hook)
    MLflowTracking(
        tracking_uri=uri, experiment_name="e", run_name="r", pending_path=journal, retry_seconds=0,
        output_transform=lambda out: out["loss"], tag_name="loss", close_on_complete=close,
        experiment_param={"lr": 0.1}, run_record=run_record,
    ).attach(engine)  # fmt: skip
    engine.run([0] * iterations, max_epochs=epochs)
    return engine


def test_training_goes_on_when_the_server_is_down_from_the_start(tmp_path, caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="gazemonai.train.tracking"):
        _trainer(dead, tmp_path / "journal.jsonl", run_record=tmp_path / "record.json")
    assert time.monotonic() - started < 30  # MLflow's own retries would block for minutes
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("is unreachable" in w for w in warnings) == 1  # warned once
    assert any("are in the local store" in w for w in warnings)
    run, steps = _history(f"sqlite:///{tmp_path / 'mlruns.db'}")  # the fallback next to the journal
    assert steps == [1, 2, 3, 4, 5, 6] and run.data.params["lr"] == "0.1" and run.info.status == "FINISHED"
    assert (tmp_path / "journal.jsonl").is_file()  # kept for the next run to send to the server
    # the run record points at the run that holds the records: the local one
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["run_id"] == run.info.run_id and record["tracking_uri"].endswith("mlruns.db")

    # the next run of the same bundle, with the server up, sends what the first one could not
    port = free_port()
    server = _server(tmp_path / "server.db", port)
    try:
        uri = f"http://127.0.0.1:{port}"
        _trainer(uri, tmp_path / "journal.jsonl", epochs=1, iterations=1)
        run, steps = _history(uri)
        assert steps == [1, 2, 3, 4, 5, 6]  # the first run's steps; the second's step 1 is not doubled
        assert not (tmp_path / "journal.jsonl").exists()
    finally:
        _stop(server)


def test_a_server_that_goes_down_and_comes_back_gets_every_record_once(tmp_path, caplog):
    port = free_port()
    db, uri = tmp_path / "server.db", f"http://127.0.0.1:{port}"
    server = {"proc": _server(db, port)}

    def kill_after_epoch_1(engine):
        if engine.state.epoch == 1:
            _stop(server["proc"])

    def restart_before_epoch_3(engine):
        if engine.state.epoch == 3:
            server["proc"] = _server(db, port)

    try:
        hooks = [(Events.EPOCH_COMPLETED, kill_after_epoch_1), (Events.EPOCH_STARTED, restart_before_epoch_3)]
        with caplog.at_level(logging.WARNING, logger="gazemonai.train.tracking"):
            _trainer(uri, tmp_path / "journal.jsonl", epochs=4, hooks=hooks)
        run, steps = _history(uri)
        assert steps == list(range(1, 9)) and run.info.status == "FINISHED"
        assert any("answers again" in r.getMessage() for r in caplog.records)
        assert not (tmp_path / "journal.jsonl").exists()
    finally:
        _stop(server["proc"])


def test_a_resumed_run_logs_no_step_twice(tmp_path):
    port = free_port()
    server = _server(tmp_path / "server.db", port)
    uri = f"http://127.0.0.1:{port}"
    try:
        _trainer(uri, tmp_path / "j.jsonl", epochs=2, close=False)  # killed: the run stays unfinished

        # resumed from the end of epoch 1: epoch 2 (steps 3, 4) is replayed, epoch 3 is new
        engine = Engine(lambda e, b: {"loss": float(e.state.iteration)})
        engine.add_event_handler(
            Events.STARTED, lambda e: setattr(e.state, "epoch", 1) or setattr(e.state, "iteration", 2)
        )
        MLflowTracking(tracking_uri=uri, experiment_name="e", run_name="r", pending_path=tmp_path / "j.jsonl",
                       output_transform=lambda out: out["loss"], tag_name="loss").attach(engine)  # fmt: skip
        engine.run([0, 0], max_epochs=3)
        run, steps = _history(uri)
        assert Counter(steps) == Counter([1, 2, 3, 4, 5, 6])
    finally:
        _stop(server)


def test_only_unreachable_stores_count_as_outages():
    import requests
    from mlflow.exceptions import MlflowException

    refused = MlflowException("API request failed")
    refused.__cause__ = requests.exceptions.ConnectionError("refused")
    assert is_outage(refused) and is_outage(TimeoutError("slow"))
    assert not is_outage(MlflowException("RESOURCE_DOES_NOT_EXIST: no experiment"))
    assert not is_outage(ValueError("a bug"))
    with pytest.raises(ValueError, match="file store"):  # a wrong URI is still an error, at once
        MLflowTracking(tracking_uri="file:///tmp/x")


def test_each_offline_run_writes_only_its_own_records_to_the_local_store(tmp_path):
    """The journal stays for the server; a second offline run does not copy the first's records again."""
    dead = f"http://127.0.0.1:{free_port()}"
    _trainer(dead, tmp_path / "journal.jsonl", epochs=1, iterations=3)
    _trainer(dead, tmp_path / "journal.jsonl", epochs=1, iterations=2)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("e")
    runs = sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)
    steps = [sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss")) for r in runs]
    assert steps == [[1, 2, 3], [1, 2]]
    journal = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert all(r.get("local") for r in journal) and sum(r["op"] == "metrics" for r in journal) == 5


def test_a_training_started_from_scratch_gets_a_new_run(tmp_path):
    """``fresh_run``: a killed attempt's unfinished run is marked KILLED, not continued from step 1 again."""
    port = free_port()
    server = _server(tmp_path / "server.db", port)
    uri = f"http://127.0.0.1:{port}"
    try:
        _trainer(uri, tmp_path / "j.jsonl", epochs=1, close=False)  # killed: left RUNNING
        engine = Engine(lambda e, b: {"loss": 10.0 + e.state.iteration})
        MLflowTracking(tracking_uri=uri, experiment_name="e", run_name="r", pending_path=tmp_path / "j.jsonl",
                       output_transform=lambda out: out["loss"], tag_name="loss", fresh_run=True,
                       close_on_complete=True).attach(engine)  # fmt: skip
        engine.run([0, 0], max_epochs=1)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
        assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
        new = [r for r in runs if r.info.status == "FINISHED"][0]
        assert [m.value for m in client.get_metric_history(new.info.run_id, "loss")] == [11.0, 12.0]
    finally:
        _stop(server)


def test_a_crafted_journal_record_copies_nothing_from_outside_the_run_folder(tmp_path, monkeypatch, caplog):
    """A journal handed over with a run folder: its artifact records may name only the folder's files."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the SQLite store keeps artifacts under the working folder
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    own = outputs / "metrics.json"
    own.write_text("{}")
    journal = outputs / "mlflow_pending.jsonl"
    records = [
        {"op": "artifact", "experiment": "e", "run": "r", "path": str(secret)},
        {"op": "artifact", "experiment": "e", "run": "r", "path": str(outputs / ".." / "secret.txt")},
        {"op": "artifact", "experiment": "e", "run": "r", "path": str(own), "artifact_path": "../../x"},
        {"op": "params", "experiment": "e", "run": "r", "params": {"a": {"_target_": "os.system"}}},
        {"op": "shell", "experiment": "e", "run": "r"},
        {"op": "artifact", "experiment": "e", "run": "r", "path": str(own)},
    ]
    journal.write_text("".join(json.dumps(r) + "\n" for r in records))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with caplog.at_level(logging.WARNING, logger="gazemonai.train.tracking"):
        _trainer(uri, journal, epochs=1, iterations=1)
    run, _ = _history(uri)
    logged = sorted(a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run.info.run_id))
    assert logged == ["metrics.json"]
    assert "5 records refused" in caplog.text and "outside the run's folder" in caplog.text
    assert len((outputs / "mlflow_pending.jsonl.rejected").read_text().splitlines()) == 5  # kept, not lost


def test_a_symlinked_journal_is_refused(tmp_path):
    from gazemonai.errors import InvalidInputError

    target = tmp_path / "profile"
    target.write_text("# someone's shell profile\n")
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "j.jsonl").symlink_to(target)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with pytest.raises(InvalidInputError, match="symlink"):
        _trainer(uri, tmp_path / "outputs" / "j.jsonl", epochs=1, iterations=1)
    assert target.read_text() == "# someone's shell profile\n"


def test_artifacts_go_beside_a_sqlite_store_whose_folder_name_needs_quoting(tmp_path, monkeypatch):
    """The database's folder is percent-encoded in the sqlite URI; the artifacts go into that folder's
    mlruns/, not into a folder named after the encoded text under the current folder (#26 kind 5)."""
    from monai.utils import path_to_sqlite_uri

    folder = tmp_path / "r o?t%41é"
    folder.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "notes.txt").write_text("kept")
    uri = path_to_sqlite_uri(str(folder / "mlruns.db"))
    engine = Engine(lambda e, b: {"loss": 1.0})
    MLflowTracking(tracking_uri=uri, experiment_name="e", run_name="r", pending_path=folder / "j.jsonl",
                   output_transform=lambda out: out["loss"], tag_name="loss",
                   artifacts=[str(tmp_path / "notes.txt")]).attach(engine)  # fmt: skip
    engine.run([0], max_epochs=1)
    run, _ = _history(uri)
    logged = list((folder / "mlruns").rglob("notes.txt"))
    assert len(logged) == 1 and logged[0].read_text() == "kept" and run.info.run_id in str(logged[0])
    assert list((tmp_path / "cwd").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "notes.txt", "r o?t%41é"]


def test_monai_tracking_switch_gives_one_run_tagged_with_its_source_and_a_nested_evaluation(
    synthetic_root, tmp_path
):
    """``monai.bundle run ... --tracking mlflow`` as MONAI's users type it (#25 items 6, 7): one FINISHED
    training run, named after the supervision and the run folder, with the settings a user passed, the
    source tags, and the evaluation nested under it."""
    from helpers import ROOT, TRAINED, bundle, configs, mlflow_runs

    out = tmp_path / "kvasir_small"
    root = synthetic_root
    data = ["--dataset_dir", root, "--gaze_csv", root / "gaze.csv", "--val_fraction", "0.5"]
    common = ["--bundle_root", out, *data, *TRAINED, "--batch_size", 2, "--num_workers", 0,
              "--cache_workers", 1, "--tracking", "mlflow"]  # fmt: skip
    bundle("--config_file", configs("kvasir_gaze", "train.json"), *common, "--epochs", 2, "--limit", 6,
           "--train_fraction", 1.0)  # fmt: skip
    (train,) = mlflow_runs(out / "outputs" / "mlruns.db", "kvasir_gaze")
    assert train.info.status == "FINISHED" and train.info.run_name == "gaze_kvasir_small"
    assert {"train_loss", "val_mean_dice", "lr_group_0"} <= set(train.data.metrics)
    params = train.data.params
    assert [params[k] for k in ("limit", "train_fraction", "seed", "epochs")] == ["6", "1.0", "0", "2"]
    assert (params["image_size"], params["batch_size"], params["learning_rate"]) == ("[32, 32]", "2", "0.002")
    tags = train.data.tags
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    assert tags.get("mlflow.source.git.commit") == (git.stdout.strip() or None)  # None: not a checkout
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
    assert tags["mlflow.source.name"].endswith("bundles/kvasir_gaze/configs/train.json")
    record = json.loads((out / "models" / "mlflow_run.json").read_text())
    assert record["run_id"] == train.info.run_id

    evaluate = configs("kvasir_gaze", "train.json", "evaluate.json")
    bundle("--config_file", evaluate, *common, "--eval_split", "val")
    runs = {r.info.run_name: r for r in mlflow_runs(out / "outputs" / "mlruns.db", "kvasir_gaze")}
    assert sorted(runs) == ["evaluate_val_kvasir_small", "gaze_kvasir_small"]
    evaluation = runs["evaluate_val_kvasir_small"]
    assert evaluation.info.status == "FINISHED" and "eval_mean_dice" in evaluation.data.metrics
    assert evaluation.data.tags["mlflow.parentRunId"] == train.info.run_id  # nested under it in MLflow's UI
    assert evaluation.data.tags["gazemonai.trained_run_id"] == train.info.run_id
    assert evaluation.data.params["eval_split"] == "val"
    assert evaluation.data.params["checkpoint"] == str(out / "models" / "model.pt")


def _logged(uri, run_name="r"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run, _ = _history(uri, run_name)
    history = {k: client.get_metric_history(run.info.run_id, k) for k in run.data.metrics}
    return run, {k: sorted((m.step, m.value) for m in v) for k, v in history.items()}


def test_it_logs_what_monais_handler_logs_without_reaching_into_it(tmp_path):
    """The same metrics (names, steps, values) and parameters as MONAI's ``MLFlowHandler`` for one run,
    from a handler of its own: no subclass overriding MONAI's private methods (#25 item 10)."""
    import torch
    from monai.handlers import MLFlowHandler
    from monai.utils import path_to_sqlite_uri

    def run(handler_class, folder, **extra):
        engine = Engine(lambda e, b: {"loss": 0.5 * e.state.iteration})
        engine.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
        dice = lambda e: e.state.metrics.update(dice=e.state.epoch / 10)  # noqa: E731
        engine.add_event_handler(Events.EPOCH_COMPLETED, dice)
        uri = path_to_sqlite_uri(str(tmp_path / folder / "mlruns.db"))
        handler_class(tracking_uri=uri, experiment_name="e", run_name="r", tag_name="train_loss",
                      output_transform=lambda out: out["loss"], state_attributes=["iteration"],
                      experiment_param={"seed": 0, "size": [32, 32]}, close_on_complete=True,
                      **extra).attach(engine)  # fmt: skip
        engine.run([0, 0, 0], max_epochs=2)
        return _logged(uri)

    (tmp_path / "monai").mkdir()
    theirs, their_history = run(MLFlowHandler, "monai")
    ours, our_history = run(MLflowTracking, "ours", pending_path=tmp_path / "ours" / "j.jsonl")
    assert our_history == their_history
    assert set(our_history) == {"train_loss", "lr_group_0", "dice", "iteration"}
    assert ours.data.params == theirs.data.params == {
        "seed": "0", "size": "[32, 32]", "max_epochs": "2", "epoch_length": "3"
    }  # fmt: skip
    assert ours.info.status == theirs.info.status == "FINISHED"
    assert not issubclass(MLflowTracking, MLFlowHandler)
    assert not [name for name in vars(MLflowTracking) if name in vars(MLFlowHandler) and name.startswith("_")
                and not name.startswith("__")]  # fmt: skip


def test_an_offline_evaluation_keeps_its_tags_and_its_link_to_the_training(tmp_path):
    """Tags wait in the journal with the rest; the local store's run names the training it evaluates."""
    from mlflow.tracking import MlflowClient

    (tmp_path / "models").mkdir()
    record = {"tracking_uri": "sqlite:////elsewhere/mlruns.db", "experiment_name": "e", "run_name": "t",
              "run_id": "0123abcd", "config_dir": None, "settings": None}  # fmt: skip
    (tmp_path / "models" / "mlflow_run.json").write_text(json.dumps(record))
    engine = Engine(lambda e, b: {"loss": 1.0})
    MLflowTracking(tracking_uri=f"http://127.0.0.1:{free_port()}", experiment_name="e", run_name="r",
                   pending_path=tmp_path / "j.jsonl", output_transform=lambda out: out["loss"],
                   trained_run_record=tmp_path / "models" / "mlflow_run.json", log_config=True,
                   close_on_complete=True).attach(engine)  # fmt: skip
    engine.run([0], max_epochs=1)
    run, _ = _history(f"sqlite:///{tmp_path / 'mlruns.db'}", key="Loss")
    tags = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}").get_run(run.info.run_id).data.tags
    assert tags["gazemonai.trained_run_id"] == "0123abcd" and tags["mlflow.source.type"] == "LOCAL"
    assert "mlflow.parentRunId" not in tags  # the training is in another store: no nesting into nothing
