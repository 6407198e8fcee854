"""Images in training data: every form users write them in, read into one canonical form, and its references
loaded or checked.

The canonical form (what `data.read.load_training_dataset` gives; the training collator and evaluation read
it): each message's content is a list of parts, text as {"type": "text", "text": ...} and each image as the
placeholder {"type": "image"} where it stands; the row's `images` column holds one reference per placeholder,
in order of appearance (fields prompt, chosen, rejected / prompt, completion in that order, messages in order,
parts in order): an absolute local path, a `data:image/...;base64,...` URL (images given inline: base64,
bytes, a datasets Image feature, PIL images), or an http(s) URL as written (fetched at training). Rows without
images have `[]`. A dataset with no image at all keeps string contents and has no `images` column.

The forms read: OpenAI parts ({"type": "image_url", "image_url": {"url": ...}}, or "image_url": "..."),
transformers' parts ({"type": "image", "path" | "url" | "image" | "base64": ...}), TRL's `images` (or `image`)
column with {"type": "image"} placeholders (or, as TRL does, with string contents only: the images go before
the first user message's text), LLaMA-Factory's `<image>` markers in the text with an `images` column, and
datasets' Image feature ({"bytes", "path"} dicts, or PIL images). Relative paths are read from the data file's
folder, not the working one.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow_finetune_plugin.data.formats import DataIssue, json_type
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.messages import image_count, text_of
from mlflow_finetune_plugin.models.image_inputs import open_image, read_image

IMAGE_COLUMNS = ("images", "image")  # TRL reads either; LLaMA-Factory's column is `images`
MARKER = "<image>"  # LLaMA-Factory / ShareGPT: where an image stands in a message's text
PLACEHOLDER = {"type": "image"}
LARGE_SIDE = 4096  # px: above this on a side, the processor resizes the image at training
# The fields of a raw record that may hold messages with image parts.
_RAW_FIELDS = ("messages", "conversations", "prompt", "completion", "chosen", "rejected")
_TEXT_TYPES = ("text", "input_text")
_URL_TYPES = ("image_url", "input_image")
_IMAGE_KEYS = ("path", "url", "image", "base64")  # transformers' image part: where its image is
_DATA_URL = re.compile(r"data:image/[\w.+-]+(;[\w.+=-]+)*;base64,", re.I)
_COLUMN = object()  # a placeholder filled from the row's image column


class ImageProblem(ValueError):
    """One image reference that cannot be used; the message says why (the caller says where)."""


# ---------------------------------------------------------------- what a row holds


def column_images(rec: dict) -> tuple[str, list]:
    """(the column's name, its images as a list) of a raw record: `images` (a list, or one image), else
    `image`."""
    for name in IMAGE_COLUMNS:
        if name in rec:
            value = rec[name]
            if value is None or (isinstance(value, str) and not value.strip()):  # an empty CSV cell
                return name, []
            return name, list(value) if isinstance(value, (list, tuple)) else [value]
    return IMAGE_COLUMNS[0], []


def has_images(ds_or_rows) -> bool:
    """Whether a datasets.Dataset (its `images`/`image` column) or rows (records, (line, record) pairs or
    canonical rows) hold any image."""
    names = getattr(ds_or_rows, "column_names", None)
    if names is not None:  # read as Arrow: an Image feature is not decoded just to be counted
        columns = [ds_or_rows.with_format("arrow")[name].to_pylist() for name in IMAGE_COLUMNS
                   if name in names]
        return any(v not in (None, [], "") for column in columns for v in column)
    for row in ds_or_rows:
        rec = row[1] if isinstance(row, tuple) else row
        if column_images(rec)[1] or any(_image_parts(rec.get(f)) for f in _RAW_FIELDS):
            return True
    return False


def _image_parts(messages) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(image_count(m.get("content")) for m in messages if isinstance(m, dict))


def part_problem(part) -> str | None:
    """What is wrong with one part of a list content (its shape only; the image itself is checked later), or
    None."""
    if isinstance(part, str):
        return None
    if not isinstance(part, dict):
        return f"must be a part object ({{type: text, text}} or an image part), got {json_type(part)}"
    kind = part.get("type")
    if kind in _TEXT_TYPES or (kind is None and "text" in part):
        return None if isinstance(part.get("text"), str) else "a text part needs 'text' (a string)"
    if kind in _URL_TYPES:
        return None if _url_of(part) else f"an {kind} part needs 'image_url': {{url: PATH or URL}}"
    if kind == "image":
        return None
    return (f"part type {kind!r} is not supported: use text, image or image_url parts" if kind is not None
            else "a part needs a 'type' (text, image or image_url)")


def _url_of(part: dict):
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


# ---------------------------------------------------------------- references


def image_reference(value, base: Path, base64_text: bool = False) -> str:
    """The canonical reference of one image as written: an absolute path (relative ones read from `base`), an
    http(s) URL as it is, or a data URL (inline images: bytes, PIL images, datasets' {"bytes", "path"}, base64
    text where `base64_text`). ImageProblem says why a value is none of these."""
    if isinstance(value, dict):  # datasets' Image feature, not decoded: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return _bytes_url(bytes(value["bytes"]))
        for key in ("path", "url"):
            if isinstance(value.get(key), str) and value[key].strip():
                return image_reference(value[key], base)
        raise ImageProblem(
            f"an image object needs 'bytes', 'path' or 'url'; it has {sorted(value) or 'no keys'}")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _bytes_url(bytes(value))
    if type(value).__module__.startswith("PIL."):  # datasets' Image feature, decoded
        return _pil_url(value)
    if not isinstance(value, str):
        raise ImageProblem(f"an image must be a path, an http(s) URL, a data URL or base64 text, got "
                           f"{json_type(value)}")
    ref = value.strip()
    head = ref[:8].lower()
    if not ref:
        raise ImageProblem("the image reference is empty")
    if head.startswith("data:"):
        if not _DATA_URL.match(ref):
            raise ImageProblem(f"{short(ref)} is not an image data URL: write data:image/TYPE;base64,DATA")
        return ref
    if head.startswith(("http://", "https:/")):
        return ref
    if base64_text:
        return _bytes_url(_b64decode(ref))
    if head.startswith("file://"):
        ref = unquote(urlparse(ref).path)
    path = Path(ref).expanduser()
    return os.path.normpath(path if path.is_absolute() else Path(base).absolute() / path)


def is_url(ref: str) -> bool:
    return ref[:8].lower().startswith(("http://", "https:/"))


def short(ref: str) -> str:
    """A reference as messages show it: a data URL cut to its head."""
    return f"{ref[:32]}... ({len(ref)} characters)" if ref.startswith("data:") and len(ref) > 48 else ref


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageProblem(f"{short(text)!r} is not valid base64 text") from None


def _bytes_url(data: bytes) -> str:
    from PIL import Image

    try:
        # reads the header only: which format, for the data URL's type
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except Exception:  # noqa: BLE001 - PIL raises several types for bytes that are no image
        raise ImageProblem(f"{len(data)} bytes that are not an image PIL can read") from None
    mime = Image.MIME.get(fmt, f"image/{str(fmt).lower()}")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _pil_url(im) -> str:
    """A decoded image as a PNG data URL (lossless; the file it came from is not known here)."""
    buf = io.BytesIO()
    (im if im.mode in ("1", "L", "LA", "P", "RGB", "RGBA") else im.convert("RGB")).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def load_image(ref):
    """The image a canonical reference names (path, data URL or http(s) URL) as an RGB PIL image
    (`models.image_inputs.read_image`); FinetuneError naming the reference, and what to do, when it is missing
    or cannot be decoded. A PIL image is returned converted."""
    try:
        return read_image(ref)
    except FileNotFoundError:
        raise FinetuneError(f"image not found: {ref}; fix the path in the data, or put the image "
                            "there") from None
    except ValueError as e:
        raise FinetuneError(
            f"cannot load the image {short(str(ref))}: {_why(e.__cause__ or e)}; re-save it as PNG or "
            "JPEG, or drop its row (`mlflow-finetune data check FILE` lists every such image)") from None


def image_size(ref: str) -> tuple[int, int]:
    """(width, height) of a local or data-URL image, read to its end so a truncated or corrupt file is caught;
    ImageProblem says why it cannot be used."""
    try:
        with open_image(ref) as im:
            size = im.size
            # JPEG: decode at 1/8 scale, whole file
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    except FileNotFoundError:
        raise ImageProblem(f"image file not found: {ref}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageProblem(f"cannot decode the image {short(ref)} ({_why(e)})") from None
    return size


def _why(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


# ---------------------------------------------------------------- to the canonical form


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _parts(content, markers: bool, where: str) -> tuple[list | None, list[tuple], list[str]]:
    """(canonical parts, one slot per image: (where, value or _COLUMN, base64 text?), problems) of one
    content."""
    if content is None:  # an assistant message with tool calls only
        return None, [], []
    if isinstance(content, str):
        if not (markers and MARKER in content):
            return [_text(content)], [], []
        parts, slots = [], []
        for k, piece in enumerate(content.split(MARKER)):
            if k:
                parts.append(dict(PLACEHOLDER))
                slots.append((f"{where} ({MARKER} {k})", _COLUMN, False))
            if piece:
                parts.append(_text(piece))
        return parts, slots, []
    items = [content] if isinstance(content, dict) else content if isinstance(content, list) else []
    parts, slots, problems = [], [], []
    for j, part in enumerate(items):
        at = f"{where}[{j}]"
        if problem := part_problem(part):
            problems.append(f"{at}: {problem}")
        elif isinstance(part, str):
            parts.append(_text(part))
        elif part.get("type") in _URL_TYPES:
            parts.append(dict(PLACEHOLDER))
            slots.append((at, _url_of(part), False))
        elif part.get("type") == "image":
            key = next((k for k in _IMAGE_KEYS if part.get(k) not in (None, "")), None)
            parts.append(dict(PLACEHOLDER))
            slots.append((at, part[key] if key else _COLUMN, key == "base64"))
        else:
            parts.append(_text(part["text"]))
    return parts, slots, problems


def canonical_row(row: dict, fields, column: list, base: Path, markers: bool = False,
                  column_name: str = "images", image_fields=None) -> tuple[dict, list[str], list[str]]:
    """(the row in the canonical form, where each of its images was written, problems) of one row whose
    message `fields` hold chat messages: parts with placeholders, and `images` in the order the placeholders
    appear.

    `column`: the row's image column (raw values), filling the bare placeholders in order; `markers`:
    `<image>` in
    text is a placeholder (the dataset has an image column); `image_fields`: the fields images may stand in
    (the prompt of preference data), all where None."""
    out, slots, problems, strings_only = dict(row), [], [], True
    for field in fields:
        if not isinstance(row.get(field), list):
            continue
        messages = []
        for i, m in enumerate(row[field]):
            if not isinstance(m, dict):
                messages.append(m)
                continue
            content = m.get("content")
            strings_only = strings_only and not isinstance(content, (list, dict))
            parts, found, errors = _parts(content, markers, f"{field}[{i}].content")
            problems += errors
            if found and m.get("role") == "tool":
                problems.append(
                    f"{field}[{i}]: an image in a tool message (TRL's collator fills images in user, "
                    "assistant and system messages only): move it to a user message")
            elif found and image_fields is not None and field not in image_fields:
                problems.append(f"{field}[{i}]: an image in '{field}': images go in the prompt ("
                                f"{', '.join(image_fields)}), which every answer shares; move it there")
            slots += found
            messages.append({**m, "content": parts})
        out[field] = messages
    if not slots and column and strings_only:  # TRL's rule: images before the first user message's text
        first = next(((f, i) for f in fields if isinstance(out.get(f), list) for i, m in enumerate(out[f])
                      if isinstance(m, dict) and m.get("role") == "user"), None)
        if first is None:
            return out, [], problems + [
                f"{len(column)} image(s) in '{column_name}' but no user message to put "
                "them in: add a {\"type\": \"image\"} placeholder where each goes"]
        f, i = first
        out[f][i] = {**out[f][i], "content": [dict(PLACEHOLDER) for _ in column] + (out[f][i]["content"]
                                                                                    or [])}
        slots = [(f"{f}[{i}].content", _COLUMN, False) for _ in column]
    bare = sum(value is _COLUMN for _, value, _ in slots)
    if bare != len(column):
        problems.append(_count_problem(bare, len(column), column_name))
    if problems:
        return out, [], problems
    refs, wheres, filling = [], [], iter(enumerate(column))
    for at, value, b64 in slots:
        if value is _COLUMN:
            k, value = next(filling)
            at = f"{column_name}[{k}]"
        try:
            ref = image_reference(value, base, b64)
        except ImageProblem as e:
            problems.append(f"{at}: {e}")
            continue
        if not ref.startswith("data:") and not is_url(ref) and not os.path.isfile(ref):
            problems.append(f"{at}: image file not found: {ref}" + (
                f" (written {value!r}: relative paths are read from the data file's folder)"
                if isinstance(value, str) and not Path(value).expanduser().is_absolute() else "")
                + "; fix the path, or put the image there")
        refs.append(ref)
        wheres.append(at)
    out.pop("image", None)
    out["images"] = refs
    return out, wheres, problems


def _count_problem(placeholders: int, images: int, column: str) -> str:
    what = (
        f"{placeholders} image placeholder{'s' if placeholders != 1 else ''} ({{\"type\": \"image\"}} parts "
        f"or {MARKER} markers) but {images} image{'s' if images != 1 else ''} in '{column}'")
    if placeholders > images:
        return (f"{what}: add the missing images to '{column}' (one per placeholder, in order), or drop "
                "placeholders")
    return (
        f"{what}: put a placeholder where each image goes (a {{\"type\": \"image\"}} part, or {MARKER} in "
        f"the text), in the order of '{column}', or drop the extra images")


def canonical_rows(rows: list[dict], records, path, fields, base: Path, image_fields=None
                   ) -> tuple[list[dict], list[list[str]], list[DataIssue]]:
    """Every row (built from `records`, the (line, record) pairs it was read from, in order) in the canonical
    form, where each image was written, and the problems by line; `<image>` markers count where any row has an
    image column."""
    markers = any(name in rec for _, rec in records for name in IMAGE_COLUMNS)
    out, wheres, issues = [], [], []
    for row, (line, rec) in zip(rows, records):
        name, column = column_images(rec)
        canon, where, problems = canonical_row(row, fields, column, base, markers, name, image_fields)
        out.append(canon)
        wheres.append(where)
        issues += [DataIssue(str(path), line, p) for p in problems]
    return out, wheres, issues


def text_contents(row: dict, fields) -> dict:
    """A text-only row with list-of-parts contents given as strings (the text parts joined): data without
    images keeps one form, string contents."""
    out = dict(row)
    for field in fields:
        if isinstance(row.get(field), list):
            out[field] = [{**m, "content": text_of(m["content"])} if isinstance(m, dict)
                          and isinstance(m.get("content"), (list, dict)) else m for m in row[field]]
    return out


def with_references(conversations: list[list[dict]], refs: list[str]) -> list[list[dict]]:
    """The conversations with each placeholder holding its image ({"type": "image", "image": REF}, as TRL
    fills them), consumed in order across the conversations: two rows differ when their images do."""
    filling, out = iter(refs), []
    for messages in conversations:
        out.append([{**m, "content": [{**p, "image": next(filling, None)} if p.get("type") == "image" else p
                                      for p in m["content"]]}
                    if isinstance(m, dict) and isinstance(m.get("content"), list) else m for m in messages])
    return out


def in_image_form(ds, like):
    """A text-only dataset in the canonical form of `like`, a dataset with images (its features): contents as
    text parts, `images` []; so that a mixture's tasks with and without images interleave (one Arrow type per
    column). Raises what datasets raises where the rows differ otherwise (other columns, other message
    keys)."""
    from datasets import Dataset

    fields = [f for f in ("messages", "prompt", "completion", "chosen", "rejected") if f in ds.column_names]
    rows = [{**row, "images": [], **{f: [{**m, "content": [_text(m["content"])]}
                                         if isinstance(m, dict) and isinstance(m.get("content"), str) else m
                                         for m in row[f]] for f in fields if isinstance(row[f], list)}}
            for row in ds.to_list()]
    return Dataset.from_list(rows, features=like.features)
