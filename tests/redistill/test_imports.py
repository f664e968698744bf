"""Dependencies point one way: redistill <- train <- export <- deploy <- bench, and the agent imports nothing.

Every module's imports (at module top and inside functions) are parsed, not executed, so an upward
import or a cycle fails here even when it hides inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("redistill", "train", "export", "deploy", "bench")

#: lower layers never import higher ones
LAYERS = (("redistill",), ("train",), ("export",), ("deploy",), ("bench",))

#: the agent (copied to the device alone) imports nothing of the project
AGENT = "deploy.agent"
#: the one crossing allowed: export writes what the agent reads, so it takes the agent's side of the contract
#: (schema names, backend names) from the agent's own modules instead of a copy (issue 11)
EXPORT_READS_FROM_AGENT = ("deploy.agent.contract", "deploy.agent.backends")

#: command-line modules (``cli``, ``*_cli``) may import their stage's libraries inside handlers, and these modules,
#: which `redistill --help` imports, may import the torch-loading registries they validate against inside functions:
#: `import train.config` takes 0.07 s, `import train.models` 1.8 s and `train.losses` 3.5 s on the 2-core machine
LAZY_ALLOWED = {
    "train.config": "describes the config keys in `redistill distill --help`; validation needs the torch registries",
}


def layer(module: str) -> int:
    """The layer of ``module`` (redistill 0 ... bench 4)."""
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise ValueError(f"{module} is in no layer")


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def allowed(importer: str, imported: str) -> bool:
    """Whether ``importer`` may import ``imported``: the agent only itself; otherwise its own layer or below,
    and export also the agent's side of the contract."""
    if _within(importer, AGENT):
        return _within(imported, AGENT)
    if layer(importer) == layer("export") and any(_within(imported, p) for p in EXPORT_READS_FROM_AGENT):
        return True
    return layer(imported) <= layer(importer)


def project_modules() -> Dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: Dict[str, Path]) -> str:
    """The project module ``name`` refers to (``pkg.mod.attr`` -> ``pkg.mod``), or '' for a third-party one."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, path: Path, mods: Dict[str, Path]) -> List[Tuple[str, int, bool]]:
    """(imported project module, line, inside a function or class) for every import statement."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            names: List[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in child.names]
            for target in dict.fromkeys(_resolve(n, mods) for n in names):
                if target and target != module:
                    found.append((target, child.lineno, nested))
            visit(child, inner)

    visit(tree, False)
    return found


@pytest.fixture(scope="module")
def graph():
    mods = project_modules()
    return mods, {m: imports_of(m, p, mods) for m, p in mods.items()}


def test_the_walk_sees_every_stage(graph):
    mods, edges = graph
    assert {m.split(".")[0] for m in mods} == set(PACKAGES)
    assert "deploy.agent.contract" in mods and layer("deploy.agent.contract") == layer("deploy.deployer") == 3
    assert any(t == "redistill.memory" for t, _, _ in edges["train.design"])


def test_no_upward_import(graph):
    mods, edges = graph
    bad = [f"{mods[m].relative_to(ROOT)}:{line} imports {t}"
           for m, es in edges.items() for t, line, _ in es if not allowed(m, t)]
    assert not bad, ("upward imports (redistill <- train <- export <- deploy <- bench; the agent imports nothing "
                     "of the project):\n" + "\n".join(bad))


def test_internal_imports_at_module_top(graph):
    mods, edges = graph
    bad = [f"{mods[m].relative_to(ROOT)}:{line} imports {t} inside a function"
           for m, es in edges.items() if not _may_import_lazily(m)
           for t, line, nested in es if nested]
    assert not bad, "move these imports to the module top (only CLI modules stay lazy, for --help):\n" + "\n".join(bad)


def _may_import_lazily(module: str) -> bool:
    leaf = module.rpartition(".")[2]
    return leaf == "cli" or leaf.endswith("_cli") or module in LAZY_ALLOWED


def test_help_imports_no_torch():
    """The reason lazy imports are allowed at all: `redistill --help` builds every parser without loading torch."""
    code = "import sys; from redistill.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_import_cycle(graph):
    _, edges = graph
    adj = {m: sorted({t for t, _, _ in es}) for m, es in edges.items()}
    state: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in adj.get(m, ()):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(adj):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_catches_violations(tmp_path):
    """The walk itself can fail: an upward and a nested import in a scratch module are both found."""
    mods = {"train.x": tmp_path / "x.py", "bench.y": tmp_path / "y.py"}
    mods["train.x"].write_text("import os\nfrom bench.y import f\n\ndef g():\n    from bench import y\n")
    found = imports_of("train.x", mods["train.x"], mods)
    assert found == [("bench.y", 2, False), ("bench.y", 5, True)]
    assert layer("bench.y") > layer("train.x")
    assert not allowed("redistill.io", "deploy.agent.contract") and not allowed("deploy.agent.cli", "redistill.io")
    assert allowed("export.bundle", "deploy.agent.contract") and not allowed("export.bundle", "deploy.deployer")

