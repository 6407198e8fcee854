"""No network call unless asked: where litellm is installed (the `dspy` extra, and the vLLM + DSPy environment
of CI), litellm fetches its model cost map from the internet when it is imported (three attempts, then its
bundled copy). The plugin's processes tell it to use the bundled copy (LITELLM_LOCAL_MODEL_COST_MAP, set in
the package's __init__ and inherited by what it starts), so a run prints no fetch attempt.

Skipped where litellm is not installed: README command 2's environment has none; CI runs this file in its
vLLM + DSPy environment (`-m requires_dspy`), where the `dspy` extra brings litellm."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import FAST_OVERRIDES, SUPPORT_BOT

if not os.environ.get("FINETUNE_REQUIRE_DSPY"):  # CI's DSPy environment fails here instead of skipping
    pytest.importorskip("litellm", reason="litellm is not installed (pip install -e '.[dspy]' brings it)")
pytestmark = pytest.mark.requires_dspy  # selected by CI's vLLM + DSPy run (.ci/run)

VARIABLE = "LITELLM_LOCAL_MODEL_COST_MAP"
FETCH = "model cost map"  # litellm's words for each fetch attempt ("... fetch attempt 1/3 ...")


def _env_without_the_variable(**extra) -> dict:
    """This process's environment without the variable (the package's import set it here too): what a
    user's shell gives a command."""
    left_out = (VARIABLE, "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")
    env = {k: v for k, v in os.environ.items() if k not in left_out}
    return {**env, **extra}


def test_importing_the_package_makes_litellm_load_its_bundled_cost_map():
    code = ("import mlflow_finetune_plugin, litellm, os\n"
            "from litellm.litellm_core_utils.get_model_cost_map import _cost_map_source_info as info\n"
            f"print(os.environ['{VARIABLE}'], info.source, info.is_env_forced, "
            "len(litellm.model_cost) > 100)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=_env_without_the_variable())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "local", "True", "True"]
    assert FETCH not in proc.stderr


def test_a_user_who_sets_the_variable_keeps_their_choice():
    code = f"import mlflow_finetune_plugin, os; print(os.environ['{VARIABLE}'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=_env_without_the_variable(**{VARIABLE: "False"}))
    assert proc.stdout.split() == ["False"]


@pytest.mark.integration
def test_a_tiny_mlflow_run_prints_no_cost_map_fetch(tmp_path):
    overrides = [arg for key, value in {**FAST_OVERRIDES, "eval.traces": True}.items()
                 for arg in ("-P", f"{key}={value}")]
    env = _env_without_the_variable(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                    PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "mlflow", "run", str(SUPPORT_BOT), "-e", "lora", "--backend", "finetune",
           "-P", "model=tiny", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Registered support-bot version 1" in output
    assert [line for line in output.splitlines() if FETCH in line] == []
