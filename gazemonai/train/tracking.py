"""MLflow tracking that an outage, a restart or a ``kill -9`` cannot spoil.

:class:`MLflowTracking` logs what MONAI's ``MLFlowHandler`` logs (same arguments, same metric and
parameter names), as a handler of its own on MLflow's client and Ignite's events, with what a long
training run needs besides:

* **An unreachable tracking server does not stop training.** MLflow's HTTP client retries a failed
  request for minutes and then raises, which aborts the run. Here requests fail fast
  (:func:`fail_fast_http`), the first failure logs one warning, and from then on every record is
  appended to a journal file (JSON lines) instead. At the end of each epoch (at most once a
  minute) the journal is sent again; when the server answers it gets everything, in order. If it is
  still down when training ends, the records go to the local SQLite store next to the journal
  (``outputs/mlruns.db`` in the bundles) and the journal stays, for the next run of the same
  bundle to send.
* **A resumed run holds no step twice.** A run killed mid-epoch resumes from its last checkpoint
  and replays the interrupted epoch, whose first steps it had logged before the kill (the
  unfinished run of the same name is picked up again, :func:`bundle_run_name`). Steps the run
  already holds are not logged again; a resume is exact, so their values are the same.
* **What a killed run had not sent is not lost:** the journal is a file, read again at start.
* **A run says where it came from:** the config files, the merged config and the resolved settings
  as artifacts (``log_config``), MLflow's source, user and git tags (:func:`source_tags`), and for
  an evaluation the training run it evaluates (``trained_run_record``).
* **MONAI's ``--tracking mlflow`` adds no second run** (:func:`skip_monai_tracking`).

The handlers of one bundle (trainer, evaluator) that share a ``pending_path`` share one journal,
so their records stay in order and the trainer's end sends the evaluator's too. Outages are
connection errors, timeouts, HTTP 502/503/504 answers and a locked SQLite store; any other MLflow
error (a wrong URI, a deleted experiment) is raised as before.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.utils import ensure_tuple, flatten_dict, path_to_sqlite_uri

from gazemonai.train.provenance import find_run_config, write_run_config
from gazemonai.train.run_record import MODEL_SETTINGS, SPLIT_SETTINGS, check_trained_settings, inside

__all__ = [
    "MLflowTracking",
    "bundle_run_name",
    "skip_monai_tracking",
    "source_tags",
    "fail_fast_http",
    "is_outage",
    "FAIL_FAST",
    "sqlite_artifact_location",
    "check_sqlite_uri",
]

logger = logging.getLogger(__name__)

#: MLflow HTTP client settings for calls made during training (unless the environment sets them).
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def fail_fast_http() -> None:
    """Make MLflow's HTTP requests give up at once and after 10 s, unless the environment says otherwise.

    MLflow reads these variables at each request; its defaults (7 retries with exponential backoff,
    120 s timeouts) make a call to a dead server block for minutes.
    """
    for key, value in FAIL_FAST.items():
        os.environ.setdefault(key, value)


def is_outage(error: BaseException) -> bool:
    """Whether ``error`` (or anything in its cause chain) says the tracking store is unreachable."""
    import requests

    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        status = getattr(e, "get_http_status_code", None)
        if callable(status) and status() in (502, 503, 504):
            return True
        if type(e).__name__ == "OperationalError" and "database is locked" in str(e):  # SQLite store
            return True
        e = e.__cause__ or e.__context__
    return False


def check_sqlite_uri(tracking_uri: str) -> str:
    """Refuse a ``sqlite:///`` URI whose path holds a raw ``?``.

    SQLAlchemy ends the database path at ``?`` (the rest is its query string): ``sqlite:////data/a?b/m.db``
    is the database ``/data/a``, while MLflow's artifacts would go under ``/data/a?b``. Such characters
    must be percent-encoded (``%3F``; ``monai.utils.path_to_sqlite_uri`` does it).

    Raises:
        InvalidInputError: naming the URI and the encoded form to give instead.
    """
    from urllib.parse import quote

    from ..errors import InvalidInputError

    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///") :]
        if "?" in path:
            raise InvalidInputError(
                f"the tracking URI {tracking_uri}: a '?' in a sqlite path ends the database's name "
                f"(SQLAlchemy reads the rest as a query); percent-encode it: sqlite:///{quote(path)}"
            )
    return tracking_uri


def sqlite_artifact_location(tracking_uri: str) -> str | None:
    """``<database folder>/mlruns`` as a ``file://`` URI for a ``sqlite:///`` tracking URI, else ``None``.

    The database path in the URI is percent-encoded (``monai.utils.path_to_sqlite_uri``; SQLAlchemy
    decodes it): decoded here, so a folder with a space, ``?``, ``%`` or non-ASCII letters gets its
    artifacts beside the database. MONAI's ``MLFlowHandler`` took the encoded text as the folder's name
    and so wrote them into ``./r%20o/...`` under the current folder.
    """
    from urllib.parse import unquote

    from monai.utils import path_to_uri

    if not tracking_uri.startswith("sqlite:///"):
        return None
    return path_to_uri(Path(unquote(tracking_uri[len("sqlite:///") :])).parent / "mlruns")


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) < 160 else text[:157] + "..."


class _Journal:
    """The records of one tracking URI not sent yet, in order, mirrored in a JSON-lines file."""

    _open: dict[str, _Journal] = {}

    @classmethod
    def at(cls, path: Path) -> _Journal:
        key = str(path.resolve())
        if key not in cls._open:
            cls._open[key] = cls(path)
        return cls._open[key]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict] = []
        self.offline_since: float | None = None
        self.last_try = 0.0
        self.warned = False
        if path.is_symlink():  # appending would write wherever it points
            from gazemonai.errors import InvalidInputError

            raise InvalidInputError(f"MLflow journal {path} is a symlink (to {path.resolve()}): refused")
        if path.is_file():
            rejected = []
            with open(path) as f:
                for number, line in enumerate(f, 1):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # the last line of a killed run may be cut short
                        logger.warning("%s: skipped a cut-off line", path)
                        continue
                    problem = _record_problem(record, path.parent)
                    if problem:
                        logger.warning(
                            "%s line %d: %s: not sent, kept in %s.rejected", path, number, problem, path
                        )
                        rejected.append(line if line.endswith("\n") else line + "\n")
                    else:
                        self.records.append(record)
            if rejected:
                with open(path.with_name(path.name + ".rejected"), "a") as f:
                    f.writelines(rejected)
                logger.warning("%s: %d records refused", path, len(rejected))
            if self.records:
                logger.info(
                    "%d MLflow records an earlier run left in %s will be sent", len(self.records), path
                )

    def add(self, records) -> None:
        records = list(records)
        if not records:
            return
        self.records.extend(records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # written at once: a kill -9 loses nothing that was queued
            for record in records:
                f.write(json.dumps(record) + "\n")

    def clear(self) -> None:
        self.records = []
        self.path.unlink(missing_ok=True)

    def rewrite(self) -> None:
        """Write the records back (after marking them), atomically."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.path)


