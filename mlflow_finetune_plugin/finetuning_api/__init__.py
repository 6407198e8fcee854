"""OpenAI's fine-tuning API, self-hosted (`mlflow-finetune openai-api`): `client.files` and
`client.fine_tuning.jobs` over MLflow runs of this backend, and chat with the results at
`/v1/chat/completions`.

- files.py: uploaded files, kept as artifacts in the tracking store (one run per file, experiment
`openai-files`).
- rows.py: OpenAI's training rows per method (supervised, dpo, reinforcement) as the project's data formats,
  checked as `data check` checks them, line by line, before anything starts.
- graders.py: the reinforcement graders that map onto reward functions (string_check, text_similarity,
python),
  and why the others are refused; grader_runtime.py: the reward function itself, copied into the job's project
  as its rewards.py (it imports nothing of this package).
- jobs.py: a job's record and its project (finetune.yaml + data) made from the create request; pages of lists.
- runner.py: the thread that moves jobs along (validating_files -> queued -> running -> succeeded | failed |
  cancelled): one `mlflow run -e ... --backend finetune` per job, detached, so a server restart loses nothing.
- progress.py: what a job's MLflow run says: events, checkpoints, the metrics CSV, the fine-tuned model.
- app.py: the HTTP routes, the API key, OpenAI-shaped errors; chat requests go to `serving/front.py`, which
starts
  a server for a fine-tuned model or a base model the server fine-tunes (`serving/bases.py`) on its first
  request.
- shapes.py: OpenAI's error and list shapes. The `openai-api` command is cli/openai_api.py.
"""
