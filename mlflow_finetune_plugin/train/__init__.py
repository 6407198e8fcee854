"""Fine-tuning itself, run as the training process: its lifecycle (`job`), one fine-tune top to bottom
(`pipeline`), the axes (`adapters/`, `quantization`, `objectives/`, `rewards/`), the trainer set-up,
callbacks, resume and publishing the result. `python -m mlflow_finetune_plugin.train` starts the training
process (`job.main`)."""
