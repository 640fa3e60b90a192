from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GAZEMONAI_SHARED_DATA", ROOT.parent / "shared" / "data"))
KVASIR = SHARED_DATA / "kvasir-seg"
GAZE = SHARED_DATA / "gazemedseg"
KVASIR_CSV = GAZE / "kvasir_fixation.csv"
NCI_CSV = GAZE / "nci-isbi_fixation.csv"


def free_port() -> int:
    """A free TCP port on loopback, for the servers the tests start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(path: Path):
    """Skip (with the reason) when a real-data path of ../shared/data is absent."""
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (tests read ../shared/data)")
    return path


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from gazemonai.gaze.simulate import GazeSimulator, simulate_gaze_folder
    from gazemonai.synthetic import make_synthetic_dataset

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
