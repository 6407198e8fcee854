"""`mlflow-finetune export`: a logged fine-tune as a plain model folder (and, for Llama models, a GGUF file).

The folder is a standard transformers layout: `config.json`, `generation_config.json`, safetensors weights,
`tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` (the template the model was trained with). An
adapter is merged into its base with PEFT's `merge_and_unload`, so `AutoModelForCausalLM.from_pretrained(DIR)` needs
no PEFT, and vLLM and `transformers serve` serve the folder as any hub model. A full fine-tune's weights are copied
as they were logged. Prompt and prefix tuning add virtual tokens instead of weight updates: nothing to merge, so
they are refused.

GGUF (`--gguf`) follows what llama.cpp's `convert_hf_to_gguf.py` writes for a Llama model with a byte-level BPE
(GPT-2 style) vocabulary: gguf's tensor name map for `MODEL_ARCH.LLAMA`, the `llama.*` hyperparameter keys, tokens,
token types, merges, special token ids and chat template, and the Q/K rows permuted into the interleaved rope order
llama.cpp computes with. Tensors stream from the merged safetensors one at a time, so memory stays at one tensor.

The export is logged back as artifacts of the model's source run under `exports/<NAME>-v<VERSION>` (a suffix when
taken), and the version gets `finetune.export.*` tags naming where it went and what it holds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.errors import FinetuneError

GGUF_TYPES = ("f32", "f16")
EXPORT_INFO = "export.json"


@dataclass
class ExportResult:
    folder: Path
    gguf_file: Path | None
    merged: bool                 # an adapter merged into its base (False: a full fine-tune copied as is)
    artifact_uri: str | None     # where the export was logged; None with log=False or no source run


def export_model(model_uri: str, out_dir: str | Path, gguf_type: str | None = None, log: bool = True,
                 echo=print) -> ExportResult:
    """Export `model_uri` (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model) into the new or empty folder
    `out_dir`; with `gguf_type` (f32, f16) also write `gguf/<NAME>-v<VERSION>.<type>.gguf` in it."""
    from mlflow_finetune_plugin.registry.versions import resolve_model_uri

    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise FinetuneError(f"--gguf-type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)}")
    name, version, run_id = resolve_model_uri(model_uri)
    out = _empty_folder(out_dir)
    try:
        result = _export_into(out, model_uri, name, version, run_id, gguf_type, echo)
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


def _export_into(out: Path, model_uri: str, name, version, run_id, gguf_type, echo) -> ExportResult:
    import mlflow

    label = f"{name}-v{version}" if name else "model"
    with tempfile.TemporaryDirectory() as tmp:
        echo(f"Downloading {model_uri}")
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
        config, artifacts = _logged(local, model_uri)
        if gguf_type:  # refuse before any weights load
            check_gguf_support(_model_config(config, artifacts), artifacts["tokenizer"])
        merged = _write_folder(local, config, artifacts, out, echo)
    gguf_file = None
    if gguf_type:
        # In a folder of its own: transformers' GGUF loader mixes in tokenizer files that sit beside the GGUF file.
        (out / "gguf").mkdir()
        gguf_file = write_gguf(out, out / "gguf" / f"{label}.{gguf_type}.gguf", gguf_type, label,
                               config.get("base_model"), echo)
    info = {"source": f"models:/{name}/{version}" if name else model_uri, "model_uri": model_uri,
            "source_run": run_id, "base_model": config.get("base_model"), "merged": merged,
            "method": config.get("method"), "gguf_type": gguf_type,
            "gguf_file": gguf_file.relative_to(out).as_posix() if gguf_file else None}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return ExportResult(out, gguf_file, merged, None)


def _empty_folder(path) -> Path:
    out = Path(path).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FinetuneError(f"--to {out}: {'is not a folder' if not out.is_dir() else 'is not empty'}. "
                            "Give a new folder (it is created) or an empty one; export never overwrites files.")
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
    base = AutoConfig.from_pretrained(resolve_model_path(config["base_model"]), revision=config.get("base_revision"))
    return base.to_dict()


def _write_folder(local: Path, config: dict, artifacts: dict[str, Path], out: Path, echo) -> bool:
    """Write the full model folder; True when an adapter was merged."""
    from transformers import AutoTokenizer

    if "model" in artifacts:
        echo("Full fine-tune: copying its weights as logged")
        for item in artifacts["model"].iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
        merged = False
    else:
        _refuse_unmergeable(artifacts["adapter"])
        _write_merged(local, config, out, echo)
        merged = True
    AutoTokenizer.from_pretrained(artifacts["tokenizer"]).save_pretrained(out)
    return merged


def _refuse_unmergeable(adapter_dir: Path) -> None:
    from peft import PeftConfig

    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    if peft_config.is_prompt_learning:
        kind = str(peft_config.peft_type).rsplit(".", 1)[-1]
        raise FinetuneError(
            f"this version is a {kind} adapter: it adds learned virtual tokens in front of every input instead of "
            "changing weights, so there is nothing to merge and no plain model folder can hold it. Serve it with its "
            "base (`mlflow-finetune playground --model NAME@ALIAS --engine transformers`), or fine-tune with "
            "-e lora, -e ia3 or -e full to get an exportable model.")


def _write_merged(local: Path, config: dict, out: Path, echo) -> None:
    import torch
    from transformers import AutoConfig

    from mlflow_finetune_plugin.logged_model import load_logged_model
    from mlflow_finetune_plugin.models.base import resolve_model_path

    echo(f"Loading the base {config['base_model']} with the adapter")
    model = load_logged_model(local, device="cpu").model
    echo("Merging the adapter into the base")
    # Merged in float32 (as the adapter was loaded), saved in the base's own dtype. safe_merge refuses NaN weights.
    model = model.merge_and_unload(progressbar=True, safe_merge=True)
    base_dtype = AutoConfig.from_pretrained(resolve_model_path(config["base_model"]),
                                            revision=config.get("base_revision")).dtype
    if isinstance(base_dtype, torch.dtype) and base_dtype != model.dtype:
        model = model.to(base_dtype)
    echo(f"Writing safetensors to {out}")
    model.save_pretrained(out, safe_serialization=True)


# --- GGUF ---------------------------------------------------------------------------------------------------------


def check_gguf_support(model_config: dict, tokenizer_dir: Path) -> str:
    """The llama.cpp pre-tokenizer name for this model's tokenizer; FinetuneError when no GGUF can be written."""
    fix = ("Export without --gguf and convert the folder with llama.cpp's convert_hf_to_gguf.py, which knows more "
           "architectures and tokenizers.")
    model_type = model_config.get("model_type")
    if model_type != "llama":
        raise FinetuneError(f"--gguf writes Llama-architecture models (model_type llama, e.g. the built-in tiny and "
                            f"smollm2); this model is {model_type!r}. {fix}")
    rope = model_config.get("rope_parameters") or model_config.get("rope_scaling") or {}
    unsupported = [f"{key}={model_config[key]}" for key in ("attention_bias", "mlp_bias") if model_config.get(key)]
    if rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope_type={rope['rope_type']}")
    if unsupported:
        raise FinetuneError(f"--gguf writes plain Llama models; this one has {', '.join(unsupported)}. {fix}")
    return _pre_tokenizer(tokenizer_dir, fix)


