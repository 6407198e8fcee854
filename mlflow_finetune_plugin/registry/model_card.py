"""The model card of every logged fine-tune: what it is, what it was trained on, how it scored, what it is
for.

Built from the run when the model is logged (base model, method, data inputs, the evaluation and forgetting
figures the run logged, the resolved recipe), written as `README.md` into the logged model's artifacts, and
set as the description of the registered version, which the MLflow UI shows on the version's page.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

CARD_FILE = "README.md"
# The registry stores a version's description in a column of 5000 characters (MLflow's SQL schema).
MAX_DESCRIPTION = 5000
SMALL_DATA_ROWS = 1000  # below this, the card says the model saw little data
RECIPE_HEADING = "## Resolved recipe"
CUT_NOTE = "(The resolved recipe and the full card:"  # ends a description the recipe was left out of
# What the trainer's evaluation during training logs beside its loss: timings, not results.
_TRAINER_BOOKKEEPING = ("runtime", "samples_per_second", "steps_per_second", "num_tokens", "epoch")

_PURPOSE = {
    "sft": "answer as the assistant answers in its training conversations",
    "dpo": "prefer the chosen answers of its preference pairs over the rejected ones (DPO)",
    "orpo": "prefer the chosen answers of its preference pairs over the rejected ones (ORPO)",
    "simpo": "prefer the chosen answers of its preference pairs over the rejected ones (SimPO)",
    "grpo": "earn the rewards of its reward functions on its prompts (GRPO)",
    "reward": "score answers as people ranked them: a reward model, higher for the chosen answer of a pair",
    "kto": "give desirable answers and avoid undesirable ones, from unpaired thumbs up/down (KTO)",
}


def build(recipe, run_id: str, config: dict, name: str | None = None) -> str:
    """The card (Markdown) of the model logged in run `run_id` with model_config `config` (see `publish`)."""
    from mlflow import MlflowClient

    run = MlflowClient().get_run(run_id)
    metrics = dict(run.data.metrics)
    datasets = [_dataset(d) for d in run.inputs.dataset_inputs]
    title = name or recipe.registry.name or "fine-tuned model"
    task = config.get("task")
    sections = [
        f"# {title}\n\nA {recipe.adapter.type} fine-tune ({recipe.objective}) of `{config['base_model']}`"
        + (f", one adapter of a mixture: task `{task}`" if task else "")
        + f", trained and evaluated in MLflow run `{run_id}`.",
        _model_section(recipe, config, run.data.tags),
        _data_section(datasets),
        _eval_section(metrics),
        _verdict_section(run.data.tags, metrics),
        _forgetting_section(recipe, metrics),
        _use_section(recipe, config, datasets, metrics),
        _recipe_section(recipe),
    ]
    return "\n\n".join(sections) + "\n"


def log(card: str, model_id: str) -> None:
    """Write the card as README.md into the logged model's artifact directory."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CARD_FILE
        path.write_text(card, encoding="utf-8")
        MlflowClient().log_model_artifact(model_id, str(path))


def describe(name: str, version: str, card: str) -> None:
    """Set the card as the registered version's description (the recipe left out where the card is too
    long)."""
    from mlflow import MlflowClient

    MlflowClient().update_model_version(name, str(version), description=description(card))


def description(card: str) -> str:
    """The card, fitted to the registry's description column: without the recipe if need be, then cut."""
    if len(card) <= MAX_DESCRIPTION:
        return card
    note = f"\n\n{CUT_NOTE} `{CARD_FILE}` in the model's artifacts.)\n"
    # one note at most
    short = card.split(f"\n\n{RECIPE_HEADING}", 1)[0].split(f"\n\n{CUT_NOTE}", 1)[0] + note
    return short if len(short) <= MAX_DESCRIPTION else short[: MAX_DESCRIPTION - len(note)
                                                             - 4] + " ..." + note


def with_section(card: str, heading: str, section: str) -> str:
    """`card` with `section` (which starts with `heading`) in place of its section under `heading`, or, where
    it has none, inserted before the resolved recipe (or the note that stands for it in a shortened
    description; appended where there is neither)."""
    if f"\n{heading}\n" in f"\n{card}":
        before, _, after = f"\n{card}".partition(f"\n{heading}\n")
        # where the old one ends
        cuts = [at for end in ("\n## ", f"\n{CUT_NOTE}") if (at := after.find(end)) >= 0]
        tail = "\n\n" + after[min(cuts):].lstrip("\n") if cuts else "\n"
        return before.strip("\n") + "\n\n" + section + tail
    for end in (f"\n\n{RECIPE_HEADING}", f"\n\n{CUT_NOTE}"):
        if end in card:
            head, _, rest = card.partition(end)
            return f"{head}\n\n{section}{end}{rest}"
    return f"{card.rstrip()}\n\n{section}\n"


