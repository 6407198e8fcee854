"""How a contender answers: greedy (or beam) answers to chat prompts in left-padded batches, scored against
the reference answers in the same pass where the model allows (`answer_and_score`), with a progress bar and
each answer's seconds (`answer_all`); and the tuned LoRA merged while it answers (`lora_merged`). The shots:
`shots.py`.

Every contender (`contenders.py`) and the prompt search (`prompt_search.py`) answer through here, so their
figures are comparable.
"""

from __future__ import annotations

import contextlib

from mlflow_finetune_plugin import stops
from mlflow_finetune_plugin.evaluate.scoring import reference_ids, reference_nll, score_and_prefill
from mlflow_finetune_plugin.models.answers import answer_text, ending
from mlflow_finetune_plugin.models.architecture import cache_abilities
from mlflow_finetune_plugin.models.chat_format import prompt_ids, stop_ids
from mlflow_finetune_plugin.models.vision import processor_of
from mlflow_finetune_plugin.runtime import threads


@contextlib.contextmanager
def lora_merged(model):
    """The tuned model to answer with, its LoRA updates folded into the base weights while it answers on the
    CPU.

    Unmerged, every adapted layer computes its base matmul plus two small LoRA ones at each decoding step;
    merged, one (the tuned contender's 30 answers on smollm2: 11.0-11.2 s against 12.1-12.7 s, the same
    answers). The base weights are not changed in place: each adapted layer's weight is swapped for `W +
    scaling * B @ A` (`get_delta_weight`, as PEFT merges) with the adapter switched off, and the original
    tensor put back afterwards, bit for bit (PEFT's unmerge would subtract the update again and leave the base
    rounded, which the other contenders and the forgetting check read).
    Anything else, a GPU (where the copy costs memory), quantized or non-Linear base layers, DoRA and other
    LoRA variants, LoRA biases, trained token rows or modules_to_save, or several active adapters, answers
    unmerged.
    """
    layers = _mergeable_lora_layers(model)
    if not layers:
        yield model
        return
    import torch

    swapped = []
    try:
        with torch.no_grad():
            for layer, adapter in layers:
                weight = layer.get_base_layer().weight
                swapped.append((weight, weight.data))
                weight.data = weight.data + layer.get_delta_weight(adapter).to(weight.dtype)
        with model.disable_adapter():
            yield model
    finally:
        for weight, original in swapped:
            weight.data = original


def _mergeable_lora_layers(model) -> list:
    """(LoRA layer, adapter) pairs for `lora_merged`, or [] when the model does not qualify (see there)."""
    import torch

    if not hasattr(model, "disable_adapter") or getattr(model, "active_peft_config", None) is None:
        return []
    if model.active_peft_config.peft_type != "LORA" or len(getattr(model, "active_adapters", [])) != 1:
        return []
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    adapter = model.active_adapters[0]
    # `disable_adapter()` also switches off trained token rows (model.chat_template's control tokens) and
    # modules_to_save copies, which the merge does not fold in: a base model then never wrote its end of turn
    # (the tuned gemma3 ran on past it on CPU, while its registered version stopped). Such adapters answer
    # unmerged.
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:
        return []
    if any(isinstance(module, AuxiliaryTrainingWrapper) for module in model.modules()):
        return []
    layers = []
    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        base = module.get_base_layer()
        if (type(base) is not torch.nn.Linear or base.weight.device.type != "cpu" or module.merged
                or module.lora_variant.get(adapter) is not None or module.lora_bias.get(adapter)):
            return []
        layers.append((module, adapter))
    return layers


def answer_all(model, tokenizer, prompts, references, cfg, name, progress=None, cache=None):
    """Greedy answers to every prompt, the summed NLL of every reference and each answer's seconds (its
    batch's wall time over the batch's rows: `cost.py`), in batches, with a progress bar of its own or moving
    `progress`."""
    answers, _, nll, counted, seconds = answer_all_ended(model, tokenizer, prompts, references, cfg, name,
                                                         progress, cache)
    return answers, nll, counted, seconds


