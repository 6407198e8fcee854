"""The prompts a teacher answers (`-e distill`): `data.train` and `data.eval` read as prompts, and the answered rows
written back as chat data (the asking is `distill/`).

A source is a file or `traces:EXPERIMENT` (the prompts the application sent, each once). A file's row is a prompt
(`prompt`: text or messages ending with the user's turn), a chat whose last message is the user's, or any row with an
answer (chat, ShareGPT, Alpaca, prompt/completion): its prompt is the conversation up to its last user turn. In
`data.eval` that answer stays the reference the contenders are scored against; in `data.train` the teacher's answer
replaces it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
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
        text = json.dumps({"messages": self.messages, "tools": self.tools}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class PromptSet:
    label: str                                    # data.train | data.eval
    source: str                                   # the file or traces:EXPERIMENT
    prompts: list[Prompt] = field(default_factory=list)
    issues: list[DataIssue] = field(default_factory=list)
    traces: str | None = None                     # the traces report's sentence, for a traces source


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
    out = PromptSet(label, str(source))
    if is_traces(source):
        got = read_traces(query_of(source, data.traces, "prompt_only"))
        out.issues, out.traces = got.issues, got.sentence()
        out.prompts = [Prompt(None, to_messages(rec, "prompt_only", data.system_prompt), None, rec.get("tools"))
                       for _, rec in got.records]
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
            out.issues.append(DataIssue(str(source), line, "not a prompt: give `prompt` (text or messages ending "
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


def answered_row(prompt: Prompt, answer: dict, held_out: bool) -> dict | None:
    """The chat row of a prompt and the teacher's answer (`answer`: the row key `teacher`, `data/teacher.py`, with
    finish_reason), the teacher's answer also the row's unless a held-out row has a reference of its own; None where
    the answer is empty or cut and there is no reference to keep the row."""
    usable = answer["answer"].strip() and answer.get("finish_reason") != "length"
    # A held-out row's own answer stays its target: the evaluation scores every contender, the teacher too, against
    # it (evaluate/teacher.py tells such rows from those whose target is the teacher's own answer)
    own = not (held_out and prompt.reference is not None)
    target = prompt.reference if not own else {"role": "assistant", "content": answer["answer"]} if usable else None
    if target is None:
        return None
    row = {"messages": prompt.messages + [target], TEACHER_KEY: answer}
    return {**row, "tools": prompt.tools} if prompt.tools else row


def why_left_out(answer: dict) -> str | None:
    if answer.get("finish_reason") == "length":
        return CUT
    return EMPTY if not answer["answer"].strip() else None


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
