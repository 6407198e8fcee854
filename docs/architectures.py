"""Write the table of every architecture transformers registers into docs/models.md (issue 58).

    python docs/architectures.py            # every architecture: about 4 minutes on 2 cores, one thread
    python docs/architectures.py llama gpt2 # those only, printed, docs left as they are

Each architecture in `AutoModelForCausalLM`'s mapping is built as a tiny random model from its own config
class (tests/registry_models.py) and taken through what a fine-tune does with it (tests/registry_matrix.py): a
chat row, `lora` with the default targets and `full`, the rehearsal's save check, a reload through
`from_pretrained`, answers generated and scored. The table goes between the markers of docs/models.md's
section "Every architecture transformers registers"; tests/test_registry_matrix.py runs the same check in CI.
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "models.md"
START, END = ("<!-- architectures table: written by docs/architectures.py "
              "-->"), "<!-- end of architectures table -->"


def main(only: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    from mlflow_finetune_plugin.models.tiny import _build_tokenizer
    from tests.registry_matrix import check
    from tests.registry_models import architectures, build

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    tokenizer = _build_tokenizer()
    rows, started = [], time.perf_counter()
    for model_type, class_name in architectures():
        if only and model_type not in only:
            continue
        with tempfile.TemporaryDirectory() as folder:
            row = check(build(model_type, class_name, tokenizer), Path(folder))
        rows.append(row)
        print(f"{model_type:28s} {row.status:10s} {row.stage} {row.reason[:120]}", flush=True)
    counts = collections.Counter(row.status for row in rows)
    summary = (f"{len(rows)} architectures (transformers {transformers.__version__}, PEFT "
               f"{__import__('peft').__version__}, torch {torch.__version__}, {_cpu()}): "
               + ", ".join(f"{counts[s]} {s}" for s in ("pass", "fail", "transformers", "not built",
                                                        "multimodal") if counts[s])
               + f"; {time.perf_counter() - started:.0f} s")
    print(summary)
    if not only:
        _write(rows, summary)


def _cpu() -> str:
    """The CPU's model name and whether it has native bf16 (figures are named with it: docs/benchmarks.md)."""
    from mlflow_finetune_plugin.models.precision import BF16_FLAGS, cpu_flags

    name = "CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {'native bf16' if cpu_flags() & BF16_FLAGS else 'no native bf16'}"


def _write(rows, summary: str) -> None:
    lines = [START, "", summary, "", "| architecture | class | result | LoRA reaches (default targets) |",
             "| --- | --- | --- | --- |"]
    for row in rows:
        result = {"pass": "trains (lora, full)",
                  "multimodal": "image-text: see vision.md"}.get(row.status)
        if result is None:
            label = {"transformers": "transformers' own limit", "fail": "**fails**"}.get(row.status,
                                                                                         row.status)
            where = f" at {row.stage}" if row.stage else ""
            result = f"{label}{where}: `{row.reason.replace('|', '/')[:160]}`"
        lines.append(f"| `{row.model_type}` | {row.class_name} | {result} | {row.lora.replace('|', '/')} |")
    lines += ["", END]
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    DOC.write_text(head + "\n".join(lines) + rest.split(END, 1)[1])
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
