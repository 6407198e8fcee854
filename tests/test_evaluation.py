"""Evaluation: the shipped metric modules against hand-computed values, and the four contenders scored from
real generations of the tiny model (no pinned numbers), logged to MLflow and re-run on a registered
version."""

from __future__ import annotations

import json
import math
import sys

import mlflow
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.config.schema import EvalConfig
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.evaluate.contenders import (
    _mergeable_lora_layers,
    conversations,
    fewshot_prompt,
    lora_merged,
    read_conversations,
    run_evaluation,
)
from mlflow_finetune_plugin.evaluate.report import misrouted_note
from mlflow_finetune_plugin.evaluate.scoring import answer_set, misrouted
from mlflow_finetune_plugin.logged_model import LoadedModel, generate, log_finetuned_model
from mlflow_finetune_plugin.messages import split_conversation
from mlflow_finetune_plugin.metrics import TEXT_METRICS, comparison_table, load_metric
from mlflow_finetune_plugin.models.tiny import TINY_MODEL_REF
from mlflow_finetune_plugin.registry.versions import missing_lineage, register
from mlflow_finetune_plugin.tags import VERDICT, VERDICT_PAID_OFF, lineage_tags
from tests.helpers import chat_rows, random_lora

# --- the shipped metric modules, by hand
# ---------------------------------------------------------------------


def test_exact_match():
    em = load_metric("exact_match")
    out = em.compute(predictions=["Paris ", "london", "a  b"], references=["Paris", "London", "a b"],
                     per_example=True)
    assert out == {"exact_match": pytest.approx(2 / 3), "exact_match_per_example": [1.0, 0.0, 1.0]}
    assert em.compute(predictions=["london"], references=["London"], ignore_case=True)["exact_match"] == 1.0


def test_token_f1():
    f1 = load_metric("token_f1")
    # [cat, sat] vs [cat, sat, down] (articles dropped): P=1, R=2/3 -> F1=0.8
    out = f1.compute(predictions=["the cat sat", "", "dog"], references=["a cat sat down", "", "cat"],
                     per_example=True)
    assert out["token_f1_per_example"] == pytest.approx([0.8, 1.0, 0.0])
    assert out["token_f1"] == pytest.approx(0.6)


def test_rouge():
    rouge = load_metric("rouge")
    out = rouge.compute(predictions=["the cat sat"], references=["a cat sat down"])
    # LCS "cat sat" = 2: P=2/3, R=2/4 -> F=4/7. Unigrams the same; bigram "cat sat" 1: P=1/2, R=1/3 -> F=2/5.
    assert out["rougeL"] == pytest.approx(4 / 7)
    assert out["rouge1"] == pytest.approx(4 / 7)
    assert out["rouge2"] == pytest.approx(2 / 5)


def test_chrf():
    chrf = load_metric("chrf")
    # Character unigrams only: "aa" vs "ab": P=R=1/2 -> 0.5; "ab" vs "abcd": P=1, R=1/2 -> F2 = 5PR/(4P+R) =
    # 5/9.
    out = chrf.compute(predictions=["aa", "ab"], references=["ab", "abcd"], char_order=1, per_example=True)
    assert out["chrf_per_example"] == pytest.approx([0.5, 5 / 9])
    assert chrf.compute(predictions=["hello world"], references=["hello world"])["chrf"] == pytest.approx(1.0)


def test_bleu():
    bleu = load_metric("bleu")
    # Matches 5/6, 3/5, 2/4, 1/3 for n=1..4, same length (no brevity penalty): (1/12) ** (1/4).
    out = bleu.compute(predictions=["the cat sat on the mat"], references=["the cat sat on a mat"])
    assert out["bleu"] == pytest.approx((1 / 12) ** 0.25)


@pytest.mark.parametrize("without_jsonschema", [False, True])
def test_json_valid(monkeypatch, without_jsonschema):
    if without_jsonschema:  # the module's built-in subset of JSON Schema
        monkeypatch.setitem(sys.modules, "jsonschema", None)
    jv = load_metric("json_valid")
    answers = ['{"a": 1}', "a: 1", '```json\n{"a": 2}\n```', '{"b": 1}', '{"a": "x"}']
    assert jv.compute(predictions=answers)["json_valid"] == pytest.approx(4 / 5)
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    out = jv.compute(predictions=answers, schema=schema, per_example=True)
    assert out["json_valid_per_example"] == [1.0, 0.0, 1.0, 0.0, 0.0]


