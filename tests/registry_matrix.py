"""Every text-generation architecture transformers registers, through what a fine-tune does with it (issue
58).

Per architecture (tests/registry_models.py builds the tiny random model, or says why transformers could not):
- the base saved and loaded back through `from_pretrained`, as a run loads its base;
- a chat row tokenized with a chat template, the loss on the assistant's reply only
(`turn_spans.tokenize_row`);
- `lora` with the project's default targets (`adapters/lora.py` on the default recipe's LoraAdapter): three
optimizer
  steps in fp32, then one under CPU bf16 autocast with what the project keeps in fp32 (`precision.py`); the
  loss must fall and the adapter's weights must get gradients;
- `full`: three steps, the loss falls;
- each saved as the logged model saves it and checked as the rehearsal checks it
(`rehearsal._save_and_reload`), then
  loaded back through `from_pretrained` (PEFT's for the adapter) and compared logit for logit with the trained
  model;
- answers generated and scored as the evaluation does (`contenders.answer_and_score`,
`scoring.contender_metrics`).

`check(built, folder)` gives one row of the table in docs/models.md (docs/architectures.py writes it); the
test (tests/test_registry_matrix.py) runs it for every architecture. In process, one thread, about a second a
model.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from pathlib import Path

ROWS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 plus 2?"},
     {"role": "assistant", "content": "2 plus 2 is 4."}],
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A small test bot."}],
]
STEPS = 3
NEW_TOKENS = 4
TOLERANCE = 1e-4  # logits of the trained model against the reloaded one (fp32, same weights, same inputs)


class TransformersOwn(AssertionError):
    """The same step fails in plain transformers, without the project's code: transformers' own limit."""


@dataclasses.dataclass
class Row:
    model_type: str
    class_name: str
    status: str              # pass | fail | transformers | not built | multimodal
    stage: str = ""          # where it failed
    reason: str = ""
    lora: str = ""           # what LoRA reached, in one phrase
    seconds: float = 0.0
    trace: str = ""          # the failure's traceback (not in the table)


def check(built, folder: Path) -> Row:
    """The row of one built architecture (tests/registry_models.Built)."""
    row = Row(built.model_type, built.class_name, "pass")
    if built.multimodal:
        row.status, row.reason = "multimodal", "takes images or audio: the vision issue's (59)"
        return row
    if built.model is None:
        row.status, row.reason = "not built", built.error
        return row
    started = time.perf_counter()
    stage = "saving the base"
    try:
        tokenizer = _tokenizer()
        base_dir = folder / "base"
        built.model.save_pretrained(base_dir, safe_serialization=True)
        tokenizer.save_pretrained(base_dir)
        stage = "tokenizing with the chat template"
        batch = _batch(tokenizer)
        stage = "lora"
        row.lora = _lora(base_dir, tokenizer, batch, folder / "lora")
        stage = "full"
        _full(base_dir, tokenizer, batch, folder / "full")
    except Exception as e:  # noqa: BLE001 - every failure is a row of the table
        row.status, row.stage = "transformers" if isinstance(e, TransformersOwn) else "fail", stage
        row.reason = _first_line(e)
        row.trace = "".join(traceback.format_exception(e))
    row.seconds = time.perf_counter() - started
    return row


def _tokenizer():
    from mlflow_finetune_plugin.models.tiny import CHAT_TEMPLATE, _build_tokenizer

    tokenizer = _build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _batch(tokenizer) -> dict:
    """The rows as one right-padded batch, labels on the assistant's tokens only."""
    import torch

    from mlflow_finetune_plugin.models.turn_spans import tokenize_row

    rows = [tokenize_row(tokenizer, messages) for messages in ROWS]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(r["assistant_masks"]) == 1, ids[i, :n], -100)
    if not (labels != -100).any():
        raise AssertionError("the chat template left no assistant token to train")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype="float32")
    _no_loading_problems(info, folder.name)
    return model


def _no_loading_problems(info: dict, what: str) -> None:
    problems = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                                   "mismatched_keys") and v}
    if problems:
        raise AssertionError(f"{what} reloads with {problems}")


def _steps(model, batch, lr: float, autocast_last: bool) -> list[float]:
    """STEPS optimizer steps in fp32 (and one more under CPU bf16 autocast with `fp32_where_it_matters`); the
    loss of each, then the loss after them."""
    import torch

    from mlflow_finetune_plugin.models.precision import fp32_where_it_matters

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for step in range(STEPS + (1 if autocast_last else 0)):
        bf16 = autocast_last and step == STEPS
        with fp32_where_it_matters(model, bf16), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise AssertionError(f"loss {loss.item()} at step {step + 1}{' (bf16 autocast)' if bf16 else ''}")
        loss.backward()
        if step == 0 and not any(p.grad is not None and p.grad.abs().sum() > 0 for p in params):
            raise AssertionError("no trained weight got a gradient")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        losses.append(model(**batch).loss.item())
    if not losses[-1] < losses[0]:
        raise AssertionError(f"the loss did not fall in {STEPS} steps: {[round(x, 4) for x in losses]}")
    return losses


