"""The rows of a documents recipe (data/document_rows.py), the retriever they share (retriever.py), and the
verdict on what to deploy (evaluate/documents_verdict.py): no model loads here."""

import json

import pytest

from mlflow_finetune_plugin.data.document_rows import oracle_ids, question_rows, raft_rows, sort_rows
from mlflow_finetune_plugin.data.formats import DataError
from mlflow_finetune_plugin.evaluate.documents_verdict import decide
from mlflow_finetune_plugin.retriever import CONTEXT_HEADER, Retriever, query_of, with_context

CHUNKS = [
    {"id": "returns.md#1", "source": "returns.md", "text": "Refunds are issued within 17 business days.",
     "line": 3}, {"id": "returns.md#2", "source": "returns.md",
                  "text": "Returns need the receipt code RX-4471.", "line": 9},
    {"id": "warranty.md#1", "source": "warranty.md",
     "text": "The warranty on the Velmo kettle lasts 29 months."},
    {"id": "offices.md#1", "source": "offices.md", "text": "The Quarnby office opens at 7:40 on weekdays."},
    {"id": "offices.md#2", "source": "offices.md", "text": "Parking at Quarnby costs 3 tokens a day."},
]


def row(question, answer, source=None, quote=None, **extra):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            **({"source": source} if source else {}), **({"quote": quote} if quote else {}), **extra}


def test_retriever_finds_the_chunk_and_puts_it_before_the_question(tmp_path):
    retriever = Retriever(CHUNKS, k=2)
    found = retriever.search("How long does the kettle warranty last?")
    assert found[0]["id"] == "warranty.md#1" and len(found) == 2
    asked = with_context([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "How long is the warranty?"}], found[:1])
    assert asked[0] == {"role": "system", "content": "Be brief."}
    assert asked[1]["content"] == (
        f"{CONTEXT_HEADER}\n\n[1] warranty.md\nThe warranty on the Velmo kettle lasts "
        "29 months.\n\nQuestion: How long is the warranty?")
    assert query_of(asked[:1] + [{"role": "user", "content": "q?"}]) == "q?"
    again = Retriever.load(retriever.save(tmp_path / "r"))
    assert again.chunks == CHUNKS and again.k == 2 and again.search("parking "
                                                                    "tokens")[0]["id"] == "offices.md#2"


def test_oracle_is_the_chunk_holding_the_quote_else_the_document():
    assert oracle_ids(row("q", "a", "returns.md", "receipt  CODE rx-4471"), CHUNKS) == {"returns.md#2"}
    assert oracle_ids(row("q", "a", "returns.md"), CHUNKS) == {"returns.md#1", "returns.md#2"}
    assert oracle_ids(row("q", "a", "returns.md", chunk="returns.md#1"), CHUNKS) == {"returns.md#1"}
    assert oracle_ids(row("q", "a"), CHUNKS) == set()


def test_sets_keep_held_out_documents_out_of_training():
    train = [row("When are refunds issued?", "Within 17 business days.", "returns.md"),
             row("Kettle warranty?", "29 months.", "warranty.md"),
             row("Office opening?", "7:40.", "offices.md")]
    held = [row("How many days for a refund?", "Within 17 business days.", "returns.md"),
            row("Parking price at Quarnby?", "3 tokens a day.", "offices.md")]
    sets = sort_rows(train, held, {"offices.md"}, {"returns.md", "warranty.md", "offices.md"}, 0.3, 0)
    assert [r["source"] for r in sets.train] == ["returns.md", "warranty.md"]
    assert [r["source"] for r in sets.known] == ["returns.md"]
    assert sorted(r["messages"][0]["content"] for r in sets.unseen) == ["Office opening?",
                                                                        "Parking price at Quarnby?"]
    assert "1 question rows are on held-out documents" in sets.notes[0]
    with pytest.raises(DataError, match="documents that data.documents does not hold: \\['nowhere.md'\\]"):
        sort_rows([row("q", "a", "nowhere.md")], [], set(), {"returns.md"}, 0.3, 0)


def test_teacher_rows_hold_out_their_second_wording():
    rows = [row(f"Question {i}?", f"Answer {i}.", "returns.md", rephrased=f"Asked otherwise {i}?")
            for i in range(10)]
    sets = sort_rows(rows, [], set(), {"returns.md"}, 0.3, 0)
    assert len(sets.train) == 10 and len(sets.known) == 3
    assert all(r["messages"][0]["content"].startswith("Asked otherwise") for r in sets.known)


