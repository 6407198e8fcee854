"""Promotion: a version gets the champion alias only when it beats what it would replace.

Gates (`registry.promote_if` in the recipe, or `--gate` on the command line) compare the version's
`eval/tuned/<metric>` with the prompt-only alternatives of its own source run (`eval/base/<metric>`,
`eval/fewshot/<metric>`, `eval/retrieval/<metric>`), and with the current champion's `eval/tuned/<metric>`
from the champion's source run. The default gate asks the tuned model to beat every prompt-only alternative
its run scored (zero-shot, few-shot, retrieval, the optimized prompt; one the run did not score is passed over
with the run's reason) and the champion, and follows the run's verdict (`evaluate/verdict.py`): a version
whose run the verdict does not call a pay-off (beyond the noise and by `eval.min_gain`) fails it and stays
where it is. The `arena_above` gate compares arena ratings from the playground's votes instead: the version's
95% interval must lie above the other's. `--force` moves the alias anyway and records who did it, when and why
on the version.

Before the champion alias moves, serving parity is a gate too (`registry.parity` in the recipe, `--parity`):
the
version's held-out prompts answered by the engine it will be served on must match its evaluation (`parity.py`;
the check itself is the serving layer's, handed in as `check_parity`). A version whose run recorded no answers
is passed over with the reason, as the default gates pass over an unscored contender; `off` skips it, with the
reason recorded.

The one way in for every door (the CLI, the studio, the playground, a sweep, `monitor --retrain`,
auto-promotion after training through `mlflow-finetune promote`) is `serving/parity.promote_checked`:
`promote` with that check.
"""

from __future__ import annotations

import datetime
import getpass
import os
import re
from dataclasses import dataclass, field

from mlflow import MlflowClient

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config.schema import RegistryConfig
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.metrics import ALTERNATIVES, RAG, VERDICT_PREFIX, format_table, lower_is_better
from mlflow_finetune_plugin.registry import prompts
from mlflow_finetune_plugin.registry import versions as registry
from mlflow_finetune_plugin.registry.parity import NOT_CHECKED, OFF, SKIPPED, Parity
from mlflow_finetune_plugin.registry.parity import record as record_parity

Gate = RegistryConfig.Gate
SAME_RUN = ALTERNATIVES  # contenders scored in the version's own source run
ARENA_GATE = "arena_above"  # pseudo-metric: arena ratings from playground votes, not an eval metric


@dataclass
class GateCheck:
    metric: str
    against: str            # base | fewshot | retrieval | champion | @alias | version
    mode: str               # max | min
    margin: float
    tuned: float | None
    other: float | None
    passed: bool
    note: str = ""


@dataclass
class PromotionResult:
    name: str
    version: str
    alias: str
    checks: list[GateCheck] = field(default_factory=list)
    promoted: bool = False
    forced: bool = False
    previous: str | None = None     # the version that held the alias before
    message: str = ""
    parity: Parity | None = None    # serving parity, checked before the champion alias moves

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and (self.parity is None or self.parity.passed)

    def report(self) -> str:
        """The comparison and the outcome, as printed by `mlflow-finetune promote`."""
        holder = f"v{self.previous}" if self.previous else "nobody"
        head = f"Promotion of {self.name} v{self.version} to @{self.alias} (held by {holder})"
        rows = [[c.metric, c.against, c.mode, f"{c.margin:g}", c.tuned, c.other,
                 "pass" if c.passed else "FAIL", c.note] for c in self.checks]
        table = format_table(["metric", "against", "mode", "margin", "tuned", "other", "result", "note"],
                                      rows) if rows else "no gates"
        parity = self.parity.report() if self.parity else ""
        return "\n".join(x for x in (head, table, parity, self.message) if x)


