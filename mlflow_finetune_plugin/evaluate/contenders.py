"""Who answers in an evaluation of a fine-tune: the alternatives a user has, the base model zero-shot, the base model
few-shot (k random train conversations in the prompt), the base model with retrieved shots (the k train conversations
most similar to each question, `retrieval.py`) and the tuned model, each answering the held-out prompts greedily;
also where those prompts come from when a logged model is evaluated again. The shots, and whether they keep their
images: `shots.py`.

Their answers are turned into figures by `scoring.py`, logged by `report.py` and weighed by `verdict.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

from mlflow_finetune_plugin import stops, tags
from mlflow_finetune_plugin.data.image_rows import IMAGES
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.evaluate.cost import answer_costs, answer_lengths, parameter_counts
from mlflow_finetune_plugin.evaluate.report import EvalResult, add_answers, log_evaluation, table_rows
from mlflow_finetune_plugin.evaluate.retrieval import nearest_shots
from mlflow_finetune_plugin.evaluate.scoring import (
    answer_set,
    contender_metrics,
    reference_ids,
    reference_nll,
    score_and_prefill,
)
from mlflow_finetune_plugin.evaluate.shots import (
    fewshot_prompt,
    fit,
    pick_shots,
    prompt_length,
    shots_for_model,
)
from mlflow_finetune_plugin.evaluate.teacher import agreement_metrics, complete, score_teacher
from mlflow_finetune_plugin.evaluate.verdict import conclude, per_example_scores
from mlflow_finetune_plugin.messages import split_conversation, text_of
from mlflow_finetune_plugin.metrics import CONTENDERS, TEACHER
from mlflow_finetune_plugin.models.answers import answer_text
from mlflow_finetune_plugin.models.architecture import cache_abilities
from mlflow_finetune_plugin.models.chat_format import stop_ids
from mlflow_finetune_plugin.models.image_inputs import with_images
from mlflow_finetune_plugin.models.vision import processor_of


def run_evaluation(model, tokenizer, eval_conversations: list[list[dict]], train_conversations: list[list[dict]],
                   cfg, base_model=None, teachers: list[dict | None] | None = None) -> EvalResult:
    """Score base zero-shot, base few-shot, base with retrieved shots and tuned on the first `cfg.max_examples` eval
    conversations (greedy), with what each answer cost (`cost.py`).

    `model` is a PeftModel (the base is the same weights with the adapter disabled) or a full model with
    `base_model` given; with neither there is no base to compare and only `tuned` is scored. `teachers`: each eval
    conversation's `teacher` (data/teacher.py); where every scored one has one, the teacher is scored too
    (`teacher.py`).
    """
    teachers = teachers or [None] * len(eval_conversations)
    kept = [(pair, t) for conv, t in zip(eval_conversations, teachers)
            if (pair := split_conversation(conv)) and pair[0]]
    examples, teachers = [p for p, _ in kept][: cfg.max_examples], [t for _, t in kept][: cfg.max_examples]
    if not examples:
        raise FinetuneError("evaluation: no held-out conversation has a prompt followed by an assistant answer; "
                            "each eval row needs at least a user message and the assistant's reply")
    base = _base_context(model, base_model)
    if base is None:
        print("Evaluation: a full model without its base model given; scoring the tuned model only.")
    shots = pick_shots(train_conversations, cfg.fewshot_k, {json.dumps(p) for p, _ in examples})
    limit = _context_limit(model, tokenizer) - cfg.max_new_tokens
    runs = {"tuned": (lora_merged(model), [p for p, _ in examples])}
    retrieved: list[list[list[dict]]] = []
    if base is not None:
        runs["base"] = (base, [p for p, _ in examples])
        retrieved = nearest_shots(train_conversations, [p for p, _ in examples], retrieval_k(cfg))
        shots, retrieved = shots_for_model(tokenizer, shots, retrieved)  # a VLM taking one image: shots' text only
        if shots:
            runs["fewshot"] = (_base_context(model, base_model),
                               [fit(tokenizer, fewshot_prompt(p, shots), p, shots, limit) for p, _ in examples])
        if any(retrieved):
            runs["retrieval"] = (_base_context(model, base_model),
                                 [fit(tokenizer, fewshot_prompt(p, s), p, s, limit)
                                  for (p, _), s in zip(examples, retrieved)])
    references = [ref for _, ref in examples]
    metrics: dict[str, float] = {"eval/n_examples": float(len(examples))}
    rows = table_rows(examples)
    train_answers = answer_set(text_of(m.get("content")) for conv in train_conversations for m in conv
                               if m.get("role") == "assistant")
    params = parameter_counts(model, base_model)
    if complete(teachers):
        answers, totals, per_example = score_teacher(teachers, references, cfg, train_answers)
        metrics.update({f"eval/{TEACHER}/{k}": v for k, v in totals.items()})
        add_answers(rows, TEACHER, answers, per_example)
    contenders = [c for c in CONTENDERS if c in runs or c == TEACHER and complete(teachers)]
    for name in [c for c in contenders if c in runs]:
        context, prompts = runs[name]
        with context as contender:
            answers, nll, n_tokens, seconds = _answer_all(contender, tokenizer, prompts, references, cfg, name)
        totals, per_example = contender_metrics(answers, references, nll, n_tokens, cfg, train_answers)
        totals.update(answer_costs([prompt_length(tokenizer, p) for p in prompts],
                                   answer_lengths(tokenizer, answers), seconds,
                                   params.get("tuned" if name == "tuned" else "base")))
        metrics.update({f"eval/{name}/{k}": v for k, v in totals.items()})
        add_answers(rows, name, answers, per_example)
    if TEACHER in contenders:
        metrics.update(agreement_metrics(rows, contenders, teachers, references))
    digest = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()[:12]
    return EvalResult(metrics, rows, contenders, shots if "fewshot" in runs else [], digest,
                      retrieved if "retrieval" in runs else [], prompts=[p for p, _ in examples],
                      traces=cfg.traces)


def retrieval_k(cfg) -> int:
    """Shots of the retrieval contender: `eval.retrieval_k`, or `eval.fewshot_k` when that is not set."""
    return cfg.fewshot_k if cfg.retrieval_k is None else cfg.retrieval_k


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


@contextlib.contextmanager
def lora_merged(model):
    """The tuned model to answer with, its LoRA updates folded into the base weights while it answers on the CPU.

    Unmerged, every adapted layer computes its base matmul plus two small LoRA ones at each decoding step; merged, one
    (the tuned contender's 30 answers on smollm2: 11.0-11.2 s against 12.1-12.7 s, the same answers). The base weights
    are not changed in place: each adapted layer's weight is swapped for `W + scaling * B @ A` (`get_delta_weight`, as
    PEFT merges) with the adapter switched off, and the original tensor put back afterwards, bit for bit (PEFT's
    unmerge would subtract the update again and leave the base rounded, which the other contenders and the forgetting
    check read).
    Anything else, a GPU (where the copy costs memory), quantized or non-Linear base layers, DoRA and other LoRA
    variants, LoRA biases, trained token rows or modules_to_save, or several active adapters, answers unmerged.
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
    # modules_to_save copies, which the merge does not fold in: a base model then never wrote its end of turn (the
    # tuned gemma3 ran on past it on CPU, while its registered version stopped). Such adapters answer unmerged.
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


