"""What the playground may serve: registered versions and their base models, never arbitrary paths.

References users type (`NAME@challenger`, `NAME/3`, `models:/NAME@champion`, `base`) resolve to a
`ModelChoice`; `local_model` downloads a version once into the plugin's cache and says where its adapter,
weights and tokenizer are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.models.answers import add_response_template
from mlflow_finetune_plugin.registry import versions as registry
from mlflow_finetune_plugin.serving.base import ModelChoice
from mlflow_finetune_plugin.vllm_rules import (
    MERGED,
    MERGED_VISION,
    REWARD_MODEL,
    adapter_servable,
    merges_for_vllm,
)


@dataclass
class LocalModel:
    """A downloaded model version: its folder, logged model_config, artifact folders and registry tags."""

    choice: ModelChoice
    path: Path
    config: dict
    artifacts: dict[str, Path]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def base_ref(self) -> str | None:
        return self.config.get("base_model")

    @property
    def is_adapter(self) -> bool:
        return self.config.get("artifact", "adapter") == "adapter"

    @property
    def adapter_dir(self) -> Path | None:
        return self.artifacts.get("adapter")

    @property
    def tokenizer_dir(self) -> Path:
        return self.artifacts["tokenizer"]

    def adapter_config(self) -> dict:
        """The adapter's adapter_config.json ({} for full fine-tunes)."""
        if not self.adapter_dir:
            return {}
        return json.loads((self.adapter_dir / "adapter_config.json").read_text())

    def base_key(self) -> tuple:
        """Identifies the base weights: versions with equal keys can share one copy of the base."""
        return (self.base_ref, self.config.get("base_revision"), self.config.get("base_digest"))


def parse_ref(ref: str, default_name: str | None = None, base_of: ModelChoice | None = None) -> ModelChoice:
    """Resolve `NAME@ALIAS`, `NAME/3`, `NAME/v3`, `models:/NAME@ALIAS`, `models:/NAME/3`, `NAME/3:base`, or
    `base` (the base model of `base_of`) to a concrete version; raises FinetuneError listing what exists."""
    text = ref.strip()
    if text == "base":
        if base_of is None:
            raise FinetuneError("'base' needs a model to take the base of: give --model NAME@ALIAS first")
        return ModelChoice(base_of.name, base_of.version, base=True)
    base = text.endswith(":base")
    text = text.removesuffix(":base").removeprefix("models:/")
    if "@" in text:
        name, alias = text.split("@", 1)
        version_ref = "@" + alias
    elif "/" in text:
        name, version_ref = text.rsplit("/", 1)
    elif default_name:
        name, version_ref = default_name, text
    else:
        raise FinetuneError(
            f"{ref!r} names no version: use NAME@ALIAS (e.g. support-bot@challenger), NAME/VERSION, "
            "or base")
    mv = registry.get_version(name or default_name or "", version_ref)
    return ModelChoice(mv.name, str(mv.version), base)


def picker_choices(name: str) -> list[tuple[str, str]]:
    """(label, key) for every version of `name`, newest first, then one entry per distinct base model."""
    versions = registry.list_versions(name)
    aliases = registry.aliases_by_version(name)
    out, bases = [], {}
    for mv in reversed(versions):
        held = " ".join("@" + a for a in sorted(aliases.get(str(mv.version), [])))
        method = mv.tags.get(tags.METHOD, "")
        label = f"{name} v{mv.version}" + (f" {held}" if held else "") + (f" ({method})" if method else "")
        out.append((label, ModelChoice(name, str(mv.version)).key))
        bases.setdefault(mv.tags.get(tags.BASE_MODEL) or "", ModelChoice(name, str(mv.version), base=True))
    out.extend((base_label(choice, ref), choice.key) for ref, choice in bases.items())
    return distinct_labels(out)


def describe(choice: ModelChoice) -> str:
    """A short human label: `support-bot v3 @challenger`, or `base: SmolLM2-135M-Instruct` for a base
    model."""
    if choice.base:
        return base_label(choice, registry.get_version(choice.name, choice.version).tags.get(tags.BASE_MODEL))
    aliases = registry.aliases_by_version(choice.name).get(choice.version, [])
    return f"{choice.name} v{choice.version}" + "".join(f" @{a}" for a in sorted(aliases))