def skip_monai_tracking(tracking_uri: str, experiment_name: str, run_name: str | None) -> bool:
    """``True``, once a bundle run with MONAI's ``--tracking mlflow`` asks whether to add its own handlers.

    MONAI's switch adds an ``MLFlowHandler`` per engine, disabled by the config's ``is_not_rank0``;
    the bundles set ``is_not_rank0`` to this call, because their :class:`MLflowTracking` already
    records the run (two handlers wrote two runs of one name, and the second marked the first
    KILLED). The switch's other parts stay: the bundle's ``tracking_uri``, ``experiment_name`` and
    ``run_name`` (which ``--tracking`` would otherwise default) and the executed config it saves.
    """
    logger.info(
        "--tracking mlflow: the bundle records this run itself (MLflowTracking) in %s, experiment %s, "
        "run %s; MONAI's MLFlowHandler is not added, so there is one run",
        tracking_uri,
        experiment_name,
        run_name,
    )
    return True


def bundle_run_name(supervision: str, bundle_root: str | os.PathLike) -> str:
    """The training run's name: the supervision and the name of the folder the run writes into.

    ``gaze`` into ``runs/kvasir_paper`` is ``gaze_kvasir_paper``. The name carries no time: a killed
    training resumed in its folder continues its run, found by this name (MLflow shows each run's
    start; a fresh training in the same folder gets a new run of the same name).
    """
    return f"{supervision}_{Path(os.path.abspath(bundle_root)).name}"


