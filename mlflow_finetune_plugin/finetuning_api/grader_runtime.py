"""A reinforcement job's reward function, made from OpenAI's grader: this file is copied into the job's
project as its `rewards.py` (with `GRADER` set), where `-e grpo` loads `openai_grader` like any project's
reward function.

It imports nothing of this package: the training process loads it by path. A `python` grader's source runs in
a subprocess of its own (`python -I`, a CPU-time limit and a wall-clock timeout), never in the training
process.
"""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys

GRADER: dict = {}
PYTHON_TIMEOUT_S = 10.0
# What TRL passes besides the data's columns (GRPOTrainer._calculate_rewards): not an item's keys.
_TRL = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
        "environments"}
_TEMPLATE = re.compile(r"\{\{\s*(item|sample)\.([A-Za-z0-9_.]+)\s*\}\}")
ROUGE = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_3": "rouge3", "rouge_4": "rouge4",
         "rouge_5": "rouge5", "rouge_l": "rougeL"}
METRICS = ("fuzzy_match", "bleu", *ROUGE)
OPERATIONS = ("eq", "ne", "like", "ilike")

_RUNNER = """
import json, sys
namespace = {}
exec(compile(sys.argv[1], "grader.py", "exec"), namespace)
rows = json.load(sys.stdin)
print(json.dumps([float(namespace["grade"](sample, item)) for item, sample in rows]))
"""


def render(template, item: dict, sample: dict) -> str:
    """`{{item.KEY}}` and `{{sample.output_text}}` filled in (JSON for values that are not text)."""
    def value(match):
        found = item if match.group(1) == "item" else sample
        for part in match.group(2).split("."):
            found = found.get(part) if isinstance(found, dict) else None
        return "" if found is None else found if isinstance(found, str) else json.dumps(found)

    return _TEMPLATE.sub(value, str(template))


def string_check(grader: dict, item: dict, sample: dict) -> float:
    given, reference = render(grader["input"], item, sample), render(grader["reference"], item, sample)
    operation = grader["operation"]
    if operation == "eq":
        return float(given == reference)
    if operation == "ne":
        return float(given != reference)
    if operation == "like":
        return float(reference in given)
    return float(reference.casefold() in given.casefold())


def text_similarity(grader: dict, item: dict, sample: dict) -> float:
    given, reference = render(grader["input"], item, sample), render(grader["reference"], item, sample)
    metric = grader["evaluation_metric"]
    if metric == "fuzzy_match":
        return difflib.SequenceMatcher(None, given, reference).ratio()
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.sentence_bleu(given, [reference]).score / 100
    from rouge_score import rouge_scorer

    name = ROUGE[metric]
    return rouge_scorer.RougeScorer([name]).score(reference, given)[name].fmeasure


def python_grades(grader: dict, pairs: list, timeout: float = PYTHON_TIMEOUT_S) -> list:
    """`grade(sample, item)` of the grader's source for each (item, sample), in a subprocess of its own;
    raises RuntimeError with the reason when it fails or runs past `timeout` seconds."""
    def limits():
        import resource

        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))

    try:
        done = subprocess.run([sys.executable, "-I", "-c", _RUNNER, grader["source"]],
                              input=json.dumps(pairs), capture_output=True, text=True, timeout=timeout,
                              preexec_fn=limits)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the python grader ran past its {timeout:g} s limit") from None
    if done.returncode != 0:
        raise RuntimeError("the python grader failed: " + (done.stderr.strip().splitlines()
                                                           or ["no output"])[-1])
    return json.loads(done.stdout)


def grade(grader: dict, items: list, samples: list, timeout: float = PYTHON_TIMEOUT_S) -> list:
    """One score per (item, sample)."""
    if grader["type"] == "python":
        return python_grades(grader, [[i, s] for i, s in zip(items, samples)], timeout)
    score = string_check if grader["type"] == "string_check" else text_similarity
    return [score(grader, i, s) for i, s in zip(items, samples)]


def _text(completion) -> str:
    if isinstance(completion, list):
        contents = [m.get("content") for m in completion if isinstance(m, dict) and m.get("role")
                    == "assistant"]
        return (contents[-1] if contents else "") or ""
    return "" if completion is None else str(completion)


def _column(value, n: int) -> list | None:
    """A column's values, one per completion (TRL passes lists; the evaluation may pass arrays), else None."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__") or len(value) != n:
        return None
    return value.tolist() if hasattr(value, "tolist") else list(value)


def grade_batch(prompts, completions, **kwargs) -> list:
    """The reward: GRADER's score of each completion (`sample.output_text`) against its row (`item`: the
    columns passed); None for every completion of a batch the python grader could not score (printed to
    stderr). The job's rewards.py ends with `openai_grader`, which names the columns the grader reads, so that
    training keeps them."""
    n = len(completions)
    columns = {k: c for k, v in kwargs.items() if k not in _TRL and (c := _column(v, n)) is not None}
    items = [{k: v[i] for k, v in columns.items()} for i in range(n)]
    samples = [{"output_text": _text(c)} for c in completions]
    try:
        return grade(GRADER, items, samples, PYTHON_TIMEOUT_S)
    except RuntimeError as e:
        print(f"openai_grader: {e}; this batch is not scored", file=sys.stderr)
        return [None] * n
