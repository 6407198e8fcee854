"""Fine-tune LLMs with one `mlflow run`; see README.md."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes warns on every import of a CPU build that its optional hub kernel is missing; that kernel would be
# downloaded from a hub anyway, and the CPU fallback it uses instead works (QLoRA trains on CPU), so hide the noise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
