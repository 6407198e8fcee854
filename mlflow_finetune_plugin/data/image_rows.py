"""Training rows with images: the processor makes the model's inputs, the chat format says which tokens train.

A vision-language processor expands each image placeholder of the rendered row (`<image>`, `<start_of_image>`,
`<|image_pad|>`) into the image's tokens and computes the pixel inputs; it knows nothing of turns. The turns
come from `models.chat_format` exactly as for text rows (any template, no `{% generation %}` markers): the row
is rendered and masked there, tokenized by the tokenizer alone, and the processor's expanded ids are aligned
with those ids (`difflib`: the expansion only inserts tokens, so every text token finds its place). Image
tokens never train.

Images are read per batch (as TRL's vision collator does): a dataset holds references, not pixels.

Preference rows with images (DPO, KTO) go through TRL's own vision collators
(`DataCollatorForVisionPreference`, `DataCollatorForVisionUnpairedPreference`), which render prompt and
answers with the processor's chat template and take the images from the rows' `images` column:
`with_loaded_images` gives them PIL images, read as each batch is
drawn, and `check_preference_rows` passes every row through the collator once before training.

Both pre-run checks walk the rows with `collated`, and so does `mlflow-finetune data check --model`
(`image_token_lengths`), so the data check counts a row's image tokens as the run does. The images read on the
way are measured against the processor's size (`ImageSizes`): the run says once how many it scales down, and
to what.
"""

from __future__ import annotations

import json

from mlflow_finetune_plugin.data.images import load_image
from mlflow_finetune_plugin.models.image_inputs import aligned_labels
from mlflow_finetune_plugin.models.image_limits import resize_limit

IMAGES = "images"  # the column of image references, one per `{"type": "image"}` placeholder, in order


def row_images(row: dict) -> list:
    """A row's images as PIL images (references read from disk or data URLs)."""
    return [load_image(ref) for ref in row.get(IMAGES) or []]


def with_loaded_images(dataset):
    """`dataset` whose `images` column reads as PIL images, loaded as each batch is drawn (`datasets`'
    `with_transform`; the stored column keeps its references). TRL's vision collators hand the column to the
    processor as it is: references it would read itself only where they are local paths, and with its own
    errors."""

    def load(batch: dict) -> dict:
        return {**batch, IMAGES: [[load_image(ref) for ref in refs or []] for refs in batch[IMAGES]]}

    return dataset.with_transform(load)


def preference_collator(processor, fmt: str):
    """TRL's vision collator for preference rows (`preference`: DPO's, `unpaired_preference`: KTO's), built
    without a `max_length` (`check_preference_rows` refuses the rows it would cut); None for other formats."""
    if fmt == "preference":
        from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

        return DataCollatorForVisionPreference(processor=processor)
    if fmt == "unpaired_preference":
        from trl.trainer.kto_trainer import DataCollatorForVisionUnpairedPreference

        return DataCollatorForVisionUnpairedPreference(processor=processor, calculate_kl=False)
    return None


def checked_preference_rows(collator, max_length: int | None, train_ds, eval_ds) -> tuple:
    """(train, eval) preference rows with their images loaded per batch (`with_loaded_images`), every row
    checked (`check_preference_rows`) by `collator`, TRL's vision collator built without a `max_length`. The
    run says once how many images the processor scales down (`ImageSizes`)."""
    checked, sizes = [], ImageSizes(getattr(collator, "processor", None))
    for name, ds in (("data.train", train_ds), ("data.eval", eval_ds)):
        if ds is not None:
            ds = with_loaded_images(ds)
            check_preference_rows(collator, ds, max_length, name, sizes=sizes)
        checked.append(ds)
    if note := sizes.note():
        print(note)
    return tuple(checked)


