"""Forgetting: did the fine-tune make the model worse at everything it was not tuned for?

After the evaluation, general text the run never trained on (`eval.forgetting`: the set bundled with the
package in `assets/forgetting/`, or a file of the recipe's own) is scored with the base model and with the
tuned model: `eval/forgetting/base_loss`, `tuned_loss` (mean NLL per token), `base_ppl`, `tuned_ppl` (their
exponentials), `ppl_ratio` = tuned_ppl / base_ppl (above 1: ordinary text became less likely) and `n_tokens`.
A promotion gate can refuse a version that forgot too much: `forgetting/ppl_ratio<=1.2`.

The base is the same weights with the adapter off, or, for a full fine-tune, the base the evaluation already
loaded: never a second model. Batched forward passes under torch.no_grad, in the dtype the model is in, as the
evaluation's reference loss; no generation. With one adapter per task (`data.adapters: per_task`) each adapter
is scored (`eval/forgetting/<task>/...`), and the top-level figures are those of the adapter that forgot most.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from mlflow_finetune_plugin.data.text import read_texts
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.metrics import FORGETTING_PREFIX
from mlflow_finetune_plugin.tracking import log_results

BUNDLED = Path(__file__).parents[1] / "assets" / "forgetting" / "general_text.txt"
PREFIX = FORGETTING_PREFIX
# Rows per forward pass. The LM head runs over chunks of tokens (models/lm_head.py), so a large vocabulary
# adds one chunk of logits, not (rows x length x vocabulary); a head it does not reproduce still gives whole
# logits.
BATCH_SIZE = 8


def set_path(recipe) -> Path | None:
    """The general-text file the recipe names (`eval.forgetting`), the bundled one for `true`; None when
    off."""
    value = recipe.eval.forgetting
    if not recipe.eval.enabled or value is False:
        return None
    return BUNDLED if value is True else Path(value)


def read_set(recipe) -> list[str]:
    """The texts of the recipe's general-text set ([] when the check is off); a bad file raises FinetuneError
    here, before a model loads."""
    path = set_path(recipe)
    return read_texts(path, "eval.forgetting") if path else []


def text_nll(model, tokenizer, texts: list[str], max_length: int,
             batch_size: int = BATCH_SIZE) -> tuple[float, int]:
    """Summed negative log-likelihood of every token of `texts` after each text's first (cut at `max_length`),
    and the number of tokens scored; right-padded batches, padding never scored."""
    import torch

    from mlflow_finetune_plugin.evaluate.preferences import completion_logps

    rows = [ids[:max_length] for ids in tokenizer(texts)["input_ids"]]
    rows = sorted((r for r in rows if len(r) > 1), key=len, reverse=True)  # similar lengths share a batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = rows[start: start + batch_size]
                ids = torch.full((len(batch), len(batch[0])), pad)
                mask = torch.zeros_like(ids)
                for i, row in enumerate(batch):
                    ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
                # Every real token after the first is scored; completion_logps also drops the logits of the
                # virtual tokens prompt tuning prepends.
                nll -= float(completion_logps(model, ids, mask, mask).sum())
                count += int(mask[:, 1:].sum())
    finally:
        model.train(was_training)
    return nll, count


def figures(tuned_loss: float, base_loss: float | None) -> dict[str, float]:
    """tuned_loss, tuned_ppl and, with a base, ppl_ratio = tuned_ppl / base_ppl."""
    out = {"tuned_loss": tuned_loss, "tuned_ppl": _ppl(tuned_loss)}
    if base_loss is not None:
        out["ppl_ratio"] = out["tuned_ppl"] / _ppl(base_loss)
    return out


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def measure(recipe, texts: list[str], model, tokenizer, base_model=None) -> dict[str, float]:
    """The forgetting figures (metric name without `eval/forgetting/` -> value) of `model` against its
    base."""
    from mlflow_finetune_plugin.evaluate.answering import _base_context

    def loss(m) -> float:
        total, n = text_nll(m, tokenizer, texts, recipe.data.max_length)
        if not n:
            raise FinetuneError("eval.forgetting: no text has two tokens or more to score; give longer texts")
        metrics["n_tokens"] = float(n)
        return total / n

    metrics: dict[str, float] = {}
    base, base_loss = _base_context(model, base_model), None
    if base is not None:
        with base as base_model_view:
            base_loss = loss(base_model_view)
        metrics.update(base_loss=base_loss, base_ppl=_ppl(base_loss))
    else:
        print("Forgetting check: a full model without its base given; scoring the tuned model only.")
    tasks = list(recipe.data.tasks) if recipe.data.tasks and recipe.data.adapters == "per_task" else []
    per_task = {}
    for name in tasks:
        model.set_adapter(name)
        per_task[name] = loss(model)
        metrics.update({f"{name}/{k}": v for k, v in figures(per_task[name], base_loss).items()})
    tuned_loss = max(per_task.values()) if per_task else loss(model)
    metrics.update(figures(tuned_loss, base_loss))
    return metrics


def check(recipe, texts: list[str], model, tokenizer, base_model=None) -> dict[str, float]:
    """Measure, log `eval/forgetting/*` into the active run, add them to its comparison chart and print the
    figures; nothing when `texts` is empty (the check is off)."""
    import mlflow

    from mlflow_finetune_plugin.evaluate.report import log_chart
    from mlflow_finetune_plugin.metrics import format_table

    if not texts:
        return {}
    started = time.perf_counter()
    metrics = measure(recipe, texts, model, tokenizer, base_model)
    log_results({PREFIX + k: v for k, v in metrics.items()})
    # The evaluation's chart again, now with the ratio the verdict cites beside the contenders' scores.
    run = mlflow.active_run()
    log_chart(mlflow.get_run(run.info.run_id).data.metrics)
    rows = [["loss", metrics.get("base_loss"), metrics["tuned_loss"]],
            ["perplexity", metrics.get("base_ppl"), metrics["tuned_ppl"]]]
    ratio = f"; ppl_ratio {metrics['ppl_ratio']:.4f}" if "ppl_ratio" in metrics else ""
    print(f"\nForgetting check: {len(texts)} general texts, {int(metrics['n_tokens'])} tokens "
          f"({time.perf_counter() - started:.1f} s){ratio}")
    print(format_table(["general text", "base", "tuned"], rows))
    return metrics
