"""The optimized contender's prompt in MLflow's Prompt Registry: kept, versioned and served like a model
version.

A run whose evaluation scored the `optimized` contender (`evaluate/prompt_search.py`) registers its
instruction and shots as a new version of `<registry.name>-prompt`: a chat template (the instruction as a
system message, the shots as turns, the question as `{{question}}`), tagged with the run and the base model,
linked to the run, with the alias `candidate`. `champion` moves only through the recipe's gates, read as they
are read for a model version but on the prompt's own scores (`eval/optimized/<metric>` of its run): against
base, fewshot and retrieval of the same run and against the champion prompt's run. Limits on forgetting (a
metric with `/`) do not apply: a prompt changes no weight.

`apply_prompt` is what serving does with a prompt of fixed shots: the client's messages with the instruction
after their system message and the shots before their turns. A winner with retrieved shots registers its
instruction, and its tags name the shot pool its run logged (`finetune.prompt.shot_pool`,
`eval/optimized_shot_pool.jsonl`: the train conversations it drew from) and how many it takes; `served_prompt`
loads that pool, and serving retrieves from it per request (`serving/prompted.py`). Where the run could not
keep a pool (train rows read from traces are not copied), the prompt keeps its instruction only and its tags
say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.messages import fewshot_prompt, with_instruction

SUFFIX, CANDIDATE = "-prompt", "candidate"
QUESTION = "{{question}}"
PREFIX = "prompts:/"
SAME_RUN = ("base", "fewshot", "retrieval")  # what a prompt is weighed against in its own run


def prompt_name(model_name: str) -> str:
    return f"{model_name}{SUFFIX}"


def template_of(record: dict) -> list[dict]:
    """The chat template of an optimized prompt (`report.optimized_record`)."""
    turns = [m for shot in record.get("shots") or [] for m in shot if m.get("role") != "system"]
    return ([{"role": "system", "content": record.get("instruction") or ""}] + turns
            + [{"role": "user", "content": QUESTION}])


def parts_of(template) -> tuple[str | None, list[list[dict]]]:
    """(instruction, shots as one conversation) of a registered template: the inverse of `template_of`."""
    messages = list(template) if isinstance(template, list) else [{"role": "user", "content": QUESTION}]
    instruction = messages[0].get("content") if messages and messages[0].get("role") == "system" else None
    turns = [m for m in messages if m.get("role") != "system" and m.get("content") != QUESTION]
    return instruction or None, [turns] if turns else []


def apply_prompt(messages: list[dict], template, shots: list[list[dict]] | None = None) -> list[dict]:
    """The client's `messages` asked with the registered prompt: its instruction after their system message,
    its shots (or `shots`, retrieved for these messages) before their turns."""
    instruction, own = parts_of(template)
    return fewshot_prompt(with_instruction(messages, instruction), own if shots is None else shots)


def register_optimized(model_name: str, record: dict, run_id: str, base_model: str, model_version=None):
    """Register `record` as a new version of `<model_name>-prompt` with alias `candidate`, linked to
    `run_id`."""
    import mlflow
    from mlflow import MlflowClient

    pool = record.get("shot_pool")
    version_tags = {tags.PROMPT_SOURCE_RUN: run_id, tags.PROMPT_BASE_MODEL: base_model,
                    tags.PROMPT_SHOTS: str(len(record.get("shots") or []))}
    if record.get("retrieved_shots"):
        version_tags[tags.PROMPT_SHOTS] = (
            f"retrieved: the {record.get('retrieval_k')} nearest of {record.get('shot_pool_rows')} train "
            "conversations" if pool
            else f"retrieved (not kept: instruction only; {record.get('shot_pool_note')})")
    if pool:
        version_tags.update({tags.PROMPT_SHOT_POOL: pool,
                             tags.PROMPT_RETRIEVAL_K: str(record.get("retrieval_k"))})
    if model_version is not None:
        version_tags[tags.PROMPT_MODEL_VERSION] = f"{model_name}/{model_version}"
    version = mlflow.genai.register_prompt(prompt_name(model_name), template_of(record),
                                           commit_message=(record.get("reason") or "")[:500],
                                           tags=version_tags)
    mlflow.genai.set_prompt_alias(prompt_name(model_name), CANDIDATE, version.version)
    MlflowClient().link_prompt_version_to_run(run_id, version)
    return version


@dataclass
class ServedPrompt:
    """A registered prompt as `serve --prompt` serves it: version `version` of `prompt_name`, under `name`
    (and `alias_key`, when given by alias), on the base model of `model_version`."""

    prompt_name: str
    version: str
    template: list
    model_version: str | None
    alias_key: str | None = None
    base_model: str | None = None
    source_run: str | None = None
    pool: list = field(default_factory=list)  # retrieved shots: the train conversations they are drawn from
    k: int = 0                                # and how many per question

    @property
    def name(self) -> str:
        """The served model name: `NAME-prompt-vN`."""
        return f"{self.prompt_name}-v{self.version}"


def served_prompt(uri: str) -> ServedPrompt:
    """`prompts:/NAME-prompt@ALIAS` or `prompts:/NAME-prompt/N` from the registry, as `serve --prompt` serves
    it (with its shot pool, for a prompt whose shots are retrieved)."""
    import json

    import mlflow

    from mlflow_finetune_plugin.errors import FinetuneError
    from mlflow_finetune_plugin.models.vision import first_line

    text = uri if uri.startswith(PREFIX) else PREFIX + uri
    try:
        version = mlflow.genai.load_prompt(text, link_to_model=False)
    except Exception as e:  # MLflow raises its own errors for unknown names, versions and aliases
        raise FinetuneError(
            f"--prompt {uri}: {e}. Registered prompts: a run that scored the optimized contender "
            "registers NAME-prompt (alias candidate)") from None
    alias = text.split("@", 1)[1] if "@" in text else None
    pool = []
    if version.tags.get(tags.PROMPT_SHOT_POOL):
        try:
            pool = [json.loads(line) for line in mlflow.artifacts.load_text(
                version.tags[tags.PROMPT_SHOT_POOL]).splitlines() if line.strip()]
        except Exception as e:  # a deleted run or artifact: the prompt cannot be asked as it was measured
            raise FinetuneError(
                f"--prompt {uri}: its retrieved shots come from {version.tags[tags.PROMPT_SHOT_POOL]}"
                f", which cannot be read ({first_line(e)}); restore the run, or serve another "
                "version of the prompt") from None
    return ServedPrompt(version.name, str(version.version), version.template,
                        version.tags.get(tags.PROMPT_MODEL_VERSION),
                        f"{version.name}@{alias}" if alias else None,
                        version.tags.get(tags.PROMPT_BASE_MODEL), version.tags.get(tags.PROMPT_SOURCE_RUN),
                        pool, int(version.tags.get(tags.PROMPT_RETRIEVAL_K) or 0))


def base_version(prompt: ServedPrompt, uri: str) -> str:
    """`NAME/N`, the version whose base side answers `prompt` (given as `uri`): the one it was registered
    beside, else `version_on_base`; raises FinetuneError with the fix where there is none."""
    from mlflow_finetune_plugin.errors import FinetuneError

    beside = prompt.model_version or version_on_base(prompt)
    if not beside:
        raise FinetuneError(
            f"{uri}: its base model ({prompt.base_model or 'not recorded'}) is served as the base "
            "side of a registered version, and none of that name is trained on it: register one "
            "(`mlflow run RECIPE -e lora` with the same registry.name and model), or use a prompt "
            "registered beside a model version")
    return beside


def version_on_base(prompt: ServedPrompt) -> str | None:
    """`NAME/N` whose base model answers a prompt registered beside no model version (`-e optimize-prompt`):
    the
    newest version of the same registered name trained on the prompt's base model, with the chat template of
    the prompt's run where both recorded one (its `:base` side is that base model asked through that
    template); None when there is none."""
    from mlflow import MlflowClient

    from mlflow_finetune_plugin.registry.versions import source_run_id

    client = MlflowClient()
    name = prompt.prompt_name.removesuffix(SUFFIX)
    try:
        template = (
            client.get_run(prompt.source_run).data.tags.get(tags.CHAT_TEMPLATE_HASH)
            if prompt.source_run
            else None
        )
    except Exception:  # a deleted source run: match on the base model alone
        template = None
    for version in sorted(client.search_model_versions(f"name = '{name}'", max_results=10_000),
                          key=lambda v: -int(v.version)):
        run_template = version.tags.get(tags.CHAT_TEMPLATE_HASH)
        if run_template is None and (run := source_run_id(version)):
            run_template = client.get_run(run).data.tags.get(tags.CHAT_TEMPLATE_HASH)
        if version.tags.get(tags.BASE_MODEL) == prompt.base_model and (
                template is None or run_template in (None, template)):
            return f"{name}/{version.version}"
    return None


@dataclass
class PromptCheck:
    metric: str
    against: str
    prompt: float | None
    other: float | None
    passed: bool
    note: str = ""


def check_prompt_gates(model_name: str, version, gates, alias: str) -> list[PromptCheck]:
    """The recipe's comparison gates on the prompt's own scores (see the module's note)."""
    from mlflow_finetune_plugin.metrics import lower_is_better
    from mlflow_finetune_plugin.registry import versions as registry

    name = prompt_name(model_name)
    own_run = _version(name, version).tags.get(tags.PROMPT_SOURCE_RUN)
    own = registry.run_metrics(own_run)
    holder = _alias_holder(name, alias)
    checks = []
    for gate in gates:
        if gate.metric.count("/") or gate.metric == "arena_above":
            continue  # forgetting limits and arena votes are about weights and served versions
        mine = own.get(f"eval/optimized/{gate.metric}")
        better = (
            (lambda a, b: b - a)
            if (gate.mode or ("min" if lower_is_better(gate.metric) else "max")) == "min"
            else (lambda a, b: a - b)
        )
        if gate.at_most is not None or gate.at_least is not None:
            limit = gate.at_most if gate.at_most is not None else gate.at_least
            ok = mine is not None and (mine <= limit if gate.at_most is not None else mine >= limit)
            checks.append(PromptCheck(gate.metric, "limit", mine, limit, ok))
            continue
        for against in gate.beats:
            if against in SAME_RUN:
                other, note = own.get(f"eval/{against}/{gate.metric}"), ""
            elif against == "champion" and (holder is None or str(holder.version) == str(version)):
                checks.append(PromptCheck(gate.metric, against, mine, None, True, f"no @{alias} yet"
                                          if holder is None else f"v{version} is @{alias}"))
                continue
            elif against == "champion":
                other = registry.run_metrics(holder.tags.get(tags.PROMPT_SOURCE_RUN)).get(
                    f"eval/optimized/{gate.metric}")
                note = f"v{holder.version}"
            else:
                continue  # other contenders (optimized itself, tuned, versions) are the model's to beat
            ok = mine is not None and other is not None and better(mine, other) >= gate.margin - 1e-12
            checks.append(PromptCheck(gate.metric, against, mine, other, ok,
                                      note if mine is not None and other is not None else "metric missing"))
    return checks


@dataclass
class PromptPromotion:
    """What `promote_prompt` did, shaped as `promotion.PromotionResult` is read by `mlflow-finetune
    promote`."""

    name: str
    version: str
    alias: str
    promoted: bool
    previous: str | None
    text: str

    def report(self) -> str:
        return self.text


def promote_prompt(model_name: str, version, gates=None, alias: str | None = None,
                   force: bool = False) -> PromptPromotion:
    """Move `alias` of `<model_name>-prompt` to `version` (a number or `@ALIAS`) when its gates pass (`force`:
    even
    when not); gates and alias default to the recipe of the prompt's source run (`registry.promote_if`,
    `registry.champion_alias`)."""
    import mlflow

    from mlflow_finetune_plugin.metrics import format_table

    name = prompt_name(model_name)
    version = str(_alias_holder(name, version[1:]).version if str(version).startswith("@") else version)
    if gates is None or alias is None:
        recorded_gates, recorded_alias = _recorded(name, version)
        gates, alias = recorded_gates if gates is None else gates, alias or recorded_alias
    holder = _alias_holder(name, alias)
    previous = str(holder.version) if holder else None
    checks = check_prompt_gates(model_name, version, gates, alias)
    moved = previous != version and (force or (all(c.passed for c in checks) and bool(checks)))
    if moved:
        mlflow.genai.set_prompt_alias(name, alias, int(version))
    table = format_table(["metric", "against", "prompt", "other", "result", "note"],
                         [[c.metric, c.against, c.prompt, c.other, "pass" if c.passed else "FAIL", c.note]
                          for c in checks]) if checks else "no gates that apply to a prompt"
    outcome = (f"=> v{version} already holds @{alias}" if previous == version else
               f"=> @{alias} -> v{version}{' (forced)' if force else ''}" if moved else
               f"=> gates failed: @{alias} stays on {'v' + previous if previous else 'nobody'}")
    return PromptPromotion(name, version, alias, moved, previous,
                           f"Promotion of {name} v{version} to @{alias}\n{table}\n{outcome}")


def _recorded(name: str, version: str) -> tuple[list, str]:
    """(gates, champion alias) of the recipe the prompt's source run recorded; the defaults where it has
    none."""
    from mlflow_finetune_plugin.config.schema import RegistryConfig
    from mlflow_finetune_plugin.registry.versions import source_recipe

    section = (source_recipe(_version(name, version).tags.get(tags.PROMPT_SOURCE_RUN))
               or {}).get("registry") or {}
    try:
        config = RegistryConfig.model_validate({k: v for k,
                                                v in section.items() if k in RegistryConfig.model_fields})
    except ValueError:
        config = RegistryConfig()
    return config.promote_if, config.champion_alias


def is_prompt(name: str) -> bool:
    """`name` is a registered optimized prompt (`<model>-prompt` in the Prompt Registry)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not name.endswith(SUFFIX):
        return False
    try:
        return MlflowClient().get_prompt(name) is not None
    except MlflowException:
        return False


def _version(name: str, version):
    from mlflow import MlflowClient

    return MlflowClient().get_prompt_version(name, str(version))


def _alias_holder(name: str, alias: str):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_prompt_version_by_alias(name, alias)
    except MlflowException:
        return None
