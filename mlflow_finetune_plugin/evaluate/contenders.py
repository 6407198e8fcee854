"""Who answers in an evaluation of a fine-tune: the alternatives a user has, the base model zero-shot, the
base model few-shot (k random train conversations in the prompt), the base model with retrieved shots (the k
train conversations most similar to each question, `retrieval.py`), the base model with the optimized prompt
(instruction and shots a search on a dev split of the train rows found best, `prompt_search.py`) and the tuned
model, each answering the held-out prompts greedily through `answering.py`; also where those prompts come from
when a logged model is evaluated again. The shots, and whether they keep their images: `shots.py`.

Their answers are turned into figures by `scoring.py`, logged by `report.py` and weighed by `verdict.py`.
"""

from __future__ import annotations

import hashlib
import json

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config.evaluation import PROMPT_CONTENDERS
from mlflow_finetune_plugin.data.image_rows import IMAGES
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.evaluate.answer_cache import answer_cache
from mlflow_finetune_plugin.evaluate.answering import (  # noqa: F401 (answer_and_score, lora_merged: public here too)
    _base_context,
    _mergeable_lora_layers,
    _shares_prefill,
    answer_all_ended,
    answer_and_score,
    context_limit,
    generation_settings,
    lora_merged,
)
from mlflow_finetune_plugin.evaluate.cost import answer_costs, answer_lengths, parameter_counts
from mlflow_finetune_plugin.evaluate.report import (
    EvalResult,
    add_answers,
    contenders_line,
    log_evaluation,
    table_rows,
)
from mlflow_finetune_plugin.evaluate.retrieval import nearest_shots
from mlflow_finetune_plugin.evaluate.scoring import answer_set, contender_metrics
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
from mlflow_finetune_plugin.metrics import CONTENDERS, OPTIMIZED, TEACHER
from mlflow_finetune_plugin.models.image_inputs import with_images


def run_evaluation(model, tokenizer, eval_conversations: list[list[dict]],
                   train_conversations: list[list[dict]], cfg, base_model=None,
                   teachers: list[dict | None] | None = None, proposer=None,
                   tuned: bool = True) -> EvalResult:
    """Score the prompt-only contenders of `cfg.contenders` (base zero-shot, base few-shot, base with
    retrieved shots, the optimized prompt: `prompt_search.py`) and tuned on the first `cfg.max_examples` eval
    conversations (greedy), with what each answer cost (`cost.py`); which ran, and why the others did not, is
    printed and kept (`EvalResult.notes`).

    `model` is a PeftModel (the base is the same weights with the adapter disabled) or a full model with
    `base_model` given; with neither there is no base to compare and only `tuned` is scored. `teachers`: each
    eval conversation's `teacher` (data/teacher.py); where every scored one has one, the teacher is scored too
    (`teacher.py`). `proposer`: who writes instructions for the prompt search (`proposer.proposer_of`).
    `tuned=False` (`-e optimize-prompt`, no weights trained): `model` is the base, and only prompts are
    scored.
    """
    teachers = teachers or [None] * len(eval_conversations)
    kept = [(pair, t) for conv, t in zip(eval_conversations, teachers)
            if (pair := split_conversation(conv)) and pair[0]]
    examples, teachers = [p for p, _ in kept][: cfg.max_examples], [t for _, t in kept][: cfg.max_examples]
    if not examples:
        raise FinetuneError(
            "evaluation: no held-out conversation has a prompt followed by an assistant answer; "
            "each eval row needs at least a user message and the assistant's reply")
    questions = [p for p, _ in examples]
    base = _base_context(model, base_model)
    kept = answer_cache(cfg, model, base_model) if base is not None else None  # before the tuned model merges
    limit = context_limit(model, tokenizer) - cfg.max_new_tokens
    runs = {"tuned": (lora_merged(model), questions)} if tuned else {}
    notes = _notes(cfg, base is not None, train_conversations)
    shots, retrieved = _prompt_only(runs, model, base_model, tokenizer, train_conversations, questions, cfg,
                                    notes, limit)
    # printed: what the recipe did not itself switch off (the tag and eval/contenders.json keep every reason)
    unasked = {c: why for c, why in notes.items() if not why.startswith(SWITCHED_OFF)}
    print(f"Contenders: {contenders_line([c for c in CONTENDERS if c in runs], unasked)}")
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
    searched, answered = None, {}
    for name in [c for c in contenders if c in runs]:
        if name == OPTIMIZED:
            searched = _search(model, base_model, tokenizer, train_conversations, questions, cfg, limit,
                               proposer, metrics, kept)
            if searched.winner is None:
                notes[OPTIMIZED] = searched.reason
                contenders.remove(OPTIMIZED)
                print(f"Contenders: not {OPTIMIZED}: {searched.reason}")
                continue
            runs[OPTIMIZED] = (_base_context(model, base_model),
                               searched.winner.prompts(questions, train_conversations, retrieval_k(cfg),
                                                       tokenizer, limit))
        context, prompts = runs[name]
        # the base model's prompts, or the tuned model
        same = name if name == "tuned" else json.dumps(prompts)
        if same in answered:  # the optimized prompt that is another contender's: the same answers, not redone
            answers, endings, nll, n_tokens, seconds = answered[same]
        else:
            with context as contender:
                answered[same] = answer_all_ended(contender, tokenizer, prompts, references, cfg, name,
                                                  cache=kept if name != "tuned" else None)
            answers, endings, nll, n_tokens, seconds = answered[same]
        totals, per_example = contender_metrics(answers, references, nll, n_tokens, cfg, train_answers)
        totals.update(answer_costs([prompt_length(tokenizer, p) for p in prompts],
                                   answer_lengths(tokenizer, answers), seconds,
                                   params.get("tuned" if name == "tuned" else "base")))
        metrics.update({f"eval/{name}/{k}": v for k, v in totals.items()})
        add_answers(rows, name, answers, per_example, endings if name == "tuned" else None)
    if kept and kept.reused:
        print(
            f"Reused from an earlier run on this machine: {_reused(kept.reused)} (the same base weights, "
            "prompts and settings; eval.reuse_answers=false answers again)")
    if TEACHER in contenders:
        metrics.update(agreement_metrics(rows, contenders, teachers, references))
    digest = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()[:12]
    return EvalResult(metrics, rows, contenders, shots if "fewshot" in runs else [], digest,
                      retrieved if "retrieval" in runs else [], prompts=questions, traces=cfg.traces,
                      notes=notes, search=searched, generation=generation_settings(cfg, model, tokenizer))