def _model_section(recipe, config: dict, run_tags: dict) -> str:
    from mlflow_finetune_plugin import tags
    from mlflow_finetune_plugin.config.loading import resolved_dict
    from mlflow_finetune_plugin.models.base import base_terms

    knobs = recipe.adapter.model_dump(mode="json", exclude={"type"})
    objective = resolved_dict(recipe).get(recipe.objective)  # the active objective's knobs (sft has none)
    rows = [("Base model", f"`{config['base_model']}`"
             + (f" (revision `{config['base_revision']}`)" if config.get("base_revision") else "")),
            ("Method", f"`-e {recipe.method}`"),
            ("Adapter", f"{recipe.adapter.type}" + (f" ({_knobs(knobs)})" if knobs else "")),
            ("Objective", recipe.objective + (f" ({_knobs(objective)})" if objective else "")),
            ("Quantization of the base", recipe.model.quantization),
            ("Training precision", run_tags.get(tags.PRECISION, "-")),
            ("Artifact",
             "adapter only; the base is referenced, not "
             "copied" if config.get("artifact") == "adapter" else "complete weights")]
    terms = base_terms(config["base_model"])
    if terms:
        rows.insert(1, ("Terms of use", terms))
    return "## Model\n\n" + markdown_table(["", ""], rows)


def _dataset(d) -> dict:
    import json

    context = next((t.value for t in d.tags if t.key == "mlflow.data.context"), "")
    profile = json.loads(d.dataset.profile) if d.dataset.profile else {}
    try:
        source = json.loads(d.dataset.source)
        source = source.get("uri") or source.get("path") or d.dataset.source
    except (TypeError, ValueError):
        source = d.dataset.source
    return {"context": context, "name": d.dataset.name, "digest": d.dataset.digest,
            "rows": profile.get("num_rows"), "source": source}


def _data_section(datasets: list[dict]) -> str:
    if not datasets:
        return "## Data\n\nNo dataset inputs were logged with the run."
    rows = [(d["context"], d["name"], d["rows"], f"`{d['digest']}`", f"`{d['source']}`") for d in datasets]
    return "## Data\n\n" + markdown_table(["split", "name", "rows", "digest", "source"], rows)


def _eval_section(metrics: dict) -> str:
    from mlflow_finetune_plugin.metrics import CONTENDERS, comparison_table

    scored = {k: v for k, v in metrics.items() if k.count("/") == 2 and k.split("/")[1] in CONTENDERS}
    # The rows base or few-shot were scored on too; what only the tuned model has (the trainer's own
    # evaluation during training, preference figures) is listed apart.
    compared = {k.split("/")[2] for k in scored if not k.startswith("eval/tuned/")}
    table = {k: v for k, v in scored.items() if k.split("/")[2] in compared} if compared else scored
    if not table:
        return ("## Evaluation\n\nNot evaluated: the run had no held-out rows (`data.eval` or "
                "`data.eval_split`).")
    n = metrics.get("eval/n_examples")
    head = (
        (f"On {int(n)} held-out examples" if n else "On the held-out examples")
        + ": the base model zero-shot, "
        "with random train examples as shots (fewshot), with the train examples most similar to each "
        "question as shots (retrieval), with the instruction and shots a search on a dev split of the train "
        "rows found best (optimized, where it ran), and the tuned model (`*` marks the best of each row; "
        "lower is better for loss, perplexity and misrouted); under them, what an answer cost each (tokens, "
        "median seconds on the machine that evaluated, parameters)."
    )
    other = {k: v for k,
             v in metrics.items() if k not in table and k.split("/")[-1] not in _TRAINER_BOOKKEEPING and (
                 k.count("/") == 2 and k.split("/")[1] in (*CONTENDERS, "start") or k.count("/")
                 == 1) and k.startswith("eval/") and k != "eval/n_examples"}
    more = ("\n\nOther evaluation figures:\n\n" + markdown_table(["metric", "value"], sorted(other.items()))
            if other else "")
    return f"## Evaluation\n\n{head}\n\n```\n{comparison_table(table)}\n```{more}"


