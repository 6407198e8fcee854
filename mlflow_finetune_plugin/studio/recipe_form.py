"""The Train page before "Start": which projects, entry points and models there are to pick from, the recipe's
editable keys (typed from the schema, defaulted as the chosen project and entry point resolve them, explained
in the schema's words, which docs/reference.md's key tables are written from), and what the choices amount to:
the `mlflow run ... --backend finetune` command, and the
finetune.yaml that command trains. Plain Python: the page (`app.py`) draws it.

Every value here comes from the loader the backend runs (`config/loading.py: load_recipe`), so what the page
shows is what `mlflow run` will do; nothing about the recipe is decided twice."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from pydantic import BaseModel

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config import presets
from mlflow_finetune_plugin.config.keys import flat_types
from mlflow_finetune_plugin.config.loading import load_recipe, resolved_dict
from mlflow_finetune_plugin.config.schema import ADAPTER_CONFIGS, OBJECTIVES, RECIPE_FILE, Recipe
from mlflow_finetune_plugin.errors import FinetuneError, RecipeError
from mlflow_finetune_plugin.launchers import submit
from mlflow_finetune_plugin.studio.capture import captured_stderr
from mlflow_finetune_plugin.studio.reference import bundled_recipes_dir, reference_row

# Keys the page does not offer: the entry point decides them (-e), or they are no user's (project_dir), or
# they describe a file's columns, a traces query or traffic after promotion, which the recipe's file is the
# place for.
_NOT_ON_PAGE = {"method", "objective", "adapter.type", "project_dir", "data.columns", "data.tags",
                "data.traces", "monitor"}
_MIXTURE_KEYS = {"data.tasks", "data.stopping", "data.adapters"}
_DOCUMENT_SECTIONS = ("retrieval", "questions")
_SKIPPED_FOLDERS = {"__pycache__", "node_modules", "mlruns", "mlartifacts", "site-packages"}
MODELS_PREFIX = "models:/"
MODEL_HINT = ("Or type a Hugging Face hub id (ORG/NAME) or a local model folder; models:/NAME/VERSION or "
              "models:/NAME@ALIAS continues a registered LoRA version on its own base model.")


@dataclass(frozen=True)
class FormField:
    """One recipe key on the page. `default` is the value the chosen project and entry point resolve it to
    (for a `choice`, as one of `choices`); `accepts` is the key's type in the reference's words (e.g. "float >
    0")."""

    key: str
    kind: str  # int | float | bool | str | choice | list | dict
    choices: tuple[str, ...] | None
    default: object
    help: str
    section: str
    accepts: str = ""


@dataclass
class Project:
    name: str
    path: Path
    entry_points: list[str]
    bundled: bool


# ----------------------------------------------------------------------------------------------- fields


def recipe_fields(project_dir=None, entry_point: str | None = None) -> list[FormField]:
    """The keys a user edits on the page, section by section: model, the entry point's adapter, data, train,
    eval, the objective's own section where it has one, distill (-e distill), retrieval and questions (a
    documents recipe), registry. Defaults as `project_dir`'s finetune.yaml and the entry point's preset
    resolve them (a project that does not load, or none: the schema's defaults under the preset; the page's
    check then names the problem)."""
    recipe = _resolved_recipe(project_dir, entry_point)
    resolved = resolved_dict(recipe)
    preset = presets.PRESETS.get(recipe.method, presets.PRESETS["lora"])
    sections: list[tuple[str, type[BaseModel], str]] = [("model", Recipe.model_fields["model"].annotation,
                                                         "model"),
                                                        ("adapter", ADAPTER_CONFIGS[recipe.adapter.type],
                                                         recipe.adapter.type),
                                                        ("data", Recipe.model_fields["data"].annotation,
                                                         "data"),
                                                        ("train", Recipe.model_fields["train"].annotation,
                                                         "train"),
                                                        ("eval", Recipe.model_fields["eval"].annotation,
                                                         "eval")]
    if recipe.objective != "sft" and recipe.objective in OBJECTIVES:
        sections.append((recipe.objective, _section_class(recipe.objective), recipe.objective))
    if preset.distill or recipe.distill is not None:
        sections.append(("distill", _section_class("distill"), "distill"))
    if recipe.data.documents:
        sections += [(name, _section_class(name), name) for name in _DOCUMENT_SECTIONS]
    sections.append(("registry", Recipe.model_fields["registry"].annotation, "registry"))
    skip = set(_NOT_ON_PAGE) | (set() if preset.mixture or recipe.data.tasks else _MIXTURE_KEYS)
    adapter = recipe.adapter.type
    fields = []
    for prefix, cls, section in sections:
        for key, info in _leaves(cls, prefix, skip):
            kind, choices = _kind(info.annotation)
            default = _lookup(resolved, key, info)
            if kind == "choice":
                default = _as_text(default)
            row = reference_row(key, adapter)
            accepts = row[0] if row else constraint(info)
            help_text = row[2] if row else (info.description or accepts)
            fields.append(FormField(key, kind, choices, default, help_text, section, accepts))
    return fields


def _resolved_recipe(project_dir, entry_point):
    method = entry_point if entry_point in presets.PRESETS else None
    if project_dir is not None:
        try:
            with captured_stderr():
                return load_recipe(project_dir, method=method)
        except FinetuneError:
            pass
    raw: dict = {"method": method or "lora"}
    presets.fill_preset(raw, raw["method"])
    return Recipe.model_validate(raw)


def _section_class(name: str) -> type[BaseModel]:
    annotation = Recipe.model_fields[name].annotation
    return next(a for a in (annotation, *get_args(annotation)) if isinstance(a, type)
                and issubclass(a, BaseModel))


def _leaves(cls: type[BaseModel], prefix: str, skip: set[str]):
    """(dotted key, FieldInfo) of every value key under `cls`, nested sections walked (eval.optimize.*)."""
    for name, info in cls.model_fields.items():
        key = f"{prefix}.{name}"
        if key in skip or key.split(".", 1)[0] in skip or name == "type" and prefix == "adapter":
            continue
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaves(annotation, key, skip)
        else:
            yield key, info


def _kind(annotation) -> tuple[str, tuple[str, ...] | None]:
    """The page's kind of input for a schema annotation: Literal values (with true/false where bool is allowed
    too) are a choice; a union with a list takes a list (or one name: `-P` reads the value as YAML)."""
    args = [a for a in flat_types(annotation) if a is not type(None)]
    literals = [str(v) for a in args if get_origin(a) is Literal for v in get_args(a)]
    others = [a for a in args if get_origin(a) is not Literal]
    bases = {get_origin(a) or a for a in others}
    if bases & {list, tuple}:
        return "list", None
    if dict in bases:
        return "dict", None
    if literals and bases <= {bool}:
        return "choice", tuple(literals + (["true", "false"] if bool in bases else []))
    for kind, types_ in (("bool", {bool}), ("int", {int}), ("float", {float}), ("float", {int, float})):
        if bases == types_:
            return kind, None
    return "str", None


def constraint(info) -> str:
    """The field's type in the reference's words (`float > 0`), from the schema where the reference has no
    row."""
    kind, choices = _kind(info.annotation)
    words = " | ".join(choices) if choices else kind
    for meta in info.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(meta, attr, None) is not None:
                words += f" {sign} {getattr(meta, attr)}"
    return words


def field_info(key: str):
    """The schema's FieldInfo of a dotted recipe key (an adapter key: of the first adapter type that has it),
    or None."""
    parts = key.split(".")
    if parts[0] == "adapter" and len(parts) == 2:
        return next((c.model_fields[parts[1]] for c in ADAPTER_CONFIGS.values()
                     if parts[1] in c.model_fields), None)
    cls, info = Recipe, None
    for part in parts:
        if cls is None or part not in cls.model_fields:
            return None
        info = cls.model_fields[part]
        cls = next((a for a in (info.annotation, *get_args(info.annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return info


def _lookup(resolved: dict, key: str, info):
    node = resolved
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            default = info.get_default(call_default_factory=True)
            return default.model_dump(mode="json") if isinstance(default, BaseModel) else default
        node = node[part]
    return node


def _as_text(value) -> str:
    return "true" if value is True else "false" if value is False else str(value)


# ----------------------------------------------------------------------------------------------- projects and
# models


def project_choices(extra_roots=()) -> list[Project]:
    """The bundled recipes (the checkout's recipes/; none in an installed wheel), then the projects under the
    folders the app was started with: each folder holding a finetune.yaml, the folder itself and up to two
    levels below it. Entry points: the recipe's own `method` first, then every other preset of the backend."""
    out, seen = [], set()
    bundled = bundled_recipes_dir()
    roots = [(bundled, True)] if bundled else []
    roots += [(Path(r).expanduser(), False) for r in extra_roots]
    for root, is_bundled in roots:
        for folder in _project_folders(root):
            real = folder.resolve()
            if real not in seen:
                seen.add(real)
                out.append(Project(folder.name, real, entry_points(real), is_bundled))
    return out


def _project_folders(root: Path, depth: int = 2):
    if (root / RECIPE_FILE).is_file():
        yield root
    if depth == 0 or not root.is_dir():
        return
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
                          and p.name not in _SKIPPED_FOLDERS)
    except OSError:  # a folder we may not list: nothing to offer from it
        return
    for child in children:
        yield from _project_folders(child, depth - 1)


def entry_points(project_dir) -> list[str]:
    """The recipe's own `method` (lora where it names none), then the backend's other presets."""
    try:
        raw = yaml.safe_load((Path(project_dir) / RECIPE_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raw = {}
    own = raw.get("method") if isinstance(raw, dict) and raw.get("method") in presets.PRESETS else "lora"
    return [own, *(name for name in presets.PRESETS if name != own)]


START_PROJECT = "support-bot"  # README command 1's recipe: the page starts where the README does


def start_project(options: list[tuple[str, str]]) -> str | None:
    """The project the page opens on, of (label, folder) `options`: the bundled support-bot where it is
    offered, else the first."""
    chosen = next((value for _, value in options if Path(value).name == START_PROJECT), None)
    return chosen or next(iter(options), (None, None))[1]


def runnable_model(name: str) -> str:
    """The model the picker shows for a recipe's `name`: itself, or `tiny` where it names a built-in real
    model whose package is not installed (the page still runs; the picker's label says how to install it)."""
    from importlib.util import find_spec

    from mlflow_finetune_plugin.models import gemma3, smollm2

    missing = [m for m in (smollm2, gemma3) if name == m.NAME and find_spec(m.MODULE) is None]
    return "tiny" if missing else name


def model_choices(client=None, limit: int = 50) -> list[tuple[str, str]]:
    """(label, value) for the model picker: the built-in models, then the newest `limit` registered LoRA
    versions of the tracking store (value models:/NAME/VERSION: its adapter continued on its base,
    `expand_model`). Anything else can be typed (MODEL_HINT)."""
    from importlib.util import find_spec

    from mlflow_finetune_plugin.models import gemma3, smollm2

    out = [("tiny: random weights, built locally (a run takes seconds; for trying the page)", "tiny")]
    for module, label in ((smollm2, "smollm2: SmolLM2-135M-Instruct, a real chat model"),
                          (gemma3, "gemma3: google/gemma-3-270m, a base model (Gemma Terms of Use)")):
        installed = find_spec(module.MODULE) is not None
        out.append((label + ("" if installed else f" (not installed: {module.INSTALL})"), module.NAME))
    versions, aliases = _registered_versions(client, limit)
    for version in versions:
        base = version.tags[tags.BASE_MODEL]
        named = "".join(f" @{a}" for a in aliases.get((version.name, str(version.version)), []))
        out.append((f"{version.name} v{version.version}{named}: continue its LoRA adapter (base {base})",
                    f"{MODELS_PREFIX}{version.name}/{version.version}"))
    return out


def _registered_versions(client, limit: int) -> tuple[list, dict]:
    """(the newest continuable versions, {(name, version): [aliases]}); the aliases are read per registered
    model, as a search of versions leaves them out."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    try:
        found = client.search_model_versions(max_results=limit, order_by=["creation_timestamp DESC"])
        versions = [v for v in found if _continuable(v.tags) is None]
        aliases: dict[tuple[str, str], list[str]] = {}
        for name in dict.fromkeys(v.name for v in versions):
            for alias, number in client.get_registered_model(name).aliases.items():
                aliases.setdefault((name, str(number)), []).append(alias)
    except MlflowException:  # a store without a registry: the built-in models are still there to pick
        return [], {}
    return versions, aliases


def _continuable(version_tags: dict) -> str | None:
    """None where a version is a LoRA chat adapter with a known base (model.init_adapter continues it), else
    why not."""
    method = version_tags.get(tags.METHOD)
    preset = presets.PRESETS.get(method)
    adapter = version_tags.get(tags.ADAPTER) or (preset.adapter if preset else None)
    objective = version_tags.get(tags.OBJECTIVE) or (preset.objective if preset else None)
    if not version_tags.get(tags.BASE_MODEL):
        return "it records no base model (tag finetune.base_model)"
    if adapter != "lora":
        return f"it is a {adapter or 'unknown'} fine-tune, and only a LoRA adapter is continued"
    if objective == "reward":
        return "it is a reward model (a score head, no chat adapter to continue)"
    return None


def expand_model(overrides: dict, client=None) -> dict:
    """The overrides with a registered version picked as the model (`model`/`model.name` =
    models:/NAME/VERSION or models:/NAME@ALIAS) turned into what the recipe means by it: model.name its base,
    model.init_adapter the version. FinetuneError where the version is not in the store or cannot be
    continued."""
    key = next((k for k in ("model", "model.name") if str(overrides.get(k, "")).startswith(MODELS_PREFIX)),
               None)
    if key is None:
        return dict(overrides)
    uri = str(overrides[key])
    version = _version_of(uri, client)
    if why := _continuable(version.tags):
        raise FinetuneError(
            f"model.name: {uri} cannot be continued: {why}. Pick a base model to train a fresh "
            "adapter (or continue a LoRA version)")
    given = overrides.get("model.init_adapter")
    if given and given != uri:
        raise FinetuneError(
            f"model.name is {uri} and model.init_adapter is {given}: continue one of them; clear "
            "model.init_adapter or pick a base model")
    out = {k: v for k, v in overrides.items() if k != key}
    return {**out, "model.name": version.tags[tags.BASE_MODEL], "model.init_adapter": uri}


def _version_of(uri: str, client):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = client or MlflowClient()
    ref = uri[len(MODELS_PREFIX):]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, number = ref.rpartition("/")
        if not name or not number.isdigit():
            raise FinetuneError(f"model.name: {uri} is not models:/NAME/VERSION or models:/NAME@ALIAS")
        return client.get_model_version(name, number)
    except MlflowException as e:
        raise FinetuneError(
            f"model.name: {uri} is not in the model registry ({e.message.splitlines()[0]}); pick "
            "one of the listed versions") from None


# ----------------------------------------------------------------------------------------------- what Start
# runs


def command_line(project_dir, entry_point: str, overrides: dict, backend_config: dict | None = None,
                 experiment: str | None = None) -> tuple[dict[str, str], list[str]]:
    """(the `-P` values Start queues, the command it runs): the overrides that change the resolved recipe (one
    equal to the project's resolved value is left out), a registered version picked as the model as
    model.name + model.init_adapter (`expand_model`), each as the loader reads it back (`to_param`); the
    command is the queue's own (launchers' `submit.command`, what studio/runs.Launcher.submit runs)."""
    project = Path(project_dir).resolve()
    needed = needed_overrides(project, entry_point, expand_model(overrides))
    params = {key: to_param(value) for key, value in needed.items()}
    return params, submit.command(str(project), entry_point, params, backend_config or {}, experiment)


def shell_line(argv: list[str]) -> str:
    """The command as one line to paste into a terminal."""
    return " ".join(shlex.quote(str(a)) for a in argv)


def needed_overrides(project_dir, entry_point: str, overrides: dict) -> dict:
    """The overrides without those that leave the resolved recipe as it is, dropped one at a time and kept out
    only where the recipe stays the same without them. Where the overrides do not load (a bad value), all of
    them stay: the command is what the user asked for, and the page's check names the problem."""
    full = _resolved(project_dir, entry_point, overrides)
    if full is None:
        return dict(overrides)
    kept = dict(overrides)
    for key in list(overrides):
        trial = {k: v for k, v in kept.items() if k != key}
        if _resolved(project_dir, entry_point, trial) == full:
            kept = trial
    return kept


def _resolved(project_dir, entry_point, overrides) -> dict | None:
    method = entry_point if entry_point in presets.PRESETS else None
    try:
        with captured_stderr():
            return resolved_dict(load_recipe(project_dir, method=method, overrides=overrides))
    except RecipeError:
        return None


def to_param(value) -> str:
    """A `-P` value as the loader reads it back (YAML): strings as given, None as null, other values in YAML's
    flow style (true, 0.001, [q_proj, v_proj], {metric: rougeL})."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def changed_overrides(fields: list[FormField], values: dict) -> dict[str, str]:
    """The page's values as `-P` overrides, only those that differ from their field's default: a widget's
    value as it comes (a number, a bool, a list, the text of a text box, one of a choice's strings); an
    emptied text box is the key unset (null). Keys without a field (typed by hand) are kept as given."""
    by_key = {f.key: f for f in fields}
    out = {}
    for key, value in values.items():
        field_ = by_key.get(key)
        if field_ is None:
            out[key] = to_param(value)
            continue
        # a text box of a key whose value may be text or not (`bool | str`, e.g. data.replay) holding a
        # default that is not text: read as the loader reads -P values
        if isinstance(value, str) and (field_.kind not in ("choice", "str") or
                                       field_.default is not None and not isinstance(field_.default, str)):
            value = _typed(value)
        if field_.kind == "str" and value == "":
            value = None
        if value != field_.default and not (field_.kind == "float" and _same_number(value, field_.default)):
            out[key] = to_param(value)
    return out


def _typed(text: str):
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def _same_number(a, b) -> bool:
    try:
        return a is not None and b is not None and float(a) == float(b)
    except (TypeError, ValueError):
        return False


def effective_yaml(project_dir, entry_point: str, overrides: dict) -> str:
    """The finetune.yaml the run amounts to: the resolved recipe, every key with its value (data paths
    absolute). Saved as a project's finetune.yaml, `mlflow run PROJECT -e ENTRY --backend finetune` without -P
    trains the same recipe. RecipeError where the recipe does not load."""
    method = entry_point if entry_point in presets.PRESETS else None
    with captured_stderr():
        recipe = load_recipe(project_dir, method=method, overrides=expand_model(overrides))
    data = resolved_dict(recipe)  # config/loading.py's to_yaml, without the machine's project folder
    data.pop("project_dir", None)
    head = (
        f"# The recipe of `mlflow run {Path(project_dir).name} -e {entry_point} --backend finetune` with the "
        "page's settings, every key resolved.\n")
    return head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
