"""Images in traced model calls (docs/traces.md, "Images"): a traced message's image parts as the project's
parts, and the images MLflow keeps beside a trace read back as data URLs.

MLflow (3.17) stores an image sent as a data URL in a span's inputs (`mlflow.openai.autolog()`'s spans, and
`serve --trace`'s, which set the request as inputs) as an attachment of the trace, and puts a reference in its
place: `mlflow-attachment://<id>?content_type=image/png&trace_id=tr-...&size=...`. The bytes come back only
through a private call, `attachment_bytes` below, the one place that makes it. An image sent as an http(s) URL
stays in the span as written (fetched at training); with MLFLOW_TRACE_EXTRACT_ATTACHMENTS=false the data URL
itself does.

The images are held in memory as data URLs in the rows, never written anywhere by this module.
"""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlparse

from mlflow_finetune_plugin.errors import FinetuneError

SCHEME = "mlflow-attachment"
_TEXT_TYPES = ("text", "input_text")      # Chat Completions' and Responses' text parts
# their image parts: {"image_url": {"url": ...}} / {"image_url": "..."}
_IMAGE_TYPES = ("image_url", "input_image")


class NoImage(ValueError):
    """An image a trace names but does not hold (its attachment missing, or a file path). MLflow marks the
    span of an image it dropped for its size (MLFLOW_TRACE_MAX_ATTACHMENT_SIZE) failed: such a call is read as
    failed."""


def content_parts(content) -> list[dict] | None:
    """A traced message's list content as OpenAI chat parts ({"type": "text"} and {"type": "image_url"}, the
    url as traced), or None where a part is neither text nor an image (audio, files)."""
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_TYPES or kind is None and isinstance(part, dict) and "text" in part:
            if not isinstance(part.get("text"), str):
                return None
            parts.append({"type": "text", "text": part["text"]})
        elif kind in _IMAGE_TYPES:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                return None
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            return None
    return parts


def has_image(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) and any(p["type"] == "image_url" for p in m["content"])
               for m in messages)


def with_images(messages: list[dict], trace_info) -> list[dict]:
    """The messages with each image as a data URL (an attachment of the trace read back) or an http(s) URL;
    NoImage says which image the trace does not hold."""
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            m = {**m, "content": [{"type": "image_url", "image_url": {"url": image_url(p["image_url"]["url"],
                                                                                     trace_info)}}
                                  if p["type"] == "image_url" else p for p in m["content"]]}
        out.append(m)
    return out


def image_url(url: str, trace_info) -> str:
    """A traced image reference as a data URL (or an http(s) URL, as it is)."""
    head = url[:24].lower()
    if head.startswith(("data:image/", "http://", "https://")):
        return url
    if not head.startswith(SCHEME + "://"):
        shown = url if len(url) <= 80 else url[:77] + "..."
        raise NoImage(f"the trace holds {shown!r} in place of the image")
    ref = urlparse(url)
    content_type = (parse_qs(ref.query).get("content_type") or [""])[0]
    if not ref.hostname or not content_type.startswith("image/"):
        raise NoImage(f"an attachment that is not an image ({content_type or 'no content type'})")
    try:
        data = attachment_bytes(trace_info, ref.hostname)
    except FinetuneError:
        raise
    except Exception as e:  # noqa: BLE001 - the artifact store's errors (missing file, permissions, network)
        raise NoImage(f"attachment {ref.hostname} could not be read ({type(e).__name__})") from None
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def attachment_bytes(trace_info, attachment_id: str) -> bytes:
    """The bytes of one attachment of a trace. MLflow has no public API for them (checked in 3.17.2; its own
    judge tool, mlflow/genai/judges/tools/get_span_image.py, makes this call and says so): this is the one
    private call."""
    try:
        from mlflow.tracing.client import TracingClient

        repo = TracingClient()._get_artifact_repo_for_trace(trace_info)
        download = repo.download_trace_attachment
    except (ImportError, AttributeError) as e:
        import mlflow

        raise FinetuneError(f"mlflow {mlflow.__version__} does not read trace attachments as mlflow 3.17 did "
                            f"({e}): the images of traces cannot be read back; install mlflow 3.17, or train "
                            "on traces without images") from None
    return download(attachment_id)
