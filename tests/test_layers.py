"""The layers of docs/design.md, checked from the source: every import points down a floor or stays inside its
own package, there is no import circle, and the serving side never imports training code. Every `import`
counts, the ones inside functions too: a lazy import hides a circle from Python, not from a reader.

The floors name packages (and the few top-level modules that must stay where they are), never a hand-kept list
of every module: a new module is checked by the package it lands in."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = "mlflow_finetune_plugin"
PACKAGES = (ROOT,)

# Top to bottom. A module may import its own package's modules and anything on a lower floor; nothing on its
# own floor outside its package, nothing above. Names are relative to mlflow_finetune_plugin.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    # the Train page: starts `mlflow run` like finetuning_api's runner, judges and chats like the rest
    ("studio",),
    # finetuning_api: OpenAI's jobs API runs `mlflow run` and serves the results;
    ("sweep", "finetuning_api", "monitor"),
    # monitor: served traffic read back, and --retrain runs `mlflow run`
    ("backend",),
    ("serving", "launchers", "memory"),  # memory: the plan the backend, the studio and `plan` call
    ("train",),
    ("distill",),  # a teacher's answers to the prompts, before the student trains (-e distill)
    ("evaluate",),
    ("registry",),
    ("chat_model", "reward_scorer"),  # the files logged models store; they import logged_model / reward_model
    ("reward_model",),  # a reward model as an MLflow model, over logged_model's layout and loading
    ("arena", "logged_model"),
    ("data",),
    ("config", "models"),
    ("tracking",),  # MLflow logging helpers over the tag names
    ("retriever",),  # the one BM25 index; it imports messages (the last user turn); logged models carry it
    ("errors", "tags", "paths", "messages", "stops", "metrics", "vllm_rules", "assets", "runtime"),
)
# The package's own __init__ (the version) sits below every floor.
TRAINING = (f"{ROOT}.train",)
SERVING_SIDE = (f"{ROOT}.serving",)
MAX_TOP_LEVEL_MODULES = 16
MAX_LINES = 500


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def package_modules() -> dict[str, Path]:
    """module name -> file, for every module of the package (a package by its __init__)."""
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, modules: dict, package: str) -> set[str]:
    """The package modules a file imports, lazy imports included (`from pkg import mod` names the module,
    `from mod import name` the module holding the name); `package` anchors its relative imports."""

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

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
    targets.discard(None)
    return targets


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (`imports_of`)."""
    modules = package_modules()
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        graph[module] = imports_of(path, modules, package) - {module}
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
    assert (
        "mlflow_finetune_plugin.logged_model" in graph["mlflow_finetune_plugin.serving.transformers_engine"]
    )
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_circle():
    found = cycles(import_graph())
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
            for target in graph[module] - seen:
                seen.add(target)
                via[target] = module
                todo.append(target)
    assert not problems, "the serving side reaches training code:\n" + "\n".join(problems)


def _room(module: str) -> str | None:
    """The floor entry a module belongs to: its first name under the package (None for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _floor_of(room: str | None) -> int:
    if room is None:
        return len(FLOORS)
    for i, rooms in enumerate(FLOORS):
        if room in rooms:
            return i
    raise AssertionError(f"{ROOT}.{room} is on no floor: add it to FLOORS in tests/test_layers.py and "
                         "docs/design.md")


def test_every_import_points_down_a_floor_or_stays_in_its_package():
    problems = []
    for module, targets in sorted(import_graph().items()):
        room = _room(module)
        for target in sorted(targets):
            other = _room(target)
            if other == room:
                continue
            if _floor_of(other) <= _floor_of(room):
                problems.append(f"{module} -> {target} (floor {_floor_of(room)} -> {_floor_of(other)})")
    assert not problems, "imports that point up or sideways:\n" + "\n".join(problems)


def test_the_floors_catch_an_import_that_points_up():
    assert _floor_of("registry") > _floor_of("evaluate") > _floor_of("train")
    assert _floor_of(None) == len(FLOORS)
    with __import__("pytest").raises(AssertionError, match="on no floor"):
        _floor_of("somewhere_new")


def test_few_modules_at_the_top_level_and_none_too_long():
    top = sorted(p.stem for p in (REPO / ROOT).glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at the top level: {top}"
    # Every top-level module is on a floor (or is the package's __init__).
    for stem in top:
        if stem != "__init__":
            _floor_of(stem)
    long = {str(path.relative_to(REPO)): n for path in (REPO / ROOT).rglob("*.py")
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_design_md_draws_every_floor_with_its_rooms():
    """docs/design.md's floor diagram is FLOORS drawn: floor N (its line starting with N, to the next floor's)
    names each room of FLOORS[N] (`name/`, `name.py`, or the bare name among the leaves)."""
    import re

    text = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    diagram = text.split("```\n floor ", 1)[1].split("```", 1)[0]
    floors, current = {}, None
    for line in diagram.splitlines():
        if m := re.match(r"^ {0,2}(\d+)\s{2}", line):
            current = int(m.group(1))
        if current is not None:
            floors[current] = floors.get(current, "") + line[:32] + "\n"  # the diagram's left column
    assert sorted(floors) == list(range(len(FLOORS))), (f"design.md's floors {sorted(floors)}, FLOORS has "
                                                        f"{len(FLOORS)}")
    missing = [f"floor {i}: {room}" for i, rooms in enumerate(FLOORS) for room in rooms
               if not re.search(rf"\b{room}(/|\.py|,|\s|$)", floors[i])]
    assert not missing, "rooms the design.md diagram leaves off (or puts on another floor): " + ", ".join(
        missing)