def check_preference_rows(collator, dataset, max_length: int | None, name: str, batch: int = 8,
                          sizes: ImageSizes | None = None) -> None:
    """Every row of `dataset` (images loaded: `with_loaded_images`) through TRL's vision `collator` (built
    without `max_length`) once, before training: FinetuneError naming each row whose sequence with its image
    tokens is longer than `max_length` (TRL would cut it: through the image tokens, which fails mid-training,
    or through the answer, silently), or the row where the processor fails (an image it cannot take,
    placeholders and images that differ)."""
    from mlflow_finetune_plugin.errors import FinetuneError

    def collate(indices: list[int]):
        rows = [dataset[i] for i in indices]  # reading a row reads its images
        if sizes is not None:
            sizes.add(name, indices, [row[IMAGES] for row in rows])
        return collator(rows)

    too_long = []
    for indices, out in collated(collate, len(dataset), name, batch):
        if isinstance(out, Exception):  # any failure here would stop training the same way
            raise FinetuneError(f"{name} row {indices[0] + 1}: {out}") from out
        too_long += [(i + 1, n) for i, n in zip(indices,
                                                row_lengths(out,
                                                            len(indices))) if max_length and n > max_length]
    if too_long:
        shown = ", ".join(f"row {row} ({n} tokens)" for row, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        raise FinetuneError(
            f"{name}: {len(too_long)} row(s) longer than data.max_length {max_length} with their "
            f"image tokens: {shown}{more}. Raise data.max_length, or drop or shorten those rows.")


def collated(collate, n: int, name: str, batch: int = 8, batches_fail: bool = True):
    """Rows 0..n-1 through `collate` (a function of row indices) once, in batches (tqdm): yields (indices, the
    collated batch) for each batch that collates, and where a batch fails, each of its rows alone: ([index],
    the batch or the exception). The pre-run checks raise on the first exception; the data check reports each
    by line. A batch that fails while each of its rows collates alone raises its error where `batches_fail`
    (training draws batches)."""
    from tqdm.auto import tqdm

    for start in tqdm(range(0, n, batch), desc=f"Checking {name} rows with their images",
                      disable=n <= 4 * batch):
        indices = list(range(start, min(start + batch, n)))
        try:
            out = collate(indices)
        except Exception as batch_error:  # noqa: BLE001 - find the row: one at a time
            alone = []
            for i in indices:
                try:
                    alone.append(([i], collate([i])))
                except Exception as e:  # noqa: BLE001 - the caller raises it or reports it by line
                    alone.append(([i], e))
            if batches_fail and not any(isinstance(out, Exception) for _, out in alone):
                raise batch_error
            yield from alone
            continue
        yield indices, out


def row_lengths(out: dict, rows: int) -> list[int]:
    """Each row's tokens with its image tokens in a collated batch of `rows` rows: one sequence per row, or
    per answer (DPO: every chosen answer's, then every rejected one's), the longest counted."""
    return out["attention_mask"].sum(dim=1).reshape(-1, rows).max(dim=0).values.tolist()


def image_token_lengths(processor, tokenizer, fmt: str, rows: list[dict], assistant_only: bool = True
                        ) -> tuple[list, ImageSizes]:
    """What the pre-run check counts, for `mlflow-finetune data check`: each canonical row's tokens with its
    image tokens (or the exception where the template or the processor refuses the row), through the collator
    training uses (`VisionCollator`, or TRL's for preference rows), and the images' sizes against the
    processor's."""
    sizes = ImageSizes(processor)
    trl_collator = preference_collator(processor, fmt)
    collator = VisionCollator(processor, tokenizer, assistant_only)

    def collate(indices: list[int]):
        images = [row_images(rows[i]) for i in indices]
        sizes.add("rows", indices, images)
        if trl_collator is None:
            return collator.collate([rows[i] for i in indices], images)
        return trl_collator([{**rows[i], IMAGES: found} for i, found in zip(indices, images)])

    lengths: list = [None] * len(rows)
    for indices, out in collated(collate, len(rows), "the", batches_fail=False):
        got = [out] if isinstance(out, Exception) else row_lengths(out, len(indices))
        for i, n in zip(indices, got):
            lengths[i] = n
    return lengths, sizes


class ImageSizes:
    """The sizes of the images a check reads, against the size the processor resizes to
    (`models.image_limits.resize_limit`): `note()` is the run's one line on the images it scales down."""

    def __init__(self, processor):
        self.limit = resize_limit(processor) if processor is not None else None
        self.seen: dict = {}  # (split, row) -> the row's (width, height) sizes

    def add(self, split: str, indices: list[int], images: list[list]) -> None:
        for i, found in zip(indices, images):
            self.seen[split, i] = [image.size for image in found]

    def larger(self) -> tuple[int, int]:
        """(images larger than the processor's size, images)."""
        sizes = [size for found in self.seen.values() for size in found]
        return sum(self.limit.larger(*size) for size in sizes) if self.limit else 0, len(sizes)

    def note(self) -> str | None:
        larger, total = self.larger()
        if not larger:
            return None
        return (f"{larger} of {total} images are larger than the processor's size: resized down to "
                f"{self.limit.text} before they reach the model (downscale them beforehand to save reading "
                "time)")


class VisionCollator:
    """Rows (`messages` with image placeholders, `images`, optional `tools`) to a padded batch of the
    processor's model inputs (pixel values, and whatever else the family takes: token type ids, image sizes,
    grids) with `labels` on the trained tokens only."""

    def __init__(self, processor, tokenizer, assistant_only: bool = True, max_length: int | None = None):
        self.processor, self.tokenizer = processor, tokenizer
        self.assistant_only, self.max_length = assistant_only, max_length
        self.sizes = ImageSizes(processor)

    def __call__(self, examples: list[dict]) -> dict:
        return self.collate(examples, [row_images(example) for example in examples])

    def collate(self, examples: list[dict], images: list[list]) -> dict:
        """The batch of `examples` whose images (PIL, one list per row) are read already."""
        import torch

        texts, text_ids, masks = [], [], []
        for example in examples:
            text, ids, mask = self.masked(example)
            texts.append(text), text_ids.append(ids), masks.append(mask)
        out = self.processor(text=texts, images=images if any(images) else None, padding=True,
                             padding_side="right", return_tensors="pt", add_special_tokens=False)
        labels = torch.full_like(out["input_ids"], -100)
        for b, (ids, mask) in enumerate(zip(text_ids, masks)):
            expanded = out["input_ids"][b].tolist()
            real = int(out["attention_mask"][b].sum())
            if self.max_length and real > self.max_length:
                # never cut through image tokens or the answer: the data check refuses such rows before
                # training
                raise ValueError(f"a row of {real} tokens with its images is longer than data.max_length "
                                 f"{self.max_length}; raise data.max_length or shorten the row")
            labels[b, :real] = torch.tensor(aligned_labels(ids, mask, expanded[:real]))
        out["labels"] = labels
        return out

    def check(self, dataset, name: str, batch: int = 8) -> float:
        """Every row of `dataset` collated once, in batches (tqdm): the share of tokens that train.
        FinetuneError naming the row where one fails (too long with its image tokens, an image the processor
        refuses). The images' sizes go to `self.sizes` (`ImageSizes`: the run says once how many the processor
        scales down)."""
        from mlflow_finetune_plugin.errors import FinetuneError

        def collate(indices: list[int]):
            rows = [dataset[i] for i in indices]
            images = [row_images(row) for row in rows]
            self.sizes.add(name, indices, images)
            return self.collate(rows, images)

        trained = total = 0
        for indices, out in collated(collate, len(dataset), name, batch):
            if isinstance(out, Exception):  # any failure here would stop training the same way
                raise FinetuneError(f"{name} row {indices[0] + 1}: {out}") from out
            trained += int((out["labels"] != -100).sum())
            total += int(out["attention_mask"].sum())
        return trained / total if total else 0.0

    def masked(self, example: dict) -> tuple[str, list[int], list[int]]:
        """(rendered text, its token ids, their trained mask) of one row, before the processor expands
        images."""
        from mlflow_finetune_plugin.models.turn_spans import span_mask, trained_spans

        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        text, spans = trained_spans(self.tokenizer, example["messages"], tools)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return text, list(enc["input_ids"]), span_mask(enc["offset_mapping"], spans, self.assistant_only)
