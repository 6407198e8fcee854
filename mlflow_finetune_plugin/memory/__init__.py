"""The memory plan: what a recipe will take on a device, part by part, read from the model's configuration and
never its weights, and the settings that fit a memory size (`mlflow-finetune plan`, the backend before it
loads anything, the studio's Check: one function, `plan.plan`).

- shape: the model's configuration (hub id, folder, built-in) and its parameters counted on the meta device
- trace: the activations autograd keeps, traced on the meta device (no memory, no compute)
- plan: the parts of the peak, and the settings that fit
- sizes: memory sizes as users write them (`24GiB`, `80 GB`) and the cards they name (`--gpu A100-80GB`)
"""
