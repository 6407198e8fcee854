"""The one small interface every serving engine implements, and the helpers the playground builds on.

An engine turns (model choice, chat messages, settings) into a stream of text pieces. Choices come from the
registry (`choices.py`): a registered version (`NAME/3`) or the base model of a version (`NAME/3:base`).
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.messages import text_of
from mlflow_finetune_plugin.models.answers import clean_stream
from mlflow_finetune_plugin.models.image_inputs import is_image_part

# Upper bounds the playground enforces whatever a client sends (a browser, gradio_client, a script).
MAX_NEW_TOKENS_CAP = 1024
MAX_PROMPT_CHARS = 8000
MAX_BEAMS = 8


@dataclass(frozen=True)
class Settings:
    """Generation settings shared by both sides of a comparison (temperature 0 means greedy).

    `num_beams` > 1 is beam search (temperature 0 only): the answer most likely as a whole rather than token
    by token, as `eval.num_beams` scores it. A beam-search answer comes in one piece, when the search ends."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    num_beams: int = 1

    def checked(self, max_new_tokens_cap: int | None = MAX_NEW_TOKENS_CAP) -> Settings:
        """These settings, validated (`max_new_tokens_cap` None: no cap); raises FinetuneError naming each bad
        value and its range."""
        problems = []
        if not 0.0 <= float(self.temperature) <= 2.0:
            problems.append(f"temperature={self.temperature}: use 0 (greedy) to 2")
        if not 0.0 < float(self.top_p) <= 1.0:
            problems.append(f"top_p={self.top_p}: use a value in (0, 1]")
        if int(self.max_new_tokens) < 1 and max_new_tokens_cap is None:
            problems.append(f"max_new_tokens={self.max_new_tokens}: use 1 or more")
        elif max_new_tokens_cap is not None and not 1 <= int(self.max_new_tokens) <= max_new_tokens_cap:
            problems.append(f"max_new_tokens={self.max_new_tokens}: use 1 to {max_new_tokens_cap} "
                            "(the playground's cap, --max-new-tokens)")
        if not 1 <= int(self.num_beams) <= MAX_BEAMS:
            problems.append(f"num_beams={self.num_beams}: use 1 (greedy or sampling) to {MAX_BEAMS}")
        elif int(self.num_beams) > 1 and float(self.temperature) > 0:
            problems.append(f"num_beams={self.num_beams} with temperature={self.temperature}: beam search is "
                            "deterministic; set temperature 0, or num_beams 1 to sample")
        if problems:
            raise FinetuneError("invalid generation settings: " + "; ".join(problems))
        return Settings(float(self.temperature), float(self.top_p), int(self.max_new_tokens),
                        int(self.num_beams))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelChoice:
    """A registered version of `name`, or (base=True) the base model that version was fine-tuned from."""

    name: str
    version: str
    base: bool = False

    @property
    def key(self) -> str:
        """`NAME/3` or `NAME/3:base`: the value model pickers, votes and the API use."""
        return f"{self.name}/{self.version}" + (":base" if self.base else "")

    @classmethod
    def from_key(cls, key: str) -> ModelChoice:
        """Inverse of `key`; raises FinetuneError for anything else (pickers never take arbitrary paths)."""
        text, base = (key[:-5], True) if key.endswith(":base") else (key, False)
        name, _, version = text.rpartition("/")
        if not name or not version.isdigit():
            raise FinetuneError(f"{key!r} is not a model choice: use NAME/VERSION or NAME/VERSION:base "
                                "(the values the playground's model pickers list)")
        return cls(name, version, base)


class Engine(ABC):
    """Streams chat answers from registry model choices. Implementations: transformers, vllm, openai."""

    name: str = "engine"
    # How many requests the playground lets run at once (gradio's default_concurrency_limit).
    concurrency: int = 4
    # Whether stream() gives a vision-language model the messages' image parts (the others send text only).
    takes_images: bool = False
    # Whether the server behind it asks a version trained with retrieval with its chunks itself (`serve` does:
    # `retrieving.py`), so the playground does not retrieve for it again.
    retrieves_itself: bool = False

    @abstractmethod
    def stream(self, choice: ModelChoice, messages: list[dict], settings: Settings) -> Iterator[str]:
        """Yield the answer to `messages` (OpenAI-style, content as text) piece by piece; stop at end of turn.

        Raises FinetuneError with what to do when the model cannot be loaded or served.
        """

    def prepare(self, choice: ModelChoice) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Load what `choice` needs ahead of the first request (optional)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release models, processes and connections."""

    def generate(self, choice: ModelChoice, messages: list[dict], settings: Settings) -> str:
        """The whole answer at once."""
        return "".join(clean_stream(self.stream(choice, messages, settings))).strip()


def plain_messages(messages: list[dict], keep_images: bool = False) -> list[dict]:
    """Messages with text-only content and only the roles chat templates know; with `keep_images`, a message
    with image parts keeps them, beside its text as one text part."""
    out = []
    for m in messages:
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise FinetuneError(f"message role {role!r} is not system, user or assistant")
        content = m.get("content")
        if keep_images and isinstance(content, list) and any(is_image_part(p) for p in content):
            parts = [p if is_image_part(p) else {"type": "text", "text": text_of(p)} for p in content]
            out.append({"role": role, "content": [p for p in parts if is_image_part(p) or p["text"]]})
        else:
            out.append({"role": role, "content": text_of(content)})
    return out



def stream_pair(engine: Engine, jobs: list[tuple[ModelChoice, list[dict]]], settings: Settings,
                timeout: float = 600.0) -> Iterator[tuple[int, str, str | None]]:
    """Run every (choice, messages) job at once; yield (job index, text piece, error) as pieces arrive.

    Each job ends with exactly one item whose piece is "" and whose error is None (done) or the error text, so
    a failing side shows its error while the other keeps streaming.
    """
    out: queue.Queue = queue.Queue()

    def work(index: int, choice: ModelChoice, messages: list[dict]) -> None:
        try:
            # As an answer is shown: without a leading (Qwen3's empty) reasoning block, as pyfunc and
            # evaluation
            for piece in clean_stream(engine.stream(choice, messages, settings)):
                if piece:
                    out.put((index, piece, None))
            out.put((index, "", None))
        except FinetuneError as e:
            out.put((index, "", str(e)))
        except Exception as e:  # noqa: BLE001 - a model failure is shown in its pane, never crashes the app
            out.put((index, "", f"{type(e).__name__}: {e}"))

    threads = [threading.Thread(target=work, args=(i, c, m), daemon=True, name=f"stream-{i}")
               for i, (c, m) in enumerate(jobs)]
    for t in threads:
        t.start()
    pending = len(threads)
    while pending:
        try:
            index, piece, error = out.get(timeout=timeout)
        except queue.Empty:
            raise FinetuneError(f"no answer after {timeout:.0f} s; the engine may be stuck or "
                                "overloaded") from None
        if not piece:
            pending -= 1
        yield index, piece, error
