"""Reward functions for GRPO: the built-in ones, loading a project's own from its rewards.py, and calling them
safely."""
