"""The recipe: its typed schema (`schema`), loading it from finetune.yaml and -P overrides (`loading`), the
checks of combinations no single key can make (`checks`), and the entry-point presets (`presets`)."""
