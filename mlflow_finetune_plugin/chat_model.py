"""The code MLflow logs as the fine-tuned pyfunc model ("models from code"): no pickle is written.

MLflow runs this file when the model is logged and when it is loaded; it is not imported by the package. The
class lives in `logged_model`, where versions logged as pickles before this file existed also find it. Where
the plugin is not installed, that import finds the copy of `logged_model` the model carries in its `code/`
folder.
"""

import mlflow

from mlflow_finetune_plugin.logged_model import FinetunedChatModel

mlflow.models.set_model(FinetunedChatModel())