def _verdict_section(run_tags: dict, metrics: dict) -> str:
    """Did fine-tuning pay off against the best prompt-only alternative (`evaluate/verdict.py` decided, at the
    end of the evaluation, and tagged the run)?"""
    from mlflow_finetune_plugin import tags
    from mlflow_finetune_plugin.metrics import VERDICT_MIN_EXAMPLES, VERDICT_PREFIX, VERDICT_RESAMPLES

    sentence = run_tags.get(tags.VERDICT)
    if not sentence:
        return "## Verdict\n\nNone recorded: the run ended before its evaluation was weighed."
    text = f"**{sentence[0].upper()}{sentence[1:]}.**"
    low, high = metrics.get(f"{VERDICT_PREFIX}margin_low"), metrics.get(f"{VERDICT_PREFIX}margin_high")
    gain = metrics.get(f"{VERDICT_PREFIX}min_gain")
    if low is not None and high is not None:
        least = "" if gain is None else f" and the margin is at least {gain:g} (`eval.min_gain`)"
        text += (f"\n\nThe best prompt-only alternative was `{run_tags.get(tags.VERDICT_BEST_ALTERNATIVE)}`. "
                 f"The 95% interval of the tuned model's margin over it is {low:+.4f} to {high:+.4f} (a "
                 f"paired bootstrap over the held-out examples, {VERDICT_RESAMPLES} resamples); fine-tuning "
                 f"counts as paying off only when the whole interval is above 0{least}, on at least "
                 f"{VERDICT_MIN_EXAMPLES} examples.")
    return "## Verdict\n\n" + text


def _forgetting_section(recipe, metrics: dict) -> str:
    from mlflow_finetune_plugin.metrics import FORGETTING_PREFIX as PREFIX

    figures = {k[len(PREFIX):]: v for k, v in metrics.items() if k.startswith(PREFIX)}
    if "tuned_loss" not in figures:
        return "## Forgetting\n\nNot measured (`eval.forgetting: false`, or nothing was evaluated)."
    source = "the general-text set bundled with the plugin" if recipe.eval.forgetting is True \
        else f"`{Path(str(recipe.eval.forgetting)).name}`"
    rows = [("loss", figures.get("base_loss"), figures["tuned_loss"]),
            ("perplexity", figures.get("base_ppl"), figures["tuned_ppl"])]
    ratio = figures.get("ppl_ratio")
    text = (f"Loss and perplexity on general text the model was not tuned on ({source}, "
            f"{int(figures.get('n_tokens', 0))} tokens), before and after tuning:\n\n"
            + markdown_table(["", "base", "tuned"], rows))
    if ratio is not None:
        text += f"\n\nPerplexity ratio tuned / base: **{ratio:.3f}** (`eval/forgetting/ppl_ratio`)."
    per_task = sorted((k, v) for k, v in figures.items() if "/" in k)
    if per_task:
        text += "\n\nPer task adapter:\n\n" + markdown_table(["metric", "value"], per_task)
    return "## Forgetting\n\n" + text


def _use_section(recipe, config: dict, datasets: list[dict], metrics: dict) -> str:
    train = [d for d in datasets if d["context"] == "training"]
    held_out = [d for d in datasets if d["context"] == "eval"]
    rows = sum(d["rows"] or 0 for d in train)
    names = ", ".join(f"`{d['name']}`" for d in train) or "its training data"
    prompt = config.get("system_prompt")
    lines = [f"- **Trained for**: to {_PURPOSE.get(recipe.objective, recipe.objective)}, on {rows} rows of "
             f"{names}. Use it for inputs like those rows.",
             f"- **System prompt**: {_quote(prompt)} Start a conversation with it: the model was trained "
             "with it." if prompt else "- **System prompt**: none; it was trained without one."]
    limits = []
    if rows < SMALL_DATA_ROWS:
        limits.append(
            f"small data: {rows} training rows; it may answer confidently about things they do not cover")
    n = metrics.get("eval/n_examples")
    if held_out or n:
        limits.append(f"evaluated only on the held-out split ({int(n) if n else '?'} examples of "
                      + ", ".join(f"`{d['name']}`" for d in held_out)
                      + "), from the same source as the training "
                        "data; how it does on other inputs was not measured")
    else:
        limits.append("not evaluated on held-out rows: its quality was not measured")
    ratio = metrics.get("eval/forgetting/ppl_ratio")
    if ratio is not None and ratio > 1:
        limits.append(
            f"general text is {ratio:.2f}x as perplexing to it as to its base: it may have lost some "
            "general ability")
    if config["base_model"].startswith("builtin:tiny"):
        limits.append("the base is the plugin's random-weight test model: the answers mean nothing")
    elif "dequantized" in config["base_model"]:
        limits.append("the base was dequantized from a 4-bit GGUF file: not the original weights")
    lines.append("- **Limits**: " + "; ".join(limits) + ".")
    return "## Intended use\n\n" + "\n".join(lines)


def _recipe_section(recipe) -> str:
    from mlflow_finetune_plugin.config.loading import to_yaml

    return f"{RECIPE_HEADING}\n\n```yaml\n{to_yaml(recipe).rstrip()}\n```"


def _knobs(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)


def _quote(text: str) -> str:
    one_line = " ".join(text.split())
    return f"\"{one_line[:300]}{'...' if len(one_line) > 300 else ''}\"."


def markdown_table(headers: list[str], rows) -> str:
    """A Markdown table; floats with 4 decimals, None as '-'."""
    def cell(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
