"""Fine-tuning methods: one module each, named in one dict.

Each module provides:
  Config                      -- the pydantic section of the recipe named after the method (`lora:`, `qlora:`, ...)
  model_kwargs(cfg) -> dict   -- extra `from_pretrained` kwargs for the base model (e.g. a quantization config)
  apply(model, cfg) -> model  -- wraps the loaded base model for training (PeftModel, or the model itself)
  vllm_compatible(cfg) -> (bool, reason)
  ARTIFACT                    -- "adapter" (base referenced, not copied) or "full" (complete weights)
"""

from mlflow_finetune_plugin.methods import adapter, full, ia3, lora, prefix, prompt, qlora

METHODS = {
    "lora": lora,
    "qlora": qlora,
    "adapter": adapter,
    "prefix": prefix,
    "prompt": prompt,
    "ia3": ia3,
    "full": full,
}