# --- the contenders, from real generations
# ----------------------------------------------------------------------


def test_prompt_and_reference_and_fewshot_layout():
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}]
    prompt, ref = split_conversation(conv)
    assert prompt == conv[:2] and ref == "a"
    shot = [{"role": "system", "content": "other"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}]
    assert [m["content"] for m in fewshot_prompt(prompt, [shot])] == ["S", "q1", "a1", "q"]
    assert split_conversation([{"role": "user", "content": "q"}]) is None


@pytest.fixture(scope="module")
def tiny_lora(tiny_model_dir):
    """A LoRA on the tiny model with random (non-zero) updates, so tuned and base answer differently."""
    return random_lora(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def _convs(rows):
    return [r["messages"] for r in rows]


def test_four_contenders_scored_from_real_generations(tiny_lora):
    model, tok = tiny_lora
    evals, train = _convs(chat_rows(3)), _convs(chat_rows(4, offset=10))
    # A row whose reference is exactly what the tuned model answers: its exact match must be 1.
    prompt = [{"role": "user", "content": "Say something."}]
    answer = generate(LoadedModel(model, tok, {}), prompt, max_new_tokens=6)
    evals.append(prompt + [{"role": "assistant", "content": answer}])
    cfg = EvalConfig(max_examples=4, max_new_tokens=6, fewshot_k=2)

    result = run_evaluation(model, tok, evals, train, cfg)

    assert result.contenders == ["base", "fewshot", "retrieval", "tuned"]
    for c in result.contenders:
        for m in TEXT_METRICS:
            assert 0.0 <= result.metrics[f"eval/{c}/{m}"] <= 1.0, (c, m)
        loss = result.metrics[f"eval/{c}/loss"]
        assert loss > 0 and result.metrics[f"eval/{c}/perplexity"] == pytest.approx(math.exp(loss))
    assert result.metrics["eval/tuned/loss"] != result.metrics["eval/base/loss"]
    assert result.metrics["eval/n_examples"] == 4
    assert len(result.fewshot_examples) == 2
    assert [len(shots) for shots in result.retrieval_shots] == [2] * 4  # retrieval_k defaults to fewshot_k

    loaded = LoadedModel(model, tok, {})
    for conv, row, retrieved in zip(evals, result.rows, result.retrieval_shots):
        p, ref = split_conversation(conv)
        assert row["reference"] == ref
        assert row["tuned_answer"] == generate(loaded, p, max_new_tokens=6)
        with model.disable_adapter():
            assert row["base_answer"] == generate(loaded, p, max_new_tokens=6)
            assert row["fewshot_answer"] == generate(loaded, fewshot_prompt(p, result.fewshot_examples),
                                                     max_new_tokens=6)
            assert row["retrieval_answer"] == generate(loaded, fewshot_prompt(p, retrieved), max_new_tokens=6)
        for c in result.contenders:
            assert 0.0 <= row[f"{c}_token_f1"] <= 1.0
    assert result.rows[-1]["tuned_exact_match"] == 1.0
    assert "json_valid" not in "".join(result.metrics)


def test_misrouted_by_hand():
    train = answer_set(["Reset it at id.example.", "Call  4357.\n", "", "   "])
    assert train == {"Reset it at id.example.", "Call 4357."}
    answers = ["Call 4357.", "Reset it at id.example.", "Something new", "call 4357.", "Call 4357."]
    refs = ["Reset it at id.example.", "Reset it at id.example.", "Call 4357.", "Reset it at id.example.",
            "Call 4357. "]
    # another question's training answer (spacing as exact_match compares); its own; made up; case differs (as
    # exact_match, not the same text); its own again
    assert misrouted(answers, refs, train) == [1.0, 0.0, 0.0, 0.0, 0.0]
    metrics = {"eval/n_examples": 5.0, "eval/base/misrouted": 0.0, "eval/tuned/misrouted": 0.2}
    row = next(line for line in comparison_table(metrics).splitlines() if line.startswith("misrouted"))
    assert row.split()[1:] == ["0.0000", "*", "0.2000"]  # lower is better
    assert misrouted_note(metrics).startswith("misrouted: 1 of the tuned model's 5 answers are word for word")
    assert misrouted_note({**metrics, "eval/tuned/misrouted": 0.0}) is None


def test_misrouted_from_real_generations(tiny_lora):
    model, tok = tiny_lora
    prompt = [{"role": "user", "content": "Say something."}]
    answer = generate(LoadedModel(model, tok, {}), prompt, max_new_tokens=6)
    assert answer.strip()
    # Another question's canned training answer is exactly what the tuned model says to this prompt.
    train = [[{"role": "user", "content": "What do you always say?"},
              {"role": "assistant", "content": answer}], *_convs(chat_rows(3, offset=10))]
    evals = [prompt + [{"role": "assistant", "content": "Not what it says."}],  # misrouted
             # its own answer: right, not misrouted
             prompt + [{"role": "assistant", "content": answer}]]
    cfg = EvalConfig(max_examples=2, max_new_tokens=6, fewshot_k=0, traces=False)

    result = run_evaluation(model, tok, evals, train, cfg)

    assert result.metrics["eval/tuned/misrouted"] == 0.5
    assert [row["tuned_misrouted"] for row in result.rows] == [1.0, 0.0]  # a column of the examples table
    assert result.metrics["eval/tuned/exact_match"] == 0.5
    assert 0.0 <= result.metrics["eval/base/misrouted"] <= 1.0
    # Without training data nothing can be misrouted, and the metric is not logged.
    assert "eval/tuned/misrouted" not in run_evaluation(model, tok, evals, [], cfg).metrics


def _varied_conversations(n: int = 10) -> list[list[dict]]:
    """n conversations whose prompts and references differ in length, every third with a system message."""
    words = ("how do I reset my password when the link has expired and the app keeps asking for a new "
             "one").split()
    convs = []
    for i in range(n):
        conv = [{"role": "user", "content": " ".join(words[: 1 + 2 * i])},
                {"role": "assistant", "content": " ".join(words[i:])}]
        convs.append(([{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []) + conv)
    return convs


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_answers_equal_one_at_a_time(tiny_lora, monkeypatch, batch_size):
    model, tok = tiny_lora
    # More end-of-answer tokens: answers end after different numbers of tokens, so rows of a batch finish (and
    # are padded) at different steps.
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, *range(100, 400)])
    convs = _varied_conversations()
    cfg = EvalConfig(max_examples=len(convs), max_new_tokens=16, fewshot_k=0, batch_size=batch_size)

    result = run_evaluation(model, tok, convs, [], cfg)

    loaded = LoadedModel(model, tok, {})
    prompts = [split_conversation(c)[0] for c in convs]
    assert [r["tuned_answer"] for r in result.rows] == [generate(loaded, p, max_new_tokens=16)
                                                        for p in prompts]
    with model.disable_adapter():
        assert [r["base_answer"] for r in result.rows] == [generate(loaded, p, max_new_tokens=16)
                                                           for p in prompts]


def test_tuned_answers_with_the_lora_merged_equal_unmerged_and_leave_the_base_bit_for_bit(tiny_lora):
    """The tuned contender answers with each LoRA update folded into its base weight (`lora_merged`): the same
    answers and reference loss as the adapter computed beside the base, and afterwards every weight is the
    tensor it was, so base, few-shot, retrieval and the forgetting check read the untouched base."""
    model, tok = tiny_lora
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    convs = _varied_conversations()
    prompts = [split_conversation(c)[0] for c in convs]
    loaded = LoadedModel(model, tok, {})
    unmerged = [generate(loaded, p, max_new_tokens=12) for p in prompts]
    from peft.tuners.lora import LoraLayer

    assert len(_mergeable_lora_layers(model)) == sum(isinstance(m, LoraLayer) for m in model.modules()) > 0
    with lora_merged(model) as merged:
        layer, adapter = _mergeable_lora_layers(model)[0]
        weight = layer.get_base_layer().weight
        assert torch.allclose(weight, before[next(n for n, p in model.named_parameters() if p is weight)]
                              + layer.get_delta_weight(adapter), atol=0)
        assert [generate(LoadedModel(merged, tok, {}), p, max_new_tokens=12) for p in prompts] == unmerged
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert [generate(loaded, p, max_new_tokens=12) for p in prompts] == unmerged  # the adapter is on again


def test_lora_variants_and_other_adapters_answer_unmerged(tiny_model_dir):
    from peft import IA3Config, LoraConfig, get_peft_model

    def peft(config):
        return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)

    assert _mergeable_lora_layers(peft(LoraConfig(r=4, target_modules="all-linear", use_dora=True))) == []
    assert _mergeable_lora_layers(peft(LoraConfig(r=4, target_modules="all-linear", lora_bias=True))) == []
    assert _mergeable_lora_layers(peft(IA3Config(target_modules=["q_proj"], feedforward_modules=[]))) == []
    assert _mergeable_lora_layers(AutoModelForCausalLM.from_pretrained(tiny_model_dir)) == []
    # Trained token rows (model.chat_template on a base model) and modules_to_save are switched off with the
    # adapter, and a merge does not fold them in: the tuned gemma3 then ran on past its end of turn in the
    # run's evaluation.
    assert _mergeable_lora_layers(peft(LoraConfig(r=4, target_modules="all-linear",
                                                  trainable_token_indices=[1, 2]))) == []
    assert _mergeable_lora_layers(peft(LoraConfig(r=4, target_modules=["q_proj"],
                                                  modules_to_save=["lm_head"]))) == []
    plain = peft(LoraConfig(r=4, target_modules="all-linear"))
    with lora_merged(plain.eval()) as merged:
        assert merged is plain


