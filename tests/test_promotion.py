"""Promotion: gates pass and fail, the alias moves or stays, forcing is recorded, refusals say what is
missing.

Versions here are registry entries over runs that hold the metrics a fine-tune's evaluation logs; the numbers
are chosen per test (the evaluation computing them is tested in test_evaluation.py).
"""

from __future__ import annotations

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.config.schema import Recipe, RegistryConfig
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.registry.promotion import Gate, maybe_auto_promote, parse_gate, promote
from mlflow_finetune_plugin.registry.versions import missing_lineage
from tests.helpers import MODEL_NAME, champion_version, register_eval_version

ROUGE = [Gate(metric="rougeL", beats=["base", "fewshot", "champion"], margin=0.01)]


def test_the_default_gates_ask_the_tuned_model_to_beat_retrieval_too(tracking_uri):
    assert RegistryConfig().promote_if[0].beats == ["base", "fewshot", "retrieval", "rag", "optimized",
                                                    "champion"]
    # Beats zero-shot and random shots, loses to retrieved shots: the alias stays. (Its run predates the
    # prompt search: the default gate passes over the optimized prompt and says so.)
    v = register_eval_version({"rougeL": 0.5}, retrieval={"rougeL": 0.6}, base={"rougeL": 0.2},
                              fewshot={"rougeL": 0.3})
    result = promote(MODEL_NAME, v)
    assert not result.promoted and champion_version() is None
    assert [(c.against, c.passed) for c in result.checks] == [("base", True), ("fewshot", True),
                                                               ("retrieval", False), ("rag", True),
                                                               ("optimized", True), ("champion", True),
                                                               ("verdict", True)]
    assert result.checks[3].note == "not scored in its run: its run retrieved from no documents"
    assert result.checks[4].note == "not scored in its run: its run did not run the prompt search"
    # a run from before verdicts: passed over
    assert result.checks[6].note == "no verdict recorded in its run"
    v2 = register_eval_version({"rougeL": 0.7}, retrieval={"rougeL": 0.6}, base={"rougeL": 0.2},
                               fewshot={"rougeL": 0.3})
    assert promote(MODEL_NAME, v2).promoted and champion_version() == v2
    # Without retrieval metrics (e.g. eval.retrieval_k: 0) the default gate cannot be checked.
    v3 = register_eval_version({"rougeL": 0.9}, base={"rougeL": 0.2}, fewshot={"rougeL": 0.3})
    with pytest.raises(FinetuneError, match="missing metric eval/retrieval/rougeL"):
        promote(MODEL_NAME, v3)


def _verdict_tags(paid_off: bool, best: str = "retrieval") -> dict:
    """A run's verdict tags as `verdict.conclude` sets them."""
    return {"finetune.verdict": f"fine-tuning {'paid off' if paid_off else 'did not pay off'}: ...",
            "finetune.verdict.paid_off": str(paid_off).lower(), "finetune.verdict.best_alternative": best}


