"""GRPO: reinforcement fine-tuning with verifiable rewards, with TRL's GRPOTrainer, on any adapter.

Data is prompt-only (`prompt_only`: a prompt, and columns such as `answer` for the reward functions), or
preference pairs, whose prompts are taken with the chosen answer as `answer` (`prompts_of`: RLHF on the
prompts a reward model was trained for, e.g. `-e grpo` on the dpo recipe with `grpo.rewards:
[models:/support-bot-dpo-rm@champion]`). Each step
samples `grpo.num_generations` completions per prompt, scores them with the recipe's reward functions
(`rewards.py`: built-ins and the project's own), and moves the policy towards the completions that beat their
group's mean, held near the base model by the KL term (`grpo.beta`). TRL logs the curves: `reward`,
`rewards/<fn>/mean`, `kl`, `completions/mean_length`, ... (as `train/<name>` in the run).

Choices made here:
- No evaluation during training: TRL's GRPO evaluation samples num_generations completions per held-out prompt
  and scores them, as costly as that many training steps, while the training curves already score fresh
  samples every step. The held-out rows are scored once at the end (`evaluate`): greedy answers of base,
  few-shot and tuned, and beside their rewards a reward-hacking check: the tuned answers' length and KL to the
  base (`policy_kl.py`).
- Prompts: TRL 1.16's GRPO has no `max_prompt_length` (it never cuts a prompt). A prompt cut on the left would
lose
  its system message and instruction, so a prompt longer than `data.max_length - grpo.max_completion_length`
  tokens is left out of training, with a warning that counts them.
- `train.batch_size` counts completions (TRL's per-device batch), so one optimizer step scores
  batch_size x grad_accum / num_generations prompts.
"""

from __future__ import annotations

import sys

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.train.reach import aux_loss_arguments
from mlflow_finetune_plugin.train.rewards.calling import mean, score
from mlflow_finetune_plugin.train.rewards.loader import load_rewards, missing_columns, resolve_rewards

REFERENCE_COLUMN = "answer"  # where rows have it: the reference of the evaluation's text metrics
PAIR_COLUMNS = {"chosen", "rejected"}


def check(recipe) -> list[str]:
    """Reward functions that do not load and data columns they read that the files lack: what needs the
    project's own code (its rewards.py). What the recipe alone decides (batch shape, lengths) is
    `config/checks.py`'s."""
    rewards, problems = resolve_rewards(recipe.grpo.rewards, recipe.project_dir)
    for split in ("train", "eval"):
        columns = _file_columns(getattr(recipe.data, split, None), recipe)
        if columns is not None:
            problems += [f"data.{split}: {p}" for p in missing_columns(rewards, columns)]
    return problems


def _file_columns(path, recipe) -> set[str] | None:
    """The columns of a local data file (after `data.columns`), or None where unknown before loading (`hf:`
    datasets, unreadable files: the data check reports those)."""
    from pathlib import Path

    from mlflow_finetune_plugin.data.read import is_hf, read_records_lenient

    if not path or is_hf(path):
        return None
    path = Path(recipe.project_dir or ".") / path
    if not path.is_file():
        return None
    records, _ = read_records_lenient(str(path), getattr(recipe.data, "columns", None))
    columns = set().union(*(rec.keys() for _, rec in records)) if records else None
    if columns and PAIR_COLUMNS <= columns:  # preference pairs: read as prompts with `answer` (`prompts_of`)
        columns = columns - PAIR_COLUMNS | {REFERENCE_COLUMN}
    return columns