def test_beam_search_answers_are_the_models_beam_answers_and_leave_the_loss_alone(tiny_lora):
    """eval.num_beams: every contender answers with beam search, batched as greedy answers are (the answers
    HF's generate gives one prompt at a time with that many beams); the references' loss does not depend on
    decoding."""
    model, tok = tiny_lora
    convs = _varied_conversations()[:8]
    greedy = run_evaluation(model, tok, convs, [], EvalConfig(max_examples=8, max_new_tokens=12, fewshot_k=0))
    beams = run_evaluation(model, tok, convs, [], EvalConfig(max_examples=8, max_new_tokens=12, fewshot_k=0,
                                                             num_beams=3, batch_size=4))
    loaded = LoadedModel(model, tok, {})
    prompts = [split_conversation(c)[0] for c in convs]
    expected = [generate(loaded, p, max_new_tokens=12, num_beams=3) for p in prompts]
    assert [r["tuned_answer"] for r in beams.rows] == expected
    assert expected != [r["tuned_answer"] for r in greedy.rows]  # beams do change some answers of this model
    enc = tok.apply_chat_template(prompts[0], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, num_beams=3, do_sample=False, early_stopping=True,
                         pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == expected[0]
    assert beams.metrics["eval/tuned/loss"] == pytest.approx(greedy.metrics["eval/tuned/loss"], rel=1e-5)
    assert beams.metrics["eval/base/loss"] == pytest.approx(greedy.metrics["eval/base/loss"], rel=1e-5)


def test_prompt_tuning_answers_one_at_a_time_and_scores_its_loss(tiny_model_dir):
    """Virtual tokens live in the KV cache of prompt tuning: evaluation does not reuse its scoring pass's
    cache there (LoRA does), and left padding would shift the virtual tokens: it answers one prompt at a
    time."""
    from mlflow_finetune_plugin.config.schema import PromptAdapter
    from mlflow_finetune_plugin.evaluate.contenders import _shares_prefill
    from mlflow_finetune_plugin.train.adapters import prompt

    torch.manual_seed(0)
    model = prompt.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         PromptAdapter(num_virtual_tokens=4))
    model.eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    convs = _varied_conversations()[:6]
    assert not _shares_prefill(model)
    result = run_evaluation(model, tok, convs, [], EvalConfig(max_examples=6, max_new_tokens=8, fewshot_k=0))
    loaded = LoadedModel(model, tok, {})
    assert [r["tuned_answer"] for r in result.rows] == [
        generate(loaded, split_conversation(c)[0], max_new_tokens=8) for c in convs]
    assert result.metrics["eval/tuned/loss"] == pytest.approx(_per_example_loss(model, tok, convs), rel=1e-5)


