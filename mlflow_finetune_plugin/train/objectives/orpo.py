"""ORPO: odds-ratio preference optimization with TRL's (experimental) ORPOTrainer: SFT on the chosen answer
and an odds-ratio preference term in one loss, on (prompt, chosen, rejected) pairs, with no reference model.

`orpo.beta` weighs the preference term (the paper's lambda). Being reference-free, a full fine-tune holds one
copy of the model and an adapter no second forward pass; continuing an adapter (`model.init_adapter`) trains
it on, and the evaluation compares it with those weights (as for DPO: `dpo.evaluate`).

Choices made here, for TRL's experimental preference trainers (ORPO and CPO/SimPO tokenize pairs the same
way):
- Prompts: they never cut a prompt, and a pair whose prompt alone fills `data.max_length` would leave no
answer
  token and make the length-averaged log-probabilities NaN. Such pairs are left out of training with a warning
  that counts them, as TRL's DPOTrainer leaves them out.
- Prompt tuning is refused (by `config/checks.py`): the trainers score the model's logits position by position
  against the tokens, and the virtual tokens prompt tuning prepends shift them.
"""

from __future__ import annotations

import sys

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.train.objectives import dpo


def check(recipe) -> list[str]:
    return []


def build_trainer(recipe, model, tokenizer, train_ds, eval_ds, args: dict, callbacks: list):
    """TRL's ORPOTrainer on `model` as given (a PeftModel or a full model: no peft_config, no reference)."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    # TRL's pair collator needs every column: it turns remove_unused_columns off itself, with a warning
    config = ORPOConfig(**{**args, "remove_unused_columns": False}, beta=recipe.orpo.beta,
                        max_length=recipe.data.max_length)
    train_ds, eval_ds = (fitting_pairs(ds, tokenizer, recipe.data.max_length, split)
                         for ds, split in ((train_ds, "train"), (eval_ds, "eval")))
    return ORPOTrainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                       processing_class=tokenizer, callbacks=callbacks)


def evaluate(recipe, model, tokenizer, train_ds, eval_ds, base_model=None) -> None:
    """DPO's evaluation: base, few-shot and tuned answers against the chosen ones, then the
    chosen-over-rejected log-prob margin and accuracy of the starting and the tuned policy on the held-out
    pairs."""
    dpo.evaluate(recipe, model, tokenizer, train_ds, eval_ds, base_model)


def fitting_pairs(ds, tokenizer, max_length: int, split: str):
    """The pairs whose prompt leaves room for an answer in `max_length` tokens (None stays None)."""
    if ds is None:
        return None
    lengths = [_prompt_tokens(tokenizer, row) for row in ds]
    keep = [i for i, n in enumerate(lengths) if n < max_length]
    if not keep:
        raise FinetuneError(
            f"data.{split}: every prompt fills data.max_length ({max_length} tokens) on its own (the "
            f"shortest has {min(lengths)}), leaving no room for an answer; raise data.max_length")
    if len(keep) < len(ds):
        print(f"Warning: {len(ds) - len(keep)} of {len(ds)} {split} pairs have a prompt of data.max_length = "
              f"{max_length} tokens or more (the longest has {max(lengths)}) and are left out; raise "
              "data.max_length to train on them", file=sys.stderr)
        ds = ds.select(keep)
    return ds


def _prompt_tokens(tokenizer, row) -> int:
    """Tokens of a pair's prompt as TRL's experimental trainers tokenize it (chat template, then BOS if
    missing)."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    prompt = maybe_apply_chat_template(maybe_extract_prompt(dict(row)), tokenizer)["prompt"]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return len(ids) + (bos is not None and ids[:1] != [bos])
