"""`eval`: what is scored after training, against which prompt-only contenders, and how the `optimized` contender's
prompt search is bounded (`eval.optimize`; the search itself is `evaluate/prompt_search.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from mlflow_finetune_plugin.config.distill import is_registered
from mlflow_finetune_plugin.config.section import Section
from mlflow_finetune_plugin.metrics import DEFAULT_MIN_GAIN

# The prompt-only contenders a recipe can switch (`eval.contenders`); the tuned model is always scored.
PROMPT_CONTENDERS = ("base", "fewshot", "retrieval", "optimized")


def general_text_file(value, bundled: str):
    """A key that names general text (`data.replay`, `eval.forgetting`): true, false, or a .txt / .jsonl file."""
    if isinstance(value, str) and not value.endswith((".txt", ".jsonl")):
        raise ValueError(f"expected true ({bundled}), false (off) or a .txt / .jsonl file of general text")
    return value


class OptimizeConfig(Section):
    """The `optimized` contender: instructions x shot sets searched on a dev split of the train rows, the best one
    answering the held-out rows."""

    dev_rows: int = Field(8, ge=2, description="Train rows held apart to score the candidates on (never shots); "
                                               "at most half the train rows.")
    budget: float = Field(1.0, gt=0, description="The search's answers as a multiple of one contender's pass over "
                                                 "the held-out rows: candidates = budget x held-out rows / dev rows.")
    shot_sets: int = Field(2, ge=0, description="Random sets of eval.fewshot_k train shots tried, beside no shots "
                                                "and retrieved shots.")
    instructions: int = Field(3, ge=0, description="Instructions a proposer is asked for (0: none asked).")
    proposer: str | None = Field(None, description="A stronger model that writes instructions: an OpenAI-compatible "
                                                   "base URL (http://HOST:PORT/v1); default: distill.teacher when it "
                                                   "is a URL; none: instructions from the rows themselves.")
    proposer_model: str | None = Field(None, description="The model name to ask the proposer for; default: "
                                                         "distill.model, else the one the server lists.")
    api_key_env: str = Field("OPENAI_API_KEY", description="The environment variable holding the proposer's API key.")
    metric: Literal["rougeL", "token_f1", "exact_match", "chrf"] = Field(
        "rougeL", description="What the search maximises on the dev rows.")

    @field_validator("proposer")
    @classmethod
    def _proposer(cls, value):
        if value is not None and (is_registered(value) or not value.startswith(("http://", "https://"))):
            raise ValueError("use an OpenAI-compatible base URL (http://HOST:PORT/v1); for a registered model, serve "
                             "it with `mlflow-finetune serve` and give its URL")
        return value


class EvalConfig(Section):
    enabled: bool = True
    max_examples: int = Field(50, gt=0, description="Held-out rows scored after training (the first N).")
    max_new_tokens: int = Field(64, gt=0)
    num_beams: int = Field(1, ge=1, description="Beam search in every contender's answers (1: greedy). Recorded as the "
                                                "logged model's default `num_beams` for pyfunc predictions.")
    batch_size: int = Field(32, gt=0, description="Prompts generated and scored together; lower it if memory runs out.")
    contenders: list[Literal[PROMPT_CONTENDERS]] = Field(
        list(PROMPT_CONTENDERS), description="The prompt-only contenders scored beside the tuned model; leave one "
                                             "out to skip it (e.g. optimized, the prompt search).")
    fewshot_k: int = Field(3, ge=0, description="Train examples in the few-shot prompt; 0 skips that contender.")
    traces: bool = Field(True, description="Log each held-out example with every contender's answer and scores "
                         "as a trace (mlflow.genai.evaluate: MLflow's evaluation view); about 0.3 s a row.")
    retrieval_k: int | None = Field(
        None, ge=0, description="Train conversations most similar to each held-out question (BM25 over the user "
                                "turns) given to the base model as shots; default: fewshot_k; 0 skips that contender.")
    optimize: OptimizeConfig = Field(OptimizeConfig(), description="The optimized contender's prompt search.")
    reuse_answers: bool = Field(
        True, description="Keep the base model's answers (zero-shot, few-shot, retrieval, the prompt search's) on "
                          "this machine and reuse them in a later run whose base weights, prompts, references and "
                          "generation settings are all the same (a rerun, another seed, a sweep's trials); printed "
                          "when used. The tuned model always answers. false: answer again.")
    teacher_params: int | None = Field(None, gt=0, description="Parameters of the teacher whose answers the held-out "
                                       "rows carry (`teacher`), for the cost columns; unknown when not given.")
    output_format: Literal["text", "json"] = Field(
        "text", description="json: also score `json_valid`, the share of answers that parse (and fit json_schema).")
    json_schema: dict | None = Field(None, description="JSON Schema the answers must conform to (output_format json).")
    min_gain: float | dict[str, float] = Field(
        DEFAULT_MIN_GAIN, description="The least gain over the best prompt-only contender that counts as fine-tuning "
                                      "paying off (beside the bootstrap's interval above 0): a number, on a 0-1 "
                                      "metric in its units (rougeL, exact_match, ...), on any other (reward) a share "
                                      "of the range its scores span; or {metric: gain} in each metric's own units.")
    forgetting: bool | str = Field(
        True, description="Loss and perplexity of the base and the tuned model on general text the run did not train "
                          "on (eval/forgetting/*): true: the set bundled with the package; a .txt (paragraphs "
                          "split by blank lines) or .jsonl ({\"text\": ...} rows) file of your own; false: off.")

    @field_validator("min_gain", mode="before")
    @classmethod
    def _gain(cls, value):
        gains = list(value.values()) if isinstance(value, dict) else [value]
        if isinstance(value, dict) and not value:
            raise ValueError("give a number (e.g. 0.05) or {metric: gain} naming at least one metric")
        if any(isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0 for g in gains):
            raise ValueError(f"expected a number >= 0 (e.g. 0.05; 0: any gain beyond the noise pays off) or "
                             f"{{metric: number >= 0}}, got {value!r}; a gain is a difference in the metric's "
                             "better direction")
        return value

    @field_validator("forgetting")
    @classmethod
    def _forgetting_file(cls, value):
        return general_text_file(value, "the bundled set")
