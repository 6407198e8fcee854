"""The recipe's schema: `finetune.yaml` as typed, strict sections (pydantic), one class per section.

A fine-tune is four choices: the adapter (`adapter:`, one section whose `type` picks lora, ia3, prefix, prompt,
bottleneck or full), the quantization of the base (`model.quantization`), the objective (`objective:` sft, dpo,
orpo, simpo, grpo, reward or kto, each with its own section for its knobs) and the data (`data:`, one set or a
weighted mixture of `data.tasks`).
The entry point (`method`) is a preset over them (`presets.py`), and recipes written with the older per-method
sections (`lora:`, `qlora:`, `multitask:`, ...) are read onto the axes there.

Unknown keys are errors and values are checked on assignment too. Reading the file and the `-P` overrides into
these sections is `loading.py`; combinations no single key can judge are `checks.py`.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from mlflow_finetune_plugin.config.distill import DistillConfig
from mlflow_finetune_plugin.config.documents import QuestionsConfig, RetrievalConfig
from mlflow_finetune_plugin.config.evaluation import EvalConfig, general_text_file
from mlflow_finetune_plugin.config.gates import Gate
from mlflow_finetune_plugin.config.monitor import MonitorConfig
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
    name: str | None = Field(None, description="Hub id or local folder; empty means the built-in tiny model.")
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    chat_template: str | None = Field(
        None, description="The chat template to train and serve with, over the tokenizer's own: a bundled one by name "
                          "(chatml, llama3, qwen, qwen3, gemma, mistral, phi3, gemma4, qwen3_5, qwen3_5_think, gptoss) or "
                          "a .jinja file (relative to the project). Needed by base models, which have none; its "
                          "control tokens are added to the tokenizer where missing and get trainable embedding rows "
                          "(LoRA: trainable_token_indices).")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the frozen base in 4-bit NF4/FP4 (QLoRA) or 8-bit (LLM.int8) through bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 suits normally distributed weights.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (~0.4 bit/param saved).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the 4-bit matmuls; auto: bfloat16 on CUDA, float32 on CPU.")
    init_adapter: str | None = Field(
        None, description="Continue this adapter instead of a fresh one (models:/NAME@ALIAS, models:/NAME/N, "
                          "runs:/ID/model, or an adapter folder); its own configuration replaces `adapter:`.")


# The adapter axis: one section, `adapter:`, whose `type` picks one of these (a discriminated union).
class LoraAdapter(Section):
    """LoRA: low-rank updates beside the linear layers (DoRA and rsLoRA as options)."""

    type: Literal["lora"] = "lora"
    r: int = Field(16, gt=0, description="Rank of the update matrices.")
    alpha: int = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or a list of module names.")
    use_dora: bool = False
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    vision: bool = Field(False, description="A VLM's tower and projector adapted too (all-linear); vLLM won't serve them.")
    target_parameters: Literal["auto"] | list[str] = Field(
        "auto", description="Parameters LoRA adapts that no linear layer wraps (PEFT's target_parameters), such as "
                            "a mixture of experts' fused 3-D expert weights. auto: those the model has "
                            "(gpt-oss: experts.gate_up_proj, experts.down_proj); []: none (attention and router only).")
    layers: int | None = Field(
        None, gt=0, description="Adapt only the top N decoder layers (empty: all). Backpropagation then stops at the "
                                "lowest adapted layer: on CPU, smollm2 with the top 20 of its 30 layers took 1.50 s a "
                                "step against 1.86 s (docs/methods.md).")


class IA3Adapter(Section):
    """IA3: trained vectors rescaling keys, values and feed-forward activations."""

    type: Literal["ia3"] = "ia3"
    target_modules: str | list[str] | None = Field(
        None, description="Layers to rescale; empty: PEFT's default for the architecture (Llama: k_proj, v_proj, "
                          "down_proj).")
    feedforward_modules: str | list[str] | None = Field(
        None, description="Which of those are feed-forward (their input is rescaled, not their output); empty: "
                          "PEFT's default (Llama: down_proj).")

    @model_validator(mode="after")
    def _check_subset(self):
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules; add them to "
                                 "ia3.target_modules or remove them from ia3.feedforward_modules")
        return self


class PrefixAdapter(Section):
    """Prefix tuning: trained key/value vectors prepended in every attention layer."""

    type: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, gt=0, description="Prefix length, in key/value positions per layer.")
    prefix_projection: bool = Field(
        False, description="Learn the prefix through a two-layer MLP (more stable, more parameters while training).")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Hidden width of that MLP; empty: the model's hidden size.")


class PromptAdapter(Section):
    """Prompt tuning or P-tuning: trained virtual-token embeddings prepended to the input."""

    type: Literal["prompt"] = "prompt"
    kind: Literal["prompt_tuning", "p_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="Number of virtual tokens prepended to every input.")
    init: Literal["random", "text"] = Field("random", description="prompt_tuning: start from random or from init_text.")
    init_text: str | None = Field(None, description="With init: text, the text whose token embeddings start the prompt.")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="p_tuning: hidden width of the prompt encoder MLP; empty: the model's hidden size.")

    @model_validator(mode="after")
    def _check_init(self):
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs `init_text` (the words to start the prompt from). "
                             "Set prompt.init_text, or use init: random")
        if self.init == "text" and self.kind == "p_tuning":
            raise ValueError("init: text applies to kind: prompt_tuning only; P-tuning's encoder starts at random. "
                             "Use kind: prompt_tuning, or init: random")
        return self


class BottleneckAdapter(Section):
    """Bottleneck adapter layers (down-projection, nonlinearity, up-projection) through PEFT's PEANuT tuner."""

    type: Literal["bottleneck"] = "bottleneck"
    bottleneck_size: int = Field(16, gt=0, description="Width of the bottleneck (PEANuT's r).")
    depth: int = Field(0, ge=0, description="Extra nonlinear encoder/decoder pairs inside the bottleneck.")
    act_fn: Literal["relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "tanh", "sigmoid", "leaky_relu", "mish"] = (
        Field("relu", description="The bottleneck's nonlinearity."))
    scaling: float = Field(1.0, gt=0, description="Multiplier of the adapter's output.")
    target_modules: str | list[str] = Field(
        ["o_proj", "down_proj"], description="Linear layers to put adapters beside: a list of names or 'all-linear'.")


