"""The page's files: uploads kept in a folder of their own, projects made from them (an ordinary project
folder, so the run is `mlflow run` like any other), and the one gate every path a request names goes through:
nothing outside
the workspace, the bundled recipes and the folders the app was started with is read or run, symlinks
included."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
import unicodedata
from pathlib import Path

import yaml

from mlflow_finetune_plugin.config.schema import HF_PREFIX, RECIPE_FILE, SHORT_KEYS, TRACES_PREFIX
from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.studio.reference import bundled_recipes_dir

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".md")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff")
MAX_UPLOAD_BYTES = 200 << 20
# Recipe keys whose values name files or folders (relative to the project), checked before a request uses
# them.
_PATH_KEYS = ("data.train", "data.eval", "data.replay", "data.documents", "eval.forgetting", "model.name",
              "model.chat_template", "model.init_adapter")
_URI_PREFIXES = (HF_PREFIX, TRACES_PREFIX, "models:/", "runs:/", "http://", "https://")
# Files of the base project a project made from uploads needs beside its finetune.yaml.
_PROJECT_CODE = ("rewards.py",)


def _new_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


class Workspace:
    """`root` holds uploads/<id>/ and projects/<id>/; `allowed_roots` are the folders the app was started
    with."""

    def __init__(self, root: Path, allowed_roots: list[Path], max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.root = Path(os.path.realpath(Path(root).expanduser()))
        self.root.mkdir(parents=True, exist_ok=True)
        bundled = bundled_recipes_dir()
        self.allowed = [self.root, *([Path(os.path.realpath(bundled))] if bundled else []),
                        *(Path(os.path.realpath(Path(r).expanduser())) for r in allowed_roots)]
        self.max_upload_bytes = max_upload_bytes

    # ------------------------------------------------------------------------------------------- the gate

    def resolve(self, path) -> Path:
        """`path` with every symlink followed (a relative one: from the workspace root); FinetuneError unless
        it lies under the workspace, the bundled recipes or a folder the app was started with."""
        given = Path(path).expanduser()
        real = Path(os.path.realpath(given if given.is_absolute() else self.root / given))
        if not any(real == root or real.is_relative_to(root) for root in self.allowed):
            raise FinetuneError(f"{path}: outside the folders this app may read or run "
                                f"({', '.join(str(r) for r in self.allowed)}); pick a project from the list, "
                                "upload the files, or start the app with that folder (it is then one of "
                                "them)")
        return real

    def check_request(self, project_dir, overrides: dict) -> Path:
        """The project of a request, resolved through the gate, and every path its overrides name (data files,
        documents, a local model or chat template...: relative ones from the project), so a value typed on the
        page cannot make the check or the run read a file elsewhere. Returns the project's real path."""
        project = self.resolve(project_dir)
        if not (project / RECIPE_FILE).is_file():
            raise FinetuneError(f"{project_dir}: no {RECIPE_FILE} there; pick a project from the list")
        for key, value in overrides.items():
            dotted = SHORT_KEYS.get(key, key)
            if isinstance(value, str) and value.strip() and _names_path(dotted, value):
                target = Path(value.strip()).expanduser()
                if dotted == "model.name" and not value.startswith((".", "/", "~")) and \
                        not (project / target).exists():
                    continue  # a hub id (ORG/NAME), or a built-in model's name
                self.resolve(target if target.is_absolute() else project / target)
        return project

    # ------------------------------------------------------------------------------------------- uploads

    def save_uploads(self, paths: list[Path], names: list[str] | None = None) -> Path:
        """Copy the uploaded files (Gradio's temporary paths) into a new folder root/uploads/<id>/, each under
        its own name (`names`: as the browser sent them; else the temporary file's), so a JSONL's relative
        image paths to files uploaded beside it still hold. Every file is checked before any is copied: its
        name (no hidden name, no folder in it, a known data or image suffix, once per upload), that it is a
        regular file, and its size. Returns the new folder."""
        if not paths:
            raise FinetuneError("no files uploaded; choose a training file (.jsonl, .json, .csv or .parquet)")
        names = list(names) if names is not None else [Path(p).name for p in paths]
        if len(names) != len(paths):
            raise FinetuneError(f"{len(paths)} files but {len(names)} names uploaded")
        checked, seen = [], set()
        for path, name in zip(paths, names):
            name = self._upload_name(name)
            if name.casefold() in seen:
                raise FinetuneError(
                    f"{name}: uploaded twice; upload each file once (names are compared ignoring "
                    "case)")
            seen.add(name.casefold())
            source = Path(path)
            if source.is_symlink() or not source.is_file():
                raise FinetuneError(f"{name}: not a regular file ({source}); upload the file itself")
            size = source.stat().st_size
            if size > self.max_upload_bytes:
                raise FinetuneError(
                    f"{name}: {size / 2**20:.1f} MiB, more than the {self.max_upload_bytes / 2**20:.0f} "
                    "MiB an upload may be; split the file, or put it in a folder the app is started "
                    "with and pick the project there")
            checked.append((source, name))
        folder = self.root / "uploads" / _new_id()
        folder.mkdir(parents=True)
        try:
            for source, name in checked:
                shutil.copyfile(source, folder / name, follow_symlinks=False)
        except OSError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise FinetuneError(f"could not store the uploads in {folder}: {e}") from None
        return folder

    @staticmethod
    def _upload_name(name: str) -> str:
        """The name a file is stored under: the name as sent (NFC), refused where it could leave its folder or
        hide."""
        name = unicodedata.normalize("NFC", str(name)).strip()
        if not name or name in (".", "..") or "/" in name or "\\" in name or ".." in name:
            raise FinetuneError(f"{name!r}: a file name may not contain a folder ('/', '\\\\') or '..'; "
                                "upload the file under its own name")
        if name.startswith("."):
            raise FinetuneError(f"{name!r}: hidden file names are not uploaded; rename the file")
        if any(unicodedata.category(c).startswith("C") for c in name) or len(name.encode()) > 255:
            raise FinetuneError(
                f"{name!r}: control characters or more than 255 bytes in the name; rename the file")
        if not name.lower().endswith(DATA_SUFFIXES + IMAGE_SUFFIXES):
            raise FinetuneError(f"{name}: not a file type the page takes; upload data as "
                                f"{', '.join(DATA_SUFFIXES)} or images as {', '.join(IMAGE_SUFFIXES)}")
        return name

    # ------------------------------------------------------------------------------------------- projects

    def project_from_uploads(self, upload_dir: Path, base_project: Path, train_file: str,
                             eval_file: str | None, name: str | None = None) -> Path:
        """A new project root/projects/<id>/: the base project's finetune.yaml with data.train (and data.eval)
        pointing at the uploaded files, copied with everything uploaded beside them into its data/ folder. The
        base's other relative paths (replay and forgetting text, documents, a chat template file) are made
        absolute, its rewards.py copied, so the new folder is an ordinary project that `mlflow run` takes as
        it is. Without an eval file, data.eval is cleared and a tenth of the training rows is held out where
        the base held out none (the evaluation needs held-out rows). Its versions are registered as `name`
        (default: BASE-TRAINSTEM), never under the base project's own registered model."""
        uploads = self.resolve(upload_dir)
        if not uploads.is_relative_to(self.root / "uploads") or not uploads.is_dir():
            raise FinetuneError(
                f"{upload_dir}: not a folder of uploads of this workspace ({self.root / 'uploads'})")
        base = self.resolve(base_project)
        raw = _recipe_mapping(base)
        data = raw.setdefault("data", {})
        if not isinstance(data, dict):
            raise FinetuneError(f"{base / RECIPE_FILE}: `data` must be a mapping to take uploaded files")
        if data.get("tasks") or isinstance(raw.get("multitask"), dict) and raw["multitask"].get("tasks"):
            raise FinetuneError(
                f"{base.name} trains a mixture of tasks (data.tasks); pick a project with one data "
                "set as the base for uploaded files")
        for label, chosen in (("training", train_file), ("eval", eval_file)):
            if chosen is not None and not (uploads / self._upload_name(chosen)).is_file():
                raise FinetuneError(f"{chosen}: no {label} file of that name among the uploads "
                                    f"({', '.join(sorted(p.name for p in uploads.iterdir()))})")
        _absolute_paths(raw, base)
        data["train"] = f"data/{train_file}"
        data["eval"] = f"data/{eval_file}" if eval_file else None
        if not eval_file and not data.get("eval_split"):
            data["eval_split"] = 0.1
        registry = raw["registry"] if isinstance(raw.get("registry"), dict) else raw.setdefault("registry",
                                                                                                {})
        registry["name"] = re.sub(r"[^A-Za-z0-9._-]+", "-",
                                  name or f"{base.name}-{Path(train_file).stem}").strip("-.")
        project = self.root / "projects" / _new_id()
        shutil.copytree(uploads, project / "data", symlinks=True)
        for name in _PROJECT_CODE:
            if (base / name).is_file():
                shutil.copyfile(base / name, project / name)
        head = (f"# Made by the Train page from {base} with the uploaded {train_file}"
                + (f" and {eval_file}" if eval_file else "") + ".\n")
        (project / RECIPE_FILE).write_text(head + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True),
                                           encoding="utf-8")
        return project


def _names_path(key: str, value: str) -> bool:
    return (key in _PATH_KEYS or key.startswith("data.tasks.") and key.endswith((".train", ".eval"))) and \
        value.strip().lower() not in ("true", "false", "null", "~") and not value.startswith(_URI_PREFIXES)


def _recipe_mapping(project: Path) -> dict:
    try:
        raw = yaml.safe_load((project / RECIPE_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise FinetuneError(f"{project / RECIPE_FILE}: cannot be read as YAML ({e}); pick another base "
                            "project") from None
    if not isinstance(raw, dict):
        raise FinetuneError(f"{project / RECIPE_FILE}: the top level must be a mapping of sections")
    return raw


def _absolute_paths(raw: dict, base: Path) -> None:
    """The base recipe's relative file paths, other than its data files, made absolute against the base
    project."""
    for section, key in (("data", "replay"), ("data", "documents"), ("eval", "forgetting"),
                         ("model", "chat_template"), ("model", "name")):
        node = raw.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value,
                          str) or not value or value.startswith(_URI_PREFIXES) or Path(value).is_absolute():
            continue
        if (base / value).exists() or key == "documents":
            node[key] = str((base / value).resolve())