def answer_all_ended(model, tokenizer, prompts, references, cfg, name, progress=None, cache=None):
    """`answer_all` with how each answer ended (`models.answers.ending`: on a stop id, or cut at
    max_new_tokens; None where the model does not tell), second: (answers, endings, nll, counted, seconds).
    `cache`: the base model's answers of earlier runs (`answer_cache.AnswerCache`), looked up first and kept
    after."""
    key, kept = cache.lookup(model, tokenizer, prompts, references, cfg, name) if cache else (None, None)
    if kept is not None:
        if progress is not None:
            progress.update(len(prompts))
        return kept
    result = _answer_all_ended(model, tokenizer, prompts, references, cfg, name, progress)
    if cache:
        cache.keep(key, result)
    return result


def _answer_all_ended(model, tokenizer, prompts, references, cfg, name, progress=None):
    import time

    from tqdm.auto import tqdm

    from mlflow_finetune_plugin.models.generation import LoadedModel

    was_training = model.training
    model.eval()
    loaded = LoadedModel(model, tokenizer, {})
    # Prompts of similar length share a batch, so little of it is padding. Longest first: a batch size too
    # large for memory fails in the first batch, not the last. Text tokens only: a VLM prompt's image tokens
    # would cost a pass of its images through the processor just to order them.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids(tokenizer, prompts[i])))
    answers, nll, counted, seconds = [""] * len(prompts), 0.0, 0, [0.0] * len(prompts)
    endings: list[str | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=f"eval {name}", unit="example") if progress is None else None
    try:
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start: start + cfg.batch_size]
            began = time.perf_counter()
            batch_answers, batch_endings, total, count = answer_score_and_end(
                loaded, [prompts[i] for i in batch], [references[i] for i in batch], cfg.max_new_tokens,
                cfg.num_beams)
            spent = (time.perf_counter() - began) / len(batch)  # the answers are text: the device is done
            for i, answer, how in zip(batch, batch_answers, batch_endings):
                answers[i], endings[i], seconds[i] = answer, how, spent
            nll, counted = nll + total, counted + count
            (bar or progress).update(len(batch))
            stops.beat()  # train/watchdog.py: the evaluation moves
            # another heavy process of the project started or ended: take the new share of cores
            threads.refit()
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return answers, endings, nll, counted, seconds


def answer_and_score(loaded, prompts: list[list[dict]], references: list[str],
                     max_new_tokens: int, num_beams: int = 1) -> tuple[list[str], float, int]:
    """`answer_score_and_end` without the endings: (answers, summed reference NLL, its token count)."""
    answers, _, nll, n_tokens = answer_score_and_end(loaded, prompts, references, max_new_tokens, num_beams)
    return answers, nll, n_tokens


def answer_score_and_end(loaded, prompts: list[list[dict]], references: list[str], max_new_tokens: int,
                         num_beams: int = 1) -> tuple[list[str], list[str | None], float, int]:
    """Greedy (or beam-search) answers to `prompts` (as `generate_greedy_batch` gives them), how each ended
    (`models.answers.ending`; None for a vision-language model, whose processor hands back text) and the
    summed NLL of the `references` with their token count, sharing one pass over the prompts where decoding is
    greedy.

    Generation continues from the KV cache of the pass that scores the references
    (`scoring.score_and_prefill`). Beam search, and models whose cache cannot be cut back that way
    (sliding-window or recurrent-state layers: `models.architecture.cache_abilities`), take two passes, one to
    answer and one to score (`scoring.reference_nll`); prefix and prompt tuning answer one prompt at a time.
    """
    import torch

    from mlflow_finetune_plugin.models.generation import generated_ids

    model, tok = loaded.model, loaded.tokenizer
    if processor_of(tok) is not None:  # a vision-language model: prompts and references through its processor
        answers, nll, n_tokens = _answer_and_score_images(model, tok, prompts, references, max_new_tokens,
                                                          num_beams)
        return answers, [None] * len(answers), nll, n_tokens
    stopping = stop_ids(tok, model.generation_config)
    pairs = [reference_ids(tok, p, r) for p, r in zip(prompts, references)]
    cache = cache_abilities(model)
    if (_virtual_tokens(model) or num_beams > 1 or not cache.crop or not _shares_prefill(model)
            or not all(p for p, _ in pairs)):
        # Prefix and prompt tuning: left padding would sit between the virtual tokens and the prompt and shift
        # their distance (the answers then differ from unpadded ones): one prompt at a time.
        rows = ([generated_ids(loaded, [p], max_new_tokens, num_beams)[0] for p in prompts]
                if _virtual_tokens(model) else generated_ids(loaded, prompts, max_new_tokens, num_beams))
        return ([answer_text(tok, row) for row in rows], [ending(row, stopping) for row in rows],
                *reference_nll(model, tok, prompts, references))
    device = model.device
    prefill = score_and_prefill(model, tok, pairs, share_prefix=cache.repeat)
    prompt_end = prefill.input_ids.shape[1]
    with torch.no_grad():
        generated = model.generate(input_ids=prefill.input_ids.to(device),
                                   attention_mask=prefill.attention_mask.to(device),
                                   **{_CACHE_KWARG: prefill.cache}, max_new_tokens=int(max_new_tokens),
                                   pad_token_id=tok.pad_token_id, eos_token_id=stopping, do_sample=False)
    # Rows that end early are filled with padding, after their stop token: answer_text cuts there.
    rows = [row.tolist() for row in generated[:, prompt_end:]]
    return ([answer_text(tok, row) for row in rows], [ending(row, stopping) for row in rows], prefill.nll,
            prefill.n_tokens)


