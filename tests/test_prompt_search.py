"""The `optimized` contender (evaluate/prompt_search.py, evaluate/proposer.py) and what the verdict makes of
it.

The search scores instruction x shot-set candidates on a dev split of the TRAIN rows with the base model,
through the same batched generation as every contender, within its budget, and never shows it a held-out
question; the verdict counts it among the alternatives and says "keep the prompt" when the tuned model does
not beat it beyond the noise. Real answers of the tiny model where the model's behaviour matters; a stand-in
for `answer_all` where only the search's choice is checked (the tiny model's random answers score 0 whatever
the prompt).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlflow_finetune_plugin import tags
from mlflow_finetune_plugin.config.schema import EvalConfig, LoraAdapter
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.evaluate import prompt_search
from mlflow_finetune_plugin.evaluate.contenders import run_evaluation
from mlflow_finetune_plugin.evaluate.proposer import (
    Proposer,
    parse_instructions,
    propose,
    proposer_of,
    reachable,
)
from mlflow_finetune_plugin.evaluate.verdict import MIN_EXAMPLES, decide
from mlflow_finetune_plugin.messages import split_conversation
from mlflow_finetune_plugin.metrics import score
from mlflow_finetune_plugin.train.adapters import lora
from tests.helpers import chat_rows, send_json


def _convs(n: int, offset: int = 0) -> list[list[dict]]:
    return [r["messages"] for r in chat_rows(n, offset)]


@pytest.fixture(scope="module")
def tiny_lora(tiny_model_dir):
    torch.manual_seed(0)
    model = lora.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                       LoraAdapter(r=4, alpha=8, dropout=0.0))
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


# --- the dev split and the candidates
# ----------------------------------------------------------------------------


def test_the_dev_split_is_carved_from_train_rows_and_too_few_rows_say_so():
    train = _convs(20)
    pool, dev = prompt_search.dev_split(train, 8)
    assert len(dev) == 8 and len(pool) == 12 and not any(row in pool for row in dev)
    assert prompt_search.dev_split(train, 8) == (pool, dev)  # seeded
    assert len(prompt_search.dev_split(_convs(10), 8)[1]) == 5  # at most half the rows
    reason = prompt_search.dev_split(_convs(7), 8)
    assert isinstance(reason,
                      str) and reason.startswith("too few train rows for a dev split: 7 with an answer")


def test_instructions_go_after_the_system_prompt_and_come_from_the_rows():
    asked = [{"role": "system", "content": "You are Nimbus support."}, {"role": "user", "content": "q"}]
    assert prompt_search.with_instruction(asked,
                                          "Be brief.")[0]["content"] == "You are Nimbus support.\n\nBe brief."
    assert prompt_search.with_instruction(asked[1:], "Be brief.") == [{"role": "system",
                                                                       "content": "Be brief."}, asked[1]]
    assert prompt_search.with_instruction(asked, None) is asked
    assert prompt_search.row_instructions(_convs(5)) == [
        "Answer directly, in the same style as the earlier answers, in about 5 words."]
    json_rows = [[{"role": "user", "content": f"q{i}"},
                  {"role": "assistant", "content": json.dumps({"n": i})}] for i in range(3)]
    assert prompt_search.row_instructions(json_rows)[1] == ("Reply with JSON only, shaped like the earlier "
                                                            "answers.")


def test_the_budget_decides_how_many_candidates_are_scored():
    shots, told = prompt_search.candidates(_convs(12), k=2, k_retrieved=2, shot_sets=2,
                                           instructions=["a b c"] * 2)
    assert [c.label for c in shots] == ["no shots", "random shots 1", "random shots 2", "2 retrieved shots"]
    assert [len(c.shots) for c in shots] == [0, 2, 2, 0] and shots[3].retrieved  # simplest first
    assert [len(x) for x in prompt_search.fitted(shots, told, 6)] == [4, 2]
    # an instruction keeps a place; retrieval before random sets
    tight, one = prompt_search.fitted(shots, told, 3)
    assert [c.label for c in tight] == ["no shots", "2 retrieved shots"] and len(one) == 1
    assert [c.label for c in prompt_search.fitted(shots, [], 3)[0]] == ["no shots", "random shots 1",
                                                                       "2 retrieved shots"]


# --- the search
# --------------------------------------------------------------------------------------------------


def test_the_search_picks_the_best_candidate_on_the_dev_rows(monkeypatch, capsys):
    """A stand-in model that answers right only under the second instruction, and half right with the
    retrieved shots: shot sets are searched first, then the instructions over the best of them."""
    def answer_all(model, tokenizer, prompts, references, cfg, name, progress=None, cache=None):
        progress.update(len(prompts))
        system = [" ".join(m["content"] for m in p if m["role"] == "system") for p in prompts]
        shots = [sum(m["role"] == "assistant" for m in p) for p in prompts]
        answers = [ref if "GOOD" in s else " ".join(ref.split()[:2]) if n and "retrieved" in name else "no"
                   for s, n, ref in zip(system, shots, references)]
        return answers, 0.0, 0, [0.01] * len(prompts)

    monkeypatch.setattr(prompt_search, "answer_all", answer_all)
    tok = AutoTokenizer.from_pretrained(prompt_search_tokenizer())
    cfg = EvalConfig(fewshot_k=2, optimize={"dev_rows": 4})
    found = prompt_search.search(lambda: _nothing(), tok, _convs(12), 40, cfg, 4096,
                                 ["Answer plainly please.", "GOOD answers only please."], 0.01)
    labels = [label for label, _ in found.scores]
    assert labels == ["no shots", "random shots 1", "random shots 2", "2 retrieved shots",
                      "instruction 1 + 2 retrieved shots", "instruction 2 + 2 retrieved shots"]
    assert found.winner.instruction == "GOOD answers only please." and found.winner.retrieved
    assert found.scores[-1][1] == 1.0 and found.answers == 6 * 4 and found.dev_rows == 4
    out = capsys.readouterr().out
    assert (
        "Prompt search: 4 shot sets then 2 instructions x 4 dev rows from train = 24 answers (0.60 of one "
        "contender pass), about 0.2 s at the contenders' pace." in out
    )
    # the one-standard-error rule: a gain on one dev row of four is within the noise, so the simpler candidate
    # stays; the same gain on every row is not
    assert prompt_search.gain([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.9]) <= prompt_search.EPS
    assert prompt_search.gain([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]) > prompt_search.EPS

    def one_row_better(model, tokenizer, prompts, references, cfg, name, progress=None, cache=None):
        progress.update(len(prompts))
        return ["no"] * 3 + [references[3] if "retrieved" in name else "no"], 0.0, 0, [0.0] * 4

    monkeypatch.setattr(prompt_search, "answer_all", one_row_better)
    noisy = prompt_search.search(lambda: _nothing(), tok, _convs(12), 40, cfg, 4096, ["Be brief."])
    assert noisy.winner.label == "no shots" and dict(noisy.scores)["2 retrieved shots"] == 0.25
    assert noisy.reason.endswith("2 retrieved shots scored higher, within one standard error)")
    # a tie keeps the earlier (cheaper) candidate; a budget of one candidate is no search
    monkeypatch.setattr(prompt_search, "answer_all", lambda *a, progress=None,
                        **k: (["no"] * 4, 0.0, 0, [0.0] * 4))
    assert prompt_search.search(lambda: _nothing(), tok, _convs(12), 40, cfg, 4096,
                                []).winner.label == "no shots"
    skipped = prompt_search.search(lambda: _nothing(), tok, _convs(12), 7, cfg, 4096, [])
    assert skipped.winner is None and skipped.reason.startswith(
        "the budget fits 1 candidate (eval.optimize.budget 1")


def prompt_search_tokenizer():
    from mlflow_finetune_plugin.models.tiny import tiny_model_path

    return tiny_model_path()


def _nothing():
    import contextlib

    return contextlib.nullcontext(None)


def test_the_optimized_contender_answers_like_the_others_and_never_sees_a_held_out_row(tiny_lora, monkeypatch,
                                                                                        capsys):
    model, tok = tiny_lora
    evals, train = _convs(10), _convs(16, offset=20)
    seen = []
    real = prompt_search.answer_all

    def spy(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(prompt_search, "answer_all", spy)
    cfg = EvalConfig(max_examples=10, max_new_tokens=4, fewshot_k=2, traces=False, optimize={"dev_rows": 4})
    fake = FakeProposer()
    try:
        result = run_evaluation(model, tok, evals, train, cfg, proposer=Proposer(fake.url))
    finally:
        fake.server.shutdown()

    assert result.contenders == ["base", "fewshot", "retrieval", "optimized", "tuned"] and result.notes == {}
    assert len(seen) == 2 * 4  # budget 1.0 x 10 held-out rows / 4 dev rows: 2 candidates
    held_out = {json.dumps(split_conversation(c)[0]) for c in evals}
    said = json.dumps(seen) + json.dumps(fake.asked)  # what the model and the proposer were shown
    assert not any(json.loads(q)[0]["content"] in said for q in held_out)
    # the proposer's instruction was tried
    assert "Answer with the sum only, as a sentence." in json.dumps(seen)
    for key in ("rougeL", "loss", "prompt_tokens", "latency_s"):
        assert f"eval/optimized/{key}" in result.metrics
    assert all(isinstance(row["optimized_rougeL"], float) for row in result.rows)
    assert result.search.winner is not None and len(result.search.scores) == 2
    out = capsys.readouterr().out
    assert "Contenders: scored base, fewshot, retrieval, optimized, tuned" in out
    assert "Prompt search: 1 shot set then 1 instruction x 4 dev rows" in out
    assert "2 instructions from http://127.0.0.1" in out


def test_too_few_train_rows_or_switched_off_skip_the_contender_with_the_reason(tiny_lora):
    model, tok = tiny_lora
    cfg = EvalConfig(max_examples=2, max_new_tokens=2, fewshot_k=1, traces=False)
    few = run_evaluation(model, tok, _convs(2), _convs(5, offset=10), cfg)
    assert "optimized" not in few.contenders
    assert few.notes["optimized"].startswith("too few train rows for a dev split: 5 with an answer")
    off = run_evaluation(model, tok, _convs(2), _convs(5, offset=10),
                         cfg.model_copy(update={"contenders": ["base", "retrieval"]}))
    assert off.contenders == ["base", "retrieval", "tuned"]
    assert off.notes == {"fewshot": "left out by eval.contenders", "optimized": "left out by eval.contenders"}
    with pytest.raises(ValueError, match="contenders"):
        EvalConfig(contenders=["base", "sweet-talk"])


# --- the proposer
# ------------------------------------------------------------------------------------------------


class FakeProposer:
    """A loopback OpenAI-compatible server that proposes numbered instructions and records what it was
    shown."""

    def __init__(self):
        self.asked = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, body: dict):
                send_json(self, body)

            def do_GET(self):  # noqa: N802 - http.server's name
                self._send({"object": "list", "data": [{"id": "big-model"}]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.asked.append(body)
                text = '1. "Answer with the sum only, as a sentence."\n2. Be brief and exact please.\n3. ok'
                self._send({"choices": [{"message": {"role": "assistant", "content": text}}]})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def test_a_proposer_writes_the_instructions_from_train_rows_only(capsys):
    fake = FakeProposer()
    try:
        found = propose(Proposer(fake.url), _convs(12), 3)
    finally:
        fake.server.shutdown()
    assert found == ["Answer with the sum only, as a sentence.", "Be brief and exact please."]
    assert fake.asked[0]["model"] == "big-model" and "What is 3 plus 3?" in fake.asked[0]["messages"][0][
        "content"]
    assert "2 instructions from" in capsys.readouterr().out
    assert parse_instructions("- one two three\n* one two three\nshort") == ["one two three"]


def test_a_proposer_that_does_not_answer_fails_when_named_and_falls_back_when_inherited(capsys):
    down = "http://127.0.0.1:9/v1"
    with pytest.raises(FinetuneError, match="did not answer.*nothing was searched"):
        propose(Proposer(down), _convs(4), 2)
    with pytest.raises(FinetuneError, match="does not answer.*nothing was trained"):  # the pre-flight's check
        reachable(Proposer(down))
    assert propose(Proposer(down, required=False), _convs(4), 2) == []
    assert "instructions come from the rows instead" in capsys.readouterr().out
    from mlflow_finetune_plugin.config.distill import DistillConfig

    named = proposer_of(EvalConfig(optimize={"proposer": down}))
    inherited = proposer_of(EvalConfig(), DistillConfig(teacher=down, model="t"))
    assert named.required and not inherited.required and inherited.model == "t"
    assert proposer_of(EvalConfig(), DistillConfig(teacher="models:/big@champion")) is None
    assert proposer_of(EvalConfig()) is None
    with pytest.raises(ValueError, match="use an OpenAI-compatible base URL"):
        EvalConfig(optimize={"proposer": "models:/big@champion"})


# --- the verdict
# -------------------------------------------------------------------------------------------------


REFS = [f"Open the {w} page."
        for w in "billing account security notes export sync theme devices sharing backup "
                 "trash search".split()]


def _rougeL(answers):
    return score(answers, REFS)[1]["rougeL"]


def test_fine_tuning_must_beat_the_optimized_prompt_and_a_tie_says_keep_the_prompt():
    half = [" ".join(r.split()[:2]) for r in REFS]
    scores = {"base": _rougeL(["No idea."] * len(REFS)), "retrieval": _rougeL(half), "tuned": _rougeL(REFS),
              "optimized": _rougeL(REFS[:11] + half[11:])}
    assert len(REFS) >= MIN_EXAMPLES
    # the tuned model beats retrieval clearly, but not the optimized prompt beyond the noise
    verdict = decide(scores, "rougeL")
    assert verdict.best_alternative == "optimized" and not verdict.paid_off and verdict.keep_prompt
    verdict.prompt_cost = "at 90 prompt tokens an answer against the tuned model's 12"
    assert verdict.sentence().startswith("fine-tuning did not pay off: rougeL +0.")
    assert "; keep the prompt: the optimized prompt ties the tuned model (rougeL 0.9" in verdict.sentence()
    assert verdict.sentence().endswith("against the tuned model's 12")
    assert verdict.as_tags()[tags.VERDICT_KEEP_PROMPT] == "true"
    # an optimized prompt better than the tuned model beyond the noise: it beats it
    wins = decide({**scores, "optimized": _rougeL(REFS), "tuned": _rougeL(half)}, "rougeL")
    assert wins.keep_prompt and "the optimized prompt beats the tuned model" in wins.sentence()
    # a tuned model clearly above every prompt, the optimized one included: paid off, no keeping
    paid = decide({**scores, "optimized": _rougeL(half)}, "rougeL")
    assert paid.paid_off and not paid.keep_prompt and "keep the prompt" not in paid.sentence()
    assert paid.as_tags()[tags.VERDICT_KEEP_PROMPT] == "false"
    # without the optimized contender there is no such tag
    assert tags.VERDICT_KEEP_PROMPT not in decide({k: v for k, v in scores.items() if k != "optimized"},
                                                  "rougeL").as_tags()


def test_a_run_whose_optimized_prompt_ties_says_keep_the_prompt_with_each_ones_cost(tracking_uri):
    """What `-e lora` prints last when the optimized prompt already does as well: conclude() on logged
    scores."""
    import mlflow

    from mlflow_finetune_plugin.evaluate.verdict import conclude

    half = [" ".join(r.split()[:2]) for r in REFS]
    scores = {"base": _rougeL(["No idea."] * len(REFS)), "retrieval": _rougeL(half), "tuned": _rougeL(REFS),
              "optimized": _rougeL(REFS[:11] + half[11:])}
    with mlflow.start_run() as run:
        mlflow.log_dict({c: {"rougeL": v} for c, v in scores.items()}, "eval/per_example_scores.json")
        mlflow.log_metrics({"eval/optimized/prompt_tokens": 96.0, "eval/tuned/prompt_tokens": 16.0,
                            "eval/base/prompt_tokens": 16.0, "eval/base/latency_s": 0.01,
                            "eval/optimized/latency_s": 0.021, "eval/tuned/latency_s": 0.011})
    verdict = conclude(run.info.run_id)
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert logged[tags.VERDICT_KEEP_PROMPT] == "true" and logged[tags.VERDICT_PAID_OFF] == "false"
    assert logged[tags.VERDICT] == verdict.sentence()
    assert verdict.sentence().endswith("at 96 prompt tokens an answer against the tuned model's 16, 0.021 s "
                                       "against 0.011 s")
    assert "optimized +80" in verdict.cost  # the cost line: prompt tokens over zero-shot's


# --- the prompt kept: Prompt Registry
# ------------------------------------------------------------------------------


def test_the_optimized_prompt_is_registered_as_a_candidate_and_promoted_only_through_the_gates(tracking_uri):
    import mlflow

    from mlflow_finetune_plugin.config.schema import RegistryConfig
    from mlflow_finetune_plugin.registry import prompts

    shot = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "What is 1 plus 1?"},
            {"role": "assistant", "content": "1 plus 1 is 2."}]
    record = {"instruction": "Answer with the sum.", "shots": [shot], "retrieved_shots": False,
              "reason": "best"}
    gates = [RegistryConfig.Gate(metric="rougeL"), RegistryConfig.Gate(metric="forgetting/ppl_ratio",
                                                                       at_most=1.2)]

    def run_with(optimized: float) -> str:
        with mlflow.start_run() as run:
            mlflow.log_metrics({"eval/base/rougeL": 0.2, "eval/fewshot/rougeL": 0.3,
                                "eval/retrieval/rougeL": 0.4, "eval/optimized/rougeL": optimized,
                                "eval/tuned/rougeL": 0.9})
        return run.info.run_id

    first = prompts.register_optimized("bot", record, run_with(0.5), "builtin:tiny-llama", model_version=1)
    loaded = mlflow.genai.load_prompt("prompts:/bot-prompt@candidate")
    assert loaded.version == first.version == 1
    assert loaded.template == [{"role": "system", "content": "Answer with the sum."}, *shot[1:],
                               {"role": "user", "content": "{{question}}"}]
    assert loaded.tags[tags.PROMPT_MODEL_VERSION] == "bot/1" and loaded.tags[tags.PROMPT_SHOTS] == "1"
    # beats base, fewshot, retrieval; no champion yet
    first = prompts.promote_prompt("bot", 1, gates, "champion")
    report = first.report()
    # forgetting: weights'
    assert first.promoted and "no @champion yet" in report and "ppl_ratio" not in report
    assert mlflow.genai.load_prompt("prompts:/bot-prompt@champion").version == 1
    # a worse prompt is a candidate, never the champion; `mlflow-finetune promote NAME-prompt` is the same
    # check, with the gates of the recipe its run recorded (none here: the default, rougeL)
    prompts.register_optimized("bot", record, run_with(0.45), "builtin:tiny-llama")
    from click.testing import CliRunner

    from mlflow_finetune_plugin.cli import main

    out = CliRunner().invoke(main, ["promote", "bot-prompt", "--version", "@candidate"])
    assert out.exit_code == 1 and "FAIL" in out.output and "stays on v1" in out.output
    assert mlflow.genai.load_prompt("prompts:/bot-prompt@champion").version == 1
    assert mlflow.genai.load_prompt("prompts:/bot-prompt@candidate").version == 2
    # served: the client's messages with the instruction and the shot
    asked = [{"role": "system", "content": "You help."}, {"role": "user", "content": "What is 5 plus 5?"}]
    assert prompts.apply_prompt(asked, loaded.template) == [
        {"role": "system", "content": "You help.\n\nAnswer with the sum."}, *shot[1:], asked[1]]


def test_serve_prompt_answers_with_the_base_model_asked_with_the_registered_prompt(tracking_uri):
    """The front's route for `serve --prompt`: the request reaches the base model's server with the prompt
    applied, under the prompt's own name and its alias, and the answers (whole or streamed) and their traces
    carry the prompt's name, not the base's (no model server started: a loopback stand-in answers as
    `transformers serve` does, in the name it was asked by)."""
    import mlflow
    from starlette.testclient import TestClient

    from mlflow_finetune_plugin.registry import prompts
    from mlflow_finetune_plugin.serving.front import Routes, build_front
    from mlflow_finetune_plugin.serving.prompted import rewriter
    from mlflow_finetune_plugin.serving.server import _prompt_base
    from mlflow_finetune_plugin.serving.tracing import TRACE_HEADER, Tracer

    shot = [{"role": "user", "content": "What is 1 plus 1?"},
            {"role": "assistant", "content": "1 plus 1 is 2."}]
    with mlflow.start_run() as run:
        pass
    prompts.register_optimized("bot", {"instruction": "Answer with the sum.", "shots": [shot]},
                               run.info.run_id, "builtin:tiny-llama", model_version=1)
    mlflow.genai.set_prompt_alias("bot-prompt", "champion", 1)
    # A prompt of -e optimize-prompt is beside no model version: the base side of the newest version of its
    # name trained on its base model with its run's chat template answers it; with none, the refusal says what
    # to do.
    with mlflow.start_run(tags={tags.CHAT_TEMPLATE_HASH: "c"}) as prompt_run:
        pass
    prompts.register_optimized("orphan", {"instruction": "x"}, prompt_run.info.run_id, "builtin:tiny-llama")
    with pytest.raises(FinetuneError, match="none of that name is trained on it: register one"):
        _prompt_base("prompts:/orphan-prompt@candidate", [], "transformers")
    client = mlflow.MlflowClient()
    client.create_registered_model("orphan")
    for base_model, template in (("builtin:tiny-llama", "c"), ("builtin:tiny-llama", "other"),
                                 ("builtin:x", "c")):
        client.create_model_version("orphan", "runs:/r/model", tags={tags.BASE_MODEL: base_model,
                                                                      tags.CHAT_TEMPLATE_HASH: template})
    assert _prompt_base("prompts:/orphan-prompt@candidate", [], "transformers")[1] == "orphan/1:base"
    with pytest.raises(FinetuneError, match="one model per server"):
        _prompt_base("prompts:/bot-prompt@champion", ["bot/1"], "transformers")
    served, base = _prompt_base("prompts:/bot-prompt@champion", [], "transformers")
    assert (
        base == "bot/1:base" and served.name == "bot-prompt-v1" and served.alias_key == "bot-prompt@champion"
    )

    received = []

    class Upstream(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(request)
            if request.get("stream"):  # two chunks, the second cut across its JSON, as a network may
                events = b"".join(b"data: " + json.dumps({"model": request["model"], "choices": [
                    {"index": 0, "delta": {"content": piece}, "finish_reason": end}]}).encode() + b"\n\n"
                    for piece, end in (("1", None), ("0", "stop"))) + b"data: [DONE]\n\n"
                parts, kind = [events[:70], events[70:]], "text/event-stream"
            else:
                parts, kind = [json.dumps({"model": request["model"], "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "10"}, "finish_reason": "stop"}]}
                    ).encode()], "application/json"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(sum(map(len, parts))))
            self.end_headers()
            for part in parts:
                self.wfile.write(part)
                self.wfile.flush()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    traced = {}
    try:
        routes = Routes(["bot-v1-base"], f"http://127.0.0.1:{server.server_address[1]}")
        routes.add_prompt(served.name, "bot-v1-base", rewriter(served), "prompts:/bot-prompt/1")
        routes.point(served.alias_key, served.name)
        with TestClient(build_front(routes, tracer=Tracer("served-prompt", "serve"))) as client:
            assert "bot-prompt-v1" in [m["id"] for m in client.get("/v1/models").json()["data"]]
            asked = [{"role": "user", "content": "What is 5 plus 5?"}]
            for name, says in (("bot-prompt@champion", "bot-prompt-v1"), ("bot-v1-base", "bot-v1-base")):
                got = client.post("/v1/chat/completions", json={"model": name, "messages": asked})
                assert got.status_code == 200 and got.json()["choices"][0]["message"]["content"] == "10"
                # issue 69: the prompt's answers say so, not the base's name
                assert got.json()["model"] == says
                traced[name] = got.headers[TRACE_HEADER]
            got = client.post("/v1/chat/completions", json={"model": "bot-prompt-v1", "messages": asked,
                                                            "stream": True})
            chunks = [json.loads(line[5:]) for line in got.text.splitlines()
                      if line.startswith("data:") and "[DONE]" not in line]
            assert [c["model"]
                    for c in chunks] == ["bot-prompt-v1"] * 2 and got.text.endswith("data: [DONE]\n\n")
            assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "10"
    finally:
        server.shutdown()
    assert received[0] == {"model": "bot-v1-base", "messages": [
        {"role": "system", "content": "Answer with the sum."}, *shot, asked[0]]}
    assert received[1] == {"model": "bot-v1-base", "messages": asked}  # the base itself: unchanged
    # The prompt's trace: asked as its alias, answered by the base asked with version 1 of the prompt, its
    # answer in the prompt's name; the base's own trace has no prompt.
    mlflow.flush_trace_async_logging()
    prompt_trace, base_trace = (mlflow.get_trace(traced[n]) for n in ("bot-prompt@champion", "bot-v1-base"))
    assert {k: v for k, v in prompt_trace.info.tags.items() if k.startswith("finetune.served.")} == {
        tags.SERVED_NAME: "bot-prompt@champion", tags.SERVED_MODEL: "bot/1:base", tags.SERVED_BY: "serve",
        tags.SERVED_PROMPT: "prompts:/bot-prompt/1"}
    (span,) = prompt_trace.data.spans
    assert span.outputs["model"] == "bot-prompt-v1" and span.inputs["model"] == "bot-prompt@champion"
    assert (
        tags.SERVED_PROMPT not in base_trace.info.tags
        and base_trace.data.spans[0].outputs["model"] == "bot-v1-base"
    )


def test_a_retrieved_shot_winner_keeps_its_pool_and_is_served_retrieving_from_it(tracking_uri):
    """A winner whose shots were the nearest train conversations per question: its run logs that pool, the
    registered prompt names it, and serving asks each request with the k nearest of it (as the evaluation
    scored it); rows read from traces are not copied, and the prompt says it keeps its instruction only."""
    import mlflow
    from datasets import Dataset

    from mlflow_finetune_plugin.evaluate.report import keep_shot_pool, optimized_record
    from mlflow_finetune_plugin.registry import prompts
    from mlflow_finetune_plugin.serving.prompted import asked

    topics = ["reset my password", "download an invoice", "export notes", "delete my account",
              "change the email", "share a notebook", "restore a backup", "cancel the subscription",
              "add a teammate", "print a page", "enable dark mode", "sync offline"]
    pool = [[{"role": "user", "content": f"How do I {t}?"},
             {"role": "assistant", "content": f"To {t}, open Settings."}] for t in topics]
    search = prompt_search.Search(prompt_search.Candidate("instruction 1 + 2 retrieved shots", "Be brief.",
                                                          retrieved=True), "best", pool=pool, k=2)
    with mlflow.start_run() as run:
        record = {**optimized_record(search), **keep_shot_pool(run.info.run_id, search.pool)}
    assert record["retrieval_k"] == 2 and record["shot_pool_rows"] == 12
    version = prompts.register_optimized("bot", record, run.info.run_id, "builtin:tiny-llama",
                                         model_version=1)
    assert version.tags[tags.PROMPT_SHOTS] == "retrieved: the 2 nearest of 12 train conversations"
    served = prompts.served_prompt("prompts:/bot-prompt/1")
    assert served.pool == pool and served.k == 2
    question = [{"role": "user", "content": "Where can I cancel my subscription?"}]
    got = asked(question, served)
    assert got[0] == {"role": "system", "content": "Be brief."} and got[-1] == question[0]
    assert got[1:-1][:2] == pool[7]  # the nearest train conversation first, as nearest_shots orders them
    assert len(got) == 1 + 2 * 2 + 1

    # train rows from traces: never copied; the prompt keeps its instruction and says so
    with mlflow.start_run() as traced:
        dataset = mlflow.data.from_huggingface(Dataset.from_dict({"x": [1]}), name="traces")
        mlflow.log_input(dataset, context="training", tags={"source": "traces"})
        kept = keep_shot_pool(traced.info.run_id, pool)
    assert kept["shot_pool"] is None and "traces are not copied" in kept["shot_pool_note"]
    assert not mlflow.MlflowClient().list_artifacts(traced.info.run_id, "eval")
    version = prompts.register_optimized("bot", {**optimized_record(search), **kept}, traced.info.run_id,
                                         "builtin:tiny-llama")
    assert version.tags[tags.PROMPT_SHOTS].startswith(
        "retrieved (not kept: instruction only; train rows read from")
    assert prompts.served_prompt(f"prompts:/bot-prompt/{version.version}").pool == []


# --- -e optimize-prompt: the prompt search as a run of its own
# -----------------------------------------------------


def test_optimize_prompt_trains_nothing_and_registers_the_prompt(tmp_path, tracking_uri, capsys):
    import mlflow

    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.errors import RecipeError
    from mlflow_finetune_plugin.train import job
    from tests.helpers import write_project

    proj = write_project(tmp_path / "adder", "data: {max_length: 64, eval: data/eval.jsonl}\n",
                         rows=chat_rows(20), eval_rows=chat_rows(10, offset=100))
    overrides = {"eval.max_examples": 10, "eval.max_new_tokens": 4, "eval.traces": False,
                 "eval.forgetting": False, "eval.optimize.dev_rows": 4, "registry.auto_promote": True}
    mlflow.set_experiment("prompt-only")
    assert job.run(load_recipe(proj, method="optimize-prompt", overrides=overrides)) == 0
    run = mlflow.search_runs(output_format="list")[0]
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and "eval/optimized/rougeL" in metrics
    # nothing trained, no tuned model
    assert not any(k.startswith(("eval/tuned/", "train/")) for k in metrics)
    assert mlflow.MlflowClient().search_registered_models() == []  # no model version: a prompt
    assert run.data.tags[tags.REGISTERED_PROMPT] == "prompts:/adder-prompt/1"
    assert mlflow.genai.load_prompt("prompts:/adder-prompt@candidate").version == 1
    out = capsys.readouterr().out
    assert ("Contenders: scored base, fewshot, retrieval, "
            "optimized") in out and "Promotion of adder-prompt v1" in out
    with pytest.raises(RecipeError, match="optimize-prompt is the prompt search"):
        load_recipe(proj, method="optimize-prompt", overrides={"eval.contenders": ["base"]})
