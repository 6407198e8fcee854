"""The user's documents as input (`data.documents`, data/documents.py): found, read (Markdown, text, HTML, a
real PDF), chunked along headings and paragraphs, checked (empty, duplicate, unreadable), held out, logged;
`data check --documents`; and the preflight's refusals. No model loads (the tiny tokenizer only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlflow_finetune_plugin.cli import main
from mlflow_finetune_plugin.config.documents import NO_QUESTIONS
from mlflow_finetune_plugin.config.loading import load_recipe
from mlflow_finetune_plugin.data.check import check_data
from mlflow_finetune_plugin.data.documents import (
    REPORT_FILE,
    find_documents,
    holdout_files,
    log_documents,
    read_documents,
    token_counter,
)
from mlflow_finetune_plugin.data.preflight import check_recipe_data
from mlflow_finetune_plugin.errors import FinetuneError, RecipeError
from tests.helpers import chat_rows, jsonl

GUIDE = """# Returns

Items can be returned by mail.

## Refunds

Refunds are paid within 30 days
of the return arriving.

Keep the receipt.

```
# a comment in code, not a heading
```

## Exchanges ##

Exchanges are free.
"""

PAGE = """<html><head><title>Shop</title><style>p { color: red }</style></head>
<body>
<h1>Shipping</h1>
<p>
  We ship &amp; deliver.</p>
