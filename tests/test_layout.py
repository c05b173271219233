"""The package's shape, checked from its source: layers import only downwards, no import cycle, short
modules, one owner per file format, and the model contract called rather than probed.

The import graph includes imports inside functions (a lazy import is still a dependency)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "genbench"
MAX_LINES = 450

# lower layers never import higher ones; a layer may import itself and anything below it
LAYERS = {
    "foundation": 0,  # errors, utils, config, files, images, limits
    "data": 1,
    "core": 1,  # the lecture's math: no networks, no I/O
    "nets": 2,
    "models": 3,
    "training": 4,
    "evaluation": 5,
    "cli": 6,
}
FOUNDATION = {"errors", "utils", "config", "files", "images", "limits", "__init__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    top = parts[1]
    if top in ("cli", "__main__"):
        return LAYERS["cli"]
    if top in FOUNDATION:
        return LAYERS["foundation"]
    return LAYERS[top]


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """genbench modules imported anywhere in `path` (absolute and relative, any depth)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import name` imports pkg.name when that is a module, else pkg itself
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.startswith("genbench") and name != module:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {m: _imports(m, p, known) for m, p in sources.items()}


def test_the_import_graph_sees_both_absolute_and_relative_imports():
    g = _graph()
    assert "genbench.core.diffusion" in g["genbench.core.samplers"]  # `from .diffusion import ...`
    assert "genbench.core.gaussian" in g["genbench.core.diffusion"]  # `from genbench.core.gaussian import ...`
    assert "genbench.evaluation.compare" in g["genbench.cli"]  # imported inside a function
    assert len(g) > 40


def test_layers_import_only_downwards():
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
           for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_the_math_layer_has_no_networks_and_no_io():
    for m, deps in _graph().items():
        if m.startswith("genbench.core"):
            assert deps <= {d for d in deps if d.startswith("genbench.core")} | {"genbench.errors"}, (m, deps)
            text = _sources()[m].read_text()
            for io in ("open(", "read_text(", "write_bytes(", "safetensors", "json."):
                assert io not in text, (m, io)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if d.startswith(m + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d in graph and state.get(d) is None:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            visit(m)


def test_no_module_is_longer_than_the_limit():
    long = {m: n for m, p in _sources().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def _code_strings(path: Path) -> list[str]:
    """String constants in code, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


@pytest.mark.parametrize("literal,owner", [("run.json", "genbench.training.run_folder"),
                                           ("log.jsonl", "genbench.training.run_folder"),
                                           ("latest.json", "genbench.training.checkpoint"),
                                           ("state.json", "genbench.training.checkpoint")])
def test_each_file_of_a_run_is_named_by_its_owner_alone(literal, owner):
    users = [m for m, p in _sources().items() if any(literal in s for s in _code_strings(p))]
    assert users == [owner]


CONTRACT = {"stages", "reconstruct", "encode", "decode", "encode_latents", "decode_latents", "evaluate",
            "prepare_stage", "finish_training", "optimizer_groups", "PRESETS", "DATASET_PRESETS", "FAMILY",
            "posterior", "codebook_size", "diffusion_to_images"}


def test_the_model_contract_is_called_not_probed():
    """getattr/hasattr with a contract name means the contract is not written down; it is (models/base.py)."""
    probes = []
    for m, p in _sources().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in CONTRACT):
                probes.append(f"{m}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
    assert not probes, probes


def test_the_readme_python_example_imports_what_exists():
    """The README's example imports only names the package has (running it whole is `make demo`'s job)."""
    import re

    readme = (SRC.parents[1] / "README.md").read_text()
    code = re.search(r"## From Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    imports = [line for line in code.splitlines() if line.startswith(("from genbench", "import genbench"))]
    assert len(imports) >= 3
    exec("\n".join(imports), {})
