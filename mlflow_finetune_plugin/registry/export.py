"""`mlflow-finetune export`: a logged fine-tune as a plain model folder (and a GGUF file, by llama.cpp's
converter).

The folder is a standard transformers layout: `config.json`, `generation_config.json`, safetensors weights,
`tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` (the template the model was trained with).
An adapter is merged into its base with PEFT's `merge_and_unload`, so
`AutoModelForCausalLM.from_pretrained(DIR)` needs no PEFT, and vLLM and `transformers serve` serve the folder
as any hub model. A full fine-tune's weights are copied as they were logged. Prompt and prefix tuning add
virtual tokens instead of weight updates: nothing to merge, so they are refused.

With `--gguf` the finished folder is also converted into one GGUF file by llama.cpp's `convert_hf_to_gguf.py`
(`registry.gguf`, found by `registry.llama_cpp`); finding the converter and its support check run before any
weights load.

The export is logged back as artifacts of the model's source run under `exports/<NAME>-v<VERSION>` (a suffix
when taken), and the version gets `finetune.export.*` tags naming where it went and what it holds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.models.answers import add_response_template
from mlflow_finetune_plugin.registry.gguf import GGUF_TYPES, check_gguf_support, write_gguf
from mlflow_finetune_plugin.registry.llama_cpp import find_llama_cpp

EXPORT_INFO = "export.json"


@dataclass
class ExportResult:
    folder: Path
    gguf_file: Path | None
    merged: bool                 # an adapter merged into its base (False: a full fine-tune copied as is)
    artifact_uri: str | None     # where the export was logged; None with log=False or no source run


def export_model(model_uri: str, out_dir: str | Path, gguf_type: str | None = None, log: bool = True,
                 echo=print, llama_cpp: str | None = None) -> ExportResult:
    """Export `model_uri` (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model) into the new or empty
    folder `out_dir`; with `gguf_type` (f32, f16, q8_0) also write `gguf/<NAME>-v<VERSION>.<type>.gguf` in it,
    converted by the llama.cpp that `llama_cpp` names (a checkout or llama-cpp-python's sdist; None:
    $LLAMA_CPP_DIR, PATH, cache)."""
    from mlflow_finetune_plugin.registry.versions import resolve_model_uri

    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise FinetuneError(f"--gguf-type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)}")
    converter = find_llama_cpp(llama_cpp) if gguf_type else None
    name, version, run_id = resolve_model_uri(model_uri)
    out = _empty_folder(out_dir)
    try:
        result = _export_into(out, model_uri, name, version, run_id, gguf_type, converter, echo)
    except BaseException:
        # Nothing half-written is left behind: the folder was new or empty, and is empty again.
        for item in out.iterdir():
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()
        raise
    if log:
        result.artifact_uri = _log_export(out, run_id, name, version, echo)
    return result


def _export_into(out: Path, model_uri: str, name, version, run_id, gguf_type, converter,
                 echo) -> ExportResult:
    import mlflow

    label = f"{name}-v{version}" if name else "model"
    with tempfile.TemporaryDirectory() as tmp:
        echo(f"Downloading {model_uri}")
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
        config, artifacts = _logged(local, model_uri)
        if gguf_type:  # refuse before any weights load
            check_gguf_support(_model_config(config, artifacts), artifacts["tokenizer"], converter)
        merged = _write_folder(local, config, artifacts, out, echo)
    gguf_file = None
    if gguf_type:
        # In a folder of its own: transformers' GGUF loader mixes in tokenizer files that sit beside the GGUF
        # file.
        (out / "gguf").mkdir()
        gguf_file = write_gguf(out, out / "gguf" / f"{label}.{gguf_type}.gguf", gguf_type, label, converter,
                               config.get("base_model"), echo)
    info = {"source": f"models:/{name}/{version}" if name else model_uri, "model_uri": model_uri,
            "source_run": run_id, "base_model": config.get("base_model"), "merged": merged,
            "method": config.get("method"), "gguf_type": gguf_type,
            "gguf_file": gguf_file.relative_to(out).as_posix() if gguf_file else None,
            "gguf_converter": str(converter / "convert_hf_to_gguf.py") if gguf_file else None}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return ExportResult(out, gguf_file, merged, None)


def _empty_folder(path) -> Path:
    out = Path(path).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FinetuneError(f"--to {out}: {'is not a folder' if not out.is_dir() else 'is not empty'}. "
                            "Give a new folder (it is created) or an empty one; export never overwrites "
                            "files.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _logged(local: Path, model_uri: str) -> tuple[dict, dict[str, Path]]:
    """The logged model_config and artifact folders of a model logged by mlflow-finetune."""
    from mlflow.models import Model

    pyfunc = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    artifacts = {k: local / spec["path"] for k, spec in (pyfunc.get("artifacts") or {}).items()}
    if "tokenizer" not in artifacts or not ({"adapter", "model"} & set(artifacts)):
        raise FinetuneError(f"{model_uri} was not logged by mlflow-finetune (no adapter/model and tokenizer "
                            "artifacts): export takes versions made by `mlflow run ... --backend finetune`")
    return dict(pyfunc.get("config") or {}), artifacts


def _model_config(config: dict, artifacts: dict[str, Path]) -> dict:
    """config.json of the model the export will hold: the full fine-tune's own, or the adapter's base's."""
    from transformers import AutoConfig

    from mlflow_finetune_plugin.models.base import resolve_model_path

    if "model" in artifacts:
        return json.loads((artifacts["model"] / "config.json").read_text())
    base = AutoConfig.from_pretrained(resolve_model_path(config["base_model"]),
                                      revision=config.get("base_revision"))
    return base.to_dict()