def source_tags(config_files: list[Path] | None = None) -> dict[str, str]:
    """MLflow's ``mlflow.source.*`` and ``mlflow.user`` tags for a run started from ``config_files``.

    ``mlflow.source.name`` is the config files (``sys.argv[0]`` when there are none, as MLflow's own
    runs have it); the git commit, branch and remote are those of the checkout the first config file
    lies in, else of the one the ``gazemonai`` package lies in; none where neither is in git.
    """
    import getpass
    import sys

    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    files = [Path(f).resolve() for f in config_files or []]
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": ", ".join(map(str, files)) or os.path.abspath(sys.argv[0] or "python"),
    }
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        pass
    for folder in [*(f.parent for f in files[:1]), Path(__file__).resolve().parent]:
        commit = get_git_commit(str(folder))
        if commit:
            tags["mlflow.source.git.commit"] = commit
            for key, value in (
                ("branch", get_git_branch(str(folder))),
                ("repoURL", get_git_repo_url(str(folder))),
            ):
                if value:
                    tags[f"mlflow.source.git.{key}"] = value
            break
    return tags


class MLflowTracking:
    """Log an Ignite engine's run to MLflow, through tracking-server outages, restarts and resumes.

    What it logs and how it keeps it through an outage: see :mod:`gazemonai.train.tracking`.

    Args:
        tracking_uri: the MLflow store (``MLFLOW_TRACKING_URI`` wins when set, as in MONAI); default
            ``mlruns.db`` in the current folder.
        experiment_name: the experiment, created when missing.
        run_name: the run; the newest unfinished run of this name is continued, else a new one made.
        iteration_log: log ``output_transform(engine.state.output)`` (as ``tag_name`` when not a dict)
            and the optimizer's ``optimizer_param_names`` (``lr_group_0``) every iteration; a callable
            ``(engine, event) -> bool`` filters iterations.
        epoch_log: log ``engine.state.metrics`` and ``state_attributes`` at each epoch's end (same filter).
        output_transform, tag_name, state_attributes, optimizer_param_names: as above.
        experiment_param: parameters logged at start, with the engine's ``max_epochs`` and ``epoch_length``.
        artifacts: files or folders logged when the engine completes.
        close_on_complete: end the run (FINISHED) when the engine completes.
        artifact_location: the new experiment's artifact location; default ``mlruns/`` beside a SQLite store.
        pending_path: the journal (JSON lines); default ``mlflow_pending.jsonl`` in the current folder.
        fallback_uri: where the journal goes when training ends offline; default ``mlruns.db`` beside it.
        retry_seconds: while unreachable, try again at most this often (at epoch ends and at the end).
        fresh_run: a training that starts from its first iteration (not a resume) marks an unfinished
            run of the same name KILLED and logs into a new one.
        log_config: for the handler that owns the run: log the config files of this ``monai.bundle``
            run, the merged config and the resolved settings as the run's ``config/`` artifacts
            (:mod:`gazemonai.train.provenance`; copies kept in ``config_<run name>/`` beside the
            journal), and the run's :func:`source_tags`.
        run_record: a JSON file to write the run's tracking URI, experiment, name, id and model
            settings to (``models/mlflow_run.json``: ``register``, ``inference.json`` read it).
        trained_run_record: an evaluation's link to the training it evaluates: that training's
            ``run_record``. Its run id is tagged ``gazemonai.trained_run_id``, and when it is in the same
            store and experiment this run is nested under it (``mlflow.parentRunId``).
    """

    default_tracking_params = ("max_epochs", "epoch_length")

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "monai_experiment",
        run_name: str | None = None,
        iteration_log: bool | Callable = True,
        epoch_log: bool | Callable = True,
        output_transform: Callable = lambda x: x[0],
        tag_name: str = "Loss",
        state_attributes: Sequence[str] | None = None,
        optimizer_param_names: str | Sequence[str] = "lr",
        experiment_param: dict | None = None,
        artifacts: str | Sequence[str] | None = None,
        close_on_complete: bool = False,
        artifact_location: str | None = None,
        pending_path: str | os.PathLike = "mlflow_pending.jsonl",
        fallback_uri: str | None = None,
        retry_seconds: float = 60.0,
        fresh_run: bool = False,
        log_config: bool = False,
        run_record: str | os.PathLike | None = None,
        trained_run_record: str | os.PathLike | None = None,
    ) -> None:
        import mlflow

        fail_fast_http()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri
        uri = uri or path_to_sqlite_uri(os.path.join(os.getcwd(), "mlruns.db"))
        if uri.startswith("file:") or "://" not in uri:
            raise ValueError(
                f"MLflow has no file store any more: tracking_uri {uri!r}; use sqlite:///<path>.db"
            )
        self.client = mlflow.MlflowClient(tracking_uri=check_sqlite_uri(uri))
        self.experiment_name = experiment_name
        self.run_name = run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        self.iteration_log, self.epoch_log = iteration_log, epoch_log
        self.output_transform, self.tag_name = output_transform, tag_name
        self.state_attributes = tuple(state_attributes or ())
        self.optimizer_param_names = ensure_tuple(optimizer_param_names)
        self.experiment_param = dict(experiment_param or {})
        self.artifacts = [a for a in ensure_tuple(artifacts) if a]
        self.close_on_complete = bool(close_on_complete)
        self.artifact_location = artifact_location or sqlite_artifact_location(uri)
        self.pending_path = Path(pending_path)
        self.fallback_uri = fallback_uri or path_to_sqlite_uri(
            str(self.pending_path.resolve().parent / "mlruns.db")
        )
        self.retry_seconds = float(retry_seconds)
        self.fresh_run = bool(fresh_run)
        self.log_config = bool(log_config)
        self.run_record = Path(run_record) if run_record else None
        self.trained_run_record = Path(trained_run_record) if trained_run_record else None
        self.run_id: str | None = None
        self._started = False
        self._config_files: list[Path] = []
        self._config_logged = False
        self._journal: _Journal | None = None
        self._known: dict[str, set[int]] = {}  # steps the run holds, per metric (asked lazily)
        self._ask_history = False

    @property
    def journal(self) -> _Journal:
        if self._journal is None:
            self._journal = _Journal.at(self.pending_path)
        return self._journal

    @property
    def offline(self) -> bool:
        return self.journal.offline_since is not None

    # -- events -------------------------------------------------------------------------------

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.start)
        for log, event, handler in (
            (self.iteration_log, Events.ITERATION_COMPLETED, self.iteration_completed),
            (self.epoch_log, Events.EPOCH_COMPLETED, self.epoch_completed),
        ):
            if log:
                engine.add_event_handler(event(event_filter=log) if callable(log) else event, handler)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.retry)
        engine.add_event_handler(Events.COMPLETED, self.complete)
        if self.close_on_complete:
            engine.add_event_handler(Events.COMPLETED, self.close)

    def start(self, engine) -> None:
        """Open the run (an evaluator starts every epoch: once) and log its parameters and tags."""
        first, self._started = not self._started, True
        if self.run_id is None and not (self.offline and not self._may_try()):
            try:
                fresh = self.fresh_run and engine.state.iteration == 0
                self.run_id = self._run_id(self.client, self.experiment_name, self.run_name, fresh)
                self._ask_history = bool(self.client.get_run(self.run_id).data.metrics)  # a resumed run
            except Exception as e:
                if not is_outage(e):
                    raise
                self._went_offline(e)
            else:
                self._went_online()
        if not first:
            return
        if self.log_config:  # the handler that owns the run (not the validator's joining it)
            self._record_config()
        params = {
            **self.experiment_param,
            **{a: getattr(engine.state, a, None) for a in self.default_tracking_params},
        }
        self._send_or_queue(self._record("params", params={k: str(v) for k, v in params.items()}))
        if self.log_config:
            self._send_or_queue(self._record("tags", tags=self._tags()))
        if self.run_id is not None and not self.offline:
            self._write_run_record(self._uri(), self.run_id)

    def iteration_completed(self, engine) -> None:
        output = self.output_transform(engine.state.output)
        if output is None:
            return
        metrics = dict(output) if isinstance(output, dict) else {self.tag_name: output}
        optimizer = getattr(engine, "optimizer", None)
        for name in self.optimizer_param_names if optimizer is not None else ():
            metrics.update(
                {f"{name}_group_{i}": group[name] for i, group in enumerate(optimizer.param_groups)}
            )
        self._send_metrics(metrics, engine.state.iteration)

    def epoch_completed(self, engine) -> None:
        metrics = dict(engine.state.metrics or {})
        metrics.update({a: getattr(engine.state, a, None) for a in self.state_attributes})
        if metrics:
            self._send_metrics(metrics, engine.state.epoch)

    def retry(self, engine=None) -> None:
        """While the server is unreachable, send the journal again (at most every ``retry_seconds``)."""
        if self.offline and self._may_try():
            self._flush()

    def complete(self, engine=None) -> None:
        """Log the ``artifacts`` (files, and the files under folders)."""
        for path in self.artifacts:
            path = Path(path)
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            if not files:
                logger.warning("MLflow artifact %s does not exist: not logged", path)
            for file in files:
                self._send_or_queue(self._record("artifact", path=str(file)))

    def close(self, engine=None) -> None:
        """End the run FINISHED; offline, the journal goes to the local store (:attr:`fallback_uri`)."""
        if self.offline:
            self.journal.last_try = 0.0  # the last chance: try now
            self._flush()
        if not self.offline:
            try:
                if self.run_id is not None:
                    self.client.set_terminated(self.run_id, "FINISHED")
                    self.run_id = None
                return
            except Exception as e:
                if not is_outage(e):
                    raise
                self._went_offline(e)
        self._fall_back()

    # -- what this run is ---------------------------------------------------------------------

    def _experiment_id(self, client, name: str) -> str:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name, artifact_location=self.artifact_location)
            except Exception as e:  # another process made it meanwhile
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise e
        if experiment.lifecycle_stage != "active":
            raise ValueError(f"MLflow experiment {name!r} is deleted: restore it or name another")
        return experiment.experiment_id

    def _run_id(self, client, experiment_name: str, run_name: str, fresh: bool = False) -> str:
        """The newest unfinished (RUNNING) run of that name in that experiment, or a new one; ``fresh``: a
        new one, the unfinished ones (a killed attempt's) marked KILLED."""
        experiment_id = self._experiment_id(client, experiment_name)
        runs = [
            r
            for r in client.search_runs([experiment_id])
            if r.info.run_name == run_name and r.info.status == "RUNNING"
        ]
        if runs and not fresh:
            return max(runs, key=lambda r: r.info.start_time).info.run_id
        for run in runs:
            client.set_terminated(run.info.run_id, "KILLED")
            logger.info("MLflow run %s (%s) was left unfinished: marked KILLED", run.info.run_id, run_name)
        return client.create_run(experiment_id, run_name=run_name).info.run_id

    def _tags(self) -> dict[str, str]:
        tags = source_tags(self._config_files)
        if self.trained_run_record is not None:
            from gazemonai.train.run_record import read_run_record

            trained = read_run_record(self.trained_run_record)  # checked data, nothing run
            if trained is None:
                logger.warning(
                    "no run record %s: this evaluation is not linked to a training run",
                    self.trained_run_record,
                )
            else:
                tags["gazemonai.trained_run_id"] = trained["run_id"]
                if (trained["tracking_uri"], trained["experiment_name"]) == (
                    self._uri(),
                    self.experiment_name,
                ):
                    tags["mlflow.parentRunId"] = trained["run_id"]
        return tags

    @property
    def config_dir(self) -> Path:
        """Where ``log_config`` writes the run's config files (next to the journal)."""
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.run_name)
        return self.pending_path.resolve().parent / f"config_{name}"

    def _record_config(self) -> None:
        run_config = find_run_config()
        self._config_files = list(run_config.files) if run_config else []
        written = write_run_config(self.config_dir, run_config)
        self._config_logged = bool(written)
        for path in written:
            self._send_or_queue(self._record("artifact", path=str(path), artifact_path="config"))

    def _write_run_record(self, uri: str, run_id: str) -> None:
        if self.run_record is None:
            return
        record = {
            "tracking_uri": uri,
            "experiment_name": self.experiment_name,
            "run_name": self.run_name,
            "run_id": run_id,
            "config_dir": str(self.config_dir) if self._config_logged else None,
            "settings": self._model_settings(),
        }
        self.run_record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.run_record.with_name(self.run_record.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, self.run_record)

    def _model_settings(self) -> dict | None:
        """The model and split settings this run resolved (what inference needs), checked; ``None`` if
        the run's config was not recorded."""
        path = self.config_dir / "resolved_settings.json"
        if not self._config_logged or not path.is_file():
            return None
        resolved = json.loads(path.read_text(encoding="utf-8"))
        wanted = {k: resolved[k] for k in (*MODEL_SETTINGS, *SPLIT_SETTINGS) if k in resolved}
        try:
            return check_trained_settings(wanted, str(path))
        except ValueError as e:  # not a reason to stop a training: serving will ask for the settings
            logger.warning("model settings not recorded in %s: %s", self.run_record, e)
            return None

    # -- logging, queueing, falling back ------------------------------------------------------

    def _send_metrics(self, metrics: dict[str, Any], step: int) -> None:
        values = {}
        for key, value in flatten_dict(metrics).items():
            known = self._known_steps(key)
            if step in known:
                continue  # a resumed run replays the interrupted epoch: this step is there already
            known.add(step)
            values[key] = float(value)
        if values:
            self._send_or_queue(
                self._record("metrics", metrics=values, step=int(step), time=int(time.time() * 1000))
            )

    def _known_steps(self, key: str) -> set[int]:
        if key not in self._known:
            steps: set[int] = set()
            if self._ask_history and not self.offline and self.run_id is not None:
                try:
                    steps = {m.step for m in self.client.get_metric_history(self.run_id, key)}
                except Exception as e:
                    if not is_outage(e):
                        raise
                    self._went_offline(e)
            self._known[key] = steps
        return self._known[key]

    def _record(self, op: str, **fields) -> dict:
        return {"op": op, "experiment": self.experiment_name, "run": self.run_name, **fields}

    def _send_or_queue(self, record: dict) -> None:
        if self.offline or self.run_id is None:
            self.journal.add([record])
            return
        try:
            _apply(self.client, self.run_id, record)
        except Exception as e:
            if not is_outage(e):
                raise
            self._went_offline(e)
            self.journal.add([record])

    def _replay(self, client, records=None) -> dict[tuple, str]:
        """Send ``records`` (default: the journal) in order, each to its run; returns the runs written to
        (``(experiment, run name) -> run id``)."""
        runs: dict[tuple, str] = {}
        history: dict[tuple, set[int]] = {}
        for record in self.journal.records if records is None else records:
            target = (record["experiment"], record["run"])
            if target not in runs:
                runs[target] = self._run_id(client, *target)
            run_id = runs[target]
            if record["op"] == "metrics":  # a resumed run may hold some of these steps already
                fresh = {}
                for key, value in record["metrics"].items():
                    if (run_id, key) not in history:
                        history[run_id, key] = {m.step for m in client.get_metric_history(run_id, key)}
                    if record["step"] not in history[run_id, key]:
                        fresh[key] = value
                        history[run_id, key].add(record["step"])
                record = {**record, "metrics": fresh}
            _apply(client, run_id, record)
        return runs

    def _flush(self) -> None:
        self.journal.last_try = time.monotonic()
        try:
            self._replay(self.client)
            if self.run_id is None:
                self.run_id = self._run_id(self.client, self.experiment_name, self.run_name)
                self._write_run_record(self._uri(), self.run_id)
        except Exception as e:
            if not is_outage(e):
                raise
            logger.info(
                "MLflow at %s still unreachable; %d records wait", self._uri(), len(self.journal.records)
            )
            return
        logger.warning(
            "MLflow at %s answers again: %d waiting records sent", self._uri(), len(self.journal.records)
        )
        self.journal.clear()
        self.journal.offline_since = None
        self._ask_history, self._known = True, {}  # the run holds those steps now

    def _fall_back(self) -> None:
        if not self.journal.records:
            return
        import mlflow

        n, uri = len([r for r in self.journal.records if not r.get("local")]), self._uri()
        if self.fallback_uri == uri:
            logger.warning("MLflow store %s unreachable: %d records kept in %s", uri, n, self.journal.path)
            return
        fresh = [r for r in self.journal.records if not r.get("local")]  # earlier runs' are there already
        try:
            local = mlflow.MlflowClient(tracking_uri=self.fallback_uri)
            runs = self._replay(local, fresh)
            for run_id in runs.values():
                local.set_terminated(run_id, "FINISHED")
            if (self.experiment_name, self.run_name) in runs:
                self._write_run_record(self.fallback_uri, runs[self.experiment_name, self.run_name])
        except Exception as e:  # the last resort failed too: the journal keeps everything
            logger.warning(
                "could not write to the local MLflow store %s either (%s); %d records kept in %s",
                self.fallback_uri,
                _short(e),
                n,
                self.journal.path,
            )
            return
        for record in fresh:
            record["local"] = True  # kept for the server, not to be written locally again
        self.journal.rewrite()
        logger.warning(
            "MLflow at %s stayed unreachable: the run's %d records are in the local store %s "
            "(mlflow ui --backend-store-uri %s) and in %s, which the next run of this bundle sends to %s",
            uri,
            n,
            self.fallback_uri,
            self.fallback_uri,
            self.journal.path,
            uri,
        )

    def _went_online(self) -> None:
        if self.journal.records:
            self._flush()
        else:
            self.journal.offline_since = None

    def _went_offline(self, error: BaseException) -> None:
        journal = self.journal
        journal.last_try = time.monotonic()  # the next try waits retry_seconds, whoever made this one
        if journal.offline_since is None:
            journal.offline_since = time.time()
        if not journal.warned:
            journal.warned = True
            logger.warning(
                "MLflow tracking at %s is unreachable (%s): training goes on; metrics and parameters "
                "are kept in %s and sent when it answers again (tried at epoch ends)",
                self._uri(),
                _short(error),
                journal.path,
            )

    def _uri(self) -> str:
        return str(getattr(self.client, "tracking_uri", "") or os.environ.get("MLFLOW_TRACKING_URI", ""))

    def _may_try(self) -> bool:
        return time.monotonic() - self.journal.last_try >= self.retry_seconds


