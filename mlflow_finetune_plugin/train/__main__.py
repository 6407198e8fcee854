"""`python -m mlflow_finetune_plugin.train`: the training process, kept under its old name for commands written
before it moved to `job.py` (e.g. a multi-node torchrun started by hand, docs/scaling.md)."""

from mlflow_finetune_plugin.train.job import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    main()
