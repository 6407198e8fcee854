"""The recipe's schema: `finetune.yaml` as typed, strict sections (pydantic), one class per section.

A fine-tune is four choices: the adapter (`adapter:`, one section whose `type` picks lora, ia3, prefix,
prompt, bottleneck or full), the quantization of the base (`model.quantization`), the objective (`objective:`
sft, dpo, orpo, simpo, grpo, reward or kto, each with its own section for its knobs) and the data (`data:`,
one set or a weighted mixture of `data.tasks`).
The entry point (`method`) is a preset over them (`presets.py`), and recipes written with the older per-method
sections (`lora:`, `qlora:`, `multitask:`, ...) are read onto the axes there.

Unknown keys are errors and values are checked on assignment too. Reading the file and the `-P` overrides into
these sections is `loading.py`; combinations no single key can judge are `checks.py`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from mlflow_finetune_plugin.config.adapters import (  # noqa: F401 (their import path since the schema began)
    ADAPTER_CONFIGS,
    AdapterConfig,
    BottleneckAdapter,
    FullAdapter,
    IA3Adapter,
    LoraAdapter,
    PrefixAdapter,
    PromptAdapter,
)
from mlflow_finetune_plugin.config.distill import DistillConfig
from mlflow_finetune_plugin.config.documents import QuestionsConfig, RetrievalConfig
from mlflow_finetune_plugin.config.evaluation import EvalConfig, general_text_file
from mlflow_finetune_plugin.config.gates import Gate
from mlflow_finetune_plugin.config.monitor import MonitorConfig
from mlflow_finetune_plugin.config.objectives import (  # noqa: F401 (their import path since the schema began)
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    ORPOConfig,
    RewardConfig,
    SimPOConfig,
)
from mlflow_finetune_plugin.config.section import Section
from mlflow_finetune_plugin.config.traces import TracesConfig

RECIPE_FILE = "finetune.yaml"
HF_PREFIX = "hf:"  # data.train / data.eval naming a Hugging Face dataset instead of a file
TRACES_PREFIX = "traces:"  # data.train / data.eval naming an MLflow experiment whose traces are the rows

# Short forms accepted by `-P`, mapped to their dotted recipe keys.
SHORT_KEYS = {
    "model": "model.name",
    "data": "data.train",
    "max_steps": "train.max_steps",
    "epochs": "train.epochs",
    "registered_model": "registry.name",
    "resume": "train.resume",
}


class ModelConfig(Section):
    name: str | None = Field(
        None, json_schema_extra={"default_text": "empty (= `tiny`)"},
        description="hub id, local folder, or a built-in model: `smollm2`, `gemma3`, `tiny`, or a tiny "
                    "random model of a chat family: `tiny-llama3`, `tiny-qwen2.5`, `tiny-qwen3`, "
                    "`tiny-gemma3`, `tiny-mistral`, `tiny-phi3.5` (see below)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of `model.name`")
    trust_remote_code: bool = Field(
        False, description="run the model's own code from the hub (`data.packing: auto` then stays off: "
                           "custom attention may ignore `position_ids`)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the loaded weights; auto: bf16 on a GPU that supports it, else "
                            "float32")
    attn_implementation: str | None = Field(
        None, description="transformers' attention kernel (`sdpa`, `eager`, `flash_attention_2`, ...); a "
                          "flash-attention one makes `data.packing: auto` pack")
    chat_template: str | None = Field(
        None, json_schema_extra={"default_text": "empty (the tokenizer's own)"},
        description="the chat template to train and serve with, over the tokenizer's own: a bundled one "
                    "(`chatml`, `llama3`, `qwen`, `qwen3`, `gemma`, `mistral`, `phi3`, `gemma4`, `qwen3_5`, "
                    "`qwen3_5_think`, `gptoss`, verbatim from the vendors) or a `.jinja` file relative to "
                    "the project. Needed by base models, which have none (a model with neither is refused "
                    "before any run exists). Its control tokens are added to the tokenizer where missing "
                    "(the embeddings grow), and get trainable embedding rows under LoRA (PEFT's "
                    "`trainable_token_indices`; tag `finetune.trainable_tokens`), so a base model learns to "
                    "end its turn; the logged model carries the template. Other PEFT adapters cannot train "
                    "the rows and say so; `full` trains every row. [models](models.md)")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", json_schema_extra={"default_text": "`none` (`4bit` for `-e qlora`)"},
        description="load the frozen base in 4-bit NF4/FP4 (QLoRA) or 8-bit (LLM.int8) through bitsandbytes")
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type; NF4 suits normally distributed weights")
    double_quant: bool = Field(
        True, description="quantize the 4-bit quantization constants too (~0.4 bit/param saved)")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the 4-bit matmuls; auto: bfloat16 on CUDA, float32 on CPU")
    init_adapter: str | None = Field(
        None, description="continue this adapter instead of a fresh one (`models:/NAME@ALIAS`, "
                          "`models:/NAME/N`, `runs:/ID/model`, or an adapter folder); its own configuration "
                          "replaces `adapter:`")


class DataColumns(Section):
    """The file's column for each field, where names differ (LLaMA-Factory's `columns`): `{prompt:
    question}`."""

    messages: str | None = Field(None, description="the conversation: chat messages or ShareGPT turns")
    prompt: str | None = Field(
        None, description="the prompt (prompt_completion, preference, prompt_only rows)")
    completion: str | None = Field(
        None, description="the answer (prompt_completion, unpaired_preference rows)")
    chosen: str | None = Field(None, description="the preferred answer (preference rows)")
    rejected: str | None = Field(None, description="the answer not preferred (preference rows)")
    label: str | None = Field(
        None, description="unpaired_preference: true for a desirable answer, false if not")
    system: str | None = Field(None, description="a per-row system prompt (text)")
    tools: str | None = Field(
        None, description="a per-row list of tools: OpenAI function schemas, or JSON text")
    instruction: str | None = Field(None, description="alpaca: the instruction")
    input: str | None = Field(None, description="alpaca: the input added to the instruction")
    output: str | None = Field(None, description="alpaca: the answer")
    images: str | None = Field(
        None, description="the row's images, one per image placeholder, in order ([Images](#images))")


class DataTags(Section):
    """ShareGPT role tags (LLaMA-Factory's `tags` in dataset_info.json): which keys and role names the turns
    use."""

    role_tag: str = Field("from", description="the key holding a turn's role")
    content_tag: str = Field("value", description="the key holding a turn's text")
    user_tag: str = Field("human", description="the role name of the user")
    assistant_tag: str = Field("gpt", description="the role name of the assistant")
    observation_tag: str = Field("observation", description="a tool's result (becomes a `tool` message)")
    function_tag: str = Field(
        "function_call", description="the assistant calling a tool (JSON name + arguments)")
    system_tag: str = Field("system", description="the role name of a system turn")


class Task(Section):
    """One task of a data mixture."""

    train: str = Field(description="the task's training file, relative to the project")
    eval: str | None = Field(None, description="held-out file; empty: `data.eval_split` of train, or none")
    weight: float = Field(1.0, gt=0, description="mixing weight; rows are drawn in proportion to the weights")
    format: Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion"] = Field(
        "auto", description="detected per file (this task's train and eval each), so tasks may mix formats")
    system_prompt: str | None = Field(None, description="system message added to this task's rows")


class DataConfig(Section):
    train: str | None = Field(
        "data/train.jsonl", description="a file, a Hugging Face dataset `hf:ORG/NAME[@REVISION][:SPLIT]` "
                                        "(split default `train`), or an MLflow experiment's traces "
                                        "`traces:EXPERIMENT` ([docs/traces.md](traces.md))")
    eval: str | None = Field(
        None, description="held-out file, `hf:ORG/NAME[@REVISION]:SPLIT`, or `traces:EXPERIMENT`")
    traces: TracesConfig | None = Field(None,
                                        description="Which traces a traces: source reads, and how feedback "
                                                    "and expectations count (docs/traces.md).")
    eval_split: float = Field(
        0.0, ge=0.0, lt=1.0, description="held-out share of train when no eval file is given")
    documents: str | None = Field(
        None, description="a folder (every `.md`, `.markdown`, `.txt`, `.text`, `.html`, `.htm`, `.pdf` "
                          "under it, hidden files aside) or a glob of documents, relative to the project. "
                          "Read before any run exists (Markdown and text by line, HTML by the standard "
                          "library's parser without scripts and styles, PDF page by page with `pypdf`), "
                          "chunked along headings (Markdown `#`, HTML h1-h6) and paragraphs, never across a "
                          "heading or a PDF page; each chunk's text starts with its heading path (`Returns "
                          "> Refunds`) so retrieval finds it by its section's subject. Duplicate chunks are "
                          "kept once; unreadable and empty files are warnings (errors with `data.strict`). "
                          "Question rows come from `data.train` (with `source` keys) or from a "
                          "`questions.teacher`; logged as the run's `documents` input with "
                          "`documents/report.json`. Check it alone: `mlflow-finetune data check --documents "
                          "PATH`")
    documents_holdout: list[str] | float = Field(
        default_factory=list, description="whole documents kept out of training, their questions the "
                                          "held-out set: paths, folders or globs relative to "
                                          "`data.documents` (one that matches nothing is refused, listing "
                                          "the documents), or a share in [0, 1) picked by `train.seed` (at "
                                          "least one document when above 0; all of them is refused)")
    chunk_tokens: int = Field(
        256, ge=16, description="the longest chunk, in tokens of the model's tokenizer (the preflight "
                                "estimates words x 1.3); consecutive paragraphs of a section are merged up "
                                "to it, a longer paragraph split at sentence ends, then between words")
    format: Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "preference",
                    "prompt_only", "unpaired_preference"] = Field(
        "auto", description="the rows' format; auto detects it from each file's own rows (train and eval "
                            "may differ)")
    columns: DataColumns | None = Field(
        None, description="the file's column for each field, where names differ (below)")
    tags: DataTags | None = Field(
        None, description="ShareGPT role tags, where they differ from LLaMA-Factory's (below)")
    system_prompt: str | None = Field(
        None, description="system message for rows that have none (a row's own system message or `system` "
                          "column wins)")
    max_length: int = Field(
        1024, gt=0, description="longest training row in tokens (prompt + answer; packed rows' length)")
    assistant_only_loss: bool = Field(
        True, description="loss on each assistant reply and its end-of-turn token only, for any chat "
                          "template (the turns are found by rendering the row up to each reply, "
                          "`models/chat_format.py`; no `{% generation %}` markers needed); false trains "
                          "every token but weight-0 turns. Tags `finetune.loss_on` (`assistant` / `all`) "
                          "and `finetune.loss_share` (the share of training tokens the loss covers)")
    packing: bool | Literal["auto"] = Field(
        "auto", description="pack examples into rows of up to `max_length`, attention kept within each; "
                            "auto: on with a flash-attention `model.attn_implementation`; off for "
                            "prefix/prompt tuning and remote code; otherwise on when one epoch of the "
                            "tokenized training rows is estimated at least 1.1x as fast packed as padded "
                            "(printed, and tagged `finetune.packing`; "
                            "[methods](methods.md#sequence-packing)). A recipe's `true` is turned off, with "
                            "a one-line note, when the entry point trains prefix or prompt tuning (`-e "
                            "prefix` on support-bot); `true` given together with such an adapter (both in "
                            "the recipe, or `-P data.packing=true -e prefix`) is refused")
    max_rows: int | None = Field(
        None, gt=0, json_schema_extra={"default_text": "empty (all)"},
        description="use the first N training rows (per task in a mixture)")
    strict: bool = Field(
        False, description="data warnings (few rows, near-duplicates, train/eval overlap, answers cut, "
                           "contradictions) stop the run like errors")
    tasks: dict[str, Task] = Field(
        default_factory=dict, json_schema_extra={"default_text": "empty (one set)"},
        description="a weighted mixture instead of one set (two or more; then `data.train`/`data.eval` stay "
                    "empty)")
    stopping: Literal["all_exhausted", "first_exhausted"] = Field(
        "all_exhausted", description="mixtures: an epoch ends when every task (or the first one) has run "
                                     "out")
    adapters: Literal["shared", "per_task"] = Field(
        "shared", description="mixtures: one adapter on the mixture, or one per task (registered as "
                              "`<registry.name>-<task>`)")
    replay: bool | str = Field(
        False, description="general text mixed into training against forgetting (language-model loss on "
                           "every token, no chat template; sft only): true: the prose bundled with the "
                           "package (`assets/replay/`, apart from `eval.forgetting`'s set); a `.txt` "
                           "(paragraphs split by blank lines) or `.jsonl` (`{\"text\": ...}` rows) file; "
                           "logged as the run's `replay` input. "
                           "[methods](methods.md#replay-against-forgetting-datareplay)")
    replay_share: float = Field(
        0.2, gt=0.0, lt=1.0, description="lm: share of all training rows that are replay rows (0.2: one in "
                                         "five, so 419 rows get 105 more)")
    replay_loss: Literal["lm", "kl"] = Field(
        "lm", description="lm: replay rows join the training rows with the language-model loss; kl: the "
                          "training rows stay as they are and training also pulls the tuned model's "
                          "next-token distribution on a replay row towards the base model's (KL(base || "
                          "tuned), the base being the adapter switched off; adapters only; "
                          "`train/replay_kl` logged, and `train/task_loss`, the loss without the KL term)")
    replay_weight: float = Field(1.0, gt=0.0, description="kl: weight of the KL term against the task's loss")
    replay_every: int = Field(
        1, ge=1, description="kl: score a replay row on one training step in N, its KL weighted xN (the "
                             "same average pull for N times fewer extra passes)")

    @field_validator("replay")
    @classmethod
    def _replay_file(cls, value):
        return general_text_file(value, "the bundled prose")

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks):
        bad = [n for n in tasks if not n.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(
                f"task names {bad} must be letters, digits, '-' or '_' (they become metric names)")
        return tasks


class TrainConfig(Section):
    epochs: float = Field(3.0, gt=0, description="passes over the training data")
    max_steps: int = Field(-1, description="overrides epochs when > 0")
    batch_size: int | Literal["auto"] = Field(
        8, description="rows per device per step (packed rows with packing; GRPO: completions, not "
                       "prompts); `auto`: the largest of 64, 32, ... 1 that the memory plan fits in this "
                       "machine's device (GPU memory, or the RAM available), gradient accumulation raised to "
                       "keep 8 x `grad_accum` rows per update; printed, tagged `finetune.memory_plan`, and "
                       "the planned peak logged as `train/planned_peak_*_gib` beside the measured "
                       "`train/peak_*_gib` (`mlflow-finetune plan`, [gpu.md](gpu.md)); not with GRPO")
    grad_accum: int = Field(1, gt=0, description="steps accumulated per optimizer update")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    lr_scheduler: str = Field(
        "cosine", description="a transformers scheduler name (`linear`, `constant`, ...)")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="share of the steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping")
    neftune_alpha: float | None = Field(
        None, gt=0, description="NEFTune: noise of scale alpha/sqrt(tokens x hidden) on the input "
                                "embeddings while training (transformers' `neftune_noise_alpha`), e.g. 5")
    seed: int = Field(42, description="seed of the adapter's initial weights, the data order and mixtures")
    logging_steps: int = Field(10, gt=0, description="log `train/*` metrics every N steps")
    save_steps: int = Field(
        100, gt=0, description="checkpoint every N steps, and at the last step whatever N is (logged for "
                               "resume, and as a logged model `checkpoint-N` with the eval loss there)")
    save_last_epochs: int = Field(
        0, ge=0, description="also a checkpoint at the end of each of the last N epochs, whatever "
                             "`save_steps` is (a step is saved once); `openai-api` jobs: 3, as OpenAI keeps "
                             "them")
    save_total_limit: int = Field(2, gt=0, description="checkpoints kept on local disk")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        False, description="recompute activations in the backward pass (less memory; not with prefix "
                           "tuning); `auto`: on only where the memory plan needs it to fit the batch in "
                           "this machine's device (printed and tagged `finetune.memory_plan`)")
    rehearsal: bool = Field(
        True, description="before the first step, two rows through everything the run does after training: "
                          "one training step (gradients dropped, random state restored; not for GRPO, whose "
                          "first step generates its own batch), every contender's answers and scores with "
                          "the base loaded as after training, the forgetting check, the verdict, the "
                          "model's save and its reload as the logged model loads it (nothing missing or "
                          "unexpected, every weight equal to the model's). What those stages log goes to a "
                          "throwaway store in a temporary folder, not to any run: the run keeps only the "
                          "outcome, tag `finetune.rehearsal` (`passed in 2.3 s (2 rows through ...)`, or "
                          "`failed at STAGE`). A failure ends the run FAILED naming the stage, before any "
                          "training; `error.txt` holds the cause's traceback")
    fused_lm_head: bool | Literal["auto", "chunked"] = Field(
        "auto", description="how the SFT loss meets the LM head: `true` TRL's fused head (tiles of the "
                            "vocabulary, recomputed in the backward pass), `chunked` the head over chunks "
                            "of labelled tokens with each chunk's gradient taken at once (also the KL "
                            "replay term; never the whole logits), `false` the labelled positions' logits "
                            "all at once; auto: `true` with CUDA, `chunked` elsewhere (`false` with several "
                            "ranks, as DDP refuses gradients taken in the forward pass; `chunked` named "
                            "with several ranks falls back the same way, with a note) "
                            "([methods.md](methods.md#loss-computation))")
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="fused GPU kernels for training: `liger` puts Liger Kernel's Triton kernels "
                            "(RMSNorm, rotary embedding, SwiGLU) on the base model, and with "
                            "`train.fused_lm_head: auto` its fused linear cross-entropy computes the SFT "
                            "loss (no logits held or recomputed; an explicit `fused_lm_head` keeps the "
                            "plugin's head); CUDA only, for the model types Liger covers, after `pip "
                            "install liger-kernel` (from the project's clone: `pip install -e '.[gpu]'`; "
                            "PyPI, so offline machines can install it; TRL's Hub kernels are fetched at "
                            "run time and not offered). `auto`: "
                            "`liger` where CUDA, liger-kernel and the architecture allow, else `none` "
                            "(every CPU run). An explicit `liger` on a CPU or without liger-kernel is "
                            "refused before the model loads, naming the fix. The choice is printed and "
                            "tagged `finetune.kernels`")
    torch_compile: bool = Field(
        False, description="`torch.compile` each decoder layer while training (the class the model names in "
                           "`_no_split_modules`, compiled per layer as torchtune does: the identical layers "
                           "share one graph, so compile time does not grow with depth); the LM head and "
                           "loss stay as they are. The first steps compile (tens of seconds, and again for "
                           "each new batch shape without packing); evaluation and saving run the layers "
                           "uncompiled. Printed and tagged `finetune.kernels`. Measured on an H200 "
                           "(docs/benchmarks.md, \"GPU\"; its history, 7c): no faster than without it on a "
                           "~1B Llama with Liger's kernels; on a CPU slower for the tiny model")
    router_aux_loss: float | None = Field(
        None, ge=0, description="mixtures of experts: weight of the router's load-balancing loss added to "
                                "the training loss (TRL's `router_aux_loss_coef`; computed from the real "
                                "tokens' router logits, padded or packed); empty: the model config's own "
                                "`router_aux_loss_coef`; 0 turns it off. Printed and tagged "
                                "`finetune.router_aux_loss`; off for `grpo`, which decodes with the "
                                "training model")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes: a model copy per rank, or parameters, gradients and "
                           "optimizer state sharded (GPU; DDP on CPU, with a warning)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it; on a CPU, bf16 autocast (the LM head in "
                            "fp32, each LoRA update added to its base output in fp32) for LoRA + sft on an "
                            "unquantized base where a bf16 matmul measures at least 1.6x fp32 at run time, "
                            "fp32 otherwise; `bf16` on a CPU forces autocast (refused before anything loads "
                            "on a quantized base, which cannot train under it); printed with the measured "
                            "ratio and tagged `finetune.precision`")
    resume: str | None = Field(
        None, description="run id (or `latest`) whose last complete checkpoint to continue from, or one "
                          "checkpoint's model id (`m-...`)")
    system_metrics: bool = Field(
        True, description="log CPU, memory, disk, network and GPU use as `system/*` (or "
                          "`MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false` for every run)")
    system_metrics_interval: float = Field(5.0, gt=0, description="seconds between system metrics samples")
    stall_timeout: float = Field(
        3600.0, ge=0, description="the watchdog: once training starts, a stage (`train`, `evaluate`, "
                                  "`publish`) that goes this many seconds without progress (a training "
                                  "step, a batch of evaluation answers, the next stage) ends the run "
                                  "FAILED, the stage named in `finetune.error` and every thread's stack in "
                                  "`error.txt` (also printed), and the training process exits with code 1; "
                                  "for a process stuck on locks, which no SIGTERM stops. Raise it where one "
                                  "step, one batch of answers or logging the model takes longer; 0 turns it "
                                  "off. While it is on, a SIGTERM or SIGINT the process has not acted on 30 "
                                  "s later (its main thread stuck, so the signal's handler never runs) ends "
                                  "the run KILLED the same way, exit code 130")
    threads: int | None = Field(
        None, gt=0, description="torch threads of the training process (intra-op; inter-op is 1). Empty: "
                                "its share of the cores this process may use (CPU affinity in physical "
                                "cores, a cgroup quota), divided among this project's heavy processes "
                                "running on the machine (training jobs, `serve`'s engines, the playground), "
                                "counted again every few seconds while it trains and evaluates; the user's "
                                "`OMP_NUM_THREADS` fixes it too. Tagged `finetune.threads` with the reason; "
                                "a run that finds the machine busy prints one line "
                                "([scaling.md](scaling.md#one-machine-several-jobs))")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _positive_or_auto(cls, value):
        # one message for both forms (a union would report one error per member)
        if value == "auto":
            return value
        from pydantic_core import PydanticCustomError

        # a custom error: no "Value error, " before it, and the loader adds the value given ("(got ...)")
        wrong = PydanticCustomError("int_or_auto", "Input should be a whole number greater than 0, or `auto`")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise wrong from None
        if isinstance(value, bool) or number != value and str(number) != str(value).strip():
            raise wrong
        if number <= 0:
            raise wrong
        return number


class RegistryConfig(Section):
    Gate: ClassVar[type[Gate]] = Gate  # config/gates.py: the gate syntax, shared with `monitor.gates`

    name: str | None = Field(
        None, json_schema_extra={"default_text": "the project folder's name"},
        description="registered model name")
    enabled: bool = Field(True, description="register the logged model; false only logs it in the run")
    alias: str | None = Field("challenger", description="alias given to every new version; empty: none")
    champion_alias: str = Field("champion", description="the alias `mlflow-finetune promote` moves")
    auto_promote: bool = Field(
        False, description="move the champion alias at the end of a run whose gates pass")
    promote_if: list[Gate] = Field(
        default_factory=lambda: [RegistryConfig.Gate(metric="rougeL")],
        description="promotion gates; every one must pass")
    parity: Literal["transformers", "vllm", "off"] = Field(
        "transformers", description="serving parity before the champion alias moves ([promote](#promote)): "
                                    "the engine that answers the held-out prompts; `off` skips it, recorded "
                                    "on the version")


OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "grpo", "reward", "kto")


class Recipe(Section):
    method: str = Field("lora", description="the entry point (a preset over the axes); `-e` sets it")
    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = Field(LoraAdapter(), description="the adapter")
    objective: Literal[OBJECTIVES] = Field(
        "sft", json_schema_extra={"default_text": "from the preset (`sft`)"},
        description="what training optimizes; its knobs are in the section of the same name")
    dpo: DPOConfig = DPOConfig()
    orpo: ORPOConfig = ORPOConfig()
    simpo: SimPOConfig = SimPOConfig()
    grpo: GRPOConfig = Field(default_factory=lambda: GRPOConfig())
    reward: RewardConfig = RewardConfig()
    kto: KTOConfig = KTOConfig()
    data: DataConfig = DataConfig()
    distill: DistillConfig | None = Field(None,
                                          description="A teacher answers data.train's prompts (-e distill).")
    retrieval: RetrievalConfig = Field(RetrievalConfig(),
                                       description="Retrieval over data.documents' chunks.")
    questions: QuestionsConfig | None = Field(
        None, description="A teacher writes question rows from data.documents' chunks (docs/documents.md).")
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    monitor: MonitorConfig = Field(MonitorConfig(),
                                   description="Served traffic after promotion (`mlflow-finetune monitor`).")
    # Not user keys: filled in by load_recipe so the resolved recipe stands alone.
    project_dir: str | None = None

