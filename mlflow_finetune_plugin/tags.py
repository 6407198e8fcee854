"""Every `finetune.*` MLflow tag name the plugin sets or reads, on runs, registered model versions and vote
runs.

Users filter and script on these names (`mlflow.search_runs(filter_string=...)`), so they are part of the
plugin's interface: change one only on purpose. Bottom layer: this module imports nothing from the package.
"""

from __future__ import annotations

PREFIX = "finetune."

# --- a training run's lifecycle (on the run)
# ----------------------------------------------------------------------
# why the run FAILED or was KILLED (truncated; error.txt has it all)
ERROR = "finetune.error"
# "true" once a cancel is asked: a SIGTERM after it means KILLED
CANCEL_REQUESTED = "finetune.cancel_requested"
# artifact path of the newest complete checkpoint (resume reads it)
LAST_CHECKPOINT = "finetune.last_checkpoint"
RESUMED_FROM = "finetune.resumed_from"            # "<run id>/<checkpoint path>" a resumed run started from
# registered model the run's (or a checkpoint's) model is a version of
REGISTERED_MODEL = "finetune.registered_model"
REGISTERED_VERSION = "finetune.registered_version"  # that version's number
# "true"/"false": registry.auto_promote moved the champion alias
AUTO_PROMOTED = "finetune.auto_promoted"
# the rehearsal before training: "passed in 2.3 s (...)" or "failed at X"
REHEARSAL = "finetune.rehearsal"
THREADS = "finetune.threads"                      # the threads training took, and why (runtime/threads.py)

# Where the run's job runs, so `mlflow-finetune cancel RUN_ID` finds it from any machine.
JOB_LAUNCHER = "finetune.job.launcher"            # local | torchrun | ray
JOB_HOST = "finetune.job.host"                    # the machine that launched the job
JOB_PID = "finetune.job.pid"                      # the launcher process (local, torchrun)
JOB_ID = "finetune.job.job_id"                    # the Ray job id
JOB_ADDRESS = "finetune.job.address"              # the Ray dashboard address
# job.json key -> tag name
JOB_KEYS = {"launcher": JOB_LAUNCHER, "host": JOB_HOST, "pid": JOB_PID, "job_id": JOB_ID,
            "address": JOB_ADDRESS}

