"""The package layout is the architecture: read the package's imports (ast, nothing run) and check its rules."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resnet_surgery"

# Layers from the bottom up: a module imports only from its own layer or the ones below.
LAYERS = {
    "errors": 0, "vocab": 0, "utils": 0, "atomic": 0, "history": 0, "defaults": 0, "arguments": 0,
    "data": 1,
    "zoo": 2,
    "engine": 3,
    "store": 4,
    "recovery": 5,
    "deploy": 6,
    "workflows": 7,
    "cli": 8,
    "__init__": 9,
}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 70


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def modules() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (annotations only, never imported)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not (isinstance(child, ast.If) and is_type_checking(child)):
                stack.append(child)


def imports(name: str, path: Path, tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """(imported package module, the names taken from it, line) for each import of the package's own modules."""
    package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    if name == "__init__":
        package = []
    found = []
    for node in runtime_nodes(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            elif node.module and node.module.startswith("resnet_surgery"):
                target = node.module.removeprefix("resnet_surgery").lstrip(".")
            else:
                continue
            found.append((target or "__init__", [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("resnet_surgery"):
                    found.append((a.name.removeprefix("resnet_surgery").lstrip(".") or "__init__", [], node.lineno))
    return found


def resolve(target: str, names: list[str], known: set[str]) -> list[str]:
    """The modules an import reads: ``from .pkg import mod`` reads pkg.mod; ``from .mod import x`` reads mod."""
    out = [f"{target}.{n}" if target != "__init__" else n for n in names]
    out = [m for m in out if m in known]
    return out or [target]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges = {}
    for name, (path, tree) in mods.items():
        edges[name] = set()
        for target, names, _ in imports(name, path, tree):
            edges[name].update(m for m in resolve(target, names, known) if m != name)
    return edges


def layer(name: str) -> int:
    return LAYERS[name.split(".")[0]]


def test_every_module_has_a_layer():
    assert all(name.split(".")[0] in LAYERS for name in modules()), sorted(modules())


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])


def test_imports_only_point_down():
    up = [f"{a} imports {b}" for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert not up, up


def test_outside_a_subpackage_code_imports_only_its_init():
    # timm's habit: each subpackage's API is its __init__; its modules are its own business
    reaching = []
    for name, (path, tree) in modules().items():
        for target, _, line in imports(name, path, tree):
            parts = target.split(".")
            if len(parts) > 1 and parts[0] != name.split(".")[0]:
                reaching.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}: import from {parts[0]}")
    assert not reaching, reaching


def test_no_private_name_crosses_modules():
    crossing = []
    for name, (path, tree) in modules().items():
        for target, names, line in imports(name, path, tree):
            crossing += [f"{path.name}:{line} imports {n} from {target}" for n in names if n.startswith("_")]
    assert not crossing, crossing


def test_rooms_stay_small():
    big = []
    for name, (path, tree) in modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            big.append(f"{name}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big.append(f"{name}.{node.name}: {length} lines")
    assert not big, big


def test_the_package_never_silences_its_own_notices():
    silenced = [name for name, (path, _) in modules().items()
                if "SurgeryNotice" in path.read_text() and "simplefilter" in path.read_text()]
    assert not silenced, silenced


def test_every_module_declares_its_public_api():
    missing, undocumented = [], []
    for name, (path, tree) in modules().items():
        if path.name == "__init__.py":
            continue
        exported = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                exported = {ast.literal_eval(e) for e in node.value.elts}
        if exported is None:
            missing.append(name)
            continue
        for node in tree.body:
            if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in exported
                    and not ast.get_docstring(node)):
                undocumented.append(f"{name}.{node.name}")
    assert not missing, f"modules without __all__: {missing}"
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_the_root_exports_resolve():
    import resnet_surgery

    assert all(hasattr(resnet_surgery, n) for n in resnet_surgery.__all__)


RAISES_NOTHING = {"history"}  # reads an attribute: None for anything without one


def test_the_root_functions_document_their_arguments_and_result():
    import inspect

    import resnet_surgery

    missing = []
    for name in resnet_surgery.__all__:
        fn = getattr(resnet_surgery, name)
        if not inspect.isfunction(fn):
            continue
        doc, signature = inspect.getdoc(fn) or "", inspect.signature(fn)
        if signature.parameters and "Args:" not in doc:
            missing.append(f"{name}: Args")
        if signature.return_annotation not in ("None", None) and "Returns:" not in doc:
            missing.append(f"{name}: Returns")
        if "Raises:" not in doc and name not in RAISES_NOTHING:
            missing.append(f"{name}: Raises")
    assert not missing, missing


RUN_CONTROL = {"progress", "echo", "force", "resume", "checkpoint", "on_fp32"}  # how to run it, not what it does


def test_no_root_function_takes_more_than_nine_settings():
    """Many settings go in an options object (CalibrateOptions, RunOptions, ...), taken as ``options=`` or as
    keywords; a function's own parameters, besides how to run it (progress, force, ...), stay few."""
    import inspect

    import resnet_surgery

    counts = {}
    for name in resnet_surgery.__all__:
        fn = getattr(resnet_surgery, name)
        if inspect.isfunction(fn):
            counts[name] = len([p for p in inspect.signature(fn).parameters.values()
                                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in RUN_CONTROL])
    assert max(counts.values()) <= 9, sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    assert counts["run_pipeline"] <= 3 and counts["quantize_onnx"] <= 5 and counts["compare_latency"] <= 3
