"""Fine-tune LLMs with one `mlflow run`; see README.md."""

import logging as _logging
import os as _os
import warnings as _warnings

__version__ = "0.1.0"

# litellm (the `dspy` extra brings it; MLflow imports it to price traces and in its GenAI evaluation)
# fetches its model cost map from the internet when it is imported, three attempts, before falling back to
# the copy it ships: a network call nobody asked for, seconds on every run offline. This variable, read by
# litellm at import, makes it use the bundled map; set here before anything imports litellm, it is inherited
# by every process the plugin starts (the training child, torchrun's ranks, a Ray job's: launchers/ray.py
# passes LITELLM_*). A user who sets it (`False`) keeps the fetch.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# bitsandbytes warns on every import of a CPU build that its optional hub kernel is missing; that kernel would
# be downloaded from a hub anyway, and the CPU fallback it uses instead works (QLoRA trains on CPU), so hide
# the noise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# transformers >= 5.23 deprecates `is_gradient_checkpointing` (now `is_activation_checkpointing`), and PEFT
# 0.21 still reads it each time it wraps a model: a FutureWarning in every run that only PEFT can act on. This
# message only.
_warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                         category=FutureWarning)
