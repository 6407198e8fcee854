"""`monitor NAME --retrain`: the next ordinary run of a served version's recipe, on its training data and what
its traffic taught: the answers users corrected (the correction is the target), the answers they rated up,
and, where the recipe names a `distill.teacher`, the teacher's answers to the requests far from the training
questions. Every request left out is counted by its reason (cut at the client's max_tokens, rated down with no
correction, unrated, a duplicate of a request kept, far from the training data with no teacher).

The new version is judged fairly: against the champion on a held-out share of the rows whose reference the
champion did not write (corrections and a teacher's answers; a thumbs-up answer *is* the champion's own, so it
trains but is never held out), and on the champion's own evaluation set through the recipe's gates. It is
promoted only if it is not worse on the first *and* passes the second; otherwise it stays on @challenger.
`serve NAME@champion` follows the alias.

The run's project (its recipe and the rows, users' words among them) lives in a temporary folder removed after
the run (`keep` keeps it); the rows are logged as the run's own artifacts (RETRAIN_DATA), where the next
`monitor` reads this version's training questions from, and the trace ids it learned from as TRACES_FILE."""

from __future__ import annotations

import json
import random
from collections import Counter, namedtuple
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.monitor.lineage import RETRAIN_DATA
from mlflow_finetune_plugin.monitor.watch import Report

TRACES_FILE = "monitor/retrain_traces.json"
HELD_OUT_FILE = "traffic_eval.jsonl"  # in the project's data/: the traffic rows both versions answer
NOT_USER_KEYS = ("project_dir",)
Prompt = namedtuple("Prompt", "messages tools trace_id")  # what a distill teacher's `answers` reads
# The kinds of traffic rows; only those whose reference the champion did not write are ever held out.
CORRECTION, TEACHER, LIKED = "correction", "teacher", "liked"
COMPARED = (CORRECTION, TEACHER)
KIND_WORDS = {CORRECTION: "corrections", TEACHER: "teacher's answers", LIKED: "thumbs-up answers"}
# Why a request makes no row: key (the --json output's) -> the words of the printed output.
LEFT_OUT = {
    "cut": "rated up but cut at the client's max_tokens (finish_reason length)",
    "rated_down": "rated down with no correction",
    "unrated": "not rated (their answers are the model's own)",
    "duplicate": "the same messages as a request already kept",
    "no_teacher": "far from the training data, and no distill.teacher to answer them",
    "teacher_failed": "the teacher's answer was empty or cut",
}


@dataclass
class Retrain:
    version: str                                  # the version whose traffic and recipe it starts from
    rows: list[dict] = field(default_factory=list)
    held_out: list[dict] = field(default_factory=list)
    trace_ids: list[str] = field(default_factory=list)        # of the rows trained on, in order
    held_out_ids: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)            # of the rows trained on: CORRECTION, ...
    held_out_kinds: list[str] = field(default_factory=list)
    left_out: Counter = field(default_factory=Counter)        # LEFT_OUT key -> requests
    project: Path | None = None

    def sentence(self) -> str:
        why = ", ".join(f"{n} {LEFT_OUT[key]}" for key, n in self.left_out.most_common()) or "none"
        return (
            f"From the traffic of v{self.version}: {len(self.rows)} rows to train on ({_kinds(self.kinds)}), "
            f"{len(self.held_out)} held out to compare with the champion ({_kinds(self.held_out_kinds)}); "
            f"left out: {why}")

    def as_dict(self) -> dict:
        return {"trained_on": dict(Counter(self.kinds)), "held_out": dict(Counter(self.held_out_kinds)),
                "left_out": {key: self.left_out.get(key, 0) for key in LEFT_OUT}}


def _kinds(kinds: list[str]) -> str:
    counts = Counter(kinds)
    shown = [f"{counts[k]} {KIND_WORDS[k]}" for k in (CORRECTION, TEACHER, LIKED) if counts[k]]
    return ", ".join(shown) or "none"