def details(choice: ModelChoice) -> str:
    """The whole story the short label leaves out: the base model's full reference (package, file, digest for
    the built-in smollm2 and gemma3; the hub id or path otherwise) and, for a version, how it was trained."""
    mv = registry.get_version(choice.name, choice.version)
    ref = mv.tags.get(tags.BASE_MODEL) or "not recorded"
    if choice.base:
        return f"the base model of {choice.name} v{choice.version}: {ref}"
    method = mv.tags.get(tags.METHOD)
    return f"{describe(choice)}" + (f", {method}" if method else "") + f" on {ref}"


def base_name(ref: str | None) -> str:
    """A base model's reference short enough for a picker: `SmolLM2-135M-Instruct` for the built-in smollm2
    and `gemma-3-270m` for the built-in gemma3 (whose references also name the package, file and digests),
    `tiny-llama` for the tiny model, else the last component of the hub id or local path."""
    from mlflow_finetune_plugin.models import gemma3, smollm2

    ref = (ref or "").strip()
    if smollm2.is_smollm2(ref):
        return smollm2.GGUF_FILE.split(".")[0]
    if gemma3.is_gemma3(ref):
        return gemma3.HUB_ID.split("/")[-1]
    return ref.removeprefix("builtin:").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def base_label(choice: ModelChoice, ref: str | None) -> str:
    """`base: NAME` for the base model of `choice`, whose base model reference is `ref` (None: not
    recorded)."""
    return f"base: {base_name(ref)}" if ref else f"base of {choice.name} v{choice.version}"


def distinct_labels(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(label, key) entries whose labels a picker can tell apart: a label several entries share (the bases of
    two versions, short-named alike) says whose base each one is."""
    counts = Counter(label for label, _ in entries)
    out = []
    for label, key in entries:
        choice = ModelChoice.from_key(key)
        out.append((f"{label} (of {choice.name} v{choice.version})" if counts[label] > 1 else label, key))
    return out


def trained_system_prompt(choice: ModelChoice) -> tuple[str, str]:
    """(system prompt, where it was found) that version `choice` was trained with; ("", "") for a base model,
    or a version trained without one or not logged by mlflow-finetune.

    Training logs it in the model_config. Versions logged before that fall back to their source run's recipe
    (`data.system_prompt`, or their task's for a per-task multitask adapter); their training data is not read:
    it
    can be large, or gone.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    if choice.base:  # the base model was not trained with any
        return "", ""
    mv = registry.get_version(choice.name, choice.version)
    # A pre-filled prompt is a convenience: a version whose model or run cannot be read gets none, and the
    # page still opens (its pane says why it cannot answer).
    try:  # the MLmodel file only, not the weights: the openai engine never downloads them
        config = Model.load(f"models:/{choice.name}/{choice.version}").flavors.get("python_function", {})
        config = config.get("config") or {}
        if config.get("system_prompt"):
            return str(config["system_prompt"]), "from the training data"
        recipe = registry.source_recipe(registry.source_run_id(mv)) or {}
    except (MlflowException, OSError):
        return "", ""
    task = config.get("task") or ""
    for key, section in ((f"multitask.tasks.{task}", _section(recipe, "multitask", "tasks", task)),
                         ("data", _section(recipe, "data"))):
        if section.get("system_prompt"):
            return str(section["system_prompt"]), f"from the recipe's {key}.system_prompt"
    return "", ""


def logged_num_beams(choice: ModelChoice) -> int:
    """The beams version `choice` (or, for `:base`, the version it names) was evaluated with
    (`eval.num_beams`, logged in its model_config): the decoding its figures describe. 1 when it logged none
    or cannot be read."""
    try:
        return max(1, int(_logged_config(choice).get("num_beams") or 1))
    except (TypeError, ValueError):
        return 1


def takes_images(choice: ModelChoice) -> bool:
    """Whether version `choice` (or, for `:base`, its base model) is a vision-language model: its logged
    model_config says `takes_images` (logged_model.saved_artifacts records it where the tokenizer carries a
    processor). False when the version's model cannot be read."""
    return bool(_logged_config(choice).get("takes_images"))


def retriever_of(choice: ModelChoice):
    """The `retriever.Retriever` version `choice` was trained with (its logged model's `retrieval` artifact),
    loaded once per downloaded version; None for a base model and for a version that does not retrieve."""
    if choice.base or not _logged_config(choice).get("retrieval"):
        return None
    from mlflow_finetune_plugin.retriever import RETRIEVAL_DIR

    folder = local_model(choice).artifacts.get(RETRIEVAL_DIR)
    return _retriever(str(folder)) if folder else None


@functools.lru_cache(maxsize=16)
def _retriever(folder: str):
    from mlflow_finetune_plugin.retriever import Retriever

    return Retriever.load(folder)


def _logged_config(choice: ModelChoice) -> dict:
    """The model_config version `choice` was logged with, read from its MLmodel file only (not the weights:
    the openai
    engine never downloads them); {} when it cannot be read."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    try:
        config = Model.load(f"models:/{choice.name}/{choice.version}").flavors.get("python_function", {})
    except (MlflowException, OSError):
        return {}
    return dict(config.get("config") or {})


def _section(data, *keys: str) -> dict:
    """data[k1][k2]... of a recipe read back as plain data; {} where a key is missing."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else {}


def local_model(choice: ModelChoice) -> LocalModel:
    """Download version `choice` (once; later calls reuse the cached folder) and describe its contents."""
    import mlflow
    from filelock import FileLock
    from mlflow.models import Model

    from mlflow_finetune_plugin.paths import cache_root

    mv = registry.get_version(choice.name, choice.version)
    if mv.tags.get(tags.OBJECTIVE) == "reward":  # before minutes go into downloading it
        raise FinetuneError(
            f"{choice.name} v{choice.version} is a reward model and cannot be served or chatted with: "
            f"{REWARD_MODEL}. Serve a chat version instead")
    # Keyed by the logged model too: two tracking servers can both hold a `support-bot` v1.
    digest = hashlib.sha256(str(mv.source).encode()).hexdigest()[:10]
    root = cache_root() / "serving" / "models"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"{_safe(choice.name)}-v{choice.version}-{digest}"
    with FileLock(str(dest) + ".lock"):
        if not (dest / "MLmodel").exists():
            tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=root))
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{choice.name}/{choice.version}",
                                                    dst_path=str(tmp))
            except Exception as e:  # noqa: BLE001 - any store error: say which version and why
                shutil.rmtree(tmp, ignore_errors=True)
                raise FinetuneError(f"could not download {choice.name} v{choice.version} ({mv.source}): "
                                    f"{e}") from None
            if not (tmp / "MLmodel").exists():
                shutil.rmtree(tmp, ignore_errors=True)
                raise FinetuneError(
                    f"{choice.name} v{choice.version} has no MLflow model at its source {mv.source}: "
                    "the playground serves versions made by `mlflow run ... --backend finetune`")
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
    pyfunc = Model.load(str(dest / "MLmodel")).flavors.get("python_function", {})
    config = dict(pyfunc.get("config") or {})
    artifacts = {k: dest / spec["path"] for k, spec in (pyfunc.get("artifacts") or {}).items()}
    if "tokenizer" not in artifacts or not ({"adapter", "model"} & set(artifacts)):
        raise FinetuneError(
            f"{choice.name} v{choice.version} was not logged by mlflow-finetune (no adapter/model and "
            "tokenizer artifacts); the playground serves versions made by `mlflow run ... --backend "
            "finetune`")
    return LocalModel(choice, dest, config, artifacts, dict(mv.tags))


