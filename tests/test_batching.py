"""The transformers engine's batching: concurrent requests share one batch and still get their own answers.

Real tiny-model versions on the sqlite registry; answers are compared with the same requests run one at a
time.
"""

from __future__ import annotations

import threading

import pytest

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.serving import ModelChoice, Settings
from mlflow_finetune_plugin.serving.batching import Batcher, Request, TokenStreamer
from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine
from tests.helpers import register_version

GREEDY = Settings(0.0, 1.0, 16)
QUESTIONS = ["How do I reset my password?", "Can I use it offline?", "Export my notes as PDF, please.",
             "hi", "Where do I turn on two-factor authentication for my whole team account?"]


def _ask(engine, jobs, settings=GREEDY) -> list:
    """Run every (choice, question) job at once, each in its own thread: answers (or the exception) in order.

    A question may be a whole message list; `settings` may be a list, one per job."""
    out = [None] * len(jobs)
    start = threading.Barrier(len(jobs))
    per_job = settings if isinstance(settings, list) else [settings] * len(jobs)

    def work(i, choice, question):
        messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
        start.wait()
        try:
            out[i] = engine.generate(choice, messages, per_job[i])
        except Exception as e:  # noqa: BLE001 - returned for the test to look at
            out[i] = e

    threads = [threading.Thread(target=work, args=(i, c, q)) for i, (c, q) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora-mixed-batches", "dora-one-state-per-batch"])
def test_concurrent_base_and_adapter_requests_answer_as_one_at_a_time(tracking_uri, use_dora):
    v1 = register_version(seed=0, use_dora=use_dora)
    v2 = register_version(seed=1, alias=None, use_dora=use_dora)
    choices = [ModelChoice("bot", v1, base=True), ModelChoice("bot", v1), ModelChoice("bot", v2)]
    jobs = [(choices[i % 3], QUESTIONS[i % len(QUESTIONS)]) for i in range(12)]
    alone = TransformersEngine(device="cpu")
    expected = [alone.generate(c, [{"role": "user", "content": q}], GREEDY) for c, q in jobs]
    alone.close()

    engine = TransformersEngine(device="cpu")
    for choice in choices:
        engine.prepare(choice)
    answers = _ask(engine, jobs)
    assert answers == expected  # greedy, left-padded in a batch: the same tokens as alone
    assert len(set(expected)) > 3  # the versions and questions do change the answers
    # one base copy, batches of several
    assert len(engine._slots) == 1 and max(engine._slots[0].batcher.sizes) > 1
    engine.close()


def test_a_burst_sharing_a_system_prompt_runs_it_once_per_adapter_and_answers_as_alone(tracking_uri,
                                                                                       monkeypatch):
    from mlflow_finetune_plugin.serving import stepping

    v1 = register_version(seed=0)
    tuned, base = ModelChoice("bot", v1), ModelChoice("bot", v1, base=True)
    system = {"role": "system",
              "content": "You are the support assistant of Nimbus Notes. Answer in one sentence."}
    jobs = [(base if i % 2 else tuned, [system, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
            for i in range(8)]
    engine = TransformersEngine(device="cpu")
    expected = [engine.generate(c, m, GREEDY) for c, m in jobs]  # one at a time: no prefix shared
    shared = []
    monkeypatch.setattr(stepping, "_shared_prefix",
                        lambda prompts, f=stepping._shared_prefix: shared.append(f(prompts)) or shared[-1])
    out = _ask(engine, jobs)
    assert out == expected
    assert len(set(expected)) > 2
    # the system prompt ran once per adapter, then each row its question
    assert max(shared) >= stepping.MIN_SHARED
    engine.close()


def test_requests_arriving_during_a_batch_join_it_and_a_bad_one_fails_alone(tracking_uri):
    v1 = register_version(seed=0)
    tuned, base = ModelChoice("bot", v1), ModelChoice("bot", v1, base=True)
    engine = TransformersEngine(device="cpu")
    expected = {q: engine.generate(tuned, [{"role": "user", "content": q}], GREEDY) for q in QUESTIONS[:3]}
    story = [{"role": "user", "content": "Tell me a story."}]
    long_expected = engine.generate(base, story, Settings(0.0, 1.0, 200))
    batcher = engine._slots[0].batcher
    assert engine._slots[0].steppable  # a Llama with LoRA: stepped, continuous batching
    sizes_before = len(batcher.sizes)

    long_answer = engine.stream(base, story, Settings(0.0, 1.0, 200))
    first = next(long_answer)  # that batch is running now
    jobs = [(tuned, q) for q in QUESTIONS[:3]] + [(tuned, "word " * 1100)]  # the last is over the context
    answers = _ask(engine, jobs)
    rest = "".join(long_answer)
    assert answers[:3] == [expected[q] for q in QUESTIONS[:3]]  # joined mid-answer: the same tokens as alone
    assert isinstance(answers[3], FinetuneError) and "exceed the model's context" in str(answers[3])
    # the running answer went on to its end, unchanged by the rows that came
    assert first + rest == long_expected
    assert max(list(batcher.sizes)[sizes_before:]) >= 2  # the late requests joined the running batch


def test_rows_end_at_their_own_length_and_leave_the_batch(tracking_uri):
    """Different max_new_tokens share a stepped batch; rows that end leave it and the rest keep their
    answers."""
    v1 = register_version(seed=0)
    tuned, base = ModelChoice("bot", v1), ModelChoice("bot", v1, base=True)
    lengths = [3, 16, 7, 1, 12, 16]
    jobs = [(tuned if i % 2 else base, QUESTIONS[i % len(QUESTIONS)]) for i in range(len(lengths))]
    engine = TransformersEngine(device="cpu")
    expected = [engine.generate(c, [{"role": "user", "content": q}], Settings(0.0, 1.0, n))
                for (c, q), n in zip(jobs, lengths)]
    batcher = engine._slots[0].batcher
    sizes_before = len(batcher.sizes)
    out = _ask(engine, jobs, [Settings(0.0, 1.0, n) for n in lengths])
    assert out == expected
    assert len({len(a) for a in expected}) > 2  # the answers do differ in length
    assert list(batcher.sizes)[sizes_before] == len(jobs)  # all in one batch, whatever their max_new_tokens
    engine.close()


def test_closing_the_engine_ends_waiting_and_running_requests_with_an_error(tracking_uri):
    v1 = register_version(seed=0)
    engine = TransformersEngine(device="cpu")
    choice = ModelChoice("bot", v1)
    engine.prepare(choice)
    slot = engine._slots[0]
    errors = []

    def ask(settings):
        try:
            engine.generate(choice, [{"role": "user", "content": "hi"}], settings)
        except FinetuneError as e:
            errors.append(str(e))

    # as while an adapter loads: the first batch waits for the model, the second request queues
    with slot.lock:
        running = threading.Thread(target=ask, args=(GREEDY,))
        running.start()
        while not slot.batcher._running:
            threading.Event().wait(0.01)
        waiting = threading.Thread(target=ask, args=(Settings(0.0, 1.0, 8),))  # another group: not that batch
        waiting.start()
        # queued before the close, so it is ended by it, not refused at submit
        while not slot.batcher._waiting:
            threading.Event().wait(0.01)
        closer = threading.Thread(target=engine.close)
        closer.start()
        waiting.join(30)
        assert errors == [f"bot/{v1}: the engine was closed before this answer was complete"]
    closer.join(60)
    running.join(30)
    assert len(errors) == 2 and all("engine was closed" in e for e in errors)
    with pytest.raises(FinetuneError, match="closed"):
        slot.batcher.submit(Request([1], "", GREEDY, frozenset(), 0, TokenStreamer(None)))


def test_a_failing_batch_ends_its_requests_with_the_error_and_the_scheduler_goes_on():
    def run(batch):
        if any(r.prompt == [666] for r in batch):
            raise RuntimeError("out of memory")
        for r in batch:
            r.streamer.add(r.prompt[0])
            r.finish()

    class Digits:  # a tokenizer whose decode is the ids as text: enough for the streamer
        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    batcher = Batcher("t", run, group=lambda r: r.settings)
    bad = Request([666], "", GREEDY, frozenset(), 0, TokenStreamer(Digits(), timeout=30))
    good = Request([7], "", GREEDY, frozenset(), 0, TokenStreamer(Digits(), timeout=30))
    batcher.submit(bad)
    with pytest.raises(FinetuneError, match="generation failed: RuntimeError: out of memory"):
        list(bad.streamer)
    batcher.submit(good)
    assert list(good.streamer) == ["7"]
    batcher.close()
