"""A model's shape, from its configuration alone: the config (a hub id's config.json, a local folder, a
built-in model's), and its parameters counted on the meta device (the model class built without memory: every
architecture transformers knows, counted exactly), with the recipe's adapter attached the same way to count
what trains.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from mlflow_finetune_plugin.errors import FinetuneError


@dataclass
class Shape:
    """What the plan needs of a model: its config, and its parameters by part."""

    config: object
    total: int  # every parameter
    embedding: int  # the input embedding
    head: int  # the LM head, 0 when tied to the embedding
    linear: int  # the decoder's linear layers' weights (what 4-bit and 8-bit quantize)
    trainable: int  # what the recipe's adapter trains (everything under `full`)
    adapter: int  # parameters the adapter adds (0 under `full`)
    trainable_linear: int = 0  # of `trainable`, those in the quantizable linear layers (`full`)

    @property
    def text(self):
        return getattr(self.config, "text_config", None) or self.config

    def get(self, *names, default=None):
        """The first of `names` the (text) config has, else `default` (asked, not listed per family)."""
        for name in names:
            with contextlib.suppress(Exception):  # Gemma 4 raises on a per-layer head_dim
                value = getattr(self.text, name, None)
                if value is not None:
                    return value
        return default

    @property
    def hidden(self) -> int:
        return int(self.get("hidden_size", "n_embd", "d_model"))

    @property
    def layers(self) -> int:
        return int(self.get("num_hidden_layers", "n_layer", "num_layers"))

    @property
    def vocab(self) -> int:
        return int(self.get("vocab_size"))

    @property
    def experts(self) -> int | None:
        return self.get("num_local_experts", "num_experts", "n_routed_experts")


def model_config(model_cfg):
    """The transformers config of a recipe's `model` section, without its weights: a built-in model's (tiny
    ones are built on first use, as training would; smollm2 and gemma3 read from their converted folder, or
    from their GGUF file's header before the first conversion), a local folder's, or a hub id's (the cache
    first)."""
    import transformers

    from mlflow_finetune_plugin import paths
    from mlflow_finetune_plugin.models import gemma3, smollm2
    from mlflow_finetune_plugin.models.base import resolve_model_path

    kwargs = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    name = model_cfg.name
    try:
        for is_it, folders, gguf in ((smollm2.is_smollm2, "smollm2-*", smollm2.gguf_path),
                                     (gemma3.is_gemma3, "gemma3-270m-*", gemma3.gguf_path)):
            if is_it(name):
                built = sorted(p for p in paths.cache_root().glob(folders) if (p / "config.json").is_file())
                if built:
                    return transformers.AutoConfig.from_pretrained(str(built[-1]))
                file = gguf()
                config = transformers.AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
                config.__dict__.pop("quantization_config", None)
                return config
        path = resolve_model_path(name)
        try:  # offline, asking the hub retries for half a minute before using the cache
            return transformers.AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
        except OSError:
            return transformers.AutoConfig.from_pretrained(path, **kwargs)
    except FinetuneError:
        raise
    except Exception as e:  # noqa: BLE001 - any reason a config cannot be read is the user's to see
        raise FinetuneError(
            f"model.name {name!r}: its configuration could not be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). The plan reads only config.json: give a hub id "
            "whose config.json is cached or reachable (HF_TOKEN for gated models), a folder holding "
            "config.json, or a built-in model (tiny, smollm2, gemma3, tiny-<family>).") from None


def empty_model(config):
    """The causal LM of `config` on the meta device (no memory): image-text models as their text part."""
    import torch
    import transformers

    from mlflow_finetune_plugin.models.vision import takes_images

    auto = (transformers.AutoModelForImageTextToText if takes_images(config)
            else transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        return auto.from_config(config, dtype=torch.float32)


def count(config, recipe) -> Shape:
    """The parameters of `config`'s model by part, and what `recipe`'s adapter trains on it."""
    import torch

    from mlflow_finetune_plugin.train.adapters import adapter_of

    model = empty_model(config)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    head = 0 if out is None or out.weight is embed else out.weight.numel()
    skip = {id(embed)} | ({id(out.weight)} if out is not None else set())
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and id(m.weight) not in skip)
    module = adapter_of(recipe)
    if module.ARTIFACT == "full":
        return Shape(config, total, embed.numel(), head, linear, total, 0, linear)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.device("meta"):
        wrapped = module.apply(model, recipe.adapter)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    added = sum(p.numel() for p in wrapped.parameters()) - total
    return Shape(config, total, embed.numel(), head, linear, trainable, added)
