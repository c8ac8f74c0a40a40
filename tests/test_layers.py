"""The layer rules of DESIGN.md and docs/ARCHITECTURE.md, read from the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_METHODS = ("diffusers", "transformers", "distill.models", "prefect")
MODEL_LIBRARIES = ("diffusers", "transformers", "deepspeed")


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_modules(path: Path, package: str = "") -> set[str]:
    """Every module a file imports, function-level imports included, `if TYPE_CHECKING:` blocks excluded."""
    names = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def library_modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((ROOT / "distill").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """distill module -> the distill modules it imports (a `from pkg import mod` counts as mod)."""
    mods = library_modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for target in imported_modules(path, package):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_the_library_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_methods_import_no_model_plugin_and_no_diffusers():
    files = sorted((ROOT / "distill" / "methods").rglob("*.py"))
    assert len(files) >= 4
    for path in files:
        for name in imported_modules(path):
            assert not name.startswith(FORBIDDEN_IN_METHODS), f"{path.relative_to(ROOT)} imports {name}"


def test_models_and_data_never_import_training():
    for folder in ("models", "data"):
        for path in sorted((ROOT / "distill" / folder).rglob("*.py")):
            for name in imported_modules(path):
                assert not name.startswith("distill.training"), f"{path.relative_to(ROOT)} imports {name}"


def _modules_loaded_by(code: str) -> list[str]:
    probe = f"{code}; import sys; print(' '.join(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_importing_methods_loads_no_model_library():
    assert _modules_loaded_by("import distill.methods, distill.config, distill.roles") == []


def test_loading_a_config_loads_no_model_library():
    assert _modules_loaded_by("from distill.config import load_config; load_config('configs/tiny_dmd2.yaml')") == []


def test_library_never_imports_prefect():
    for path in sorted((ROOT / "distill").rglob("*.py")):
        for name in imported_modules(path):
            assert not name.startswith("prefect"), f"{path.relative_to(ROOT)} imports {name}"


def test_algorithm_words_stay_out_of_model_plugins():
    for path in sorted((ROOT / "distill" / "models").rglob("*.py")):
        text = path.read_text().lower()
        for word in ("dmd", "critic", "fake_score", "real_score"):
            assert word not in text, f"{path.relative_to(ROOT)} mentions {word!r}"


def test_no_module_over_400_lines():
    for path in sorted([*(ROOT / "distill").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]):
        lines = len(path.read_text().splitlines())
        assert lines <= 400, f"{path.relative_to(ROOT)} has {lines} lines: split it along a seam"
