"""Loading the recipe: `finetune.yaml`, the entry point's preset and the `-P` overrides, validated into a
`Recipe` (`schema.py`) at once; and the resolved recipe back out as plain data (YAML, a content hash, MLflow
params).

Unknown keys are errors that list the valid keys and suggest the nearest one; every problem in the file and in
the `-P` overrides is reported at once, with the YAML line where there is one, together with the files the
recipe names that do not exist and the combinations that cannot train (`checks.py`), before any model loads.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from mlflow_finetune_plugin.config import presets
from mlflow_finetune_plugin.config.checks import (
    NOT_PACKABLE,
    REWARD_GATES,
    REWARD_METRICS,
    combination_problems,
)
from mlflow_finetune_plugin.config.documents import NO_QUESTIONS
from mlflow_finetune_plugin.config.schema import (
    ADAPTER_CONFIGS,
    HF_PREFIX,
    OBJECTIVES,
    RECIPE_FILE,
    SHORT_KEYS,
    TRACES_PREFIX,
    DataConfig,
    DPOConfig,
    IA3Adapter,
    LoraAdapter,
    PrefixAdapter,
    PromptAdapter,
    Recipe,
)
from mlflow_finetune_plugin.errors import RecipeError


def load_recipe(project_dir: str | os.PathLike, method: str | None = None,
                overrides: dict[str, Any] | None = None, path: str | None = None) -> Recipe:
    """Load `finetune.yaml` from `project_dir`, apply the entry point's preset and the `-P` overrides, and
    validate everything at once.

    Data paths are made absolute against the project folder; the registry name defaults to the folder's name.
    Raises RecipeError listing every problem.
    """
    project_dir = Path(project_dir).resolve()
    recipe_path = Path(path) if path else project_dir / RECIPE_FILE
    problems: list[str] = []
    raw: dict = {}
    lines: dict[tuple, int | str] = {}
    if recipe_path.exists():
        try:
            text = recipe_path.read_text(encoding="utf-8")
            raw = yaml.safe_load(text) or {}
            lines = key_lines(text)
        except UnicodeDecodeError as e:
            raise RecipeError([f"not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"],
                              str(recipe_path)) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise RecipeError([f"{where}invalid YAML: {getattr(e, 'problem', e)}"],
                              str(recipe_path)) from None
        if not isinstance(raw, dict):
            raise RecipeError([f"the top level must be a mapping of sections, got {type(raw).__name__}"],
                              str(recipe_path))
    elif path:
        raise RecipeError([f"file not found: {recipe_path}"], str(recipe_path))

    over: dict = {}
    for key, value in (overrides or {}).items():
        dotted = SHORT_KEYS.get(key, key)
        # Errors on overridden keys point at the `-P` flag, not at the YAML line they replaced.
        lines[tuple(dotted.split("."))] = f"-P {key}={value}"
        try:
            _set_dotted(over, dotted, _parse_value(value))
        except ValueError as e:
            problems.append(f"-P {key}={value}: {e}")
    if method:
        over["method"] = method
    method = over.get("method", raw.get("method", "lora"))
    if not isinstance(method, str) or method not in presets.PRESETS:
        problems.append(f"method: unknown method {method!r}. Valid methods: {', '.join(presets.PRESETS)}"
                        + (_suggest(method, presets.PRESETS) if isinstance(method, str) else ""))
        raw, over, method = {**raw, "method": "lora"}, {k: v for k,
                                                        v in over.items() if k != "method"}, "lora"
    problems.extend(_legacy_key_problems(raw, over, lines))
    adapter = presets.adapter_type(method, raw, over)
    axes, origin = presets.to_axes(presets.without_foreign_adapter(raw, adapter), method, adapter)
    axes_over, origin_over = presets.to_axes(over, method, adapter)
    for new, old in {**origin, **origin_over}.items():  # errors on moved keys name the key the user wrote
        if old in lines:
            lines[new] = lines[old]
    merged = presets.deep_merge(axes, axes_over)
    presets.fill_preset(merged, method)
    _unpack_for_adapter(raw, over, merged, adapter, recipe_path.name)
    _replay_for_entry_point(raw, over, merged, recipe_path.name)
    _reward_model_name(over, merged, project_dir)
    names = {new: ".".join(old) for new, old in {**origin, **origin_over}.items()}
    return _validate(merged, project_dir, recipe_path, lines, problems, names)


def _replay_for_entry_point(raw: dict, over: dict, merged: dict, recipe_name: str) -> None:
    """`data.replay`, written in the recipe for supervised fine-tuning, gives way with a one-line note where
    the entry point cannot use it: off for an objective other than sft (`-e dpo`), and `replay_loss: kl`
    becomes `lm` for a full fine-tune (kl compares with the base, the adapter switched off). Given with `-P`
    together with such an entry point, it is refused (`checks.py`)."""
    written = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    given = over.get("data") if isinstance(over.get("data"), dict) else {}
    data = merged.get("data") if isinstance(merged.get("data"), dict) else {}
    if written.get("replay") in (None, False) or "replay" in given:
        return
    objective = merged.get("objective", "sft")
    if objective != "sft":
        data["replay"] = False
        print(
            f"Note: data.replay is off for objective {objective} (replayed text trains sft's language-model "
            f"loss); {recipe_name} replays it for sft.", file=sys.stderr)
    elif data.get("replay_loss") == "kl" and "replay_loss" not in given and \
            isinstance(merged.get("adapter"), dict) and merged["adapter"].get("type") == "full":
        data["replay_loss"] = "lm"
        print(
            "Note: data.replay_loss is lm for the full fine-tune: kl compares with the base model, which is "
            f"the adapter switched off, and a full fine-tune has none; {recipe_name} sets kl for adapters.",
            file=sys.stderr)


def _reward_model_name(over: dict, merged: dict, project_dir: Path) -> None:
    """A reward model is registered apart from the chat models of the same recipe (`-e reward` on the dpo
    recipe): as `<registry.name>-rm`, unless the name was given with -P or already ends in -rm. Otherwise
    `NAME@challenger` would move to a model that scores instead of chatting.
    Its promotion gates default to what it logs (REWARD_GATES): gates written for the recipe's chat models, on
    metrics a reward model never logs (rougeL, forgetting), give way with a note; gates given with -P stay."""
    if merged.get("objective") != "reward" or not isinstance(merged.get("registry", {}), dict):
        return
    given = over.get("registry") if isinstance(over.get("registry"), dict) else {}
    registry = merged.setdefault("registry", {})
    name = registry.get("name") or project_dir.name
    if "name" not in given and isinstance(name, str) and not name.endswith("-rm"):
        registry["name"] = f"{name}-rm"
    if "promote_if" in given:
        return
    written = registry.get("promote_if")
    if isinstance(written, list) and any(
        isinstance(g, dict)
        and str(g.get("metric", "")).removeprefix("eval/").removeprefix("tuned/") in REWARD_METRICS
        for g in written
    ):
        return
    if written:
        print(
            f"Note: registry.promote_if names no metric a reward model logs ({', '.join(REWARD_METRICS)}); a "
            f"reward run gates on {REWARD_GATES[0]['metric']} instead.", file=sys.stderr)
    registry["promote_if"] = [dict(g) for g in REWARD_GATES]


def _unpack_for_adapter(raw: dict, over: dict, merged: dict, adapter: str | None, recipe_name: str) -> None:
    """`data.packing: true`, written in the recipe for an adapter that packs, is turned off with a one-line
    note when the entry point (or `-P adapter.type`) trains one that cannot (`-e prefix` on a recipe packed
    for LoRA). Asked for together with such an adapter, in the recipe itself or with `-P data.packing=true`,
    it is refused (`checks.py`), since nothing the user wrote then says which of the two should give way."""
    written = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    given = over.get("data") if isinstance(over.get("data"), dict) else {}
    if adapter not in NOT_PACKABLE or written.get("packing") is not True or "packing" in given:
        return
    own = presets.adapter_type(raw["method"] if raw.get("method") in presets.PRESETS else "lora", raw)
    if own == adapter:
        return
    merged["data"]["packing"] = False
    print(f"Note: data.packing is off for the {adapter} adapter ({NOT_PACKABLE[adapter]}); {recipe_name} "
          f"packs rows for {own}.", file=sys.stderr)


def _validate(raw: dict, project_dir: Path, recipe_path: Path, lines: dict, problems: list[str],
              names: dict | None = None) -> Recipe:
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems.extend(_describe(err, lines, names or {}) for err in e.errors())
    # `multitask.tasks` in a recipe of that form
    tasks_key = (names or {}).get(("data", "tasks"), "data.tasks")
    problems.extend(_check_paths(raw, project_dir, tasks_key))
    if recipe is not None:
        problems.extend(combination_problems(recipe, raw, tasks_key))
    if problems:
        raise RecipeError(problems, str(recipe_path))
    recipe.project_dir = str(project_dir)
    if isinstance(recipe.eval.forgetting, str):
        recipe.eval.forgetting = str((project_dir / recipe.eval.forgetting).resolve())
    if isinstance(recipe.data.replay, str):
        recipe.data.replay = str((project_dir / recipe.data.replay).resolve())
    if recipe.data.tasks:  # a mixture's files are its tasks'; data.train's default does not apply
        recipe.data.train = recipe.data.eval = None
    for split in ("train", "eval"):
        value = getattr(recipe.data, split)
        if value and not value.startswith((HF_PREFIX, TRACES_PREFIX)):
            setattr(recipe.data, split, str((project_dir / value).resolve()))
    for task in recipe.data.tasks.values():
        task.train = str((project_dir / task.train).resolve())
        if task.eval:
            task.eval = str((project_dir / task.eval).resolve())
    if not recipe.registry.name:
        recipe.registry.name = project_dir.name
    return recipe



def _legacy_key_problems(raw: dict, over: dict, lines: dict) -> list[str]:
    """Unknown keys in the older per-method sections (`lora:`, `qlora:`, ...), active or not."""
    lora = [k for k in LoraAdapter.model_fields if k != "type"]
    valid = {"lora": lora, "qlora": [*lora, "bits", "quant_type", "double_quant", "compute_dtype"],
             "prefix": [k for k in PrefixAdapter.model_fields if k != "type"],
             "prompt": [k for k in PromptAdapter.model_fields if k != "type"],
             "ia3": [k for k in IA3Adapter.model_fields if k != "type"], "full": [],
             "multitask": [*lora, "tasks", "stopping", "adapters"],
             "dpo": [*lora, *DPOConfig.model_fields, "init_adapter"]}
    problems = []
    for source in (raw, over):
        for section, keys in valid.items():
            node = source.get(section)
            if node is None:
                continue
            if not isinstance(node, dict):
                problems.append(f"{section}: must be a mapping of keys (got {json.dumps(node, default=str)})")
                continue
            for key in node:
                if key not in keys:
                    line = lines.get((section, key))
                    where = f"line {line}: " if isinstance(line, int) else f"{line}: " if line else ""
                    problems.append(f"{where}{section}.{key}: unknown key. Valid keys in `{section}`: "
                                    f"{', '.join(keys) or '(none)'}" + _suggest(key, keys))
    if isinstance(over.get("qlora"), dict) and over["qlora"].get("bits") not in (None, 4, 8) or \
            isinstance(raw.get("qlora"), dict) and raw["qlora"].get("bits") not in (None, 4, 8):
        problems.append("qlora.bits: must be 4 or 8 (or set model.quantization: 4bit | 8bit)")
    return problems


def _check_paths(raw: dict, project_dir: Path, tasks_key: str = "data.tasks") -> list[str]:
    """Files the recipe names must exist; checked on the raw values so they are reported with every other
    error."""
    problems = []
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    tasks = data.get("tasks") if isinstance(data.get("tasks"), dict) else {}
    if tasks or raw.get("method") == "multitask":
        for name, task in tasks.items():
            for split in ("train", "eval"):
                value = task.get(split) if isinstance(task, dict) else None
                if isinstance(value, str) and value.startswith(TRACES_PREFIX):
                    problems.append(
                        f"{tasks_key}.{name}.{split}: traces are read by data.train and data.eval, not "
                        "by a task of a mixture; write them to a file first (mlflow-finetune data "
                        "from-traces EXPERIMENT -o FILE.jsonl)")
                elif isinstance(value, str) and value and not (project_dir / value).exists():
                    problems.append(
                        f"{tasks_key}.{name}.{split}: file not found: {value} (looked in {project_dir})")
        splits = {}
    else:
        splits = {"train": data.get("train", DataConfig().train), "eval": data.get("eval")}
        train = splits["train"]
        if data.get("documents") and (not train or isinstance(train, str) and not train.startswith(
                (HF_PREFIX, TRACES_PREFIX)) and not (project_dir / train).exists()):
            # no question rows: fine where a questions.teacher writes them from the documents
            del splits["train"]
            questions = raw.get("questions") if isinstance(raw.get("questions"), dict) else {}
            if not questions.get("teacher"):
                given = f"file not found: {train} (looked in {project_dir})" if train else "not given"
                problems.append(f"data.train: {given}. {NO_QUESTIONS}")
        elif not train:
            problems.append("data.train: no training data given. Set it in finetune.yaml or pass "
                            "-P data=path/to/train.jsonl")
    for split, value in splits.items():
        # an experiment, looked up by the data check
        if isinstance(value, str) and value.startswith(TRACES_PREFIX):
            if not value[len(TRACES_PREFIX):].strip():
                problems.append(f"data.{split}: {value!r} names no experiment; write traces:EXPERIMENT_NAME")
        # a Hugging Face dataset, loaded by the data check
        elif isinstance(value, str) and value.startswith(HF_PREFIX):
            if not value[len(HF_PREFIX):].split(":")[0].split("@")[0].strip():
                problems.append(
                    f"data.{split}: {value!r} names no dataset; write hf:ORG/NAME or hf:ORG/NAME:SPLIT")
        elif isinstance(value, str) and value and not (project_dir / value).exists():
            problems.append(f"data.{split}: file not found: {value} (looked in {project_dir})")
    if data.get("traces") is not None and not any(isinstance(v, str) and v.startswith(TRACES_PREFIX)
                                                   for v in splits.values()):
        problems.append(
            "data.traces: narrows a traces: source, but neither data.train nor data.eval is one; set "
            "data.train: traces:EXPERIMENT (or -P data=traces:EXPERIMENT), or drop data.traces")
    forgetting = raw["eval"].get("forgetting") if isinstance(raw.get("eval"), dict) else None
    if isinstance(forgetting, str) and forgetting and not (project_dir / forgetting).is_file():
        problems.append(
            f"eval.forgetting: file not found: {forgetting} (looked in {project_dir}); give a .txt or "
            ".jsonl file of general text, true for the bundled set, or false to skip the check")
    replay = data.get("replay")
    if isinstance(replay, str) and replay and not (project_dir / replay).is_file():
        problems.append(
            f"data.replay: file not found: {replay} (looked in {project_dir}); give a .txt or .jsonl "
            "file of general text, true for the prose bundled with the package, or false for no replay")
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    name = model.get("name")
    if isinstance(name, str) and name.startswith((".", "/", "~")):
        if not Path(name).expanduser().exists() and not (project_dir / name).exists():
            problems.append(f"model.name: local folder not found: {name}")
    return problems


def _describe(err: dict, lines: dict, names: dict) -> str:
    loc = tuple(str(p) for p in err["loc"])
    if len(loc) > 1 and loc[0] == "adapter" and loc[1] in ADAPTER_CONFIGS:  # the union's tag is not a key
        kind, loc = loc[1], (loc[0], *loc[2:])
    else:
        kind = None
    line = _nearest_line(loc, lines)
    dotted = names.get(loc, ".".join(loc))
    where = f"line {line}: " if isinstance(line, int) else f"{line}: " if line else ""
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1], kind)
        section = names.get(loc, ".".join(loc)).rsplit(".", 1)[0] if len(loc) > 1 else ""
        label = f" in `{section}`" + (f" ({kind} adapter)" if kind and section == "adapter" else "")
        return (f"{where}{dotted}: unknown key. Valid keys{label if section else ''}: "
                f"{', '.join(valid)}" + _suggest(loc[-1], valid))
    if err["type"] == "union_tag_invalid":
        got = err.get("input", {}).get("type") if isinstance(err.get("input"), dict) else None
        return (f"{where}adapter.type: unknown adapter {got!r}. Valid adapters: {', '.join(ADAPTER_CONFIGS)}"
                + (_suggest(str(got), ADAPTER_CONFIGS) if got else ""))
    got = err.get("input")
    shown = json.dumps(got, default=str) if not isinstance(got, dict) else "a mapping"
    return f"{where}{dotted}: {err['msg']} (got {shown})"


def _valid_keys(section_loc: tuple, adapter_kind: str | None = None) -> list[str]:
    model = Recipe
    for part in section_loc:
        if model is Recipe and part == "adapter":
            model = ADAPTER_CONFIGS.get(adapter_kind or "lora", LoraAdapter)
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        # an optional section (`DataColumns | None`) has the keys of the section
        annotation = next((a for a in get_args(annotation) if a is not type(None)), annotation)
        if not isinstance(annotation, type) or not issubclass(annotation, BaseModel):
            return []
        model = annotation
    return [k for k in model.model_fields if k != "project_dir"]


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.7)
    return f". Did you mean `{close[0]}`?" if close else ""


def _nearest_line(loc: tuple, lines: dict) -> int | str | None:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in the YAML document to its 1-based line, so errors can point at the file."""
    out: dict[tuple, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = (*prefix, str(key_node.value))
                out[path] = key_node.start_mark.line + 1
                walk(value_node, path)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return out


def _parse_value(value: Any) -> Any:
    """`-P` values arrive as strings: read them as YAML scalars so `20`, `true`, `[q,v]` get their types."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        return value


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"`{part}` is a value, not a section")
        node = child
    node[parts[-1]] = value


def resolved_dict(recipe) -> dict:
    """The resolved recipe as plain data, with only the active objective's section."""
    data = recipe.model_dump(mode="json")
    for name in OBJECTIVES:
        if name != recipe.objective and name != "sft":
            data.pop(name, None)
    if not recipe.data.tasks:
        for key in ("tasks", "stopping", "adapters"):
            data["data"].pop(key, None)
    return data


def to_yaml(recipe) -> str:
    return yaml.safe_dump(resolved_dict(recipe), sort_keys=False)


def recipe_hash(recipe) -> str:
    """A short content hash of the resolved recipe, without machine-specific paths."""
    data = resolved_dict(recipe)
    data.pop("project_dir", None)
    for section in [data["data"], *data["data"].get("tasks", {}).values()]:
        for split in ("train", "eval"):
            if section.get(split):
                section[split] = Path(section[split]).name
    for section, key in ((data["eval"], "forgetting"), (data["data"], "replay")):
        if isinstance(section.get(key), str):
            section[key] = Path(section[key]).name
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def flat_params(recipe) -> dict[str, str]:
    """The resolved recipe flattened to dotted MLflow params (`train.learning_rate` -> '0.0002')."""
    out: dict[str, str] = {}

    def walk(node, prefix):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, dotted + ".")
            elif key != "project_dir":
                out[dotted] = json.dumps(value) if isinstance(value, list) else str(value)

    walk(resolved_dict(recipe), "")
    return out
