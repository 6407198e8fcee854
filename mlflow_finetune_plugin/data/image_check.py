"""The data check's look at the images of a data file (`data/check.py` reports it): the rows read as training
reads them, every local and inline image opened and read to its end, counts and sizes, and the one error for
images given to a model that reads text only. URLs are not fetched: a warning says so."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow_finetune_plugin.data.formats import DataIssue
from mlflow_finetune_plugin.data.images import LARGE_SIDE, ImageProblem, image_size, is_url, with_references
from mlflow_finetune_plugin.data.read import training_rows

# The message fields of each format's canonical rows, in the order their images are listed.
_FIELDS = {"preference": ("prompt", "chosen", "rejected"), "unpaired_preference": ("prompt", "completion"),
           "prompt_only": ("prompt",)}


@dataclass
class ImageRows:
    # rows with images, images, URLs, and sizes where any was read
    stats: dict
    issues: list[DataIssue] = field(default_factory=list)  # errors and warnings
    records: list = field(default_factory=list)       # the (line, record) pairs whose images could be read in
    # line -> its conversations, placeholders holding their image
    conversations: dict = field(default_factory=dict)
    first_line: int | None = None                     # the first row with an image
    # line -> its row in the canonical form, as training reads it
    rows: dict = field(default_factory=dict)


def check_image_rows(path: str, fmt: str, records, system_prompt=None, tags=None) -> ImageRows:
    """The rows (valid records of a data file with images) in the canonical form, every image checked; the
    conversations of the rows that could be read, for the other checks (two rows differ where their images
    do)."""
    rows, wheres, issues = training_rows(records, fmt, path, system_prompt, tags)
    bad = {i.line for i in issues}
    kept = [(line, rec, row, where) for (line, rec), row,
            where in zip(records, rows, wheres) if line not in bad]
    stats, found = check_images(path, [(line, row["images"], where) for line, _, row, where in kept])
    fields = _FIELDS.get(fmt, ("messages",))
    convs = {}
    for line, _, row, _ in kept:
        filled = with_references([row[f] for f in fields], row["images"])
        # a preference pair is two conversations, each the prompt and one answer
        convs[line] = [filled[0] + filled[1], filled[0] + filled[2]] if len(filled) == 3 else [sum(filled,
                                                                                                   [])]
    first = next((line for line, _, row, _ in kept if row["images"]), None)
    return ImageRows(stats, issues + found, [(line, rec) for line, rec, _, _ in kept], convs, first,
                     {line: row for line, _, row, _ in kept})


def check_images(path: str, rows: list[tuple[int, list[str], list[str]]]) -> tuple[dict, list[DataIssue]]:
    """(counts and sizes, problems) of the images of `rows`, (line, references, where each was written): local
    and inline images opened and read to their end, each once; http(s) URLs counted, not fetched."""
    sizes, issues, seen = [], [], {}
    stats = {"rows": sum(bool(refs) for _, refs, _ in rows), "total": sum(len(refs) for _, refs, _ in rows),
             "urls": 0}
    for line, refs, wheres in rows:
        for ref, at in zip(refs, wheres):
            if is_url(ref):
                stats["urls"] += 1
                issues.append(DataIssue(path, line,
                                        f"{at}: {ref} is not checked offline (the collator fetches it "
                                        "at training)", "warning",
                                        group="images given as http(s) URLs are not checked offline: the "
                                              "collator fetches them at training; check they can be reached "
                                              "from there, or download them and give their paths"))
                continue
            if ref not in seen:
                try:
                    seen[ref] = image_size(ref)
                except ImageProblem as e:
                    seen[ref] = str(e)
            if isinstance(seen[ref], str):
                issues.append(DataIssue(path, line,
                                        f"{at}: {seen[ref]}: re-save it as PNG or JPEG, or drop the row"))
                continue
            w, h = seen[ref]
            sizes.append((w, h))
            if max(w, h) > LARGE_SIDE:
                issues.append(DataIssue(path, line,
                                        f"{at}: {w}×{h} px, more than {LARGE_SIDE} on a side: resized "
                                        "to the processor's limits at training", "warning",
                                        group=f"images larger than {LARGE_SIDE} px on a side: resized to the "
                                              "processor's limits at training (downscale them to save memory "
                                              "and time)"))
    if sizes:
        stats.update(min_width=min(w for w, _ in sizes), max_width=max(w for w, _ in sizes),
                     min_height=min(h for _, h in sizes), max_height=max(h for _, h in sizes))
    return stats, issues


def text_model_issue(path: str, found: ImageRows, model: str, takes: bool | None,
                     key: str) -> DataIssue | None:
    """The error for images given to a model that reads text only (`takes` False), naming the setting that
    names the model (`key`: model.name, --model); a warning where it could not be told (None)."""
    n = found.stats["rows"]
    if found.first_line is None or takes:
        return None
    if takes is None:
        return DataIssue(path, None,
                         f"could not tell whether {model} reads images (its config could not be read): "
                         "the images are checked, not whether the model takes them", "warning")
    return DataIssue(path, found.first_line,
                     f"{n} row{'s have' if n != 1 else ' has'} images (the first on this line), but {model} "
                     f"reads text only: name a vision-language model with {key} (one whose processor takes "
                     "images: SmolVLM, Qwen2-VL, LLaVA, Gemma 3 4B and up, ...), or leave the images out")


def count_image_tokens(path: str, found: ImageRows, lines: list[int], fmt: str, tokenizer, max_length: int,
                 model: str) -> tuple[dict, list[DataIssue]]:
    """(line -> tokens with its image tokens, None where refused; errors) for the rows on `lines`, counted by
    the processor attached to `tokenizer` through the collator training checks its rows with before the first
    step (`image_rows.image_token_lengths`): a row longer than `max_length` is refused there, never cut. The
    stats say the counts include image tokens, and how many images the processor scales down."""
    from mlflow_finetune_plugin.data.image_rows import image_token_lengths
    from mlflow_finetune_plugin.models.vision import processor_of

    rows = [found.rows[line] for line in lines]
    lengths, sizes = image_token_lengths(processor_of(tokenizer), tokenizer, fmt, rows)
    counted, issues = {}, []
    for line, n in zip(lines, lengths):
        counted[line] = n if isinstance(n, int) else None
        if not isinstance(n, int):
            why = (str(n).splitlines() or [type(n).__name__])[0][:200]
            issues.append(DataIssue(path, line,
                                    f"the processor of {model} refuses this row ({why}): training would "
                                    "stop on it; fix its images or placeholders, or drop the row"))
        elif max_length and n > max_length:
            issues.append(DataIssue(path, line,
                                    f"{n} tokens with its image tokens, more than max_length {max_length}: "
                                    "training refuses it; raise data.max_length, or shorten the row",
                                    group=f"longer than max_length {max_length} with their image tokens "
                                          f"({model}'s processor): training refuses them before its first "
                                          "step (rows are never cut through their image tokens or their "
                                          "answer); raise data.max_length (--max-length), or drop or shorten "
                                          "these rows"))
    found.stats.update(image_tokens=model, resized=sizes.note())
    return counted, issues


def render_images(stats: dict) -> list[str]:
    """The report's lines on images: counts, sizes, and what the token counts leave out."""
    sizes = (f", widths {stats['min_width']}-{stats['max_width']} px, heights {stats['min_height']}-"
             f"{stats['max_height']} px" if "min_width" in stats else "")
    urls = f", {stats['urls']} http(s) URLs not checked offline" if stats["urls"] else ""
    rows = stats["rows"]
    lines = [f"  images          {stats['total']} in {rows} row{'s' if rows != 1 else ''}{sizes}{urls}"]
    if rows and stats.get("image_tokens"):
        lines.append(
            f"  image tokens    counted with the processor of {stats['image_tokens']}, as training counts "
            "them before its first step")
        if stats.get("resized"):
            lines.append(f"  image sizes     {stats['resized']}")
    elif rows:
        lines.append(
            f"  image tokens    {rows} row{'s have' if rows != 1 else ' has'} images: their image tokens "
            "come on top of the text tokens counted here, and are counted when the processor is known "
            "(`mlflow-finetune data check --model` a vision-language model)")
    return lines
