"""The chain over a data set folder: what a killed run leaves behind (no orphaned workers).

The rest of ``gazemonai.gaze.dataset`` (resume, manifest, counted skips, failures, the lock) is
tested through the command that runs it, in tests/test_cli.py.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

POOL = """
import sys, time
from concurrent.futures import ProcessPoolExecutor
from gazemonai.gaze.dataset import _init_worker
import os
with ProcessPoolExecutor(2, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
    futures = [pool.submit(time.sleep, 600) for _ in range(2)]  # workers busy for ten minutes
    time.sleep(1.0)
    print(" ".join(str(p) for p in pool._processes), flush=True)
    time.sleep(600)
"""


def _kill_and_wait(parent: subprocess.Popen, workers: list[int]) -> None:
    """``kill -9`` the run, then give its workers 10 s to go."""
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)


def _reap(workers: list[int]) -> None:
    for w in workers:
        try:
            os.kill(w, signal.SIGKILL)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_workers_end_when_their_parent_is_killed():
    """A worker busy with an image must not outlive a ``kill -9`` of the run that started it."""
    parent = subprocess.Popen([sys.executable, "-c", POOL], stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(w) for w in workers)
        _kill_and_wait(parent, workers)
        assert not any(_alive(w) for w in workers)
    finally:
        _reap(workers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_started_another_way_live_while_the_run_does_and_end_with_it(method):
    """With a forkserver or spawn, a worker's parent is not the run: it must still run, then end."""
    script = POOL.replace(
        "ProcessPoolExecutor(2,",
        f"ProcessPoolExecutor(2, mp_context=__import__('multiprocessing').get_context({method!r}),",
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        time.sleep(2.5)  # longer than the watch's period: the workers must not have left
        assert len(workers) == 2 and all(_alive(w) for w in workers)
        _kill_and_wait(parent, workers)
        assert not any(_alive(w) for w in workers)
    finally:
        _reap(workers)


def test_a_symlinked_records_file_is_refused_and_foreign_lines_are_redone(synthetic_root, tmp_path):
    """``records.jsonl`` is read back from the output folder: never appended through a link, and a line
    that is not a record does not stop the run (issue #26, kind 1)."""
    from gazemonai.errors import InvalidInputError
    from gazemonai.gaze.dataset import run_pseudo_masks

    target = tmp_path / "profile"
    target.write_text("# someone's file\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "records.jsonl").symlink_to(target)
    with pytest.raises(InvalidInputError, match="symlink"):
        run_pseudo_masks(synthetic_root, synthetic_root / "gaze.csv", out, limit=1, workers=1)
    assert target.read_text() == "# someone's file\n"
    (out / "records.jsonl").unlink()
    (out / "records.jsonl").write_text('[1, 2]\n{"no": "id"}\n')
    summary = run_pseudo_masks(synthetic_root, synthetic_root / "gaze.csv", out, limit=1, workers=1)
    assert summary["done"] == 1 and summary["failed"] == 0, summary
