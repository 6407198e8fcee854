"""`monitor NAME --retrain`: the next ordinary run of a served version's recipe, on its training data and what
its traffic taught: the answers users corrected (the correction is the target), the answers they rated up,
and, where the recipe names a `distill.teacher`, the teacher's answers to the requests far from the training
questions. Answers rated down without a correction are left out. A share of those traffic rows is held out:
the new version and the
champion both answer it, and the new version is promoted only if it is not worse there *and* passes the
recipe's gates (which compare it with the champion on the old held-out set). `serve NAME@champion` follows the
alias.

The traffic rows are written to the new run's project folder (user data, where the user asked for it: the run
trains on it); the run records the trace ids it learned from, never their texts, as an artifact."""

from __future__ import annotations

import json
import random
from collections import Counter, namedtuple
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin import paths, tags
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.monitor.watch import Report

TRACES_FILE = "monitor/retrain_traces.json"
HELD_OUT_FILE = "traffic_eval.jsonl"  # in the project's data/: the traffic rows both versions answer
NOT_USER_KEYS = ("project_dir",)
Prompt = namedtuple("Prompt", "messages tools trace_id")  # what a distill teacher's `answers` reads


@dataclass
class Retrain:
    version: str                                  # the version whose traffic and recipe it starts from
    rows: list[dict] = field(default_factory=list)
    held_out: list[dict] = field(default_factory=list)
    trace_ids: list[str] = field(default_factory=list)        # of the rows trained on, in order
    held_out_ids: list[str] = field(default_factory=list)
    left_out: Counter = field(default_factory=Counter)
    project: Path | None = None

    def sentence(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in self.left_out.most_common()) or "none"
        return (
            f"From the traffic of v{self.version}: {len(self.rows)} rows to train on, {len(self.held_out)} "
            f"held out to compare with the champion; left out: {why}")


def traffic_rows(report: Report, version: str, new: set[str], teacher=None, hold_out: float = 0.25,
                 seed: int = 0) -> Retrain:
    """The rows `version`'s traffic makes (see the module's docstring), split into training and held-out
    rows."""
    out = Retrain(version)
    drifted = []
    for r in report.requests:
        if r.served != version or not r.ok or not r.prompt:
            continue
        if r.correction:
            target, why = r.correction, None
        elif r.verdict is True:
            target, why = (None, "rated up but cut at the length limit") if r.cut else (r.answer, None)
        elif r.verdict is False:
            target, why = None, "rated down with no correction"
        elif r.trace_id in new:
            drifted.append(r)
            continue
        else:
            target, why = None, "not rated (their answers are the model's own)"
        if why:
            out.left_out[why] += 1
            continue
        out.rows.append({"messages": [*r.prompt, {"role": "assistant", "content": target}]})
        out.trace_ids.append(r.trace_id)
    if drifted and teacher is None:
        out.left_out["far from the training data, and no distill.teacher to answer them"] += len(drifted)
    elif drifted:
        teacher.start()
        try:
            for prompt, answer in teacher.answers([Prompt(r.prompt, None, r.trace_id) for r in drifted]):
                if answer.get("answer", "").strip() and answer.get("finish_reason") != "length":
                    out.rows.append({"messages": [*prompt.messages,
                                                  {"role": "assistant", "content": answer["answer"]}]})
                    out.trace_ids.append(prompt.trace_id)
                else:
                    out.left_out["the teacher's answer was empty or cut"] += 1
        finally:
            teacher.close()
    order = list(range(len(out.rows)))
    random.Random(seed).shuffle(order)
    k = int(round(len(order) * hold_out)) if len(order) >= 4 else 0
    out.held_out = [out.rows[i] for i in sorted(order[:k])]
    out.held_out_ids = [out.trace_ids[i] for i in sorted(order[:k])]
    out.rows, out.trace_ids = [out.rows[i] for i in sorted(order[k:])], [out.trace_ids[i]
                                                                         for i in sorted(order[k:])]
    return out


