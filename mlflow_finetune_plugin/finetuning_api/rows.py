"""OpenAI's training rows as this project's data, per fine-tuning method, checked line by line as
`mlflow-finetune data check` checks them (the same words, with the uploaded file's name and line), before any
job starts.

- supervised: `{"messages": [...], "tools"?, "parallel_tool_calls"?}` (an assistant turn may carry `weight`
0|1):
  the `chat` format as it is.
- dpo: `{"input": {"messages": [...]}, "preferred_output": [msg], "non_preferred_output": [msg]}` -> the
  `preference` format (prompt = the input's messages, chosen, rejected).
- reinforcement: `{"messages": [...ending with a user turn], <keys the grader reads>}` -> the `prompt_only`
format
  (prompt = the messages; every other key is a column the reward function reads, as `item.KEY`).

Line numbers are kept (a blank line stays blank), so a problem found in the converted file is the same line of
the uploaded one.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow_finetune_plugin.finetuning_api.shapes import APIError

MIN_EXAMPLES = 10
# method -> (the entry point that trains it, the project's data format of its rows)
METHODS = {"supervised": ("lora", "chat"), "dpo": ("dpo", "preference"),
           "reinforcement": ("grpo", "prompt_only")}
_SHOWN = 5


def _dpo_row(row: dict) -> tuple[dict | None, str | None]:
    given = row.get("input")
    if not isinstance(given, dict) or not isinstance(given.get("messages"), list):
        return None, "missing 'input' with 'messages' (a DPO row: input.messages, preferred_output, " \
                     "non_preferred_output)"
    out = {"prompt": given["messages"]}
    for key, column in (("preferred_output", "chosen"), ("non_preferred_output", "rejected")):
        value = row.get(key)
        if not isinstance(value, list) or not value:
            return None, f"missing '{key}' (a list holding one assistant message)"
        out[column] = value
    return out, None


def _rft_row(row: dict) -> tuple[dict | None, str | None]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return (
            None,
            "missing 'messages' (a reinforcement row: the messages up to the user's turn, and the keys "
            "the grader reads)",
        )
    return {"prompt": messages, **{k: v for k, v in row.items() if k != "messages"}}, None


_CONVERT = {"supervised": lambda row: (row, None), "dpo": _dpo_row, "reinforcement": _rft_row}


def write_rows(data: bytes, method: str, filename: str, out: Path, param: str) -> tuple[int, list[str]]:
    """Convert the uploaded file `data` to `method`'s project format into `out`; returns (examples, the
    columns of every row besides the format's own). Raises APIError listing the first problems with their line
    numbers."""
    lines, problems, columns = [], [], None
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            lines.append("")
            continue
        converted, problem = _CONVERT[method](json.loads(line))
        if problem:
            problems.append(f"{filename}:{number}: {problem}")
            lines.append("")
            continue
        lines.append(json.dumps(converted))
        keys = set(converted) - {"prompt", "chosen", "rejected", "messages", "tools", "parallel_tool_calls"}
        columns = keys if columns is None else columns & keys
    _raise(problems, param)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return sum(1 for line in lines if line), sorted(columns or ())


def check_rows(path: Path, method: str, filename: str, param: str, minimum: int = MIN_EXAMPLES) -> None:
    """`data check` on the converted file, without a tokenizer (lengths are checked when the run starts);
    APIError with the first errors, named by the uploaded file's line, or when there are fewer than `minimum`
    examples."""
    from mlflow_finetune_plugin.data.check import check_data

    fmt = METHODS[method][1]
    report = check_data(path, fmt=fmt, split="train" if param == "training_file" else "eval")
    _raise([f"{filename}:{i.line}: {i.message}" if i.line is not None else f"{filename}: {i.message}"
            for i in report.errors], param)
    if report.rows < minimum:
        raise APIError(400,
                       f"{filename} has {report.rows} example{'s' if report.rows != 1 else ''}; a {method} "
                       f"fine-tune needs at least {minimum}.", code="invalid_n_examples", param=param)


def _raise(problems: list[str], param: str) -> None:
    if not problems:
        return
    more = f"\n... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    raise APIError(400, f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {param}:\n"
                        + "\n".join(problems[:_SHOWN]) + more, code=f"invalid_{param}", param=param)
