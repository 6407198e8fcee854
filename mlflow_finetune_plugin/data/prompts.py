"""The prompts a teacher answers (`-e distill`): `data.train` and `data.eval` read as prompts, and the
answered rows written back as chat data (the asking is `distill/`).

A source is a file or `traces:EXPERIMENT` (the prompts the application sent, each once). A file's row is a
prompt (`prompt`: text or messages ending with the user's turn), a chat whose last message is the user's, or
any row with an answer (chat, ShareGPT, Alpaca, prompt/completion): its prompt is the conversation up to its
last user turn. In `data.eval` that answer stays the reference the contenders are scored against; in
`data.train` the teacher's answer replaces it.

The teacher is asked only for the prompts the run uses (`used_prompts`): the first `data.max_rows` training
prompts, the first `eval.max_examples` held-out ones (held-out rows with reference answers beyond them stay,
unasked, for the eval loss), and at most `distill.max_prompts` in all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from mlflow_finetune_plugin.data.formats import (
    DataError,
    DataIssue,
    row_formats,
    sharegpt_tags,
    to_messages,
)
from mlflow_finetune_plugin.data.read import read_records_lenient
from mlflow_finetune_plugin.data.teacher import TEACHER_KEY
from mlflow_finetune_plugin.data.traces import is_traces, query_of, read_traces
from mlflow_finetune_plugin.data.validation import validate_records

# The formats a row with an answer may be in; its prompt is what comes before the answer.
_ANSWERED = ("chat", "sharegpt", "alpaca", "prompt_completion")
# Why a prompt makes no training row, as the report says it.
EMPTY, CUT = "empty answer", "answer cut off at the length limit (finish_reason length)"


@dataclass
class Prompt:
    line: int | None          # the row's line in its file (None: from traces)
    messages: list[dict]      # the conversation up to the user's last turn
    reference: dict | None    # the answer the row held (a held-out row is scored against it)
    tools: list | None = None

    @property
    def key(self) -> str:
        """The prompt's identity in the answers cache: its messages and tools."""
        text = json.dumps({"messages": self.messages, "tools": self.tools}, sort_keys=True,
                          ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class PromptSet:
    label: str                                    # data.train | data.eval
    source: str                                   # the file or traces:EXPERIMENT
    prompts: list[Prompt] = field(default_factory=list)
    issues: list[DataIssue] = field(default_factory=list)
    traces: str | None = None                     # the traces report's sentence, for a traces source
    # held-out rows keep their own answers as targets (data.eval), rather than take the teacher's (data.train
    # and its data.eval_split share)
    keeps_references: bool = False
    unasked: list[Prompt] = field(default_factory=list)  # held-out rows kept with their references, not asked


def _prompt_of(rec: dict, fmt: str, system_prompt, tags) -> tuple[list[dict], dict | None]:
    messages = to_messages(rec, fmt, system_prompt, tags)
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        return messages, None
    cut = users[-1] + 1
    answer = messages[cut] if cut < len(messages) and messages[cut].get("role") == "assistant" else None
    return messages[:cut], answer


def read_prompts(recipe, label: str) -> PromptSet:
    """The prompts of `data.train` or `data.eval` (`label`), with every problem as a DataIssue (file:line)."""
    data = recipe.data
    source = data.train if label == "data.train" else data.eval
    out = PromptSet(label, str(source), keeps_references=label == "data.eval")
    if is_traces(source):
        got = read_traces(query_of(source, data.traces, "prompt_only"))
        out.issues, out.traces = got.issues, got.sentence()
        out.prompts = [Prompt(None, to_messages(rec, "prompt_only", data.system_prompt), None,
                              rec.get("tools")) for _, rec in got.records]
        return out
    records, out.issues = read_records_lenient(source, data.columns)
    tags = sharegpt_tags(data.tags)
    for line, rec in records:
        messages = rec.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "user":  # a chat waiting for its answer: a prompt
            rec = {**{k: v for k, v in rec.items() if k != "messages"}, "prompt": messages}
        fmt = next((f for f in ("prompt_only", *_ANSWERED) if f in row_formats(rec, tags)), None)
        if fmt is None:
            out.issues.append(DataIssue(str(source), line,
                                        "not a prompt: give `prompt` (text or messages ending "
                                        "with the user's turn), or `messages` (a chat)"))
            continue
        problems = validate_records([(line, rec)], fmt, source, data.tags)
        if problems:
            out.issues += problems
            continue
        messages, answer = _prompt_of(rec, fmt, data.system_prompt, data.tags)
        if not messages or messages[-1].get("role") != "user":
            out.issues.append(DataIssue(str(source), line, "has no user turn for the teacher to answer"))
            continue
        out.prompts.append(Prompt(line, messages, answer, rec.get("tools")))
    if not out.prompts and not out.issues:
        out.issues.append(DataIssue(str(source), None, "has no prompts for the teacher to answer"))
    return out


def prompt_sets(recipe) -> list[PromptSet]:
    """The prompts of data.train and, where given, data.eval; raises DataError listing every problem."""
    sets = [read_prompts(recipe, label) for label in ("data.train", "data.eval")
            if getattr(recipe.data, label.split(".")[1])]
    issues = [i for s in sets for i in s.issues if i.severity == "error"]
    if issues:
        raise DataError(issues)
    return sets


def used_prompts(recipe, sets: list[PromptSet]) -> tuple[list[PromptSet], list[str]]:
    """The prompts the run uses, per split, and what each limit left unasked: the first `data.max_rows`
    training prompts; with `data.eval`, its first `eval.max_examples` prompts (the later rows with a reference
    answer are kept unasked, for the eval loss); with `data.eval_split`, that seeded share of the training
    prompts held out, the first `eval.max_examples` of it asked; `distill.max_prompts` caps the training
    prompts to what the held-out ones leave. Raises FinetuneError where the cap leaves no training prompt."""
    from mlflow_finetune_plugin.errors import FinetuneError

    data, ev, cap = recipe.data, recipe.eval, recipe.distill.max_prompts
    by_label, notes = {s.label: s for s in sets}, []
    train, prompts = by_label["data.train"], by_label["data.train"].prompts
    if data.max_rows and len(prompts) > data.max_rows:
        notes.append(
            f"data.max_rows {data.max_rows}: {len(prompts) - data.max_rows} training prompts not asked")
        prompts = prompts[: data.max_rows]
    held = None
    if "data.eval" in by_label and not ev.enabled:
        notes.append(f"eval.enabled false: the {len(by_label['data.eval'].prompts)} prompts of data.eval not "
                     "asked")
    elif "data.eval" in by_label:
        source = by_label["data.eval"]
        later = source.prompts[ev.max_examples:]
        held = replace(source, prompts=source.prompts[: ev.max_examples],
                       unasked=[p for p in later if p.reference is not None])
        if later:
            notes.append(f"eval.max_examples {ev.max_examples}: {len(later)} held-out prompts not asked"
                         + (
                             f", {len(held.unasked)} of them kept with their reference answers for the eval "
                             "loss"
                             if held.unasked else ""))
    reserved = len(held.prompts) if held is not None else 0
    if cap is not None and len(prompts) + reserved > cap:
        if cap <= reserved:
            raise FinetuneError(
                f"distill.max_prompts {cap} leaves no training prompt: the held-out set takes "
                f"{reserved} (eval.max_examples {ev.max_examples}). Raise distill.max_prompts, or "
                "lower eval.max_examples")
        notes.append(
            f"distill.max_prompts {cap}: {len(prompts) - (cap - reserved)} more training prompts not asked")
        prompts = prompts[: cap - reserved]
    if held is None and ev.enabled and data.eval_split > 0:
        held, prompts = _held_out_share(recipe, prompts, train.source, notes)
    return [replace(train, prompts=prompts)] + ([held] if held is not None else []), notes


def _held_out_share(recipe, prompts: list[Prompt], source: str, notes: list[str]):
    """(held-out set, training prompts): data.eval_split's seeded share of the training prompts, as
    `splits.hold_out` holds out a file's rows; the held-out prompts take the teacher's answers as their
    targets, as training ones do."""
    from datasets import Dataset

    from mlflow_finetune_plugin.data.splits import hold_out
    from mlflow_finetune_plugin.errors import FinetuneError

    share, limit = recipe.data.eval_split, recipe.eval.max_examples
    try:
        kept, held = hold_out(Dataset.from_dict({"i": list(range(len(prompts)))}), share, recipe.train.seed)
    except ValueError as e:  # datasets: a share that leaves no training or no held-out prompt
        raise FinetuneError(
            f"data.eval_split {share} of {len(prompts)} prompts: {e} Give more prompts, or an eval "
            "file (data.eval)") from None
    held_out = [prompts[i] for i in held["i"]]
    if len(held_out) > limit:
        notes.append(
            f"eval.max_examples {limit}: {len(held_out) - limit} prompts of the data.eval_split share "
            "not asked")
    return (PromptSet("data.eval", f"{source} (data.eval_split {share:g})", held_out[:limit]),
            [prompts[i] for i in sorted(kept["i"])])


def answered_row(prompt: Prompt, answer: dict, held_out: bool) -> dict | None:
    """The chat row of a prompt and the teacher's answer (`answer`: the row key `teacher`, `data/teacher.py`,
    with finish_reason), the teacher's answer also the row's unless a held-out row has a reference of its own;
    None where the answer is empty or cut and there is no reference to keep the row."""
    usable = answer["answer"].strip() and answer.get("finish_reason") != "length"
    # A held-out row's own answer stays its target: the evaluation scores every contender, the teacher too,
    # against it (evaluate/teacher.py tells such rows from those whose target is the teacher's own answer)
    own = not (held_out and prompt.reference is not None)
    target = prompt.reference if not own else {"role": "assistant",
                                               "content": answer["answer"]} if usable else None
    if target is None:
        return None
    row = {"messages": prompt.messages + [target], TEACHER_KEY: answer}
    return {**row, "tools": prompt.tools} if prompt.tools else row


def reference_row(prompt: Prompt) -> dict:
    """A held-out row kept with its own answer, the teacher not asked for it (beyond eval.max_examples)."""
    row = {"messages": prompt.messages + [prompt.reference]}
    return {**row, "tools": prompt.tools} if prompt.tools else row


def why_left_out(answer: dict) -> str | None:
    if answer.get("finish_reason") == "length":
        return CUT
    return EMPTY if not answer["answer"].strip() else None


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
