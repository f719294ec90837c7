"""The core library's import graph: no cycles (every import counted, lazy and TYPE_CHECKING ones too), and no
ComfyUI module anywhere in it."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "metacanvas_core"
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution"}


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, tree: ast.AST | None = None) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved); `tree`: its parsed source."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree or ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import tiny` imports a module
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in CORE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    edges = graph()
    assert "metacanvas_core.metacanvas" in edges and "metacanvas_core.backbones.wan" in edges
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_detector_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_backbones_know_neither_checkpoint_nor_planner():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("metacanvas_core.backbones"):
            banned = {t for t in targets if t.split(".")[1] in ("checkpoint", "planner", "metacanvas", "conditioning")}
            assert not banned, f"{name} imports {banned}"


def test_core_never_imports_comfyui():
    for path in CORE.rglob("*.py"):
        top = {m.split(".")[0] for m in imports(path)}
        assert not top & COMFYUI_MODULES, f"{path.relative_to(CORE.parent)} imports {top & COMFYUI_MODULES}"


def runtime_imports(path: Path) -> set[str]:
    """`imports`, less what only type checkers read (`if TYPE_CHECKING:` blocks)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = [ast.Pass()]
    return imports(path, tree)


def ast_imports_of_node_file(path: Path) -> list[str]:
    """The metacanvas_core modules a file of nodes/ imports (absolute imports: nodes/ is not in the library)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("metacanvas_core"):
            names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return names


def test_the_native_path_never_reaches_the_diffusers_adapters():
    """ComfyUI's native Wan2.2/FLUX path (the model patch and its nodes) runs the canvas mechanism the adapters also
    run (`injection.py`, `specs.py`), never the diffusers adapters themselves (`backbones/`)."""
    modules = {module_name(p): p for p in CORE.rglob("*.py")}
    nodes = CORE.parent / "nodes"
    reached, todo = set(), []
    for name in ("model_patch.py", "nodes_native.py"):
        todo += ast_imports_of_node_file(nodes / name)
    while todo:
        name = todo.pop()
        if name in modules and name not in reached:
            reached.add(name)
            todo += runtime_imports(modules[name])
    assert "metacanvas_core.injection" in reached and "metacanvas_core.specs" in reached
    assert not {m for m in reached if m.startswith("metacanvas_core.backbones")}, sorted(reached)
