"""The code MLflow logs as a reward model's pyfunc ("models from code"): no pickle is written. MLflow runs
this file when the model is logged and loaded; where the plugin is not installed, the import finds the copy of
`reward_model` the model carries in its `code/` folder."""

import mlflow

from mlflow_finetune_plugin.reward_model import RewardScorer

mlflow.models.set_model(RewardScorer())
