"""Serving engines behind one small interface (`base.Engine`): the playground and `mlflow-finetune serve` use
them.

- transformers: in process, CPU or GPU; one copy of the base serves every side (adapters on/off per request).
- vllm: in process, vLLM's AsyncLLM with multi-LoRA (CUDA, the `vllm` extra).
- openai: any OpenAI-compatible server (`mlflow-finetune serve`, `vllm serve`, `transformers serve`).
"""

from mlflow_finetune_plugin.serving.base import Engine, ModelChoice, Settings, stream_pair
from mlflow_finetune_plugin.serving.openai_engine import OpenAIEngine
from mlflow_finetune_plugin.serving.transformers_engine import TransformersEngine
from mlflow_finetune_plugin.serving.vllm_engine import VLLMEngine

ENGINES: dict[str, type[Engine]] = {
    "transformers": TransformersEngine,
    "vllm": VLLMEngine,
    "openai": OpenAIEngine,
}

__all__ = ["ENGINES", "Engine", "ModelChoice", "Settings", "stream_pair"]