def _answer_and_score_images(model, tok, prompts, references, max_new_tokens: int, num_beams: int):
    """`answer_and_score` for a vision-language model: each prompt's images read from its image parts."""
    from mlflow_finetune_plugin.models import image_inputs

    processor = processor_of(tok)
    placed = [image_inputs.with_placeholders(p) for p in prompts]
    messages = [m for m, _ in placed]
    images = [[image_inputs.read_image(ref) for ref in refs] for _, refs in placed]
    answers = image_inputs.generate_answers(model, tok, processor, messages, images, max_new_tokens,
                                            num_beams)
    return answers, *image_inputs.reference_nll(model, tok, processor, messages, images, references)


def _cache_kwarg() -> str:
    """generate()'s name for a KV cache to continue from: `cache` from transformers 5.2x (where
    `past_key_values` is deprecated, to go in 5.40), `past_key_values` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


_CACHE_KWARG = _cache_kwarg()


def _virtual_tokens(model) -> bool:
    """Prefix and prompt tuning: trained virtual tokens ahead of every input (in the KV cache, or the
    embeddings)."""
    peft_config = getattr(model, "active_peft_config", None)
    return peft_config is not None and peft_config.is_prompt_learning


def _shares_prefill(model) -> bool:
    """Whether `answer_and_score` can reuse the scoring pass's cache for generation (see there), its cache's
    own abilities apart (`cache_abilities`)."""
    import inspect

    if _virtual_tokens(model) or getattr(model, "config", None) is None:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # A model that keeps no KV cache (OpenAI GPT, XLNet) has nothing to continue from: asked of its forward
    # and of transformers (`_supports_default_dynamic_cache`).
    parameters = inspect.signature(base.forward).parameters
    supports = getattr(type(base), "_supports_default_dynamic_cache", None)
    return ("logits_to_keep" in parameters and "use_cache" in parameters
            and (supports is None or bool(supports())))


def context_limit(model, tokenizer) -> int:
    config = getattr(model, "config", None)
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    return min((n for n in limits if isinstance(n, int) and 0 < n < 10**8), default=4096)


def generation_settings(cfg, model, tokenizer) -> dict:
    """How the tuned model answered: what serving must repeat for its answers to match
    (`report.TUNED_FILE`)."""
    stopping = stop_ids(tokenizer, getattr(model, "generation_config", None))
    return {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams, "batch_size": cfg.batch_size,
            "output_format": cfg.output_format, "json_schema": cfg.json_schema,
            "stop_tokens": tokenizer.convert_ids_to_tokens(stopping)}


def _base_context(model, base_model):
    """A context giving the base model, or None when there is none to compare against."""
    if base_model is not None:
        return contextlib.nullcontext(base_model)
    if hasattr(model, "disable_adapter"):
        return _adapter_disabled(model)
    return None


@contextlib.contextmanager
def _adapter_disabled(model):
    with model.disable_adapter():
        yield model
