"""An LLM judge over served answers (`monitor --judge`), through MLflow's judges:
`mlflow.genai.judges.make_judge`
with a yes/no verdict, run on each traced request the way MLflow's online scoring runs it (the trace given,
the request and the answer read from its root span), so the judge's numbers on demand and online agree.

The judge's model is one of:
- `gateway:/ENDPOINT`: an endpoint of the tracking server's AI Gateway (needs `mlflow server`);
- an OpenAI-compatible base URL, `http://HOST:PORT/v1` (a teacher served by `mlflow-finetune serve`, vLLM,
...),
  called directly on demand, and through a gateway endpoint made for it online (monitor/online.py);
- any model URI MLflow's judges call natively (`openai:/gpt-4o-mini`, `anthropic:/...` with the provider's
key). A registered model (`models:/NAME@ALIAS`) is not something MLflow's judges can call: it is served first.

Each verdict is stored on its trace as a feedback assessment named `finetune_judge.NAME`, as MLflow's own
scoring of stored traces does (`mlflow.genai.evaluate` on traces, the server's online scorers); `monitor`
without `--judge` reads those back."""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.monitor import gateway

PREFIX = "finetune_judge"  # the verdicts' assessment name (and the online scorer's): finetune_judge.NAME
DEFAULT_INSTRUCTIONS = (
    "You review one answer of a fine-tuned assistant in production. The request sent to it: {{ inputs }}. "
    "Its response, an OpenAI chat completion whose answer is choices[0].message.content: {{ outputs }}. "
    "Return true when the answer responds to the user's last message, is correct as far as you can tell, "
    "stays on the request's topic and language, and is complete (not empty, not cut off); otherwise return "
    "false.")
# MLflow's judge errors that concern one trace (the others, a model that does not answer, stop the pass).
_PER_TRACE = {"Failed to parse response": "the judge's reply was not its JSON verdict",
              "ontext window exceeded": "too long for the judge's context",
              "context length": "too long for the "
                                "judge's context"}
REGISTERED_FIX = (
    "MLflow's judges call a model through an endpoint, not from the registry (MLflow says: \"No "
    "suitable adapter found for model_uri='{uri}'\"). Serve it and judge through its URL: "
    "`mlflow-finetune serve {model} --port 8001`, then --judge http://127.0.0.1:8001/v1 "
    "--judge-model {model}")


@dataclass(frozen=True)
class JudgeSpec:
    """Which model judges, and by which criteria (`instructions` name {{ inputs }} and {{ outputs }})."""

    model: str                           # gateway:/ENDPOINT | http(s)://HOST:PORT/v1 | PROVIDER:/MODEL
    model_name: str | None = None        # the model asked for at a URL (None: the first its /models lists)
    instructions: str = DEFAULT_INSTRUCTIONS

    @property
    def url(self) -> str | None:
        return self.model.rstrip("/") if self.model.startswith(("http://", "https://")) else None

    @property
    def label(self) -> str:
        return f"{self.url} ({self.model_name})" if self.url and self.model_name else self.model


def judge_name(name: str) -> str:
    """The assessment name of the verdicts on registered model `name`'s traffic."""
    return f"{PREFIX}.{name}"


def spec_of(judge: str, model_name: str | None = None, instructions: str | None = None) -> JudgeSpec:
    """`--judge`, `--judge-model` and `--judge-instructions` as a JudgeSpec; forms MLflow cannot call are
    refused with the fix."""
    judge = judge.strip()
    if judge.startswith("models:/"):
        model = judge[len("models:/"):]
        raise FinetuneError(f"--judge {judge}: " + REGISTERED_FIX.format(uri=judge, model=model))
    if not (judge.startswith(("http://", "https://")) or (":/" in judge and judge.split(":/", 1)[1])):
        raise FinetuneError(
            f"--judge {judge}: give gateway:/ENDPOINT (an AI Gateway endpoint of the tracking "
            "server), an OpenAI-compatible base URL (http://HOST:PORT/v1), or a model URI MLflow's "
            "judges take (openai:/gpt-4o-mini)")
    if model_name and not judge.startswith(("http://", "https://")):
        raise FinetuneError(f"--judge-model {model_name}: only an OpenAI-compatible URL takes a model name; "
                            f"{judge} names its model already")
    return JudgeSpec(judge, model_name, instructions or DEFAULT_INSTRUCTIONS)