def _answer_all(model, tokenizer, prompts, references, cfg, name):
    """Greedy answers to every prompt, the summed NLL of every reference and each answer's seconds (its batch's wall
    time over the batch's rows: `cost.py`), in batches, with a progress bar."""
    import time

    from tqdm.auto import tqdm

    from mlflow_finetune_plugin.logged_model import LoadedModel

    was_training = model.training
    model.eval()
    loaded = LoadedModel(model, tokenizer, {})
    # Prompts of similar length share a batch, so little of it is padding. Longest first: a batch size too large
    # for memory fails in the first batch, not the last.
    order = sorted(range(len(prompts)), key=lambda i: -prompt_length(tokenizer, prompts[i]))
    answers, nll, n_tokens, seconds = [""] * len(prompts), 0.0, 0, [0.0] * len(prompts)
    try:
        with tqdm(total=len(prompts), desc=f"eval {name}", unit="example") as progress:
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start: start + cfg.batch_size]
                began = time.perf_counter()
                batch_answers, total, count = answer_and_score(
                    loaded, [prompts[i] for i in batch], [references[i] for i in batch], cfg.max_new_tokens,
                    cfg.num_beams)
                spent = (time.perf_counter() - began) / len(batch)  # the answers are text: the device is done
                for i, answer in zip(batch, batch_answers):
                    answers[i], seconds[i] = answer, spent
                nll, n_tokens = nll + total, n_tokens + count
                progress.update(len(batch))
                stops.beat()  # train/watchdog.py: the evaluation moves
    finally:
        model.train(was_training)
    return answers, nll, n_tokens, seconds


