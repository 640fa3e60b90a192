"""What a bundle run was made of: its config files, the merged config and the values it resolved.

MONAI's ``MLFlowHandler`` logs whatever paths ``artifacts`` names, and a bundle config cannot name
the files it was read from (``python -m monai.bundle run --config_file "[...]"`` merges them and
applies ``--key value`` overrides before any of the config runs). :func:`write_run_config` finds
the running :class:`monai.bundle.ConfigWorkflow` and writes, into one folder:

* ``<name>.json`` for each config file the run was given, as it was on disk (``train.json``,
  ``paper_profile.json``, ...);
* ``executed_config.json``: the merged config with the overrides applied (what MONAI's
  ``--tracking mlflow`` option saves as ``save_execute_config``);
* ``resolved_settings.json``: the value each top-level setting resolved to (``image_size``,
  ``dataset_dir``, ``output_dir``, ``device``, ...), after ``$`` expressions and ``@`` references.

:class:`~gazemonai.train.tracking.MLflowTracking` logs that folder as the run's ``config``
artifacts when ``log_config=True``. Outside ``monai.bundle`` (a handler built in plain Python) there is
no workflow to read, and nothing is written.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["RunConfig", "find_run_config", "write_run_config"]

logger = logging.getLogger(__name__)

#: the workflow's steps: running them again would have side effects, and they are no settings
WORKFLOW_STEPS = ("imports", "initialize", "run", "finalize")


class RunConfig:
    """The config of the running bundle workflow.

    Args:
        parser: the workflow's ``ConfigParser`` (merged files, overrides applied, already parsed).
        files: the config files it was read from, in merge order (empty when unknown).
    """

    def __init__(self, parser, files: list[Path]) -> None:
        self.parser = parser
        self.files = files

    def executed(self) -> dict:
        """The merged config, overrides applied, before evaluation."""
        return self.parser.get()

    def resolved_settings(self) -> dict[str, Any]:
        """Each top-level setting's resolved value.

        Components, the workflow's steps and the items they run as steps (``"@determinism"``) are
        left out: resolving them again could build or run them. Values come from the parser's
        cache, so nothing the run built is built again.
        """
        config = self.parser.get()
        steps = {
            item[1:]
            for k in WORKFLOW_STEPS
            for item in (config.get(k) if isinstance(config.get(k), list) else [config.get(k)])
            if isinstance(item, str) and item.startswith("@")
        }  # items run as a step of their own (``"initialize": ["@determinism"]``)
        settings: dict[str, Any] = {}
        for key, raw in config.items():
            if key in WORKFLOW_STEPS or key in steps or not _is_setting(raw):
                continue
            try:
                value = self.parser.get_parsed_content(key, lazy=True)
            except Exception as e:  # a setting that does not resolve here is stated as such
                settings[key] = f"<not resolved: {type(e).__name__}>"
                continue
            value = _plain(value)
            if value is not _SKIP:
                settings[key] = value
        return settings


_SKIP = object()


def _is_setting(raw) -> bool:
    """A scalar, a ``$``/``@`` expression or a list of scalars (not a component or a list of them)."""
    if isinstance(raw, (list, tuple)):
        return all(not isinstance(v, (dict, list, tuple)) and not _is_expression(v) for v in raw)
    return not isinstance(raw, dict)


def _is_expression(value) -> bool:
    return isinstance(value, str) and value.startswith(("$", "@", "%"))


def _plain(value):
    """``value`` as JSON, or ``_SKIP`` for objects (networks, transforms) that are not settings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, os.PathLike) or type(value).__name__ == "device":
        return str(value)
    return _SKIP


def find_run_config() -> RunConfig | None:
    """The :class:`RunConfig` of the ``monai.bundle`` workflow this call runs inside, if any.

    Looks up the call stack for the ``ConfigWorkflow`` being run and, when started by
    ``monai.bundle run``, the ``config_file`` it was given.
    """
    from monai.bundle import ConfigWorkflow

    parser, files = None, None
    frame = inspect.currentframe()
    while frame is not None:
        local = frame.f_locals
        if parser is None and isinstance(local.get("self"), ConfigWorkflow):
            parser = local["self"].parser
        if (
            files is None
            and frame.f_code.co_name == "run"
            and frame.f_globals.get("__name__") == "monai.bundle.scripts"
        ):
            files = _config_files(local.get("config_file"), local.get("args_file"))
            workflow = local.get("workflow")
            if parser is None and isinstance(workflow, ConfigWorkflow):
                parser = workflow.parser
        frame = frame.f_back
    del frame
    if parser is None:
        return None
    return RunConfig(parser, files or [])


def _config_files(config_file, args_file) -> list[Path]:
    if config_file is None and args_file:
        try:
            from monai.bundle import ConfigParser

            config_file = ConfigParser.load_config_file(args_file).get("config_file")
        except Exception:
            config_file = None
    if config_file is None:
        return []
    if isinstance(config_file, (str, os.PathLike)):
        config_file = [config_file]
    return [Path(f) for f in config_file]


def write_run_config(folder: str | os.PathLike, run_config: RunConfig | None = None) -> list[Path]:
    """Write the running bundle's config files, merged config and resolved settings into ``folder``.

    Args:
        folder: where the files go (created; files of an earlier run there are replaced).
        run_config: what to write (default: :func:`find_run_config`).

    Returns:
        the files written; empty outside a ``monai.bundle`` workflow.
    """
    run_config = run_config or find_run_config()
    if run_config is None:
        logger.info("not run by monai.bundle: no config to record")
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    names: set[str] = set()
    for i, path in enumerate(run_config.files):
        if not path.is_file():
            logger.warning("config file %s is gone: not recorded", path)
            continue
        name = path.name if path.name not in names else f"{i}_{path.name}"
        names.add(name)
        target = folder / name
        target.write_bytes(path.read_bytes())
        written.append(target)
    for name, content in (
        ("executed_config.json", run_config.executed()),
        ("resolved_settings.json", run_config.resolved_settings()),
    ):
        target = folder / name
        target.write_text(json.dumps(content, indent=2, default=str))
        written.append(target)
    return written
