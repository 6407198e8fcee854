"""Serving parity, the comparison: the tuned answers a run's evaluation recorded (`report.TUNED_FILE`) against
the answers a serving engine gave to the same prompts (`serving/parity.py` asks it).

Both sides are scored by the evaluation's own scorer (`metrics.score`) on the metric the verdict weighs
(`verdict.primary_metric`), and the mean difference is weighed with the verdict's paired bootstrap: the served
score must be the evaluated one within that noise (the 95% interval of served - evaluated holds 0). And row by
row, every served answer must end as the evaluated one did: where the evaluation stopped on a stop token, the
served answer stops too, rather than being cut by the length limit or running on past the turn. The outcome is
a `registry.parity.Parity`.

A run evaluated before TUNED_FILE existed has its per-example table only (`report.TABLE_FILE`): its
single-turn rows are asked again from their text, their endings are unknown, and the outcome says what could
not be checked.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.evaluate.report import TABLE_FILE, TUNED_FILE
from mlflow_finetune_plugin.evaluate.verdict import paired_bootstrap, primary_metric
from mlflow_finetune_plugin.messages import last_user_text
from mlflow_finetune_plugin.metrics import score
from mlflow_finetune_plugin.models.answers import LENGTH, STOP
from mlflow_finetune_plugin.registry.parity import FAILED, NOT_CHECKED, PASSED, Parity, RowDiff

RAN_ON = "ran on"  # a served answer that went past a stop token the evaluation stopped on


@dataclass
class Recorded:
    """What a run's evaluation recorded of the tuned model's answers, for the served model to repeat."""

    rows: list[dict]     # each: messages, reference, answer, ending (STOP | LENGTH | None: not recorded)
    settings: dict       # max_new_tokens, num_beams, batch_size, output_format, json_schema, stop_tokens
    note: str = ""       # what this record cannot tell (an older run's table)


@dataclass
class Served:
    """One served answer, as the engine handed it to a client, and how it ended (STOP | LENGTH | RAN_ON)."""

    answer: str
    ending: str


def served_ending(ids: list[int], served_stops, evaluated_stops) -> str:
    """How a served generation (`ids`, up to and including the token it stopped on) ended: RAN_ON where it
    went past a token the evaluation stopped on (a stop token the served engine does not know), else STOP on
    one of its own `served_stops`, else LENGTH (cut at max_new_tokens)."""
    served_stops, evaluated_stops = set(served_stops), set(evaluated_stops)
    end = next((i for i, t in enumerate(ids) if t in served_stops), len(ids))
    if any(t in evaluated_stops for t in ids[:end]):
        return RAN_ON
    return STOP if end < len(ids) else LENGTH


def recorded(client, run_id: str | None, task: str | None = None) -> tuple[Recorded | None, str]:
    """(the record of the tuned answers in run `run_id`, "") or (None, why there is none). `task`: a mixture's
    per-task version, whose adapter answered that task's rows only."""
    if not run_id:
        return None, "the version names no source run (no finetune.source_run tag)"
    listed = {a.path for a in client.list_artifacts(run_id, "eval")}
    if TUNED_FILE in listed:
        data = _artifact(client, run_id, TUNED_FILE)
        rows = [r for r in data["rows"] if task is None or r.get("task") == task]
        if rows:
            return Recorded(rows, data.get("settings") or {}), ""
        return None, f"its run {run_id} recorded no held-out answers of task {task!r}"
    if TABLE_FILE in listed:
        return _from_table(client, run_id, task)
    return None, (
        f"its run {run_id} recorded no held-out answers ({TUNED_FILE}): it was not evaluated, or by "
        "another tool")


