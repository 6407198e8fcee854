"""Combinations no single key can judge, refused before any model loads: the adapter against packing and a
quantized base, continuing an adapter, data mixtures, and what each objective cannot train with.

Every check the recipe alone decides lives here; `loading.py` runs them with the schema's own checks, so all
of a recipe's problems are listed at once. A check that needs the project's own code (GRPO's reward functions,
from its rewards.py) stays with the objective that loads that code (`train/objectives/grpo.py: check`).

The facts the checks rest on are the tables below, which the adapters, the objectives and the data preflight
read too: the adapters that cannot pack or train on a 4/8-bit base and why, and the data formats each
objective trains on.
"""

from __future__ import annotations

import math

from mlflow_finetune_plugin.config.distill import is_registered
from mlflow_finetune_plugin.config.presets import PRESETS
from mlflow_finetune_plugin.config.schema import Recipe

# adapter.type -> why packed rows do not train correctly with it; every other adapter packs.
NOT_PACKABLE = {
    "prefix": "the prefix is prepended once per row, and a packed row holds several conversations",
    "prompt": "virtual tokens are prepended once per row, and a packed row holds several conversations",
}
# adapter.type -> why it cannot train on a 4/8-bit base; every other adapter can.
NOT_QUANTIZABLE = {
    "bottleneck": (
        "PEFT's bottleneck (PEANuT) tuner wraps plain torch Linear layers only, not bitsandbytes' 4/8-bit "
        "ones; use the lora or ia3 adapter on a quantized base"),
    "full": ("a 4/8-bit base cannot be trained weight by weight (bitsandbytes' quantized weights have no "
             "gradients); use the lora adapter (QLoRA), or model.quantization: none"),
}
# objective -> the data formats it trains on.
OBJECTIVE_FORMATS = {
    "sft": ("chat", "sharegpt", "alpaca", "prompt_completion"),
    "dpo": ("preference",),
    "orpo": ("preference",),
    "simpo": ("preference",),
    "grpo": ("prompt_only", "preference"),  # pairs: their prompts, the chosen answer as the reference
    "reward": ("preference",),
    "kto": ("unpaired_preference", "preference"),  # pairs are unpaired, as TRL does: chosen up, rejected down
}
# Objectives that train a sequence-scoring model (the base with a one-number score head instead of its LM
# head):
# it scores, it does not generate.
SCORING = ("reward",)
# Objectives whose training batches come from the policy's own generation, inside the trainer's step.
ONLINE = ("grpo",)
# What a reward run logs for its gates (`train/objectives/reward.py`), and its default gate: held-out pairwise
# accuracy above the base's own log-prob margin, the longer answer and the current champion. A reward model
# writes no text, so no gate on rougeL or forgetting (`loading.py` puts these in place of gates written for
# the recipe's chat models).
REWARD_METRICS = ("pair_accuracy", "reward_margin", "arena_above")
REWARD_GATES = ({"metric": "pair_accuracy", "beats": ["base", "length", "champion"]},)
# The adapters a scoring model trains with: PEFT's LoRA and IA3 keep the score head trainable
# (modules_to_save), full trains everything; prefix and prompt tuning prepend positions the head's last-token
# pooling does not expect.
SCORING_ADAPTERS = ("lora", "ia3", "full")
# TRL's experimental ORPO and CPO (SimPO) trainers: no reference model; they score the logits position by
# position.
REFERENCE_FREE = ("orpo", "simpo")


def combination_problems(recipe: Recipe, raw: dict | None = None, tasks_key: str = "data.tasks") -> list[str]:
    """Every choice on the axes against the others, each refusal with its reason and the fix. `raw` (the
    recipe as written, on the axes) and `tasks_key` (where it names its tasks) word the problems of a
    mixture."""
    problems = _adapter_problems(recipe)
    data = recipe.data
    if data.tasks or recipe.method == "multitask":
        problems.extend(_mixture_problems(recipe, raw or {}, tasks_key))
    elif data.adapters != "shared":
        problems.append("data.adapters: per_task needs a mixture (data.tasks with two or more tasks)")
    return (problems + _objective_problems(recipe) + _distill_problems(recipe) + _prompt_only_problems(recipe)
            + _documents_problems(recipe))


def _documents_problems(recipe: Recipe) -> list[str]:
    """A documents recipe trains question rows (RAFT-style) with the sft objective, as one data set."""
    if not recipe.data.documents:
        return []
    preset = PRESETS.get(recipe.method)
    if preset is not None and not preset.trains:
        return [f"data.documents: -e {recipe.method} trains no weights, and a documents recipe's prompt-only "
                "contenders are zero-shot and RAG, scored by any training entry point (-e lora); drop "
                "data.documents to search a prompt over the question rows"]
    problems = []
    if recipe.objective != "sft":
        problems.append(f"data.documents: question rows from documents train with the sft objective; "
                        f"{recipe.objective} trains on other rows (use -e lora, or drop data.documents)")
    if recipe.data.tasks:
        problems.append(
            "data.documents: a documents recipe is one set of question rows, not a mixture of data.tasks")
    if recipe.distill is not None and recipe.distill.teacher:
        problems.append(
            "data.documents: a teacher writes questions from documents with questions.teacher, not "
            "distill.teacher (which answers prompts)")
    return problems


