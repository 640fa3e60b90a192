"""Fixtures every test folder uses: a small synthetic data set with simulated gaze, bundle weights."""

from __future__ import annotations

import os

import pytest

# Triton decorates its own library (tl.zeros, ...) when it is first imported, reading TRITON_INTERPRET
# then: set before anything imports it (torch.optim imports torch._dynamo, which imports triton), so the
# fused propagation's kernels run under the interpreter in every test process (CPU-only machines)
os.environ.setdefault("TRITON_INTERPRET", "1")
from helpers import ROOT

#: the test files that take minutes, longest first. `make test` hands whole files to its workers in
#: collection order (`--dist loadfile --no-loadscope-reorder`); started last, the README file alone
#: kept one worker busy for minutes after the other had finished. `--durations` in CI's log says
#: what belongs here.
LONGEST_FIRST = (
    "tests/test_readme.py",
    "tests/apps/test_monailabel_loop.py",
    "tests/bundles/test_prompt.py",
    "tests/bundles/test_resume.py",
    "tests/bundles/test_hybrid.py",
    "tests/bundles/test_kvasir_gaze.py",
    "tests/apps/test_monailabel.py",
    "tests/bundles/test_prostate_gaze.py",
    "tests/serve/test_registry.py",
    "tests/train/test_tracking.py",
)


def pytest_collection_modifyitems(items):
    """Collect the longest files first (the others keep their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from gazemonai.gaze.simulate import GazeSimulator, simulate_gaze_folder
    from gazemonai.prep.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", n_images=6, size=(96, 128))
    simulate_gaze_folder(root / "masks", root / "gaze.csv", GazeSimulator(seed=1))
    return root


@pytest.fixture(scope="session")
def kvasir_checkpoint(tmp_path_factory):
    """kvasir_gaze weights (seeded, untrained) in the layout a training writes: models/model.pt."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "kvasir_gaze" / "configs" / "inference.json"))
    torch.manual_seed(3)
    net = parser.get_parsed_content("network_def")
    path = tmp_path_factory.mktemp("run") / "models" / "model.pt"
    path.parent.mkdir()
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def trained_kvasir(tmp_path_factory, synthetic_root):
    """A real (tiny) kvasir_gaze training: ``<root>/models/model.pt``, its run record and MLflow store.

    Trained at 32x32 with narrow widths, so whatever serves it must use the recorded settings.
    """
    from helpers import TRAINED, bundle

    root = tmp_path_factory.mktemp("trained") / "kvasir"
    bundle(
        "--config_file", ROOT / "bundles" / "kvasir_gaze" / "configs" / "train.json",
        "--bundle_root", root, "--dataset_dir", synthetic_root, "--gaze_csv", synthetic_root / "gaze.csv",
        "--val_fraction", "0.5", "--epochs", 2, *TRAINED,
        "--batch_size", 2, "--num_workers", 0, "--cache_workers", 1,
    )  # fmt: skip
    return root