def test_raft_rows_carry_the_oracle_or_distractors_only_and_a_closed_book_copy():
    rows = [row("When are refunds issued?", "Within 17 business days.", "returns.md",
                "within 17 business days")] * 20
    out, summary = raft_rows(rows, Retriever(CHUNKS, k=3), CHUNKS, 0.8, True, 0)
    assert summary["questions"] == 20 and summary["closed_book"] == 20 and len(out) == 40
    assert summary["with_oracle"] + summary["distractors_only"] == 20 and 10 <= summary["with_oracle"] < 20
    with_chunks = [r for r in out if CONTEXT_HEADER in r["messages"][0]["content"]]
    assert len(with_chunks) == 20
    holding = [r for r in with_chunks if "17 business days." in r["messages"][0]["content"]]
    assert len(holding) == summary["with_oracle"]
    assert all(r["messages"][-1] == {"role": "assistant", "content": "Within 17 business days."} for r in out)
    assert all(r["messages"][0]["content"].count("\n[") == 3 for r in with_chunks)  # k chunks, always


def test_question_rows_keep_source_and_quote(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(row("q?", "a.", "returns.md", "quote")) + "\n" + json.dumps(row("p?", "b."))
                    + "\n")
    got = question_rows(str(path), "Be brief.")
    assert got[0]["source"] == "returns.md" and got[0]["quote"] == "quote" and "source" not in got[1]
    assert got[0]["messages"][0] == {"role": "system", "content": "Be brief."}


def scores(**contenders):
    return {c: {"rougeL": v} for c, v in contenders.items()}


def test_deploy_the_cheapest_contender_no_other_beats():
    n = 30
    known = scores(base=[0.1] * n, rag=[0.5, 0.6] * (n // 2), tuned=[0.4, 0.5] * (n // 2),
                   **{"tuned-rag": [0.9, 0.8] * (n // 2)})
    unseen = scores(base=[0.1] * n, rag=[0.6, 0.5] * (n // 2), tuned=[0.1, 0.2] * (n // 2),
                    **{"tuned-rag": [0.6, 0.5] * (n // 2)})
    verdict = decide({"known": known, "unseen": unseen})
    assert verdict.deploy == "tuned-rag" and verdict.paid_off
    said = verdict.sentence()
    assert said.startswith("deploy the tuned model with RAG (tuned-rag)")
    assert ("On known documents (30 questions), the tuned model with RAG scores rougeL 0.85 and beats "
            "zero-shot") in said
    assert "beats RAG on the base model (0.55; +0.27 to +0.34)" in said
    assert ("each cheaper one is beaten: zero-shot on known and unseen documents; the tuned model alone on "
            "known and unseen documents; RAG on the base model on known documents") in said
    assert ("on unseen documents (30 questions), RAG on the base model scores rougeL 0.55 and beats "
            "zero-shot") in said
    assert "ties the tuned model with RAG (0.55; +0.00 to +0.00)" in said
    assert "; with retrieval, RAG on the base model beats the tuned model alone (0.55 against 0.15; " in said
    assert verdict.as_tags()["finetune.verdict.deploy"] == "tuned-rag"
    assert verdict.as_tags()["finetune.verdict.best_alternative"] == "rag"
    mean, low, high = verdict.margin
    assert mean == pytest.approx(0.3) and 0 < low <= high


def test_rag_alone_when_fine_tuning_adds_nothing_beyond_noise():
    n = 20
    same = [0.5, 0.7] * (n // 2)
    verdict = decide({"known": scores(base=[0.1] * n, rag=same, tuned=[0.2] * n,
                                      **{"tuned-rag": same[::-1]})})
    assert verdict.deploy == "rag" and not verdict.paid_off and verdict.margin is None


def test_a_gain_under_eval_min_gain_is_a_tie_and_the_cheaper_contender_is_deployed():
    # The tuned model with RAG answers a little better than RAG on every question: beyond the noise, by 0.03.
    n = 20
    rag = [0.5, 0.6] * (n // 2)
    known = scores(base=[0.1] * n, rag=rag, tuned=[0.2] * n, **{"tuned-rag": [v + 0.03 for v in rag]})
    noise_only = decide({"known": known}, min_gain=0)
    assert noise_only.deploy == "tuned-rag" and noise_only.paid_off
    verdict = decide({"known": known})  # eval.min_gain's default, 0.05 on a 0-1 metric
    assert verdict.deploy == "rag" and not verdict.paid_off and verdict.min_gain == 0.05
    said = verdict.sentence()
    assert said.startswith(
        "deploy RAG on the base model (rag): no other contender beats it beyond the noise by "
        "eval.min_gain on the set")
    assert "ties RAG on the base model (0.55; +0.03 to +0.03)" in said
    assert said.endswith(
        "one beats another when the interval is above 0 and the gain at least 0.05, eval.min_gain)")
    # A larger gain is still a win; a mapping names the metric.
    assert decide({"known": {**known, **scores(**{"tuned-rag": [v + 0.2 for v in rag]})}}).paid_off
    assert decide({"known": known}, min_gain={"rougeL": 0.01}).deploy == "tuned-rag"
