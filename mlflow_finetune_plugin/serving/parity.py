"""Serving parity, the engine's side: a version's held-out prompts, as its evaluation recorded them
(`evaluate/report.TUNED_FILE`), answered by the engine `mlflow-finetune serve` would serve it with, in this
process.

- transformers: what `serve --engine transformers` runs, `transformers serve` on the version's merged copy
  (`choices.merged_folder`: the adapter folded into the base, the logged tokenizer and chat template): the
  copy's own tokenizer renders each request's messages with its chat template (today's date pinned, as
  `transformers_cli.py` pins it), and the copy's generation config (deep-copied, greedy, the evaluation's
  max_new_tokens) decides the stop ids, as that server builds it per request. Here the prompts go as one
  left-padded batch per `eval.batch_size`.
- vllm: vLLM's offline `LLM` on what `serve --engine vllm` loads (the base with the version's LoRA, or the
merged copy
  where vLLM serves it merged), the same tokenizer folder, `LLM.chat` rendering the template, the model's
  generation-config defaults, greedy.

A version trained with retrieval is asked as `serve` asks it, each prompt with the chunks its retriever finds
(`served_prompts`).

`check` answers, compares (`evaluate/parity.compare`) and returns the `registry.parity.Parity` that `promote`
gates on; `promote_checked` is `registry.promotion.promote` with this check wired in: the one way every door
promotes (`mlflow-finetune promote`, the studio, the playground, sweeps, `monitor --retrain`, auto-promotion
after training).
"""

from __future__ import annotations

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.evaluate.parity import (
    RAN_ON,
    Served,
    compare,
    not_checked,
    recorded,
    served_ending,
)
from mlflow_finetune_plugin.models.answers import LENGTH, STOP, answer_text, clean_answer
from mlflow_finetune_plugin.registry import versions as registry
from mlflow_finetune_plugin.registry.parity import ENGINES, FAILED, Parity
from mlflow_finetune_plugin.serving.base import ModelChoice, plain_messages
from mlflow_finetune_plugin.serving.choices import (
    local_model,
    merged_folder,
    retriever_of,
    takes_images,
    vllm_merges,
)
from mlflow_finetune_plugin.serving.retrieving import asked


def check(name: str, version: str, engine: str, gates=None) -> Parity:
    """Answer version `version` of `name`'s recorded held-out prompts with `engine` and compare with its
    evaluation. Not checked (with why) where its run recorded no tuned answers, or for a vision-language
    model; failed where the engine cannot serve it at all (prefix and prompt tuning cannot be merged for
    `serve --engine transformers`)."""
    from mlflow import MlflowClient

    if engine not in ENGINES:
        raise FinetuneError(f"parity engine {engine!r}: use {', '.join(ENGINES)} (or off, with a reason)")
    mv = registry.get_version(name, version)
    record, why = recorded(MlflowClient(), registry.source_run_id(mv), mv.tags.get(tags.TASK))
    if record is None:
        return not_checked(
            f"{why}; evaluate it into its source run (`mlflow-finetune evaluate models:/{name}/"
            f"{mv.version} --run-id RUN`) to check it", engine)
    choice = ModelChoice(mv.name, str(mv.version))
    if takes_images(choice):
        return not_checked("a vision-language model: parity does not send images, nor serve it through its "
                           "processor, yet", engine)
    answer = answer_with_transformers if engine == "transformers" else answer_with_vllm
    try:
        served = answer(choice, served_prompts(choice, [r["messages"] for r in record.rows]), record.settings)
    except FinetuneError as e:
        return Parity(FAILED, engine,
                      note=f"`serve --engine {engine}` cannot serve it: {e} (served another way: "
                           "promote with --parity off --reason TEXT)")
    return compare(record, served, engine, gates)


def served_prompts(choice: ModelChoice, prompts: list[list[dict]]) -> list[list[dict]]:
    """The prompts as `serve` sends them on to the engine: for a version trained with retrieval, with the
    chunks it retrieves (`retrieving.asked`, the front's own rewrite; a recorded prompt that carries its
    chunks already is sent as it is)."""
    retriever = retriever_of(choice)
    return [asked(retriever, messages) for messages in prompts]


def promote_checked(name: str, version: str, alias: str | None = None, gates=None, force: bool = False,
                    reason: str | None = None, parity: str | None = None, user: str | None = None):
    """The one way to promote: `registry.promotion.promote` with serving parity checked by `check`
    (`parity`: an engine of ENGINES, `off`, or None for the recipe's `registry.parity`). Auto-promotion hands
    it to `registry.promotion.maybe_auto_promote` as `promote_with`."""
    from mlflow_finetune_plugin.registry.promotion import promote

    return promote(name, version, alias=alias, gates=gates, force=force, reason=reason, user=user,
                   parity=parity, check_parity=check)


