"""Hyper-parameter sweeps with Optuna: the search space file (`space`) and the study that runs trials
(`study`)."""