# --- lineage (on the training run and on every version registered from it)
# ----------------------------------------
# the entry point / preset that trained it (lora, qlora, dpo, ...)
METHOD = "finetune.method"
# the adapter axis: lora, ia3, prefix, prompt, bottleneck, full
ADAPTER = "finetune.adapter"
OBJECTIVE = "finetune.objective"                  # the objective axis: sft, dpo, orpo, simpo, grpo
QUANTIZATION = "finetune.quantization"            # how the base was loaded for training: none, 4bit, 8bit
BASE_MODEL = "finetune.base_model"                # the base model reference (hub id, local path, builtin:...)
BASE_REVISION = "finetune.base_revision"          # the base's hub revision, where it has one
RECIPE_HASH = "finetune.recipe_hash"              # hash of the resolved recipe (recipe.yaml artifact)
SOURCE_RUN = "finetune.source_run"                # the run that trained (and evaluated) it
PRECISION = "finetune.precision"                  # what training computed in, in words
# "packed" or "unpacked", and why (data.packing auto's estimate)
PACKING = "finetune.packing"
# the memory plan a run started with: its batch size, accumulation, checkpointing, rows and planned peak
MEMORY_PLAN = "finetune.memory_plan"
# fused training kernels used (train.kernels), and what took the loss
KERNELS = "finetune.kernels"
# -e distill: the teacher that answered the prompts (URL + model)
DISTILL_TEACHER = "finetune.distill.teacher"
# -e distill: prompts, answers asked / from the cache, left out
DISTILL_ANSWERS = "finetune.distill.answers"
QUESTIONS_TEACHER = "finetune.questions.teacher"  # questions: the teacher that wrote rows from the documents
# questions: rows written from how many chunks, and the drops
QUESTIONS_ROWS = "finetune.questions.rows"
QUESTIONS_DOCUMENTS_DIGEST = "finetune.questions.documents_digest"  # questions: digest of the documents read
CHAT_TEMPLATE_HASH = "finetune.chat_template_hash"  # hash of the chat template the model was trained with
# what the loss covered: "assistant" (replies + end of turn) or "all"
LOSS_ON = "finetune.loss_on"
LOSS_SHARE = "finetune.loss_share"                # the share of the training rows' tokens the loss covered
SYSTEM_HANDLING = "finetune.system_handling"      # "kept", or "folded" into the first user turn (and why)
# model.chat_template where the recipe chose one (name or file)
CHAT_TEMPLATE = "finetune.chat_template"
# the template's control tokens given trainable embedding rows
TRAINABLE_TOKENS = "finetune.trainable_tokens"
# mixtures of experts: the load-balancing loss's weight, and why
ROUTER_AUX_LOSS = "finetune.router_aux_loss"
# mixtures of experts: what the adapter reaches and leaves out
LORA_EXPERTS = "finetune.lora_experts"
DATASET_DIGEST = "finetune.dataset_digest"        # digest of the training data as loaded
# the training data's format (chat, alpaca, ...; "+"-joined for mixes)
DATA_FORMAT = "finetune.data_format"
TASKS = "finetune.tasks"                          # multitask: "name:weight,..." of the mixture
TASK = "finetune.task"                            # multitask: the task a per-task version was trained on
# "true"/"false": vLLM serves it (as a LoRA, or merged: the reason)
VLLM_COMPATIBLE = "finetune.vllm_compatible"
VLLM_REASON = "finetune.vllm_reason"              # why (not)
# A checkpoint: on its logged model (`checkpoint-N`, an output of the training run at step N) and on a version
# registered from it, whose source run is then the run that packaged and evaluated that checkpoint.
CHECKPOINT_STEP = "finetune.checkpoint_step"      # the training step the checkpoint was saved at
# its folder among the training run's artifacts (checkpoints/...)
CHECKPOINT_PATH = "finetune.checkpoint_path"
CHECKPOINT_RUN = "finetune.checkpoint_run"        # the run that trained it
CHECKPOINT_MODEL = "finetune.checkpoint_model"    # the checkpoint's logged model id (m-...)
# registry.lineage_tags(key=value) keyword -> tag name: an unknown keyword is an error, never a new tag name.
LINEAGE = {"method": METHOD, "adapter": ADAPTER, "objective": OBJECTIVE, "quantization": QUANTIZATION,
           "base_model": BASE_MODEL, "base_revision": BASE_REVISION, "recipe_hash": RECIPE_HASH,
           "source_run": SOURCE_RUN, "precision": PRECISION, "chat_template_hash": CHAT_TEMPLATE_HASH,
           "dataset_digest": DATASET_DIGEST, "data_format": DATA_FORMAT, "tasks": TASKS, "task": TASK,
           "vllm_compatible": VLLM_COMPATIBLE, "vllm_reason": VLLM_REASON, "checkpoint_step": CHECKPOINT_STEP,
           "checkpoint_path": CHECKPOINT_PATH, "checkpoint_run": CHECKPOINT_RUN,
           "checkpoint_model": CHECKPOINT_MODEL}

