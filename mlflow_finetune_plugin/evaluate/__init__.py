"""Evaluation: the contenders (base zero-shot, few-shot, tuned) answering held-out prompts, their scores and
report, forgetting on general text, and preference (DPO) figures."""
