"""An LLM judge over served answers (`monitor --judge`), through MLflow's judges: each judged trace passes or
fails. NOT BUILT YET: the judge's model routing (a gateway endpoint, an OpenAI-compatible URL, a registered model)
is issue 66 point 4's work."""

from __future__ import annotations

from mlflow_finetune_plugin.errors import FinetuneError


def judged(requests: list, judge: str) -> dict[str, bool]:
    """trace id -> whether the judge passes the answer (traces it could not judge are left out)."""
    raise FinetuneError(f"--judge {judge}: LLM judges are not available in this version yet (docs/monitoring.md)")
