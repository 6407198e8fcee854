"""Download one source distribution from PyPI into a folder, checked against the sha256 the index gives.

    python .ci/fetch_sdist.py NAME VERSION DIR

Uses PyPI's simple index in its JSON form (PEP 691), the same index pip reads: `pip download --no-binary
:all:` would build the package's metadata first (minutes for llama-cpp-python), which is not needed to read
its files.
"""

import hashlib
import json
import sys
import urllib.request
from pathlib import Path


def main(name: str, version: str, folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    stem = f"{name.replace('-', '_')}-{version}.tar.gz"
    entry = next((f for f in files if f["filename"].lower() == stem.lower()), None)
    if entry is None:
        sys.exit(f"{name} {version}: no source distribution {stem} on PyPI")
    target = out / entry["filename"]
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == entry["hashes"]["sha256"]:
        print(f"{target} already there")
        return
    partial = target.with_suffix(".part")
    with urllib.request.urlopen(entry["url"], timeout=600) as response, open(partial, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)
    digest = hashlib.sha256(partial.read_bytes()).hexdigest()
    if digest != entry["hashes"]["sha256"]:
        partial.unlink()
        sys.exit(f"{entry['filename']}: sha256 {digest} is not the index's {entry['hashes']['sha256']}")
    partial.rename(target)
    print(f"{target} ({target.stat().st_size / 1e6:.0f} MB, sha256 checked)")


if __name__ == "__main__":
    main(*sys.argv[1:4])