def _pre_tokenizer(tokenizer_dir: Path, fix: str) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json: `gpt-2` for GPT-2's split (ByteLevel
    with its own regex), else the name transformers' GGUF reader maps to the same split regex, so a reader rebuilds
    the tokenizer that was trained with."""
    path = tokenizer_dir / "tokenizer.json"
    spec = json.loads(path.read_text()) if path.is_file() else {}
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
        raise FinetuneError(f"--gguf writes byte-level BPE (GPT-2 style) vocabularies; {path} is "
                            f"{model.get('type') or 'missing'}{' with byte fallback' if model.get('byte_fallback') else ''}"
                            f"{' with a normalizer' if spec.get('normalizer') else ''}. {fix}")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name
    raise FinetuneError(f"--gguf: the pre-tokenizer of {path} ({json.dumps(pre)[:200]}) is not one llama.cpp "
                        f"names. {fix}")


def write_gguf(model_dir: Path, dest: Path, gguf_type: str, label: str, base_ref: str | None = None,
               echo=print) -> Path:
    """Write the Llama model folder `model_dir` (safetensors + tokenizer) as GGUF file `dest` in f32 or f16."""
    import gguf
    from tqdm.auto import tqdm

    config = json.loads((model_dir / "config.json").read_text())
    pre = check_gguf_support(config, model_dir)
    echo(f"Writing GGUF ({gguf_type}) to {dest}")
    writer = gguf.GGUFWriter(dest, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_llama_metadata(writer, config, gguf_type, label, base_ref)
    _add_vocab(writer, model_dir, config["vocab_size"], pre)
    plan = _tensor_plan(model_dir, config, gguf_type)
    for gguf_name, _, _, shape, dtype in plan:
        writer.add_tensor_info(gguf_name, shape, dtype, _nbytes(shape, dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        with tqdm(total=sum(_nbytes(s, d) for _, _, _, s, d in plan), unit="B", unit_scale=True,
                  desc="GGUF tensors") as bar:
            for _, file, hf_name, _, dtype in plan:
                array = _gguf_tensor(file, hf_name, config, dtype)
                writer.write_tensor_data(array)
                bar.update(array.nbytes)
    finally:
        writer.close()
    return dest


def _add_llama_metadata(writer, config: dict, gguf_type: str, label: str, base_ref: str | None) -> None:
    """The `general.*` and `llama.*` keys llama.cpp writes for a Llama model, read back by transformers' GGUF
    loader as the config."""
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_name(label)
    if base_ref:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_ref)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if gguf_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(writer, model_dir: Path, vocab_size: int, pre: str) -> None:
    """Tokens and their types as llama.cpp's converter lists a GPT-2 style vocabulary (ids without a token become
    `[PAD<id>]`, added tokens are CONTROL when special), then merges, special ids and chat template through gguf's
    SpecialVocab, which reads them from the saved tokenizer files."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise FinetuneError(f"the tokenizer in {model_dir} has token id {max(by_id)}, beyond the model's "
                            f"vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or (token.startswith("<|") and token.endswith("|>")):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_special_token.setdefault("bos", False)  # the tokenizer adds no BOS unless its config says so
    special.add_to_gguf(writer, quiet=True)
    if not special.merges:
        raise FinetuneError(f"the tokenizer in {model_dir} has no BPE merges; a GGUF without them cannot tokenize")