def _write_folder(local: Path, config: dict, artifacts: dict[str, Path], out: Path, echo) -> bool:
    """Write the full model folder; True when an adapter was merged."""
    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.models.vision import has_processor_files

    if "model" in artifacts:
        echo("Full fine-tune: copying its weights as logged")
        for item in artifacts["model"].iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
        merged = False
    else:
        _refuse_unmergeable(artifacts["adapter"])
        _write_merged(local, config, out, echo)
        merged = True
    # a vision-language model: its processor goes with the weights
    if has_processor_files(artifacts["tokenizer"]):
        shutil.copytree(artifacts["tokenizer"], out, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(artifacts["tokenizer"])
    # `transformers serve OUT` then reads the final answer out of channel markup (gpt-oss), as predict does
    add_response_template(tokenizer, json.loads((out / "config.json").read_text()).get("model_type", ""))
    tokenizer.save_pretrained(out)
    return merged


def _refuse_unmergeable(adapter_dir: Path) -> None:
    from peft import PeftConfig

    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    if peft_config.is_prompt_learning:
        kind = str(peft_config.peft_type).rsplit(".", 1)[-1]
        raise FinetuneError(
            f"this version is a {kind} adapter: it adds learned virtual tokens in front of every input "
            "instead of changing weights, so there is nothing to merge and no plain model folder can hold "
            "it. Serve it with its base (`mlflow-finetune playground --model NAME@ALIAS --engine "
            "transformers`), or fine-tune with -e lora, -e ia3 or -e full to get an exportable model.")


def _write_merged(local: Path, config: dict, out: Path, echo) -> None:
    import torch
    from transformers import AutoConfig

    from mlflow_finetune_plugin.logged_model import load_logged_model
    from mlflow_finetune_plugin.models.base import resolve_model_path
    from mlflow_finetune_plugin.models.chat_format import stop_ids

    echo(f"Loading the base {config['base_model']} with the adapter")
    loaded = load_logged_model(local, device="cpu")
    echo("Merging the adapter into the base")
    # Merged in float32 (as the adapter was loaded), saved in the base's own dtype. safe_merge refuses NaN
    # weights.
    model = loaded.model.merge_and_unload(progressbar=True, safe_merge=True)
    # Every end-of-turn id stops generation in whatever loads the folder (the base's own config may name only
    # eos).
    stops = stop_ids(loaded.tokenizer, model.generation_config)
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    base_dtype = AutoConfig.from_pretrained(resolve_model_path(config["base_model"]),
                                            revision=config.get("base_revision")).dtype
    if isinstance(base_dtype, torch.dtype) and base_dtype != model.dtype:
        model = model.to(base_dtype)
    echo(f"Writing safetensors to {out}")
    model.save_pretrained(out, safe_serialization=True)


# --- logging back
# -------------------------------------------------------------------------------------------------


def _log_export(out: Path, run_id: str | None, name: str | None, version: str | None, echo) -> str | None:
    """Log `out` into the source run under exports/<label>[-N] and tag the version (or, with no version, the
    run)."""
    from mlflow import MlflowClient

    if not run_id:
        echo("Not logged: the model has no source run to log the export into (use --no-log to silence this).")
        return None
    info = json.loads((out / EXPORT_INFO).read_text())
    label = f"{name}-v{version}" if name else "model"
    client = MlflowClient()
    taken = {a.path for a in client.list_artifacts(run_id, "exports")}
    path, n = f"exports/{label}", 1
    while path in taken:
        n += 1
        path = f"exports/{label}-{n}"
    echo(f"Logging the export to run {run_id} under {path}")
    client.log_artifacts(run_id, str(out), path)
    uri = f"runs:/{run_id}/{path}"
    values = {tags.EXPORT_URI: uri, tags.EXPORT_SOURCE: info["source"],
              tags.EXPORT_MERGED: str(info["merged"]).lower(), tags.EXPORT_BASE: info["base_model"] or "",
              tags.EXPORT_GGUF_TYPE: info["gguf_type"] or "none"}
    for key, value in values.items():
        if version:
            client.set_model_version_tag(name, version, key, value)
        else:
            client.set_tag(run_id, key, value)
    return uri
