"""`eval`: what is scored after training, against which prompt-only contenders, and how the `optimized`
contender's prompt search is bounded (`eval.optimize`; the search itself is `evaluate/prompt_search.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from mlflow_finetune_plugin.config.distill import is_registered
from mlflow_finetune_plugin.config.section import Section
from mlflow_finetune_plugin.metrics import DEFAULT_MIN_GAIN

# The prompt-only contenders a recipe can switch (`eval.contenders`); the tuned model is always scored.
PROMPT_CONTENDERS = ("base", "fewshot", "retrieval", "optimized")


def general_text_file(value, bundled: str):
    """A key that names general text (`data.replay`, `eval.forgetting`): true, false, or a .txt / .jsonl
    file."""
    if isinstance(value, str) and not value.endswith((".txt", ".jsonl")):
        raise ValueError(f"expected true ({bundled}), false (off) or a .txt / .jsonl file of general text")
    return value


class OptimizeConfig(Section):
    """The `optimized` contender: instructions x shot sets searched on a dev split of the train rows, the best
    one answering the held-out rows."""

    dev_rows: int = Field(
        8, ge=2, description="train rows held apart to score the optimized contender's candidates on (never "
                             "shots; at most half the train rows; below 4 the contender is skipped, with "
                             "the reason)")
    budget: float = Field(
        1.0, gt=0, description="the prompt search's answers as a multiple of one contender pass over the "
                               "held-out rows: budget x held-out rows / dev rows candidates; fewer than 2: "
                               "skipped, with the reason")
    shot_sets: int = Field(
        2, ge=0, description="random sets of `eval.fewshot_k` train shots tried, beside no shots and "
                             "retrieved shots")
    instructions: int = Field(
        3, ge=0, description="instructions a proposer is asked for (0: none asked; the rows' own are tried)")
    proposer: str | None = Field(
        None, description="a stronger model that writes instructions: an OpenAI-compatible base URL "
                          "(`http://HOST:PORT/v1`), checked before training; null: `distill.teacher` when "
                          "it is a URL (if it is down, the rows' own instructions), else the rows' own")
    proposer_model: str | None = Field(
        None, description="the model name to ask the proposer for; null: `distill.model`, else the one "
                          "model the server lists")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="environment variable holding the proposer's API key (never logged)")
    metric: Literal["rougeL", "token_f1", "exact_match", "chrf"] = Field(
        "rougeL", description="what the search maximises on the dev rows "
                              "([methods.md](methods.md#the-optimized-prompt-optimized-the-contender-a-prompt-engineer-would-bring))")

    @field_validator("proposer")
    @classmethod
    def _proposer(cls, value):
        if value is not None and (is_registered(value) or not value.startswith(("http://", "https://"))):
            raise ValueError(
                "use an OpenAI-compatible base URL (http://HOST:PORT/v1); for a registered model, serve "
                "it with `mlflow-finetune serve` and give its URL")
        return value


class EvalConfig(Section):
    enabled: bool = Field(True, description="evaluate (and hold out data) at all")
    max_examples: int = Field(50, gt=0, description="held-out rows scored (the first N)")
    max_new_tokens: int = Field(
        64, gt=0, description="answer length limit, greedy; the pre-flight warns when scored reference "
                              "answers are longer")
    num_beams: int = Field(
        1, ge=1, description="beam search in every contender's answers (1: greedy); logged with the model: "
                             "its pyfunc `num_beams` param and the playground's Beams setting default to "
                             "it, so `predict` and the playground decode as the evaluation did (beam "
                             "answers come whole, not token by token). `mlflow-finetune serve` follows the "
                             "client's request (OpenAI's API has no beam search; vLLM's server takes its "
                             "`use_beam_search` extension)")
    batch_size: int = Field(
        32, gt=0, description="prompts generated and scored together (left-padded); lower it if memory runs "
                              "out")
    contenders: list[Literal[PROMPT_CONTENDERS]] = Field(
        list(PROMPT_CONTENDERS), description="the prompt-only contenders scored beside the tuned model; "
                                             "leave one out to skip it (`[base, fewshot, retrieval]`: no "
                                             "prompt search). Which ran, and why the others did not, is "
                                             "printed and tagged (`finetune.eval.contenders`)")
    fewshot_k: int = Field(
        3, ge=0, description="train examples in the few-shot prompt; 0 skips that contender")
    traces: bool = Field(
        True, description="log each held-out example with every contender's answer and scores as a trace "
                          "(`mlflow.genai.evaluate` with the answers already generated and code scorers: "
                          "MLflow's evaluation view); about 0.3 s a row on 2 CPU cores; false skips it")
    retrieval_k: int | None = Field(
        None, ge=0, description="train conversations most similar to each held-out question (BM25 over the "
                                "user turns; never the question itself) given to the base model as shots; "
                                "null: `eval.fewshot_k`; 0 skips that contender")
    optimize: OptimizeConfig = Field(OptimizeConfig(), description="The optimized contender's prompt search.")
    reuse_answers: bool = Field(
        True, description="keep the base model's answers (zero-shot, few-shot, retrieval, the prompt "
                          "search's candidates) on this machine, under the cache root's `answers/`, and "
                          "reuse them in a later run whose base weights, prompts, references, generation "
                          "settings, versions and machine are all the same (a rerun, another seed, a "
                          "sweep's trials); printed when used; the tuned model always answers "
                          "([methods.md](methods.md#the-optimized-prompt-optimized-the-contender-a-prompt-engineer-would-bring))")
    teacher_params: int | None = Field(
        None,
        gt=0,
        description="parameters of the teacher whose answers the held-out rows carry (row key "
        "`teacher`), for its `params` cost column and the verdict's parameter "
        "ratio; null: the rows' own `teacher.params` where a registered `-e "
        "distill` teacher wrote it, else unknown, and the verdict says so "
        "([methods.md](methods.md#retrieval-prompting-and-the-verdict-did-fine-tuning-pay-off))",
    )
    output_format: Literal["text", "json"] = Field(
        "text", description="json: also score `json_valid`, the share of answers that parse (and fit "
                            "`json_schema`)")
    json_schema: dict | None = Field(
        None, description="JSON Schema the answers must conform to (with `output_format: json`)")
    min_gain: float | dict[str, float] = Field(
        DEFAULT_MIN_GAIN,
        description="the least gain over the best prompt-only contender that counts as "
        "fine-tuning paying off, beside the bootstrap's interval above 0 (the "
        "default promotion gate follows that verdict). A number: on a metric "
        "scored 0-1 (`rougeL`, `exact_match`, `token_f1`, `chrf`, "
        "`fact_recall`, `json_valid`, `pair_accuracy`, `misrouted`, ...) in "
        "its units; on another (`reward`) a share of the range its "
        "per-example scores span across the contenders. A mapping gives named "
        "metrics their gain in their own units (`{reward: 0.2}`); others take "
        "0.05 as above. 0: any gain beyond the noise pays off. Logged as "
        "`eval/verdict/min_gain`; the default and the runs it was chosen by: "
        "[methods.md](methods.md#retrieval-prompting-and-the-verdict-did-fine-tuning-pay-off)",
    )
    forgetting: bool | str = Field(
        True, description="loss and perplexity of base and tuned on general text (`eval/forgetting/*`): "
                          "true: the bundled set; a `.txt` (paragraphs split by blank lines) or `.jsonl` "
                          "(`{\"text\": ...}` rows) file; false: off")

    @field_validator("min_gain", mode="before")
    @classmethod
    def _gain(cls, value):
        gains = list(value.values()) if isinstance(value, dict) else [value]
        if isinstance(value, dict) and not value:
            raise ValueError("give a number (e.g. 0.05) or {metric: gain} naming at least one metric")
        if any(isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0 for g in gains):
            raise ValueError(f"expected a number >= 0 (e.g. 0.05; 0: any gain beyond the noise pays off) or "
                             f"{{metric: number >= 0}}, got {value!r}; a gain is a difference in the "
                             "metric's better direction")
        return value

    @field_validator("forgetting")
    @classmethod
    def _forgetting_file(cls, value):
        return general_text_file(value, "the bundled set")
