"""Today's date, pinned, for every chat template rendered in this process: templates that write it (gpt-oss's
system block, Llama 3.x's header) render the same row on any day, in training, evaluation and serving
alike."""

from __future__ import annotations

import contextlib
import datetime
import threading

# The date every rendering gets, for templates that write today's (`strftime_now`, Llama 3.x's `date_string`).
PINNED_DATE = datetime.date(2026, 1, 1)


class _PinnedClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(PINNED_DATE.year, PINNED_DATE.month, PINNED_DATE.day, tzinfo=tz)


_clock_lock, _clock_users, _real_clock = threading.Lock(), 0, None


@contextlib.contextmanager
def pinned_clock():
    """Templates' `strftime_now` reads PINNED_DATE inside the block. transformers gives templates its own
    `strftime_now`, which reads `datetime.now()` of its chat-template module; since transformers 5.2x a
    function passed as a render variable reaches the template as a string, so the module's clock is what can
    be pinned. Counted, so that overlapping renders in several threads put the real clock back once, at the
    end."""
    global _clock_users, _real_clock
    from transformers.utils import chat_template_utils

    with _clock_lock:
        if _clock_users == 0:
            _real_clock = chat_template_utils.datetime
            chat_template_utils.datetime = _PinnedClock
        _clock_users += 1
    try:
        yield
    finally:
        with _clock_lock:
            _clock_users -= 1
            if _clock_users == 0:
                chat_template_utils.datetime = _real_clock
