"""Memory sizes as users write them, and the cards they name.

`24GiB`, `24 GiB`, `24gib`, `24G` are binary gibibytes; `24GB` and `24 gb` are decimal gigabytes (a card sold
as "24 GB" holds about 24 GiB: name the card with `--gpu` for its exact size). A bare number is refused: its
unit is the question.
"""

from __future__ import annotations

import re

from mlflow_finetune_plugin.errors import FinetuneError

_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")
FORM = "a number and a unit: 24GiB, 80GB, 40960MiB (GiB/MiB binary, GB/MB decimal)"

# Total memory as the driver reports it (`torch.cuda.get_device_properties(0).total_memory`, nvidia-smi's
# "Total"), in MiB: a card's marketed size is a little more than what a process can allocate.
GPUS = {
    "T4": 15360, "L4": 23034, "A10": 23028, "A10G": 23028, "RTX3090": 24576, "RTX4090": 24564,
    "RTX5090": 32607, "V100-16GB": 16384, "V100-32GB": 32768, "A100-40GB": 40960, "L40S": 46068,
    "A6000": 49140, "A100-80GB": 81920, "H100-80GB": 81559, "H100": 81559, "H200": 143771, "B200": 183359,
}


def parse_size(text: str, where: str = "--memory") -> int:
    """Bytes in `text` (`24GiB`, `80 GB`, `40960MiB`); anything else raises naming `where` and the form."""
    m = _SIZE.match(str(text))
    unit = _UNITS.get(m.group(2).lower()) if m else None
    if unit is None:
        raise FinetuneError(f"{where} {text!r} is not a memory size: give {FORM}")
    size = int(float(m.group(1)) * unit)
    if size <= 0:
        raise FinetuneError(f"{where} {text!r} is no memory at all: give {FORM}")
    return size


def gpu_memory(name: str) -> int:
    """Bytes of the card `name` (case, spaces and dashes aside: `a100-80gb`, `RTX 4090`)."""
    key = re.sub(r"[\s_-]", "", name).upper()
    table = {re.sub(r"[\s_-]", "", k).upper(): v for k, v in GPUS.items()}
    if key not in table:
        import difflib

        near = difflib.get_close_matches(key, table, n=1, cutoff=0.6)
        hint = f" Did you mean {[k for k in GPUS if re.sub(r'[-]', '', k).upper() == near[0]][0]}?" \
            if near else ""
        raise FinetuneError(f"--gpu {name!r} is not a card this table knows ({', '.join(GPUS)}).{hint} "
                            f"Or give its size with --memory ({FORM}).")
    return table[key] * 2**20


def gib(n: float) -> str:
    """`n` bytes as GiB with two decimals, the unit named."""
    return f"{n / 2**30:.2f} GiB"
