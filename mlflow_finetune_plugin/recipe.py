"""The recipe: `finetune.yaml` loaded into typed, strictly validated config.

Unknown keys are errors that list the valid keys and suggest the nearest one; every problem in the file and in
the `-P` overrides is reported at once, with the YAML line where there is one.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model

from mlflow_finetune_plugin.errors import RecipeError
from mlflow_finetune_plugin.recipe_base import Section

RECIPE_FILE = "finetune.yaml"
HF_PREFIX = "hf:"  # data.train / data.eval naming a Hugging Face dataset instead of a file

# Short forms accepted by `-P`, mapped to their dotted recipe keys.
SHORT_KEYS = {
    "model": "model.name",
    "data": "data.train",
    "max_steps": "train.max_steps",
    "epochs": "train.epochs",
    "registered_model": "registry.name",
    "resume": "train.resume",
}


class ModelConfig(Section):
    name: str | None = Field(None, description="Hub id or local folder; empty means the built-in tiny model.")
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None


class DataColumns(Section):
    """Which column of the file holds each field, for files whose fields have other names (LLaMA-Factory's
    `columns` in dataset_info.json): `columns: {prompt: question, completion: answer}`."""

    messages: str | None = Field(None, description="The conversation: chat messages, or ShareGPT turns.")
    prompt: str | None = None
    completion: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    system: str | None = Field(None, description="A per-row system prompt (text).")
    tools: str | None = Field(None, description="A per-row list of tools (OpenAI function schemas, or JSON text).")
    instruction: str | None = None
    input: str | None = None
    output: str | None = None


class DataTags(Section):
    """ShareGPT role tags (LLaMA-Factory's `tags` in dataset_info.json): which keys and role names the turns use."""

    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = Field("observation", description="A tool's result (becomes a `tool` message).")
    function_tag: str = Field("function_call", description="The assistant calling a tool (JSON name + arguments).")
    system_tag: str = "system"


class DataConfig(Section):
    train: str | None = Field("data/train.jsonl", description="A file, or a Hugging Face dataset as "
                              "hf:ORG/NAME[@REVISION][:SPLIT] (split default: train).")
    eval: str | None = Field(None, description="A file, or hf:ORG/NAME[@REVISION]:SPLIT.")
    eval_split: float = Field(0.0, ge=0.0, lt=1.0, description="Held-out share of train when no eval file is given.")
    format: Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "preference"] = "auto"
    columns: DataColumns | None = Field(None, description="The file's column for each field, where names differ.")
    tags: DataTags | None = Field(None, description="ShareGPT role tags, where they differ from LLaMA-Factory's.")
    system_prompt: str | None = None
    max_length: int = Field(1024, gt=0)
    assistant_only_loss: bool = True
    packing: bool | Literal["auto"] = Field(
        "auto", description="Pack examples into rows of up to max_length (attention kept within each example). "
                            "auto: on with a flash-attention model.attn_implementation (padding-free, always "
                            "faster); off otherwise (true pays on mixed lengths) and for prefix/prompt tuning.")
    max_rows: int | None = Field(None, gt=0)
    strict: bool = Field(False, description="Data warnings (few rows, near-duplicates, train/eval overlap, answers "
                                            "cut by max_length, contradictions) stop the run like errors.")


