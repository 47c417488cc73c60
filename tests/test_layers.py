"""One import root and layers that point one way: cli -> api -> model -> index -> geocells -> core.

The layer test reads every `import` of the installed packages (module level and inside functions)
with `ast`, so an upward import hidden inside a function fails it as well.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {"core": 0, "geocells": 1, "index": 2, "model": 3, "api": 4, "cli": 5}


def _package_dirs() -> dict[str, Path]:
    """Import name -> folder, as the installed (editable) package maps them."""
    out = {}
    for name in ("pigeon", "pigeon.geocells", "pigeon.index", "pigeon.api"):
        spec = importlib.util.find_spec(name)
        out[name] = Path(list(spec.submodule_search_locations)[0])
    return out


def _modules() -> dict[str, Path]:
    """Every module of the installed packages: dotted name -> file."""
    dirs = _package_dirs()
    mods: dict[str, Path] = {}
    for pkg, d in dirs.items():
        for f in d.rglob("*.py"):
            rel = f.relative_to(d).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "pigeon" and parts and parts[0] in ("geocells", "index", "api"):
                continue
            mods[".".join([pkg, *parts])] = f
    return mods


def layer(mod: str) -> str:
    parts = mod.split(".")
    sub = parts[1] if len(parts) > 1 else ""
    if sub in ("core", "geocells", "index", "api"):
        return sub
    if sub in ("cli", "commands"):
        return "cli"
    return "model"


def _imports(mod: str, path: Path) -> set[str]:
    """pigeon modules that `mod` imports anywhere in its file (relative imports resolved)."""
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - node.level + 1]
                target = ".".join(pkg + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] == "pigeon")
    return out


def _edges() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for m, f in mods.items():
        # a name `pigeon.x.y` counts as module `pigeon.x.y` if it is one, else its package `pigeon.x`
        targets = {t if t in mods else t.rsplit(".", 1)[0] for t in _imports(m, f)}
        edges[m] = {t for t in targets if t in mods and t != m and t != "pigeon"}
    return edges


def test_layers_point_one_way():
    bad = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, ts in _edges().items() for t in ts if RANK[layer(t)] > RANK[layer(m)]]
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles_between_files():
    edges = _edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if t.startswith(m + ".") or m.startswith(t + "."):
                continue  # a package and its own modules
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]) if t in stack else f"{m} -> {t}")
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_nothing_imports_a_command_module_or_the_app_below_the_cli():
    for m, ts in _edges().items():
        if layer(m) != "cli":
            assert not [t for t in ts if layer(t) == "cli"], m
        if layer(m) not in ("cli", "api"):
            assert not [t for t in ts if layer(t) == "api"], m


def test_the_layer_test_catches_an_upward_import(tmp_path):
    """The walker sees an import hidden inside a function."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from ..api import create_app\n    from pigeon.commands import serve\n")
    got = _imports("pigeon.geocells.x", f)
    assert "pigeon.api" in got and "pigeon.commands" in got
    assert RANK[layer("pigeon.api.app")] > RANK[layer("pigeon.geocells.x")]


def test_one_import_root_in_a_fresh_install(tmp_path):
    """`pip install .` puts one name in site-packages: `import api` fails, `import pigeon.api` works."""
    wheel_dir = tmp_path / "wheel"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(ROOT)],
                       capture_output=True, text=True, cwd=tmp_path)
    if r.returncode != 0:
        pytest.fail(r.stderr[-2000:])
    (whl,) = wheel_dir.glob("*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(whl).namelist() if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"pigeon"}
    names = zipfile.ZipFile(whl).namelist()
    assert "pigeon/api/static/index.html" in names and "pigeon/geocells/data/admin1.parquet" in names
    assert "pigeon/geocells/data/towns.parquet" in names   # area types read it at run time
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(whl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    code = (
        "import sys; sys.path = [p for p in sys.path if 'site-packages' in p or 'lib/python' in p]; sys.path.insert(0, %r)\n"
        "import importlib.util as u\n"
        "assert u.find_spec('api') is None and u.find_spec('index') is None and u.find_spec('geocells') is None\n"
        "import pigeon.api, pigeon.geocells, pigeon.index\n"
        "assert pigeon.api.__file__.startswith(%r), pigeon.api.__file__\n"
        "from pigeon.geocells import bundled; assert len(bundled.driving_side()) > 200\n"
        "print('ok')\n"
    ) % (str(site), str(site))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_editable_install_maps_the_folders():
    dirs = _package_dirs()
    assert dirs["pigeon.geocells"] == ROOT / "geocells" and dirs["pigeon.index"] == ROOT / "index" and dirs["pigeon.api"] == ROOT / "api"