class FullAdapter(Section):
    """Full fine-tuning: every weight trains (the learning rate and checkpointing live in `train:`)."""

    type: Literal["full"] = "full"


ADAPTER_CONFIGS = {c.model_fields["type"].default: c for c in (
    LoraAdapter, IA3Adapter, PrefixAdapter, PromptAdapter, BottleneckAdapter, FullAdapter)}
AdapterConfig = Annotated[LoraAdapter | IA3Adapter | PrefixAdapter | PromptAdapter | BottleneckAdapter | FullAdapter,
                          Field(discriminator="type")]


class DPOConfig(Section):
    """The `dpo` objective: TRL's DPOTrainer on preference pairs."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model (KL weight).")
    loss_type: Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                       "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"] = Field(
        "sigmoid", description="TRL's DPO loss variant.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed share of flipped labels (cDPO, robust).")


class ORPOConfig(Section):
    """The `orpo` objective: TRL's experimental ORPOTrainer on preference pairs, SFT and preference in one loss,
    no reference model."""

    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio (preference) term beside the SFT loss on the "
                                               "chosen answer: ORPO's lambda, as TRL names it.")


class SimPOConfig(Section):
    """The `simpo` objective: SimPO through TRL's experimental CPOTrainer (loss_type simpo) on preference pairs: the
    length-normalized log-prob margin of chosen over rejected, no reference model."""

    beta: float = Field(2.0, gt=0, description="Scale of the length-normalized log-prob margin (SimPO's beta).")
    gamma: float = Field(1.0, ge=0, description="Target margin the chosen answer must beat the rejected one by "
                                                "(SimPO's gamma; TRL's simpo_gamma).")
    cpo_alpha: float = Field(0.0, ge=0, description="Weight of an SFT (NLL) term on the chosen answer; 0 is SimPO, "
                                                    "above 0 is CPO-SimPO.")


class GRPOConfig(Section):
    """The `grpo` objective: TRL's GRPOTrainer, reinforcement fine-tuning on prompts with verifiable rewards
    (`rewards.py`). Each step samples `num_generations` completions per prompt, scores them, and moves the policy
    towards the completions that beat their group's mean. `train.batch_size` counts completions, not prompts."""

    rewards: list[str | dict] = Field(
        default_factory=lambda: ["exact_answer"], min_length=1,
        description="Reward functions, summed with their weights: a built-in (exact_answer, regex, json_schema), a "
                    "function in the project's rewards.py, file.py:function, or a registered reward model "
                    "(models:/NAME@ALIAS or models:/NAME/VERSION, trained with -e reward); a mapping adds parameters and a "
                    "weight, e.g. {name: regex, pattern: '^\\d+$', weight: 0.5}.")
    num_generations: int = Field(
        8, ge=2, description="Completions sampled per prompt (the group whose mean is the baseline); must divide "
                             "train.batch_size x train.grad_accum.")
    max_completion_length: int = Field(64, gt=0, description="Longest completion sampled, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; the group needs varied completions.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this "
                                                       "much probability.")
    beta: float = Field(
        0.04, ge=0, description="KL weight: the pull towards the base model (the reference). 0.04 as in DeepSeekMath's "
                                "GRPO; TRL's default 0 skips the reference entirely, so no `kl` curve is logged and "
                                "nothing holds a small model back from drifting into degenerate text. With an adapter "
                                "the reference costs one more forward pass; a full fine-tune loads a second copy.")
    epsilon: float = Field(0.2, gt=0, description="Clipping range of the policy ratio (PPO's epsilon).")
    num_iterations: int = Field(1, ge=1, description="Updates per generated batch (GRPO's mu); above 1 reuses "
                                                     "completions, making the ratio clipping matter.")
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="TRL's loss aggregation: dapo (default; normalized by the tokens in the accumulated "
                            "batch, no length bias), grpo (per sequence; length-biased), dr_grpo, bnpo, cispo, sapo, "
                            "luspo (sequence-level importance sampling, as its paper), vespo.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide the advantages by the reward std of the group, of the batch, or not at all "
                             "(Dr. GRPO: none avoids a question-difficulty bias).")
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at max_completion_length out of the loss (DAPO).")


