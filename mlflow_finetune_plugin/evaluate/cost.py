"""What each contender's answers cost, beside how good they are (`metrics.COST_METRICS`, logged as
eval/<contender>/<name>): the tokens of the prompt it read and of the answer it wrote, seconds per answer on
this machine, answer tokens per second, and the parameters that answered; and the line the run prints after
its verdict.

Timing: the contenders answer in left-padded batches (`contenders.answer_and_score`), so an answer's seconds
are its batch's wall time (the pass over the prompts, which also scores the reference answers where generation
continues from it, then decoding) divided by the batch's rows; `latency_s` is the median of those, and
`tokens_per_s` all answer tokens over all those seconds. They are figures of this machine and this batch size,
comparable between the contenders of one evaluation, not a serving latency. A teacher's come from its rows
(`data/teacher.py`): the latency its calls were logged with (shared among the requests `-e distill` kept in
flight), its own tokenizer's counts.
"""

from __future__ import annotations

import statistics

from mlflow_finetune_plugin.metrics import TEACHER, mean


def parameter_counts(model, base_model=None) -> dict[str, int]:
    """{"base": ..., "tuned": ...}: the parameters that answer for the base model and for the tuned one. With
    an adapter (a PeftModel), the base is the model without the adapter's parameters and the tuned model the
    base plus them; a full fine-tune counts its own, and its base model (when given) its own."""
    tuned = _count(model.named_parameters())
    if base_model is not None:
        return {"base": _count(base_model.named_parameters()), "tuned": tuned}
    adapters = tuple(f".{name}." for name in getattr(model, "peft_config", None) or ())
    if not adapters:
        return {"tuned": tuned}
    added = _count((n, p) for n, p in model.named_parameters() if any(a in f"{n}." for a in adapters))
    return {"base": tuned - added, "tuned": tuned}


def _count(named) -> int:
    # bitsandbytes packs two 4-bit weights in a byte: its tensor has half as many elements as the layer has
    # weights.
    return sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for _, p in named)


def answer_lengths(tokenizer, answers: list[str]) -> list[int]:
    """Each answer's tokens: its text re-tokenized (the end-of-turn token that ended it is not in the
    text)."""
    return [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]


def answer_costs(prompt_tokens: list[int], answer_tokens: list[int], seconds: list[float],
                 params: int | None) -> dict[str, float]:
    """The cost metrics of one contender from its per-answer token counts and seconds (see the module's
    note)."""
    out = {"prompt_tokens": mean(prompt_tokens, 0.0), "answer_tokens": mean(answer_tokens, 0.0),
           "latency_s": statistics.median(seconds), "tokens_per_s": sum(answer_tokens) / max(sum(seconds),
                                                                                             1e-9)}
    if params:
        out["params"] = float(params)
    return out


def teacher_costs(teachers: list[dict], params: int | None = None) -> dict[str, float]:
    """The teacher's cost metrics from its rows' logged figures; a figure no row logged is left out, not
    guessed. Tokens per second: completion tokens over seconds, on the rows that logged both. Parameters:
    `params` (from
    eval.teacher_params) or else the rows' own."""
    out: dict[str, float] = {}
    for key, name in (("prompt_tokens", "prompt_tokens"), ("completion_tokens", "answer_tokens")):
        values = [t[key] for t in teachers if t.get(key) is not None]
        if values:
            out[name] = mean(values, 0.0)
    latencies = [_seconds(t) for t in teachers if t.get("latency_s") is not None]
    if latencies:
        out["latency_s"] = statistics.median(latencies)
    timed = [t for t in teachers if t.get("latency_s") and t.get("completion_tokens") is not None]
    if timed:
        out["tokens_per_s"] = sum(t["completion_tokens"] for t in timed) / sum(_seconds(t) for t in timed)
    params = params or next((t["params"] for t in teachers if t.get("params")), None)
    if params:
        out["params"] = float(params)
    return out


def _seconds(teacher: dict) -> float:
    """A teacher's seconds per answer: its latency, shared among the requests in flight with it (`-e distill`
    asks `concurrency` at a time), as a contender's batch time is shared among the batch's rows."""
    return teacher["latency_s"] / max(teacher.get("concurrency") or 1, 1)


def cost_line(metrics: dict[str, float]) -> str | None:
    """One line on what an answer costs each contender, for after the verdict: the prompt tokens the shots add
    over zero-shot, the median seconds per answer, the tuned model's tokens per second; None when nothing was
    timed."""
    from mlflow_finetune_plugin.metrics import CONTENDERS

    def get(c, m):
        return metrics.get(f"eval/{c}/{m}")

    timed = [c for c in CONTENDERS if get(c, "latency_s") is not None and c != TEACHER]
    if not timed:
        return None
    parts = []
    zero = get("base", "prompt_tokens")
    if zero is not None:
        extra = [f"{c} {get(c, 'prompt_tokens') - zero:+.0f}" for c in timed
                 if c != "base" and get(c, "prompt_tokens") is not None]
        parts.append(f"prompt tokens over zero-shot's {zero:.0f}: " + ", ".join(extra))
    parts.append("median latency " + ", ".join(f"{c} {get(c, 'latency_s'):.3f} s" for c in timed))
    if get("tuned", "tokens_per_s") is not None:
        parts.append(f"tuned {get('tuned', 'tokens_per_s'):.0f} tokens/s")
    return "Cost per answer on this machine: " + "; ".join(parts) + "."