def traffic_rows(report: Report, version: str, new: set[str], teacher=None, hold_out: float = 0.25,
                 seed: int = 0) -> Retrain:
    """The rows `version`'s traffic makes (see the module's docstring): corrections, then thumbs-up answers,
    then a teacher's answers to the drifted requests; a request whose messages a row already has is a
    duplicate. A `hold_out` share of the corrections and teacher's answers (none under 4 of them) is held out;
    thumbs-up answers always train."""
    out = Retrain(version)
    found: dict[str, list] = {CORRECTION: [], LIKED: [], TEACHER: []}
    for r in report.requests:
        if r.served != version or not r.ok or not r.prompt:
            continue
        if r.correction:
            found[CORRECTION].append((r, r.correction))
        elif r.verdict is True:
            if r.cut:
                out.left_out["cut"] += 1
            else:
                found[LIKED].append((r, r.answer))
        elif r.verdict is False:
            out.left_out["rated_down"] += 1
        elif r.trace_id in new:
            found[TEACHER].append((r, None))
        else:
            out.left_out["unrated"] += 1
    seen: set[str] = set()
    rows, ids, kinds = [], [], []
    for kind in (CORRECTION, LIKED, TEACHER):
        fresh = []
        for r, target in found[kind]:
            key = json.dumps(r.prompt, sort_keys=True, ensure_ascii=False)
            if key in seen:
                out.left_out["duplicate"] += 1
                continue
            seen.add(key)
            fresh.append((r.prompt, r.trace_id, target))
        if kind == TEACHER:
            fresh = _taught(fresh, teacher, out.left_out)
        for prompt, trace_id, target in fresh:
            rows.append({"messages": [*prompt, {"role": "assistant", "content": target}]})
            ids.append(trace_id)
            kinds.append(kind)
    comparable = [i for i, kind in enumerate(kinds) if kind in COMPARED]
    random.Random(seed).shuffle(comparable)
    held = set(comparable[:int(round(len(comparable) * hold_out))] if len(comparable) >= 4 else [])
    for i, (row, trace_id, kind) in enumerate(zip(rows, ids, kinds)):
        if i in held:
            out.held_out.append(row), out.held_out_ids.append(trace_id), out.held_out_kinds.append(kind)
        else:
            out.rows.append(row), out.trace_ids.append(trace_id), out.kinds.append(kind)
    return out


def _taught(asked: list[tuple], teacher, left_out: Counter) -> list[tuple]:
    """(prompt, trace id, the teacher's answer) for the drifted requests it answered in full."""
    if asked and teacher is None:
        left_out["no_teacher"] += len(asked)
    if not asked or teacher is None:
        return []
    out = []
    teacher.start()
    try:
        for prompt, answer in teacher.answers([Prompt(p, None, t) for p, t, _ in asked]):
            if answer.get("answer", "").strip() and answer.get("finish_reason") != "length":
                out.append((prompt.messages, prompt.trace_id, answer["answer"]))
            else:
                left_out["teacher_failed"] += 1
    finally:
        teacher.close()
    return out


def write_project(retrain: Retrain, recipe: dict, sources: list[str], name: str) -> Path:
    """A temporary project folder (the caller removes it) holding the version's recipe, its training rows plus
    the traffic's, and the old held-out file named by absolute path: what `mlflow run` trains next."""
    import tempfile

    import yaml

    from mlflow_finetune_plugin.data.read import read_records

    if not retrain.rows:
        raise FinetuneError(f"--retrain: the traffic of v{retrain.version} gives no row to learn from "
                            f"({retrain.sentence()}); collect corrections or thumbs-up first (POST "
                            "/v1/feedback)")
    folder = Path(tempfile.mkdtemp(prefix=f"mlflow-finetune-retrain-{name}-v{retrain.version}-"))
    retrain.project = folder
    (folder / "data").mkdir()
    old_dir = Path(recipe.get("project_dir") or ".")
    data = dict(recipe.get("data") or {})
    with open(folder / "data" / "train.jsonl", "w", encoding="utf-8") as f:
        for source in sources:
            for _, record in read_records(source):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        for row in retrain.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(folder / "data" / HELD_OUT_FILE, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in retrain.held_out)
    data["train"] = "data/train.jsonl"
    data["format"] = "auto" if len(sources) != 1 else data.get("format", "auto")
    if isinstance(data.get("eval"), str) and (old_dir / data["eval"]).exists():
        data["eval"] = str((old_dir / data["eval"]).resolve())
    fixed = {k: v for k, v in recipe.items() if k not in NOT_USER_KEYS}
    fixed["data"] = data
    fixed["registry"] = {**(recipe.get("registry") or {}), "name": name, "auto_promote": False}
    (folder / "finetune.yaml").write_text(yaml.safe_dump(fixed, sort_keys=False))
    return folder


