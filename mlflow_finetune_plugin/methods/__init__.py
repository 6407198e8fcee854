"""Fine-tuning methods: one module each, named in one dict.

Each module provides:
  Config                      -- the pydantic section of the recipe named after the method (`lora:`, `qlora:`, ...)
  model_kwargs(cfg) -> dict   -- extra `from_pretrained` kwargs for the base model (e.g. a quantization config)
  apply(model, cfg) -> model  -- wraps the loaded base model for training (PeftModel, or the model itself)
  vllm_compatible(cfg) -> (bool, reason)
  ARTIFACT                    -- "adapter" (base referenced, not copied) or "full" (complete weights)
and optionally, where the method differs from plain supervised fine-tuning on `data.train`:
  DATA_FORMATS                -- data formats it trains on (default: chat, alpaca, prompt_completion)
  PACKING_SAFE = False        -- sequence packing would be wrong (virtual tokens shift the positions)
  OWN_DATA = True             -- its files are not `data.train`/`data.eval` (then `data_files(recipe)` lists them)
  check_recipe(recipe, project_dir) -> problems; load_data(recipe); log_inputs(...); build_trainer(...);
  evaluate(...)               -- hooks train.py calls instead of its defaults
"""

from mlflow_finetune_plugin.methods import adapter, dpo, full, ia3, lora, multitask, prefix, prompt, qlora

METHODS = {
    "lora": lora,
    "qlora": qlora,
    "adapter": adapter,
    "prefix": prefix,
    "prompt": prompt,
    "ia3": ia3,
    "full": full,
    "multitask": multitask,
    "dpo": dpo,
}
