"""Import directions (DEVELOPERS.md, style.md §6.2), checked on the source's AST."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fer_bench"
BASE = {
    "fer_bench",
    "fer_bench.errors",
    "fer_bench.registry",
    "fer_bench._io",
    "fer_bench.options",
    "fer_bench.provenance",
    "fer_bench.shipped",
}

# layer -> fer_bench sub-packages it must never import
FORBIDDEN = {
    "base": {
        "fer_bench.faces",
        "fer_bench.data",
        "fer_bench.models",
        "fer_bench.train",
        "fer_bench.eval",
        "fer_bench.cli",
    },
    "faces": {"fer_bench.data", "fer_bench.models", "fer_bench.train", "fer_bench.eval", "fer_bench.cli"},
    "data": {"fer_bench.models", "fer_bench.train", "fer_bench.eval", "fer_bench.cli"},
    "models": {"fer_bench.faces", "fer_bench.data", "fer_bench.train", "fer_bench.eval", "fer_bench.cli"},
    "eval": {"fer_bench.train", "fer_bench.cli"},
    "train": {"fer_bench.cli"},
    "cli": set(),
}
PURE_METRICS = {
    "eval/metrics.py",
    "eval/bootstrap.py",
    "eval/fairness.py",
    "eval/fairness_inference.py",
    "eval/significance.py",
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) == 1:
        return "cli" if rel.name in ("cli.py", "__main__.py") else "base"
    return rel.parts[0]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layers_import_only_downwards():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        layer = _layer(path)
        for name in _imports(path):
            for banned in FORBIDDEN[layer]:
                if name == banned or name.startswith(banned + "."):
                    problems.append(f"{path.relative_to(PACKAGE)} ({layer}) imports {name}")
    assert not problems, "\n".join(problems)


def test_nothing_imports_the_cli():
    offenders = [
        p for p in PACKAGE.rglob("*.py") if p.name not in ("cli.py", "__main__.py") and "fer_bench.cli" in _imports(p)
    ]
    assert not offenders


def test_metrics_are_pure_numpy():
    for rel in PURE_METRICS:
        imports = _imports(PACKAGE / rel)
        assert imports <= {
            "__future__",
            "numpy",
            "scipy.stats",
            "collections.abc",
            "fer_bench.eval.metrics",
            "fer_bench.eval.bootstrap",
            "fer_bench.eval.fairness",
        }, imports


def test_untrusted_input_is_never_code():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "yaml.load(" not in text and "eval(" not in text.replace("model.eval(", "").replace(".eval()", "")
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"


def test_importing_fer_bench_asks_no_network():
    import subprocess
    import sys

    code = (
        "import os; os.environ.pop('NO_ALBUMENTATIONS_UPDATE', None); import fer_bench.data; "
        "print(os.environ['NO_ALBUMENTATIONS_UPDATE'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "1" and "fetching version" not in out.stderr
