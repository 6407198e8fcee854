"""`distill`: a teacher answers the training prompts before the student trains on its answers (`-e distill`,
docs/distill.md); the asking itself is `distill/`."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from mlflow_finetune_plugin.config.section import Section

MODELS_PREFIX = "models:/"


def is_registered(teacher: str) -> bool:
    """A teacher that is a registered model (`models:/NAME@ALIAS`, `models:/NAME/VERSION`), run in this
    process."""
    return teacher.startswith(MODELS_PREFIX)


class TeacherConfig(Section):
    """A teacher model and how it is asked: an OpenAI-compatible server, or a registered model run here.
    Shared by `distill:` (it answers prompts) and `questions:` (it writes questions from documents)."""

    # The recipe section it is read from: the teacher's errors name its keys there (`distill.teacher`, ...).
    SECTION: ClassVar[str] = "distill"
    teacher: str | None = Field(
        None, description="an OpenAI-compatible base URL (`http://HOST:PORT/v1`), or `models:/NAME@ALIAS` / "
                          "`models:/NAME/VERSION` run in the training process")
    model: str | None = Field(
        None, json_schema_extra={"default_text": "empty (the one model the server lists)"},
        description="the model to ask the server for")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="environment variable holding the key (never logged; unset: no key "
                                      "sent)")
    concurrency: int = Field(
        4, ge=1, description="requests in flight (a registered-model teacher: prompts, or for `questions:` "
                             "chunks, per batch)")
    max_tokens: int = Field(
        256, gt=0, description="the longest answer; answers cut here are left out and counted")
    stop: list[str] = Field(default_factory=list, description="stop sequences (OpenAI's `stop`)")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy")
    timeout_s: float = Field(120.0, gt=0, description="seconds one answer may take")

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, value):
        if value is None:
            return value
        value = value.strip()
        if is_registered(value):
            rest = value[len(MODELS_PREFIX):]
            if not rest or ("@" not in rest and "/" not in rest):
                raise ValueError("a registered teacher is models:/NAME@ALIAS or models:/NAME/VERSION")
        elif not value.startswith(("http://", "https://")):
            raise ValueError(
                "expected an OpenAI-compatible base URL (http://HOST:PORT/v1) or a registered model "
                "(models:/NAME@ALIAS, models:/NAME/VERSION)")
        return value


class DistillConfig(TeacherConfig):
    """The teacher that answers the prompts of `data.train` (and `data.eval`): a file of prompts or chats, or
    `traces:EXPERIMENT`. Its answers are cached (a rerun or a resumed run asks only for prompts not answered
    yet) and logged with the run as `distill/answers.jsonl`."""

    loss: Literal["text", "logits"] = Field(
        "text", description="`text`: the teacher's answers as text; `logits`: also KL(teacher || student) "
                            "on every answer token (a registered teacher sharing the student's tokenizer)")
    kl_weight: float = Field(1.0, gt=0, description="`logits`: the weight of the KL term beside the SFT loss")
    max_prompts: int | None = Field(
        None, gt=0, description="the most prompts the run asks the teacher for: the held-out ones first (at "
                                "most `eval.max_examples`), then the first training prompts up to the cap; "
                                "null: every prompt the run uses. Whatever the cap, only the prompts the "
                                "run uses are asked (the first `data.max_rows` training prompts, the first "
                                "`eval.max_examples` held-out ones); a cap that leaves no training prompt "
                                "is refused before the run exists "
                                "([distill.md](distill.md#what-the-teacher-is-asked-and-what-it-costs))")
