"""The layers of docs/DESIGN.md, checked from the source: no import circle, and the serving side never imports
training code. Every `import` counts, the ones inside functions too: a lazy import hides a circle from Python, not
from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mlflow_finetune_plugin", "gradio_app")

# Modules being rewritten by the core refactor (issue 15): their imports are not checked yet. Empty this list once
# they are done; nothing is ever added to it.
BEING_REWRITTEN: tuple[str, ...] = ()
TRAINING = tuple(f"mlflow_finetune_plugin.{m}" for m in
                 ("train", "job", "adapters", "objectives", "pipeline", "trainers", "resume", "publish",
                  "quantization", "splits", "rewards", "callbacks"))
SERVING_SIDE = ("mlflow_finetune_plugin.serving", "gradio_app")


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (`from pkg import mod` names the module, `from mod import name` the
    module holding the name)."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets.update(known(f"{base}.{a.name}") for a in node.names)
        graph[module] = {t for t in targets if t and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), each as a module path."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_cycle_in(graph, component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_in(graph, component: set[str]) -> list[str]:
    """A closed path through part of `component`, to show in the failure message."""
    start = min(component)
    path, seen = [start], {start}
    while True:
        nxt = min(w for w in graph[path[-1]] if w in component)
        if nxt in seen:
            return path[path.index(nxt):] + [nxt]
        path.append(nxt)
        seen.add(nxt)


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "mlflow_finetune_plugin.serving.choices" in graph["mlflow_finetune_plugin.serving.server"]
    # `from mlflow_finetune_plugin.logged_model import ...` inside a function
    assert "mlflow_finetune_plugin.logged_model" in graph["mlflow_finetune_plugin.serving.transformers_engine"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_circle():
    graph = {m: {t for t in targets if not _within(t, BEING_REWRITTEN)}
             for m, targets in import_graph().items() if not _within(m, BEING_REWRITTEN)}
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_serving_and_the_playground_never_import_training_code():
    graph = import_graph()
    problems = []
    for start in sorted(m for m in graph if _within(m, SERVING_SIDE)):
        seen, todo, via = {start}, [start], {start: None}
        while todo:
            module = todo.pop()
            if _within(module, TRAINING):
                chain, step = [], module
                while step:
                    chain.append(step)
                    step = via[step]
                problems.append(" -> ".join(reversed(chain)))
                continue
            if _within(module, BEING_REWRITTEN) and module != start:
                continue  # its imports are not checked yet
            for target in graph[module] - seen:
                seen.add(target)
                via[target] = module
                todo.append(target)
    assert not problems, "the serving side reaches training code:\n" + "\n".join(problems)