def test_the_default_gate_follows_the_verdict_and_only_force_overrides_it(tracking_uri):
    # Above every prompt-only contender, so every comparison passes; but its run's verdict did not call it a
    # pay-off (the gain under eval.min_gain): it stays on @challenger.
    others = {"base": {"rougeL": 0.014}, "fewshot": {"rougeL": 0.015}, "retrieval": {"rougeL": 0.013}}
    v = register_eval_version({"rougeL": 0.041}, **others, run_tags=_verdict_tags(False, "fewshot"))
    run_id = MlflowClient().get_model_version(MODEL_NAME, v).run_id
    for key, value in {"margin": 0.0257, "margin_low": 0.0108, "margin_high": 0.0398,
                       "min_gain": 0.05}.items():
        MlflowClient().log_metric(run_id, f"eval/verdict/{key}", value)
    result = promote(MODEL_NAME, v)
    assert not result.promoted and champion_version() is None
    assert [(c.against, c.passed) for c in result.checks if not c.passed] == [("verdict", False)]
    verdict = result.checks[-1]
    assert (verdict.margin, verdict.tuned, verdict.other) == (0.05, 0.041, 0.015)
    assert verdict.note == ("not paid off over fewshot: margin +0.026, 95% interval +0.011 to +0.040, "
                            "eval.min_gain 0.05")
    assert "gates failed: @champion stays on nobody" in result.report()
    forced = promote(MODEL_NAME, v, force=True, reason="a demo of the pipeline", user="alice")
    assert forced.promoted and champion_version() == v
    assert MlflowClient().get_model_version(MODEL_NAME,
                                            v).tags["finetune.forced_gates_failed"] == "rougeL vs verdict"
    # A verdict of paid off passes it; a gate that names its own contenders is the user's word, without the
    # verdict.
    paid = register_eval_version({"rougeL": 0.9}, **others, run_tags=_verdict_tags(True))
    assert promote(MODEL_NAME, paid).promoted and champion_version() == paid
    named = register_eval_version({"rougeL": 0.95}, **others, run_tags=_verdict_tags(False))
    assert promote(MODEL_NAME, named, gates=[Gate(metric="rougeL", beats=["base", "champion"])]).promoted
    # A run with no comparison to make (no prompt-only contender scored) is passed over, with the verdict's
    # reason.
    alone = register_eval_version({"rougeL": 0.99}, run_tags={
        **_verdict_tags(False, "none"),
        "finetune.verdict": "no verdict: no prompt-only alternative was scored",
        "finetune.eval.contenders": "scored tuned; not base: a full fine-tune; not fewshot: a full "
                                    "fine-tune; not retrieval: a full fine-tune; not optimized: a full "
                                    "fine-tune"})
    result = promote(MODEL_NAME, alone)
    assert result.promoted, result.report()
    assert result.checks[-1].note == "passed over: no verdict: no prompt-only alternative was scored"


def test_a_version_that_retrieves_is_gated_on_its_answers_with_retrieval(tracking_uri):
    # A documents run: the logged model retrieves (finetune.served_as tuned-rag), so its RAG-side scores are
    # weighed, against RAG on the base model too; the closed-book `tuned` scores are not what it serves.
    def version(tuned_rag: float) -> str:
        why = "a documents recipe: its prompt-only contenders are zero-shot and RAG over the documents"
        v = register_eval_version({"rougeL": 0.3}, base={"rougeL": 0.1}, run_tags={
            "finetune.served_as": "tuned-rag",
            "finetune.eval.contenders": f"scored base, rag, tuned, tuned-rag; "
                                        f"not fewshot: {why}; not retrieval: {why}; not optimized: {why}"})
        run_id = MlflowClient().get_model_version(MODEL_NAME, v).run_id
        MlflowClient().log_metric(run_id, "eval/tuned-rag/rougeL", tuned_rag)
        MlflowClient().log_metric(run_id, "eval/rag/rougeL", 0.5)
        return v

    losing, winning = version(0.45), version(0.7)
    result = promote(MODEL_NAME, losing, gates=[Gate(metric="rougeL", beats=["base", "rag", "champion"])])
    assert not result.promoted and [(c.against, c.tuned, c.passed) for c in result.checks] == [
        ("base", 0.45, True), ("rag", 0.45, False), ("champion", 0.45, True)]
    assert promote(MODEL_NAME, winning).promoted and champion_version() == winning
    # the champion is weighed by its served answers too: 0.7, which a 0.65 challenger does not beat
    assert not promote(MODEL_NAME, version(0.65), gates=[Gate(metric="rougeL", beats=["champion"])]).promoted


def test_the_default_gate_asks_the_tuned_model_to_beat_the_optimized_prompt_when_its_run_scored_one(
        tracking_uri):
    others = {"base": {"rougeL": 0.2}, "fewshot": {"rougeL": 0.3}, "retrieval": {"rougeL": 0.4}}
    # The optimized prompt scored above the tuned model: the default gate fails on it.
    v = register_eval_version({"rougeL": 0.5}, optimized={"rougeL": 0.55}, **others)
    result = promote(MODEL_NAME, v)
    assert not result.promoted and [(c.against, c.passed) for c in result.checks if not c.passed] == [
        ("optimized", False)]
    # A run that skipped the search says why (its contenders tag): the default gate passes over it with that
    # reason, and a gate that names `optimized` itself refuses to decide without it.
    why = "too few train rows for a dev split: 5 with an answer, at least 8 needed; raise it"
    skipped = register_eval_version({"rougeL": 0.5}, **others, run_tags={
        "finetune.eval.contenders": f"scored base, fewshot, retrieval, tuned; not optimized: {why}"})
    result = promote(MODEL_NAME, skipped)
    assert result.promoted and f"not scored in its run: {why}" in result.report()
    with pytest.raises(FinetuneError, match="missing metric eval/optimized/rougeL"):
        promote(MODEL_NAME, skipped, "other", [Gate(metric="rougeL", beats=["optimized"])])
    # Few-shot switched off (eval.fewshot_k: 0): passed over the same way, by the default gate only.
    no_shots = register_eval_version({"rougeL": 0.6}, base={"rougeL": 0.2}, retrieval={"rougeL": 0.4},
                                     run_tags={
                                         "finetune.eval.contenders": "scored base, retrieval, tuned; not "
                                                                     "fewshot: eval.fewshot_k is 0; not "
                                                                     "optimized: left out by "
                                                                     "eval.contenders"})
    result = promote(MODEL_NAME, no_shots)
    assert result.promoted and [c.note for c in result.checks if c.against in ("fewshot", "optimized")] == [
        "not scored in its run: eval.fewshot_k is 0", "not scored in its run: left out by eval.contenders"]