def _prompt_only(runs: dict, model, base_model, tokenizer, train_conversations, questions, cfg, notes: dict,
                 limit: int) -> tuple[list, list]:
    """The base model's contenders added to `runs` (zero-shot, few-shot, retrieved shots; the optimized
    prompt's place, filled once its search has run), unless `notes` says why not: (the few-shot shots, the
    retrieved ones)."""
    shots = pick_shots(train_conversations, cfg.fewshot_k, {json.dumps(p) for p in questions}) \
        if "fewshot" not in notes else []
    retrieved: list[list[list[dict]]] = []
    base = _base_context(model, base_model)
    if base is not None:
        if "base" not in notes:
            runs["base"] = (base, questions)
        if "retrieval" not in notes:
            retrieved = nearest_shots(train_conversations, questions, retrieval_k(cfg))
        # a VLM taking one image: shots' text only
        shots, retrieved = shots_for_model(tokenizer, shots, retrieved)
        if shots:
            runs["fewshot"] = (_base_context(model, base_model),
                               [fit(tokenizer, fewshot_prompt(p, shots), p, shots, limit) for p in questions])
        if any(retrieved):
            runs["retrieval"] = (_base_context(model, base_model),
                                 [fit(tokenizer, fewshot_prompt(p, s), p, s, limit)
                                  for p, s in zip(questions, retrieved)])
        if OPTIMIZED not in notes:
            # its prompts once the search has run, after the others (their pace)
            runs[OPTIMIZED] = (None, None)
    return shots, retrieved


def _reused(names: list[str]) -> str:
    """What the answer cache gave, in words: the contenders by name, the prompt search's candidates
    counted."""
    contenders = [n for n in dict.fromkeys(names) if n in CONTENDERS]
    candidates = len([n for n in dict.fromkeys(names) if n not in CONTENDERS])
    said = [", ".join(contenders)] if contenders else []
    if candidates:
        said.append(f"{candidates} prompt-search candidate{'s' if candidates > 1 else ''}")
    return "the base model's answers of " + " and of ".join(said)


SWITCHED_OFF = ("eval.", "left out by eval.")  # the reasons that are the recipe's own settings


def _notes(cfg, has_base: bool, train: list) -> dict[str, str]:
    """contender -> why it is not scored, for each prompt-only contender that is not."""
    if not has_base:
        print("Evaluation: a full model without its base model given; scoring the tuned model only.")
        return {c: "no base model to prompt (a full model without its base given)" for c in PROMPT_CONTENDERS}
    notes = {c: "left out by eval.contenders" for c in PROMPT_CONTENDERS if c not in cfg.contenders}
    if "fewshot" not in notes and cfg.fewshot_k == 0:
        notes["fewshot"] = "eval.fewshot_k is 0"
    if "retrieval" not in notes and retrieval_k(cfg) == 0:
        notes["retrieval"] = "eval.retrieval_k is 0"
    for name in ("fewshot", "retrieval", OPTIMIZED):
        if name not in notes and not train:
            notes[name] = "no train rows to draw shots from"
    return notes


