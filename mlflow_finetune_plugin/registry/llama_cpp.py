"""Where `mlflow-finetune export --gguf` finds llama.cpp's converter, `convert_hf_to_gguf.py` with its
`gguf-py`.

In this order: the `--llama-cpp` option, the `LLAMA_CPP_DIR` environment variable, a llama.cpp checkout on
PATH (the script itself, or a llama.cpp binary such as `llama-quantize` inside a checkout's build folder), and
last a copy extracted earlier into the plugin's cache. The option and the variable name either a llama.cpp
checkout, or llama-cpp-python's source distribution from PyPI (the `.tar.gz`, or the folder `pip download` put
it in): that sdist vendors llama.cpp, and the few files the converter needs are extracted from it once into
the cache, where later exports find them without being told. Nothing is downloaded here: the error says the
one pip command that does it.
"""

from __future__ import annotations

import ast
import os
import shutil
import tarfile
from pathlib import Path

from mlflow_finetune_plugin.errors import FinetuneError
from mlflow_finetune_plugin.paths import cache_root, cached_build

ENV_VAR = "LLAMA_CPP_DIR"
CONVERTER = "convert_hf_to_gguf.py"
SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"  # the sdist whose converter the tests run
PIP_DOWNLOAD = f"pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT} -d DIR"
_SDIST_GLOB = "llama_cpp_python-*.tar.gz"
_CACHE_PREFIX = "llama.cpp-from-"
# What the converter reads from a llama.cpp tree: the script, the per-architecture `conversion` package it
# imports (newer trees), the `gguf-py` beside it (put first on sys.path by the script itself), the chat
# templates some architectures read from models/templates, the license, and its pinned requirements (for the
# record).
_NEEDED = (CONVERTER, "conversion/", "gguf-py/", "models/templates/", "LICENSE", "requirements/")
# llama.cpp binaries whose checkout (a few folders up, e.g. build/bin/) holds the converter.
_BINARIES = ("llama-quantize", "llama-cli", "llama-server")


def find_llama_cpp(where: str | None = None) -> Path:
    """The llama.cpp folder holding convert_hf_to_gguf.py: from `where` (the --llama-cpp option), else
    $LLAMA_CPP_DIR, else PATH, else the cache. FinetuneError naming every way to give one when none is
    found."""
    if where:
        return _from_given(where, "--llama-cpp")
    if os.environ.get(ENV_VAR):
        return _from_given(os.environ[ENV_VAR], f"${ENV_VAR}")
    found = _on_path() or _cached()
    if found is None:
        raise FinetuneError(
            "--gguf converts with llama.cpp's convert_hf_to_gguf.py, and none was found (not given with "
            f"--llama-cpp, ${ENV_VAR} is not set, no llama.cpp checkout on PATH, none extracted into "
            f"{cache_root()}). Either:\n  - name a llama.cpp checkout: --llama-cpp ~/llama.cpp (or export "
            "LLAMA_CPP_DIR=~/llama.cpp), or\n  - get the converter from PyPI, where llama-cpp-python's "
            "source distribution vendors llama.cpp (76 MB, nothing is built):\n"
            f"      {PIP_DOWNLOAD.replace(' DIR', ' ~/llama-cpp-sdist')}\n"
            "    then pass --llama-cpp ~/llama-cpp-sdist once: the converter is extracted into the cache and "
            "found there afterwards.")
    return found


def supported_architectures(llama_cpp: Path) -> frozenset[str]:
    """The Hugging Face architecture names the converter registers (read from its source, nothing imported);
    empty when its layout is not one this reads, in which case the converter itself decides."""
    names: set[str] = set()
    for path in [llama_cpp / CONVERTER, *sorted((llama_cpp / "conversion").glob("*.py"))]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            # `@ModelBase.register("LlamaForCausalLM", ...)` (every layout) and `TEXT_MODEL_MAP = {"...":
            # "llama"}` (the lazy-import table of newer trees)
            if isinstance(node, ast.Call) and isinstance(node.func,
                                                         ast.Attribute) and node.func.attr == "register":
                names.update(a.value for a in node.args if isinstance(a, ast.Constant)
                             and isinstance(a.value, str))
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                    isinstance(t, ast.Name) and t.id.endswith("MODEL_MAP") for t in node.targets):
                names.update(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return frozenset(names)


def _from_given(where: str, source: str) -> Path:
    path = Path(where).expanduser().resolve()
    if path.is_file() and path.name == CONVERTER:
        return path.parent
    if path.is_dir() and (path / CONVERTER).is_file():
        return path
    sdists = (
        sorted(path.glob(_SDIST_GLOB)) if path.is_dir() else [path] if path.name.endswith(".tar.gz") else []
    )
    if sdists:
        return extract_sdist(max(sdists, key=_sdist_version))
    raise FinetuneError(
        f"{source} {where} {'does not exist' if not path.exists() else 'is not usable'}: give a llama.cpp "
        f"checkout (a folder with {CONVERTER}) or llama-cpp-python's source distribution "
        f"(llama_cpp_python-*.tar.gz, or the folder holding it), which this downloads: {PIP_DOWNLOAD}")


def _on_path() -> Path | None:
    script = shutil.which(CONVERTER)
    if script:
        return Path(script).resolve().parent
    for binary in _BINARIES:
        found = shutil.which(binary)
        if found:
            for folder in list(Path(found).resolve().parents)[:4]:
                if (folder / CONVERTER).is_file():
                    return folder
    return None


def _cached() -> Path | None:
    """The newest converter extracted into the cache by an earlier export."""
    root = cache_root()
    found = [p for p in root.glob(f"{_CACHE_PREFIX}*") if (p / CONVERTER).is_file()] if root.is_dir() else []
    return max(found, key=lambda p: _sdist_version(p.name)) if found else None


def _sdist_version(name: str | Path):
    """The version in llama_cpp_python-0.3.36(.tar.gz), for picking the newest of several."""
    from packaging.version import InvalidVersion, Version

    stem = Path(name).name.removesuffix(".tar.gz").rsplit("-", 1)[-1]
    try:
        return Version(stem)
    except InvalidVersion:
        return Version("0")


def extract_sdist(sdist: Path) -> Path:
    """Extract the converter's files from llama-cpp-python's sdist into `cache_root()/llama.cpp-from-<sdist
    name>` (once; concurrent exports wait for the first)."""
    name = _CACHE_PREFIX + sdist.name.removesuffix(".tar.gz")

    def build(tmp: Path) -> None:
        try:
            with tarfile.open(sdist) as tar:
                count = _extract_members(tar, tmp)
        except (OSError, tarfile.TarError) as e:
            raise FinetuneError(f"{sdist}: cannot read it as llama-cpp-python's source distribution ({e}); "
                                f"download it again with: {PIP_DOWNLOAD}") from None
        if not (tmp / CONVERTER).is_file():
            raise FinetuneError(f"{sdist}: holds no vendor/llama.cpp/{CONVERTER} ({count} files taken): not "
                                f"llama-cpp-python's source distribution? Get it with: {PIP_DOWNLOAD}")

    return cached_build(name, build, complete=(CONVERTER,))


def _extract_members(tar: tarfile.TarFile, dest: Path) -> int:
    """Copy the regular files under `<top>/vendor/llama.cpp/` that the converter needs into `dest`. Only plain
    files with plain relative names are written (no links, no `..`), so the archive cannot write outside
    `dest`."""
    count = 0
    for member in tar:
        parts = member.name.split("/")
        if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not member.isfile():
            continue
        relative = "/".join(parts[3:])
        if not relative.startswith(_NEEDED) or ".." in parts:
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
        count += 1
    return count
