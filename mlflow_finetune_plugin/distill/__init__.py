"""`-e distill`: a teacher answers the recipe's prompts once per job, before the student's model loads; the
student then trains on the answers like on any chat data (`answers.answered`)."""

from mlflow_finetune_plugin.distill.answers import answered  # noqa: F401
