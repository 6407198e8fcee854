"""How strongly a model prefers the chosen answer over the rejected one, on held-out preference pairs.

The margin of a pair is log p(chosen | prompt) - log p(rejected | prompt), each summed over the completion's
tokens, with prompt and completions tokenized, truncated and padded as TRL's DPOTrainer does (so it scores the
sequences DPO trains on). TRL's own `rewards/margins` and `rewards/accuracies` are relative to the reference
model (beta * (log p_policy - log p_ref)); these are absolute, so a starting policy and a tuned one can be
compared. Logged as `eval/<policy>/pref_margin` (mean margin) and `eval/<policy>/pref_accuracy` (share of
pairs with margin > 0). Pairs with images (an `images` column) are scored with them, through TRL's
`DataCollatorForVisionPreference` and the model's processor, as DPO trains on them.
"""

from __future__ import annotations

from mlflow_finetune_plugin.metrics import format_table

METRICS = ("pref_margin", "pref_accuracy")


def pair_ids(tokenizer, row: dict) -> dict:
    """prompt_ids, chosen_ids, rejected_ids of one prompt/chosen/rejected row, as TRL's DPOTrainer tokenizes
    it."""
    from trl.data_utils import common_prefix_length, is_conversational

    if is_conversational(row):
        from mlflow_finetune_plugin.models.chat_format import prepared

        def ids(messages, **kwargs):
            return list(tokenizer.apply_chat_template(prepared(tokenizer, messages), tokenize=True,
                                                      return_dict=True, **kwargs)["input_ids"])

        prompt = ids(row["prompt"], add_generation_prompt=True)
        chosen, rejected = ids(row["prompt"] + row["chosen"]), ids(row["prompt"] + row["rejected"])
    else:
        # Plain-text pairs: TRL appends EOS to each completion, so that ending the answer is scored too.
        eos = tokenizer.eos_token or ""
        texts = [c if c.endswith(eos) else c + eos for c in (row["chosen"], row["rejected"])]
        prompt = tokenizer(text=row["prompt"])["input_ids"]
        chosen, rejected = (tokenizer(text=row["prompt"] + t)["input_ids"] for t in texts)
    # Some templates render a prompt alone differently from one followed by an answer: the completion starts
    # where the token sequences part, as in TRL.
    n = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return {"prompt_ids": prompt[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}


def completion_logps(model, input_ids, attention_mask, completion_mask, **inputs):
    """Summed log-probability of each row's completion tokens (right-padded rows; labels -100 on prompt and
    padding). `inputs`: the model's other inputs (a processor's pixel values, token type ids, image sizes)."""
    logps, _ = token_logps(model, input_ids, attention_mask, completion_mask, **inputs)
    return logps.sum(dim=1)


def token_logps(model, input_ids, attention_mask, completion_mask, **inputs):
    """(log-probability of each next token [rows, length - 1], 0 where not scored; which positions are
    scored): the completion tokens of right-padded rows; `inputs` go to the model beside them.

    Only the scored positions go through the LM head: in chunks (`models/lm_head.py`) where it is a head that
    module reproduces, so that no (rows, length, vocabulary) logits are held, else from the model's logits."""
    import torch

    from mlflow_finetune_plugin.models.lm_head import head_of, hidden_states, token_logprobs

    device = model.device
    input_ids = input_ids.to(device)
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    # The logits at position t predict token t + 1.
    targets = input_ids.masked_fill(completion_mask.to(device) == 0, -100)[:, 1:]
    scored = targets != -100
    logps = torch.zeros(targets.shape, device=device)
    head = head_of(model)
    if head is not None:
        with hidden_states(model) as captured:
            model(input_ids=input_ids, attention_mask=attention_mask.to(device), use_cache=False, **inputs)
        # Prompt tuning's virtual tokens come ahead of the input's.
        hidden = captured[-1][:, captured[-1].shape[1] - input_ids.shape[1]: -1]
        logps[scored] = token_logprobs(head, hidden[scored], targets[scored])[0]
        return logps, scored
    logits = model(input_ids=input_ids, attention_mask=attention_mask.to(device), use_cache=False,
                   **inputs).logits
    logits = logits[:, logits.shape[1] - input_ids.shape[1]: -1]
    # Only the scored positions' logits are upcast: the full (rows, length, vocabulary) tensor in fp32 is
    # large.
    logps[scored] = -torch.nn.functional.cross_entropy(logits[scored].float(), targets[scored],
                                                       reduction="none")
    return logps, scored


def preference_margins(model, tokenizer, rows, max_length: int | None = None,
                       batch_size: int = 8) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair, in batches of `batch_size` pairs.

    Like TRL, sequences are cut at `max_length` and pairs whose prompt alone fills it are left out (no answer
    token would remain to score).
    """
    import torch

    collate, examples = _collator(tokenizer, rows, max_length)
    margins: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = dict(collate(examples[start:start + batch_size]))  # chosen rows first, then rejected
                logps = completion_logps(model, batch.pop("input_ids"), batch.pop("attention_mask"),
                                         batch.pop("completion_mask"), **batch)
                chosen, rejected = logps.chunk(2)
                margins += (chosen - rejected).tolist()
    finally:
        model.train(was_training)
    return margins


def _collator(tokenizer, rows, max_length: int | None):
    """(TRL's preference collator, the examples it takes) for `rows`: token ids for text pairs; for pairs with
    images, the rows themselves with their images read, for the vision collator to render and process with the
    tokenizer's processor (`models.vision.processor_of`)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DataCollatorForVisionPreference

    from mlflow_finetune_plugin.data.image_rows import IMAGES, row_images

    rows = list(rows)
    if any(row.get(IMAGES) for row in rows):
        from mlflow_finetune_plugin.models.vision import processor_of

        # the rows as the collator takes them: fresh dicts (it rewrites them), images as PIL images
        examples = [{**{k: row[k] for k in ("prompt", "chosen", "rejected")}, IMAGES: row_images(row)}
                    for row in rows]
        return DataCollatorForVisionPreference(processor=processor_of(tokenizer),
                                               max_length=max_length), examples
    examples = [pair_ids(tokenizer, row) for row in rows]
    if max_length:
        examples = [e for e in examples if len(e["prompt_ids"]) < max_length]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForPreference(pad_token_id=pad, max_length=max_length), examples


def preference_metrics(margins: list[float], policy: str) -> dict[str, float]:
    """`eval/<policy>/pref_margin` and `eval/<policy>/pref_accuracy` of a list of pair margins."""
    n = max(len(margins), 1)
    return {f"eval/{policy}/pref_margin": sum(margins) / n,
            f"eval/{policy}/pref_accuracy": sum(m > 0 for m in margins) / n}


def preference_table(metrics: dict[str, float], policies=("start", "tuned")) -> str:
    return format_table(["metric", *policies], [[m, *(metrics.get(f"eval/{p}/{m}") for p in policies)]
                                                for m in METRICS])