def answer_and_score(loaded, prompts: list[list[dict]], references: list[str],
                     max_new_tokens: int, num_beams: int = 1) -> tuple[list[str], float, int]:
    """Greedy (or beam-search) answers to `prompts` (as `generate_greedy_batch` gives them) and the summed NLL of
    the `references` with their token count, sharing one pass over the prompts where decoding is greedy.

    Generation continues from the KV cache of the pass that scores the references (`scoring.score_and_prefill`).
    Beam search, and models whose cache cannot be cut back that way (sliding-window or recurrent-state layers:
    `models.architecture.cache_abilities`), take two passes, one to answer and one to score
    (`scoring.reference_nll`); prefix and prompt tuning answer one prompt at a time.
    """
    import torch

    from mlflow_finetune_plugin.logged_model import generate, generate_greedy_batch

    model, tok = loaded.model, loaded.tokenizer
    if processor_of(tok) is not None:  # a vision-language model: prompts and references through its processor
        return _answer_and_score_images(model, tok, prompts, references, max_new_tokens, num_beams)
    if _virtual_tokens(model):
        # Left padding would sit between the virtual tokens and the prompt and shift their distance (the answers
        # then differ from unpadded ones): one prompt at a time.
        answers = [generate(loaded, p, max_new_tokens=max_new_tokens, num_beams=num_beams) for p in prompts]
        return answers, *reference_nll(model, tok, prompts, references)
    pairs = [reference_ids(tok, p, r) for p, r in zip(prompts, references)]
    cache = cache_abilities(model)
    if num_beams > 1 or not cache.crop or not _shares_prefill(model) or not all(p for p, _ in pairs):
        return (generate_greedy_batch(loaded, prompts, max_new_tokens, num_beams),
                *reference_nll(model, tok, prompts, references))
    device = model.device
    prefill = score_and_prefill(model, tok, pairs, share_prefix=cache.repeat)
    prompt_end = prefill.input_ids.shape[1]
    with torch.no_grad():
        generated = model.generate(input_ids=prefill.input_ids.to(device),
                                   attention_mask=prefill.attention_mask.to(device), **{_CACHE_KWARG: prefill.cache},
                                   max_new_tokens=int(max_new_tokens), pad_token_id=tok.pad_token_id,
                                   eos_token_id=stop_ids(tok, model.generation_config), do_sample=False)
    # Rows that end early are filled with padding, after their stop token: answer_text cuts there.
    answers = [answer_text(tok, row.tolist()) for row in generated[:, prompt_end:]]
    return answers, prefill.nll, prefill.n_tokens


def _answer_and_score_images(model, tok, prompts, references, max_new_tokens: int, num_beams: int):
    """`answer_and_score` for a vision-language model: each prompt's images read from its image parts."""
    from mlflow_finetune_plugin.models import image_inputs

    processor = processor_of(tok)
    placed = [image_inputs.with_placeholders(p) for p in prompts]
    messages = [m for m, _ in placed]
    images = [[image_inputs.read_image(ref) for ref in refs] for _, refs in placed]
    answers = image_inputs.generate_answers(model, tok, processor, messages, images, max_new_tokens, num_beams)
    return answers, *image_inputs.reference_nll(model, tok, processor, messages, images, references)


