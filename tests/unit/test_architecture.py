"""The import rules of docs/ARCHITECTURE.md, read from the source with `ast`: which package may
import which, torch only where it belongs, and no import inside a function except to keep torch
out of the control plane."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "worker", "migrations")

# Importer -> what it may import besides itself (docs/ARCHITECTURE.md has the same table).
MAY_IMPORT = {
    "app": set(),  # the package's __init__
    "app.core": set(),
    "app.models": {"app.core"},
    "app.schemas": {"app.core"},
    "app.inference.messages": set(),
    "app.inference": {"app.core", "app.inference.messages"},
    "app.services": {"app.core", "app.models", "app.schemas", "app.inference.messages"},
    "app.api": {"app.core", "app.models", "app.schemas", "app.services", "app.inference.messages"},
    "app.main": {"app.core", "app.api", "app.services", "app.inference"},
    "app.cli": {"app.core", "app.models", "app.schemas", "app.services", "worker"},
    "worker": {"app.core", "app.models", "app.schemas"},
    "migrations": {"app.core", "app.models"},
}
# Where torch may be loaded when a module is imported.
TORCH_LAYERS = {"app.inference", "worker"}
TORCH_PACKAGES = {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger_kernel"}


def layer(module: str) -> str:
    if module == "app.inference.messages":
        return module
    for package in ("app.core", "app.services", "app.api", "app.inference"):
        if module == package or module.startswith(package + "."):
            return package
    top = module.split(".")[0]
    return top if top in ("worker", "migrations") else module


def is_torch_package(name: str) -> bool:
    return name.split(".")[0] in TORCH_PACKAGES or name.startswith("safetensors.torch")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) for each import; `from package import name`
    counts as importing package.name when that is a module."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{package}.{base}".rstrip(".")
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.append((node.lineno, name if name in modules else base, in_function))
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def torch_modules(graph: dict[str, list[tuple[int, str, bool]]]) -> set[str]:
    """Project modules that load torch when imported (directly or through another module)."""
    loading: set[str] = set()
    while True:
        more = {
            module
            for module, found in graph.items()
            if module not in loading
            and any(not inner and (is_torch_package(name) or name in loading) for _, name, inner in found)
        }
        if not more:
            return loading
        loading |= more


def test_imports_follow_the_architecture():
    modules = project_modules()
    graph = {module: imports(module, path, modules) for module, path in modules.items()}
    loads_torch = torch_modules(graph)
    problems = []
    for module, found in graph.items():
        where = modules[module].relative_to(REPO)
        importer = layer(module)
        if importer not in MAY_IMPORT:
            problems.append(f"{where}: package {importer} is not in the architecture's table")
            continue
        for line, name, in_function in found:
            torch_import = is_torch_package(name) or name in loads_torch
            if name in modules:
                imported = layer(name)
                if imported != importer and imported not in MAY_IMPORT[importer]:
                    problems.append(f"{where}:{line}: {importer} must not import {name}")
            if in_function and not torch_import:
                problems.append(
                    f"{where}:{line}: import of {name} inside a function (only torch and modules "
                    "that load it are imported there, to keep torch out of the control plane)"
                )
            if torch_import and not in_function and importer not in TORCH_LAYERS:
                problems.append(f"{where}:{line}: {name} loads torch, which {importer} must not load")
    assert not problems, "\n".join(problems)