# --- evaluation (on the run the evaluation was logged in)
# ---------------------------------------------------------
# digest of the prompts and references scored (comparability)
EVAL_DATA_DIGEST = "finetune.eval_data_digest"
EVALUATED_MODEL = "finetune.evaluated_model"      # `mlflow-finetune evaluate`: the model URI scored
EVALUATED_NAME = "finetune.evaluated_name"        # its registered name, when it is a registered version
EVALUATED_VERSION = "finetune.evaluated_version"  # its version number
# The verdict: did fine-tuning pay off against the best prompt-only alternative? (evaluate/verdict.py)
# one sentence: the margin over that alternative, the forgetting
VERDICT = "finetune.verdict"
# base | fewshot | retrieval (none: none scored)
VERDICT_BEST_ALTERNATIVE = "finetune.verdict.best_alternative"
# "true" only when the bootstrap interval of the margin is above 0 and the margin is at least eval.min_gain
VERDICT_PAID_OFF = "finetune.verdict.paid_off"
# "true" when the optimized prompt ties or beats the tuned model (set only where the optimized contender was
# scored)
VERDICT_KEEP_PROMPT = "finetune.verdict.keep_prompt"
# What to deploy: tuned when it paid off, else the prompt-only contender to keep (base | fewshot | retrieval |
# optimized; none: too few examples to tell); documents recipes: base | rag | tuned | tuned-rag
VERDICT_DEPLOY = "finetune.verdict.deploy"
# tuned-rag where the logged model retrieves (else unset: tuned)
SERVED_AS = "finetune.served_as"
DOCUMENTS_DIGEST = "finetune.documents.digest"    # the digest of the chunks of data.documents a run used
EVAL_CONTENDERS = "finetune.eval.contenders"       # the contenders scored, and why the others were not
# A registered optimized prompt's version (registry/prompts.py): its run, its base model, the model version
# registered beside it, and its shots (a count, or retrieved ones that the prompt does not keep). On the run:
# the prompt's version.
PROMPT_SOURCE_RUN = "finetune.prompt.source_run"
PROMPT_BASE_MODEL = "finetune.prompt.base_model"
PROMPT_MODEL_VERSION = "finetune.prompt.model_version"
PROMPT_SHOTS = "finetune.prompt.shots"
PROMPT_SHOT_POOL = "finetune.prompt.shot_pool"    # retrieved shots: the run artifact they are drawn from
PROMPT_RETRIEVAL_K = "finetune.prompt.retrieval_k"  # retrieved shots: how many per question
REGISTERED_PROMPT = "finetune.registered_prompt"  # prompts:/NAME-prompt/N

# --- promotion (on the version the alias moved to)
# ----------------------------------------------------------------
PROMOTED_ALIAS = "finetune.promoted_alias"        # the alias moved to this version
PROMOTED_BY = "finetune.promoted_by"              # who moved it
PROMOTED_AT = "finetune.promoted_at"              # when (UTC, ISO 8601)
PROMOTED_FROM = "finetune.promoted_from"          # the version that held the alias before ("" for none)
FORCED_BY = "finetune.forced_by"                  # --force: who overrode the gates
FORCED_AT = "finetune.forced_at"                  # when
FORCED_REASON = "finetune.forced_reason"          # the --reason given
FORCED_GATES_FAILED = "finetune.forced_gates_failed"  # the gates that failed ("none" if none did)

# Serving parity (registry/parity.py): before the champion alias moves, the version's held-out prompts
# answered by the engine it will be served on, against its evaluation's answers (on the version, set at each
# check)
# the outcome in one sentence, with the rows that end otherwise
PARITY = "finetune.parity"
PARITY_STATUS = "finetune.parity.status"          # passed | failed | not checked | skipped
PARITY_ENGINE = "finetune.parity.engine"          # transformers (the merged copy `serve` loads) | vllm
PARITY_ROWS = "finetune.parity.rows"              # held-out rows answered and compared
PARITY_ROWS_DIFFERING = "finetune.parity.rows_differing"  # of them, rows whose served answer ended otherwise
PARITY_METRIC = "finetune.parity.metric"          # the metric weighed (the gates' primary metric)
PARITY_SCORE_SERVED = "finetune.parity.score_served"  # its mean over the served answers
PARITY_SCORE_EVALUATED = "finetune.parity.score_evaluated"  # and over the evaluated answers
PARITY_CHECKED_AT = "finetune.parity.checked_at"  # when (UTC, ISO 8601)

# --- export (`mlflow-finetune export`: on the version exported; on the source run for a runs:/ model)
# ------------
# the latest export's artifacts: runs:/<source run>/exports/<folder>
EXPORT_URI = "finetune.export.uri"
EXPORT_SOURCE = "finetune.export.source"          # the version exported, resolved (models:/NAME/VERSION)
# "true": adapter merged into the base; "false": full weights as is
EXPORT_MERGED = "finetune.export.merged"
EXPORT_BASE = "finetune.export.base_model"        # the base model reference the export was built on
EXPORT_GGUF_TYPE = "finetune.export.gguf_type"    # f32 | f16 | none