def test_gates_pass_and_the_alias_moves_with_no_champion_yet(tracking_uri):
    v = register_eval_version({"rougeL": 0.5}, base={"rougeL": 0.2}, fewshot={"rougeL": 0.3})
    result = promote(MODEL_NAME, v, "champion", ROUGE)
    assert result.promoted and champion_version() == v
    assert "no @champion yet" in result.report()
    tags = MlflowClient().get_model_version(MODEL_NAME, v).tags
    assert tags["finetune.promoted_alias"] == "champion" and tags["finetune.promoted_by"]
    assert "finetune.forced_by" not in tags


def test_a_gate_below_its_margin_fails_and_the_alias_stays(tracking_uri):
    v1 = register_eval_version({"rougeL": 0.5}, base={"rougeL": 0.2}, fewshot={"rougeL": 0.3})
    promote(MODEL_NAME, v1, "champion", ROUGE)
    # Beats base and few-shot, but the champion by less than the margin.
    v2 = register_eval_version({"rougeL": 0.505}, base={"rougeL": 0.2}, fewshot={"rougeL": 0.3})
    result = promote(MODEL_NAME, v2, "champion", ROUGE)
    assert not result.promoted and not result.passed and champion_version() == v1
    failed = [c for c in result.checks if not c.passed]
    assert [(c.against, c.other) for c in failed] == [("champion", 0.5)]
    assert "stays on v1" in result.report()
    # And one that beats the champion by the margin takes the alias.
    v3 = register_eval_version({"rougeL": 0.52}, base={"rougeL": 0.2}, fewshot={"rougeL": 0.3})
    result = promote(MODEL_NAME, v3, "champion", ROUGE)
    assert result.promoted and result.previous == v1 and champion_version() == v3


def test_lower_is_better_for_loss(tracking_uri):
    v = register_eval_version({"loss": 1.0}, base={"loss": 2.0})
    assert promote(MODEL_NAME, v, "champion", [parse_gate("loss:0:base")]).promoted
    worse = register_eval_version({"loss": 3.0}, base={"loss": 2.0})
    result = promote(MODEL_NAME, worse, "champion", [parse_gate("loss:0:base")])
    assert not result.promoted and result.checks[0].mode == "min"


def test_missing_metrics_are_refused_with_what_is_missing(tracking_uri):
    v = register_eval_version({"rougeL": 0.5}, base={"rougeL": 0.2})  # no few-shot metrics
    with pytest.raises(FinetuneError, match="missing metric eval/fewshot/rougeL") as err:
        promote(MODEL_NAME, v, "champion", ROUGE)
    assert "--force" in str(err.value) and champion_version() is None


def test_missing_lineage_is_refused(tracking_uri):
    v = register_eval_version({"rougeL": 0.5}, base={"rougeL": 0.2}, fewshot={"rougeL": 0.3}, lineage=False)
    assert "finetune.dataset_digest" in missing_lineage(MlflowClient().get_model_version(MODEL_NAME, v))
    with pytest.raises(FinetuneError, match="missing lineage tag finetune.recipe_hash"):
        promote(MODEL_NAME, v, "champion", ROUGE)


