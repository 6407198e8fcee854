"""`mlflow-finetune studio`: the Train page. Pick a project or upload data, pick a model and an entry point,
edit the recipe's keys, check it all, start the run as the plugin's own `mlflow run ... --backend finetune`
(detached, queued), watch it from MLflow's records, judge it (the verdict against every prompt-only
contender), chat with it in the A/B playground and promote it through the gates (docs/studio.md)."""