def vllm_merges(local: LocalModel) -> bool:
    """Whether vLLM serves this version merged into its base (`merged_folder`), as a model of its own rather
    than a LoRA request on the base (`vllm_merge_reason` says why)."""
    return vllm_merge_reason(local) is not None


def vllm_merge_reason(local: LocalModel) -> str | None:
    """Why vLLM serves this version merged into its base, else None: a LoRA adapter with trained token rows
    (`vllm_rules.merges_for_vllm`), or one with weights in a vision-language model's vision tower or
    projector, which vLLM leaves out of a LoRA request (`adapts_vision`)."""
    if local.choice.base or not local.is_adapter:
        return None
    config = local.adapter_config()
    if merges_for_vllm(config):
        return MERGED
    return MERGED_VISION if adapter_servable(config)[0] and adapts_vision(local) else None


def adapts_vision(local: LocalModel) -> bool:
    """Whether a vision-language version's adapter has weights in its base's vision tower or projector (asked
    of the base's layout: `models.vision.vision_modules`)."""
    from mlflow_finetune_plugin.paths import tensor_names

    if not local.is_adapter or not local.config.get("takes_images"):
        return False
    prefixes = _vision_modules(local.base_ref, local.config.get("base_revision"))
    # PEFT saves `base_model.model.<module>.lora_A.weight`
    names = [n.removeprefix("base_model.model.") for n in tensor_names(local.adapter_dir)]
    return any(n.startswith(p + ".") for n in names for p in prefixes)