def parse_gate(text: str) -> Gate:
    """`METRIC[:MARGIN[:BEATS]]`, BEATS comma-separated (default base,fewshot,retrieval,optimized,champion):
    `rougeL:0.01`,
    `loss`, `token_f1:0:base,champion`. Lower is better for loss, perplexity and misrouted. Arena ratings from
    playground votes: `arena_above:BEATS[:MARGIN]`, e.g. `arena_above:champion`,
    `arena_above:base,champion:25` (MARGIN in Elo points). A limit on the version's own metric:
    `forgetting/ppl_ratio<=1.2`, `rougeL>=0.3` (see `limit_key`)."""
    limit = re.fullmatch(r"\s*([^<>=:\s]+)\s*(<=|>=)\s*(\S*)\s*", text)
    if limit:  # `METRIC<=LIMIT`, `METRIC>=LIMIT`: the version's own metric within a limit
        return _limit_gate(text, *limit.groups())
    parts = text.split(":")
    if parts[0] == ARENA_GATE:  # `arena_above:BEATS[:MARGIN]` reads as what it checks
        if len(parts) not in (2, 3) or not parts[1]:
            raise FinetuneError(
                f"--gate {text!r}: expected {ARENA_GATE}:BEATS[:MARGIN], e.g. {ARENA_GATE}:champion "
                "(MARGIN: Elo points between the two 95% intervals)")
        parts = [parts[0], parts[2] if len(parts) == 3 else "", parts[1]]
    if not parts[0] or len(parts) > 3:
        raise FinetuneError(
            f"--gate {text!r}: expected METRIC[:MARGIN[:BEATS]], e.g. rougeL:0.01:base,champion")
    values: dict = {"metric": parts[0]}
    try:
        if len(parts) > 1 and parts[1]:
            values["margin"] = float(parts[1])
        if len(parts) > 2:
            values["beats"] = [b.strip() for b in parts[2].split(",") if b.strip()]
        return Gate(**values)
    except ValueError as e:
        raise FinetuneError(f"--gate {text!r}: {e}") from None


def _limit_gate(text: str, metric: str, op: str, value: str) -> Gate:
    try:
        return Gate(metric=metric, **{"at_most" if op == "<=" else "at_least": float(value)})
    except ValueError:
        raise FinetuneError(f"--gate {text!r}: expected METRIC<=NUMBER or METRIC>=NUMBER, e.g. "
                            "forgetting/ppl_ratio<=1.2") from None


def limit_key(metric: str) -> str:
    """The run metric a limit gate reads: `forgetting/ppl_ratio` (or `eval/forgetting/ppl_ratio`) ->
    eval/forgetting/ppl_ratio; a name without `/` is the tuned model's: `rougeL` -> eval/tuned/rougeL."""
    metric = metric.removeprefix("eval/")
    return f"eval/{metric}" if "/" in metric else f"eval/tuned/{metric}"


def _limit_check(gate: Gate, own: dict, own_run: str | None, mv, missing: list) -> GateCheck:
    """A limit gate (`at_most` / `at_least`) on a metric of the version's own run; compares with no other
    version."""
    key = limit_key(gate.metric)
    value = own.get(key)
    if value is None:
        missing.append(f"{key} in run {own_run} (v{mv.version})")
    bounds = gate.limits
    passed = value is not None and not gate.broken_limits(value)
    return GateCheck(gate.metric, " and ".join(f"{op} {b:g}" for op, b in bounds),
                     "min" if gate.at_most is not None else "max", 0.0, value, bounds[0][1], passed,
                     "" if value is not None else "metric missing")


def recipe_gates(name: str, version: str) -> tuple[list[Gate], str]:
    """The gates and champion alias in the recipe.yaml of the version's source run (defaults if it has
    none)."""
    cfg = recipe_registry(name, version)
    return cfg.promote_if, cfg.champion_alias


def recipe_registry(name: str, version: str) -> RegistryConfig:
    """The `registry` section of the recipe.yaml of the version's source run (defaults if it has none)."""
    run_id = registry.source_run_id(registry.get_version(name, version))
    section = (registry.source_recipe(run_id) or {}).get("registry") or {}
    try:
        return RegistryConfig.model_validate({k: v for k,
                                              v in section.items() if k in RegistryConfig.model_fields})
    except ValueError as e:
        raise FinetuneError(f"registry section of the recipe of run {run_id}: {e}") from None


