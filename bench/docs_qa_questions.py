"""How many verified questions does a small teacher write from the docs-qa documents? (issue 67)

The teacher is a built-in model served by `transformers serve` (OpenAI-compatible, on a loopback port,
continuous batching), asked as a recipe's `questions:` section asks it
(`distill/questions.questions_from_chunks`): once per chunk of recipes/docs-qa/docs, chunked with the model's
tokenizer as a run does, for `--per-chunk` questions each. Every row's quote is checked against its chunk; the
table gives what was written and why the rest was dropped.

    python bench/docs_qa_questions.py                       # smollm2, the first 20 chunks (~5 min on 2 cores)
    python bench/docs_qa_questions.py --chunks 78           # every chunk

gemma3 (google/gemma-3-270m) is a base model without a chat template: it is not asked here (a chat template
given with model.chat_template would make it answer, but not as an instruction-tuned model would).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "recipes" / "docs-qa" / "docs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--folder", default=None,
                        help="a model folder to serve instead (e.g. gemma3 with a chat "
                             "template added)")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--per-chunk", type=int, default=3)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--show", type=int, default=2,
                        help="print the first N replies as the teacher wrote them")
    args = parser.parse_args()
    common.header(
        "Questions written from the docs-qa documents by a built-in teacher, verified by their quotes")

    from transformers import AutoTokenizer

    from mlflow_finetune_plugin.config.documents import QuestionsConfig
    from mlflow_finetune_plugin.data.documents import read_documents
    from mlflow_finetune_plugin.distill.questions import questions_from_chunks
    from mlflow_finetune_plugin.models.base import resolve_model_path

    folder = Path(args.folder or resolve_model_path(args.model))
    documents = read_documents(str(DOCS), None, AutoTokenizer.from_pretrained(folder), 160)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow_finetune_plugin.serving.transformers_cli", "serve", folder.name,
         "--host", "127.0.0.1", "--port", str(args.port), "--continuous-batching"], cwd=folder.parent,
        env={**os.environ, "HF_HUB_DISABLE_UPDATE_CHECK": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT)
    try:
        _wait(f"http://127.0.0.1:{args.port}/v1/models", server)
        config = QuestionsConfig(teacher=f"http://127.0.0.1:{args.port}/v1", model=folder.name,
                                 per_chunk=args.per_chunk, max_chunks=args.chunks, concurrency=4,
                                 max_tokens=args.max_tokens)
        began = time.perf_counter()
        with tempfile.TemporaryDirectory() as cache:
            rows, summary = questions_from_chunks(config, documents.chunks, Path(cache))
            replies = [json.loads(line) for f in Path(cache).glob("*.jsonl")
                       for line in f.read_text().splitlines()]
        seconds = time.perf_counter() - began
    finally:
        server.terminate()
        server.wait(30)
    asked = summary["chunks_asked"]
    table = [["teacher", args.model], ["chunks asked", asked], ["replies", summary["replies"]],
             ["rows written", summary["rows_written"]],
             ["rows per chunk asked", f"{summary['rows_written'] / max(asked, 1):.2f}"],
             ["rows written / asked for", f"{summary['rows_written'] / max(asked * args.per_chunk, 1):.2f}"],
             *[[f"dropped: {why}", n] for why, n in summary["dropped"].items()],
             ["with a second wording", sum(1 for r in rows if r.get("rephrased"))],
             ["seconds", f"{seconds:.0f}"]]
    print(common.table(["", "value"], table))
    for reply in replies[: args.show]:
        print(f"\n{reply['key'].split('|')[0]} ({reply.get('finish_reason')}):\n{reply['answer'][:600]}")
    for row in rows[:5]:
        print(f"  {row['chunk']}: Q: {row['messages'][0]['content']!r} A: {row['messages'][1]['content']!r}")


def _wait(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"transformers serve exited {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError("transformers serve did not answer")


if __name__ == "__main__":
    main()
