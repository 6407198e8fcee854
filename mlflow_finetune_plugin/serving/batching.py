"""Batching for the transformers engine: requests that arrive together share one left-padded `generate()`.

One `Batcher` per model in memory runs a scheduler thread: it takes every waiting request that can share a batch
with the oldest one (same `group`: sampling settings, end-of-turn ids and, where the model cannot mix them in one
batch, adapter state), up to `max_batch`, runs them as one `generate()` and then takes the next batch; requests that
arrive while a batch runs join the next one (it waits for a burst of arrivals to end first). Why: on a CPU one
forward over 32 rows costs little more than over one, so answering 16 users' comparisons together is several
times sooner than one `generate()` each.

Each row's new tokens are handed to its own request as they come (`RowHook`, the stopping criterion `generate()`
calls once per step with every row's newest token), and a row whose request went away stops there.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

from mlflow_finetune_plugin.errors import FinetuneError

_END = object()  # a request's queue sentinel: the answer is complete


class TokenStreamer:
    """One answer's text, handed out as soon as each new token completes whole characters.

    transformers' TextIteratorStreamer holds text back to the last space, so a piece waits for its word to end and
    the first one came a word (several tokens) late. This one holds back only an incomplete UTF-8 sequence (a
    byte-level token that decodes to U+FFFD until its next byte comes). Each piece is what decoding the whole answer
    again adds to the text already sent, so the pieces join to `tokenizer.decode(answer, skip_special_tokens=True)`
    wherever decoding more tokens only appends text (byte-level BPE, the built-in models' tokenizers).
    """

    def __init__(self, tokenizer, timeout: float | None = None):
        self.tokenizer, self.timeout = tokenizer, timeout
        self.ids: list[int] = []
        self.sent = 0              # characters of the decoded answer handed out so far
        self.pieces: queue.Queue = queue.Queue()

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent and not text.endswith("\ufffd"):
            self.pieces.put(text[self.sent:])
            self.sent = len(text)

    def end(self, error: BaseException | None = None) -> None:
        """The answer is complete (`error` None) or cut short by `error`: the reader gets the rest, then stops."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if error is None and len(text) > self.sent:
            self.pieces.put(text[self.sent:])
        self.pieces.put(error if error is not None else _END)

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                piece = self.pieces.get(timeout=self.timeout)
            except queue.Empty:
                raise FinetuneError(f"no new token for {self.timeout:.0f} s; the engine may be stuck or "
                                    "overloaded") from None
            if piece is _END:
                return
            if isinstance(piece, BaseException):
                raise piece
            yield piece


@dataclass(eq=False)
class Request:
    """One chat answer to generate: the prompt's token ids, what it runs on, and where its text goes."""

    prompt: list[int]
    adapter: str                  # the adapter name, "__base__" (adapters off) or "" (a model without adapters)
    settings: object              # serving.base.Settings
    eos: frozenset[int]           # end-of-turn ids: a row stops at the first one
    pad_id: int
    streamer: TokenStreamer
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: BaseException | None = None   # why it was cancelled: what its reader gets, if still reading
    done: bool = False            # set by the scheduler thread only

    def cancel(self, reason: BaseException | None = None) -> None:
        """Stop this request: a waiting one is dropped, a running row stops at its next token."""
        self.reason = reason or FinetuneError("the request was cancelled")
        self.cancelled.set()

    def finish(self, error: BaseException | None = None) -> None:
        if not self.done:
            self.done = True
            self.streamer.end(error)


class Batcher:
    """The scheduler of one model: a thread that runs the waiting requests in batches, one `generate()` at a time.

    `run(batch)` generates a batch (it calls `RowHook` once per step); `group(request)` says which requests may share
    a batch, asked when a batch is formed, so it can follow the model's state (an adapter added meanwhile).
    """

    def __init__(self, name: str, run: Callable[[list[Request]], None], group: Callable[[Request], Hashable],
                 max_batch: int = 32, gap_s: float = 0.1, gather_s: float = 1.0):
        self.run, self.group, self.max_batch = run, group, max_batch
        # A burst of users does not arrive at one instant (each client connects first). Before each batch the
        # scheduler waits while requests keep coming less than `gap_s` apart, up to `gather_s`, so a burst shares the first batch
        # instead of queueing behind a batch of one; a lone request pays one `gap_s`.
        self.gap_s, self.gather_s = gap_s, gather_s
        self._waiting: list[Request] = []
        self._running: list[Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self.sizes: deque[int] = deque(maxlen=1000)   # the sizes of the latest batches: how much batching happens
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"batcher-{name}")
        self._thread.start()

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._closed:
                raise FinetuneError("the engine is closed; start it again to generate")
            self._waiting.append(request)
            self._cond.notify()

    def close(self, timeout: float = 60.0) -> None:
        """Stop: waiting requests end with an error, running rows stop at their next token with one too."""
        error = FinetuneError("the engine was closed before this answer was complete")
        with self._cond:
            self._closed = True
            waiting, self._waiting = self._waiting, []
            for request in self._running:
                request.cancel(error)
            self._cond.notify()
        for request in waiting:
            request.finish(error)
        self._thread.join(timeout)

    def _next_batch(self) -> list[Request] | None:
        with self._cond:
            while not self._closed and not self._waiting:
                self._cond.wait()
            deadline = time.monotonic() + self.gather_s
            while not self._closed and len(self._waiting) < self.max_batch and time.monotonic() < deadline:
                arrived = len(self._waiting)
                self._cond.wait(min(self.gap_s, max(0.0, deadline - time.monotonic())))
                if len(self._waiting) == arrived:
                    break  # a quiet gap: the burst is in
            if self._closed:
                return None
            self._waiting = [r for r in self._waiting if not r.cancelled.is_set()]
            if not self._waiting:
                return []
            key = self.group(self._waiting[0])  # the oldest request's group goes first: nobody waits forever
            batch = [r for r in self._waiting if self.group(r) == key][:self.max_batch]
            self._waiting = [r for r in self._waiting if r not in batch]
            self._running = batch
            self.sizes.append(len(batch))
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            try:
                self.run(batch)
                error = None
            except Exception as e:  # noqa: BLE001 - handed to each request of the batch; the next batch still runs
                error = FinetuneError(f"generation failed: {type(e).__name__}: {e}")
            for request in batch:  # rows that ended early were finished by RowHook already
                request.finish(request.reason if request.cancelled.is_set() else error)
            with self._cond:
                self._running = []


def row_hook(batch: list[Request], max_new_tokens: int):
    """The stopping criterion that streams: `generate()` calls it after each step with every row's ids so far.

    Each live row's newest token goes to its request's streamer; a row is finished at an end-of-turn id, at
    `max_new_tokens`, or when its request was cancelled (the reader went away, the engine closed), and gets True so
    `generate()` stops computing it (the whole batch ends when every row has).
    """
    import torch
    from transformers import StoppingCriteria

    class RowHook(StoppingCriteria):
        def __init__(self):
            self.count = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.count += 1
            newest = input_ids[:, -1].tolist()
            finished = []
            for request, token in zip(batch, newest):
                if not request.done:
                    if request.cancelled.is_set():
                        request.finish(request.reason)
                    else:
                        request.streamer.add(token)
                        if token in request.eos or self.count >= max_new_tokens:
                            request.finish()
                finished.append(request.done)
            return torch.tensor(finished, dtype=torch.bool, device=input_ids.device)

    return RowHook()
