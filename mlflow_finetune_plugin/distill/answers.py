"""The teacher's answers to a recipe's prompts, asked once per job (rank 0; the other ranks read its rows)
before the student loads, and written as the chat rows the student trains on.

Every answer is cached as it arrives, in a file keyed by the teacher and its settings
(`paths.cache_root()/distill`): a run that crashed, a rerun and a run resumed on this machine ask only for the
prompts not answered yet; a run resumed elsewhere (`train.resume=RUN_ID`) first reads the answers the resumed
run logged (`distill/answers.jsonl`). Answers that are empty or cut at the length limit make no training row
and are counted in the report.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from mlflow_finetune_plugin import paths
from mlflow_finetune_plugin import tags as tag_names
from mlflow_finetune_plugin.data.prompts import (
    answered_row,
    prompt_sets,
    reference_row,
    used_prompts,
    why_left_out,
    write_rows,
)
from mlflow_finetune_plugin.distill.estimate import planned
from mlflow_finetune_plugin.distill.teacher import same_tokenizer, teacher_of
from mlflow_finetune_plugin.errors import FinetuneError

ANSWERS_ARTIFACT = "distill/answers.jsonl"
SUMMARY_ARTIFACT = "distill/summary.json"
_DONE = "done.json"  # in the job's distill folder: rank 0's rows are written (the other ranks wait for it)
TEXT_ONLY = (
    "Distillation (distill.loss: text): the student learns only the teacher's text, its answers as chat "
    "rows; not its token distribution")
LOGITS = (
    "Distillation (distill.loss: logits): the student learns the teacher's answers as chat rows, and its "
    "token distribution on every answer token (KL(teacher || student), weight {weight:g}; train/teacher_kl)")


def cache_key(config) -> str:
    """The teacher and the settings that change its answers: one cache file each."""
    spec = {k: getattr(config, k) for k in ("teacher", "model", "max_tokens", "temperature", "stop")}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class AnswerCache:
    """Answers by prompt key, read from and appended to one JSONL file as they arrive (thread-safe)."""

    def __init__(self, path: Path):
        self.path, self._lock, self.answers = path, threading.Lock(), {}
        if path.exists():
            self.add_lines(path.read_text(encoding="utf-8").splitlines(), keep=False)

    def add_lines(self, lines, keep: bool = True) -> int:
        added = 0
        for line in lines:
            try:
                got = json.loads(line)
                key, answer = got["key"], {k: got[k] for k in ("answer", "model", "prompt_tokens",
                                                               "completion_tokens", "latency_s",
                                                               "finish_reason")}
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
            if key not in self.answers:
                added += 1
                self.put(key, answer) if keep else self.answers.__setitem__(key, answer)
        return added

    def put(self, key: str, answer: dict) -> None:
        with self._lock:
            self.answers[key] = answer
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, **answer}, ensure_ascii=False) + "\n")


def answered(recipe, run_id: str, main: bool = True):
    """The recipe with data.train (and data.eval) replaced by the teacher's answered chat rows."""
    out_dir = paths.job_dir(run_id) / "distill"
    if not main:
        return _rank0_rows(recipe, out_dir)
    import mlflow

    config = recipe.distill
    read = prompt_sets(recipe)
    # only what the run uses is asked: a hosted teacher is paid per token
    sets, notes = used_prompts(recipe, read)
    cache = AnswerCache(paths.cache_root() / "distill" / f"{cache_key(config)}.jsonl")
    reused = _answers_of_resumed_run(recipe, cache)
    order = {p.key: i for i, p in reversed(list(enumerate(p for s in read for p in s.prompts)))}
    unique = {p.key: p for s in sets for p in s.prompts}
    todo = sorted((p for key, p in unique.items() if key not in cache.answers), key=lambda p: order[p.key])
    if config.loss == "logits":  # before any answer is asked for, and before the student loads
        _check_tokenizer(recipe)
    plan = planned(recipe, sum(len(s.prompts) for s in read), len(unique), todo, notes)
    label = config.teacher
    if todo:
        label = ask(config, todo, cache)
    print((LOGITS.format(weight=config.kl_weight) if config.loss == "logits" else TEXT_ONLY) + ".",
          file=sys.stderr)

    files, summary, log = {}, {"teacher": label, "cache_key": cache_key(config), "asked": len(todo),
                               "cached": len(unique) - len(todo), "resumed_answers": reused, "plan": plan}, []
    empty = []
    for s in sets:
        held_out = s.keeps_references
        rows, left_out = [], Counter()
        for p in s.prompts:
            answer = cache.answers[p.key]
            row = answered_row(p, answer, held_out)
            reason = why_left_out(answer)
            if row is None:
                left_out[reason] += 1
            else:
                rows.append(row)
            log.append({"split": s.label, "line": p.line, "key": p.key, "prompt": p.messages, **answer,
                        "left_out": reason if row is None else None})
        rows += [reference_row(p) for p in s.unasked]  # held out with their own answers, for the eval loss
        summary[s.label] = {"prompts": len(s.prompts), "rows": len(rows), "left_out": sum(left_out.values()),
                            "why": dict(left_out.most_common()), "unasked": len(s.unasked)}
        if s.traces:
            summary[s.label]["traces"] = s.traces
        print(f"Teacher ({s.label} {s.source}): {_sentence(summary[s.label])}", file=sys.stderr)
        if not rows:
            empty.append(f"the teacher's answers to all {len(s.prompts)} prompts of {s.label} were left out "
                         f"({_why(left_out)}); raise distill.max_tokens (now {config.max_tokens}) or check "
                         f"the teacher ({label}): its answers are the run's {ANSWERS_ARTIFACT}")
        files[s.label] = out_dir / f"{s.label.split('.')[1]}.jsonl"
        write_rows(files[s.label], rows)
    write_rows(out_dir / "answers.jsonl", log)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    mlflow.log_artifact(str(out_dir / "answers.jsonl"), "distill")
    mlflow.log_artifact(str(out_dir / "summary.json"), "distill")
    mlflow.set_tags({tag_names.DISTILL_TEACHER: label,
                     tag_names.DISTILL_ANSWERS: f"{len(unique)} prompts: {len(todo)} asked, "
                                                f"{len(unique) - len(todo)} from the cache"})
    if empty:
        raise FinetuneError("; ".join(empty))
    (out_dir / _DONE).write_text(json.dumps({k: str(v) for k, v in files.items()}))
    return _with_rows(recipe, files)


