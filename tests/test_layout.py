"""The package's layers, as the folder tree shows them: every import points down, and none goes round.

    gazemonai.errors, gazemonai.metrics        foundations: import nothing of the package
    gazemonai.prep                             files in, arrays out
    gazemonai.gaze                             fixations -> pseudo-masks
    gazemonai.train                            multi-level training pieces
    gazemonai.record                           gaze recording (beside train: neither imports the other)
    gazemonai.serve                            staging, MLflow registry, export
    gazemonai.report                           pictures of a run
    gazemonai.cli, gazemonai.demo              entry points

Imports inside functions count too (an import hidden in a function to dodge a cycle is still one).
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "gazemonai"
LAYERS = {
    "gazemonai": 0,
    "gazemonai.errors": 0,
    "gazemonai.metrics": 0,
    "gazemonai.prep": 1,
    "gazemonai.gaze": 2,
    "gazemonai.train": 3,
    "gazemonai.record": 3,
    "gazemonai.serve": 4,
    "gazemonai.report": 5,
    "gazemonai.cli": 6,
    "gazemonai.demo": 6,
    "gazemonai.__main__": 7,
}


def _module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package_dir: Path, modules: set[str]) -> set[str]:
    """The gazemonai modules ``path`` imports, at module level or inside functions."""
    name = _module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t.startswith("gazemonai")}
    return found - {name}


def _layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def _graph(package_dir: Path = PACKAGE) -> dict[str, set[str]]:
    files = sorted(package_dir.rglob("*.py"))
    modules = {_module_name(p, package_dir) for p in files}
    return {_module_name(p, package_dir): _imports(p, package_dir, modules) for p in files}


def _upward(graph) -> list[str]:
    return [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in graph.items()
        for d in sorted(deps)
        if _layer(d) > _layer(m) and d != "gazemonai"
    ]


def _cycles(graph) -> list[str]:
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d) :] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_every_module_imports_only_below_or_beside_its_layer():
    graph = _graph()
    assert len(graph) > 30
    assert not _upward(graph), "\n".join(_upward(graph))
    assert not graph["gazemonai.errors"] and not graph["gazemonai.metrics"]  # the foundations


def test_record_and_train_serve_never_import_each_other():
    """gazemonai.record (gaze recording) sits beside train: it imports none of train/serve, nor they it."""
    graph = _graph()
    crossing = [
        f"{m} imports {d}"
        for m, deps in graph.items()
        for d in deps
        if (m.startswith("gazemonai.record") and d.startswith(("gazemonai.train", "gazemonai.serve")))
        or (m.startswith(("gazemonai.train", "gazemonai.serve")) and d.startswith("gazemonai.record"))
    ]
    assert any(m.startswith("gazemonai.record.") for m in graph)
    assert not crossing, "\n".join(crossing)


def test_no_import_cycles():
    assert not _cycles(_graph()), "\n".join(_cycles(_graph()))


def test_the_checks_find_an_upward_import_and_a_cycle(tmp_path):
    """A copy of the package with an upward import hidden in a function, and a cycle, fails both checks."""
    import shutil

    copy = tmp_path / "gazemonai"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "prep" / "probe.py").write_text("def f():\n    from ..train import engine\n")
    (copy / "gaze" / "a.py").write_text("from . import b\n")
    (copy / "gaze" / "b.py").write_text("from .a import x\n")
    graph = _graph(copy)
    assert "gazemonai.prep.probe (layer 1) imports gazemonai.train.engine (layer 3)" in _upward(graph)
    assert "gazemonai.gaze.a -> gazemonai.gaze.b -> gazemonai.gaze.a" in _cycles(graph)


def test_every_module_has_a_test_file():
    """tests/<sub-package>/test_<module>.py mirrors gazemonai/<sub-package>/<module>.py."""
    covered_elsewhere = {
        "gazemonai/__main__.py": "test_cli.py runs `python -m gazemonai`",
        "gazemonai/gaze/reference.py": "gaze/test_heatmap.py compares against it",
        "gazemonai/prep/synthetic.py": "conftest.py's data set; gaze/test_refine.py",
        "gazemonai/serve/model_code.py": "serve/test_registry.py loads every registered model through it",
    }
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" or rel in covered_elsewhere:
            continue
        parts = path.relative_to(PACKAGE).parts
        test = ROOT / "tests" / Path(*parts[:-1]) / f"test_{path.stem}.py"
        if not test.is_file():
            missing.append(f"{rel} -> {test.relative_to(ROOT)}")
    assert not missing, "\n".join(missing)
