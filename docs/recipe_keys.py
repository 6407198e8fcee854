"""Write docs/reference.md's recipe key tables from the schema (issue 80): each key's type, default and
meaning as `mlflow_finetune_plugin/config/keys.py` reads them from the pydantic fields, so a key is described
in one place.

    python docs/recipe_keys.py            # rewrite the tables (a second or two)
    python docs/recipe_keys.py --check    # exit 1 when the file's tables differ from the schema's

Each table goes between its pair of markers in reference.md (`<!-- recipe keys: NAME ... -->` and
`<!-- end of recipe keys: NAME -->`); the prose around them is left as it is. tests/test_recipe_keys.py fails
when the file and the schema disagree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reference.md"
START = "<!-- recipe keys: {name} (written by docs/recipe_keys.py from the schema) -->"
END = "<!-- end of recipe keys: {name} -->"
_MARKERS = re.compile(r"<!-- recipe keys: (\S+) \(written by docs/recipe_keys.py from the schema\) -->\n.*?"
                      r"<!-- end of recipe keys: \1 -->", re.S)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _line(*cells: str) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def _key(key: str) -> str:
    return ", ".join(f"`{k}`" for k in key.split(", "))


def _group_row(kind: str) -> str:
    """The bold row that starts an adapter type's keys: the entry points that pick it when named otherwise,
    and the type's own description where it has no keys."""
    from mlflow_finetune_plugin.config import presets
    from mlflow_finetune_plugin.config.schema import ADAPTER_CONFIGS

    cls = ADAPTER_CONFIGS[kind]
    others = [name for name, p in presets.PRESETS.items() if p.adapter == kind and name != kind]
    label = f"**{kind}**" + (f" ({', '.join(f'`-e {n}`' for n in others)})" if kind not in presets.PRESETS
                             and others else "")
    keys = [n for n in cls.model_fields if n != "type"]
    meaning = "" if keys else _cell((cls.__doc__ or "").strip().rstrip("."))
    return _line(label, "", "", meaning)


def table(name: str) -> str:
    """The markdown of one key table, markers included."""
    from mlflow_finetune_plugin.config.keys import tables
    from mlflow_finetune_plugin.config.schema import ADAPTER_CONFIGS

    rows = tables()[name]
    lines = [START.format(name=name), "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    group = None
    for row in rows:
        if row.group != group:
            group = row.group
            lines.append(_group_row(group))
        lines.append(_line(_key(row.key), _cell(row.type), _cell(row.default), _cell(row.help)))
    if name == "adapter":  # adapter types without keys of their own still get their row
        seen = {row.group for row in rows}
        lines += [_group_row(kind) for kind in ADAPTER_CONFIGS if kind not in seen]
    return "\n".join(lines + ["", END.format(name=name)])


def rendered(text: str) -> str:
    """`text` (reference.md) with every marked table written from the schema."""
    return _MARKERS.sub(lambda m: table(m.group(1)), text)


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    text = DOC.read_text(encoding="utf-8")
    new = rendered(text)
    if "--check" in argv:
        if new != text:
            print(f"{DOC.relative_to(ROOT)}'s recipe key tables differ from the schema: "
                  "run python docs/recipe_keys.py")
            return 1
        return 0
    if new != text:
        DOC.write_text(new, encoding="utf-8")
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
