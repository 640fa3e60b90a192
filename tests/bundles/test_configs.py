"""What both bundles' configs share: valid metadata, and every name they refer to exists."""

import importlib
import json
import re
import subprocess
import sys

import pytest
from helpers import ROOT

CONFIGS = sorted((ROOT / "bundles").glob("*/configs/*.json"))


@pytest.mark.parametrize("name", ["kvasir_gaze", "prostate_gaze"])
def test_metadata_is_valid_against_shipped_schema(name):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            str(ROOT / "bundles" / name / "configs" / "metadata.json"),
            "--filepath",
            str(ROOT / "bundles" / "schema" / "meta_schema.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


def _strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from ((k, x) for x in [v] if isinstance(v, str))
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, str):
                yield (None, v)
            yield from _strings(v)


def _resolve(dotted: str):
    """The object a dotted name such as ``gazemonai.train.networks.MultiLevelNet`` names."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parts[-3]}/{p.name}")
def test_every_name_a_config_refers_to_exists(config):
    """Every ``_target_``, ``$import`` and ``gazemonai.…`` name in the configs resolves (moves stay wired)."""
    from monai.bundle.config_item import ComponentLocator

    locator = ComponentLocator()
    names = 0
    for key, value in _strings(json.loads(config.read_text())):
        if key == "_target_":
            names += 1
            if "." in value:
                assert callable(_resolve(value)), value
            else:
                assert locator.get_component_module_name(value), (
                    f"{config.name}: unknown MONAI component {value}"
                )
        elif value.startswith("$import "):
            importlib.import_module(value.split()[1])
        for dotted in re.findall(r"\bgazemonai(?:\.\w+)+", value if value.startswith("$") else ""):
            names += 1
            _resolve(dotted)
    assert names or config.name in (
        "metadata.json",
        "low_memory.json",
        "paper_profile.json",
        "inference_torchscript.json",
    )
