"""The data preflight of a run: every data file of the recipe checked row by row, in the format its objective
trains on (a vision-language model's rows counted with their image tokens, by its processor), then read
exactly as training reads it, before any model loads (`mlflow run --backend finetune` and
`mlflow-finetune train` run it after the recipe loads). Errors stop the run, listed at once, before a run
exists; warnings are printed as advice."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from mlflow_finetune_plugin.config.checks import OBJECTIVE_FORMATS
from mlflow_finetune_plugin.config.documents import NO_QUESTIONS
from mlflow_finetune_plugin.data.check import check_overlap
from mlflow_finetune_plugin.data.formats import DataError, summarize
from mlflow_finetune_plugin.data.read import is_hf
from mlflow_finetune_plugin.data.splits import data_files, load_splits
from mlflow_finetune_plugin.data.token_check import tokenizer_for_check
from mlflow_finetune_plugin.data.traces import is_traces, traces_sentence
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.messages import split_conversation, text_messages
from mlflow_finetune_plugin.models.chat_format import reply_ids

_FORMAT_HINTS = {**dict.fromkeys(("dpo", "orpo", "simpo", "reward"),
                                 "Give rows with prompt, chosen and rejected (or chosen/rejected message "
                                 "lists); `mlflow-finetune votes export NAME -o prefs.jsonl` writes them "
                                 "from playground votes."),
                 "kto": "Give rows with prompt, completion and a boolean label (true: desirable), or "
                        "preference pairs; `mlflow-finetune votes export NAME --format kto -o thumbs.jsonl` "
                        "writes them from playground votes.",
                 "grpo": "Give rows with a prompt (text or messages) and the columns your reward functions "
                         "read (e.g. answer)."}


def check_recipe_data(recipe, check_data) -> None:
    """Every data file of the recipe, row by row, in the format its method trains on; raises listing all
    problems, prints the warnings (errors too with `data.strict`). Then the data is read by
    `splits.load_splits`, the function the training pipeline reads it with, so whatever training would refuse
    about the data is refused here, before a run exists. Each file's format is resolved from its own rows
    (`format: auto`, or the objective's format where the declared one cannot train); where one was detected,
    one line says which format each file is read in."""
    if recipe.data.documents and not check_documents(recipe):
        return  # no question rows yet: questions.teacher writes them from the chunks once the run starts
    # prompts now; the rows are the teacher's answers
    if recipe.distill is not None and recipe.distill.teacher:
        return check_prompts(recipe)
    formats = OBJECTIVE_FORMATS[recipe.objective]
    data = recipe.data
    # a bad name or a missing file, refused even where no tokenizer is at hand yet
    if recipe.model.chat_template:
        from mlflow_finetune_plugin.models.chat_templates import read_template

        read_template(recipe.model.chat_template, _project_dir(recipe))
    files = data_files(recipe)
    if not data.tasks:
        check = functools.partial(check_data, columns=data.columns, tags=data.tags)
    else:  # a mixture: each task is a file in its own format; data.columns and data.tags describe data.train
        check = check_data
    tokenizer, why_not = tokenizer_for_check(recipe.model.name, recipe.model.revision,
                                             recipe.model.trust_remote_code, recipe.model.chat_template,
                                             _project_dir(recipe))
    errors, warnings, reports, refused = [], [], {}, []
    for label, path, fmt, system_prompt in files:
        owner, split = label.rsplit(".", 1)
        reports[label] = report = check(
            path, fmt=fmt, tokenizer=tokenizer, max_length=data.max_length, system_prompt=system_prompt,
            split=split, accepts=formats, format_key=f"{owner}.format",
            model_label=recipe.model.name or "tiny", model=recipe.model.name or "tiny",
            model_revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
            image_tokens=True)
        if problem := _method_format(recipe, label, path, report, formats):
            errors.append(problem)
            refused.append(str(path))
        if report.traces:  # read, used, left out and why: the traces behind the rows
            print(f"Traces ({label} {path}): {traces_sentence(report.traces)}", file=sys.stderr)
    for label, report in reports.items():
        train = reports.get(label.rsplit(".", 1)[0] + ".train")
        if label.endswith(".eval") and train is not None:
            check_overlap(train, report)
        if data.strict:
            report.make_strict()
        errors += summarize(report.errors)
        warnings += summarize(report.warnings)
    if recipe.adapter.type in _NO_IMAGES and any(r.images and r.images["rows"] for r in reports.values()):
        errors.append(
            f"-e {recipe.method}: the {recipe.adapter.type} adapter does not train on rows with images "
            f"({_NO_IMAGES[recipe.adapter.type]}); use -e lora, -e qlora, -e full or -e adapter")
    read = None
    if not errors:
        try:
            read = load_splits(recipe)
        except DataError as e:
            errors = summarize(e.issues)
            refused = [i.path for i in e.issues if i.path in {str(path) for _, path, _, _ in files}]
    if errors:
        bad = " ".join(dict.fromkeys(refused + [r.path for r in reports.values() if not r.ok]))
        raise FinetuneError(
            f"{len(errors)} problem{'s' if len(errors) != 1 else ''} in the data; nothing was "
            "started:\n  " + "\n  ".join(errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors)
                                                        > 20 else []))
            + (f"\nRun `mlflow-finetune data check {bad}` for the full report." if bad else ""))
    _print_formats(files, read.formats)
    if tokenizer is not None and recipe.eval.enabled:
        warnings += _cut_references(recipe, read, tokenizer)
    if warnings:
        print("Data warnings (advice before training; `data.strict: true` makes them errors):\n  "
              + "\n  ".join(warnings), file=sys.stderr)
    if why_not and tokenizer is None:
        print(f"Note: token lengths not checked before the run ({why_not}).", file=sys.stderr)
    if pictured := [f"{label} {r.images['rows']}" for label, r in reports.items()
                    if r.images and r.images["rows"] and not r.images.get("image_tokens")]:
        print(
            f"Note: rows with images ({', '.join(pictured)}): token lengths count their text only (the "
            "model's processor was not at hand); their image tokens are counted before the first step.",
            file=sys.stderr)


# Adapters that fail on a vision-language model's rows with images, and why (tried on the tiny VLMs, PEFT
# 0.21).
_NO_IMAGES = {
    "prefix": "PEFT's prefix tuning reads the text model's shape from the top-level config, which a VLM "
              "nests",
    "prompt": "the virtual tokens shift the image tokens out of the place the processor put them",
    "ia3": "PEFT has no default target modules for a vision-language model",
}


def check_documents(recipe) -> bool:
    """data.documents read and chunked as training reads them (tokens estimated: no tokenizer needed here),
    the report's summary line printed; raises when no chunk is read, when data.documents_holdout is bad, with
    data.strict when a file is unreadable or empty, and when no question rows are given and no
    questions.teacher writes them. True when data.train holds rows to check too."""
    from mlflow_finetune_plugin.data.documents import holdout_files, read_documents

    data = recipe.data
    documents = read_documents(data.documents, _project_dir(recipe), chunk_tokens=data.chunk_tokens)
    report = documents.report
    print(report.summary(), file=sys.stderr)
    if data.documents_holdout:
        holdout_files(documents.files, data.documents_holdout, recipe.train.seed)
    problems = [f"{Path(documents.root) / path}: {reason}" for path, reason in report.unreadable] + \
               [f"{Path(documents.root) / path}: empty (no text)" for path in report.empty]
    if problems and data.strict:
        raise FinetuneError(
            f"data.documents: {len(problems)} file{'s' if len(problems) != 1 else ''} not read "
            "(data.strict); nothing was started:\n  " + "\n  ".join(problems)
            + "\nFix or remove them, or set data.strict: false to go on with the others.")
    if problems:
        print("Documents not read (`data.strict: true` makes them errors):\n  " + "\n  ".join(problems),
              file=sys.stderr)
    train = data.train
    if train and (is_hf(train) or is_traces(train) or Path(train).exists()):
        return True
    teacher = recipe.questions.teacher if recipe.questions is not None else None
    if not teacher:
        raise FinetuneError(
            f"data.train: {f'file not found: {train}' if train else 'not given'}. {NO_QUESTIONS}")
    print(f"Questions: written from the chunks by questions.teacher ({teacher}) when the run starts.",
          file=sys.stderr)
    return False


def check_prompts(recipe) -> None:
    """-e distill: data.train (and data.eval) read as prompts for the teacher, every problem listed at once;
    the teacher is asked once the run starts."""
    from mlflow_finetune_plugin.data.prompts import prompt_sets, used_prompts

    try:
        sets = prompt_sets(recipe)
    except DataError as e:
        errors = summarize(e.issues)
        raise FinetuneError(
            f"{len(errors)} problem{'s' if len(errors) != 1 else ''} in the prompts for the teacher; "
            "nothing was started:\n  " + "\n  ".join(errors[:20])) from None
    for s in sets:
        print(
            f"Prompts ({s.label} {s.source}): {len(s.prompts)}, answered by {recipe.distill.teacher} when "
            f"the run starts{' (' + s.traces + ')' if s.traces else ''}", file=sys.stderr)
    used, notes = used_prompts(recipe, sets)  # a cap that leaves no training prompt is refused here
    if notes:
        print(
            f"Prompts: the run uses {len({p.key for s in used for p in s.prompts})} of them "
            f"({'; '.join(notes)})",
            file=sys.stderr)


def _cut_references(recipe, read, tokenizer) -> list[str]:
    """A warning per held-out set whose scored reference answers (the first eval.max_examples) are longer than
    eval.max_new_tokens: every contender's answer to those is cut short, and scores lower than it should."""
    budget = recipe.eval.max_new_tokens
    sets = (
        {"data.eval" if recipe.data.eval else "the held-out share of data.train": read.eval}
        if not read.is_mixture
        else {f"data.tasks.{name}": ds for name, ds in read.task_evals.items()}
    )
    warnings = []
    for label, ds in sets.items():
        if ds is None or "messages" not in ds.column_names:
            continue
        # image parts read as text: only the reference answer's length matters here
        pairs = [pair for conv in ds["messages"] if (pair := split_conversation(text_messages(conv)))
                 and pair[0]]
        pairs = pairs[: recipe.eval.max_examples]
        # The tokens an answer takes as the template has the model write it (Qwen3's empty <think></think>
        # block first), its end-of-turn token aside
        lengths = [max(len(reply_ids(tokenizer, prompt, ref)[1]) - 1, 0) for prompt, ref in pairs]
        if over := [n for n in lengths if n > budget]:
            warnings.append(
                f"{label}: {len(over)} of the {len(lengths)} reference answers scored after training are "
                f"longer than eval.max_new_tokens {budget} (up to {max(over)} tokens): every contender's "
                f"answer to them is cut short and scores lower; raise it "
                f"(-P eval.max_new_tokens={max(over) + 8})")
    return warnings


def _print_formats(files, read: dict) -> None:
    """One line with the format each file is read in, where any of them was detected rather than declared."""
    if any(fmt != read.get(label, fmt) for label, _, fmt, _ in files):
        print("Data formats, detected per file: " + ", ".join(
            f"{label} {Path(str(path)).name if Path(str(path)).exists() else path}: {read[label]}"
            for label, path, _, _ in files if label in read), file=sys.stderr)


def _method_format(recipe, label: str, path: str, report, formats) -> str | None:
    """The one-line error when the rows are in a format the method cannot train on (replacing the report's own
    format mismatch, whose advice to change data.format would not help); a note where the method's format was
    inferred from the rows (training reads that file the same way: `formats.resolve_format`, per file)."""
    rows_are = report.format or report.detected
    if rows_are and rows_are not in formats:
        report.errors = [i for i in report.errors if i.group != "format"]
        hint = _FORMAT_HINTS.get(recipe.objective,
                                 "Use the `dpo` method for preference pairs (prompt, chosen, "
                                 "rejected).")
        if label == "data.eval":  # e.g. -P data=prefs.jsonl on a recipe whose eval file is chat data
            hint += (" Or point data.eval at such rows (-P data.eval=FILE), or clear it (-P data.eval=; "
                     "-P data.eval_split=0.1 then holds out a tenth of data.train).")
        return (f"{path}: {label} is {rows_are} data, but the `{recipe.method}` method trains on "
                f"{_or(formats)} rows. ") + hint
    if report.inferred_from and label.startswith("data."):
        print(
            f"Note: data.format is {report.inferred_from!r}, but -e {recipe.method} trains on {_or(formats)} "
            f"rows and {path} holds {report.format} rows: reading them as {report.format}.", file=sys.stderr)
    return None


def _or(names) -> str:
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def _project_dir(recipe) -> str | None:
    folder = getattr(recipe, "project_dir", None)
    return str(folder) if folder else None
