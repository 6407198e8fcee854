"""The retrieval contender's shots and the verdict.

Retrieval: BM25 over the user turns picks the nearest train conversations, most similar first, and never one
whose user turns are the eval question itself. The verdict: a paired bootstrap over the held-out examples
calls a fine-tune a pay-off only when the tuned model beats the best prompt-only alternative by more than the
evaluation's noise and by at least `eval.min_gain`; it is decided here on per-example scores that the shipped
metrics compute from real answers, on the recorded scores of two real runs
(tests/fixtures/verdict_scores.json: the README's smollm2 run and a 10-step run of the random tiny model), and
read back from a real sqlite store. A real tiny run's tags are checked in test_model_card.py (its card shows
the verdict too).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.config.schema import EvalConfig, LoraAdapter, RegistryConfig
from mlflow_finetune_plugin.errors import RecipeError
from mlflow_finetune_plugin.evaluate.contenders import run_evaluation
from mlflow_finetune_plugin.evaluate.report import EvalResult, add_answers, log_evaluation, table_rows
from mlflow_finetune_plugin.evaluate.retrieval import nearest_shots, user_text
from mlflow_finetune_plugin.evaluate.verdict import (
    MIN_EXAMPLES,
    conclude,
    decide,
    min_gain_for,
    paired_bootstrap,
    per_example_scores,
    primary_metric,
)
from mlflow_finetune_plugin.metrics import DEFAULT_MIN_GAIN, score
from mlflow_finetune_plugin.train.adapters import lora
from tests.helpers import SUPPORT_BOT

Gate = RegistryConfig.Gate


def _conv(question: str, answer: str, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


TRAIN = [
    _conv("How do I reset my password?", "Settings, Security, Reset password."),
    _conv("Where can I download my invoices?", "Billing, Invoices, Download."),
    _conv("Can I export notes to PDF?", "Yes: File, Export, PDF.", system="You are Nimbus support."),
    _conv("The password reset link expired, what now?", "Ask the login page for a new link."),
    _conv("Is there a dark theme?", "Yes: Settings, Appearance, Dark."),
]


# --- retrieval
# ---------------------------------------------------------------------------------------------------


def test_retrieval_shots_are_the_nearest_train_conversations_most_similar_first():
    questions = [[{"role": "user", "content": "My password reset link has expired"}],
                 [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "export a PDF of my notes"}]]
    shots = nearest_shots(TRAIN, questions, k=2)
    # Three words in common, then two; the system message (the shot's or the question's) is not compared.
    assert shots[0] == [TRAIN[3], TRAIN[0]]
    assert shots[1][0] == TRAIN[2]
    assert user_text(TRAIN[2]) == "Can I export notes to PDF?"


def test_retrieval_never_gives_the_eval_question_its_own_row():
    question = [{"role": "user", "content": "how do I   reset my PASSWORD?"}]
    duplicate = _conv("How do I reset my password?", "the answer itself")
    shots = nearest_shots([duplicate, *TRAIN], [question], k=len(TRAIN) + 1)[0]
    # The same question up to case and spacing, twice in train (a copy across the splits): neither is a shot.
    assert duplicate not in shots and TRAIN[0] not in shots
    assert shots[0] == TRAIN[3] and len(shots) == len(TRAIN) - 1
    # k = 0 skips; rows without an answer are never shots; no words in common still fills k, in file order.
    assert nearest_shots(TRAIN, [question], k=0) == [[]]
    assert nearest_shots([[{"role": "user", "content": "reset password"}]], [question], k=2) == [[]]
    assert nearest_shots(TRAIN, [[{"role": "user", "content": "zzz"}]], k=2) == [TRAIN[:2]]


@pytest.fixture(scope="module")
def tiny_lora(tiny_model_dir):
    torch.manual_seed(0)
    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       LoraAdapter(r=4, alpha=8, dropout=0.0))
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_the_retrieval_contender_of_a_real_evaluation_leaves_the_question_out(tiny_lora):
    model, tok = tiny_lora
    evals = [_conv("How do I reset my password?", "Settings."), _conv("Is there a dark theme?", "Yes.")]
    cfg = EvalConfig(max_examples=2, max_new_tokens=3, fewshot_k=1, retrieval_k=2)
    result = run_evaluation(model, tok, evals, TRAIN, cfg)
    assert result.contenders == ["base", "fewshot", "retrieval", "tuned"]
    # The train rows holding the eval questions are skipped; the next nearest come first.
    assert result.retrieval_shots[0][0] == TRAIN[3] and TRAIN[0] not in result.retrieval_shots[0]
    assert TRAIN[4] not in result.retrieval_shots[1] and len(result.retrieval_shots[1]) == 2
    assert "eval/retrieval/rougeL" in result.metrics
    # retrieval_k 0 drops the contender, whatever fewshot_k says.
    none = run_evaluation(model, tok, evals, TRAIN, EvalConfig(max_examples=1, max_new_tokens=2,
                                                               retrieval_k=0))
    assert none.contenders == ["base", "fewshot", "tuned"] and none.retrieval_shots == []


# --- the verdict
# -------------------------------------------------------------------------------------------------

REFERENCES = [f"Open the {w} page, then choose {v}." for w, v in
              zip(
                  "billing account security notes export sync theme devices sharing backup trash "
                  "search".split(),
                  "invoices email password folders pdf now dark remove invite restore empty filters".split())]

# Per-example rougeL of two real runs of the support-bot recipe (where and when: the file's `about`).
RECORDED = json.loads((Path(__file__).parent / "fixtures" / "verdict_scores.json").read_text())
TINY, SMOLLM2 = RECORDED["support-bot tiny 10 steps"]["rougeL"], RECORDED["support-bot smollm2"]["rougeL"]


def _partial() -> list[str]:
    """The first 2 to 6 words of each reference: answers half right, by varying amounts."""
    return [" ".join(r.split()[: 2 + i % 5]) for i, r in enumerate(REFERENCES)]


def _rougeL(answers: list[str]) -> list[float]:
    return score(answers, REFERENCES)[1]["rougeL"]


def _alternatives() -> dict[str, list[float]]:
    """Real rougeL per example of three prompt-only answer sets: none right, a little right, half right."""
    return {"base": _rougeL(["I do not know."] * len(REFERENCES)),
            "fewshot": _rougeL(["Open the app."] * len(REFERENCES)),
            "retrieval": _rougeL(_partial())}


def test_a_tuned_model_clearly_better_than_every_alternative_paid_off():
    scores = {**_alternatives(), "tuned": _rougeL(REFERENCES)}
    verdict = decide(scores, "rougeL", ppl_ratio=1.08)
    assert verdict.paid_off and verdict.best_alternative == "retrieval" and verdict.n == len(REFERENCES)
    assert verdict.tuned == pytest.approx(1.0) and 0 < verdict.low < verdict.margin < verdict.high
    assert verdict.alternative == pytest.approx(score(_partial(), REFERENCES)[0]["rougeL"])
    assert verdict.sentence() == (
        f"fine-tuning paid off: rougeL {verdict.margin:+.2f} over retrieval prompting "
        f"({verdict.alternative:.2f}); general-text perplexity x1.08")
    assert verdict.as_tags() == {tags.VERDICT: verdict.sentence(), tags.VERDICT_BEST_ALTERNATIVE: "retrieval",
                                 tags.VERDICT_PAID_OFF: "true", tags.VERDICT_DEPLOY: "tuned"}


def test_a_margin_within_the_noise_is_not_a_pay_off():
    retrieval = _partial()
    # Better than retrieval on three questions, worse on three, the same on the rest: a mean margin near 0.
    tuned = [REFERENCES[i] if i < 3 else "No." if i < 6 else retrieval[i] for i in range(len(REFERENCES))]
    verdict = decide({**_alternatives(), "tuned": _rougeL(tuned)}, "rougeL")
    assert not verdict.paid_off and verdict.best_alternative == "retrieval"
    assert verdict.low < 0 < verdict.high
    assert "did not pay off" in verdict.sentence() and ("not above the evaluation's "
                                                        "noise") in verdict.sentence()


def test_a_run_that_barely_trained_is_never_a_pay_off():
    # It answers as its base does: behind retrieval, and level with the base pair by pair.
    verdict = decide({**_alternatives(), "tuned": _rougeL(["I do not know."] * len(REFERENCES))}, "rougeL")
    assert not verdict.paid_off and verdict.margin < 0
    level = decide({"base": _alternatives()["retrieval"], "tuned": _alternatives()["retrieval"]}, "rougeL")
    assert (level.low, level.high, level.paid_off) == (0.0, 0.0, False)
    # Perfect answers on too few examples: the bootstrap has nothing to resample; no pay-off either.
    few = decide({"base": [0.0, 0.0, 0.0], "tuned": [1.0, 1.0, 1.0]}, "rougeL")
    assert few.n < MIN_EXAMPLES and not few.paid_off and "too few to tell" in few.sentence()


def test_the_bootstrap_is_seeded_and_brackets_the_mean():
    tuned, other = _rougeL(REFERENCES), _alternatives()["retrieval"]
    low, high = paired_bootstrap(tuned, other)
    mean = sum(t - o for t, o in zip(tuned, other)) / len(tuned)
    assert low < mean < high and paired_bootstrap(tuned, other) == (low, high)
    assert paired_bootstrap(tuned, other, seed=1) != (low, high)


def test_the_primary_metric_follows_the_gates_then_a_fixed_order():
    scores = {"tuned": {"rougeL": [1.0], "token_f1": [1.0]}, "base": {"rougeL": [0.0], "token_f1": [0.0]}}
    assert primary_metric([Gate(metric="token_f1", beats=["base"])], scores) == "token_f1"
    # A limit gate and a metric without per-example scores (loss) do not name it.
    gates = [Gate(metric="forgetting/ppl_ratio", at_most=1.2), Gate(metric="loss")]
    assert primary_metric(gates, scores) == "rougeL"
    assert primary_metric(None, {"tuned": {"reward": [0.5]}}) == "reward"  # GRPO without references
    assert primary_metric(None, {}) is None


def test_no_alternative_or_no_evaluation_gives_no_verdict():
    alone = decide({"tuned": [1.0] * 12}, "rougeL")
    assert not alone.paid_off and alone.best_alternative == "none"
    assert alone.sentence().startswith("no verdict: no prompt-only alternative was scored")


def _logged_evaluation(tuned: list[str]) -> EvalResult:
    """An evaluation result as run_evaluation builds it (table rows, answers, per-example scores), from
    answers."""
    prompts = [[{"role": "user", "content": f"Where do I find {r.split()[2]}?"}] for r in REFERENCES]
    rows = table_rows(list(zip(prompts, REFERENCES)))
    metrics: dict[str, float] = {"eval/n_examples": float(len(REFERENCES))}
    answers = {"base": ["I do not know."] * len(REFERENCES), "fewshot": ["Open the app."] * len(REFERENCES),
               "retrieval": _partial(), "tuned": tuned}
    for name, texts in answers.items():
        totals, per_example = score(texts, REFERENCES)
        metrics.update({f"eval/{name}/{k}": v for k, v in totals.items()})
        add_answers(rows, name, texts, per_example)
    return EvalResult(metrics, rows, list(answers))


def test_conclude_reads_the_logged_scores_and_tags_the_run(tracking_uri):
    result = _logged_evaluation(REFERENCES)
    assert per_example_scores(result.rows)["tuned"]["rougeL"] == pytest.approx([1.0] * len(REFERENCES))
    with mlflow.start_run() as run:
        log_evaluation(result)
        mlflow.log_metric("eval/forgetting/ppl_ratio", 1.1)
    verdict = conclude(run.info.run_id, RegistryConfig().promote_if)
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data
    assert (
        logged.tags[tags.VERDICT_PAID_OFF] == "true"
        and logged.tags[tags.VERDICT_BEST_ALTERNATIVE] == "retrieval"
    )
    assert logged.tags[tags.VERDICT] == verdict.sentence()
    assert verdict.sentence().startswith("fine-tuning paid off: rougeL +")
    assert verdict.sentence().endswith("general-text perplexity x1.10")
    assert logged.metrics["eval/verdict/margin_low"] == pytest.approx(verdict.low) and verdict.low > 0

    with mlflow.start_run() as empty:  # nothing evaluated: still a verdict, never a pay-off
        pass
    conclude(empty.info.run_id)
    logged = mlflow.MlflowClient().get_run(empty.info.run_id).data.tags
    assert logged[tags.VERDICT_PAID_OFF] == "false" and logged[tags.VERDICT_BEST_ALTERNATIVE] == "none"
    assert logged[tags.VERDICT].startswith("no verdict: nothing was evaluated")

    # The 10-step tiny run's recorded scores, what it logged of its costs: keep the registered prompt.
    scores = {c: {"rougeL": v} for c, v in TINY.items()}
    # as the run logged them
    costs = {"fewshot": (197.5, 0.020), "optimized": (46.5, 0.011), "tuned": (46.5, 0.012)}
    with mlflow.start_run() as tiny:
        for contender, (tokens, seconds) in costs.items():
            mlflow.log_metrics({f"eval/{contender}/prompt_tokens": tokens,
                                f"eval/{contender}/latency_s": seconds})
    run_id = tiny.info.run_id

    verdict = conclude(run_id, RegistryConfig().promote_if, scores, registered="support-bot")
    logged = mlflow.MlflowClient().get_run(run_id).data
    assert logged.tags[tags.VERDICT] == verdict.sentence() and logged.tags[tags.VERDICT_DEPLOY] == "optimized"
    assert logged.metrics["eval/verdict/min_gain"] == 0.05
    assert verdict.sentence().endswith(
        "at 46 prompt tokens an answer against the tuned model's 46, 0.011 s against "
        "0.012 s; it is registered as prompts:/support-bot-prompt@candidate")
    # Concluded again (as `mlflow-finetune evaluate --run-id` does) without the optimized prompt: keep
    # few-shot.
    without = {c: v for c, v in scores.items() if c != "optimized"}
    verdict = conclude(run_id, None, without, min_gain=0.05)
    assert verdict.sentence().endswith(
        "keep few-shot prompting, which needs no fine-tuned model to keep: at 198 "
        "prompt tokens an answer against the tuned model's 46, 0.020 s against 0.012 s")
    # The recipe's eval.min_gain decides: 0 asks only for the noise, and the same scores pay off.
    assert conclude(run_id, None, without, min_gain=0).paid_off
    assert mlflow.MlflowClient().get_run(run_id).data.tags[tags.VERDICT_DEPLOY] == "tuned"


# --- the least gain that matters (eval.min_gain)
# -----------------------------------------------------------------


def test_ten_steps_of_the_random_tiny_model_are_no_pay_off_and_the_optimized_prompt_is_kept():
    # Better than few-shot beyond the noise, which is all the verdict asked before eval.min_gain, by a
    # noise-level +0.03 on answers that are noise themselves (rougeL 0.04).
    assert decide(TINY, "rougeL", min_gain=0).paid_off
    verdict = decide(TINY, "rougeL")
    assert not verdict.paid_off and verdict.min_gain == DEFAULT_MIN_GAIN == 0.05
    assert verdict.best_alternative == "fewshot" and 0 < verdict.low < verdict.margin < verdict.high < 0.05
    said = verdict.sentence()
    assert said.startswith(
        "fine-tuning did not pay off: rougeL +0.03 over few-shot prompting (0.01), above the "
        "evaluation's noise but under the least gain that matters (eval.min_gain 0.05; 95% "
        "interval +0.01 to +0.04 over 30 examples): the two are equivalent; keep the prompt: ")
    # The optimized prompt is within the gain too: keep it, not the tuned model.
    assert verdict.keep_prompt and verdict.deploy == "optimized"
    assert "the optimized prompt is within eval.min_gain of the tuned model (rougeL 0.01 vs 0.04;" in said
    assert {
        k: verdict.as_tags()[k]
        for k in (tags.VERDICT_PAID_OFF, tags.VERDICT_KEEP_PROMPT, tags.VERDICT_DEPLOY)
    } == {tags.VERDICT_PAID_OFF: "false", tags.VERDICT_KEEP_PROMPT: "true", tags.VERDICT_DEPLOY: "optimized"}
    # No optimized prompt scored: keep the best prompt-only contender.
    without = decide({c: v for c, v in TINY.items() if c != "optimized"}, "rougeL")
    assert (
        without.deploy == "fewshot"
        and not without.keep_prompt
        and tags.VERDICT_KEEP_PROMPT not in without.as_tags()
    )
    assert without.sentence().endswith(
        "the two are equivalent; keep few-shot prompting, which needs no fine-tuned "
        "model to keep")


def test_the_readme_run_on_smollm2_still_paid_off():
    verdict = decide(SMOLLM2, "rougeL", ppl_ratio=1.07)
    assert verdict.paid_off and verdict.deploy == "tuned" and not verdict.keep_prompt
    assert verdict.sentence() == (
        "fine-tuning paid off: rougeL +0.48 over retrieval prompting (0.40); general-text "
                                  "perplexity x1.07")  # as before eval.min_gain
    # The default is far under what this run gained, even at the low end of its interval.
    assert verdict.low > 5 * DEFAULT_MIN_GAIN
    # A gain larger than the margin would refuse it: the tuned model is then kept from promotion, not the
    # prompt.
    strict = decide(SMOLLM2, "rougeL", min_gain=0.5)
    assert not strict.paid_off and strict.deploy == "optimized" and ("the two are "
                                                                     "equivalent") in strict.sentence()


def test_the_least_gain_is_read_on_each_metric_s_own_scale():
    rewards = {"base": [0.0, 0.25, 1.0], "tuned": [1.25, 1.0, 1.25]}  # a weighted sum of reward functions
    assert min_gain_for("rougeL", None, rewards) == min_gain_for("exact_match", None, rewards) == 0.05
    assert min_gain_for("teacher_rougeL", 0.1, rewards) == min_gain_for("fact_recall", 0.1, rewards) == 0.1
    assert min_gain_for("reward", None, rewards) == pytest.approx(0.05 * 1.25)  # a share of the range scored
    assert min_gain_for("reward", {"reward": 0.3}, rewards) == 0.3  # a mapping: in the metric's own units
    assert min_gain_for("rougeL", {"reward": 0.3}, rewards) == 0.05  # a metric it does not name: the default
    # Lower is better (misrouted: the share of answers that are another question's): the gain counts
    # downwards.
    misrouting, right = [1.0] * 8 + [0.0] * 12, [0.0] * 20
    better = decide({"base": misrouting, "tuned": right}, "misrouted")
    assert better.paid_off and better.margin == pytest.approx(0.4)
    worse = decide({"base": right, "tuned": misrouting}, "misrouted")
    assert not worse.paid_off and worse.high < 0 and worse.deploy == "base"
    assert worse.sentence().endswith(
        "keep zero-shot prompting, which beats the tuned model and needs no fine-tuned "
        "model to keep")


def test_eval_min_gain_is_a_recipe_key_checked_before_a_run_exists():
    assert load_recipe(SUPPORT_BOT).eval.min_gain == DEFAULT_MIN_GAIN
    assert load_recipe(SUPPORT_BOT, overrides={"eval.min_gain": "0.1"}).eval.min_gain == 0.1
    assert load_recipe(SUPPORT_BOT,
                       overrides={"eval.min_gain": "{reward: 0.2}"}).eval.min_gain == {"reward": 0.2}
    for bad in ("-0.1", "big", "{rougeL: -1}", "{}"):
        with pytest.raises(RecipeError,
                           match=r"-P eval\.min_gain=.*eval\.min_gain: .*(number >= 0|at least one)"):
            load_recipe(SUPPORT_BOT, overrides={"eval.min_gain": bad})
