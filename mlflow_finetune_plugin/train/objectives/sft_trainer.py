"""TRL's SFTTrainer with the two choices TRL hard-wires made per run: how packed rows reach attention, and how
the loss is computed. Imported only by `objectives.sft` (it imports TRL).

- Packed rows: TRL packs examples into rows of up to `max_length` (best-fit decreasing) and then flattens the
whole
  batch into one padding-free row. A varlen flash-attention kernel attends within each example and skips the
  rest; SDPA and eager instead build one block-diagonal mask over the flattened row and compute all of it, so
  attention grows with (batch x max_length)^2 (measured 0.29x the padded speed on CPU). With those kernels the
  rows are kept as rows: `[batch, longest row]` with `position_ids` restarting at each example and no 2D
  attention mask, from which transformers builds a block-diagonal mask per row (batch x max_length^2, like
  padding to max_length).
- Replay against forgetting (`data.replay_loss: kl`): each training forward (or one in `replay_every`) also
scores
  one row of general text and adds KL(base || tuned) on it, the base being the adapter switched off
  (`_replay_kl`); `train/task_loss` is the loss without that term. Unless `fused_lm_head` is false, both
  passes stop before the LM head and the KL is taken over chunks of tokens (`models/lm_head.py`): the two
  models' logits are never whole.
- A teacher (`distill.loss: logits`, `-e distill`): KL(teacher || student) on the answer tokens beside the
loss, the
  frozen teacher run on the same rows; the student's logits come from its own forward (`_teacher_loss`).
- Loss (`fused_lm_head`), the same value and gradients every way (transformers' causal-LM cross-entropy,
normalised
  the same way), the same `num_tokens` and `mean_token_accuracy`:
  - `True`: TRL's fused, tiled LM head, which never materialises the logits and recomputes them in the
  backward
    pass, plus entropy (logged) and token accuracy from the same tiles. On a GPU it runs as Triton kernels
    over the labelled positions; on CPU as torch ops over every position, slower there than the model's own
    loss.
  - `"chunked"`: the model runs up to its LM head, and the head is applied to chunks of the positions whose
  next
    token is labelled, each chunk's loss and gradient taken at once (`lm_head.cross_entropy`, Liger's scheme
    in torch): prompts, system messages and packed neighbours cost no logits, and the logits held at once are
    one chunk's, whatever the vocabulary. Heads `lm_head.head_of` does not reproduce (a LoRA on the head,
    logit scaling) take the `False` path.
  - `False`: a forward pre-hook on the output embedding keeps the hidden states whose next token is labelled
  and
    drops the rest before the `hidden x vocab` matmul; the logits of all labelled positions are held at once.
    Whatever the model does to its logits after the head (soft-capping, scaling) still happens.
  - `"liger"` (`train.kernels` on Liger with `fused_lm_head: auto`, models/kernels.py): Liger's fused linear
    cross-entropy, which replaced the model's forward, returns the loss and token accuracy while training; its
    gradient is taken chunk by chunk in the forward pass (nothing recomputed in the backward). Evaluation and
    the replay term take the `False` path, whose forward then is Liger's without labels (the logits, as
    usual).
  Figures for each: docs/benchmarks.md, "Large vocabularies", and its history. Entropy is logged with `True`
  only.
- Mixtures of experts: the router's load-balancing loss (`train.router_aux_loss`, TRL's
`router_aux_loss_coef`) is
  added on every path. TRL's fused head adds it itself on padded batches; the chunked and labelled-positions
  paths call the model without labels, where transformers computes it and leaves it out of the loss, so it is
  added here, from the router logits of the real tokens only: the padded batch's mask, or the packed rows'
  (whose mask is removed before the forward pass, so the model, or TRL's fused head, would count the rows' end
  padding as tokens: on packed rows the fused head's own term is replaced by this one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Trainer
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from mlflow_finetune_plugin.models.architecture import moe_of
from mlflow_finetune_plugin.models.lm_head import Head, cross_entropy, head_of, hidden_states, kl_divergence


@dataclass
class PackedRowsCollator(DataCollatorForLanguageModeling):
    """TRL's collator for packed data, rows kept: `input_ids`/`labels`/`position_ids` of `[batch, longest
    row]`.

    `attention_mask` marks the real tokens of each row; the trainer counts tokens with it and removes it
    before the forward pass, so that the model derives the per-example mask from `position_ids`. The first
    token of every packed example gets no label: it would otherwise be predicted from the end of the previous
    example (TRL's padding-free collator does the same).
    """

    padding_free: bool = False
    return_position_ids: bool = True

    def torch_call(self, examples):
        out = super().torch_call(examples)
        out["labels"][out["position_ids"] == 0] = -100
        return out


class FinetuneSFTTrainer(SFTTrainer):
    def __init__(self, *args, fused_lm_head: bool | str = True, pack_rows: bool = False,
                 replay_kl: list[list[int]] | None = None, replay_weight: float = 1.0, replay_every: int = 1,
                 teacher=None, teacher_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        # distill.loss: logits: a frozen teacher sharing the tokenizer (`_teacher_loss`)
        self.teacher, self.teacher_weight = teacher, teacher_weight
        # a mixture of experts' shape, for the load-balancing loss the chunked paths add (`_router_loss`)
        self._experts = moe_of(self.model) if self.aux_loss_enabled else None
        self.fused_lm_head = fused_lm_head
        self.pack_rows = pack_rows
        if pack_rows:
            self.data_collator = PackedRowsCollator(pad_token_id=self.data_collator.pad_token_id,
                                                    pad_to_multiple_of=self.data_collator.pad_to_multiple_of)
        # data.replay_loss: kl: general-text rows (token ids), one scored every `replay_every` training
        # forwards (its KL weighted by replay_every, so the average pull is the same), in this order
        self.replay_kl, self.replay_weight, self.replay_every = replay_kl or [], replay_weight, replay_every
        self._replay_at, self._forwards = 0, 0
        self._parameters = None  # the model's count for `floating_point_ops`, counted once

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate (6 x tokens x parameters without the embeddings), with the parameters counted
        once: Trainer counts them again every step, walking every parameter of the model (17 ms of a 1.5 s
        smollm2 step on a 2-core CPU). The count does not change while training: no parameter is added or
        removed."""
        name = getattr(self.model, "main_input_name", "input_ids")
        if name not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._parameters is None:
            self._parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[name].numel() * self._parameters

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is not None and model.training:
            result = self._teacher_loss(model, inputs, return_outputs, num_items_in_batch)
        else:
            result = self._task_loss(model, inputs, return_outputs, num_items_in_batch)
        if not (self.replay_kl and model.training):
            return result
        # The task's loss was divided by the items of the whole accumulated batch, or Trainer divides it by
        # the accumulation steps afterwards: the KL term, a mean over one row, is scaled to match either way.
        per_forward = self.current_gradient_accumulation_steps \
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None else 1
        # train/loss includes the KL term (on one step in replay_every, weighted up): the task's own loss is
        # logged apart, a smooth curve to read learning from
        if self.teacher is None:  # with a teacher, `_teacher_loss` logged the task's own loss
            task = (result[0] if return_outputs else result).detach() * per_forward
            self._metrics["train"]["task_loss"].append(self._gathered_mean(task))
        self._forwards += 1
        if (self._forwards - 1) % self.replay_every:
            return result
        kl = self._replay_kl(model) * self.replay_every / per_forward
        extra = self.replay_weight * kl
        return (result[0] + extra, result[1]) if return_outputs else result + extra

    def _replay_kl(self, model) -> torch.Tensor:
        """KL(base || tuned) per token, averaged over the next replay row: how far the tuned model's
        next-token distribution moved from the base model's on general text. The base is the same weights with
        the adapter switched off (no second copy); its pass needs no gradient. Unless `fused_lm_head` is
        false, both passes stop at the LM head and the KL is taken chunk by chunk
        (`lm_head.kl_divergence`)."""
        ids = self.replay_kl[self._replay_at % len(self.replay_kl)]
        self._replay_at += 1
        input_ids = torch.tensor([ids], device=self.accelerator.device)
        unwrapped = self.accelerator.unwrap_model(model)
        head = head_of(unwrapped) if self.fused_lm_head is not False else None
        if head is not None:
            with hidden_states(unwrapped) as captured:
                with torch.no_grad(), unwrapped.disable_adapter():
                    model(input_ids=input_ids, use_cache=False)
                model(input_ids=input_ids, use_cache=False)
            # prompt tuning prepends tokens to the tuned pass; the base head is the adapter's, trained rows
            # off
            base, tuned = (h[0, -len(ids):] for h in captured)
            kl = kl_divergence(head, tuned, head.without_rows(), base) / len(ids)
        else:
            with torch.no_grad(), unwrapped.disable_adapter():
                base = model(input_ids=input_ids, use_cache=False).logits[:, -len(ids):]
            tuned = model(input_ids=input_ids, use_cache=False).logits[:, -len(ids):]
            base_logp, tuned_logp = F.log_softmax(base.float(), -1), F.log_softmax(tuned.float(), -1)
            kl = (base_logp.exp() * (base_logp - tuned_logp)).sum(-1).mean()
        self._metrics["train"]["replay_kl"].append(self._gathered_mean(kl.detach()))
        return kl

    def _teacher_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The SFT loss plus KL(teacher || student) per answer token (the labelled next tokens), times
        `teacher_weight` (`distill.loss: logits`); `train/teacher_kl` is the term, `train/task_loss` the SFT
        loss. The student's logits come from its own forward (the fused and chunked heads never hold them),
        the teacher's from a pass without gradient on the same rows (packed rows: the same positions, no
        mask)."""
        keep = ("input_ids", "position_ids") if self.pack_rows else ("input_ids", "attention_mask",
                                                                     "position_ids")
        rows, labels = {k: inputs[k] for k in keep if k in inputs}, inputs["labels"]
        loss, outputs = self._task_loss(model, inputs, True, num_items_in_batch)
        with torch.no_grad():
            teacher = self.teacher(**rows, use_cache=False).logits[:, -labels.size(1):-1]
        student = outputs.logits[:, -labels.size(1):-1]  # prompt tuning prepends positions to the student's
        mask = labels[:, 1:] != -100
        teacher_logp = F.log_softmax(teacher[mask].float(), -1)
        student_logp = F.log_softmax(student[mask].float(), -1)
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean() if mask.any() \
            else student.sum() * 0.0
        # scaled as the task loss is under gradient accumulation (see compute_loss)
        per_forward = self.current_gradient_accumulation_steps \
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None else 1
        self._metrics["train"]["task_loss"].append(self._gathered_mean(loss.detach() * per_forward))
        self._metrics["train"]["teacher_kl"].append(self._gathered_mean(kl.detach()))
        total = loss + self.teacher_weight * kl / per_forward
        return (total, outputs) if return_outputs else total

    def _gathered_mean(self, value: torch.Tensor) -> torch.Tensor:
        """A per-step metric, kept as a tensor: it becomes a number in `log`, once per logging step (an
        `.item()` every step makes the CPU wait for the GPU each step, and the next step's kernels start
        late)."""
        return self.accelerator.gather_for_metrics(value.detach().reshape(1)).mean()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for metrics in self._metrics.values():
            for key, values in metrics.items():
                metrics[key] = [float(v) if torch.is_tensor(v) else v for v in values]
        if torch.is_tensor(self._total_train_tokens):
            self._total_train_tokens = int(self._total_train_tokens)
        super().log(logs, start_time)

    def _task_loss(self, model, inputs, return_outputs, num_items_in_batch):
        real_mask = inputs.pop("attention_mask") if self.pack_rows else None
        real_tokens = real_mask.sum() if real_mask is not None else None
        if self.fused_lm_head is True and not self._trl_fuses(model):
            # TRL's fused head reads lm_head.weight/.bias: PEFT's trainable-token rows (model.chat_template on
            # a base model) wrap the head and have neither, so the chunked head (which knows those rows) takes
            # it.
            self.fused_lm_head = "chunked"
        if self.fused_lm_head == "liger" and model.training and not return_outputs:
            if self._trl_fuses(model):
                return self._liger_loss(model, inputs, num_items_in_batch, real_tokens)
            self.fused_lm_head = "chunked"  # as above: Liger's head reads lm_head.weight too
        if self.fused_lm_head is True:
            before = self._total_train_tokens
            if self.aux_loss_enabled and real_mask is not None and model.training and not return_outputs:
                result = self._fused_loss_real_router_tokens(model, inputs, num_items_in_batch, real_mask)
            else:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if real_tokens is not None and model.training:
                # Without an attention mask TRL counts one row's length per batch: count the real tokens
                # instead.
                self._total_train_tokens = before + self._gathered(real_tokens) // self._tp_size
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return result
        return self._own_loss(model, inputs, return_outputs, num_items_in_batch, real_mask)

    def _own_loss(self, model, inputs, return_outputs, num_items_in_batch, real_mask):
        """transformers' causal-LM loss (sum over labelled next tokens / num_items_in_batch, else their mean):
        chunked (`models/lm_head.py`), from the labelled positions' logits, or from the model's whole
        output."""
        mode = "train" if model.training else "eval"
        inputs["use_cache"] = False
        chunked = (
            self._chunked_head(model) if self.fused_lm_head == "chunked" and not return_outputs else None
        )
        head = (
            self._output_embedding(model) if model.training and not return_outputs and not chunked else None
        )
        outputs, routed = None, None
        # Router logits for the load-balancing loss (the `Trainer.compute_loss` path passes labels: the model
        # adds it)
        if self.aux_loss_enabled and (chunked is not None or head is not None):
            inputs["output_router_logits"] = True
        # the real tokens: the padded batch's mask, the packed rows' (removed from the inputs), or none (no
        # padding)
        real = inputs.get("attention_mask", real_mask)
        if chunked is not None:
            total, n_valid, n_correct, routed = self._chunked_loss(model, chunked, inputs)
        elif head is not None:
            total, n_valid, n_correct, routed = self._labelled_positions_loss(model, head, inputs)
        else:
            # transformers' own path: labels go to the model, whose causal-LM loss sums over the labelled
            # tokens and divides by num_items_in_batch (gradient accumulation and DDP handled as for any
            # model).
            total, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                                  num_items_in_batch=num_items_in_batch)
            labels = inputs["labels"]
            # Prompt tuning prepends virtual tokens to the logits (not to the labels): score the last
            # positions.
            logits, targets = outputs.logits[:, -labels.size(1):-1], labels[:, 1:]
            with torch.no_grad():
                mask = targets != -100
                n_valid, n_correct = mask.sum(), ((logits.argmax(-1) == targets) & mask).sum()
        loss = total if outputs is not None else self._normalised(total, n_valid, num_items_in_batch)
        if routed is not None:
            loss = loss + self._router_loss(model, routed, real, num_items_in_batch)
        n_valid, n_correct = self._gathered(n_valid), self._gathered(n_correct)
        self._metrics[mode]["mean_token_accuracy"].append(n_correct / n_valid.clamp(min=1))
        if mode == "train":
            counted = real.sum() if real is not None else torch.tensor(inputs["input_ids"].numel())
            self._total_train_tokens += self._gathered(counted) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

    def _fused_loss_real_router_tokens(self, model, inputs, num_items_in_batch, real_mask):
        """TRL's fused head on packed rows of a mixture of experts: TRL's forward takes the load-balancing
        loss over `attention_mask`, which packed rows do not pass (it would undo the per-example attention),
        so every row's end padding would count as routed tokens. The router logits are caught at the backbone
        instead, TRL's own term is left out for this call, and the loss over the real tokens is added
        (`_router_loss`)."""
        caught = []
        backbone = self.accelerator.unwrap_model(model).get_decoder()
        hook = backbone.register_forward_hook(lambda module, args, out: caught.append(_router_logits(out)))
        self.aux_loss_enabled = False
        try:
            loss = super().compute_loss(model, {**inputs, "output_router_logits": True}, False,
                                        num_items_in_batch)
        finally:
            self.aux_loss_enabled = True
            hook.remove()
        routed = next((r for r in reversed(caught) if r is not None), None)
        return loss + self._router_loss(model, routed, real_mask, num_items_in_batch)

    def _liger_loss(self, model, inputs, num_items_in_batch, real_tokens):
        """Liger's fused linear cross-entropy (`train.kernels`, models/kernels.py), which replaced the model's
        forward: given labels while training it returns the loss, normalised as transformers' own, and the
        token accuracy, and no logits. Trainer's loss path passes `num_items_in_batch` and scales across ranks
        as for any model."""
        inputs = {**inputs, "use_cache": False, "return_token_accuracy": True}
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        accuracy = outputs.token_accuracy if outputs.token_accuracy is not None else torch.zeros(())
        self._metrics["train"]["mean_token_accuracy"].append(self._gathered_mean(accuracy.detach().float()))
        counted = real_tokens if real_tokens is not None else inputs["attention_mask"].sum()
        self._total_train_tokens += self._gathered(counted) // self._tp_size
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return loss

    def _normalised(self, total, n_valid, num_items_in_batch):
        """A summed loss as transformers' causal-LM loss reduces it: / num_items_in_batch, else the mean."""
        if num_items_in_batch is None or not self.model_accepts_loss_kwargs:
            return total / n_valid.clamp(min=1)
        loss = total / num_items_in_batch
        if self.args.average_tokens_across_devices:
            # As Trainer.compute_loss does when the model divides by num_items_in_batch across ranks.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def _output_embedding(self, model):
        """The LM head to restrict to labelled positions, or None where the logits do not line up with the
        labels (virtual-token methods) or a loss function of the user's is set."""
        unwrapped = self.accelerator.unwrap_model(model)
        if self.compute_loss_func is not None or self.label_smoother is not None:
            return None
        peft_config = getattr(unwrapped, "active_peft_config", None)
        if peft_config is not None and peft_config.is_prompt_learning:
            return None
        return unwrapped.get_output_embeddings()

    def _trl_fuses(self, model) -> bool:
        """Whether TRL's fused LM head can read this model's head: a plain nn.Linear (weight and bias)."""
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        return type(head) is torch.nn.Linear

    def _chunked_head(self, model) -> Head | None:
        """The LM head as `lm_head.Head` for the chunked loss, or None where `_output_embedding` has none or
        the head is one `lm_head.head_of` does not reproduce."""
        if self._output_embedding(model) is None:
            return None
        return head_of(self.accelerator.unwrap_model(model))

    def _chunked_loss(self, model, head, inputs):
        """(summed cross-entropy of the labelled next tokens, their count, how many were the top prediction),
        the LM head applied chunk by chunk to the positions that predict a labelled token only."""
        labels = inputs.pop("labels")
        with hidden_states(self.accelerator.unwrap_model(model)) as captured:
            outputs = model(**inputs)
        hidden = _aligned(captured, labels)
        targets = labels[:, 1:]
        keep = targets != -100
        total, n_correct = cross_entropy(head, hidden[:, :-1][keep], targets[keep])
        return total, keep.sum(), torch.tensor(n_correct, device=keep.device), _router_logits(outputs)

    def _labelled_positions_loss(self, model, head, inputs):
        """(summed cross-entropy of the labelled next tokens, their count, how many were the top prediction),
        with the LM head applied to the positions that predict a labelled token only."""
        labels = inputs.pop("labels")
        targets = labels[:, 1:]
        keep = targets != -100

        def labelled_only(module, args):
            hidden = args[0]
            if hidden.shape[:2] != labels.shape:
                raise RuntimeError(f"hidden states {tuple(hidden.shape)} do not line up with labels "
                                   f"{tuple(labels.shape)}; set train.fused_lm_head: true")
            return (hidden[:, :-1][keep],) + tuple(args[1:])

        hook = head.register_forward_pre_hook(labelled_only)
        try:
            outputs = model(**inputs)
        finally:
            hook.remove()
        logits = outputs.logits  # [labelled positions, vocab]
        targets = targets[keep]
        with torch.no_grad():
            n_correct = (logits.argmax(-1) == targets).sum()
        return (F.cross_entropy(logits.float(), targets, reduction="sum"), keep.sum(), n_correct,
                _router_logits(outputs))

    def _router_loss(self, model, router_logits, mask, num_items_in_batch):
        """The weighted load-balancing loss over the real tokens' router logits (Mixtral's, as TRL's fused
        head takes it), spread over gradient accumulation as TRL spreads it."""
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        experts = self._experts
        if not router_logits or experts is None:
            return 0.0
        aux = load_balancing_loss_func(router_logits, experts.total, experts.active, mask)
        self._metrics["train" if model.training
                      else "eval"]["aux_loss"].append(self._gathered_mean(aux.detach()))
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        return self.router_aux_loss_coef * aux / steps

    def _gathered(self, value: torch.Tensor) -> torch.Tensor:
        """A count summed over ranks, kept as a tensor (no wait for the GPU: see `_gathered_mean`)."""
        return self.accelerator.gather_for_metrics(value.detach()).sum()


def _router_logits(outputs) -> tuple | None:
    """The forward pass's router logits (a tuple, one `[tokens, experts]` tensor per MoE layer), or None."""
    found = getattr(outputs, "router_logits", None)
    return found if isinstance(found, tuple) and found else None


def _aligned(captured: list, labels: torch.Tensor) -> torch.Tensor:
    """The hidden states of the last forward pass that reached the LM head, [batch, labels' length, hidden];
    prompt tuning's virtual tokens, which come first, are left out."""
    if not captured or captured[-1].dim() != 3 or captured[-1].shape[0] != labels.shape[0] \
            or captured[-1].shape[1] < labels.shape[1]:
        shape = tuple(captured[-1].shape) if captured else "none"
        raise RuntimeError(f"hidden states at the LM head ({shape}) do not line up with labels "
                           f"{tuple(labels.shape)}; set train.fused_lm_head: false")
    return captured[-1][:, -labels.shape[1]:]