def check_gates(name: str, version: str, gates: list[Gate], alias: str) -> tuple[list[GateCheck], list[str]]:
    """Every gate against every contender it names; returns the checks and the metrics that are missing."""
    mv = registry.get_version(name, version)
    own_run = registry.source_run_id(mv)
    own = registry.run_metrics(own_run)
    checks, missing = [], []
    unscored = not_scored(own_run)
    verdict_asked = False  # the default comparison gate follows the verdict, once per promotion
    for gate in gates:
        if gate.metric == ARENA_GATE:
            checks += _arena_checks(name, mv, gate, alias)
            continue
        if gate.at_most is not None or gate.at_least is not None:
            checks.append(_limit_check(gate, own, own_run, mv, missing))
            continue
        mode = gate.mode or ("min" if lower_is_better(gate.metric) else "max")
        # the tuned model, or the tuned model with retrieval where the version retrieves
        served = _served(own_run)
        tuned = own.get(f"eval/{served}/{gate.metric}")
        if tuned is None:
            missing.append(f"eval/{served}/{gate.metric} in run {own_run} (v{mv.version})")
        for against in gate.beats:
            why = unscored.get(against) or (against == "optimized" and "its run did not run the prompt "
                                                                       "search") or (
                against == RAG and "its run retrieved from no documents")
            if _default_beats(gate) and why and f"eval/{against}/{gate.metric}" not in own:
                # a default gate passes over a contender its run did not score, and says why
                checks.append(GateCheck(gate.metric, against, mode, gate.margin, tuned, None, True,
                                        f"not scored in its run: {why}"))
                continue
            other, note = _other_value(name, mv, against, alias, gate.metric, own, missing)
            passed = note.startswith("pass") or (
                tuned is not None and other is not None
                and (tuned - other if mode == "max" else other - tuned) >= gate.margin - 1e-12)
            if not passed and (tuned is None or other is None):
                note = ", ".join(x for x in (note, "metric missing") if x)
            checks.append(GateCheck(gate.metric, against, mode, gate.margin, tuned, other, passed,
                                    note.removeprefix("pass: ")))
        if _default_beats(gate) and not verdict_asked:
            verdict_asked = True
            checks.append(_verdict_check(own_run, own, gate.metric, mode, tuned))
    return checks, missing


def _verdict_check(run_id: str | None, own: dict, metric: str, mode: str, tuned: float | None) -> GateCheck:
    """The run's verdict as a gate: passes when it called fine-tuning a pay-off; a run with no verdict
    (evaluated before verdicts existed) or no comparison to make (no prompt-only contender scored) is passed
    over, with why."""
    run_tags = MlflowClient().get_run(run_id).data.tags if run_id else {}
    paid, best = run_tags.get(tags.VERDICT_PAID_OFF), run_tags.get(tags.VERDICT_BEST_ALTERNATIVE) or "none"
    gain = own.get(f"{VERDICT_PREFIX}min_gain", 0.0)
    other = own.get(f"eval/{best}/{metric}")
    if paid is None:
        return GateCheck(metric, "verdict", mode, gain, tuned, other, True, "no verdict recorded in its run")
    if paid != "true" and best == "none":
        return GateCheck(metric, "verdict", mode, gain, tuned, other, True,
                         f"passed over: {run_tags.get(tags.VERDICT, 'no verdict')[:160]}")
    figures = [own.get(f"{VERDICT_PREFIX}{k}") for k in ("margin", "margin_low", "margin_high")]
    said = "" if None in figures else (f": margin {figures[0]:+.3f}, 95% interval {figures[1]:+.3f} to "
                                       f"{figures[2]:+.3f}, eval.min_gain {gain:g}")
    return GateCheck(metric, "verdict", mode, gain, tuned, other, paid == "true",
                     f"{'paid off' if paid == 'true' else 'not paid off'} over {best}{said}")


def promote(name: str, version: str, alias: str | None = None, gates: list[Gate] | None = None,
            force: bool = False, reason: str | None = None, user: str | None = None,
            parity: str | None = None, check_parity=None) -> PromotionResult:
    """Move `alias` (default: the recipe's champion alias) to `version` when every gate passes, or when
    forced. Doors do not call this: they call `serving/parity.promote_checked`, this with the serving check
    in.

    Moving the champion alias, serving parity is checked too: `parity` is the engine (transformers, vllm) or
    `off` (needs `reason`), default the recipe's `registry.parity`; `check_parity(name, version, engine,
    gates)` answers with the engine and returns a `parity.Parity` (`serving/parity.check`). Without one
    (auto_promote in the training process) parity is not checked, and the version's tags say so.
    Refuses (FinetuneError) when the version lacks lineage tags or metrics a gate needs, unless forced.
    """
    if force and not (reason or "").strip():
        raise FinetuneError("--force needs --reason TEXT: say why the gates are overridden (it is recorded)")
    if parity == OFF and not (reason or "").strip():
        raise FinetuneError(
            "--parity off needs --reason TEXT: say why the served answers are not checked against "
            "the evaluation (it is recorded)")
    if prompts.is_prompt(name):  # an optimized prompt (registry/prompts.py)
        return prompts.promote_prompt(name.removesuffix(prompts.SUFFIX), version, gates, alias, force)
    mv = registry.get_version(name, version)
    cfg = recipe_registry(name, mv.version)
    alias = alias or cfg.champion_alias
    gates = cfg.promote_if if gates is None else gates
    previous = registry.alias_holder(name, alias)
    version = str(mv.version)  # stores answer int or str
    result = PromotionResult(name, version, alias, forced=force,
                             previous=str(previous.version) if previous else None)
    result.checks, missing = check_gates(name, version, gates, alias)
    lineage = registry.missing_lineage(mv)
    if (missing or lineage) and not force:
        problems = [f"missing metric {m}" for m in missing] + [f"missing lineage tag {t}" for t in lineage]
        raise FinetuneError(
            f"cannot check the gates of {name} v{mv.version}:\n" + "\n".join("  - " + p for p in problems) +
            f"\nEvaluate it into its source run (`mlflow-finetune evaluate models:/{name}/{mv.version} "
            f"--run-id {registry.source_run_id(mv)}`), drop the gate (--gate), or override with --force "
            "--reason TEXT.")
    if result.previous == version:
        result.message = f"=> v{mv.version} already holds @{alias}; nothing to move"
        return result
    # a champion that will not move: nothing to serve
    if alias == cfg.champion_alias and (result.passed or force):
        result.parity = _served_parity(name, version, gates, parity or cfg.parity, check_parity,
                                       reason if parity == OFF else "registry.parity is off in the recipe "
                                                                    f"of run {registry.source_run_id(mv)}")
        record_parity(name, version, result.parity)
    if not (result.passed or force):
        result.message = f"=> gates failed: @{alias} stays on {_v(result.previous)}"
        return result
    _move_alias(name, version, alias, result, reason, user)
    return result


