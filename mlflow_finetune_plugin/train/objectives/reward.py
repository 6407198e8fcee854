"""Reward modelling: TRL's RewardTrainer on preference pairs, training the base + an adapter + a score head
that gives a (prompt, answer) pair one number, higher for the answer people prefer (Bradley-Terry loss on
chosen vs rejected). The data are the `dpo` recipe's pairs, or `mlflow-finetune votes export`.

The model loads under a score head (`load_base_model(scoring=True)`, `config/checks.py: SCORING`) and the
adapter trains and saves the head with it (`adapters.scoring_adapter`). Rows are made conversational, so that
training, evaluation and every later scorer (`reward_model.score`: the pyfunc, GRPO's learned reward) render a
pair through the same chat template.

Evaluation, on the first `eval.max_examples` held-out pairs: pairwise accuracy (the share of pairs whose
chosen answer scores higher; a tie counts half) of the tuned reward model, against two rivals that need no
training: the base model's own log-probability margin, log p(chosen | prompt) - log p(rejected | prompt)
(`base`), and "the longer answer wins" (`length`, in tokens). Logged as `eval/<contender>/pair_accuracy`, with
per-pair scores for the verdict; the default promotion gate (`config/checks.py: REWARD_GATES`) asks the tuned
model to beat both and the champion.
"""

from __future__ import annotations

import sys

import mlflow

from mlflow_finetune_plugin.tracking import log_results


def check(recipe) -> list[str]:
    return []


def build_trainer(recipe, model, tokenizer, train_ds, eval_ds, args: dict, callbacks: list):
    """TRL's RewardTrainer on the scoring model as given (a PeftModel with the score head trainable, or a full
    model)."""
    from trl import RewardConfig, RewardTrainer

    config = RewardConfig(**args, max_length=recipe.data.max_length,
                          center_rewards_coefficient=recipe.reward.center_rewards_coefficient)
    return RewardTrainer(model=model, args=config, train_dataset=conversational(train_ds),
                         eval_dataset=None if eval_ds is None else conversational(eval_ds),
                         processing_class=tokenizer, callbacks=callbacks)


def conversational(ds):
    """Text pairs as messages (the prompt a user turn, each answer an assistant turn); message pairs as they
    are."""
    if not ds.num_rows or isinstance(ds[0]["prompt"], list):
        return ds
    return ds.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}],
                               "chosen": [{"role": "assistant", "content": row["chosen"]}],
                               "rejected": [{"role": "assistant", "content": row["rejected"]}]})


def evaluate(recipe, model, tokenizer, train_ds, eval_ds, base_model=None) -> None:
    """Pairwise accuracy of the tuned reward model, the base's log-prob margin and the longer answer, per
    pair."""
    from mlflow_finetune_plugin.evaluate.preferences import preference_margins
    from mlflow_finetune_plugin.evaluate.verdict import SCORES_FILE
    from mlflow_finetune_plugin.metrics import format_table
    from mlflow_finetune_plugin.models.base import load_base_model
    from mlflow_finetune_plugin.reward_model import score

    # The first eval.max_examples pairs, as every objective's evaluation scores the first N held-out rows.
    held_out = eval_ds.select(range(min(len(eval_ds), recipe.eval.max_examples)))
    pairs = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in conversational(held_out)]
    batch = recipe.train.batch_size
    chosen = score(model, tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], batch)
    rejected = score(model, tokenizer, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs], batch)
    base = base_model if base_model is not None else load_base_model(recipe.model)
    # No max_length: every pair is scored whole, so the three lists stay aligned pair by pair.
    base_margins = preference_margins(base, tokenizer, pairs, None, batch)
    del base
    lengths = [_tokens(tokenizer, p["chosen"]) - _tokens(tokenizer, p["rejected"]) for p in pairs]
    per_pair = {"tuned": [_won(c - r) for c, r in zip(chosen, rejected)],
                "base": [_won(m) for m in base_margins], "length": [_won(n) for n in lengths]}
    n = len(pairs)
    if not n:
        print("Reward evaluation: no held-out pairs; nothing scored.", file=sys.stderr)
        return
    metrics = {f"eval/{name}/pair_accuracy": sum(v) / n for name, v in per_pair.items()}
    metrics["eval/tuned/reward_margin"] = sum(c - r for c, r in zip(chosen, rejected)) / n
    metrics["eval/n_pairs"] = float(n)
    log_results(metrics)
    mlflow.log_dict({name: {"pair_accuracy": v} for name, v in per_pair.items()}, SCORES_FILE)
    mlflow.log_table({"chosen_reward": chosen, "rejected_reward": rejected, "base_logp_margin": base_margins,
                      "length_margin": lengths, **{f"{k}_correct": v for k, v in per_pair.items()}},
                     "eval/reward_pairs.json")
    print(f"\nHeld-out preference pairs ({n}): pairwise accuracy")
    print(format_table(["judge", "pair_accuracy"],
                       [["reward model (tuned)", metrics["eval/tuned/pair_accuracy"]],
                        ["base log-prob margin", metrics["eval/base/pair_accuracy"]],
                        ["longer answer wins", metrics["eval/length/pair_accuracy"]]]))


def _won(margin: float) -> float:
    return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0


def _tokens(tokenizer, answer) -> int:
    text = answer if isinstance(answer, str) else " ".join(str(m.get("content") or "") for m in answer)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
