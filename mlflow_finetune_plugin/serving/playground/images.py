"""Images in the playground: what a user uploads (or sends `/compare` as a data URL) is copied once, named by
its content, into `cache_root()/playground/images/`, and both sides answer one user message holding those
copies as OpenAI `image_url` parts.

The copy outlives Gradio's temporary uploads (Gradio may delete them; a comparison waits for its vote for as
long as the page is open) and is what the engine reads. It is not the record: a vote logs the images to its
own MLflow run (`arena.votes.log_vote`), so the vote keeps them wherever the tracking server is, after this
cache is cleared.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import tempfile
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.messages import text_of

# per image: a photo is a few MB; the processor shrinks it to a few hundred pixels
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGES = 4                # per message: each image is hundreds of tokens in a small model's context
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif"}  # the others: the format's name in lower case


def image_folder() -> Path:
    from mlflow_finetune_plugin.paths import cache_root

    return cache_root() / "playground" / "images"


def store_image(source: str) -> str:
    """The path of the stored copy of `source` (a local file, or a `data:image/...;base64,` URL):
    `image_folder()/<sha256 of the bytes>.<format>`, written once. FinetuneError when it is no image PIL can
    read or is larger than MAX_IMAGE_BYTES."""
    data, shown = _read(source)
    if len(data) > MAX_IMAGE_BYTES:
        raise FinetuneError(
            f"the image {shown} is {len(data) / 2**20:.1f} MB; the playground takes images of at most "
            f"{MAX_IMAGE_BYTES // 2**20} MB: send a smaller one")
    fmt = _image_format(data, shown)
    folder = image_folder()
    dest = folder / f"{hashlib.sha256(data).hexdigest()}.{_EXTENSIONS.get(fmt, fmt.lower())}"
    if not dest.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)  # renamed into place: never a partial file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    return str(dest)


def store_images(sources) -> list[str]:
    """`store_image` of each source, in order; FinetuneError over MAX_IMAGES."""
    sources = list(sources or [])
    if len(sources) > MAX_IMAGES:
        raise FinetuneError(f"{len(sources)} images: the playground takes at most {MAX_IMAGES} per message")
    return [store_image(s) for s in sources]


def user_message(text: str, images: list[str]) -> dict:
    """The user message both sides answer: the images (stored paths) as OpenAI `image_url` parts before the
    text, as the vision recipes' rows have them; text alone stays a string."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": path}}
                                          for path in images), {"type": "text", "text": text}]}


def pane_files(content) -> list[str]:
    """The paths of the files a chat pane's message shows (Gradio's `{"type": "file", "file": {"path": ...}}`
    parts of a message read back from the page)."""
    if not isinstance(content, list):
        return []
    return [p["file"]["path"] for p in content
            if isinstance(p, dict) and p.get("type") == "file" and isinstance(p.get("file"), dict)]


def from_pane(message: dict) -> dict:
    """A pane's earlier message as the model was sent it: its images (stored again, by content: the same copy)
    and its text."""
    files = pane_files(message.get("content"))
    text = text_of([p for p in message["content"] if p.get("type") != "file"] if files
                   else message.get("content"))
    if not files:
        return {"role": message["role"], "content": text}
    return {**user_message(text, store_images(files)), "role": message["role"]}


def _read(source: str) -> tuple[bytes, str]:
    """(the bytes of an image source, how to name it in a message)."""
    source = str(source)
    if source[:5].lower() == "data:":
        head, _, payload = source.partition(",")
        shown = f"{head[:40]}..."
        if not head.lower().startswith("data:image/") or not head.lower().endswith(";base64"):
            raise FinetuneError(f"{shown} is not an image data URL: send data:image/TYPE;base64,DATA")
        try:
            return base64.b64decode("".join(payload.split()), validate=True), shown
        except (binascii.Error, ValueError):
            raise FinetuneError(f"{shown}: the data URL's base64 text is not valid") from None
    try:
        return Path(source).read_bytes(), Path(source).name
    except OSError as e:
        raise FinetuneError(
            f"cannot read the uploaded image {Path(source).name}: {e.strerror or e}; upload it "
            "again") from None


def _image_format(data: bytes, shown: str) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # the whole file, not only its header: a truncated upload is refused here
            return str(im.format)
    except Exception:  # noqa: BLE001 - PIL raises many types for bytes that are no (whole) image
        raise FinetuneError(f"{shown} is not an image the playground can read: send a PNG, JPEG, WebP or GIF "
                            "file") from None