def _check_tokenizer(recipe) -> None:
    from mlflow_finetune_plugin.models.base import load_tokenizer

    model = recipe.model
    student = load_tokenizer(model.name, model.revision, model.trust_remote_code, model.chat_template,
                             recipe.project_dir)
    if differs := same_tokenizer(recipe.distill.teacher, student):
        raise FinetuneError(
            f"distill.loss: logits compares the teacher's and the student's distributions token by "
            f"token, but the tokenizer of {recipe.distill.teacher} is not the student's "
            f"({model.name or 'tiny'}): {differs}. Use a student of the teacher's family, or "
            "distill.loss: text")


def ask(config, todo: list, cache: AnswerCache, noun: tuple[str, str] = ("answer", "answers"),
        unit: str = "prompt", failed: dict | None = None) -> str:
    """Ask the teacher for `todo`'s answers (each has `.key`, `.messages`, `.tools`; a progress bar with the
    time left), caching each as it arrives; returns the teacher's label. A teacher that is down raises before
    any prompt is sent. Without `failed`, the first failed request stops the rest; with it, each failed
    request's error goes there by key (it is not cached: a rerun asks it again) and the others go on."""
    from tqdm.auto import tqdm

    teacher = teacher_of(config)
    teacher.start()  # the server answers and names its model, or this fails before any prompt is sent
    print(f"Teacher {teacher.label}: asking for {len(todo)} {noun[len(todo) != 1]} "
          f"({config.concurrency} at a time)", file=sys.stderr)
    start = time.perf_counter()
    try:
        with tqdm(total=len(todo), desc=f"Teacher {noun[1]}", unit=unit, file=sys.stderr,
                  mininterval=1.0) as bar:
            for prompt, answer in teacher.answers(todo, keep_going=failed is not None):
                if "error" in answer:
                    failed[prompt.key] = answer["error"]
                else:
                    cache.put(prompt.key, answer)
                bar.update(1)
    finally:
        teacher.close()
    print(f"Teacher {teacher.label}: {len(todo)} {noun[1]} in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return teacher.label


def _answers_of_resumed_run(recipe, cache: AnswerCache) -> int:
    """Answers the run `train.resume` names logged with the same teacher, added to the cache (a run resumed on
    another machine asks only for the prompts that run had not answered)."""
    resume = recipe.train.resume
    if not resume or resume == "latest" or resume.startswith("m-"):
        return 0
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            summary = mlflow.artifacts.load_dict(f"runs:/{resume}/{SUMMARY_ARTIFACT}")
            if summary.get("cache_key") != cache_key(recipe.distill):
                return 0
            local = mlflow.artifacts.download_artifacts(run_id=resume, artifact_path=ANSWERS_ARTIFACT,
                                                        dst_path=tmp)
        except Exception:  # noqa: BLE001 - the resumed run asked no teacher, or another one: nothing to reuse
            return 0
        return cache.add_lines(Path(local).read_text(encoding="utf-8").splitlines())


def _rank0_rows(recipe, out_dir: Path):
    """Another rank: the rows rank 0 wrote (it asks the teacher; torchrun stops this rank if rank 0 fails)."""
    done = out_dir / _DONE
    while not done.exists():
        time.sleep(0.5)
    return _with_rows(recipe, {k: Path(v) for k, v in json.loads(done.read_text()).items()})


def _with_rows(recipe, files: dict):
    data = recipe.data.model_copy(update={
        "train": str(files["data.train"]), "eval": str(files["data.eval"]) if "data.eval" in files else None,
        "eval_split": 0.0, "format": "chat", "columns": None, "tags": None, "traces": None})
    return recipe.model_copy(update={"data": data})


def _why(left_out: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in left_out.most_common())


def _sentence(s: dict) -> str:
    """`12 prompts, 10 chat rows, 2 left out: 1 empty answer, 1 answer cut off ...`; the chat rows include the
    held-out rows kept unasked with their references."""
    return (
        f"{s['prompts']} prompt{'s' if s['prompts'] != 1 else ''}, {s['rows']} chat rows, {s['left_out']} "
        "left out"
        + (f": {_why(Counter(s['why']))}" if s["why"] else "")
        + (f"; {s['unasked']} more held out with their references, not asked" if s.get("unasked") else "")
        + (f" ({s['traces']})" if s.get("traces") else ""))