def _search(model, base_model, tokenizer, train, questions, cfg, limit, proposer, metrics, kept=None):
    """The optimized contender's prompt search with the base model, at the pace the contenders so far
    answered; `kept`: the base model's answers from earlier runs (`answer_cache.py`)."""
    from mlflow_finetune_plugin.evaluate import prompt_search

    paces = [metrics[f"eval/{c}/latency_s"] for c in ("retrieval", "fewshot", "base")
             if f"eval/{c}/latency_s" in metrics]
    # the proposer sees train rows only, and only those the search will not score on
    found = prompt_search.search(lambda: _base_context(model, base_model), tokenizer, train, len(questions),
                                 cfg, limit, lambda pool: prompt_search.instruction_sources(pool, cfg,
                                                                                            proposer),
                                 paces[0] if paces else None, kept)
    print(f"Prompt search: {found.reason}" + (f": {prompt_search.describe(found.winner)}." if found.winner
                                              else "."))
    if found.winner is not None and found.winner.retrieved:  # held-out rows draw shots from every train row
        found.pool, found.k = list(train), retrieval_k(cfg)
    return found


def retrieval_k(cfg) -> int:
    """Shots of the retrieval contender: `eval.retrieval_k`, or `eval.fewshot_k` when that is not set."""
    return cfg.fewshot_k if cfg.retrieval_k is None else cfg.retrieval_k


def evaluate_model_uri(model_uri: str, data: str | None = None, train_data: str | None = None,
                       run_id: str | None = None, **overrides) -> tuple[EvalResult, str]:
    """Evaluate a logged model (e.g. `models:/support-bot@challenger`) and log into `run_id` or a new run.

    Data and eval settings default to the recipe of the model's source run; `overrides` are EvalConfig fields.
    The verdict (`verdict.conclude`, on the primary metric of the recipe's gates) is set on that run and kept
    in `result.verdict`. Returns the result and the run id it was logged in.
    """
    import mlflow

    from mlflow_finetune_plugin.config.schema import EvalConfig
    from mlflow_finetune_plugin.logged_model import load_logged_model
    from mlflow_finetune_plugin.registry.versions import resolve_model_uri, source_recipe

    name, version, source_run = resolve_model_uri(model_uri)
    recipe = source_recipe(source_run) or {}
    data_cfg = recipe.get("data") or {}
    try:
        cfg = EvalConfig.model_validate({**(recipe.get("eval") or {}),
                                         **{k: v for k, v in overrides.items() if v is not None}})
    except ValueError as e:
        raise FinetuneError(f"evaluation settings: {e}") from None
    loaded = load_logged_model(mlflow.artifacts.download_artifacts(model_uri))
    # a documents recipe's version, which retrieves
    if loaded.retriever is not None and data_cfg.get("documents"):
        return _evaluate_documents_version(loaded, cfg, recipe, source_run, data, run_id, f"{name} v{version}"
                                           if name else model_uri, model_uri, name, version)
    eval_convs, teachers = _eval_conversations(data, recipe, source_run)
    train_path = train_data or data_cfg.get("train")
    train_convs = []
    if (cfg.fewshot_k or retrieval_k(cfg)) and train_path and _exists(train_path):
        train_convs = read_conversations(train_path, data_cfg.get("system_prompt"), data_cfg.get("columns"),
                                         data_cfg.get("tags"))
    elif cfg.fewshot_k or retrieval_k(cfg):
        print(
            f"No train data for few-shot or retrieved examples ({train_path or 'none recorded'}); pass "
            "--train FILE. Skipping the few-shot and retrieval contenders.")
    base_model = _logged_base(loaded)
    result = run_evaluation(loaded.model, loaded.tokenizer, eval_convs, train_convs, cfg,
                            base_model=base_model, teachers=teachers)
    experiment_id = (
        mlflow.MlflowClient().get_run(source_run).info.experiment_id if source_run and not run_id else None
    )
    label = f"{name} v{version}" if name else model_uri
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id,
                          run_name=None if run_id else f"eval {label}") as run:
        mlflow.set_tags({tags.EVALUATED_MODEL: model_uri, **(
            {tags.EVALUATED_NAME: name, tags.EVALUATED_VERSION: version} if name else {})})
        log_evaluation(result)
        result.verdict = conclude(run.info.run_id, _recorded_gates(recipe), per_example_scores(result.rows),
                                  cfg.min_gain)
    return result, run.info.run_id


def _logged_base(loaded):
    """A full fine-tune's base model, loaded apart (an adapter's is the adapter switched off): None for
    adapters."""
    from mlflow_finetune_plugin.logged_model import load_logged_base

    if not hasattr(loaded.model, "disable_adapter") and loaded.config.get("base_model"):
        return load_logged_base(loaded.config, loaded.model.dtype).to(loaded.model.device)
    return None