def ready(spec: JudgeSpec) -> JudgeSpec:
    """`spec` checked before any trace is judged (a judge that does not answer would be retried for minutes on
    every trace): its URL answers (and the model to ask for is known), or its gateway endpoint exists."""
    if spec.url:
        listed = served_model(spec.url)
        return spec if spec.model_name else replace(spec, model_name=listed)
    if spec.model.startswith("gateway:/"):
        gateway.check_endpoint(spec.model[len("gateway:/"):])
    return spec


def served_model(url: str) -> str:
    """The first model an OpenAI-compatible server lists at /models (checks that it answers)."""
    import httpx

    key = os.environ.get(gateway.KEY_ENV)
    try:
        got = httpx.get(f"{url}/models", headers={"Authorization": "Bearer "
                                                                   f"{key}"} if key else {}, timeout=10,
                        trust_env=False)
        models = [m["id"] for m in got.json().get("data", [])] if got.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FinetuneError(
            f"--judge {url} does not answer ({type(e).__name__}: {e}): start the judge's server "
            "(e.g. `mlflow-finetune serve NAME@champion --port 8001`), or give its "
            "OpenAI-compatible base URL, ending in /v1") from None
    if not models:
        raise FinetuneError(
            f"--judge {url}: its /models answered {got.status_code} with no model; name the model "
            "to ask for with --judge-model NAME")
    return models[0]


def build(spec: JudgeSpec, name: str, model_uri: str | None = None):
    """The MLflow judge of `name`'s answers (a `make_judge` judge, its verdict a bool); `model_uri` replaces
    the spec's model (online: the gateway endpoint made for a URL)."""
    from mlflow.exceptions import MlflowException
    from mlflow.genai.judges import make_judge

    base_url = None
    if model_uri is None and spec.url:
        # MLflow 3.17 routes openai:/ through its gateway adapter, which posts to base_url as given: the full
        # chat-completions address, not a base to append to.
        model_uri, base_url = f"openai:/{spec.model_name}", f"{spec.url}/chat/completions"
    try:
        return make_judge(name=judge_name(name), instructions=spec.instructions,
                          model=model_uri or spec.model, feedback_value_type=bool, base_url=base_url,
                          description=f"Whether an answer of a served version of {name} is acceptable")
    except MlflowException as e:
        raise FinetuneError(
            f"--judge-instructions: MLflow refused them ({e.message}); they name {{{{ inputs }}}} "
            "(the request) and {{ outputs }} (the answer)") from None


def judged(requests: list, judge: JudgeSpec | str, *, name: str, notes: list[str] | None = None,
           store: bool = True) -> dict[str, bool]:
    """trace id -> whether the judge passes the answer, for every answered request; requests the judge could
    not judge are left out and counted in `notes`. `store`: each verdict is logged on its trace."""
    import mlflow
    from mlflow.exceptions import MlflowException

    spec = ready(judge if isinstance(judge, JudgeSpec) else spec_of(judge))
    scorer = build(spec, name)
    out: dict[str, bool] = {}
    left: Counter = Counter()
    unstored = 0
    with _openai_key(spec):
        for r in requests:
            if not r.ok:
                left["the request failed"] += 1
                continue
            trace = mlflow.get_trace(r.trace_id)
            try:
                feedback = scorer(trace=trace)
            except MlflowException as e:
                left[_per_trace(e, spec, out)] += 1
                continue
            verdict = passes(feedback.value) if feedback.error is None else None
            if verdict is None:
                left["no yes/no verdict"] += 1
                continue
            out[r.trace_id] = verdict
            if store and not _stored(trace, feedback):
                unstored += 1
    if notes is not None:
        notes.append(_summary(spec, len(out), left, unstored))
    if not out and left and set(left) != {"the request failed"}:
        raise FinetuneError(
            f"--judge {spec.label}: no answer could be judged ({_counts(left)}); the judge must "
            "reply with the JSON verdict MLflow's judges ask for ({\"result\": true|false, "
            "\"rationale\": ...}): use a model that follows instructions")
    return out


