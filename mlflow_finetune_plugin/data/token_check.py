"""The data check's side that needs the model: its tokenizer where it is at hand, each row's tokens counted
and masked as training counts and masks them (rows cut by max_length, answer tokens lost, tools the chat
template does not render, rows the template rejects), and whether the model reads images (`check.py` asks;
errors are reported, never raised)."""

from __future__ import annotations

import functools
from pathlib import Path

from mlflow_finetune_plugin.data.read import DataIssue, tools_of
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.messages import text_messages

# What a saved tokenizer leaves in its folder (`save_pretrained`, or the hub's older layouts). A folder with
# none of them holds no tokenizer, whatever AutoTokenizer makes of its config alone (for Qwen3 an empty
# tokenizer, one token: every row counted at a few tokens).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


@functools.lru_cache(maxsize=8)
def tokenizer_for_check(name: str | None, revision: str | None = None, trust_remote_code: bool = False,
                        chat_template: str | None = None, base_dir: str | None = None):
    """(tokenizer or None, why not) for the pre-flight check: the model's tokenizer where it is at hand. A
    built-in model not yet converted is left to training (it converts the weights too), and a tokenizer that
    cannot be loaded is the training process's error to report, not the data check's."""
    from mlflow_finetune_plugin import paths
    from mlflow_finetune_plugin.models import gemma3, smollm2
    from mlflow_finetune_plugin.models.base import load_tokenizer

    for is_it, label, folders in ((smollm2.is_smollm2, smollm2.NAME, "smollm2-*"),
                                  (gemma3.is_gemma3, gemma3.NAME, "gemma3-270m-*")):
        if is_it(name):
            built = sorted(p for p in paths.cache_root().glob(folders) if (p / "tokenizer.json").is_file())
            if not built:
                return None, f"{label} is converted on its first run"
            name = str(built[-1])
    folder = Path(name).expanduser() if name else None
    if folder is not None and folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None, f"no tokenizer files in {folder}"
    try:
        return load_tokenizer(name, revision, trust_remote_code, chat_template, base_dir), None
    except FinetuneError as e:
        if "chat template" in str(e) or "model.chat_template" in str(e):
            raise  # no template to train with, or a bad model.chat_template: refused before any run exists
        return None, str(e).splitlines()[0]
    except Exception as e:  # noqa: BLE001 - any failure here is reported by training with its own message
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__


def model_takes_images(name: str, revision: str | None = None,
                       trust_remote_code: bool = False) -> bool | None:
    """Whether the model `name` reads images: its config's model type is one transformers maps to an
    image-text-to-text model (a custom-code one: its config has a vision part); False for the built-in text
    models; None where the config cannot be read, and nothing is guessed. The one place this is asked, so that
    `models.vision.takes_images(config)` answers."""
    from mlflow_finetune_plugin.models import gemma3, smollm2, tiny_families, tiny_vision
    from mlflow_finetune_plugin.models.base import is_tiny, resolve_model_path
    from mlflow_finetune_plugin.models.vision import takes_images

    if is_tiny(name) or smollm2.is_smollm2(name) or gemma3.is_gemma3(name) or tiny_families.family_of(name):
        return False
    if tiny_vision.family_of(name):  # built on first use: not built here only to be asked
        return True
    try:
        import transformers

        path, kwargs = resolve_model_path(name), {"revision": revision,
                                                  "trust_remote_code": trust_remote_code}
        # the cached config first: offline, asking the hub retries for half a minute before using the cache
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
        except OSError:
            config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    except Exception:  # noqa: BLE001 - no config at hand (offline hub, a bad name): the caller says so
        return None
    return takes_images(config)


# ---------------------------------------------------------------- with a tokenizer


def _count(tokenizer, messages: list[dict], tools, assistant_only: bool = True) -> tuple[int, list[int]]:
    """(tokens, loss mask) of one conversation, rendered and masked as training renders and masks it."""
    from mlflow_finetune_plugin.models.turn_spans import tokenize_row

    out = tokenize_row(tokenizer, messages, tools, assistant_only)
    return len(out["input_ids"]), out["assistant_masks"]