def _adapter_problems(recipe: Recipe) -> list[str]:
    """The adapter against packing, the quantization and continuing an adapter."""
    kind, model, problems = recipe.adapter.type, recipe.model, []
    if recipe.data.packing is True and kind in NOT_PACKABLE:
        problems.append(f"data.packing: true cannot be used with the {kind} adapter: {NOT_PACKABLE[kind]}. "
                        "Set data.packing: auto (off for this adapter) or false")
    if model.quantization != "none" and kind in NOT_QUANTIZABLE:
        problems.append(f"model.quantization: {model.quantization} cannot be used with the {kind} adapter: "
                        f"{NOT_QUANTIZABLE[kind]}")
    if model.init_adapter and kind == "full":
        problems.append("model.init_adapter: a full fine-tune has no adapter to continue; give the "
                        "registered full model as model.name instead")
    return problems


def _mixture_problems(recipe: Recipe, raw: dict, tasks_key: str) -> list[str]:
    data = recipe.data
    problems = []
    if len(data.tasks) < 2:
        problems.append(f"{tasks_key}: {len(data.tasks)} task(s) given; a mixture needs at least two, e.g.\n"
                        "    data:\n      tasks:\n        faq: {train: data/faq.jsonl, weight: 2}\n"
                        "        tone: {train: data/tone.jsonl}\n  (one task: use data.train)")
    given = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    if given.get("train") or given.get("eval"):
        problems.append(
            f"data.train/data.eval: a mixture reads its files from {tasks_key}; move them into a task")
    if recipe.objective != "sft":
        problems.append(
            f"data.tasks: mixtures train with the sft objective; {recipe.objective} takes one data "
            "set (data.train)")
    if data.adapters == "per_task" and recipe.adapter.type == "full":
        problems.append("data.adapters: per_task trains one adapter per task; a full fine-tune has none")
    if data.adapters == "per_task" and recipe.model.init_adapter:
        problems.append(
            "model.init_adapter: continuing an adapter is not supported with data.adapters: per_task "
            "(each task trains a new adapter of its own); use adapters: shared to continue one adapter "
            "on the whole mixture")
    if data.adapters == "per_task" and recipe.train.resume:
        problems.append("train.resume: resuming is not supported with data.adapters: per_task; "
                        "use adapters: shared, or start the run again")
    return problems



def _objective_problems(recipe: Recipe) -> list[str]:
    """What the objective cannot train with: prompt tuning under the reference-free trainers, replayed text
    outside sft, GRPO's batch shape and lengths."""
    problems = []
    if recipe.objective in REFERENCE_FREE and recipe.adapter.type == "prompt":
        problems.append(
            f"adapter.type: prompt cannot be used with objective: {recipe.objective}: TRL's experimental "
            "ORPO and CPO trainers score the logits position by position against the tokens, and prompt "
            "tuning's virtual tokens shift them. Use adapter.type: lora, ia3 or prefix, or objective: dpo")
    if recipe.data.replay is not False and recipe.objective != "sft":
        problems.append(
            f"data.replay: replayed general text trains the language-model loss of the sft objective; "
            f"{recipe.objective} trains on {' / '.join(OBJECTIVE_FORMATS[recipe.objective])} rows and has "
            "no place for it. Set data.replay: false")
    if recipe.data.replay is not False and recipe.data.replay_loss == "kl" and recipe.adapter.type == "full":
        problems.append(
            "data.replay_loss: kl compares the tuned model with the base model, which is the adapter "
            "switched off; a full fine-tune has no adapter (and no second copy of the base). Use "
            "data.replay_loss: lm, or an adapter")
    if recipe.objective == "grpo":
        problems.extend(grpo_problems(recipe))
    if recipe.objective in SCORING and recipe.adapter.type not in SCORING_ADAPTERS:
        problems.append(f"adapter.type: {recipe.adapter.type} cannot train a reward model (objective: "
                        f"{recipe.objective}): the score head reads the last token's hidden state, and "
                        f"{recipe.adapter.type} tuning prepends virtual positions to every row. Use "
                        f"adapter.type: {', '.join(SCORING_ADAPTERS)} (-e reward trains LoRA)")
    if recipe.objective in SCORING and recipe.model.quantization != "none":
        problems.append(f"model.quantization: {recipe.model.quantization} is not supported with objective: "
                        f"{recipe.objective} yet: on a bitsandbytes base the score head's input and weights "
                        "come in different dtypes and training stops. Use model.quantization: none")
    if recipe.objective in SCORING and recipe.model.init_adapter:
        problems.append(
            "model.init_adapter: a reward model starts a fresh adapter and score head; a chat adapter "
            "to continue has no score head. Clear model.init_adapter")
    if recipe.objective == "kto" and recipe.train.batch_size != "auto" and recipe.train.batch_size < 2:
        problems.append(
            f"train.batch_size ({recipe.train.batch_size}) must be 2 or more with objective: kto: TRL's "
            "KTOTrainer estimates its KL term from the other answers of the same batch")
    return problems