def test_force_needs_a_reason_and_records_who_when_why(tracking_uri):
    v = register_eval_version({"rougeL": 0.1}, base={"rougeL": 0.2})
    with pytest.raises(FinetuneError, match="--reason"):
        promote(MODEL_NAME, v, "champion", ROUGE, force=True)
    result = promote(MODEL_NAME, v, "champion", ROUGE, force=True, reason="hotfix for ticket 42",
                     user="alice")
    assert result.promoted and result.forced and champion_version() == v
    tags = MlflowClient().get_model_version(MODEL_NAME, v).tags
    assert tags["finetune.forced_by"] == "alice" and tags["finetune.forced_reason"] == "hotfix for ticket 42"
    assert tags["finetune.forced_at"].startswith("20") and ("rougeL vs "
                                                            "base") in tags["finetune.forced_gates_failed"]


def test_gates_come_from_the_recipe_of_the_source_run(tracking_uri):
    recipe = {"registry": {"champion_alias": "prod", "promote_if": [{"metric": "token_f1",
                                                                     "beats": ["base"]}]}}
    v = register_eval_version({"token_f1": 0.4}, base={"token_f1": 0.5}, recipe=recipe)
    result = promote(MODEL_NAME, v)
    assert result.alias == "prod" and [c.metric
                                       for c in result.checks] == ["token_f1"] and not result.promoted


def test_parse_gate():
    assert parse_gate("rougeL:0.01") == Gate(metric="rougeL", margin=0.01)
    assert parse_gate("loss").beats == ["base", "fewshot", "retrieval", "rag", "optimized", "champion"]
    assert parse_gate("token_f1:0:base,@prod,3").beats == ["base", "@prod", "3"]
    for bad in ("", "rougeL:x", "a:1:b:c", "rougeL:-1"):
        with pytest.raises(FinetuneError, match="--gate"):
            parse_gate(bad)


def test_auto_promote(tracking_uri):
    recipe = Recipe.model_validate({"registry": {"auto_promote": False}})
    v = register_eval_version({"rougeL": 0.5}, retrieval={"rougeL": 0.4}, base={"rougeL": 0.2},
                              fewshot={"rougeL": 0.3})
    assert maybe_auto_promote(MODEL_NAME, v, recipe) is None and champion_version() is None

    recipe.registry.auto_promote = True
    assert maybe_auto_promote(MODEL_NAME, v, recipe).promoted and champion_version() == v
    # A refusal (missing metrics) is reported, never raised: the run's work is done.
    v2 = register_eval_version({"rougeL": 0.9})
    with mlflow.start_run() as run:
        result = maybe_auto_promote(MODEL_NAME, v2, recipe)
    assert not result.promoted and "missing metric" in result.message and champion_version() == v
    assert MlflowClient().get_run(run.info.run_id).data.tags["finetune.auto_promoted"] == "false"


def test_cli_promote_and_models(tracking_uri):
    runner = CliRunner()
    v1 = register_eval_version({"rougeL": 0.5, "loss": 1.5}, retrieval={"rougeL": 0.4}, base={"rougeL": 0.2},
                               fewshot={"rougeL": 0.3})
    out = runner.invoke(main, ["promote", MODEL_NAME, "--version", v1, "--gate", "rougeL:0.01"])
    assert out.exit_code == 0, out.output
    assert "pass" in out.output and "moved from nobody to v1" in out.output

    v2 = register_eval_version({"rougeL": 0.4}, retrieval={"rougeL": 0.35}, base={"rougeL": 0.2},
                               fewshot={"rougeL": 0.3})
    out = runner.invoke(main, ["promote", MODEL_NAME, "--version", v2, "--gate", "rougeL:0.01"])
    assert out.exit_code == 1 and "FAIL" in out.output and champion_version() == v1

    out = runner.invoke(main, ["promote", MODEL_NAME, "--version", v2, "--gate", "rougeL", "--force"])
    assert out.exit_code == 1 and "--reason" in out.output
    out = runner.invoke(main, ["promote", MODEL_NAME, "--version", v2, "--gate", "rougeL", "--force",
                               "--reason", "rollback test"])
    assert out.exit_code == 0 and "FORCED" in out.output and champion_version() == v2

    out = runner.invoke(main, ["models", MODEL_NAME])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["version", "aliases", "method", "base", "rougeL", "token_f1", "exact_match",
                                "loss", "run"]
    assert "0.5000" in lines[2] and "1.5000" in lines[2] and "@champion" in lines[3]

    out = runner.invoke(main, ["models", "nope"])
    assert out.exit_code == 1 and "no registered model named 'nope'" in out.output
