"""One line, exit 2, naming the user's file or option, where a traceback came (issue #26, kind 4)."""

import subprocess
import sys

import pytest
from helpers import ROOT, cli, free_port, wait_http


def _one_line(p, words):
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    assert p.returncode == 2 and last.startswith("gazemonai: error: ") and words in last, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return last


@pytest.fixture
def text_checkpoint(tmp_path):
    path = tmp_path / "run" / "models" / "model.pt"
    path.parent.mkdir(parents=True)
    path.write_text("this is a note, not weights\n")
    return path


@pytest.mark.parametrize(
    "command",
    [
        lambda c, t: ["export", "--bundle-dir", "bundles/kvasir_gaze", "--checkpoint", c, "--out", t / "x"],
        lambda c, t: [
            "register",
            "--bundle-dir",
            "bundles/kvasir_gaze",
            "--checkpoint",
            c,
            "--name",
            "m",
            "--tracking-uri",
            f"sqlite:///{t / 'r.db'}",
        ],  # fmt: skip
        lambda c, t: [
            "segment-volume",
            "--volume",
            c,
            "--bundle-dir",
            "bundles/prostate_gaze",
            "--checkpoint",
            c,
            "--out",
            t / "m.nii.gz",
        ],  # fmt: skip
    ],
    ids=["export", "register", "segment-volume"],
)
def test_a_text_file_as_checkpoint_is_named(text_checkpoint, tmp_path, command):
    p = cli(*command(text_checkpoint, tmp_path))
    last = _one_line(p, f"checkpoint {text_checkpoint} is not a torch checkpoint (a text file")
    assert "KeyError" not in p.stderr and "/tmp" not in last.replace(str(tmp_path), "")


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    """A real HTTP server on loopback that is not MLflow (Python's http.server)."""
    port = free_port()
    folder = tmp_path_factory.mktemp("www")
    (folder / "index.html").write_text("<p>hello</p>")
    command = [
        sys.executable,
        "-m",
        "http.server",
        str(port),
        "--bind",
        "127.0.0.1",
        "--directory",
        str(folder),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("store", ["web page", "text file", "unknown scheme"])
def test_a_tracking_uri_that_is_not_mlflow_is_one_line(web_server, text_checkpoint, tmp_path, store):
    stores = {
        "web page": web_server,
        "text file": f"sqlite:///{text_checkpoint}",
        "unknown scheme": "ftp://x",
    }
    uri = stores[store]
    (tmp_path / "images").mkdir()
    p = cli("predict", "--model", "models:/m@champion", "--images", tmp_path / "images",
            "--out", tmp_path / "o", "--tracking-uri", uri)  # fmt: skip
    _one_line(p, f"the tracking URI {uri} is not an MLflow tracking store: ")


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--preset", "liver"], "unknown preset 'liver'; choose one of kvasir, nci-isbi, prostate"),
        (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
        (["--samples", "0"], "--samples must be an integer >= 1, got 0"),
    ],
)
def test_report_refuses_bad_options_before_any_work(
    synthetic_root, kvasir_checkpoint, tmp_path, extra, words
):
    p = cli("report", "--dataset-dir", synthetic_root, "--gaze-csv", synthetic_root / "gaze.csv",
            "--bundle-dir", "bundles/kvasir_gaze", "--checkpoint", kvasir_checkpoint, "--out", tmp_path / "r",
            *extra)  # fmt: skip
    _one_line(p, words)
    assert not (tmp_path / "r").exists()


def test_an_input_error_wrapped_by_monai_is_still_one_line(monkeypatch, capsys):
    """MONAI wraps a transform's error (``raise RuntimeError(...) from e``), several deep."""
    from gazemonai import cli as cli_module
    from gazemonai.errors import ImageReadError

    def wrapped():
        try:
            try:
                raise ImageReadError("cannot read image /data/cut.jpg: image file is truncated")
            except ImageReadError as e:
                raise RuntimeError("applying transform LoadImaged") from e
        except RuntimeError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e

    def bug():
        try:
            raise ImageReadError("an image")
        except ImageReadError:
            raise RuntimeError("a bug while handling it") from None

    monkeypatch.setitem(cli_module.COMMANDS, "wrapped", wrapped)
    monkeypatch.setitem(cli_module.COMMANDS, "bug", bug)
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["wrapped"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "gazemonai: error: cannot read image /data/cut.jpg: image file is truncated"
    )
    with pytest.raises(RuntimeError, match="a bug while handling it"):  # not caused by the input: traceback
        cli_module.main(["bug"])


@pytest.mark.parametrize(
    "override, words",
    [
        (
            "{'image_size': [0, 64]}",
            "override image_size must be 2 integers >= 1 (height, width), got [0, 64]",
        ),
        ("{'image_size': 'big'}", "override image_size must be 2 integers"),
        ("{'num_levels': 0}", "override num_levels must be an integer >= 1, got 0"),
    ],
)
def test_register_refuses_an_override_that_predict_would(kvasir_checkpoint, tmp_path, override, words):
    """Accepted by register, the value used to fail only when the registered model served (#26 kind 5)."""
    store = f"sqlite:///{tmp_path / 'r.db'}"
    p = cli("register", "--bundle-dir", "bundles/kvasir_gaze", "--checkpoint", kvasir_checkpoint,
            "--name", "m", "--tracking-uri", store, "--override", override)  # fmt: skip
    _one_line(p, words)
    assert not (tmp_path / "r.db").exists()  # nothing logged


@pytest.mark.parametrize("flag", ["--out", "--images"])
def test_predict_refuses_a_hash_in_a_path_before_any_work(tmp_path, flag):
    """A '#' would reach MONAI's config parser, which turns it into '::' (#26 kind 5)."""
    images = tmp_path / ("ima#ges" if flag == "--images" else "images")
    images.mkdir()
    out = tmp_path / ("o#ut" if flag == "--out" else "out")
    p = cli("predict", "--model", "models:/m@champion", "--images", images, "--out", out,
            "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")  # fmt: skip
    last = _one_line(p, f"{flag} ")
    assert "'#'" in last and not out.exists() and not (tmp_path / "none.db").exists()


def test_a_path_for_a_bundle_config_is_made_absolute():
    """A leading '@', '$' or '%' is a reference, an expression or a macro to MONAI's parser: a relative
    path starting with one is handed over as an absolute path (data, never an expression)."""
    import os

    from gazemonai.train.settings import config_path

    for name in ("@out", "$out", "%out", "out dir é?%20"):
        assert config_path("--out", name) == os.path.join(os.getcwd(), name)


def test_a_raw_question_mark_in_a_sqlite_tracking_uri_is_refused(kvasir_checkpoint, tmp_path):
    """SQLAlchemy ends the database name at '?': the store would be tmp/t, the artifacts in tmp/t?r (#26)."""
    (tmp_path / "t?r").mkdir()
    p = cli("register", "--bundle-dir", ROOT / "bundles" / "kvasir_gaze", "--checkpoint", kvasir_checkpoint,
            "--name", "m", "--tracking-uri", f"sqlite:///{tmp_path / 't?r' / 'm.db'}")  # fmt: skip
    last = _one_line(p, "a '?' in a sqlite path ends the database's name")
    assert "t%3Fr/m.db" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t?r"] and not any((tmp_path / "t?r").iterdir())
