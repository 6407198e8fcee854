"""Training rows with images: the processor makes the model's inputs, the chat format says which tokens train.

A vision-language processor expands each image placeholder of the rendered row (`<image>`, `<start_of_image>`,
`<|image_pad|>`) into the image's tokens and computes the pixel inputs; it knows nothing of turns. The turns come from
`models.chat_format` exactly as for text rows (any template, no `{% generation %}` markers): the row is rendered and
masked there, tokenized by the tokenizer alone, and the processor's expanded ids are aligned with those ids
(`difflib`: the expansion only inserts tokens, so every text token finds its place). Image tokens never train.

Images are read per batch (as TRL's vision collator does): a dataset holds references, not pixels.

Preference rows with images (DPO, KTO) go through TRL's own vision collators (`DataCollatorForVisionPreference`,
`DataCollatorForVisionUnpairedPreference`), which render prompt and answers with the processor's chat template and
take the images from the rows' `images` column: `with_loaded_images` gives them PIL images, read as each batch is
drawn, and `check_preference_rows` passes every row through the collator once before training.
"""

from __future__ import annotations

import json

from mlflow_finetune_plugin.data.images import load_image
from mlflow_finetune_plugin.models.image_inputs import aligned_labels

IMAGES = "images"  # the column of image references, one per `{"type": "image"}` placeholder, in order


def row_images(row: dict) -> list:
    """A row's images as PIL images (references read from disk or data URLs)."""
    return [load_image(ref) for ref in row.get(IMAGES) or []]


def with_loaded_images(dataset):
    """`dataset` whose `images` column reads as PIL images, loaded as each batch is drawn (`datasets`'
    `with_transform`; the stored column keeps its references). TRL's vision collators hand the column to the
    processor as it is: references it would read itself only where they are local paths, and with its own errors."""

    def load(batch: dict) -> dict:
        return {**batch, IMAGES: [[load_image(ref) for ref in refs or []] for refs in batch[IMAGES]]}

    return dataset.with_transform(load)


def checked_preference_rows(collator, max_length: int | None, train_ds, eval_ds) -> tuple:
    """(train, eval) preference rows with their images loaded per batch (`with_loaded_images`), every row checked
    (`check_preference_rows`) by `collator`, TRL's vision collator built without a `max_length`."""
    checked = []
    for name, ds in (("data.train", train_ds), ("data.eval", eval_ds)):
        if ds is not None:
            ds = with_loaded_images(ds)
            check_preference_rows(collator, ds, max_length, name)
        checked.append(ds)
    return tuple(checked)


def check_preference_rows(collator, dataset, max_length: int | None, name: str, batch: int = 8) -> None:
    """Every row of `dataset` (images loaded: `with_loaded_images`) through TRL's vision `collator` (built without
    `max_length`) once, before training: FinetuneError naming each row whose sequence with its image tokens is longer
    than `max_length` (TRL would cut it: through the image tokens, which fails mid-training, or through the answer,
    silently), or the row where the processor fails (an image it cannot take, placeholders and images that differ)."""
    from tqdm.auto import tqdm

    from mlflow_finetune_plugin.errors import FinetuneError

    too_long = []
    for start in tqdm(range(0, len(dataset), batch), desc=f"Checking {name} rows with their images",
                      disable=len(dataset) <= 4 * batch):
        end = min(start + batch, len(dataset))
        try:
            out = collator([dataset[i] for i in range(start, end)])  # reading a row reads its images
        except Exception:  # noqa: BLE001 - find the row: one at a time
            for i in range(start, end):
                try:
                    collator([dataset[i]])
                except Exception as e:  # noqa: BLE001 - any failure here would stop training the same way
                    raise FinetuneError(f"{name} row {i + 1}: {e}") from e
            raise
        # one sequence per row, or per answer (DPO: every chosen answer's, then every rejected one's)
        lengths = out["attention_mask"].sum(dim=1).reshape(-1, end - start).max(dim=0).values.tolist()
        too_long += [(start + i + 1, n) for i, n in enumerate(lengths) if max_length and n > max_length]
    if too_long:
        shown = ", ".join(f"row {row} ({n} tokens)" for row, n in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        raise FinetuneError(f"{name}: {len(too_long)} row(s) longer than data.max_length {max_length} with their "
                            f"image tokens: {shown}{more}. Raise data.max_length, or drop or shorten those rows.")


class VisionCollator:
    """Rows (`messages` with image placeholders, `images`, optional `tools`) to a padded batch of the processor's
    model inputs (pixel values, and whatever else the family takes: token type ids, image sizes, grids) with
    `labels` on the trained tokens only."""

    def __init__(self, processor, tokenizer, assistant_only: bool = True, max_length: int | None = None):
        self.processor, self.tokenizer = processor, tokenizer
        self.assistant_only, self.max_length = assistant_only, max_length

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        texts, text_ids, masks = [], [], []
        for example in examples:
            text, ids, mask = self.masked(example)
            texts.append(text), text_ids.append(ids), masks.append(mask)
        images = [row_images(example) for example in examples]
        out = self.processor(text=texts, images=images if any(images) else None, padding=True,
                             padding_side="right", return_tensors="pt", add_special_tokens=False)
        labels = torch.full_like(out["input_ids"], -100)
        for b, (ids, mask) in enumerate(zip(text_ids, masks)):
            expanded = out["input_ids"][b].tolist()
            real = int(out["attention_mask"][b].sum())
            if self.max_length and real > self.max_length:
                # never cut through image tokens or the answer: the data check refuses such rows before training
                raise ValueError(f"a row of {real} tokens with its images is longer than data.max_length "
                                 f"{self.max_length}; raise data.max_length or shorten the row")
            labels[b, :real] = torch.tensor(aligned_labels(ids, mask, expanded[:real]))
        out["labels"] = labels
        return out

    def check(self, dataset, name: str, batch: int = 8) -> float:
        """Every row of `dataset` collated once, in batches (tqdm): the share of tokens that train. FinetuneError
        naming the row where one fails (too long with its image tokens, an image the processor refuses)."""
        from tqdm.auto import tqdm

        from mlflow_finetune_plugin.errors import FinetuneError

        trained = total = 0
        for start in tqdm(range(0, len(dataset), batch), desc=f"Checking {name} rows with their images",
                          disable=len(dataset) <= 4 * batch):
            rows = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
            try:
                out = self(rows)
            except Exception:  # noqa: BLE001 - find the row: one at a time
                for i, row in enumerate(rows):
                    try:
                        self([row])
                    except Exception as e:  # noqa: BLE001 - any failure here would stop training the same way
                        raise FinetuneError(f"{name} row {start + i + 1}: {e}") from e
                raise
            trained += int((out["labels"] != -100).sum())
            total += int(out["attention_mask"].sum())
        return trained / total if total else 0.0

    def masked(self, example: dict) -> tuple[str, list[int], list[int]]:
        """(rendered text, its token ids, their trained mask) of one row, before the processor expands images."""
        from mlflow_finetune_plugin.models.chat_format import span_mask, trained_spans

        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        text, spans = trained_spans(self.tokenizer, example["messages"], tools)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return text, list(enc["input_ids"]), span_mask(enc["offset_mapping"], spans, self.assistant_only)