class RewardConfig(Section):
    """The `reward` objective: TRL's RewardTrainer on preference pairs; trains base + adapter + a score head that
    gives (prompt, answer) one number (Bradley-Terry: the chosen answer should score above the rejected one)."""

    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Pull the scores towards 0 (TRL's center_rewards_coefficient; 0.01 is common), so "
                                "rewards stay comparable across prompts when GRPO sums them.")


class KTOConfig(Section):
    """The `kto` objective: TRL's KTOTrainer on unpaired desirable/undesirable answers (prompt, completion, label)."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model.")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the desirable answers' loss (raise if fewer).")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the undesirable answers' loss.")


class DataColumns(Section):
    """The file's column for each field, where names differ (LLaMA-Factory's `columns`): `{prompt: question}`."""

    messages: str | None = Field(None, description="The conversation: chat messages, or ShareGPT turns.")
    prompt: str | None = None
    completion: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    label: str | None = Field(None, description="unpaired_preference: true for a desirable answer, false if not.")
    system: str | None = Field(None, description="A per-row system prompt (text).")
    tools: str | None = Field(None, description="A per-row list of tools (OpenAI function schemas, or JSON text).")
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    images: str | None = None  # one image per placeholder, in order


class DataTags(Section):
    """ShareGPT role tags (LLaMA-Factory's `tags` in dataset_info.json): which keys and role names the turns use."""

    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = Field("observation", description="A tool's result (becomes a `tool` message).")
    function_tag: str = Field("function_call", description="The assistant calling a tool (JSON name + arguments).")
    system_tag: str = "system"


class Task(Section):
    """One task of a data mixture."""

    train: str = Field(description="Training file of this task (JSONL/JSON/CSV/parquet), relative to the project.")
    eval: str | None = Field(None, description="Held-out file; empty: `data.eval_split` of train, or none.")
    weight: float = Field(1.0, gt=0, description="Mixing weight; rows are sampled in proportion to the weights.")
    format: Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion"] = Field(
        "auto", description="auto: detected from each file's own rows (this task's train and eval may differ).")
    system_prompt: str | None = Field(None, description="System message added to this task's rows.")


