"""The repository's top level holds what a newcomer expects and nothing committed by accident (a tool's wheel,
a lock file of the tracking store): the package, its Gradio app, recipes, tests, the docs and benchmarks, the
license and the changelog, packaging, the CPU constraints file and CI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {
    # the code, the app, the examples, the tests
    "mlflow_finetune_plugin", "gradio_app", "recipes", "tests",
    # the front door, the long read, the measurements
    "README.md", "docs", "bench", "LICENSE", "CHANGELOG.md",
    "pyproject.toml", "setup.cfg", "constraints-cpu.txt", ".ci", ".gitignore",  # packaging, install, CI
}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def tracked() -> set[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout (an unpacked sdist): the tracked files cannot be listed")
    return {line.split("/", 1)[0] for line in _git("ls-files").splitlines()}


def test_the_top_level_holds_only_what_a_newcomer_expects(tracked):
    assert tracked == EXPECTED, (f"unexpected at the top level: {sorted(tracked - EXPECTED)}; "
                                 f"missing: {sorted(EXPECTED - tracked)}")


def test_tool_wheels_and_the_tracking_stores_files_are_ignored(tracked):
    strays = ["ruff-0.17.6-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "mlflow.db",
              "mlflow.db.lock", "mlruns/0/meta.yaml"]
    # `git check-ignore` prints each ignored path it is given; exit status 1 means none was.
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", *strays],
                             capture_output=True, text=True).stdout.split()
    assert ignored == strays


def test_gradio_app_is_a_space_with_the_packages_requirements():
    """gradio_app/ deploys as a Hugging Face Space: a README header naming the Gradio SDK and app.py, and the
    requirements of the package it runs (setup.cfg's install_requires), which it copies beside app.py."""
    import configparser

    import yaml

    readme = (REPO / "gradio_app" / "README.md").read_text()
    _, header, _ = readme.split("---\n", 2)
    space = yaml.safe_load(header)
    assert space["sdk"] == "gradio" and space["app_file"] == "app.py" and (REPO / "gradio_app"
                                                                           / "app.py").is_file()
    import gradio

    assert space["sdk_version"].split(".")[0] == gradio.__version__.split(".")[0]
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    wanted = [line.strip() for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    listed = [line.strip() for line in (REPO / "gradio_app" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed == wanted


def test_the_readme_is_a_front_door():
    """At most 150 lines, the two commands first, measurements left to docs/ (every link it gives leads
    somewhere)."""
    import re

    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "mlflow run recipes/support-bot -e lora --backend finetune" in first_block
    assert "python -m pytest" in first_block
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert "docs/benchmarks.md" in targets
    assert [t for t in targets if not (REPO / t).exists()] == []