def test_lora_evaluation_reuses_the_scoring_pass(tiny_lora):
    """A LoRA contender's prompts go through the model once: the pass that scores the references leaves the KV
    cache generation continues from, so every other forward pass is one token of generation."""
    from mlflow_finetune_plugin.evaluate.scoring import MIN_SHARED_PREFIX, _common_prefix, reference_ids

    model, tok = tiny_lora
    convs = _varied_conversations()
    pairs = [reference_ids(tok, *split_conversation(c)) for c in convs]
    # no shared start: one pass, one call
    assert len(_common_prefix([p for p, _ in pairs])) < MIN_SHARED_PREFIX
    widths = []

    def record(module, args, kwargs):
        widths.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[1])

    hook = model.get_base_model().register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = run_evaluation(model, tok, convs, [], EvalConfig(max_examples=len(convs), max_new_tokens=4,
                                                                   fewshot_k=0, batch_size=len(convs)))
    finally:
        hook.remove()

    assert result.contenders == ["base", "tuned"]
    # One batch per contender; its one pass over the prompts carries the references too.
    full = max(len(p) for p, _ in pairs) + max(len(c) for _, c in pairs)
    assert [w for w in widths if w > 1] == [full] * len(result.contenders)


def test_few_shot_prompts_share_their_start_and_answer_as_one_at_a_time(tiny_lora, monkeypatch):
    """Few-shot prompts start alike (system prompt, then every shot): that start goes through the model once
    per batch; the answers are still those of one prompt at a time, and the reference loss the per-example
    loss."""
    from mlflow_finetune_plugin.evaluate.scoring import MIN_SHARED_PREFIX, _common_prefix, reference_ids

    model, tok = tiny_lora
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, *range(100, 400)])
    system = [{"role": "system", "content": "You are the support assistant of Nimbus Notes."}]
    convs = [system + c[-2:] for c in _varied_conversations()]
    train = [system + c[-2:] for c in _varied_conversations(14)[10:]]
    cfg = EvalConfig(max_examples=len(convs), max_new_tokens=12, fewshot_k=3, batch_size=16)

    result = run_evaluation(model, tok, convs, train, cfg)

    prompts = [fewshot_prompt(split_conversation(c)[0], result.fewshot_examples) for c in convs]
    shared = _common_prefix([reference_ids(tok, p, "")[0] for p in prompts])
    assert len(shared) >= MIN_SHARED_PREFIX  # the shared-start path is the one taken
    loaded = LoadedModel(model, tok, {})
    with model.disable_adapter():
        assert [r["fewshot_answer"] for r in result.rows] == [generate(loaded, p, max_new_tokens=12)
                                                              for p in prompts]
        expected = _per_example_loss(model, tok, [p + [c[-1]] for p, c in zip(prompts, convs)])
    assert result.metrics["eval/fewshot/loss"] == pytest.approx(expected, rel=1e-5)


