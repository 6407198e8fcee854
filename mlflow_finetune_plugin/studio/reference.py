"""What the Train page reads beside its form: the bundled recipes of the source checkout (`recipes/`, not in
an installed wheel, where the page lists none) and the meaning of every recipe key, from the schema's field
descriptions (`config/keys.py`), the one place a key is described: docs/reference.md's key tables are
written from them (`docs/recipe_keys.py`), so the page and the reference say the same, in a checkout or an
installed wheel."""

from __future__ import annotations

from pathlib import Path

from mlflow_finetune_plugin.config.keys import key_help

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def checkout_root() -> Path | None:
    """The source checkout the package is imported from (it has pyproject.toml beside the package), or None
    for an installed wheel, whose parent folder (site-packages) holds other packages' files, not ours."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "recipes").is_dir() else None


def bundled_recipes_dir() -> Path | None:
    """`recipes/` of the checkout: one project folder per recipe (a folder with finetune.yaml)."""
    root = checkout_root()
    return root / "recipes" if root else None


def reference_row(key: str, adapter: str | None = None) -> tuple[str, str, str] | None:
    """(type, default, meaning) of a recipe key (an adapter key: as `adapter`'s type has it), read from the
    schema (`config/keys.py`), the words docs/reference.md's key tables are written from; None for no such
    key."""
    row = key_help(key, adapter)
    return (row.type, row.default, row.help) if row else None
