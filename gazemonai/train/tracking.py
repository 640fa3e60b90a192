"""MLflow tracking that an outage, a restart or a ``kill -9`` cannot spoil.

:class:`MLflowTracking` is MONAI's ``MLFlowHandler`` (same arguments, same metrics and parameters)
with three differences a long training run needs:

* **An unreachable tracking server does not stop training.** MLflow's HTTP client retries a failed
  request for minutes and then raises, which aborts the run. Here requests fail fast
  (:func:`fail_fast_http`), the first failure logs one warning, and from then on every record is
  appended to a journal file (JSON lines) instead. At the end of each epoch (at most once a
  minute) the journal is sent again; when the server answers it gets everything, in order. If it is
  still down when training ends, the records go to the local SQLite store next to the journal
  (``outputs/mlruns.db`` in the bundles) and the journal stays, for the next run of the same
  bundle to send.
* **A resumed run holds no step twice.** A run killed mid-epoch resumes from its last checkpoint
  and replays the interrupted epoch, whose first steps it had logged before the kill (MONAI picks
  the unfinished run of the same name up again). Steps the run already holds are not logged again;
  a resume is exact, so their values are the same.
* **What a killed run had not sent is not lost:** the journal is a file, read again at start.

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
from pathlib import Path
from typing import Any

from monai.handlers import MLFlowHandler
from monai.utils import flatten_dict, path_to_sqlite_uri

from gazemonai.train.provenance import write_run_config
from gazemonai.train.run_record import MODEL_SETTINGS, SPLIT_SETTINGS, check_trained_settings, inside

__all__ = [
    "MLflowTracking",
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


class MLflowTracking(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` that keeps training when the tracking server is down, and repeats no step.

    Args:
        pending_path: the journal of records not yet sent (JSON lines); default
            ``mlflow_pending.jsonl`` in the current folder. Handlers that log into the same run share it.
        fallback_uri: where the journal goes when training ends with the server still unreachable;
            default the SQLite store ``mlruns.db`` next to the journal.
        retry_seconds: while unreachable, try again at most this often (at epoch ends and at the end).
        fresh_run: for the trainer's handler: a training that starts from its first iteration (not a
            resume) marks an unfinished run of the same name as killed and logs into a new one,
            instead of continuing that run's history.
        log_config: log the config files this ``monai.bundle`` run was given, the merged config and
            the resolved settings as the run's ``config/`` artifacts, when the run starts
            (:mod:`gazemonai.train.provenance`; copies kept in ``config_<run name>/`` next to the
            journal).
        run_record: a JSON file to write the run's tracking URI, experiment, name and id to once it
            is known (``models/mlflow_run.json`` in the bundles: ``gazemonai register`` reads it to
            link a registered model to the run that trained it).
        other args: those of ``monai.handlers.MLFlowHandler``.
    """

    def __init__(
        self,
        *args,
        pending_path: str | os.PathLike = "mlflow_pending.jsonl",
        fallback_uri: str | None = None,
        retry_seconds: float = 60.0,
        fresh_run: bool = False,
        log_config: bool = False,
        run_record: str | os.PathLike | None = None,
        **kwargs,
    ) -> None:
        fail_fast_http()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or kwargs.get("tracking_uri") or ""
        check_sqlite_uri(uri)
        super().__init__(*args, **kwargs)
        if kwargs.get("artifact_location") is None:  # MONAI's default, without its double encoding
            self.artifact_location = sqlite_artifact_location(uri) or self.artifact_location
        self.pending_path = Path(pending_path)
        self.fallback_uri = fallback_uri or path_to_sqlite_uri(
            str(self.pending_path.resolve().parent / "mlruns.db")
        )
        self.retry_seconds = float(retry_seconds)
        self.fresh_run = bool(fresh_run)
        self.log_config = bool(log_config)
        self.run_record = Path(run_record) if run_record else None
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
        super().attach(engine)
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self.retry)

    def start(self, engine) -> None:
        if self.offline and not self._may_try():
            self._queue_start_params(engine)
            return
        try:
            if self.fresh_run and self.cur_run is None and engine.state.iteration == 0:
                self._kill_unfinished_runs()
            elif self.cur_run is None and self.run_name is not None:
                self.cur_run = self.client.get_run(
                    self._run_id(self.client, self.experiment_name, self.run_name)
                )
            super().start(engine)
        except Exception as e:
            if not is_outage(e):
                raise
            self._went_offline(e)
            self._queue_start_params(engine)
            self._record_config()
            return
        self._ask_history = bool(self.cur_run.data.metrics)  # a resumed run: it may hold steps already
        self._went_online()
        self._record_config()
        self._write_run_record(self._uri(), self.cur_run.info.run_id)

    @property
    def config_dir(self) -> Path:
        """Where ``log_config`` writes the run's config files (next to the journal)."""
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(self.run_name or "run"))
        return self.pending_path.resolve().parent / f"config_{name}"

    def _record_config(self) -> None:
        if not self.log_config or self._config_logged:
            return
        self._config_logged = True
        for path in write_run_config(self.config_dir):
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

    def _parse_artifacts(self):
        for path in self.artifacts:
            if path and not Path(path).exists():
                logger.warning("MLflow artifact %s does not exist: not logged", path)
        return super()._parse_artifacts()

    def _kill_unfinished_runs(self) -> None:
        """A training started from scratch: an unfinished run of its name was a killed attempt.

        It is marked KILLED and this training gets a run of its own (MONAI would pick any run that is
        not FINISHED up again, the killed one included).
        """
        if self.run_name is None:
            return
        self._set_experiment()
        for run in self.client.search_runs([self.experiment.experiment_id]):
            if run.info.run_name == self.run_name and run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")
                logger.info(
                    "MLflow run %s (%s) was left unfinished: marked KILLED", run.info.run_id, self.run_name
                )
        self.cur_run = self.client.create_run(
            experiment_id=self.experiment.experiment_id, run_name=self.run_name
        )

    def retry(self, engine=None) -> None:
        """While the server is unreachable, send the journal again (at most every ``retry_seconds``)."""
        if self.offline and self._may_try():
            self._flush()

    def complete(self) -> None:
        if self.offline:
            paths = self._parse_artifacts() if self.artifacts else []
            self.journal.add(self._record("artifact", path=str(p)) for p in paths)
            return
        try:
            super().complete()
        except Exception as e:
            if not is_outage(e):
                raise
            self._went_offline(e)

    def close(self) -> None:
        if self.offline:
            self.journal.last_try = 0.0  # the last chance: try now
            self._flush()
        if not self.offline:
            try:
                super().close()
                return
            except Exception as e:
                if not is_outage(e):
                    raise
                self._went_offline(e)
        self._fall_back()

    # -- what MONAI's handler logs comes through here -----------------------------------------

    def _log_params(self, params: dict[str, Any]) -> None:
        self._send_or_queue(self._record("params", params={k: str(v) for k, v in params.items()}))

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        step = int(step or 0)
        values = {}
        for key, value in flatten_dict(metrics).items():
            known = self._known_steps(key)
            if step in known:
                continue  # a resumed run replays the interrupted epoch: this step is there already
            known.add(step)
            values[key] = float(value)
        if values:
            self._send_or_queue(
                self._record("metrics", metrics=values, step=step, time=int(time.time() * 1000))
            )

    def _known_steps(self, key: str) -> set[int]:
        if key not in self._known:
            steps: set[int] = set()
            if self._ask_history and not self.offline and self.cur_run is not None:
                try:
                    steps = {m.step for m in self.client.get_metric_history(self.cur_run.info.run_id, key)}
                except Exception as e:
                    if not is_outage(e):
                        raise
                    self._went_offline(e)
            self._known[key] = steps
        return self._known[key]

    # -- sending, queueing, falling back ------------------------------------------------------

    def _record(self, op: str, **fields) -> dict:
        return {"op": op, "experiment": self.experiment_name, "run": self.run_name, **fields}

    def _queue_start_params(self, engine) -> None:
        params = dict(self.experiment_param or {})
        params.update({a: getattr(engine.state, a, None) for a in self.default_tracking_params})
        record = self._record("params", params={k: str(v) for k, v in params.items()})
        if record not in self.journal.records:  # the evaluator starts every epoch
            self.journal.add([record])

    def _send_or_queue(self, record: dict) -> None:
        if self.offline or self.cur_run is None:
            self.journal.add([record])
            return
        try:
            _apply(self.client, self.cur_run.info.run_id, record)
        except Exception as e:
            if not is_outage(e):
                raise
            self._went_offline(e)
            self.journal.add([record])

    def _run_id(self, client, experiment_name: str, run_name: str | None) -> str:
        """The newest unfinished (RUNNING) run of that name in that experiment, or a new one.

        MONAI's handler takes the oldest run that is not FINISHED, a KILLED or FAILED one included.
        """
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            experiment = client.get_experiment(
                client.create_experiment(experiment_name, artifact_location=self.artifact_location)
            )
        name = run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        runs = [
            r
            for r in client.search_runs([experiment.experiment_id])
            if r.info.run_name == name and r.info.status == "RUNNING"
        ]
        if runs:
            return max(runs, key=lambda r: r.info.start_time).info.run_id
        return client.create_run(experiment.experiment_id, run_name=name).info.run_id

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
            if self.cur_run is None:
                self.cur_run = self.client.get_run(
                    self._run_id(self.client, self.experiment_name, self.run_name)
                )
                self._write_run_record(self._uri(), self.cur_run.info.run_id)
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
                local.set_terminated(run_id, self.run_finish_status)
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
    if op not in ("params", "metrics", "artifact"):
        return f"unknown op {op!r}"
    if not isinstance(record.get("experiment"), str) or not isinstance(record.get("run"), (str, type(None))):
        return "experiment and run must be names"
    if "local" in record and not isinstance(record["local"], bool):
        return "local must be true or false"
    if op == "params":
        params = record.get("params")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            return "params must map names to strings"
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