def _lora(base_dir: Path, tokenizer, batch, out: Path) -> str:
    from mlflow_finetune_plugin.config.schema import LoraAdapter
    from mlflow_finetune_plugin.models.peft_targets import load_adapter
    from mlflow_finetune_plugin.train.adapters import lora

    model = lora.apply(_load(base_dir), LoraAdapter())  # the default recipe's adapter
    reached = _reached(model)
    _steps(model, batch, lr=3e-3, autocast_last=True)
    _rehearsal_save(model, tokenizer, {"artifact": "adapter", "base_model": str(base_dir),
                                       "objective": "sft"})
    model.save_pretrained(out, safe_serialization=True)
    reloaded = load_adapter(_load(base_dir), out).eval()
    _same_logits(model, reloaded, batch)
    _answer_and_score(model, tokenizer)
    return reached


def _full(base_dir: Path, tokenizer, batch, out: Path) -> None:
    import torch

    model = _load(base_dir)
    _steps(model, batch, lr=1e-3, autocast_last=False)
    # transformers alone first: where its own save and load do not give the trained weights back, the
    # rehearsal (rightly) refuses the model, and the row says whose limit it is
    model.save_pretrained(out, safe_serialization=True)
    reloaded = _load(out).eval()
    theirs = reloaded.state_dict()
    differ = sorted(k for k, v in model.state_dict().items() if k in theirs and not torch.equal(v, theirs[k]))
    if differ:
        raise TransformersOwn(f"save_pretrained then from_pretrained gives other values for {differ[:3]}")
    _rehearsal_save(model, tokenizer, {"artifact": "model", "base_model": str(base_dir), "objective": "sft"})
    _same_logits(model, reloaded, batch)
    _answer_and_score(model, tokenizer)


def _rehearsal_save(model, tokenizer, config: dict) -> None:
    from mlflow_finetune_plugin.train.rehearsal import _save_and_reload

    _save_and_reload(model, tokenizer, config)


def _same_logits(model, reloaded, batch) -> None:
    import torch

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        a, b = model(**inputs).logits, reloaded(**inputs).logits
    mask = batch["attention_mask"].bool()
    diff = (a[mask] - b[mask]).abs().max().item()
    if diff > TOLERANCE:
        raise AssertionError(f"the reloaded model's logits differ from the trained model's by {diff:.3g}")


def _answer_and_score(model, tokenizer) -> None:
    from mlflow_finetune_plugin.config.schema import EvalConfig
    from mlflow_finetune_plugin.evaluate.contenders import answer_and_score
    from mlflow_finetune_plugin.evaluate.scoring import contender_metrics
    from mlflow_finetune_plugin.logged_model import LoadedModel
    from mlflow_finetune_plugin.models.architecture import for_generation

    for_generation(model)
    _plain_generate(model, tokenizer)
    prompts = [messages[:-1] for messages in ROWS]
    references = [messages[-1]["content"] for messages in ROWS]
    answers, nll, n_tokens = answer_and_score(LoadedModel(model, tokenizer, {}), prompts, references,
                                              NEW_TOKENS)
    totals, _ = contender_metrics(answers, references, nll, n_tokens, EvalConfig())
    if n_tokens <= 0 or not 0.0 <= totals["rougeL"] <= 1.0:
        raise AssertionError(f"scoring gave {totals} over {n_tokens} reference tokens")


def _plain_generate(model, tokenizer) -> None:
    """transformers' own `generate` on the prompts as one left-padded batch (how the evaluation answers)."""
    import torch

    from mlflow_finetune_plugin.models.chat_format import render

    texts = [render(tokenizer, messages[:-1], add_generation_prompt=True) for messages in ROWS]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    try:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    except Exception as e:  # noqa: BLE001 - classified: it is transformers' own
        raise TransformersOwn(f"generate on a left-padded batch: {_first_line(e)}") from e


def _reached(model) -> str:
    """What LoRA wraps: on a mixture of experts each kind of part reached and left out
    (`models/moe_parts.py`), on other models the wrapped modules' names (q_proj, c_attn, in_proj, ...)."""
    from peft.tuners.lora import LoraLayer

    from mlflow_finetune_plugin.models.moe_parts import adapted, parts

    found = parts(model.get_base_model())
    if found:
        reached = {name.replace("base_model.model.", "", 1) for name in adapted(model)}
        kinds = {}
        for part in found:
            kinds.setdefault(part.kind, [0, 0])[part.name in reached] += 1
        return "; ".join(f"{kind} {n}/{n + m}" if not m or n else f"{kind} left out"
                         for kind, (m, n) in kinds.items())
    return ", ".join(sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if isinstance(module, LoraLayer)}))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
