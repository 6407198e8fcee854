"""The chat template's part in one fine-tune: what `models/chat_format.py` found about it, applied to this
run.

- System messages a template would drop or refuse are folded into the first user turn of every row (once here,
so
  that TRL's DPO/ORPO/GRPO trainers, which render rows themselves, see the same as SFT, evaluation and
  serving).
- A chosen template (`model.chat_template`) whose control tokens the tokenizer lacked: the embeddings grow to
fit.
  Its control tokens, new or present, get trainable rows: a base model has never learned them (base Gemma 3
  ranks its own `<end_of_turn>` 260,392nd of 262,144 after an answer), and a LoRA with frozen embeddings
  cannot learn to end its turn. LoRA trains them through PEFT's `trainable_token_indices`; a full fine-tune
  trains every row anyway.
- Every end-of-turn id stops generation: written into the model's generation config, which the logged model,
the
  exported folder and vLLM read.
"""

from __future__ import annotations

import sys

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.models.base import chosen_chat_template, control_tokens
from mlflow_finetune_plugin.models.chat_format import chat_format, prepared, stop_ids


def for_template(recipe, data, tokenizer, main: bool = True):
    """`data` (splits.Splits) with system messages folded where the template needs it; one printed line, one
    tag."""
    import dataclasses

    import mlflow

    fmt = chat_format(tokenizer)
    if main and mlflow.active_run() is not None:
        mlflow.set_tags({tags.SYSTEM_HANDLING: fmt.system + (f": {fmt.why}" if fmt.why else ""),
                         **({tags.CHAT_TEMPLATE: recipe.model.chat_template} if recipe.model.chat_template
                            else {})})
    if not fmt.folds_system:
        return data
    if main:
        print(f"System messages: {fmt.why}.")

    def fold(row):
        return {key: prepared(tokenizer, row[key]) for key in ("messages", "prompt")
                if isinstance(row.get(key), list) and row[key] and isinstance(row[key][0], dict)}

    def each(ds):
        return None if ds is None else ds.map(fold, desc="Folding system messages")

    return dataclasses.replace(data, train=each(data.train), eval=each(data.eval),
                               tasks={k: each(v) for k, v in data.tasks.items()},
                               task_evals={k: each(v) for k, v in data.task_evals.items()})


def trains_token_rows(recipe) -> bool:
    """Whether the adapter trains the chosen template's control-token rows beside LoRA (a fresh adapter; see
    `adapters.attach`)."""
    return (recipe.adapter.type == "lora" and bool(control_tokens(recipe.model.chat_template))
            and not recipe.model.init_adapter and not (recipe.data.tasks and recipe.data.adapters
                                                       == "per_task"))


def vllm_verdict(recipe, verdict: tuple[bool, str]) -> tuple[bool, str]:
    """The adapter's vLLM verdict (`finetune.vllm_compatible`): a LoRA adapter that trains token rows, or a
    vision tower (lora.vision), is served merged into its base (vllm_rules.MERGED, MERGED_VISION): vLLM's LoRA
    loader cannot take the one, and leaves the other out."""
    from mlflow_finetune_plugin.config.checks import SCORING
    from mlflow_finetune_plugin.vllm_rules import MERGED, MERGED_VISION, REWARD_MODEL

    if recipe.objective in SCORING:
        return False, REWARD_MODEL
    if verdict[0] and trains_token_rows(recipe):
        return True, MERGED
    vision = recipe.adapter.type == "lora" and recipe.adapter.vision
    return (True, MERGED_VISION) if verdict[0] and vision else verdict


def fit_model(recipe, model, tokenizer, main: bool = True) -> list[int]:
    """Grow the embeddings for added tokens, make every end-of-turn id stop generation; the ids of the chosen
    template's control tokens, to train (empty when no template was chosen)."""
    import mlflow

    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        added = getattr(tokenizer, "added_control_tokens", [])
        if main:
            print(
                f"Chat template: added {', '.join(added)} to the tokenizer; the embeddings grow to "
                f"{len(tokenizer)}")
    # a reward model scores: no generation to stop; its head pools at the last non-pad
    if not model.can_generate():
        model.config.pad_token_id = tokenizer.pad_token_id
        return []
    stops = stop_ids(tokenizer, model.generation_config)
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    wanted = control_tokens(chosen_chat_template(recipe.model))
    ids = [tokenizer.convert_tokens_to_ids(t) for t in wanted]
    if not ids:
        return []
    if recipe.adapter.type not in ("lora", "full") and main:
        print(
            f"Warning: the {recipe.adapter.type} adapter cannot train embedding rows: the template's control "
            f"tokens ({', '.join(wanted)}) keep the base model's rows; a base model may then never end its "
            "turn. Use -e lora or -e full with model.chat_template.", file=sys.stderr)
    if main and mlflow.active_run() is not None:
        mlflow.set_tag(
            tags.TRAINABLE_TOKENS, ", ".join(wanted) if recipe.adapter.type in ("lora", "full") else "none"
        )
    return ids if recipe.adapter.type == "lora" else []


def added_rows(model, tokenizer) -> dict | None:
    """The embedding rows (input, and output where untied) of the tokens a chosen template added, as the
    fine-tune starts from them; None when it added none. A full fine-tune's base contender is given the same
    rows (`comparable_base`), as a LoRA's base (the adapter switched off) has them."""
    import torch

    added = getattr(tokenizer, "added_control_tokens", None)
    if not added:
        return None
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(added)))
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    untied = outputs is not None and outputs.weight is not inputs.weight
    with torch.no_grad():
        return {"ids": ids, "input": inputs.weight[ids].detach().clone(),
                "output": outputs.weight[ids].detach().clone() if untied else None}


def base_contender(recipe, artifact: str, tokenizer, rows: dict | None):
    """The base model the evaluation compares against, where it is not the adapter switched off (None then): a
    full fine-tune's base (`artifact` "full"), loaded apart, grown to the token rows the fine-tune started
    from."""
    return comparable_base(recipe, tokenizer, rows) if artifact == "full" else None


def comparable_base(recipe, tokenizer, rows: dict | None):
    """The base model a full fine-tune is compared with, fit to the run's tokenizer as the trained model was:
    a
    chosen template's added tokens get embedding rows (those the fine-tune started from, `added_rows`; the
    original model has none, and its base contender would index past its embeddings), and every end-of-turn id
    stops it."""
    import torch

    from mlflow_finetune_plugin.models.architecture import for_generation
    from mlflow_finetune_plugin.models.base import load_base_model

    base = load_base_model(recipe.model)
    fit_model(recipe, base, tokenizer, main=False)
    for_generation(base)
    if rows is not None:
        inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
        with torch.no_grad():
            inputs.weight[rows["ids"]] = rows["input"].to(inputs.weight.dtype)
            if rows["output"] is not None and outputs is not None and outputs.weight is not inputs.weight:
                outputs.weight[rows["ids"]] = rows["output"].to(outputs.weight.dtype)
        print(
            f"Base contender: embeddings grown to {len(tokenizer)} rows for the chat template's added tokens "
            f"({', '.join(tokenizer.added_control_tokens)}), as the fine-tune started from them")
    return base
