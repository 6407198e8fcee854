"""The objectives' own sections of a recipe (`dpo:`, `orpo:`, `simpo:`, `grpo:`, `reward:`, `kto:`), read when
`objective` names them. The schema (`schema.py`) holds them as `Recipe.<objective>`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlflow_finetune_plugin.config.section import Section


class DPOConfig(Section):
    """The `dpo` objective: TRL's DPOTrainer on preference pairs."""

    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference model (KL weight)")
    loss_type: Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                       "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                       "sigmoid_norm"] = Field(
        "sigmoid", description="TRL's DPO loss variant")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="assumed share of flipped labels (cDPO, robust)")


class ORPOConfig(Section):
    """The `orpo` objective: TRL's experimental ORPOTrainer on preference pairs, SFT and preference in one
    loss, no reference model."""

    beta: float = Field(
        0.1, gt=0, description="weight of the odds-ratio (preference) term beside the SFT loss on the "
                               "chosen answer: ORPO's lambda, as TRL names it")


class SimPOConfig(Section):
    """The `simpo` objective: SimPO through TRL's experimental CPOTrainer (loss_type simpo) on preference
    pairs: the length-normalized log-prob margin of chosen over rejected, no reference model."""

    beta: float = Field(
        2.0, gt=0, description="scale of the length-normalized log-prob margin (SimPO's beta)")
    gamma: float = Field(
        1.0, ge=0, description="target margin the chosen answer must beat the rejected one by (SimPO's "
                               "gamma; TRL's `simpo_gamma`)")
    cpo_alpha: float = Field(
        0.0, ge=0, description="weight of an SFT term on the chosen answer; 0 is SimPO, above 0 CPO-SimPO")


class GRPOConfig(Section):
    """The `grpo` objective: TRL's GRPOTrainer, reinforcement fine-tuning on prompts with verifiable rewards
    (`rewards.py`). Each step samples `num_generations` completions per prompt, scores them, and moves the
    policy towards the completions that beat their group's mean. `train.batch_size` counts completions, not
    prompts."""

    rewards: list[str | dict] = Field(
        default_factory=lambda: ["exact_answer"], min_length=1,
        description="reward functions, summed with their weights: built-ins `exact_answer`, `regex`, "
                    "`json_schema`, a function in the project's `rewards.py`, `file.py:function`, or a "
                    "registered reward model (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, trained with "
                    "`-e reward`; it scores with its own tokenizer, checked in the registry before the "
                    "run); a mapping adds parameters and a `weight`")
    num_generations: int = Field(
        8, ge=2, description="completions sampled per prompt; must divide `train.batch_size` x "
                             "`train.grad_accum`")
    max_completion_length: int = Field(64, gt=0, description="longest completion sampled, in tokens")
    temperature: float = Field(
        1.0, gt=0, description="sampling temperature; the group needs varied completions")
    top_p: float = Field(
        1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set of tokens with this much "
                                     "probability")
    beta: float = Field(
        0.04, ge=0, description="KL weight: the pull towards the base model (the reference); 0.04 as in "
                                "DeepSeekMath's GRPO. 0 (TRL's default) skips the reference entirely, so no "
                                "`kl` curve is logged and nothing holds a small model back from drifting "
                                "into degenerate text. With an adapter the reference costs one more forward "
                                "pass; a full fine-tune loads a second copy")
    epsilon: float = Field(0.2, gt=0, description="clipping range of the policy ratio (PPO's epsilon)")
    num_iterations: int = Field(
        1, ge=1, description="updates per generated batch (GRPO's mu); above 1 reuses completions, making "
                             "the ratio clipping matter")
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="TRL's loss aggregation: `dapo` (normalized by the tokens in the accumulated "
                            "batch, no length bias), `grpo` (per sequence; length-biased), `dr_grpo`, "
                            "`bnpo`, `cispo`, `sapo`, `luspo` (sequence-level importance sampling, as its "
                            "paper), `vespo`")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide the advantages by the reward std of the group, of the batch, or not at "
                             "all (Dr. GRPO: `none` avoids a question-difficulty bias)")
    mask_truncated_completions: bool = Field(
        False, description="leave completions cut at `max_completion_length` out of the loss (DAPO)")


class RewardConfig(Section):
    """The `reward` objective: TRL's RewardTrainer on preference pairs; trains base + adapter + a score head
    that gives (prompt, answer) one number (Bradley-Terry: the chosen answer should score above the
    rejected one)."""

    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="pull a reward model's scores towards 0 (TRL's "
                                "`center_rewards_coefficient`; 0.01 is common), so rewards stay comparable "
                                "across prompts")


class KTOConfig(Section):
    """The `kto` objective: TRL's KTOTrainer on unpaired desirable/undesirable answers (prompt, completion,
    label)."""

    beta: float = Field(0.1, gt=0, description="KTO: strength of the pull towards the reference model")
    desirable_weight: float = Field(
        1.0, gt=0, description="KTO: weight of the desirable answers' loss (raise it when they are fewer)")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the undesirable answers' loss")
