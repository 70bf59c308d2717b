"""passes/ and rules/ install as bcpc.passes and bcpc.rules, never as top-level packages."""
import ast
import subprocess
import sys
import tempfile
from pathlib import Path

import bcpc.passes
import bcpc.rules

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_load_from_this_checkout():
    assert Path(bcpc.passes.__file__).resolve() == ROOT / "passes" / "__init__.py"
    assert Path(bcpc.rules.__file__).resolve() == ROOT / "rules" / "__init__.py"
    # from outside the checkout (the checkout root itself is on sys.path under `python -m pytest`)
    code = "import importlib.util as u, bcpc.passes; print(u.find_spec('passes'), u.find_spec('rules'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(), capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["None", "None"]


def test_no_toplevel_passes_or_rules_imports_and_no_relative_imports():
    offenders = []
    for folder in ("bcpc", "passes", "rules", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        offenders.append(f"{path}: relative import")
                    elif node.module and node.module.split(".")[0] in ("passes", "rules"):
                        offenders.append(f"{path}: from {node.module}")
                elif isinstance(node, ast.Import):
                    offenders += [f"{path}: import {a.name}" for a in node.names if a.name.split(".")[0] in ("passes", "rules")]
    assert not offenders, offenders


def test_pyflakes_is_clean():
    """Unused imports and variables, undefined names: none in the package, passes, rules, benchmarks."""
    out = subprocess.run([sys.executable, "-m", "pyflakes", "bcpc", "passes", "rules", "benchmarks", "tests"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "" and out.returncode == 0, out.stdout