# --- playground votes (on each vote run, experiment `playground-votes`)
# -------------------------------------------
# the registered model whose playground it is (votes filed under it)
VOTE_MODEL = "finetune.vote.model"
VOTE_MODEL_A = "finetune.vote.model_a"            # model choice key shown as A (NAME/3 or NAME/3:base)
VOTE_MODEL_B = "finetune.vote.model_b"            # model choice key shown as B
VOTE_VERDICT = "finetune.vote.verdict"            # a | b | tie | both_bad
VOTE_BLIND = "finetune.vote.blind"                # "true" when the sides were hidden until the vote
VOTE_COMPARISON = "finetune.vote.comparison"      # the comparison id voted on
VOTE_USER = "finetune.vote.user"                  # the logged-in user, "" without --auth
VOTE_PROMPT = "finetune.vote.prompt"              # the prompt (first 500 characters)

# --- served traffic (`serve --trace`, `playground --trace`: on each trace)
# -----------------------------------------
SERVED_BY = "finetune.served.by"                  # serve | playground
SERVED_MODEL = "finetune.served.model"            # the model choice that answered (NAME/3 or NAME/3:base)
SERVED_NAME = "finetune.served.name"              # the name the client asked for (bot-v3, bot@champion)
# a served prompt's answer: the prompt (prompts:/NAME-prompt/N)
SERVED_PROMPT = "finetune.served.prompt"

# --- monitoring (`mlflow-finetune monitor`: on the monitoring run of a registered model)
# ---------------------------
MONITOR_MODEL = "finetune.monitor.model"          # the registered model whose served traffic the run sums
MONITOR_WINDOW = "finetune.monitor.window"        # the window length of its metrics (1h, 1d, ...)
# the alerts of its last pass: `v3 novel_share 0.62 (<= 0.3) at ...`
MONITOR_ALERTS = "finetune.monitor.alerts"
# on a --retrain run: the traces it learned from (count)
MONITOR_RETRAINED_FROM = "finetune.monitor.retrained_from"

# --- the OpenAI fine-tuning API (`mlflow-finetune openai-api`)
# --------------------------------------------------
# on a file's run (experiment `openai-files`): fine-tune, ...
FILE_PURPOSE = "finetune.file.purpose"
# the file name the client gave (shown, never used as a path)
FILE_NAME = "finetune.file.filename"
FILE_BYTES = "finetune.file.bytes"                # its size
FILE_ARTIFACT = "finetune.file.artifact"          # its path among the run's artifacts
OPENAI_JOB = "finetune.openai.job_id"             # on a job's training run: the fine-tuning job (ftjob-...)
OPENAI_SUFFIX = "finetune.openai.suffix"          # the job's suffix
OPENAI_METADATA = "finetune.openai.metadata"      # the job's metadata, as JSON

# --- the Train page (`mlflow-finetune studio`: studio/runs.py)
# ------------------------------------------------
STUDIO_JOB = "finetune.studio.job_id"             # on a run the page started: its job (job-...) there

# --- sweeps (`mlflow-finetune sweep`)
# ---------------------------------------------------------------------------
SWEEP_TRIAL = "finetune.sweep.trial"              # on a trial run: its Optuna trial number
SWEEP_STATE = "finetune.sweep.state"              # on a trial run: complete | pruned | failed
SWEEP_BEST_RUN = "finetune.sweep.best_run_id"     # on the sweep's parent run: the best trial's run


def lineage_tags(**values) -> dict[str, str]:
    """Lineage tags by keyword (`method=...` -> `finetune.method`, see `LINEAGE`), dropping empty values; an
    unknown keyword raises TypeError rather than create a tag name no reader knows."""
    unknown = sorted(set(values) - set(LINEAGE))
    if unknown:
        raise TypeError(f"lineage_tags: unknown lineage key(s) {unknown}; known: {sorted(LINEAGE)} "
                        "(a new one is added to LINEAGE)")
    return {LINEAGE[k]: str(v) for k, v in values.items() if v is not None and v != ""}
