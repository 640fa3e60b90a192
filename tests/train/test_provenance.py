"""Recording what a bundle run was made of, from a real ``monai.bundle run``."""

import json

from monai.bundle import run

from gazemonai.train.provenance import find_run_config, write_run_config


def _configs(tmp_path):
    base = {
        "imports": ["$from gazemonai.train.provenance import write_run_config"],
        "root": "/data",
        "out": "$@root + '/out'",
        "size": [64, 64],
        "scale": "$@size[0] * 2",
        "flag": False,
        "count": None,
        "net": {"_target_": "torch.nn.Identity"},
        "net_list": [{"_target_": "torch.nn.Identity"}],
        "side_effect": "$print('RAN SIDE EFFECT')",
        "initialize": ["@side_effect"],
        "run": ["$write_run_config(@record_dir)"],
    }
    overlay = {"size": [32, 48], "extra": "overlay"}
    a, b = tmp_path / "configs" / "base.json", tmp_path / "configs" / "overlay.json"
    a.parent.mkdir()
    a.write_text(json.dumps(base))
    b.write_text(json.dumps(overlay))
    return a, b


def test_a_bundle_run_records_its_files_merged_config_and_resolved_settings(tmp_path, capsys):
    a, b = _configs(tmp_path)
    record = tmp_path / "record"
    run(config_file=[str(a), str(b)], record_dir=str(record), root="/elsewhere")
    assert sorted(p.name for p in record.iterdir()) == [
        "base.json", "executed_config.json", "overlay.json", "resolved_settings.json",
    ]  # fmt: skip
    assert (record / "base.json").read_bytes() == a.read_bytes()
    executed = json.loads((record / "executed_config.json").read_text())
    assert executed["size"] == [32, 48] and executed["root"] == "/elsewhere"
    assert executed["extra"] == "overlay"
    resolved = json.loads((record / "resolved_settings.json").read_text())
    assert resolved == {
        "root": "/elsewhere", "out": "/elsewhere/out", "size": [32, 48], "scale": 64, "flag": False,
        "count": None, "extra": "overlay", "record_dir": str(record),
    }  # fmt: skip
    # the workflow's steps (and what they call) are not evaluated again
    assert capsys.readouterr().out.count("RAN SIDE EFFECT") == 1


def test_outside_a_bundle_workflow_nothing_is_written(tmp_path):
    assert find_run_config() is None
    assert write_run_config(tmp_path / "none") == []
    assert not (tmp_path / "none").exists()
