"""Base models: resolving a reference (`base`), the built-in tiny model (`tiny`), SmolLM2 from its wheel (`smollm2`)
and Gemma 3 270M from its package (`gemma3`), both read out of GGUF files (`gguf_source`)."""