def _evaluate_documents_version(loaded, cfg, recipe: dict, source_run, data, run_id, label, model_uri, name,
                                version):
    """A version that retrieves, scored as its documents run scored it (`documents.py`): zero-shot, RAG, tuned
    and tuned with RAG on the known and unseen documents' questions, with the chunks it carries; the verdict
    on what to deploy (`documents_verdict.py`) set on the run. Returns the known documents' result (the
    unseen's when there is none)."""
    import mlflow

    from mlflow_finetune_plugin.evaluate.documents import evaluate_documents, recorded_sets
    from mlflow_finetune_plugin.evaluate.documents_verdict import conclude_documents

    sets = recorded_sets(source_run, data, recipe)
    base_model = _logged_base(loaded)
    experiment_id = (
        mlflow.MlflowClient().get_run(source_run).info.experiment_id if source_run and not run_id else None
    )
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id,
                          run_name=None if run_id else f"eval {label}") as run:
        mlflow.set_tags({tags.EVALUATED_MODEL: model_uri, **(
            {tags.EVALUATED_NAME: name, tags.EVALUATED_VERSION: version} if name else {})})
        results = evaluate_documents(cfg, loaded.model, loaded.tokenizer, sets, loaded.retriever, base_model,
                                     served_with_retrieval=True)
        result = results.get("known") or next(iter(results.values()))
        result.verdict = conclude_documents(run.info.run_id, {n: per_example_scores(r.rows) for n,
                                                              r in results.items()}, loaded.retriever.k,
                                            _recorded_gates(recipe), cfg.min_gain)
    return result, run.info.run_id


def _recorded_gates(recipe: dict) -> list:
    """The promotion gates in a source run's recipe (which name the primary metric); the defaults if
    unreadable."""
    from mlflow_finetune_plugin.config.schema import RegistryConfig

    section = recipe.get("registry") or {}
    try:
        return RegistryConfig.model_validate({k: v for k, v in section.items()
                                              if k in RegistryConfig.model_fields}).promote_if
    except ValueError:
        return RegistryConfig().promote_if


def read_conversations(path: str, system_prompt: str | None = None, columns: dict | None = None,
                       tags: dict | None = None) -> list[list[dict]]:
    """Chat conversations from a data file (or `hf:` dataset) in any format training reads, through the same
    reader, validation and column/tag mapping (`data.load_training_dataset`); preference rows are scored
    against `chosen`."""
    from mlflow_finetune_plugin.data.read import load_training_dataset

    rows, _ = load_training_dataset(path, "auto", system_prompt, columns, tags)
    return conversations(rows)


# The format a row is read in when its keys fit several: a whole conversation first, then a prompt with its
# answer.
_ROW_FORMAT_ORDER = ("chat", "sharegpt", "prompt_completion", "preference", "alpaca")


def conversations(rows) -> list[list[dict]]:
    """Chat conversations from dataset rows (a `datasets.Dataset` as `data.load_training_dataset` returns it,
    or dicts in any training format), each converted by the data layer's `data_formats.to_messages` in the
    format its keys name: preference rows are scored against `chosen`; a prompt_only row is its prompt alone
    (nothing to score).
    """
    from mlflow_finetune_plugin.data.formats import expected_keys, row_formats, sharegpt_tags, to_messages

    role_tags = sharegpt_tags()
    out = []
    for i, row in enumerate(rows):
        found = row_formats(row, role_tags) if isinstance(row, dict) else []
        if not found:
            raise FinetuneError(
                f"row {i}: expected a chat row ({{'messages': [...]}}) or a row of another training "
                f"format; the keys of each: {expected_keys()}")
        messages = to_messages(row, next((f for f in _ROW_FORMAT_ORDER if f in found), found[0]))
        # a row's images go into its image parts: the conversation carries them (as a few-shot prompt's shots
        # do)
        out.append(with_images(messages, row.get(IMAGES)) if row.get(IMAGES) else messages)
    return out


def trained_system_prompt(rows, configured: str | None = None) -> str | None:
    """The system prompt a model trained on `rows` expects: `configured` (the recipe's, added to every row
    lacking one) if set, else the most common leading system message, where "none" is a candidate too, so data
    mostly without one gives None. Logged with the model so the playground can start from what the model was
    trained with."""
    from collections import Counter

    if configured:
        return configured
    counts = Counter((text_of(conv[0].get("content")) or None) if conv and conv[0].get("role") == "system"
                     else None for conv in conversations(rows))
    return counts.most_common(1)[0][0] if counts else None


def _eval_conversations(data: str | None, recipe: dict, source_run: str | None
                        ) -> tuple[list[list[dict]], list[dict | None]]:
    """(conversations, their `teacher`s): --data, else the source run's eval file, else its held-out split of
    the train file rebuilt (same seed)."""
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