def build_trainer(recipe, model, tokenizer, train_ds, eval_ds, args: dict, callbacks: list):
    """TRL's GRPOTrainer on `model` as given (a PeftModel or a full model: no peft_config), with the recipe's
    reward functions and weights; evaluation during training off (see the module docstring)."""
    from trl import GRPOConfig, GRPOTrainer

    from mlflow_finetune_plugin.train.callbacks import DropReferenceAdapter

    cfg = recipe.grpo
    train_ds = prompts_of(train_ds)
    rewards = load_rewards(cfg.rewards, recipe.project_dir)
    problems = missing_columns(rewards, train_ds.column_names)
    if problems:
        raise FinetuneError("data.train: " + "; ".join(problems))
    train_ds = _fitting_prompts(train_ds, tokenizer, recipe.data.max_length - cfg.max_completion_length)
    config = GRPOConfig(
        **{**args, "eval_strategy": "no"}, **aux_loss_arguments(recipe, model, GRPOConfig, generates=True),
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=cfg.top_p, beta=cfg.beta, epsilon=cfg.epsilon,
        num_iterations=cfg.num_iterations, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
        mask_truncated_completions=cfg.mask_truncated_completions,
        importance_sampling_level="sequence" if cfg.loss_type == "luspo" else "token",
        reward_weights=[r.weight for r in rewards])
    per_generation = config.generation_batch_size // cfg.num_generations  # prompts; TRL drops a partial batch
    if len(train_ds) < per_generation:
        raise FinetuneError(f"data.train: {len(train_ds)} prompt{'s' if len(train_ds) != 1 else ''} to train "
                            "on, fewer than one batch takes: train.batch_size x train.grad_accum (x "
                            f"processes) / grpo.num_generations = {config.generation_batch_size} / "
                            f"{cfg.num_generations} = {per_generation}; add prompts or lower "
                            "train.batch_size")

    return GRPOTrainer(model=model, reward_funcs=[r.func for r in rewards], args=config,
                       train_dataset=train_ds, eval_dataset=None, processing_class=tokenizer,
                       callbacks=[*callbacks, DropReferenceAdapter()])


def prompts_of(ds):
    """Prompt-only rows as they are; preference pairs as their prompts (messages), with the chosen answer's
    text as the `answer` the text metrics and rewards such as exact_answer compare with (TRL's GRPOTrainer
    reads `prompt`)."""
    from datasets import Dataset

    if ds is None or not PAIR_COLUMNS <= set(ds.column_names):
        return ds
    rows = [{"prompt": row["prompt"] if isinstance(row["prompt"], list) else
             [{"role": "user", "content": row["prompt"]}], REFERENCE_COLUMN: _text(row["chosen"])}
            for row in ds]
    return Dataset.from_list(rows)


def _text(answer) -> str:
    """An answer's text: a string, or the content of its assistant messages."""
    if isinstance(answer, str):
        return answer
    return "\n".join(str(m.get("content") or "") for m in answer if m.get("role", "assistant") == "assistant")


def _fitting_prompts(ds, tokenizer, limit: int):
    """The rows whose prompt (chat template and generation prompt included) fits in `limit` tokens."""
    lengths = [prompt_tokens(tokenizer, p) for p in ds["prompt"]]
    keep = [i for i, n in enumerate(lengths) if n <= limit]
    if not keep:
        raise FinetuneError(
            f"data.train: every prompt is longer than data.max_length - grpo.max_completion_length "
            f"= {limit} tokens (the shortest has {min(lengths)}); raise data.max_length")
    if len(keep) < len(ds):
        print(
            f"Warning: {len(ds) - len(keep)} of {len(ds)} training prompts are longer than data.max_length - "
            f"grpo.max_completion_length = {limit} tokens (the longest has {max(lengths)}) and are left out; "
            "raise data.max_length to train on them", file=sys.stderr)
        ds = ds.select(keep)
    return ds


def prompt_tokens(tokenizer, prompt) -> int:
    """Tokens of a prompt as GRPO feeds it: chat template with the generation prompt (text prompts: as they
    are)."""
    if isinstance(prompt, list):
        from mlflow_finetune_plugin.models.chat_format import render

        prompt = render(tokenizer, prompt, add_generation_prompt=True)
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def evaluate(recipe, model, tokenizer, train_ds, eval_ds, base_model=None) -> None:
    """Base zero-shot, base few-shot and tuned greedy answers to the held-out prompts, scored by the text
    metrics against the `answer` column (where rows have one) and by every reward function:
    `eval/<contender>/reward` (the
    weighted sum, as in training) and `eval/<contender>/reward_<fn>`, logged, tabled and printed."""
    from mlflow_finetune_plugin.evaluate.contenders import run_evaluation
    from mlflow_finetune_plugin.evaluate.report import log_evaluation
    from mlflow_finetune_plugin.metrics import comparison_table

    train_ds, eval_ds = prompts_of(train_ds), prompts_of(eval_ds)
    rewards = load_rewards(recipe.grpo.rewards, recipe.project_dir)
    lacking = missing_columns(rewards, eval_ds.column_names)
    if lacking:
        print("Evaluation: " + "; ".join(lacking) + ": not scored on the held-out rows", file=sys.stderr)
        rewards = [r for r in rewards if set(r.columns) <= set(eval_ds.column_names)]
    shots = [_conversation(row) for row in train_ds if row.get(REFERENCE_COLUMN) is not None]
    result = run_evaluation(model, tokenizer, [_conversation(row) for row in eval_ds], shots, recipe.eval,
                            base_model=base_model)
    # run_evaluation scores the first eval.max_examples rows
    held_out = eval_ds.select(range(len(result.rows)))
    if not _has_references(held_out):
        print(
            f"Evaluation: the held-out rows have no `{REFERENCE_COLUMN}` column (or some lack one): answers "
            "are scored by the reward functions only", file=sys.stderr)
        _drop_text_metrics(result)
    metrics = reward_metrics(rewards, tokenizer, held_out, result)
    metrics.update(_kl_to_base(model, tokenizer, held_out, result, base_model, recipe.train.batch_size))
    result.metrics.update(metrics)
    log_evaluation(result)
    print(comparison_table(result.metrics))