class DataConfig(Section):
    train: str | None = Field("data/train.jsonl", description="A file, a Hugging Face dataset as "
                              "hf:ORG/NAME[@REVISION][:SPLIT] (split default: train), or an MLflow experiment's "
                              "traces as traces:EXPERIMENT (data.traces narrows them).")
    eval: str | None = Field(None, description="A file, hf:ORG/NAME[@REVISION]:SPLIT, or traces:EXPERIMENT.")
    traces: TracesConfig | None = Field(None, description="Which traces a traces: source reads, and how feedback "
                                                          "and expectations count (docs/traces.md).")
    eval_split: float = Field(0.0, ge=0.0, lt=1.0, description="Held-out share of train when no eval file is given.")
    documents: str | None = Field(
        None, description="A folder or glob of documents (Markdown, text, HTML, PDF), relative to the project: "
                          "chunked, retrieved from (`retrieval:`), and the source of question rows "
                          "(`questions:`) where data.train gives none (docs/documents.md).")
    documents_holdout: list[str] | float = Field(
        default_factory=list, description="Whole documents kept out of training, whose questions are the unseen "
                                          "held-out set: paths or globs relative to data.documents, or a share "
                                          "(0-1) of the documents picked by train.seed.")
    chunk_tokens: int = Field(256, ge=16, description="The longest chunk, in tokens of the model's tokenizer; "
                                                      "documents split along headings and paragraphs first.")
    format: Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "preference",
                    "prompt_only", "unpaired_preference"] = Field("auto", description="auto: detected from each file's own rows, so train and "
                                                               "eval may be in different formats.")
    columns: DataColumns | None = Field(None, description="The file's column for each field, where names differ.")
    tags: DataTags | None = Field(None, description="ShareGPT role tags, where they differ from LLaMA-Factory's.")
    system_prompt: str | None = None
    max_length: int = Field(1024, gt=0)
    assistant_only_loss: bool = True
    packing: bool | Literal["auto"] = Field(
        "auto", description="Pack examples into rows of up to max_length (attention kept within each example). "
                            "auto: on with a flash-attention model.attn_implementation (padding-free, always "
                            "faster); off for prefix/prompt tuning; otherwise on when the training rows are "
                            "estimated at least 1.1x as fast packed as padded (printed, tag finetune.packing). "
                            "A recipe's true is turned off, with a note, when the entry point trains prefix or "
                            "prompt tuning (-e prefix on a recipe packed for LoRA).")
    max_rows: int | None = Field(None, gt=0)
    strict: bool = Field(False, description="Data warnings (few rows, near-duplicates, train/eval overlap, answers "
                                            "cut by max_length, contradictions) stop the run like errors.")
    tasks: dict[str, Task] = Field(
        default_factory=dict, description="A weighted mixture instead of one set: task name -> its files and weight "
                                          "(two or more; then data.train/data.eval stay empty).")
    stopping: Literal["all_exhausted", "first_exhausted"] = Field(
        "all_exhausted", description="Mixtures: end an epoch when every task (or the first one) has run out.")
    adapters: Literal["shared", "per_task"] = Field(
        "shared", description="Mixtures: one adapter trained on the mixture, or one adapter per task (each "
                              "registered apart as <registry.name>-<task>).")
    replay: bool | str = Field(
        False, description="General text mixed into training (language-model loss on every token), against "
                            "forgetting: true: the prose bundled with the package (apart from eval.forgetting's "
                            "set); a .txt (paragraphs split by blank lines) or .jsonl ({\"text\": ...} rows) file "
                            "of your own; false: off. sft only.")
    replay_share: float = Field(0.2, gt=0.0, lt=1.0, description="lm: share of the training rows that are replay "
                                                                  "rows (data.replay), e.g. 0.2: one in five.")
    replay_loss: Literal["lm", "kl"] = Field(
        "lm", description="lm: replay rows join the training rows, trained on their own tokens. kl: each training "
                          "step also scores one replay row, and the tuned model's next-token distribution on it is "
                          "pulled towards the base model's (KL(base || tuned), the adapter switched off for the "
                          "base), added to the loss times replay_weight. Adapters only.")
    replay_weight: float = Field(1.0, gt=0.0, description="kl: weight of the KL term against the task's loss.")
    replay_every: int = Field(1, ge=1, description="kl: score a replay row on every Nth training forward only, its "
                                                   "KL term weighted xN so the average pull stays the same (N "
                                                   "times fewer extra passes).")

    @field_validator("replay")
    @classmethod
    def _replay_file(cls, value):
        return general_text_file(value, "the bundled prose")

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks):
        bad = [n for n in tasks if not n.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"task names {bad} must be letters, digits, '-' or '_' (they become metric names)")
        return tasks


