"""Training data: reading files (`read`), their formats (`formats`), row validation (`validation`), the check
a user runs before training (`check`), train/eval splits and mixtures (`splits`), and which tokens are learned
(`loss_masks`)."""
