"""What the Train page reads from the source checkout beside the package: the bundled recipes (`recipes/`) and the
documented meaning of every recipe key (`docs/reference.md`, the one source the page's help text comes from, so the
page says what the reference says and nobody keeps a second copy).

Neither folder is in an installed wheel: there the page lists no bundled recipes, and its help text falls back to
the schema's own Field descriptions (`config/schema.py`)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# A bold row inside the adapter table (`| **lora** | | | |`) starts the keys of that adapter type.
_GROUP = re.compile(r"^\*\*([\w-]+)\*\*")
_KEY = re.compile(r"^`([A-Za-z_][\w-]*(?:\.[\w-]+)+)`$")


def checkout_root() -> Path | None:
    """The source checkout the package is imported from (it has pyproject.toml beside the package), or None for an
    installed wheel, whose parent folder (site-packages) holds other packages' files, not ours."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "recipes").is_dir() else None


def bundled_recipes_dir() -> Path | None:
    """`recipes/` of the checkout: one project folder per recipe (a folder with finetune.yaml)."""
    root = checkout_root()
    return root / "recipes" if root else None


def reference_path() -> Path | None:
    root = checkout_root()
    path = root / "docs" / "reference.md" if root else None
    return path if path and path.is_file() else None


@functools.lru_cache(maxsize=4)
def _rows(path: str, mtime: float) -> dict[tuple[str, str | None], tuple[str, str, str]]:
    """{(dotted key, adapter type or None): (type, default, meaning)} of the recipe tables' rows. The first row of a
    key wins where one is written twice."""
    rows: dict[tuple[str, str | None], tuple[str, str, str]] = {}
    group = None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            group = None
            continue
        if not line.startswith("|"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) < 4:
            continue
        if found := _GROUP.match(cells[0]):
            group = found.group(1)
            continue
        key = _KEY.match(cells[0])
        if key is None:
            continue
        name = key.group(1)
        where = group if name.startswith("adapter.") else None
        rows.setdefault((name, where), (cells[1], cells[2], cells[3]))
    return rows


def reference_row(key: str, adapter: str | None = None) -> tuple[str, str, str] | None:
    """(type, default, meaning) of `key`'s row in docs/reference.md (an adapter key: the row under that adapter's
    type), or None where the checkout's reference is not at hand or has no row for it."""
    path = reference_path()
    if path is None:
        return None
    rows = _rows(str(path), path.stat().st_mtime)
    return rows.get((key, adapter if key.startswith("adapter.") else None))