class TrainConfig(Section):
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="Overrides epochs when > 0.")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    neftune_alpha: float | None = Field(
        None, gt=0, description="NEFTune: uniform noise of scale alpha/sqrt(tokens x hidden) added to the input "
                                "embeddings while training (Jain et al. 2023; transformers' neftune_noise_alpha), "
                                "e.g. 5.")
    seed: int = 42
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(100, gt=0, description="Checkpoint (logged to the run for resume, and as a logged model "
                                                  "`checkpoint-N` with the eval loss at that step) every N steps, and "
                                                  "at the last step.")
    save_last_epochs: int = Field(0, ge=0, description="Also a checkpoint at the end of each of the last N epochs, "
                                                       "whatever save_steps is (`openai-api` jobs: 3, as OpenAI keeps).")
    save_total_limit: int = Field(2, gt=0)
    gradient_checkpointing: bool = False
    rehearsal: bool = Field(
        True, description="Before the first step, pass two rows through everything the run does after training (a "
                          "training step, every contender's answers and scores, the forgetting check, the verdict, "
                          "the model's save and reload), so that a failure there ends the run before training, not "
                          "after it.")
    fused_lm_head: bool | Literal["auto", "chunked"] = Field(
        "auto", description="How the SFT loss meets the LM head. true: TRL's fused head (tiles of the vocabulary, "
                            "recomputed in the backward pass; Triton kernels on CUDA). chunked: the head over chunks "
                            "of labelled tokens, each chunk's gradient taken at once, never the whole logits. false: "
                            "the logits of the labelled positions, all at once. auto: true with CUDA, chunked elsewhere "
                            "(false with several ranks: DDP refuses the chunked head's early gradients).")
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="Fused GPU kernels for training. liger: Liger Kernel's Triton kernels (RMSNorm, rotary "
                            "embedding, SwiGLU; with fused_lm_head auto also its fused linear cross-entropy as the "
                            "LM head) on CUDA, for the architectures Liger covers; needs `pip install "
                            "'mlflow-finetune-plugin[gpu]'`. auto: liger where CUDA, liger-kernel and the model's "
                            "architecture allow, else none (always none on a CPU). none: the model's own layers. "
                            "Printed and tagged (finetune.kernels).")
    torch_compile: bool = Field(
        False, description="torch.compile each decoder layer while training (the model's own `_no_split_modules` "
                           "class, as torchtune compiles per layer): the identical layers share one compiled graph, "
                           "so compile time does not grow with depth; the LM head and loss stay as they are. The "
                           "first steps compile (tens of seconds); evaluation and saving run the layers uncompiled. "
                           "Printed and tagged (finetune.kernels).")
    router_aux_loss: float | None = Field(
        None, ge=0, description="Mixtures of experts: weight of the router's load-balancing loss added to the "
                                "training loss; empty: the model config's own router_aux_loss_coef; 0 turns it off.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes (torchrun, ray): ddp copies the model to every rank; fsdp "
                           "shards parameters, gradients and optimizer state across ranks (models too big for one).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    resume: str | None = Field(None, description="Run id (or 'latest') whose last checkpoint to continue from, or "
                                                 "one checkpoint's logged model id (m-...).")
    system_metrics: bool = Field(True, description="Log CPU, memory, disk, network and (with nvidia-ml-py) GPU use "
                                                   "as system/* metrics of the run (MLflow's system metrics).")
    system_metrics_interval: float = Field(5.0, gt=0, description="Seconds between system metrics samples.")
    stall_timeout: float = Field(3600.0, ge=0, description="Watchdog: seconds a stage may go without progress; 0: off.")
    threads: int | None = Field(None, gt=0, description="torch threads of the training process; empty: its share of the "
                                                        "cores, among this project's other heavy processes here.")