def grpo_problems(recipe: Recipe) -> list[str]:
    """Batch shapes TRL refuses and lengths that leave no room for the prompt.

    The batch check assumes one process: TRL needs num_generations to divide batch_size x grad_accum x
    processes, which one process makes the strictest case.
    """
    cfg, train, problems = recipe.grpo, recipe.train, []
    if train.batch_size == "auto":
        return [*problems, "train.batch_size: auto is not taken with objective: grpo (its batch counts "
                "completions, which grpo.num_generations must divide): give a number, a multiple of "
                f"grpo.num_generations ({cfg.num_generations})"]
    per_step = train.batch_size * train.grad_accum
    n = cfg.num_generations
    if per_step % n:
        divisors = [d for d in range(2, min(per_step, 64) + 1) if per_step % d == 0]
        other = (f"grpo.num_generations to a divisor of {per_step} ({', '.join(map(str, divisors[:6]))})"
                 if divisors else "train.batch_size to 2 or more")
        problems.append(
            f"grpo.num_generations ({n}) must divide the completions of one optimizer step, train.batch_size "
            f"x train.grad_accum = {train.batch_size} x {train.grad_accum} = {per_step}: TRL samples "
            "num_generations completions per prompt and counts completions, not prompts, in a batch. Set "
            f"train.batch_size to {math.ceil(train.batch_size / n) * n} (a multiple of {n}), or {other}")
    if cfg.max_completion_length >= recipe.data.max_length:
        problems.append(
            f"grpo.max_completion_length ({cfg.max_completion_length}) leaves no room for the prompt in "
            f"data.max_length ({recipe.data.max_length}), which holds prompt + completion; raise "
            "data.max_length or lower grpo.max_completion_length")
    return problems


def _distill_problems(recipe: Recipe) -> list[str]:
    """A teacher's answers train with the sft objective on one data set; `-e distill` needs a teacher."""
    distill, problems = recipe.distill, []
    teacher = distill.teacher if distill is not None else None
    if PRESETS.get(recipe.method) is not None and PRESETS[recipe.method].distill and not teacher:
        problems.append("distill.teacher: -e distill needs a teacher to answer the prompts: an "
                        "OpenAI-compatible server (-P distill.teacher=http://HOST:PORT/v1) or a registered "
                        "model (-P distill.teacher=models:/NAME@ALIAS)")
    if not teacher:
        return problems
    if recipe.objective != "sft":
        problems.append(
            f"distill.teacher: the teacher's answers train with the sft objective; {recipe.objective} "
            "trains on other rows. Use -e distill (or objective: sft), or drop distill.teacher")
    if recipe.data.tasks:
        problems.append(
            "distill.teacher: a teacher answers one set of prompts (data.train, data.eval), not a "
            "mixture (data.tasks)")
    if distill.loss == "logits" and not is_registered(teacher):
        problems.append(
            "distill.loss: logits needs the teacher's token distributions, which a server's API does not "
            "give: name a registered teacher run here (distill.teacher: models:/NAME@ALIAS) sharing the "
            "student's tokenizer, or use distill.loss: text")
    return problems


def _prompt_only_problems(recipe: Recipe) -> list[str]:
    """`-e optimize-prompt` trains nothing: it needs the prompt search on, held-out rows and one data set."""
    if PRESETS.get(recipe.method) is None or PRESETS[recipe.method].trains:
        return []
    problems = []
    if not recipe.eval.enabled or "optimized" not in recipe.eval.contenders:
        problems.append(
            "eval: -e optimize-prompt is the prompt search: set eval.enabled: true and add optimized to "
            "eval.contenders")
    if recipe.data.tasks:
        problems.append(
            "data.tasks: -e optimize-prompt searches a prompt for one data set: give data.train, not a "
            "mixture")
    if recipe.objective != "sft" or recipe.distill is not None and recipe.distill.teacher:
        problems.append(
            "objective: -e optimize-prompt trains no weights: use objective sft without distill.teacher "
            "(a teacher that writes instructions: set eval.optimize.proposer to its URL)")
    return problems