def _tool_names(messages: list[dict], tools) -> list[str]:
    names = [c["function"]["name"] for m in messages for c in (m.get("tool_calls") or [])]
    return names + [t["function"]["name"] for t in tools or []]


def _unrendered(tokenizer, messages: list[dict], tools) -> list[str]:
    """The tool and tool-call names the chat template leaves out of the text: it does not support tools."""
    names = _tool_names(messages, tools)
    if not names:
        return []
    from mlflow_finetune_plugin.models.chat_format import render

    text = render(tokenizer, messages, tools=tools)
    return sorted({n for n in names if n not in text})


def count_lengths(report, records, convs, tokenizer, max_length, model_label, with_images) -> None:
    """Token counts and cut rows; `with_images`: line -> tokens with its image tokens (None: refused), counted
    and refused when too long by `image_check.count_image_tokens`."""
    model = model_label or getattr(tokenizer, "name_or_path", None) or "this tokenizer"
    lengths, cut, answer_total, answer_lost = [], [], 0, 0
    for line, rec in records:
        tools = tools_of(rec)
        # image tokens need the processor: text only here
        texts = [text_messages(conv) for conv in convs[line]]
        try:
            counted = [_count(tokenizer, conv, tools) for conv in texts]
            missing = sorted({n for conv in texts for n in _unrendered(tokenizer, conv, tools)})
        # a template that raises on this row would fail training the same way
        except Exception as e:  # noqa: BLE001
            report.errors.append(DataIssue(report.path, line, _rejected(e, model)))
            continue
        if missing:
            report.errors.append(DataIssue(
                report.path, line,
                f"tool calls or tools ({', '.join(missing)}) that the chat template of {model} "
                f"does not render: {_NO_TOOLS}", group=f"rows with tool calls or tools that the "
                                                       f"chat template of {model} does not render: "
                                                       f"{_NO_TOOLS}"))
        n, mask = max(counted, key=lambda c: c[0])
        if line in with_images:  # refused, not cut, when too long: an error there
            if with_images[line] is None:
                continue
            n, mask = with_images[line], []  # the answer tokens a cut would lose: none, it is refused
        lengths.append(n)
        answer_total += sum(mask)
        lost = sum(mask[max_length:])
        answer_lost += lost
        if n > max_length and line not in with_images:
            report.too_long += 1
            cut.append(DataIssue(report.path, line, f"{n} tokens, more than max_length {max_length}: "
                                                    f"{n - max_length} cut, {lost} of them in answers",
                                 "warning"))
    if cut:
        what = "answer tokens" + (" (text only: image tokens come on top)" if report.images
                                  and not report.images.get("image_tokens") else "")
        report.cut_share = answer_lost / answer_total if answer_total else 0.0
        for issue in cut:
            issue.group = (f"longer than max_length {max_length}: the ends are cut, {answer_lost} of the "
                           f"{answer_total} {what} in this file ({report.cut_share:.1%}) are lost; raise "
                           "data.max_length (--max-length) or shorten these rows")
        report.warnings += cut
    if lengths:
        s = sorted(lengths)
        report.token_stats = {"min": s[0], "mean": round(sum(s) / len(s), 1), "p50": s[(len(s) - 1) // 2],
                              "p95": s[min(len(s) - 1, round(0.95 * (len(s) - 1)))], "max": s[-1]}


_NO_TOOLS = (
    "they would train on empty turns. Use a model whose chat template supports tools (check one with "
    "`mlflow-finetune data check --model NAME`), or leave these rows out")


def _rejected(e: Exception, model: str) -> str:
    """A row the chat template raises on: the template's own words, and what to do."""
    why = (str(e).splitlines() or [type(e).__name__])[0][:200]
    fix = (
        "make this row's turns follow the order the template expects (e.g. user and assistant alternating, "
        "one system message first: merge consecutive turns of the same role), or choose another template "
        "with model.chat_template")
    if "assistant turn" in why and "loss mask" in why:
        fix = "set data.assistant_only_loss: false, or choose another template with model.chat_template"
    return f"the chat template of {model} rejects this row ({why}): {fix}"
