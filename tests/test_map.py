"""tests/README.md's map of the tests, checked against the source: for each package of mlflow_finetune_plugin,
the test files that import it; and for each module no test imports, the named test that reaches it, through
the modules a test imports or through a subprocess (`mlflow run`, the console script, a server) that runs it.

`python -m tests.test_map` rewrites the two tables between their markers; the test fails when the file
differs, or when a module is reached by no test at all. Everything is read from the code as text (ast),
nothing is imported."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.test_layers import imports_of, package_modules

REPO = Path(__file__).resolve().parents[1]
ROOT = "mlflow_finetune_plugin"
README = REPO / "tests" / "README.md"
BEGIN, END = "<!-- test-map: python -m tests.test_map -->", "<!-- /test-map -->"

# Modules that run only in a process a test starts (MLflow's plugin entry point, the console script, `python
# -m`, a stored model's loader, a server) or that are loaded by their file path (the metric scripts
# `evaluate.load` reads), so no import chain from a test reaches them: the test that drives each one.
SUBPROCESS = {
    "train.__main__": ("tests/test_launchers.py", f"`python -m {ROOT}.train --help`"),
    "train.warm": ("tests/test_integration.py",
                   "`mlflow run --backend finetune`: the local launcher's warm training "
                   "process"), "train.objectives.dpo": ("tests/test_objectives.py",
                                                        "the objective registry's `import_module` "
                                                        "(recipe.objective)"),
    "train.objectives.kto": ("tests/test_objectives.py",
                             "the objective registry's `import_module` (recipe.objective)"),
    "train.objectives.orpo": ("tests/test_objectives.py",
                              "the objective registry's `import_module` (recipe.objective)"),
    "train.objectives.simpo": ("tests/test_objectives.py",
                               "the objective registry's `import_module` (recipe.objective)"),
    "train.objectives.reward": ("tests/test_rlhf.py",
                                "the objective registry's `import_module` (recipe.objective)"),
    "launchers.quiet_torchrun": ("tests/test_launchers.py",
                                 "the torchrun launcher's command (`python -m ...`)"),
    "launchers.supervise": ("tests/test_launchers.py",
                            "a detached run's supervisor process (`python -m ...`)"),
    "registry.llama_cpp_convert": ("tests/test_gguf.py",
                                   "`export --gguf` runs the file in a process of its own"),
    "serving.transformers_cli": ("tests/test_serving.py",
                                 "`serve --engine transformers` starts it (`python -m ...`)"),
    "serving.vllm_cli": ("tests/test_vllm.py", "`serve --engine vllm` starts it (`python -m ...`)"),
    "chat_model": ("tests/test_logged_model.py",
                   "the logged chat model's code file, loaded by `mlflow.pyfunc`"),
    "reward_scorer": ("tests/test_rlhf.py", "the logged reward model's code file, loaded by `mlflow.pyfunc`"),
    **{f"assets.metrics.{m}.{m}": ("tests/test_evaluation.py",
                                   "a metric script `evaluate.load` reads by path")
       for m in ("bleu", "chrf", "exact_match", "json_valid", "rouge", "token_f1")},
}


def _short(module: str) -> str:
    return module[len(ROOT) + 1:] if module != ROOT else ROOT


def _room(module: str) -> str:
    parts = _short(module).split(".")
    return parts[0] if module != ROOT else "(the package)"


def survey():
    """(test file -> package modules it imports, module -> modules it imports)."""
    modules = package_modules()
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        graph[module] = imports_of(path, modules, package) - {module}
    tests = {}
    for path in sorted((REPO / "tests").glob("*.py")):
        tests[f"tests/{path.name}"] = imports_of(path, modules, "tests")
    return tests, graph


def _with_helpers(tests: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each test file's imports, plus those of the shared helper modules (tests/helpers.py, ...) it
    imports."""
    helpers = {name: imported for name, imported in tests.items() if not Path(name).name.startswith("test_")}
    out = {}
    for name, imported in tests.items():
        if Path(name).name.startswith("test_"):
            text = (REPO / name).read_text(encoding="utf-8")
            out[name] = imported.union(*(h for helper,
                                         h in helpers.items() if f"tests.{Path(helper).stem}" in text))
    return out


def _reach(start: set[str], graph) -> dict[str, str]:
    """module -> the module that imports it on a shortest chain from `start`."""
    via = {m: "" for m in start}
    todo = sorted(start)
    while todo:
        nxt = []
        for module in todo:
            parents = {module.rsplit(".", i)[0] for i in range(1, module.count("."))}  # run by the import
            for target in sorted(graph.get(module, set()) | parents):
                if target not in via:
                    via[target] = module
                    nxt.append(target)
        todo = nxt
    return via


def tables() -> str:
    files, graph = survey()
    tests = _with_helpers(files)
    direct: dict[str, set[str]] = {}
    for name, imported in files.items():
        if not Path(name).name.startswith("test_"):
            continue
        for module in imported:
            direct.setdefault(module, set()).add(name)
    rooms: dict[str, set[str]] = {}
    for module in graph:
        rooms.setdefault(_room(module), set()).update(direct.get(module, ()))
    lines = ["| package or module | test files whose own imports name it |", "|---|---|"]
    for room in sorted(rooms):
        names = ", ".join(f"`{Path(t).name}`" for t in sorted(rooms[room])) or "(none: see below)"
        lines.append(f"| `{room}` | {names} |")
    lines += ["", "Modules no test imports, and the test that drives each:", "",
              "| module | driven by | how |", "|---|---|---|"]
    reached = set(direct)
    for module in direct:  # importing a module runs its packages' __init__
        reached.update(module.rsplit(".", i)[0] for i in range(1, module.count(".")))
    for module in sorted(m for m in graph if m not in reached):
        short = _short(module)
        if short in SUBPROCESS:
            test, how = SUBPROCESS[short]
            lines.append(f"| `{short}` | `{Path(test).name}` | {how} |")
            continue
        best = None
        for name in sorted(tests):
            via = _reach(tests[name], graph)
            if module in via:
                chain, step = [], module
                while step:
                    chain.append(_short(step))
                    step = via[step]
                if best is None or len(chain) < len(best[1]):
                    best = (name, chain)
        if best is None:
            lines.append(f"| `{short}` | **no test** | |")
        else:
            lines.append(f"| `{short}` | `{Path(best[0]).name}` | imported through "
                         + " <- ".join(f"`{c}`" for c in best[1][1:]) + " |")
    return "\n".join(lines) + "\n"


def _current() -> str:
    text = README.read_text(encoding="utf-8")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].lstrip("\n")


def write() -> None:
    text = README.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    README.write_text(f"{head}{BEGIN}\n{tables()}{END}{rest.split(END, 1)[1]}", encoding="utf-8")


def test_every_module_is_driven_by_a_named_test():
    missing = [line for line in tables().splitlines() if "**no test**" in line]
    assert not missing, ("modules no test reaches (import one in a test, or add it to SUBPROCESS in "
                         "tests/test_map.py with the test that runs it):\n" + "\n".join(missing))


def test_the_subprocess_list_names_real_modules_and_tests():
    modules = {_short(m) for m in package_modules()}
    for module, (test, _) in SUBPROCESS.items():
        assert module in modules, f"SUBPROCESS names {module}, which is not a module of {ROOT}"
        assert (REPO / test).is_file(), f"SUBPROCESS names {test}, which does not exist"


def test_the_readme_map_is_current():
    assert _current() == tables(), "tests/README.md's map is stale: run `python -m tests.test_map`"


if __name__ == "__main__":
    write()
    sys.exit(0)
