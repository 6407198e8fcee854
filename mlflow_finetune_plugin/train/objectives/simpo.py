"""SimPO: simple preference optimization with TRL's (experimental) CPOTrainer, `loss_type="simpo"`, on
(prompt, chosen, rejected) pairs, with no reference model.

The loss pushes the length-normalized log-probability of the chosen answer above the rejected one's by a
target margin: -log sigmoid(beta x (mean log p(chosen) - mean log p(rejected)) - gamma). `simpo.cpo_alpha` 0
is SimPO as TRL documents it; above 0 it adds an SFT (NLL) term on the chosen answer (CPO-SimPO). The
defaults, beta 2.0 and gamma 1.0, are the SimPO authors' for Llama-3-8B base (TRL's CPO defaults, 0.1 and 0.5,
are not tuned for SimPO).

The pairs are tokenized as ORPO's (TRL's experimental trainers share that code), so the same choices apply:
pairs
whose prompt fills `data.max_length` are left out, prompt tuning is refused (`orpo.py`, `config/checks.py`).
Evaluation is DPO's.
"""

from __future__ import annotations

from mlflow_finetune_plugin.train.objectives import dpo, orpo


def check(recipe) -> list[str]:
    return []


def build_trainer(recipe, model, tokenizer, train_ds, eval_ds, args: dict, callbacks: list):
    """TRL's CPOTrainer with the SimPO loss on `model` as given (a PeftModel or a full model: no
    peft_config)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    cfg = recipe.simpo
    # TRL's pair collator needs every column: it turns remove_unused_columns off itself, with a warning
    config = CPOConfig(**{**args, "remove_unused_columns": False}, loss_type="simpo", beta=cfg.beta,
                       simpo_gamma=cfg.gamma, cpo_alpha=cfg.cpo_alpha, max_length=recipe.data.max_length)
    train_ds, eval_ds = (orpo.fitting_pairs(ds, tokenizer, recipe.data.max_length, split)
                         for ds, split in ((train_ds, "train"), (eval_ds, "eval")))
    return CPOTrainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tokenizer, callbacks=callbacks)


def evaluate(recipe, model, tokenizer, train_ds, eval_ds, base_model=None) -> None:
    """DPO's evaluation: base, few-shot and tuned answers against the chosen ones, then the
    chosen-over-rejected log-prob margin and accuracy of the starting and the tuned policy on the held-out
    pairs."""
    dpo.evaluate(recipe, model, tokenizer, train_ds, eval_ds, base_model)
