"""The retrieval contender's shots and the verdict.

Retrieval: BM25 over the user turns picks the nearest train conversations, most similar first, and never one whose
user turns are the eval question itself. The verdict: a paired bootstrap over the held-out examples calls a fine-tune
a pay-off only when the tuned model beats the best prompt-only alternative by more than the evaluation's noise; it is
decided here on per-example scores that the shipped metrics compute from real answers, and read back from a real
sqlite store. A real tiny run's three tags are checked in test_model_card.py (its card shows the verdict too).
"""

from __future__ import annotations

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config.schema import EvalConfig, LoraAdapter, RegistryConfig
from mlflow_finetune_plugin.evaluate.contenders import run_evaluation
from mlflow_finetune_plugin.evaluate.report import EvalResult, add_answers, log_evaluation, table_rows
from mlflow_finetune_plugin.evaluate.retrieval import nearest_shots, user_text
from mlflow_finetune_plugin.evaluate.verdict import (
    MIN_EXAMPLES,
    conclude,
    decide,
    paired_bootstrap,
    per_example_scores,
    primary_metric,
)
from mlflow_finetune_plugin.metrics import score
from mlflow_finetune_plugin.train.adapters import lora

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


# --- retrieval ---------------------------------------------------------------------------------------------------


def test_retrieval_shots_are_the_nearest_train_conversations_most_similar_first():
    questions = [[{"role": "user", "content": "My password reset link has expired"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "export a PDF of my notes"}]]
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
    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraAdapter(r=4, alpha=8, dropout=0.0))
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
    none = run_evaluation(model, tok, evals, TRAIN, EvalConfig(max_examples=1, max_new_tokens=2, retrieval_k=0))
    assert none.contenders == ["base", "fewshot", "tuned"] and none.retrieval_shots == []


# --- the verdict -------------------------------------------------------------------------------------------------

REFERENCES = [f"Open the {w} page, then choose {v}." for w, v in
              zip("billing account security notes export sync theme devices sharing backup trash search".split(),
                  "invoices email password folders pdf now dark remove invite restore empty filters".split())]


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
    assert verdict.sentence() == (f"fine-tuning paid off: rougeL {verdict.margin:+.2f} over retrieval prompting "
                                  f"({verdict.alternative:.2f}); general-text perplexity x1.08")
    assert verdict.as_tags() == {tags.VERDICT: verdict.sentence(), tags.VERDICT_BEST_ALTERNATIVE: "retrieval",
                                 tags.VERDICT_PAID_OFF: "true"}


def test_a_margin_within_the_noise_is_not_a_pay_off():
    retrieval = _partial()
    # Better than retrieval on three questions, worse on three, the same on the rest: a mean margin near 0.
    tuned = [REFERENCES[i] if i < 3 else "No." if i < 6 else retrieval[i] for i in range(len(REFERENCES))]
    verdict = decide({**_alternatives(), "tuned": _rougeL(tuned)}, "rougeL")
    assert not verdict.paid_off and verdict.best_alternative == "retrieval"
    assert verdict.low < 0 < verdict.high
    assert "did not pay off" in verdict.sentence() and "not above the evaluation's noise" in verdict.sentence()


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
    """An evaluation result as run_evaluation builds it (table rows, answers, per-example scores), from answers."""
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
    assert logged.tags[tags.VERDICT_PAID_OFF] == "true" and logged.tags[tags.VERDICT_BEST_ALTERNATIVE] == "retrieval"
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