def _from_table(client, run_id: str, task: str | None) -> tuple[Recorded | None, str]:
    """An older run's per-example table: its single-turn rows rebuilt as messages, settings from its
    recipe."""
    from mlflow_finetune_plugin.config.schema import EvalConfig
    from mlflow_finetune_plugin.registry.versions import source_recipe

    table = _artifact(client, run_id, TABLE_FILE)
    rows = [dict(zip(table["columns"], values)) for values in table["data"]]
    rows = [r for r in rows if task is None or r.get("task") == task]
    # a multi-turn prompt is rendered as "role: text" lines, which cannot be turned back into messages
    # reliably
    single = [r for r in rows if r.get("tuned_answer") is not None
              and not str(r["prompt"]).startswith("user: ")]
    if not single:
        return None, (
            f"its run {run_id} predates {TUNED_FILE}, and its table holds no single-turn tuned answers "
            "to ask again")
    try:
        cfg = EvalConfig.model_validate((source_recipe(run_id) or {}).get("eval") or {})
    except ValueError:
        cfg = EvalConfig()
    settings = {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams,
                "batch_size": cfg.batch_size, "output_format": cfg.output_format,
                "json_schema": cfg.json_schema, "stop_tokens": []}
    rebuilt = [{"messages": ([{"role": "system", "content": r["system"]}] if r.get("system") else [])
                + [{"role": "user", "content": r["prompt"]}],
                "reference": r["reference"], "answer": r["tuned_answer"], "ending": None} for r in single]
    left = len(rows) - len(single)
    note = (f"its evaluation predates {TUNED_FILE}: endings were not recorded, so only the score is compared"
            + (f"; {left} multi-turn rows left out" if left else "")
            + "; evaluate it again into its source run to check the endings")
    return Recorded(rebuilt, settings, note), ""


def compare(record: Recorded, served: list[Served], engine: str, gates=None) -> Parity:
    """The outcome of serving `record`'s prompts with `engine` (`served`, one per row): PASSED when the served
    score is the evaluated one within the bootstrap's noise and every known ending matches, else FAILED with
    the rows."""
    if len(served) != len(record.rows):
        raise FinetuneError(
            f"serving parity: {len(served)} served answers for {len(record.rows)} recorded rows")
    references = [r["reference"] for r in record.rows]
    evaluated_answers, served_answers = [r["answer"] for r in record.rows], [s.answer for s in served]
    structured = (
        record.settings.get("output_format") == "json" or record.settings.get("json_schema") is not None
    )
    schema = record.settings.get("json_schema")
    evaluated_scores = score(evaluated_answers, references, schema, structured)[1]
    served_scores = score(served_answers, references, schema, structured)[1]
    metric = primary_metric(gates, {"tuned": evaluated_scores})
    parity = Parity(PASSED, engine, metric or "", rows=len(served), note=_notes(record))
    if metric is not None:
        mine, theirs = served_scores[metric], evaluated_scores[metric]
        parity.served, parity.evaluated = sum(mine) / len(mine), sum(theirs) / len(theirs)
        parity.low, parity.high = paired_bootstrap(mine, theirs)
    parity.same_text = sum(" ".join(a.split()) == " ".join(b.split())
                           for a, b in zip(served_answers, evaluated_answers))
    limit = record.settings.get("max_new_tokens")
    for i, (row, answer) in enumerate(zip(record.rows, served), start=1):
        why = _ending_difference(row.get("ending"), answer.ending, limit)
        if why:
            parity.differing.append(RowDiff(i, last_user_text(row["messages"]), row["answer"], answer.answer,
                                            row.get("ending"), answer.ending, why))
    if parity.differing or not parity.score_within_noise:
        parity.status = FAILED
    return parity


def not_checked(why: str, engine: str = "") -> Parity:
    return Parity(NOT_CHECKED, engine, note=why)


def _ending_difference(evaluated: str | None, served: str, limit) -> str:
    """Why the served ending differs from the evaluated one, in words; "" where it does not (or was not
    recorded)."""
    if served == RAN_ON:
        return ("the served answer ran on past the turn: it wrote the stop token the evaluation stopped on, "
                "and went on")
    if evaluated is None or evaluated == served:
        return ""
    if evaluated == STOP:
        return (f"the evaluated answer ended on its stop token; the served one did not stop and was cut at "
                f"max_new_tokens ({limit})")
    return "the served answer stopped where the evaluated one ran to the length limit"


def _notes(record: Recorded) -> str:
    notes = [record.note] if record.note else []
    beams = int(record.settings.get("num_beams") or 1)
    if beams > 1:
        notes.append(
            f"evaluated with beam search (num_beams {beams}); served answers are greedy, as an OpenAI "
            "chat request gets them")
    return "; ".join(notes)


def _artifact(client, run_id: str, path: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        with open(client.download_artifacts(run_id, path, tmp), encoding="utf-8") as f:
            return json.load(f)