def _per_example_loss(model, tok, convs) -> float:
    """Token-weighted loss of the reference answers (and their end of turn), one unpadded example at a
    time."""
    nll, count = 0.0, 0
    for conv in convs:
        prompt_text = tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=False)
        completion = tok.apply_chat_template(conv, tokenize=False)[len(prompt_text):]
        completion = completion[: completion.index("<|im_end|>") + len("<|im_end|>")]  # what training trains
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + completion_ids])
        labels = ids.clone()
        labels[0, : len(prompt_ids)] = -100
        with torch.no_grad():
            nll += float(model(input_ids=ids, labels=labels).loss) * len(completion_ids)
        count += len(completion_ids)
    return nll / count


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_reference_loss_equals_per_example(tiny_lora, batch_size):
    model, tok = tiny_lora
    convs = _varied_conversations()
    cfg = EvalConfig(max_examples=len(convs), max_new_tokens=1, fewshot_k=0, batch_size=batch_size)

    result = run_evaluation(model, tok, convs, [], cfg)

    assert result.metrics["eval/tuned/loss"] == pytest.approx(_per_example_loss(model, tok, convs), rel=1e-5)
    with model.disable_adapter():
        assert result.metrics["eval/base/loss"] == pytest.approx(_per_example_loss(model, tok, convs),
                                                                 rel=1e-5)


def test_structured_output_scores_json_validity(tiny_lora):
    model, tok = tiny_lora
    cfg = EvalConfig(max_examples=2, max_new_tokens=4, fewshot_k=0, output_format="json",
                     json_schema={"type": "object"})
    result = run_evaluation(model, tok, _convs(chat_rows(2)), [], cfg)
    assert result.contenders == ["base", "tuned"]  # fewshot_k 0: no few-shot contender
    assert 0.0 <= result.metrics["eval/tuned/json_valid"] <= 1.0
    assert "tuned_json_valid" in result.rows[0]


