"""Batching for the transformers engine: requests that arrive together are generated together.

One `Batcher` per model in memory runs a scheduler thread: it takes every waiting request that can share a
batch with the oldest one (same `group`: sampling settings, end-of-turn ids and, where the model cannot mix
them in one batch, adapter state), up to `max_batch`, and generates them together. Why: on a CPU one forward
over 32 rows costs little more than over one, so answering 16 users' comparisons together is several times
sooner than one each.

Where the engine can step the batch itself (`start` returns a stepping.Stepper), batching is continuous: after
each token, rows that ended leave the batch and requests that arrived meanwhile (of the same group, while no
other group waits) join it, up to `max_batch` rows. Otherwise (`start` returns None) the batch is one
`generate()` (`run`) and requests arriving meanwhile wait for the next batch. Before a new batch starts, the
scheduler waits for a burst of arrivals to end, so a burst shares it.

Each row's new tokens are handed to its own request as they come, and a row whose request went away stops
there.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.runtime import threads

_END = object()  # a request's queue sentinel: the answer is complete


class TokenStreamer:
    """One answer's text, handed out as soon as each new token completes whole characters.

    transformers' TextIteratorStreamer holds text back to the last space, so a piece waits for its word to end
    and the first one came a word (several tokens) late. This one holds back only an incomplete UTF-8 sequence
    (a byte-level token that decodes to U+FFFD until its next byte comes). Each piece is what decoding the
    whole answer again adds to the text already sent, so the pieces join to `tokenizer.decode(answer,
    skip_special_tokens=True)` wherever decoding more tokens only appends text (byte-level BPE, the built-in
    models' tokenizers).
    """

    def __init__(self, tokenizer, timeout: float | None = None, answer: bool = False):
        self.tokenizer, self.timeout = tokenizer, timeout
        self.ids: list[int] = []
        self.sent = 0              # characters of the decoded answer handed out so far
        self.pieces: queue.Queue = queue.Queue()
        # answer: the pieces are the answer as a user reads it (models/answers.py: no reasoning, no channel
        # markup)
        self.answer = None
        if answer:
            from mlflow_finetune_plugin.models.answers import AnswerStream

            self.answer = AnswerStream(tokenizer)

    def add(self, token: int) -> None:
        if self.answer is not None:
            if piece := self.answer.add(token):
                self.pieces.put(piece)
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent and not text.endswith("\ufffd"):
            self.pieces.put(text[self.sent:])
            self.sent = len(text)

    def end(self, error: BaseException | None = None) -> None:
        """The answer is complete (`error` None) or cut short by `error`: the reader gets the rest, then
        stops."""
        if self.answer is not None:
            if error is None and (piece := self.answer.end()):
                self.pieces.put(piece)
        elif error is None and len(text := self.tokenizer.decode(self.ids,
                                                                 skip_special_tokens=True)) > self.sent:
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
    # the adapter name, "__base__" (adapters off) or "" (a model without adapters)
    adapter: str
    settings: object              # serving.base.Settings
    eos: frozenset[int]           # end-of-turn ids: a row stops at the first one
    pad_id: int
    streamer: TokenStreamer
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: BaseException | None = None   # why it was cancelled: what its reader gets, if still reading
    done: bool = False            # set by the scheduler thread only
    produced: int = 0             # new tokens so far (scheduler thread)
    # a prompt with images: the processor's other inputs (pixel values, ...); such a
    inputs: dict | None = None
                                  # request runs alone, through generate()

    def cancel(self, reason: BaseException | None = None) -> None:
        """Stop this request: a waiting one is dropped, a running row stops at its next token."""
        self.reason = reason or FinetuneError("the request was cancelled")
        self.cancelled.set()

    def finish(self, error: BaseException | None = None) -> None:
        if not self.done:
            self.done = True
            self.streamer.end(error)

    def take(self, token: int) -> None:
        """The row's next token: streamed, and the row ends at an end-of-turn id or at max_new_tokens."""
        if self.done:
            return
        if self.cancelled.is_set():
            self.finish(self.reason)
            return
        self.streamer.add(token)
        self.produced += 1
        if token in self.eos or self.produced >= self.settings.max_new_tokens:
            self.finish()


class Batcher:
    """The scheduler of one model: a thread that runs the waiting requests in batches, one batch at a time.

    `start(batch)` returns a Stepper holding the batch (rows added with `add(requests)`, `step()` gives each
    row's next token, `keep(indices)` drops the others, `close()` at the end) or None, and then `run(batch)`
    generates it in one go (calling `RowHook` once per step). `group(request)` says which requests may share a
    batch, asked when a batch is formed or joined, so it can follow the model's state (an adapter added
    meanwhile). `admit()` False stops requests from joining a running batch (someone waits to change the
    model: the batch drains first).
    """

    def __init__(self, name: str, run: Callable[[list[Request]], None], group: Callable[[Request], Hashable],
                 max_batch: int = 32, gap_s: float = 0.1, gather_s: float = 1.0,
                 start: Callable[[list[Request]], object | None] = lambda batch: None,
                 admit: Callable[[], bool] = lambda: True):
        self.run, self.group, self.max_batch, self.start, self.admit = run, group, max_batch, start, admit
        # A burst of users does not arrive at one instant (each client connects first). Before each batch the
        # scheduler waits while requests keep coming less than `gap_s` apart, up to `gather_s`, so a burst
        # shares the first batch instead of queueing behind a batch of one; a lone request pays one `gap_s`.
        self.gap_s, self.gather_s = gap_s, gather_s
        self._waiting: list[Request] = []
        self._running: list[Request] = []
        self._cond = threading.Condition()
        self._closed = False
        # the sizes of the latest batches: how much batching happens
        self.sizes: deque[int] = deque(maxlen=1000)
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

    def _join(self, key: Hashable, room: int) -> list[Request]:
        """Waiting requests that may join the running batch of group `key` now (none while another group
        waits)."""
        with self._cond:
            if self._closed or room <= 0 or not self._waiting or not self.admit():
                return []
            self._waiting = [r for r in self._waiting if not r.cancelled.is_set()]
            if any(self.group(r) != key for r in self._waiting):
                # the batch drains, then the oldest waiting request's group goes next: nobody waits forever
                return []
            joining, self._waiting = self._waiting[:room], self._waiting[room:]
            self._running = self._running + joining
            return joining

    def _continue(self, stepper, batch: list[Request]) -> None:
        """Step the batch until every row has ended, rows leaving and joining between steps."""
        rows, key = list(batch), self.group(batch[0])
        stepper.add([r.prompt for r in rows], [r.adapter for r in rows])
        while rows:
            for request, token in zip(rows, stepper.step()):
                request.take(token)
            live = [i for i, r in enumerate(rows) if not r.done]
            if len(live) < len(rows):
                rows = [rows[i] for i in live]
                if rows:
                    stepper.keep(live)
                with self._cond:
                    self._running = list(rows)
            if rows and (joining := self._join(key, self.max_batch - len(rows))):
                stepper.add([r.prompt for r in joining], [r.adapter for r in joining])
                rows += joining
                self.sizes.append(len(rows))

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            # a process that `threads.start`ed (the playground) takes its share of the cores now
            threads.refit()
            error = None
            try:
                stepper = self.start(batch)
                if stepper is None:
                    self.run(batch)
                else:
                    try:
                        self._continue(stepper, batch)
                    finally:
                        stepper.close()
            # handed to each request of the batch; the next batch still runs
            except Exception as e:  # noqa: BLE001
                error = FinetuneError(f"generation failed: {type(e).__name__}: {e}")
            with self._cond:
                running, self._running = self._running, []
            for request in running:  # rows that ended early were finished already
                request.finish(request.reason if request.cancelled.is_set() else error)


def row_hook(batch: list[Request]):
    """The stopping criterion that streams: `generate()` calls it after each step with every row's ids so far.

    Each live row's newest token goes to its request (`Request.take`); a row that ended (an end-of-turn id,
    max_new_tokens, its request cancelled) gets True so `generate()` stops computing it (the whole batch ends
    when every row has).
    """
    import torch
    from transformers import StoppingCriteria

    class RowHook(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            for request, token in zip(batch, input_ids[:, -1].tolist()):
                request.take(token)
            return torch.tensor([r.done for r in batch], dtype=torch.bool, device=input_ids.device)

    return RowHook()
