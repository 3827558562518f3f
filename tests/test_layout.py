"""The package's shape: entry points are leaves, files stay readable, and each entry point is thin."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minipt"
ENTRY_POINTS = ("minipt.train", "minipt.finetune", "minipt.eval", "minipt.sample", "minipt.export", "minipt.cache")


def modules() -> dict[str, Path]:
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def imported(module: str, file: Path) -> set[str]:
    """Every minipt module that ``file`` imports, at the top or inside a function, by any spelling."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from minipt import train`
    return {n for n in names if n.split(".")[0] == "minipt"}


def test_the_walk_sees_every_spelling_of_an_import(tmp_path):
    file = tmp_path / "m.py"
    file.write_text("import minipt.train\nfrom minipt import sample as S\n"
                    "def f():\n    from minipt.eval import main\n    from . import finetune\n"
                    "import minipt.export as X\nimport minipt.cache\n")
    assert set(ENTRY_POINTS) <= imported("minipt.m", file)


def test_no_module_imports_an_entry_point():
    # entry points included: none is another's library
    offenders = {module: sorted(set(ENTRY_POINTS) & imported(module, file) - {module})
                 for module, file in modules().items()}
    offenders = {module: names for module, names in offenders.items() if names}
    assert not offenders, f"modules that import an entry point: {offenders}"


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_an_entry_points_main_is_short(module):
    tree = ast.parse(modules()[module].read_text(encoding="utf-8"))
    (main,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    assert main.end_lineno - main.lineno + 1 <= 40


def test_no_file_outgrows_one_reader():
    long = {str(f.relative_to(PACKAGE)): n for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > 700}
    assert not long, f"files past 700 lines: {long}"
