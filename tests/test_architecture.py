"""The package's layers, one folder each, and the rule each keeps, checked on the source (ast): a
forbidden import fails here, before a reader has to find it. Lazy imports inside functions count.

    core/, inputs/   pure torch and data: never the cluster, the pipeline, storage writers or commands
    storage/         bytes and files: never builds or rebuilds a model
    cluster/         used by the pipeline alone; only cluster/runner imports Ray
    spec             knows no torch;  report/ reads no files
"""

import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "quantray"

# What each part of the package may import of quantray itself (a module always may import its own
# layer). Top-level modules not listed (cli, the package's face) may import anything.
ALLOWED = {
    "quantray.errors": set(),
    "quantray.version": set(),
    "quantray.digest": set(),
    "quantray.spec": {"quantray.errors"},
    "quantray.storage": {"quantray.errors", "quantray.digest", "quantray.version"},
    "quantray.inputs": {"quantray.errors", "quantray.digest", "quantray.spec", "quantray.storage.store"},
    "quantray.core": {"quantray.errors", "quantray.digest", "quantray.spec", "quantray.inputs"},
    "quantray.report": set(),
    "quantray.cluster": {"quantray.errors", "quantray.digest", "quantray.spec", "quantray.core", "quantray.inputs"},
    "quantray.pipeline": {"quantray.errors", "quantray.digest", "quantray.spec", "quantray.version", "quantray.core",
                          "quantray.inputs", "quantray.storage", "quantray.cluster", "quantray.report"},
    "quantray.api": {"quantray.errors", "quantray.spec", "quantray.pipeline", "quantray.core", "quantray.inputs",
                     "quantray.storage", "quantray.report"},
    "quantray.commands": {"quantray.errors", "quantray.digest", "quantray.spec", "quantray.api", "quantray.pipeline",
                          "quantray.core", "quantray.inputs", "quantray.storage", "quantray.report"},
    "quantray.demo": {"quantray.errors", "quantray.digest", "quantray.inputs", "quantray.storage.store"},
    "quantray.examples": {"quantray.errors", "quantray.digest", "quantray.inputs", "quantray.storage.store", "quantray.demo"},
    "quantray.testing": {"quantray.inputs", "quantray.demo", "quantray.examples"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, int]]:
    """(absolute module, line) for every import in `module`, at any depth; `from X import name`
    counts X.name where that is a module of the package."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((target, node.lineno))
            found += [(f"{target}.{a.name}", node.lineno) for a in node.names if f"{target}.{a.name}" in MODULES]
    return found


def _layer(module: str, table) -> str | None:
    """The longest key of `table` that `module` is, or lies under."""
    keys = [k for k in table if module == k or module.startswith(k + ".")]
    return max(keys, key=len) if keys else None


def _within(name: str, allowed: set[str]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module in MODULES:
        layer = _layer(module, ALLOWED)
        if layer is None:
            continue
        allowed = ALLOWED[layer] | {layer}
        for name, line in _imports(module):
            # the package's face only as a parent of what is imported (`from .. import x` resolves to x)
            if name.startswith("quantray") and name != "quantray" and not _within(name, allowed):
                wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {name}, which {layer} may not")
    assert not wrong, "\n".join(wrong)


def test_only_the_cluster_runner_imports_ray():
    wrong = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {name}" for m in MODULES for name, line in _imports(m)
             if (name == "ray" or name.startswith("ray.")) and m != "quantray.cluster.runner"]
    assert not wrong, "only quantray/cluster/runner.py may import ray:\n" + "\n".join(wrong)


def test_spec_knows_no_torch():
    third_party = {name.split(".")[0] for name, _ in _imports("quantray.spec")} - {"quantray"}
    assert not third_party & {"torch", "torchvision", "ray", "pyarrow", "numpy"}, third_party


def test_storage_never_rebuilds_a_model():
    """No FX flow, no model factories: storage reads and writes bytes; api.load_quantized rebuilds."""
    for module in [m for m in MODULES if m.startswith("quantray.storage")]:
        for name, line in _imports(module):
            assert not name.startswith(("torch.ao", "torchvision.models", "torch.fx")), f"{module}:{line} imports {name}"


def test_report_reads_no_files():
    """Console tables and HTML are made from plain dicts; whoever calls them reads the run's files."""
    for module in [m for m in MODULES if m.startswith("quantray.report")]:
        tree = ast.parse(MODULES[module].read_text())
        imported = {name.split(".")[0] for name, _ in _imports(module)}
        assert not imported & {"pathlib", "os", "io", "shutil", "pyarrow", "json"}, (module, imported)
        calls = {n.func.id if isinstance(n.func, ast.Name) else n.func.attr for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}
        assert not calls & {"open", "read_text", "read_bytes", "read_table"}, (module, calls & {"open", "read_text"})


def test_the_package_s_modules_import_each_other_without_a_cycle():
    """Package faces (__init__ re-exports) aside, imports between modules point one way."""
    faces = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    edges = {m: {n for n, _ in _imports(m) if n in MODULES and n not in faces and n != m}
             for m in MODULES if m not in faces}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_every_module_of_the_package_lies_in_a_known_layer():
    """A new module or folder gets a rule here when it is added."""
    loose = [m for m in MODULES if _layer(m, ALLOWED) is None and m not in ("quantray", "quantray.cli")]
    assert not loose, loose