def test_full_model_needs_its_base_given(tiny_lora, tiny_model_dir):
    _, tok = tiny_lora
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    cfg = EvalConfig(max_examples=1, max_new_tokens=3, fewshot_k=1)
    assert run_evaluation(full, tok, _convs(chat_rows(1)), _convs(chat_rows(2, 5)),
                          cfg).contenders == ["tuned"]
    both = run_evaluation(full, tok, _convs(chat_rows(1)), _convs(chat_rows(2, 5)), cfg, base_model=full)
    assert both.contenders == ["base", "fewshot", "retrieval", "tuned"]
    assert both.metrics["eval/base/loss"] == pytest.approx(both.metrics["eval/tuned/loss"])


def test_logged_metrics_table_and_chart(tracking_uri, tiny_lora):
    from mlflow_finetune_plugin.evaluate.report import log_evaluation

    model, tok = tiny_lora
    cfg = EvalConfig(max_examples=2, max_new_tokens=4, fewshot_k=1)
    result = run_evaluation(model, tok, _convs(chat_rows(2)), _convs(chat_rows(3, 7)), cfg)
    with mlflow.start_run() as run:
        log_evaluation(result)
        log_evaluation(result)  # a second evaluation in the same run keeps its own table
    client = mlflow.MlflowClient()
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["eval/fewshot/rougeL"] == result.metrics["eval/fewshot/rougeL"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/examples.json", "eval/examples-2.json", "eval/comparison.png", "eval/fewshot_examples.json",
            "eval/retrieval_examples.json", "eval/per_example_scores.json"} <= artifacts
    assert logged["eval/retrieval/rougeL"] == result.metrics["eval/retrieval/rougeL"]
    table = mlflow.load_table("eval/examples.json", run_ids=[run.info.run_id])
    assert list(table["tuned_answer"]) == [r["tuned_answer"] for r in result.rows]
    text = comparison_table(result.metrics)
    assert "rougeL" in text and "fewshot" in text


def test_no_scorable_rows_is_a_clear_error(tiny_lora):
    model, tok = tiny_lora
    with pytest.raises(FinetuneError, match="assistant"):
        run_evaluation(model, tok, [[{"role": "user", "content": "q"}]], [], EvalConfig())