def _record_problem(record, folder: Path) -> str | None:
    """What is wrong with a journal record read back from ``folder`` (``None``: nothing).

    The journal is a file in the run's output folder, which may have been handed over with it: a
    record is sent only if it is one this handler writes, and an artifact only from ``folder``.
    """
    from numbers import Integral, Real

    if not isinstance(record, dict):
        return "not a JSON object"
    op = record.get("op")
    if op not in ("params", "tags", "metrics", "artifact"):
        return f"unknown op {op!r}"
    if not isinstance(record.get("experiment"), str) or not isinstance(record.get("run"), (str, type(None))):
        return "experiment and run must be names"
    if "local" in record and not isinstance(record["local"], bool):
        return "local must be true or false"
    if op in ("params", "tags"):
        values = record.get(op)
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            return f"{op} must map names to strings"
    elif op == "metrics":
        metrics = record.get("metrics")
        if not isinstance(metrics, dict) or not all(
            isinstance(v, Real) and not isinstance(v, bool) for v in metrics.values()
        ):
            return "metrics must map names to numbers"
        for key in ("step", "time"):
            value = record.get(key)
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 0:
                return f"{key} must be an integer >= 0"
    else:
        path, artifact_path = record.get("path"), record.get("artifact_path")
        if not isinstance(path, str) or not path:
            return "artifact path must be a file name"
        if not inside(path, folder):
            return f"artifact {path} is outside the run's folder {folder}"
        if artifact_path is not None and (
            not isinstance(artifact_path, str)
            or artifact_path.startswith("/")
            or ".." in artifact_path.split("/")
        ):
            return f"artifact_path {artifact_path!r} must be a relative folder name"
    return None


def _apply(client, run_id: str, record: dict) -> None:
    """One journal record, written to ``run_id``."""
    import mlflow

    op = record["op"]
    if op == "params":
        logged = client.get_run(run_id).data.params  # MLflow refuses to log a parameter twice
        params = [mlflow.entities.Param(k, v) for k, v in record["params"].items() if k not in logged]
        if params:
            client.log_batch(run_id=run_id, metrics=[], params=params, tags=[])
    elif op == "tags" and record["tags"]:
        tags = [mlflow.entities.RunTag(k, v) for k, v in record["tags"].items()]
        client.log_batch(run_id=run_id, metrics=[], params=[], tags=tags)
    elif op == "metrics" and record["metrics"]:
        metrics = [
            mlflow.entities.Metric(k, v, record["time"], record["step"]) for k, v in record["metrics"].items()
        ]
        client.log_batch(run_id=run_id, metrics=metrics, params=[], tags=[])
    elif op == "artifact":
        if Path(record["path"]).is_file():
            client.log_artifact(run_id, record["path"], record.get("artifact_path"))
        else:
            logger.warning("MLflow artifact %s is gone: not logged", record["path"])