def _cache_kwarg() -> str:
    """generate()'s name for a KV cache to continue from: `cache` from transformers 5.2x (where `past_key_values`
    is deprecated, to go in 5.40), `past_key_values` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


_CACHE_KWARG = _cache_kwarg()


def _virtual_tokens(model) -> bool:
    """Prefix and prompt tuning: trained virtual tokens ahead of every input (in the KV cache, or the embeddings)."""
    peft_config = getattr(model, "active_peft_config", None)
    return peft_config is not None and peft_config.is_prompt_learning


def _shares_prefill(model) -> bool:
    """Whether `answer_and_score` can reuse the scoring pass's cache for generation (see there), its cache's own
    abilities apart (`cache_abilities`)."""
    import inspect

    if _virtual_tokens(model) or getattr(model, "config", None) is None:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # A model that keeps no KV cache (OpenAI GPT, XLNet) has nothing to continue from: asked of its forward and of
    # transformers (`_supports_default_dynamic_cache`).
    parameters = inspect.signature(base.forward).parameters
    supports = getattr(type(base), "_supports_default_dynamic_cache", None)
    return ("logits_to_keep" in parameters and "use_cache" in parameters
            and (supports is None or bool(supports())))


def _context_limit(model, tokenizer) -> int:
    config = getattr(model, "config", None)
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    return min((n for n in limits if isinstance(n, int) and 0 < n < 10**8), default=4096)


def evaluate_model_uri(model_uri: str, data: str | None = None, train_data: str | None = None,
                       run_id: str | None = None, **overrides) -> tuple[EvalResult, str]:
    """Evaluate a logged model (e.g. `models:/support-bot@challenger`) and log into `run_id` or a new run.

    Data and eval settings default to the recipe of the model's source run; `overrides` are EvalConfig fields.
    The verdict (`verdict.conclude`, on the primary metric of the recipe's gates) is set on that run and kept in
    `result.verdict`. Returns the result and the run id it was logged in.
    """
    import mlflow

    from mlflow_finetune_plugin.config.schema import EvalConfig
    from mlflow_finetune_plugin.logged_model import load_logged_base, load_logged_model
    from mlflow_finetune_plugin.registry.versions import resolve_model_uri, source_recipe

    name, version, source_run = resolve_model_uri(model_uri)
    recipe = source_recipe(source_run) or {}
    data_cfg = recipe.get("data") or {}
    try:
        cfg = EvalConfig.model_validate({**(recipe.get("eval") or {}),
                                         **{k: v for k, v in overrides.items() if v is not None}})
    except ValueError as e:
        raise FinetuneError(f"evaluation settings: {e}") from None
    eval_convs, teachers = _eval_conversations(data, recipe, source_run)
    train_path = train_data or data_cfg.get("train")
    train_convs = []
    if (cfg.fewshot_k or retrieval_k(cfg)) and train_path and _exists(train_path):
        train_convs = read_conversations(train_path, data_cfg.get("system_prompt"), data_cfg.get("columns"),
                                         data_cfg.get("tags"))
    elif cfg.fewshot_k or retrieval_k(cfg):
        print(f"No train data for few-shot or retrieved examples ({train_path or 'none recorded'}); pass --train "
              "FILE. Skipping the few-shot and retrieval contenders.")
    loaded = load_logged_model(mlflow.artifacts.download_artifacts(model_uri))
    base_model = None
    if not hasattr(loaded.model, "disable_adapter") and loaded.config.get("base_model"):
        base_model = load_logged_base(loaded.config, loaded.model.dtype).to(loaded.model.device)
    result = run_evaluation(loaded.model, loaded.tokenizer, eval_convs, train_convs, cfg, base_model=base_model,
                            teachers=teachers)
    experiment_id = mlflow.MlflowClient().get_run(source_run).info.experiment_id if source_run and not run_id else None
    label = f"{name} v{version}" if name else model_uri
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id,
                          run_name=None if run_id else f"eval {label}") as run:
        mlflow.set_tags({tags.EVALUATED_MODEL: model_uri, **(
            {tags.EVALUATED_NAME: name, tags.EVALUATED_VERSION: version} if name else {})})
        log_evaluation(result)
        result.verdict = conclude(run.info.run_id, _recorded_gates(recipe), per_example_scores(result.rows))
    return result, run.info.run_id


def _recorded_gates(recipe: dict) -> list:
    """The promotion gates in a source run's recipe (which name the primary metric); the defaults if unreadable."""
    from mlflow_finetune_plugin.config.schema import RegistryConfig

    section = recipe.get("registry") or {}
    try:
        return RegistryConfig.model_validate({k: v for k, v in section.items()
                                              if k in RegistryConfig.model_fields}).promote_if
    except ValueError:
        return RegistryConfig().promote_if


def read_conversations(path: str, system_prompt: str | None = None, columns: dict | None = None,
                       tags: dict | None = None) -> list[list[dict]]:
    """Chat conversations from a data file (or `hf:` dataset) in any format training reads, through the same reader,
    validation and column/tag mapping (`data.load_training_dataset`); preference rows are scored against `chosen`."""
    from mlflow_finetune_plugin.data.read import load_training_dataset

    rows, _ = load_training_dataset(path, "auto", system_prompt, columns, tags)
    return conversations(rows)


# The format a row is read in when its keys fit several: a whole conversation first, then a prompt with its answer.
_ROW_FORMAT_ORDER = ("chat", "sharegpt", "prompt_completion", "preference", "alpaca")


def conversations(rows) -> list[list[dict]]:
    """Chat conversations from dataset rows (a `datasets.Dataset` as `data.load_training_dataset` returns it, or
    dicts in any training format), each converted by the data layer's `data_formats.to_messages` in the format its
    keys name: preference rows are scored against `chosen`; a prompt_only row is its prompt alone (nothing to score).
    """
    from mlflow_finetune_plugin.data.formats import expected_keys, row_formats, sharegpt_tags, to_messages

    role_tags = sharegpt_tags()
    out = []
    for i, row in enumerate(rows):
        found = row_formats(row, role_tags) if isinstance(row, dict) else []
        if not found:
            raise FinetuneError(f"row {i}: expected a chat row ({{'messages': [...]}}) or a row of another training "
                                f"format; the keys of each: {expected_keys()}")
        messages = to_messages(row, next((f for f in _ROW_FORMAT_ORDER if f in found), found[0]))
        # a row's images go into its image parts: the conversation carries them (as a few-shot prompt's shots do)
        out.append(with_images(messages, row.get(IMAGES)) if row.get(IMAGES) else messages)
    return out


def trained_system_prompt(rows, configured: str | None = None) -> str | None:
    """The system prompt a model trained on `rows` expects: `configured` (the recipe's, added to every row lacking
    one) if set, else the most common leading system message, where "none" is a candidate too, so data mostly
    without one gives None. Logged with the model so the playground can start from what the model was trained with."""
    from collections import Counter

    if configured:
        return configured
    counts = Counter((text_of(conv[0].get("content")) or None) if conv and conv[0].get("role") == "system" else None
                     for conv in conversations(rows))
    return counts.most_common(1)[0][0] if counts else None


def _eval_conversations(data: str | None, recipe: dict, source_run: str | None
                        ) -> tuple[list[list[dict]], list[dict | None]]:
    """(conversations, their `teacher`s): --data, else the source run's eval file, else its held-out split of the
    train file rebuilt (same seed)."""
    from mlflow_finetune_plugin.data.read import load_training_dataset
    from mlflow_finetune_plugin.data.teacher import teachers

    data_cfg = recipe.get("data") or {}
    mapping = (data_cfg.get("system_prompt"), data_cfg.get("columns"), data_cfg.get("tags"))

    def read(path):
        rows, _ = load_training_dataset(path, "auto", *mapping)
        return conversations(rows), teachers(rows)

    if data:
        return read(data)
    recorded = data_cfg.get("eval")
    if recorded and _exists(recorded):
        return read(recorded)
    train, split = data_cfg.get("train"), data_cfg.get("eval_split") or 0
    if not recorded and split > 0 and train and _exists(train):
        from datasets import Dataset

        from mlflow_finetune_plugin.data.splits import hold_out

        convs, taught = (column[: data_cfg.get("max_rows") or None] for column in read(train))
        seed = (recipe.get("train") or {}).get("seed", 42)
        # training's own split, on row numbers: the same rows as the run held out
        _, held_out = hold_out(Dataset.from_dict({"i": list(range(len(convs)))}), split, seed)
        return [convs[i] for i in held_out["i"]], [taught[i] for i in held_out["i"]]
    where = f"run {source_run}" if source_run else "this model"
    raise FinetuneError(f"no eval data: {where} records {recorded or 'no eval file'}"
                        f"{' (not on this machine)' if recorded else ''}. Pass --data path/to/eval.jsonl")


def _exists(path: str) -> bool:
    """A local file, or a Hugging Face dataset (`hf:`), which `datasets` loads or explains."""
    from pathlib import Path

    return path.startswith("hf:") or Path(path).is_file()