def _per_trace(e, spec: JudgeSpec, done: dict) -> str:
    """The reason a trace is left out; raises FinetuneError for an error that no other trace would escape."""
    message = getattr(e, "message", str(e))
    for marker, reason in _PER_TRACE.items():
        if marker in message:
            return reason
    raise FinetuneError(f"--judge {spec.label}: the judge failed after {len(done)} verdicts (MLflow: "
                        f"{message.splitlines()[0][:500]}); check that the judge's model answers") from None


def _stored(trace, feedback) -> bool:
    """Log `feedback` on `trace`'s root span, as MLflow's evaluation harness does; False when the store
    refuses."""
    import mlflow
    from mlflow.exceptions import MlflowException

    root = next((s for s in trace.data.spans if s.parent_id is None), None)
    feedback.trace_id = trace.info.trace_id
    feedback.span_id = root.span_id if root is not None else None
    try:
        mlflow.log_assessment(trace_id=trace.info.trace_id, assessment=feedback)
    except MlflowException:
        return False
    return True


@contextmanager
def _openai_key(spec: JudgeSpec):
    """MLflow's openai provider refuses to start without $OPENAI_API_KEY, even for a server that takes no key:
    for a
    URL judge, "unused" stands in while judging when it is not set."""
    if not spec.url or os.environ.get(gateway.KEY_ENV):
        yield
        return
    os.environ[gateway.KEY_ENV] = "unused"
    try:
        yield
    finally:
        os.environ.pop(gateway.KEY_ENV, None)


def passes(value) -> bool | None:
    """A judge's value as pass/fail: a bool, or yes/no, true/false, pass/fail text; None for anything else."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if value is not None else ""
    return True if text in ("yes", "true", "pass") else False if text in ("no", "false", "fail") else None


def verdict_of(assessments, name: str) -> bool | None:
    """The latest valid verdict of `name`'s judge among a trace's assessments (online or on demand); None when
    there is none."""
    wanted, verdict = judge_name(name), None
    for a in sorted(assessments or [], key=lambda a: a.last_update_time_ms or a.create_time_ms or 0):
        if a.name != wanted or a.feedback is None or getattr(a, "valid", True) is False or a.feedback.error:
            continue
        if (got := passes(a.feedback.value)) is not None:
            verdict = got
    return verdict


def stored(requests: list, name: str, notes: list[str]) -> dict[str, bool] | None:
    """The verdicts stored on the requests' traces (by the online judge, or an earlier `--judge`); None
    without."""
    got = {r.trace_id: r.judge for r in requests if getattr(r, "judge", None) is not None}
    if got:
        notes.append(
            f"judge_pass: the verdicts {judge_name(name)} stored on {len(got)} of {len(requests)} traces "
            "(the online judge's, or an earlier --judge's)")
    return got or None


def _summary(spec: JudgeSpec, n: int, left: Counter, unstored: int) -> str:
    said = f"judge_pass: {n} answers judged by {spec.label} on demand"
    said += f"; left out: {_counts(left)}" if left else ""
    return said + (f"; {unstored} verdicts could not be stored on their traces" if unstored else "")


def _counts(left: Counter) -> str:
    return ", ".join(f"{k} ({v})" for k, v in left.most_common())
