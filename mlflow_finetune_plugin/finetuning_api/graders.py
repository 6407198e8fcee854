"""OpenAI's reinforcement graders, checked before a job starts: those that map onto a reward function
(`grader_runtime.py`: string_check, text_similarity, and python where the server allows it) are tried on the
first training row; the others are refused with the reason."""

from __future__ import annotations

import json
import keyword
from pathlib import Path

from mlflow_finetune_plugin.finetuning_api import grader_runtime as runtime
from mlflow_finetune_plugin.finetuning_api.shapes import APIError

REWARD_NAME = "openai_grader"  # the function in the job's rewards.py, named in grpo.rewards
REFUSED = {
    "score_model": "it asks a judge model for a score, and this server runs no judge: grade with "
                   "string_check, text_similarity or python, or train a reward model (-e reward) and use it "
                   "with -e grpo",
    "label_model": "it asks a judge model for a label, and this server runs no judge: grade with "
                   "string_check, text_similarity or python",
    "multi": "a combination of graders is not mapped yet: give one grader (a python grader can combine "
             "checks)",
    "endpoint": "it calls an outside endpoint for each sample: wrap it in a python grader where the server "
                "allows one",
}
_TEXT_METRICS_REFUSED = {
    "cosine": "needs an embedding model, which this server does not run",
    "gleu": "is not computed here (no offline implementation is installed)",
    "meteor": "needs NLTK's WordNet data, which is downloaded at run time",
}


def check_grader(grader, item: dict, allow_python: bool, timeout: float) -> dict:
    """The grader as the job will run it; APIError (400, param `method.reinforcement.grader`) saying why it
    cannot run: an unknown or unmapped type, a missing field, a template naming a key the rows lack, a python
    grader where the server does not allow one, or one that fails on the first row (`item`)."""
    param = "method.reinforcement.grader"

    def refuse(message: str, code: str = "invalid_grader"):
        raise APIError(400, f"grader: {message}", code=code, param=param)

    if not isinstance(grader, dict) or "type" not in grader:
        refuse("give a grader object with a type: string_check, text_similarity or python")
    kind = grader["type"]
    if kind in REFUSED:
        refuse(f"type {kind!r} is refused: {REFUSED[kind]}", "unsupported_grader")
    if kind not in ("string_check", "text_similarity", "python"):
        refuse(f"unknown type {kind!r}; this server maps string_check, text_similarity and python")
    if kind == "python":
        if not allow_python:
            refuse("python graders run code from the request, and this server was started without "
                   "--allow-python-graders", "grader_not_allowed")
        if not isinstance(grader.get("source"), str) or "def grade" not in grader["source"]:
            refuse("a python grader's source must define grade(sample, item) -> float")
    else:
        for key in ("input", "reference"):
            if not isinstance(grader.get(key), str):
                refuse(
                    f"{kind} needs {key!r}, a template such as '{{{{sample.output_text}}}}' or "
                    "'{{item.answer}}'")
            for root, name in runtime._TEMPLATE.findall(grader[key]):
                if root == "item" and name.split(".")[0] not in item:
                    refuse(
                        f"{key} reads item.{name}, and the training rows have no key {name.split('.')[0]!r} "
                        f"(they have: {', '.join(sorted(item)) or 'none'})")
                if root == "sample" and name != "output_text":
                    refuse(f"{key} reads sample.{name}; this server's samples have output_text only")
    if kind == "string_check" and grader.get("operation") not in runtime.OPERATIONS:
        refuse(f"string_check operation must be one of {', '.join(runtime.OPERATIONS)} "
               f"(got {grader.get('operation')!r})")
    if kind == "text_similarity":
        metric = grader.get("evaluation_metric")
        if metric in _TEXT_METRICS_REFUSED:
            refuse(f"evaluation_metric {metric!r} {_TEXT_METRICS_REFUSED[metric]}; use one of "
                   f"{', '.join(runtime.METRICS)}", "unsupported_grader")
        if metric not in runtime.METRICS:
            refuse(f"evaluation_metric must be one of {', '.join(runtime.METRICS)} (got {metric!r})")
    try:
        runtime.grade(grader, [item], [{"output_text": ""}], timeout)
    except Exception as e:  # noqa: BLE001 - whatever the grader raises is the reason it cannot run
        refuse(f"it failed on the first training row: {e}")
    return grader


def columns_read(grader: dict, columns: list[str]) -> list[str]:
    """The row keys the grader reads: those its templates name, or (python) every key of the rows that can be
    a Python parameter name."""
    if grader["type"] == "python":
        return [c for c in columns if c.isidentifier() and not keyword.iskeyword(c) and c not in runtime._TRL]
    named = {name.split(".")[0] for key in ("input", "reference")
             for root, name in runtime._TEMPLATE.findall(grader[key]) if root == "item"}
    return sorted(named)


def write_rewards(project: Path, grader: dict, timeout: float, columns: list[str]) -> None:
    """The job's rewards.py: the grader runtime with this grader and time limit, and `openai_grader` taking
    the columns it reads by name (training keeps only the columns its reward functions name)."""
    source = Path(runtime.__file__).read_text(encoding="utf-8")
    source = source.replace("GRADER: dict = {}",
                            f"GRADER: dict = json.loads({json.dumps(json.dumps(grader))})", 1)
    source = source.replace("PYTHON_TIMEOUT_S = 10.0", f"PYTHON_TIMEOUT_S = {float(timeout)!r}", 1)
    names = columns_read(grader, columns)
    params = "".join(f"{n}, " for n in names)
    passed = "".join(f"{n}={n}, " for n in names)
    source += (f"\n\ndef {REWARD_NAME}(prompts, completions, {params}**kwargs) -> list:\n"
               f"    return grade_batch(prompts, completions, {passed}**kwargs)\n")
    (project / "rewards.py").write_text(source, encoding="utf-8")