def reward_metrics(rewards, tokenizer, rows, result) -> dict[str, float]:
    """Every contender's answers in `result` scored by `rewards` on the held-out `rows` (the same rows, in
    order): `eval/<contender>/reward` and `eval/<contender>/reward_<fn>`; the per-example total goes into the
    table."""
    prompts = rows["prompt"]
    columns = {c: rows[c] for c in rows.column_names if c != "prompt"}
    metrics: dict[str, float] = {}
    for name in result.contenders:
        answers = [row[f"{name}_answer"] for row in result.rows]
        extra = {"completion_ids": [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers],
                 "trainer_state": None, "log_extra": _ignore, "log_metric": _ignore}
        completions = [[{"role": "assistant", "content": a}] for a in answers]
        totals, per_fn = score(rewards, prompts, completions, {**columns, **extra})
        # answer length beside the rewards: a reward model that likes long answers is hacked by longer answers
        lengths = [float(len(ids)) for ids in extra["completion_ids"]]
        for key, value in [("reward", mean(totals)), *((f"reward_{fn}", mean(v)) for fn, v in per_fn.items()),
                           ("answer_tokens", mean(lengths))]:
            if value is not None:
                metrics[f"eval/{name}/{key}"] = value
        for row, total in zip(result.rows, totals):
            row[f"{name}_reward"] = total
    return metrics


def _kl_to_base(model, tokenizer, rows, result, base_model, batch_size: int) -> dict[str, float]:
    """The reward-hacking check beside the rewards: KL per answer token from the base to the tuned policy on
    its own held-out answers (`evaluate/policy_kl.py`), `eval/tuned/kl_to_base`, and per example in the
    table."""
    from mlflow_finetune_plugin.evaluate.policy_kl import answer_kl

    if "tuned" not in result.contenders:
        return {}
    kl, per_answer = answer_kl(model, tokenizer, rows["prompt"], [row["tuned_answer"] for row in result.rows],
                               base_model, batch_size)
    for row, value in zip(result.rows, per_answer):
        row["tuned_kl_to_base"] = value
    return {} if kl is None else {"eval/tuned/kl_to_base": kl}


def _ignore(*args, **kwargs) -> None:
    """TRL's `log_extra` / `log_metric` for reward functions called outside training: nothing to log into."""


def _conversation(row) -> list[dict]:
    """The row's prompt and, as the assistant's turn, its reference answer (empty where it has none)."""
    reference = row.get(REFERENCE_COLUMN)
    prompt = row["prompt"] if isinstance(row["prompt"],
                                         list) else [{"role": "user", "content": row["prompt"]}]
    return [*prompt, {"role": "assistant", "content": "" if reference is None else str(reference)}]


def _has_references(rows) -> bool:
    return REFERENCE_COLUMN in rows.column_names and all(a is not None for a in rows[REFERENCE_COLUMN])


def _drop_text_metrics(result) -> None:
    """Without references the text metrics and the reference loss would score answers against empty text."""
    from mlflow_finetune_plugin.evaluate.report import TABLE_METRICS

    result.metrics = {k: v for k, v in result.metrics.items() if k.count("/") < 2}
    for row in result.rows:
        for name in result.contenders:
            for m in TABLE_METRICS:
                row.pop(f"{name}_{m}", None)