class RegistryConfig(Section):
    Gate: ClassVar[type[Gate]] = Gate  # config/gates.py: the gate syntax, shared with `monitor.gates`

    name: str | None = Field(None, description="Registered model name; default: the project folder's name.")
    enabled: bool = Field(True, description="Register the logged model; false only logs it in the run.")
    alias: str | None = "challenger"
    champion_alias: str = Field("champion", description="The alias `mlflow-finetune promote` moves.")
    auto_promote: bool = Field(False, description="Move the champion alias at the end of a run whose gates (and serving "
                                                  "parity) pass.")
    promote_if: list[Gate] = Field(
        default_factory=lambda: [RegistryConfig.Gate(metric="rougeL")],
        description="Promotion gates; every one must pass.")
    parity: Literal["transformers", "vllm", "off"] = Field(
        "transformers", description="Serving parity, checked before the champion alias moves: the held-out prompts "
                                    "answered by this engine as `mlflow-finetune serve` runs it must match the "
                                    "evaluation (score within the bootstrap's noise, endings row by row); off skips "
                                    "it (recorded on the version).")


OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "grpo", "reward", "kto")


class Recipe(Section):
    method: str = Field("lora", description="The entry point: a preset over the axes below (presets.PRESETS).")
    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = LoraAdapter()
    objective: Literal[OBJECTIVES] = "sft"
    dpo: DPOConfig = DPOConfig()
    orpo: ORPOConfig = ORPOConfig()
    simpo: SimPOConfig = SimPOConfig()
    grpo: GRPOConfig = Field(default_factory=lambda: GRPOConfig())
    reward: RewardConfig = RewardConfig()
    kto: KTOConfig = KTOConfig()
    data: DataConfig = DataConfig()
    distill: DistillConfig | None = Field(None, description="A teacher answers data.train's prompts (-e distill).")
    retrieval: RetrievalConfig = Field(RetrievalConfig(), description="Retrieval over data.documents' chunks.")
    questions: QuestionsConfig | None = Field(
        None, description="A teacher writes question rows from data.documents' chunks (docs/documents.md).")
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    monitor: MonitorConfig = Field(MonitorConfig(), description="Served traffic after promotion (`mlflow-finetune monitor`).")
    # Not user keys: filled in by load_recipe so the resolved recipe stands alone.
    project_dir: str | None = None

