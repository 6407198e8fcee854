"""Base models: resolving a reference (`base`), the built-in tiny model (`tiny`) and SmolLM2 from its wheel (`smollm2`)."""
