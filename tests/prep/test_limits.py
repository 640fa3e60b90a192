"""Size-like settings have an upper bound: one line naming the setting, the value and the bound.

The commands run as a user runs them, in a process whose memory is capped (``ulimit -v``) and with
a time limit, so that the old behaviour (growing until the kernel kills it, or looping for hours)
fails the test quickly instead of taking the machine down.
"""

import resource
import subprocess
import sys

import pytest
from helpers import ROOT

from gazemonai.errors import InvalidInputError

CAP = 3 << 30  # 3 GiB of address space: enough to import torch and MONAI, far from 40 GiB


def _capped():
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def _run(*args, seconds=120):
    """``python -m gazemonai ARGS`` under the memory cap; the test fails (not hangs) past ``seconds``."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "gazemonai", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            preexec_fn=_capped,
            timeout=seconds,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"gazemonai {' '.join(map(str, args[:1]))} still ran after {seconds} s")


def test_a_huge_sigma_is_refused_not_looped_on(synthetic_root, tmp_path):
    p = _run("pseudo-masks", "--data-root", synthetic_root, "--gaze-csv", synthetic_root / "gaze.csv",
             "--out", tmp_path / "out", "--sigma", "1e12", "--quiet", "--workers", "1")  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        "gazemonai: error: sigma must be <= 7680 (10 x the canvas's longer side, 768 pixels: "
        "a wider Gaussian is flat on it), got 1000000000000.0"
    )
    assert not (tmp_path / "out").exists()


def test_the_largest_sigma_still_makes_masks(synthetic_root, tmp_path):
    p = _run("pseudo-masks", "--data-root", synthetic_root, "--gaze-csv", synthetic_root / "gaze.csv",
             "--out", tmp_path / "out", "--sigma", "7680", "--no-crf", "--limit", "1", "--quiet",
             "--workers", "1")  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(list((tmp_path / "out" / "level_1").glob("*.png"))) == 1


def test_a_crop_size_no_memory_holds_is_refused_before_any_crop(synthetic_root, tmp_path):
    p = _run("derive-image-labels", "--dataset-dir", synthetic_root, "--out", tmp_path / "labels",
             "--size", 100000)  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("gazemonai: error: --size 100000 needs at least 37.3 GiB for one crop; "), last
    assert "free (the largest that fits: " in last, last
    assert not (tmp_path / "labels").exists()


def test_check_memory_names_the_setting_the_value_and_the_bound():
    from gazemonai.prep.limits import available_memory, check_memory, format_bytes

    check_memory("--size", 10, 400, "one crop", available=400)  # fits exactly
    with pytest.raises(InvalidInputError) as e:
        check_memory("--size", 11, 484, "one crop", largest=10, available=400)
    assert str(e.value) == (
        "--size 11 needs at least 484 B for one crop; this machine has 400 B free (the largest that fits: 10)"
    )
    assert format_bytes(3 * 2**30 + 2**29) == "3.5 GiB"
    assert 0 < available_memory()


def test_available_memory_keeps_within_ulimit():
    code = "from gazemonai.prep.limits import available_memory; print(available_memory())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=_capped, cwd=ROOT
    )
    assert int(out.stdout) <= CAP, out.stderr


def test_worker_counts_are_bounded_by_the_cpus():
    from gazemonai.prep.limits import check_workers, max_workers

    check_workers("num_workers", max_workers())
    with pytest.raises(InvalidInputError, match=f"num_workers must be <= {max_workers()} .*got 100000"):
        check_workers("num_workers", 100000)