def write_project(retrain: Retrain, recipe: dict, sources: list[str], name: str) -> Path:
    """A project folder holding the version's recipe, its training rows plus the traffic's, and the old
    held-out file named by absolute path: what `mlflow run` trains next."""
    import time

    import yaml

    from mlflow_finetune_plugin.data.read import read_records

    if not retrain.rows:
        raise FinetuneError(f"--retrain: the traffic of v{retrain.version} gives no row to learn from "
                            f"({retrain.sentence()}); collect corrections or thumbs-up first (POST "
                            "/v1/feedback)")
    folder = paths.cache_root() / "retrain" / f"{name}-v{retrain.version}-{time.strftime('%Y%m%d-%H%M%S')}"
    (folder / "data").mkdir(parents=True, exist_ok=True)
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
    retrain.project = folder
    return folder


def record_lineage(run_id: str, retrain: Retrain) -> None:
    """The trace ids the run learned from (ids only), and their count as a tag."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_tag(run_id, tags.MONITOR_RETRAINED_FROM,
                   f"{len(retrain.trace_ids)} traces of v{retrain.version}")
    client.log_dict(run_id, {"version": retrain.version, "trained_on": retrain.trace_ids,
                             "held_out": retrain.held_out_ids}, TRACES_FILE)


# ------------------------------------------------------------------------------------------------ the whole
# loop


def retrain(report: Report, name: str, params: dict | None = None, backend_config: dict | None = None,
            echo=print):
    """Train the next version from the champion's (else the newest served version's) recipe and traffic,
    compare it with the champion on the held-out traffic, and promote it through the recipe's gates when it is
    not worse there. Returns the PromotionResult, or None when it was not promoted for the traffic's sake."""
    import mlflow

    from mlflow_finetune_plugin.launchers.submit import submit
    from mlflow_finetune_plugin.registry import versions as registry
    from mlflow_finetune_plugin.registry.promotion import recipe_gates
    from mlflow_finetune_plugin.serving.parity import promote_checked

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
    project = write_project(rows, own.recipe, own.sources, name)
    method = own.recipe.get("method") or "lora"
    echo(f"Training the next version: mlflow run {project} -e {method} --backend finetune")
    submitted = submit(project, method, params, backend_config)  # waits; a failed run raises
    record_lineage(submitted.run_id, rows)
    (new,) = [v for v in mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
              if v.run_id == submitted.run_id or v.tags.get(tags.SOURCE_RUN) == submitted.run_id]
    if not _better_on_traffic(name, str(new.version), version, rows, own, echo):
        return None
    result = promote_checked(name, str(new.version), alias)  # the gates, and served as evaluated
    echo(result.report())
    return result


def _teacher(recipe: dict):
    from mlflow_finetune_plugin.config.distill import DistillConfig
    from mlflow_finetune_plugin.distill.teacher import teacher_of

    given = recipe.get("distill")
    return teacher_of(DistillConfig.model_validate(given)) if given and given.get("teacher") else None


def _better_on_traffic(name: str, new: str, old: str, rows: Retrain, own, echo) -> bool:
    """Both versions answer the held-out traffic (no prompt-only contenders): is the new one at least as good
    on the recipe's first comparing gate metric?"""
    from mlflow_finetune_plugin.evaluate.contenders import evaluate_model_uri
    from mlflow_finetune_plugin.metrics import lower_is_better
    from mlflow_finetune_plugin.registry.promotion import ARENA_GATE

    if not rows.held_out:
        echo(
            "No traffic rows held out (fewer than 4 rows): the new version is gated on the old held-out set "
            "only.")
        return True
    gates = (own.recipe.get("registry") or {}).get("promote_if") or []
    # the recipe's first comparison (a limit compares with nothing), else rougeL
    metric = next((g["metric"] for g in gates if g.get("at_most") is None and g.get("at_least") is None
                   and g.get("metric") != ARENA_GATE), "rougeL")
    scores = {}
    for version in (new, old):
        result, _ = evaluate_model_uri(f"models:/{name}/{version}", data=str(rows.project / "data"
                                                                             / HELD_OUT_FILE), contenders=[],
                                       forgetting=False, traces=False)
        scores[version] = result.metrics.get(f"eval/tuned/{metric}")
    echo(f"On {len(rows.held_out)} held-out traffic rows, {metric}: " + ", ".join(
        f"v{v} {'-' if scores[v] is None else f'{scores[v]:.4f}'}" for v in (new, old)))
    if scores[new] is None or scores[old] is None or (
            scores[new] > scores[old] if lower_is_better(metric) else scores[new] < scores[old]):
        echo(
            f"=> not promoted: v{new} is worse than v{old} on the held-out traffic (or {metric} was not "
            "scored)")
        return False
    return True
