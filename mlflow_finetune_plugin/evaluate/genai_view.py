"""The held-out examples in MLflow's own GenAI evaluation view: every evaluation also goes through
`mlflow.genai.evaluate`, so the run's Traces/Evaluation tab lists each held-out question with the answers and
scores.

One trace per example (a static row: the answers were generated already, so there is no predict_fn and no LLM
judge, and nothing leaves the machine), logged into the active run:
- inputs: the prompt as chat messages; outputs: the tuned model's answer; expectation `expected_response`: the
  reference answer (the name MLflow's own scorers read).
- one feedback per contender and metric, named `<contender>/<metric>` (`tuned/rougeL`, `retrieval/rougeL`,
...), its
  value the per-example score the evaluation computed already (code scorers hand those back, nothing is
  rescored), and its rationale the answer that contender gave: each contender's answer sits beside its scores.
  Answers are kept out of the expectations, which MLflow shows (and its judges read) as ground truth.
The aggregates are the `eval/<contender>/<metric>` metrics already: the scorers ask MLflow for none of their
own.

This view is a convenience on top of the evaluation: it never fails it (a warning, and the run goes on).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

# Per-example scores shown as feedback, when scored (the table `eval/examples.json` has them all).
VIEW_METRICS = ("rougeL", "token_f1", "exact_match", "json_valid")
SOURCE_ID = "mlflow-finetune"


def log_genai_view(result) -> None:
    """`result` (an `EvalResult`) as one MLflow trace per example with its assessments, in the active run;
    prints one line, a warning when MLflow could not log it."""
    start = time.perf_counter()
    try:
        n = _evaluate(result)
    except Exception as e:  # the view must never cost the run its evaluation
        print(f"Warning: per-example evaluation view not logged ({type(e).__name__}: {e}); the metrics and "
              "eval/examples.json are.")
        return
    print(f"Evaluation view: {n} examples logged as MLflow traces in {time.perf_counter() - start:.1f} s.")


def view_rows(result) -> list[dict]:
    """`mlflow.genai.evaluate` rows (inputs, outputs, expectations) for the examples of `result`."""
    rows = []
    for i, row in enumerate(result.rows):
        messages = result.prompts[i] if i < len(result.prompts) else _messages(row)
        rows.append({"inputs": {"messages": _viewable(messages)}, "outputs": row.get("tuned_answer", ""),
                     "expectations": {"expected_response": row["reference"]}})
    return rows


def _viewable(messages: list[dict], side: int = 256) -> list[dict]:
    """The messages as MLflow's trace view renders them: each image part an OpenAI `image_url` part holding
    the image (a PNG data URL, at most `side` px on a side: the view shows it, the trace stays small)."""
    import base64
    import io

    from mlflow_finetune_plugin.models.image_inputs import is_image_part, part_reference, read_image

    def part(p):
        if not is_image_part(p) or part_reference(p) is None:
            return p
        image = read_image(part_reference(p))
        image.thumbnail((side, side))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return {"type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}

    return [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in messages]


def view_scorers(result) -> list:
    """One code scorer per metric, returning a feedback per contender with the score already computed."""
    from mlflow.entities import AssessmentSource, Feedback
    from mlflow.genai.scorers import scorer

    contenders = [c for c in result.contenders if any(f"{c}_answer" in row for row in result.rows)]
    metrics = [m for m in VIEW_METRICS if any(f"{c}_{m}" in row for row in result.rows for c in contenders)]
    # The harness hands a scorer its row's inputs and expectations only: find the row by them. Rows that share
    # both were answered from the same prompt (greedy) and scored against the same reference, so alike.
    by_key: dict[str, dict] = {}
    for view_row, row in zip(view_rows(result), result.rows):
        by_key.setdefault(_key(view_row["inputs"], view_row["expectations"]), row)

    def make(metric: str):
        def score(inputs, expectations):
            row = by_key[_key(inputs, expectations)]
            return [Feedback(name=f"{c}/{metric}", value=_number(row[f"{c}_{metric}"]),
                             rationale=f"{c} answered: {row[f'{c}_answer']}",
                             source=AssessmentSource(source_type="CODE", source_id=f"{SOURCE_ID}/{metric}"))
                    for c in contenders if row.get(f"{c}_{metric}") is not None]

        # aggregations=[]: no `<contender>/<metric>/mean` metrics beside the run's own
        # eval/<contender>/<metric>
        return scorer(score, name=metric, aggregations=[])

    return [make(m) for m in metrics]


def _evaluate(result) -> int:
    import mlflow

    if mlflow.active_run() is None:  # mlflow.genai.evaluate would start a run of its own
        raise RuntimeError("no active MLflow run")
    if not result.rows:
        return 0
    # MLflow's default of 10 rows at once, each with a thread per scorer, exhausts a sqlite store's connection
    # pool (5 + 10) from ~64 rows on: traces time out after 30 s and are lost. The scorers only look up
    # scores, so a few workers lose nothing. Set for this call only, then put back as they were.
    with _env(MLFLOW_GENAI_EVAL_MAX_WORKERS="2", MLFLOW_GENAI_EVAL_MAX_SCORER_WORKERS="1"):
        mlflow.genai.evaluate(data=view_rows(result), scorers=view_scorers(result))
    return len(result.rows)


@contextlib.contextmanager
def _env(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _key(inputs: dict, expectations: dict) -> str:
    return json.dumps([inputs, expectations.get("expected_response")], sort_keys=True, default=str)


def _number(value) -> float | None:
    return None if value is None else float(value)


def _messages(row: dict) -> list[dict]:
    """The chat messages of a table row whose prompt was only kept rendered (`report.table_rows`)."""
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return system + [{"role": "user", "content": row["prompt"]}]