def _served_parity(name: str, version: str, gates, engine: str, check, why_off: str | None) -> Parity:
    """Serving parity for moving the champion alias: skipped (`off`, with `why_off`), not checked where no
    check was handed in, else `check`'s outcome."""
    if engine == OFF:
        return Parity(SKIPPED, note=why_off or "")
    if check is None:
        return Parity(NOT_CHECKED, engine,
                      note="promoted where no serving engine is loaded (auto_promote at the end "
                           "of training, or a caller of promote() without check_parity); `mlflow-finetune "
                           f"promote {name} --version {version}` checks it")
    return check(name, version, engine, gates)


def maybe_auto_promote(name: str, version: str, recipe, promote_with=None) -> PromotionResult | None:
    """At the end of a run: promote with the recipe's gates when `registry.auto_promote` is on; None when off.
    `promote_with`: the promotion to run, called as `promote`; a door above serving hands in the one door,
    `serving/parity.promote_checked`, which checks serving parity (a sweep does). The default is this module's
    `promote` without a parity check, for the training process, which loads no serving engine: it reaches
    `promote_checked` through `mlflow-finetune promote` where parity applies (train/publish.auto_promote).

    Never raises for a refusal: the run's work is done, the refusal is printed and returned.
    """
    import mlflow

    cfg = recipe.registry
    if not cfg.auto_promote:
        return None
    result = PromotionResult(name, str(version), cfg.champion_alias)
    if not cfg.promote_if:
        result.message = ("=> not promoted: registry.auto_promote needs gates in registry.promote_if "
                          "(auto-promoting without any would move the champion on every run)")
    else:
        try:
            result = (promote_with or promote)(name, str(version), cfg.champion_alias, cfg.promote_if,
                                                 user=f"{_user()} (auto_promote)")
        except FinetuneError as e:
            result.message = f"=> not promoted: {e}"
    print(result.report())
    if mlflow.active_run():
        mlflow.set_tag(tags.AUTO_PROMOTED, str(result.promoted).lower())
    return result


def not_scored(run_id: str | None) -> dict[str, str]:
    """contender -> why the run did not score it, from its `finetune.eval.contenders` tag
    (`report.contenders_line`: `scored a, b; not c: why; not d: why`)."""
    line = _run_tag(run_id, tags.EVAL_CONTENDERS) or ""
    return {m.group(1): m.group(2) for m in re.finditer(r"; not (\w+): (.*?)(?=; not \w+: |$)", line)}


def _other_value(name, mv, against: str, alias: str, metric: str, own: dict, missing: list) -> tuple:
    """(value to beat, note); a note starting with 'pass' decides the check without a value."""
    if against in SAME_RUN:
        key = f"eval/{against}/{metric}"
        if key not in own:
            missing.append(f"{key} in run {registry.source_run_id(mv)} (v{mv.version})")
        return own.get(key), ""
    ref = "@" + alias if against == "champion" else against
    if not (ref.startswith("@") or ref.lstrip("vV").isdigit()):
        raise FinetuneError(
            f"gate on {metric}: cannot beat {against!r}; use base, fewshot, retrieval, optimized, champion, "
            "@ALIAS or a version number")
    other = registry.alias_holder(name, ref[1:]) if ref.startswith("@") else registry.get_version(name, ref)
    if other is None:
        return None, f"pass: no {ref} yet"
    if str(other.version) == str(mv.version):
        return None, f"pass: v{mv.version} is {ref}"
    run_id = registry.source_run_id(other)
    key = f"eval/{_served(run_id)}/{metric}"
    value = registry.run_metrics(run_id).get(key)
    if value is None:
        missing.append(f"{key} in run {run_id} ({ref} = v{other.version})")
    # Scores on different eval sets do not compare; say so rather than refuse (the data may have been fixed).
    digests = {_run_tag(r, tags.EVAL_DATA_DIGEST) for r in (registry.source_run_id(mv), run_id)}
    return value, f"v{other.version}" + (", different eval data" if len(digests) > 1 else "")