<script>var hidden = "not text";</script>
<div>Parcels <b>leave</b><br>daily.</div>
<h2>Abroad</h2>
<ul><li>Europe</li><li>Asia</li></ul>
</body></html>
"""


def pdf_bytes(pages: list[list[str]]) -> bytes:
    """A valid PDF with one Helvetica text line per string on each page, xref offsets computed."""
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objs = {1: b"<< /Type /Catalog /Pages 2 0 R >>",
            2: f"<< /Type /Pages /Kids [{' '.join(f'{i} 0 R' for i in page_ids)}] /Count {len(pages)} "
               ">>".encode(),
            3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"}
    for pid, lines in zip(page_ids, pages):
        stream = ("BT /F1 12 Tf 14 TL 72 720 Td " + " ".join(f"({line}) Tj T*" for line in lines)
                  + " ET").encode()
        objs[pid] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {pid + 1} 0 R >>").encode()
        objs[pid + 1] = b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"
    out, offsets = bytearray(b"%PDF-1.4\n"), {}
    for k in sorted(objs):
        offsets[k] = len(out)
        out += b"%d 0 obj\n" % k + objs[k] + b"\nendobj\n"
    xref, size = len(out), max(objs) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size + b"".join(b"%010d 00000 n \n" % offsets[k]
                                                                  for k in range(1, size))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


@pytest.fixture()
def docs(tmp_path) -> Path:
    """A project folder with docs/: md, txt, html, a 2-page PDF, an empty file, a duplicate, a broken PDF."""
    root = tmp_path / "docs"
    (root / "shop").mkdir(parents=True)
    (root / "guide.md").write_text(GUIDE)
    (root / "shop" / "page.html").write_text(PAGE)
    (root / "notes.txt").write_text("Opening hours are nine to five.\n\nClosed on Sundays.\n")
    (root / "copy.txt").write_text("closed   ON sundays.\n")  # not a duplicate: notes.txt's chunk holds more
    # notes.txt again
    (root / "hours.txt").write_text("Opening hours are nine to five.\n\nClosed on Sundays.\n")
    (root / "blank.md").write_text("\n   \n")
    (root / "manual.pdf").write_bytes(pdf_bytes([["Warranty lasts two years."],
                                                 ["Batteries are not covered."]]))
    (root / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf at all")
    (root / ".hidden.md").write_text("# Secret\n\nNot read.\n")
    (root / "image.png").write_bytes(b"\x89PNG")
    return tmp_path


def test_a_folder_is_read_chunked_and_checked(docs):
    got = read_documents("docs", str(docs))
    by_id = {c["id"]: c for c in got.chunks}
    assert got.root == docs / "docs"
    assert got.files == ["blank.md", "copy.txt", "guide.md", "hours.txt", "manual.pdf", "notes.txt",
                         "shop/page.html"]
    # Markdown: headings are the path, not text; paragraphs of one section merged; code fences kept whole
    assert by_id["guide.md#1"] == {"id": "guide.md#1", "source": "guide.md", "line": 3, "heading": "Returns",
                                   "text": "Returns\n\nItems can be returned by mail."}
    assert by_id["guide.md#2"]["line"] == 7 and by_id["guide.md#2"]["heading"] == "Returns > Refunds"
    assert by_id["guide.md#2"]["text"] == (
        "Returns > Refunds\n\nRefunds are paid within 30 days\nof the return "
        "arriving.\n\nKeep the receipt.\n\n```\n# a comment in code, not a "
        "heading\n```")
    assert by_id["guide.md#3"] == {"id": "guide.md#3", "source": "guide.md", "line": 18,
                                   "heading": "Returns > Exchanges",
                                   "text": "Returns > Exchanges\n\nExchanges are free."}
    # HTML: block text, entities decoded, script/style/title dropped, the line the text starts on
    assert by_id["shop/page.html#1"] == {"id": "shop/page.html#1", "source": "shop/page.html", "line": 5,
                                         "heading": "Shipping",
                                         "text": "Shipping\n\nWe ship & deliver.\n\nParcels leave daily."}
    assert by_id["shop/page.html#2"]["text"] == "Shipping > Abroad\n\nEurope\n\nAsia"
    assert by_id["shop/page.html#2"]["line"] == 9
    assert not any("hidden" in c["text"] or "color" in c["text"] or "Secret" in c["text"] for c in got.chunks)
    # PDF: a chunk per page, with its page
    pdf = [c for c in got.chunks if c["source"] == "manual.pdf"]
    assert [(c["id"], c["page"], c["text"]) for c in pdf] == [
        ("manual.pdf#1", 1, "Warranty lasts two years."), ("manual.pdf#2", 2, "Batteries are not covered.")]
    assert "line" not in pdf[0] and "heading" not in pdf[0]
    # text: no heading, line 1; hours.txt repeats notes.txt: dropped, kept once (case/space-insensitive too)
    assert by_id["hours.txt#1"] == {"id": "hours.txt#1", "source": "hours.txt", "line": 1,
                                    "text": "Opening hours are nine to five.\n\nClosed on Sundays."}
    report = got.report
    assert report.duplicates == [("notes.txt#1", "hours.txt#1")]  # hours.txt is read first (sorted)
    assert "hours.txt#1" in by_id and "notes.txt#1" not in by_id
    assert report.empty == ["blank.md"]
    assert [path for path, _ in report.unreadable] == ["broken.pdf"]
    assert "broken PDF" in report.unreadable[0][1] and "export it again" in report.unreadable[0][1]
    assert report.files == 7 and report.chunks == len(got.chunks) == 9
    count = token_counter()
    assert report.tokens == sum(count(c["text"]) for c in got.chunks) and report.tokens_estimated
    assert len(got.digest) == 12 and got.digest == read_documents("docs", str(docs)).digest
    lines = report.lines()
    assert lines[0].startswith("Documents (") and "7 files read, 9 chunks" in lines[0]
    assert "  empty: blank.md" in lines and "  duplicate: notes.txt#1 repeats hours.txt#1 (dropped)" in lines
    assert any(line.startswith("  unreadable: broken.pdf: broken PDF") for line in lines)
    as_dict = json.loads(json.dumps(report.as_dict()))
    assert as_dict["duplicates"] == [{"id": "notes.txt#1", "duplicates": "hours.txt#1"}]
    assert as_dict["unreadable"][0]["path"] == "broken.pdf" and as_dict["empty"] == ["blank.md"]


def test_long_paragraphs_split_at_sentences_then_words(tmp_path):
    sentences = [f"Sentence {w} has four." for w in ("one", "two", "three", "four", "five")]
    long_sentence = " ".join(f"w{i}" for i in range(30)) + "."
    (tmp_path / "long.md").write_text("# Long\n\n" + "\n".join(sentences) + "\n\n" + long_sentence + "\n")
    got = read_documents("long.md", str(tmp_path), chunk_tokens=16)
    # estimate: 4 words = 6 tokens; the heading "Long" costs 2, so two sentences (11) fit in 14, three (16) do
    # not
    firsts = [(c["line"], c["text"]) for c in got.chunks[:3]]
    assert firsts == [(3, "Long\n\n" + sentences[0] + "\n" + sentences[1]),
                      (5, "Long\n\n" + sentences[2] + "\n" + sentences[3]), (7, "Long\n\n" + sentences[4])]
    words = got.chunks[3:]
    assert all(c["line"] == 9 and c["heading"] == "Long" for c in words)
    assert " ".join(c["text"].removeprefix("Long\n\n") for c in words) == long_sentence
    count = token_counter()
    assert all(count(c["text"]) <= 16 for c in got.chunks)
    assert [c["id"] for c in got.chunks] == [f"long.md#{n}" for n in range(1, len(got.chunks) + 1)]


def test_token_counts_come_from_the_tokenizer_when_given(tmp_path):
    from mlflow_finetune_plugin.models.base import load_tokenizer

    tokenizer = load_tokenizer(None)  # tiny's
    text = " ".join(f"Fact number {i} is that the shop sells item {i * 7}." for i in range(40))
    (tmp_path / "facts.txt").write_text(text + "\n")
    got = read_documents("facts.txt", str(tmp_path), tokenizer=tokenizer, chunk_tokens=48)
    count = token_counter(tokenizer)
    assert len(got.chunks) > 3 and all(count(c["text"]) <= 48 for c in got.chunks)
    assert " ".join(c["text"] for c in got.chunks) == text  # split between sentences, nothing lost
    assert all(c["text"].endswith(".") for c in got.chunks)
    assert not got.report.tokens_estimated and got.report.tokens == sum(count(c["text"]) for c in got.chunks)


def test_a_glob_and_its_root(docs):
    root, files = find_documents("docs/**/*.html", str(docs))
    assert root == docs / "docs" and files == [docs / "docs" / "shop" / "page.html"]
    (docs / "docs" / "shop" / "terms.docx").write_bytes(b"PK\x03\x04")
    got = read_documents("docs/shop/*", str(docs))
    assert got.files == ["page.html"] and got.root == docs / "docs" / "shop"
    assert got.report.unreadable[0][0] == "terms.docx" and ("unsupported suffix "
                                                            ".docx") in got.report.unreadable[
        0][1]
    assert [c["id"] for c in got.chunks] == ["page.html#1", "page.html#2"]


def test_what_is_not_found_or_not_read_is_refused_by_its_key(tmp_path):
    with pytest.raises(FinetuneError,
                       match=r"data\.documents: 'nowhere': not found \(looked for .*nowhere\)"):
        find_documents("nowhere", str(tmp_path))
    with pytest.raises(FinetuneError, match=r"data\.documents: 'd/\*\.md': no file matches .*glob like"):
        find_documents("d/*.md", str(tmp_path))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("a,b\n")
    with pytest.raises(FinetuneError, match=r"'d': holds no document \(\.md, "):
        find_documents("d", str(tmp_path))
    (tmp_path / "d" / "empty.md").write_text("")
    (tmp_path / "d" / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(FinetuneError,
                       match=r"data\.documents: no text in 'd' .*empty: empty\.md; unreadable: "
                             r"latin\.txt: not UTF-8 text \(byte 0xe9 at offset 3\); save it as UTF-8"):
        read_documents("d", str(tmp_path))


def test_holdout_by_paths_globs_folders_and_share():
    files = ["a.md", "b.md", "faq/x.md", "faq/y.md", "manual.pdf"]
    assert holdout_files(files, [], 0) == []
    assert holdout_files(files, ["manual.pdf", "faq/"], 0) == ["faq/x.md", "faq/y.md", "manual.pdf"]
    assert holdout_files(files, ["*.md"], 0) == ["a.md", "b.md", "faq/x.md", "faq/y.md"]
    with pytest.raises(FinetuneError, match=r"data\.documents_holdout: 'nope\.md' matches no document\. .*"
                                            r"its documents are: a\.md, b\.md, faq/x\.md"):
        holdout_files(files, ["a.md", "nope.md"], 0)
    with pytest.raises(FinetuneError, match=r"data\.documents_holdout: holds out every document \(5\)"):
        holdout_files(files, ["*"], 0)
    two = holdout_files(files, 0.4, seed=3)
    assert len(two) == 2 and two == sorted(two) and set(two) <= set(files)
    assert two == holdout_files(list(reversed(files)), 0.4, seed=3)  # the seed decides, not the order given
    assert len(holdout_files(files, 0.01, seed=0)) == 1  # at least one when the share is above 0
    assert holdout_files(files, 0.0, seed=0) == []
    with pytest.raises(FinetuneError, match="holds out every document"):
        holdout_files(files, 0.99, seed=0)


def test_the_chunks_are_logged_as_a_dataset_input(docs, monkeypatch):
    import mlflow

    monkeypatch.chdir(docs)
    mlflow.set_tracking_uri(f"sqlite:///{docs / 'mlflow.db'}")
    got = read_documents("docs", str(docs))
    try:
        with mlflow.start_run() as run:
            dataset = log_documents(got)
        assert dataset.digest == got.digest
        inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("documents", got.digest)]
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "documents"
        assert json.loads(inputs[0].dataset.profile)["num_rows"] == 9
        report = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{REPORT_FILE}")
        assert report["empty"] == ["blank.md"] and report["chunks"] == 9
    finally:
        mlflow.set_tracking_uri(None)


def test_data_check_documents(docs, monkeypatch):
    monkeypatch.chdir(docs)
    runner = CliRunner()
    result = runner.invoke(main, ["data", "check", "--documents", "docs", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["files"] == 7 and report["chunks"] == 9 and report["unreadable"][0]["path"] == "broken.pdf"
    text = runner.invoke(main, ["data", "check", "--documents", "docs", "--chunk-tokens", "64"])
    assert text.exit_code == 0 and "  unreadable: broken.pdf: broken PDF" in text.stdout
    assert "--strict makes them errors" in text.stderr
    assert runner.invoke(main, ["data", "check", "--documents", "docs", "--strict"]).exit_code == 1
    # blank.md
    assert runner.invoke(main, ["data", "check", "--documents", "docs/*.md", "--strict"]).exit_code == 1
    assert runner.invoke(main, ["data", "check", "--documents", "docs/guide.md", "--strict"]).exit_code == 0
    missing = runner.invoke(main, ["data", "check", "--documents", "gone"])
    assert missing.exit_code == 1 and "data.documents: 'gone': not found" in missing.stderr
    neither = runner.invoke(main, ["data", "check"])
    assert neither.exit_code == 2 and "give data FILES to check, or --documents PATH" in neither.output


RECIPE = "model:\n  name: tiny\ndata:\n  documents: docs\n"


def test_preflight_reads_the_documents_and_says_what_is_missing(docs, capsys):
    (docs / "finetune.yaml").write_text(RECIPE)
    # the recipe loads with no question rows and no teacher: refused
    with pytest.raises(RecipeError) as refused:
        load_recipe(docs)
    assert "data.train: file not found: data/train.jsonl" in str(refused.value) and NO_QUESTIONS in str(
        refused.value)
    assert ("give data.train question rows (with `source` "
            "keys") in NO_QUESTIONS and "questions.teacher" in NO_QUESTIONS
    (docs / "finetune.yaml").write_text(RECIPE + "questions:\n  teacher: http://127.0.0.1:9/v1\n")
    recipe = load_recipe(docs)
    check_recipe_data(recipe, check_data)  # the teacher writes data.train: only the documents are checked
    err = capsys.readouterr().err
    assert "7 files read, 9 chunks" in err and "docs/broken.pdf: broken PDF" in err
    assert "written from the chunks by questions.teacher (http://127.0.0.1:9/v1)" in err
    recipe.data.strict = True
    with pytest.raises(FinetuneError,
                       match=r"data\.documents: 2 files not read \(data\.strict\).*\n.*broken\.pdf: "
                             r"broken PDF.*\n.*blank\.md: empty"):
        check_recipe_data(recipe, check_data)
    recipe.data.strict, recipe.data.documents_holdout = False, ["faq/*"]
    with pytest.raises(FinetuneError,
                       match=r"data\.documents_holdout: 'faq/\*' matches no document.*guide\.md"):
        check_recipe_data(recipe, check_data)
    recipe.data.documents_holdout, recipe.questions = 0.2, None
    with pytest.raises(FinetuneError,
                       match=r"data\.train: file not found: .*train\.jsonl\. data\.documents gives"):
        check_recipe_data(recipe, check_data)
    recipe.data.documents = "docs/blank.md"
    with pytest.raises(FinetuneError, match=r"data\.documents: no text in 'docs/blank\.md'"):
        check_recipe_data(recipe, check_data)


def test_preflight_with_question_rows_checks_them_too(docs, capsys):
    (docs / "data").mkdir()
    jsonl(docs / "data" / "train.jsonl", [{"not": "rows"}] + chat_rows(3))
    (docs / "finetune.yaml").write_text(RECIPE)
    # checked as before
    with pytest.raises(FinetuneError, match="in the data; nothing was started") as refused:
        check_recipe_data(load_recipe(docs), check_data)
    assert "train.jsonl:1:" in str(refused.value)
    assert "Documents (" in capsys.readouterr().err