class TrainConfig(Section):
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="Overrides epochs when > 0.")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 42
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(100, gt=0, description="Checkpoint (logged to the run, for resume) every N steps; the "
                                                  "end of training is the logged model, not a checkpoint.")
    save_total_limit: int = Field(2, gt=0)
    gradient_checkpointing: bool = False
    fused_lm_head: bool | Literal["auto"] = Field(
        "auto", description="TRL's fused LM head: the loss from tiles of the LM head, never the whole logits (less "
                            "memory with big vocabularies), recomputed in the backward pass. auto: on with CUDA; off "
                            "on CPU, where the model's own loss measured 1.6x faster per step.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes (torchrun, ray): ddp copies the model to every rank; fsdp "
                           "shards parameters, gradients and optimizer state across ranks (models too big for one).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    resume: str | None = Field(None, description="Run id (or 'latest') whose last checkpoint to continue from.")


class EvalConfig(Section):
    enabled: bool = True
    max_examples: int = Field(50, gt=0, description="Held-out rows scored after training (the first N).")
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(32, gt=0, description="Prompts generated and scored together; lower it if memory runs out.")
    fewshot_k: int = Field(3, ge=0, description="Train examples in the few-shot prompt; 0 skips that contender.")
    output_format: Literal["text", "json"] = Field(
        "text", description="json: also score `json_valid`, the share of answers that parse (and fit json_schema).")
    json_schema: dict | None = Field(None, description="JSON Schema the answers must conform to (output_format json).")


class RegistryConfig(Section):
    class Gate(Section):
        """One promotion gate: the tuned model must beat every contender in `beats` on `metric` by `margin`."""

        metric: str = Field(description="Metric name without prefix: rougeL, token_f1, exact_match, loss, ...")
        beats: list[str] = Field(
            ["base", "fewshot", "champion"],
            description="base | fewshot (same run), champion (holder of the alias being moved), @alias, or a version.")
        margin: float = Field(0.0, ge=0, description="Absolute improvement required (0: not worse).")
        mode: Literal["max", "min"] | None = Field(None, description="Default: min for loss/perplexity, else max.")

    name: str | None = Field(None, description="Registered model name; default: the project folder's name.")
    enabled: bool = Field(True, description="Register the logged model; false only logs it in the run.")
    alias: str | None = "challenger"
    champion_alias: str = Field("champion", description="The alias `mlflow-finetune promote` moves.")
    auto_promote: bool = Field(False, description="Move the champion alias at the end of a run whose gates pass.")
    promote_if: list[Gate] = Field(
        default_factory=lambda: [RegistryConfig.Gate(metric="rougeL")],
        description="Promotion gates; every one must pass.")


class _RecipeBase(Section):
    method: str = "lora"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    # Not user keys: filled in by load_recipe so the resolved recipe stands alone.
    project_dir: str | None = None


def _recipe_class():
    """The Recipe model: the fixed sections plus one section per method, named after it, from `methods.METHODS`."""
    from mlflow_finetune_plugin.methods import METHODS

    fields = {name: (m.Config, m.Config()) for name, m in METHODS.items()}
    return create_model("Recipe", __base__=_RecipeBase, **fields)


Recipe = _recipe_class()


def method_config(recipe) -> Section:
    """The config section of the recipe's method (e.g. `recipe.lora` for method `lora`)."""
    return getattr(recipe, recipe.method)


def load_recipe(project_dir: str | os.PathLike, method: str | None = None,
                overrides: dict[str, Any] | None = None, path: str | None = None):
    """Load `finetune.yaml` from `project_dir`, apply the method and `-P` overrides, validate everything at once.

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
            lines = _key_lines(text)
        except UnicodeDecodeError as e:
            raise RecipeError([f"not valid UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"],
                              str(recipe_path)) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise RecipeError([f"{where}invalid YAML: {getattr(e, 'problem', e)}"], str(recipe_path)) from None
        if not isinstance(raw, dict):
            raise RecipeError([f"the top level must be a mapping of sections, got {type(raw).__name__}"],
                              str(recipe_path))
    elif path:
        raise RecipeError([f"file not found: {recipe_path}"], str(recipe_path))

    if method:
        raw["method"] = method
    for key, value in (overrides or {}).items():
        dotted = SHORT_KEYS.get(key, key)
        # Errors on overridden keys point at the `-P` flag, not at the YAML line they replaced.
        lines[tuple(dotted.split("."))] = f"-P {key}={value}"
        try:
            _set_dotted(raw, dotted, _parse_value(value))
        except ValueError as e:
            problems.append(f"-P {key}={value}: {e}")
    return _validate(raw, project_dir, recipe_path, lines, problems)


def _validate(raw: dict, project_dir: Path, recipe_path: Path, lines: dict, problems: list[str]):
    from mlflow_finetune_plugin.methods import METHODS

    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        problems.extend(_describe(err, lines) for err in e.errors())
    method = raw.get("method", "lora")
    if isinstance(method, str) and method not in METHODS:
        problems.append(f"method: unknown method {method!r}. Valid methods: {', '.join(METHODS)}"
                        + _suggest(method, METHODS))
    problems.extend(_check_paths(raw, project_dir))
    own_check = getattr(METHODS.get(method), "check_recipe", None) if isinstance(method, str) else None
    if recipe is not None and own_check:
        problems.extend(own_check(recipe, project_dir))
    if problems:
        raise RecipeError(problems, str(recipe_path))
    recipe.project_dir = str(project_dir)
    for split in ("train", "eval"):
        value = getattr(recipe.data, split)
        if value and not value.startswith(HF_PREFIX):
            setattr(recipe.data, split, str((project_dir / value).resolve()))
    if not recipe.registry.name:
        recipe.registry.name = project_dir.name
    return recipe


def _check_paths(raw: dict, project_dir: Path) -> list[str]:
    """Files the recipe names must exist; checked on the raw values so they are reported with every other error."""
    problems = []
    from mlflow_finetune_plugin.methods import METHODS

    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    splits = {"train": data.get("train", DataConfig().train), "eval": data.get("eval")}
    if getattr(METHODS.get(str(raw.get("method", "lora"))), "OWN_DATA", False):
        splits = {"train": data.get("train"), "eval": data.get("eval")}  # checked by the method's check_recipe
    elif not splits["train"]:
        problems.append("data.train: no training data given. Set it in finetune.yaml or pass -P data=path/to/train.jsonl")
    for split, value in splits.items():
        if isinstance(value, str) and value.startswith(HF_PREFIX):  # a Hugging Face dataset, loaded by the data check
            if not value[len(HF_PREFIX):].split(":")[0].split("@")[0].strip():
                problems.append(f"data.{split}: {value!r} names no dataset; write hf:ORG/NAME or hf:ORG/NAME:SPLIT")
        elif isinstance(value, str) and value and not (project_dir / value).exists() and not (
                getattr(METHODS.get(str(raw.get("method", "lora"))), "OWN_DATA", False)):
            problems.append(f"data.{split}: file not found: {value} (looked in {project_dir})")
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    name = model.get("name")
    if isinstance(name, str) and name.startswith((".", "/", "~")):
        if not Path(name).expanduser().exists() and not (project_dir / name).exists():
            problems.append(f"model.name: local folder not found: {name}")
    return problems


def _describe(err: dict, lines: dict) -> str:
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc)
    line = _nearest_line(loc, lines)
    where = f"line {line}: " if isinstance(line, int) else f"{line}: " if line else ""
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        return (f"{where}{dotted}: unknown key. Valid keys{' in `' + '.'.join(loc[:-1]) + '`' if loc[:-1] else ''}: "
                f"{', '.join(valid)}" + _suggest(loc[-1], valid))
    got = err.get("input")
    shown = json.dumps(got, default=str) if not isinstance(got, dict) else "a mapping"
    return f"{where}{dotted}: {err['msg']} (got {shown})"


def _valid_keys(section_loc: tuple) -> list[str]:
    model = Recipe
    for part in section_loc:
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


def _key_lines(text: str) -> dict[tuple, int]:
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
    """The resolved recipe as plain data, with only the active method's section."""
    from mlflow_finetune_plugin.methods import METHODS

    data = recipe.model_dump(mode="json")
    for name in METHODS:
        if name != recipe.method:
            data.pop(name, None)
    return data


def to_yaml(recipe) -> str:
    return yaml.safe_dump(resolved_dict(recipe), sort_keys=False)


def recipe_hash(recipe) -> str:
    """A short content hash of the resolved recipe, without machine-specific paths."""
    data = resolved_dict(recipe)
    data.pop("project_dir", None)
    for section in [data["data"], *(data.get("multitask") or {}).get("tasks", {}).values()]:
        for split in ("train", "eval"):
            if section.get(split):
                section[split] = Path(section[split]).name
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
