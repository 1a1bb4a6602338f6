"""The package's structure: no module imports another that (directly or through others) imports it back."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """fewtune modules a file imports anywhere (functions included), except under `if TYPE_CHECKING:`."""
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fewtune"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fewtune")}
        found |= _imports(node, modules)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    modules = set(files)
    return {m: {d for d in _imports(ast.parse(f.read_text(encoding="utf-8")), modules) if d in modules and d != m}
            for m, f in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "fewtune.train.loop" in graph and graph["fewtune.train.loop"]  # the graph was really read
    assert cycles(graph) == []


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_inference_imports_no_training_code():
    """generate and export (and the server to come) load a trained model without the training package."""
    graph = import_graph()
    for module in ("fewtune.generate", "fewtune.export", "fewtune.serve.api", "fewtune.serve.engine", "fewtune.serve"):
        training = sorted(m for m in _reachable(graph, module) if m.startswith("fewtune.train"))
        assert training == [], f"{module} reaches {training}"


def test_the_readme_layout_names_every_folder():
    root = SRC.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    folders = [p for p in (SRC / "fewtune").rglob("*") if p.is_dir() and "__pycache__" not in p.parts
               and any(p.glob("*.py"))]
    folders += [root / name for name in ("tests", "examples", "benchmarks", "docs")]
    missing = [str(p.relative_to(root)) for p in folders if f"{p.relative_to(root).as_posix()}/" not in layout]
    assert missing == []