def answer_with_transformers(choice: ModelChoice, prompts: list[list[dict]], settings: dict) -> list[Served]:
    """`prompts` answered as `transformers serve` answers them on the version's merged copy (see the
    module)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlflow_finetune_plugin.models.template_clock import pinned_clock

    folder = merged_folder(choice)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device).eval()
    config = copy.deepcopy(model.generation_config)  # as the server builds each request's config
    config.do_sample, config.max_new_tokens = False, int(settings["max_new_tokens"])
    eos = config.eos_token_id
    stops = [t for t in (eos if isinstance(eos, (list, tuple)) else [eos]) if isinstance(t, int)]
    evaluated_stops = _ids_of(tokenizer, settings.get("stop_tokens") or [])
    if config.pad_token_id is None:  # a batch needs one, where the server generates one request at a time
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops
                                                                                                 or [0])[0]
    with pinned_clock():
        encoded = [tokenizer.apply_chat_template(plain_messages(m), add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"] for m in prompts]
    out: list[Served] = []
    size = int(settings.get("batch_size") or 8)
    for start in range(0, len(encoded), size):
        batch = encoded[start: start + size]
        width = max(len(ids) for ids in batch)
        # Left padding, masked: each row's positions and attention are those of its prompt alone.
        ids = torch.tensor([[config.pad_token_id] * (width - len(r)) + list(r) for r in batch], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device=device)
        with torch.no_grad():
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                       tokenizer=tokenizer)
        for row in generated[:, width:].tolist():
            row = _through_stop(row, stops)
            out.append(Served(_served_text(tokenizer, row), served_ending(row, stops, evaluated_stops)))
    return out


def answer_with_vllm(choice: ModelChoice, prompts: list[list[dict]], settings: dict) -> list[Served]:
    """`prompts` answered by vLLM on what `serve --engine vllm` loads for the version (see the module)."""
    import gc

    import torch

    from mlflow_finetune_plugin.models.base import resolve_model_path
    from mlflow_finetune_plugin.serving.choices import require_vllm_support
    from mlflow_finetune_plugin.serving.server import MIN_LORA_RANK
    from mlflow_finetune_plugin.serving.vllm_checks import require_vllm_runs
    from mlflow_finetune_plugin.serving.vllm_engine import CPU_KV_CACHE, require_vllm, vllm_tokenizer_dir
    from mlflow_finetune_plugin.vllm_rules import max_lora_rank

    require_vllm()
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    local = local_model(choice)
    lora = None
    if local.is_adapter and not vllm_merges(local):
        require_vllm_support(local)
        path = resolve_model_path(local.base_ref)
        lora = LoRARequest(f"{choice.name}-v{choice.version}", 1, str(local.adapter_dir))
    else:
        path = str(merged_folder(choice) if local.is_adapter else local.artifacts["model"])
    require_vllm_runs(path, choice.key)
    device = {} if torch.cuda.is_available() else {"dtype": "float32", "kv_cache_memory_bytes": CPU_KV_CACHE}
    if lora:  # as `serve` starts vLLM for it (server.MIN_LORA_RANK)
        device.update(enable_lora=True, max_lora_rank=max(MIN_LORA_RANK, max_lora_rank(
            [int(local.adapter_config().get("r", 8))])))
    llm = LLM(model=path, tokenizer=str(vllm_tokenizer_dir(local, path)), trust_remote_code=False, **device)
    try:
        # the model's generation config, as `vllm serve` applies it
        params = llm.get_default_sampling_params()
        params.temperature, params.top_p, params.max_tokens = 0.0, 1.0, int(settings["max_new_tokens"])
        outputs = llm.chat([plain_messages(m) for m in prompts], params, lora_request=lora, use_tqdm=False)
        evaluated_stops = set(_ids_of(llm.get_tokenizer(), settings.get("stop_tokens") or []))
        served = []
        for item in outputs:
            o = item.outputs[0]
            stopped = o.finish_reason == "stop"
            body = list(o.token_ids)[:-1] if stopped else list(o.token_ids)  # without the id it stopped on
            ending = RAN_ON if any(t in evaluated_stops for t in body) else (STOP if stopped else LENGTH)
            served.append(Served(clean_answer(o.text), ending))
        return served
    finally:
        del llm
        gc.collect()


def _through_stop(row: list[int], stops: list[int]) -> list[int]:
    """A generated row up to and including its first stop id (the padding of a batch after it dropped)."""
    end = next((i for i, t in enumerate(row) if t in stops), None)
    return row if end is None else row[: end + 1]


def _served_text(tokenizer, ids: list[int]) -> str:
    """The answer `transformers serve` hands a client: the decoded ids without special tokens; through the
    response template where the copy's tokenizer carries one (gpt-oss's channels:
    `answers.add_response_template`), read as
    `answer_text` reads it."""
    if getattr(tokenizer, "response_template", None):
        return answer_text(tokenizer, ids)
    return clean_answer(tokenizer.decode(ids, skip_special_tokens=True))


def _ids_of(tokenizer, tokens: list[str]) -> list[int]:
    """The ids of the evaluation's stop tokens in the served tokenizer (tokens it does not know left out)."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    return [i for i in ids if isinstance(i, int) and i >= 0 and i != unknown]