@pytest.mark.parametrize("row, columns, answer", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, None, "b"),
    ({"prompt": "c", "completion": "d"}, None, "d"),
    ({"instruction": "e", "input": "f", "output": "g"}, None, "g"),
    ({"prompt": [{"role": "user", "content": "h"}], "chosen": [{"role": "assistant", "content": "i"}],
      "rejected": [{"role": "assistant", "content": "j"}]}, None, "i"),
    ({"conversations": [{"from": "human", "value": "k"}, {"from": "gpt", "value": "l"}]}, None, "l"),
    ({"question": "m", "answer": "n"}, {"prompt": "question", "completion": "answer"}, "n"),
])
def test_read_conversations_reads_every_training_format(tmp_path, row, columns, answer):
    """`evaluate --data` and re-evaluation read files with training's reader: every format, mapped columns."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    convs = read_conversations(str(path), system_prompt="S", columns=columns)
    assert [split_conversation(c)[1] for c in convs] == [answer, answer]
    assert all(c[0] == {"role": "system", "content": "S"} for c in convs)


def test_read_conversations_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "c", "completion": "d"}\n{"prompt": "c", "completion": \n')
    with pytest.raises(FinetuneError, match=r"d\.jsonl:2"):
        read_conversations(str(path))
    assert conversations([{"prompt": "c", "completion": "d"}]) == [[{"role": "user", "content": "c"},
                                                                     {"role": "assistant", "content": "d"}]]
    with pytest.raises(FinetuneError, match="row 0: expected a chat row"):
        conversations([{"text": "x"}])


# --- a registered version, through the CLI
# ----------------------------------------------------------------------


def test_evaluate_a_registered_version_then_promote_and_list(tracking_uri, tiny_lora, tmp_path):
    model, tok = tiny_lora
    eval_file, train_file = tmp_path / "eval.jsonl", tmp_path / "train.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(2)))
    train_file.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(3, 20)))
    recipe_yaml = {"data": {"train": str(train_file), "eval": str(eval_file)},
                   "eval": {"max_examples": 2, "max_new_tokens": 4, "fewshot_k": 1},
                   "registry": {"promote_if": [{"metric": "exact_match", "beats": ["champion"]}]}}
    with mlflow.start_run() as src:
        mlflow.log_dict(recipe_yaml, "recipe.yaml")
        info = log_finetuned_model(model, tok, {"base_model": TINY_MODEL_REF, "artifact": "adapter",
                                                "method": "lora"})
        tags = lineage_tags(method="lora", base_model=TINY_MODEL_REF, dataset_digest="d1", recipe_hash="r1",
                            chat_template_hash="c1", source_run=src.info.run_id)
        version = register(info.model_uri, "bot", tags)
    assert missing_lineage(version) == []
    runner = CliRunner()

    # Into a new run, with the data recorded in the source run's recipe.
    out = runner.invoke(main, ["evaluate", "models:/bot@challenger"])
    assert out.exit_code == 0, out.output
    assert "fewshot" in out.output and "retrieval" in out.output and "rougeL" in out.output
    new_run = out.output.strip().split("Logged to run ")[1].split()[0]
    assert new_run != src.info.run_id
    logged = mlflow.MlflowClient().get_run(new_run).data
    assert "eval/tuned/rougeL" in logged.metrics and "eval/retrieval/rougeL" in logged.metrics
    # The verdict is printed last and tagged on the run; 2 examples are too few for a pay-off.
    # the verdict, then what an answer costs each contender
    verdict, cost = out.output.strip().splitlines()[-2:]
    assert verdict == f"Verdict: {logged.tags[VERDICT]}" and cost.startswith(
        "Cost per answer on this machine:")
    assert logged.tags[VERDICT_PAID_OFF] == "false" and "too few to tell" in logged.tags[VERDICT]
    # The recipe's gate names exact_match: the verdict weighs that metric.
    assert logged.tags[VERDICT].startswith("fine-tuning did not pay off: exact_match ")

    # Promotion reads the source run: before it is evaluated there, it refuses and names what is missing.
    out = runner.invoke(main, ["promote", "bot", "--version", "1"])
    assert out.exit_code == 1 and "eval/tuned/exact_match" in out.output

    out = runner.invoke(main, ["evaluate", "models:/bot/1", "--run-id", src.info.run_id, "--data",
                               str(eval_file), "--max-examples", "1"])
    assert out.exit_code == 0, out.output
    src_metrics = mlflow.MlflowClient().get_run(src.info.run_id).data.metrics
    assert src_metrics["eval/n_examples"] == 1

    out = runner.invoke(main, ["promote", "bot", "--version", "@challenger"])
    assert out.exit_code == 0, out.output
    assert "no @champion yet" in out.output
    assert str(mlflow.MlflowClient().get_model_version_by_alias("bot", "champion").version) == "1"

    out = runner.invoke(main, ["models", "bot", "--metric", "rougeL"])
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.startswith("1 "))
    assert "@champion" in line and "@challenger" in line
    assert f"{src_metrics['eval/tuned/rougeL']:.4f}" in line

    # An unregistered logged model (models:/<model id>) works too, its source run found from the model.
    out = runner.invoke(main, ["evaluate", info.model_uri, "--max-examples", "1", "--fewshot-k", "0"])
    assert out.exit_code == 0, out.output
    assert "fewshot" not in out.output and "retrieval" not in out.output and "tuned" in out.output
    out = runner.invoke(main, ["evaluate", info.model_uri, "--max-examples", "1", "--fewshot-k", "0",
                               "--retrieval-k", "1"])
    assert out.exit_code == 0, out.output
    assert "fewshot" not in out.output and "retrieval" in out.output


def test_evaluate_without_data_scores_the_rows_training_held_out(tmp_path, tracking_uri):
    """A run with data.eval_split and no eval file: `evaluate` of its version rebuilds the same held-out
    rows."""
    from mlflow_finetune_plugin.config.loading import load_recipe
    from mlflow_finetune_plugin.evaluate.contenders import evaluate_model_uri
    from mlflow_finetune_plugin.train.job import run
    from tests.helpers import chat_rows, write_project

    proj = write_project(tmp_path / "held", "data: {eval_split: 0.25, max_length: 64}\n"
                         "train: {max_steps: 1, batch_size: 2}\neval: {max_new_tokens: 2, fewshot_k: 0}\n",
                         rows=chat_rows(12))
    assert run(load_recipe(proj)) == 0
    version = mlflow.MlflowClient().get_model_version_by_alias("held", "challenger")
    trained = mlflow.load_table("eval/examples.json", run_ids=[version.run_id])
    result, _ = evaluate_model_uri("models:/held@challenger", max_new_tokens=2, fewshot_k=0)
    assert len(result.rows) == 3
    assert [r["prompt"] for r in result.rows] == list(trained["prompt"])
