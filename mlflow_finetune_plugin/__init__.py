"""Fine-tune LLMs with one `mlflow run`; see README.md."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# bitsandbytes warns on every import of a CPU build that its optional hub kernel is missing; that kernel would
# be downloaded from a hub anyway, and the CPU fallback it uses instead works (QLoRA trains on CPU), so hide
# the noise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# transformers >= 5.23 deprecates `is_gradient_checkpointing` (now `is_activation_checkpointing`), and PEFT
# 0.21 still reads it each time it wraps a model: a FutureWarning in every run that only PEFT can act on. This
# message only.
_warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                         category=FutureWarning)
