"""`python -m mlflow_finetune_plugin.train`: the training process (`train/job.py`), under the name commands
written by hand use (e.g. a multi-node torchrun started on each node, docs/scaling.md)."""

from mlflow_finetune_plugin.train.job import main

if __name__ == "__main__":
    main()