@functools.lru_cache(maxsize=8)
def _vision_modules(base_ref: str, revision: str | None) -> tuple[str, ...]:
    from transformers import AutoConfig

    from mlflow_finetune_plugin.models.base import resolve_model_path
    from mlflow_finetune_plugin.models.vision import config_vision_modules

    return tuple(config_vision_modules(AutoConfig.from_pretrained(resolve_model_path(base_ref),
                                                                  revision=revision)))


def vllm_support(local: LocalModel) -> tuple[bool, str]:
    """Whether vLLM can serve this version, and why not: served merged where only its token rows stand in the
    way (`vllm_merges`); else the version's `finetune.vllm_compatible` tag when training recorded one, else
    computed from adapter_config.json (LoRA only, no DoRA, no trained biases or extra modules, a rank vLLM's
    kernels support)."""
    if reason := vllm_merge_reason(local):
        return True, reason
    tag = local.tags.get(tags.VLLM_COMPATIBLE)
    if tag in ("true", "false"):
        return tag == "true", local.tags.get(tags.VLLM_REASON, "")
    if not local.is_adapter:
        return True, "a full fine-tune is a plain model folder"
    return adapter_servable(local.adapter_config())


def require_vllm_support(local: LocalModel) -> None:
    """Raise FinetuneError saying why vLLM cannot serve `local` and what to do instead."""
    ok, reason = vllm_support(local)
    if not ok:
        c = local.choice
        raise FinetuneError(
            f"vLLM cannot serve {c.name} v{c.version}: {reason}.\n"
            f"Use the transformers engine (`mlflow-finetune playground --model {c.name}/{c.version} --engine "
            f"transformers`), or merge the adapter into the base and serve the merged model "
            f"(`mlflow-finetune serve models:/{c.name}/{c.version} --engine transformers`).")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def served_name(choice: ModelChoice) -> str:
    """The model name a server started by `mlflow-finetune serve` gives `choice`: `bot-v3` or
    `bot-v3-base`."""
    return f"{choice.name}-v{choice.version}" + ("-base" if choice.base else "")


MERGED_LAYOUT = 3


def merged_folder(choice: ModelChoice) -> Path:
    """A full model folder for `choice` (made once, cached): the adapter merged into the base, the full
    fine-tune's weights, or (`:base`) the base weights; always with the version's logged tokenizer and chat
    template. Its name is `served_name(choice)`."""
    from filelock import FileLock

    from mlflow_finetune_plugin.paths import cache_root

    local = local_model(choice)
    # MERGED_LAYOUT: folders made before the tokenizer carried its response template are made again
    digest = hashlib.sha256(f"{local.path}:{MERGED_LAYOUT}".encode()).hexdigest()[:10]
    dest = cache_root() / "serving" / "merged" / digest / served_name(choice)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not (dest / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
            try:
                _write_full_model(local, tmp)
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_full_model(local: LocalModel, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.logged_model import load_logged_base, load_logged_model
    from mlflow_finetune_plugin.models.generation import stop_at_every_end_of_turn
    from mlflow_finetune_plugin.models.vision import has_processor_files

    c = local.choice
    if c.base:  # served with the version's template: its end of turn stops the base's answers too
        model = load_logged_base(local.config, torch.float32)
        stop_at_every_end_of_turn(model, AutoTokenizer.from_pretrained(local.tokenizer_dir))
    else:
        model = load_logged_model(local.path, device="cpu").model
        if local.is_adapter:
            peft_type = local.adapter_config().get("peft_type")
            if not hasattr(model, "merge_and_unload") or peft_type in _UNMERGEABLE:
                raise FinetuneError(
                    f"{c.name} v{c.version} is a {peft_type} adapter: it adds virtual tokens rather "
                    "than weight updates, so it cannot be merged into a model folder. Compare it "
                    f"with the transformers engine: `mlflow-finetune playground --model "
                    f"{c.name}/{c.version} --engine transformers`")
            model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    # a vision-language model: its processor goes with the weights
    if has_processor_files(local.tokenizer_dir):
        shutil.copytree(local.tokenizer_dir, out, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(local.tokenizer_dir)
    # `transformers serve` reads the final answer through it (gpt-oss's channels), as the other engines do
    add_response_template(tokenizer, model.config.model_type)
    tokenizer.save_pretrained(out)


_UNMERGEABLE = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")