def record_lineage(run_id: str, retrain: Retrain) -> None:
    """The trace ids the run learned from (ids only) and their count as a tag; the project's rows as the
    run's artifacts (RETRAIN_DATA), the one copy kept once the folder is gone."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_tag(run_id, tags.MONITOR_RETRAINED_FROM,
                   f"{len(retrain.trace_ids)} traces of v{retrain.version}")
    client.log_dict(run_id, {"version": retrain.version, "trained_on": retrain.trace_ids,
                             "held_out": retrain.held_out_ids, "counts": retrain.as_dict()}, TRACES_FILE)
    client.log_artifacts(run_id, str(retrain.project / "data"), RETRAIN_DATA)


@dataclass
class Outcome:
    """What `--retrain` did: the version trained, whether it took the champion alias, and what it was compared
    on (`compared`: held-out corrections, teacher's answers, and the champion's evaluation rows)."""

    source: str                                   # the version retrained from
    version: str                                  # the new one
    alias: str
    promoted: bool
    why: str
    rows: Retrain
    metric: str | None = None
    scores: dict = field(default_factory=dict)    # version -> the metric on the held-out traffic rows
    eval_rows: int | None = None                  # the champion's evaluation set, compared by the gates
    kept: str | None = None                       # the project folder, with --keep

    def as_dict(self) -> dict:
        held = Counter(self.rows.held_out_kinds)
        return {"from_version": self.source, "version": self.version, "alias": self.alias,
                "promoted": self.promoted, "why": self.why, **self.rows.as_dict(),
                "compared": {"corrections": held[CORRECTION], "teacher_answers": held[TEACHER],
                             "evaluation_set": self.eval_rows},
                "metric": self.metric, "scores": {f"v{v}": s for v, s in self.scores.items()},
                "project": self.kept}


# ------------------------------------------------------------------------------------------------ the whole
# loop


def retrain(report: Report, name: str, params: dict | None = None, backend_config: dict | None = None,
            echo=print, keep: bool = False) -> Outcome:
    """Train the next version from the champion's (else the newest served version's) recipe and traffic,
    compare it with the champion on the held-out traffic, and promote it through the recipe's gates when it is
    not worse there. The project folder is removed afterwards unless `keep`. Raises FinetuneError when no run
    could be trained."""
    import shutil

    from mlflow_finetune_plugin.registry import versions as registry
    from mlflow_finetune_plugin.registry.promotion import recipe_gates

    served = sorted({r.version for r in report.requests if not r.base}, key=int)
    if not served:
        raise FinetuneError(f"--retrain: no traffic of a version of {name} to learn from")
    _, alias = recipe_gates(name, served[-1])
    holder = registry.alias_holder(name, alias)
    version = str(holder.version) if holder is not None and str(holder.version) in served else served[-1]
    own = report.lineages[version]
    if own.missing:
        raise FinetuneError(
            f"--retrain: the training data of v{version} cannot be read ({own.missing}); the next "
            "run needs it beside the traffic")
    rows = traffic_rows(report, version, report.new_ids, _teacher(own.recipe))
    echo(rows.sentence())
    try:
        write_project(rows, own.recipe, own.sources, name)
        outcome = _train_and_judge(name, version, alias, rows, own, params, backend_config, echo)
    finally:
        if rows.project is not None and not keep:
            shutil.rmtree(rows.project, ignore_errors=True)
        elif rows.project is not None:
            echo(f"Kept the run's project (users' rows among its data) at {rows.project}: remove it when "
                 "done.")
    outcome.kept = str(rows.project) if keep else None
    return outcome


def _train_and_judge(name, version, alias, rows: Retrain, own, params, backend_config, echo) -> Outcome:
    import mlflow
    from mlflow.exceptions import ExecutionException

    from mlflow_finetune_plugin.launchers.submit import submit
    from mlflow_finetune_plugin.serving.parity import promote_checked

    method = own.recipe.get("method") or "lora"
    echo(f"Training the next version: mlflow run {rows.project} -e {method} --backend finetune")
    try:
        submitted = submit(rows.project, method, params, backend_config)  # waits
    except ExecutionException as e:
        raise FinetuneError(f"--retrain: the run of the next version failed ({str(e).splitlines()[0]}); "
                            "its error is in the run's error.txt") from None
    record_lineage(submitted.run_id, rows)
    (new,) = [v for v in mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
              if v.run_id == submitted.run_id or v.tags.get(tags.SOURCE_RUN) == submitted.run_id]
    outcome = Outcome(version, str(new.version), alias, False, "", rows,
                      eval_rows=_eval_rows(rows.project))
    if not _better_on_traffic(name, outcome, own, echo):
        return outcome
    result = promote_checked(name, outcome.version, alias)  # the gates, and served as evaluated
    echo(result.report())
    outcome.promoted = result.promoted
    outcome.why = (f"promoted to @{alias}" if result.promoted
                   else f"kept on @challenger: the gates against v{version} did not pass")
    return outcome


def _eval_rows(project: Path) -> int | None:
    """The rows of the champion's evaluation set both runs were evaluated on (the project's data.eval, a JSONL
    file, at most eval.max_examples); None when it is a split of the train file or not JSONL."""
    import yaml

    recipe = yaml.safe_load((project / "finetune.yaml").read_text())
    given = (recipe.get("data") or {}).get("eval")
    path = Path(given) if isinstance(given, str) else None
    if path is None or not path.is_absolute() or not path.exists() or path.suffix != ".jsonl":
        return None
    with open(path, encoding="utf-8") as f:
        rows = sum(1 for line in f if line.strip())
    most = (recipe.get("eval") or {}).get("max_examples")
    return min(rows, most) if most else rows


def _teacher(recipe: dict):
    from mlflow_finetune_plugin.config.distill import DistillConfig
    from mlflow_finetune_plugin.distill.teacher import teacher_of

    given = recipe.get("distill")
    return teacher_of(DistillConfig.model_validate(given)) if given and given.get("teacher") else None


def _better_on_traffic(name: str, outcome: Outcome, own, echo) -> bool:
    """Both versions answer the held-out traffic rows, corrections and teacher's answers only (no prompt-only
    contenders): is the new one at least as good on the recipe's first comparing gate metric?"""
    from mlflow_finetune_plugin.evaluate.contenders import evaluate_model_uri
    from mlflow_finetune_plugin.metrics import lower_is_better
    from mlflow_finetune_plugin.registry.promotion import ARENA_GATE

    rows, new, old = outcome.rows, outcome.version, outcome.source
    against = ("the champion's evaluation set" + (f" ({outcome.eval_rows} rows)" if outcome.eval_rows
                                                  else "") + ", through the recipe's gates")
    if not rows.held_out:
        echo(f"No traffic rows held out (fewer than 4 corrections and teacher's answers; thumbs-up answers "
             f"are the champion's own and never held out): v{new} is compared with v{old} on {against} only.")
        return True
    gates = (own.recipe.get("registry") or {}).get("promote_if") or []
    # the recipe's first comparison (a limit compares with nothing), else rougeL
    metric = outcome.metric = next((g["metric"] for g in gates if g.get("at_most") is None
                                    and g.get("at_least") is None and g.get("metric") != ARENA_GATE),
                                   "rougeL")
    scores = outcome.scores
    for version in (new, old):
        result, _ = evaluate_model_uri(f"models:/{name}/{version}", data=str(rows.project / "data"
                                                                             / HELD_OUT_FILE), contenders=[],
                                       forgetting=False, traces=False)
        scores[version] = result.metrics.get(f"eval/tuned/{metric}")
    echo(f"Compared on {len(rows.held_out)} held-out traffic rows whose reference v{old} did not write "
         f"({_kinds(rows.held_out_kinds)}), {metric}: " + ", ".join(
             f"v{v} {'-' if scores[v] is None else f'{scores[v]:.4f}'}" for v in (new, old))
         + f"; then on {against}.")
    if scores[new] is None or scores[old] is None or (
            scores[new] > scores[old] if lower_is_better(metric) else scores[new] < scores[old]):
        outcome.why = (f"kept on @challenger: v{new} is worse than v{old} on the held-out traffic (or "
                       f"{metric} was not scored)")
        echo(f"=> not promoted, {outcome.why}")
        return False
    return True