def _default_beats(gate: Gate) -> bool:
    """The gate compares with the default contenders: not given, or given as the default list (a run's
    recipe.yaml writes the resolved recipe, defaults spelled out; the list before `rag` joined it too)."""
    default = Gate.model_fields["beats"].default
    return "beats" not in gate.model_fields_set or gate.beats in (default, [c for c in default if c != RAG])


def _served(run_id: str | None) -> str:
    """The contender whose answers a version gives when served: `tuned`, or `tuned-rag` for a version that
    carries its documents' chunks and retrieves (the run's `finetune.served_as`)."""
    return (_run_tag(run_id, tags.SERVED_AS) if run_id else None) or "tuned"


def _arena_checks(name: str, mv, gate: Gate, alias: str) -> list[GateCheck]:
    """The version's arena rating (votes on `name` in the playground's experiment) against each contender in
    `gate.beats`: passes when its 95% interval lies above theirs by `gate.margin` Elo points, each with enough
    votes."""
    from mlflow_finetune_plugin.arena import votes

    board = votes.ratings(votes.read_votes(name))
    own = f"{name}/{mv.version}"  # the playground's model keys
    checks = []
    for against in gate.beats:
        if against in ("fewshot", "retrieval"):
            kind = {"fewshot": "few-shot", "retrieval": "retrieved-shot"}[against]
            raise FinetuneError(
                f"gate {ARENA_GATE}: no votes are cast on {kind} prompts; beats takes champion, "
                f"base, @ALIAS or a version, e.g. --gate {ARENA_GATE}:champion")
        ref = "@" + alias if against == "champion" else against
        other = None if against == "base" else (registry.alias_holder(name, ref[1:]) if ref.startswith("@")
                                                 else registry.get_version(name, ref))
        if against != "base" and (other is None or str(other.version) == str(mv.version)):
            note = f"no {ref} yet" if other is None else f"v{mv.version} is {ref}"
            checks.append(GateCheck(ARENA_GATE, against, "max", gate.margin, None, None, True, note))
            continue
        key = f"{own}:base" if against == "base" else f"{name}/{other.version}"
        mine, theirs = board.get(own), board.get(key)
        gap = mine.lower - theirs.upper if mine and theirs else None
        if gap is None or board.too_few(mine) or board.too_few(theirs) or gap <= 0:
            passed, note = False, board.separation(own, key)[1]
        else:
            passed = gap >= gate.margin - 1e-9
            note = f"{mine.interval} above {key}'s {theirs.interval}" + ("" if passed
                                                                         else f" by only {gap:.0f}")
        checks.append(GateCheck(ARENA_GATE, against, "max", gate.margin, mine and round(mine.rating),
                                theirs and round(theirs.rating), passed, note))
    return checks


def _run_tag(run_id: str | None, key: str) -> str | None:
    return MlflowClient().get_run(run_id).data.tags.get(key) if run_id else None


def _move_alias(name: str, version: str, alias: str, result: PromotionResult, reason, user) -> None:
    client = MlflowClient()
    who, when = user or _user(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    client.set_registered_model_alias(name, alias, version)
    record = {tags.PROMOTED_ALIAS: alias, tags.PROMOTED_BY: who, tags.PROMOTED_AT: when,
              tags.PROMOTED_FROM: result.previous or ""}
    if result.forced:
        failed = [f"{c.metric} vs {c.against}" for c in result.checks if not c.passed] + (
            ["serving parity"] if result.parity and not result.parity.passed else [])
        record.update({tags.FORCED_BY: who, tags.FORCED_AT: when, tags.FORCED_REASON: reason,
                       tags.FORCED_GATES_FAILED: "; ".join(failed) or "none"})
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, value)
    result.promoted = True
    forced = f" FORCED by {who}: {reason}" if result.forced else ""
    result.message = f"=> @{alias} moved from {_v(result.previous)} to v{version}{forced}"


def _v(version: str | None) -> str:
    return f"v{version}" if version else "nobody"


def _user() -> str:
    try:
        return os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
