"""After promotion: the served versions' traffic, read from their MLflow traces (`serve --trace`), summed per
time window and version, checked for drift away from the training data and against the recipe's
`monitor.gates`, logged to a monitoring run, and turned into the next fine-tune's data (`mlflow-finetune
monitor`, docs/monitoring.md).

Traces hold user data: these modules read what they score and keep aggregates and trace ids; texts leave the
process only where the user asks (`--examples`, `--retrain`'s data file)."""
