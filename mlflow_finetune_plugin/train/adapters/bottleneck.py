"""Adapter layers: a small bottleneck network (down-projection, nonlinearity, up-projection) beside linear
layers.

PEFT has no Houlsby adapter (the bottleneck on the hidden states between sublayers), and AdapterHub's
`adapters` pins transformers 4.x. The PEFT tuner that is a bottleneck beside each targeted linear layer is
PEANuT (`PeanutConfig`, arXiv:2410.01870): per layer, `A` projects down to `bottleneck_size`, an activation
(`act_fn`) follows, optional residual encoder/decoder pairs (`depth`) add nonlinear layers, and `B` projects
back up; `B` starts at zero, so training starts from the base model exactly, as with Houlsby adapters. The
difference: PEANuT's bottleneck reads the frozen weight rather than the hidden state, producing `delta_W =
B(act(A(W)))` that is added beside the layer (`y = W x + delta_W x`). The update does not depend on the input,
so it can be merged into the base (`merge_and_unload`) like LoRA; at train time `delta_W` is built each
forward (more memory than LoRA).

Placement defaults to the attention output (`o_proj`) and the MLP output (`down_proj`): the two places Houlsby
et al. put their adapters, after each sublayer.
"""

from __future__ import annotations

from mlflow_finetune_plugin.config.schema import BottleneckAdapter

ARTIFACT = "adapter"


def peft_config(cfg: BottleneckAdapter, model=None):
    from peft import PeanutConfig, TaskType

    return PeanutConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.bottleneck_size,
        depth=cfg.depth,
        act_fn=cfg.act_fn,
        scaling=cfg.scaling,
        target_modules=cfg.target_modules,
    )


def apply(model, cfg: BottleneckAdapter):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg))


def vllm_compatible(cfg: BottleneckAdapter) -> tuple[bool, str]:
    return False, (
        "vLLM serves LoRA adapters only; merge this bottleneck adapter into the base (merge_and_unload) "
        "and serve the merged folder, or use the transformers engine")
