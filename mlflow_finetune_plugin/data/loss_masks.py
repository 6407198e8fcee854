"""Per-turn loss weights of the OpenAI fine-tuning format: an assistant message with `"weight": 0` gets no loss.

TRL's SFTTrainer labels the tokens its assistant masks mark: the chat template's `{% generation %}` blocks, one per
assistant message. It has no notion of a turn's weight. So rows with weights are tokenized here by the same call
TRL makes (same template: the tokenizer's, or TRL's training variant of it; same tools), and the block of each
weight-0 turn is cleared from the mask. TRL takes `input_ids` and `assistant_masks` as given and builds the labels,
truncates and packs as usual. Imported by `train.sft_trainer` only when a row has a weight-0 turn.
"""

from __future__ import annotations

import json

from mlflow_finetune_plugin.errors import FinetuneError


def has_zero_weights(*datasets) -> bool:
    """Whether any conversation of these datasets (or dicts of them) has an assistant turn with weight 0."""
    for ds in _flat(datasets):
        if "messages" in ds.column_names and any(m.get("weight") == 0 for msgs in ds["messages"] for m in msgs):
            return True
    return False


def _flat(datasets):
    for ds in datasets:
        if isinstance(ds, dict):
            yield from ds.values()
        elif ds is not None:
            yield ds


def training_template(tokenizer) -> str:
    """The template TRL's assistant-only loss renders with: the tokenizer's own when it has generation markers,
    else TRL's training variant of it; FinetuneError when there is neither."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if isinstance(template, str) and has_generation_markers(template):
        return template
    try:
        patched = get_training_chat_template(tokenizer)
    except Exception:  # noqa: BLE001 - TRL raises for templates it has no training variant of
        patched = None
    if patched is None:
        raise FinetuneError(
            "the data has assistant turns with weight 0, but this model's chat template has no {% generation %} "
            "markers (and TRL has no training variant of it), so those turns cannot be told apart from the others. "
            "Add the markers around each assistant reply in the template, or drop the weights.")
    return patched


def row_tools(example) -> list | None:
    """A row's `tools` column as a list (stored as JSON text where the rows' tools differ in shape)."""
    tools = example.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools


def with_turn_weights(tokenizer, dataset, assistant_only_loss: bool = True):
    """`dataset` (a `messages` column, optional `tools`) as `input_ids` + `assistant_masks`, weight-0 turns cleared.

    With `assistant_only_loss` false every token is trained except those of weight-0 turns. Replay
    (`data/replay.py`) tokenizes the task's rows here too, so that text rows can join them.
    """
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return {name: with_turn_weights(tokenizer, ds, assistant_only_loss) for name, ds in dataset.items()}
    # Masks need the template's generation markers; whole conversations without weights need none.
    masked = assistant_only_loss or has_zero_weights(dataset)
    template = training_template(tokenizer) if masked else tokenizer.chat_template

    def tokenize(example):
        tools = row_tools(example)
        out = tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True, tools=tools,
                                            chat_template=template, return_assistant_tokens_mask=masked)
        if not masked:
            return {"input_ids": list(out["input_ids"]), "assistant_masks": [1] * len(out["input_ids"])}
        mask = list(out["assistant_masks"])
        weights = [m.get("weight") for m in example["messages"] if m.get("role") == "assistant"]
        spans = _spans(mask)
        if len(spans) != len(weights):
            raise FinetuneError(
                f"the chat template marks {len(spans)} assistant block(s) in a conversation with {len(weights)} "
                "assistant message(s), so per-turn weights cannot be matched to them; it needs one "
                "{% generation %} block per assistant message (non-empty, not adjacent)")
        labels = mask if assistant_only_loss else [1] * len(mask)
        for (start, end), weight in zip(spans, weights):
            if weight == 0:
                labels[start:end] = [0] * (end - start)
        return {"input_ids": list(out["input_ids"]), "assistant_masks": labels}

    return dataset.map(tokenize, remove_columns=dataset.column_names, desc="Tokenizing with loss masks")


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    spans, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    return spans