def _tensor_plan(model_dir: Path, config: dict, gguf_type: str) -> list[tuple[str, Path, str, tuple, object]]:
    """(GGUF name, safetensors file, HF name, shape, numpy dtype) of every tensor, in file order. f16 keeps 1-D
    tensors (the norms) in f32, as llama.cpp does."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    plan = []
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():
                if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # tied: llama.cpp reads the output projection from token_embd
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise FinetuneError(f"{file.name}: tensor {hf_name!r} has no GGUF name for a Llama model; export "
                                        "without --gguf and convert with llama.cpp's convert_hf_to_gguf.py")
                shape = tuple(f.get_slice(hf_name).get_shape())
                dtype = np.float16 if gguf_type == "f16" and len(shape) > 1 else np.float32
                plan.append((gguf_name, file, hf_name, shape, dtype))
    if not plan:
        raise FinetuneError(f"no safetensors weights in {model_dir}")
    return plan


def _nbytes(shape: tuple, dtype) -> int:
    import numpy as np

    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _gguf_tensor(file: Path, hf_name: str, config: dict, dtype):
    """One tensor as GGUF stores it: Q and K rows permuted for llama.cpp's rope, in the file's dtype."""
    import torch
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        weight = f.get_tensor(hf_name).to(torch.float32)
    heads = config["num_attention_heads"]
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        weight = rope_permute(weight, heads)
    elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        weight = rope_permute(weight, config.get("num_key_value_heads") or heads)
    return weight.numpy().astype(dtype)


def rope_permute(weight, n_head: int):
    """HF Llama keeps each head's rotary pairs as two halves (x_i, x_{i+d/2}); llama.cpp rotates adjacent pairs
    (x_2i, x_2i+1). Reorder the output rows of each head from halves to interleaved, as convert_hf_to_gguf.py does
    (transformers' GGUF loader applies the inverse)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# --- logging back -------------------------------------------------------------------------------------------------


def _log_export(out: Path, run_id: str | None, name: str | None, version: str | None, echo) -> str | None:
    """Log `out` into the source run under exports/<label>[-N] and tag the version (or, with no version, the run)."""
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
    values = {tags.EXPORT_URI: uri, tags.EXPORT_SOURCE: info["source"], tags.EXPORT_MERGED: str(info["merged"]).lower(),
              tags.EXPORT_BASE: info["base_model"] or "", tags.EXPORT_GGUF_TYPE: info["gguf_type"] or "none"}
    for key, value in values.items():
        if version:
            client.set_model_version_tag(name, version, key, value)
        else:
            client.set_tag(run_id, key, value)
    return uri
