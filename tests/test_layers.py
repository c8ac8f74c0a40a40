"""The layer rules of DESIGN.md, read from the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_METHODS = ("diffusers", "transformers", "distill.models", "prefect")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_methods_import_no_model_plugin_and_no_diffusers():
    files = sorted((ROOT / "distill" / "methods").rglob("*.py"))
    assert len(files) >= 4
    for path in files:
        for name in imported_modules(path):
            assert not name.startswith(FORBIDDEN_IN_METHODS), f"{path.relative_to(ROOT)} imports {name}"


def test_importing_methods_loads_no_model_library():
    code = (
        "import sys, distill.methods, distill.config, distill.roles;"
        "bad = [m for m in ('diffusers', 'transformers', 'distill.models') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_library_never_imports_prefect():
    for path in sorted((ROOT / "distill").rglob("*.py")):
        for name in imported_modules(path):
            assert not name.startswith("prefect"), f"{path.relative_to(ROOT)} imports {name}"


def test_algorithm_words_stay_out_of_model_plugins():
    for path in sorted((ROOT / "distill" / "models").rglob("*.py")):
        text = path.read_text().lower()
        for word in ("dmd", "critic", "fake_score", "real_score"):
            assert word not in text, f"{path.relative_to(ROOT)} mentions {word!r}"
