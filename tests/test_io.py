import errno
import json
import os
import stat

import pytest

from lmforge.io import (
    atomic_folder,
    atomic_open,
    atomic_path,
    fsync_tree,
    replace_folder,
    write_bytes_atomic,
    write_errors_explained,
    write_json_atomic,
    write_text_atomic,
)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writers_write_the_content(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "héllo\r\nworld\n")
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01\xff")
    write_json_atomic(tmp_path / "c.json", {"b": 1, "a": [1, 2]})
    write_json_atomic(tmp_path / "d.json", {"ü": 1}, indent=None, ensure_ascii=False)
    assert (tmp_path / "a.txt").read_bytes() == "héllo\r\nworld\n".encode()  # byte for byte, no newline translation
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01\xff"
    assert (tmp_path / "c.json").read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=2) + "\n"
    assert (tmp_path / "d.json").read_text(encoding="utf-8") == '{"ü": 1}\n'
    assert _names(tmp_path) == ["a.txt", "b.bin", "c.json", "d.json"]  # no temporary left


def test_atomic_open_text_and_binary(tmp_path):
    with atomic_open(tmp_path / "t.txt") as f:
        f.write("one\n")
        f.write("two\n")
    with atomic_open(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x01\x02")
    assert (tmp_path / "t.txt").read_text() == "one\ntwo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x01\x02"


def test_atomic_open_refuses_other_modes(tmp_path):
    with pytest.raises(ValueError, match=r"mode='a'.*choose one of w, wt, wb"), atomic_open(tmp_path / "x.txt", "a"):
        pass
    assert _names(tmp_path) == []


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_error_mid_write_leaves_target_unchanged_and_no_temporary(tmp_path, error):
    target = tmp_path / "out.jsonl"
    with pytest.raises(error), atomic_open(target) as f:
        f.write("half a record")
        raise error
    assert _names(tmp_path) == []  # a new target is not created
    target.write_text("previous run\n")
    with pytest.raises(error), atomic_open(target) as f:
        f.write("half a record")
        raise error
    assert target.read_text() == "previous run\n"  # an existing target keeps its old content
    assert _names(tmp_path) == ["out.jsonl"]


def test_overwrite_keeps_old_content_until_the_replace(tmp_path):
    target = tmp_path / "data.txt"
    target.write_text("old")
    with atomic_open(target) as f:
        f.write("new")
        f.flush()
        assert target.read_text() == "old"  # readers see the old file while the new one is written
        (tmp,) = [p for p in tmp_path.iterdir() if p != target]
        assert tmp.name.startswith(".data.tmp-") and tmp.suffix == ".txt" and tmp.read_text() == "new"
    assert target.read_text() == "new"
    assert _names(tmp_path) == ["data.txt"]


def test_missing_parent_folders_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    write_text_atomic(target, "x")
    assert target.read_text() == "x"


def test_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644  # as open() makes it, not mkstemp's 0o600


def test_atomic_path_keeps_the_extension_for_writers_that_sniff_it(tmp_path):
    target = tmp_path / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".")
        tmp.write_bytes(b"png")
        assert not target.exists()
    assert target.read_bytes() == b"png"
    assert _names(tmp_path) == ["plot.png"]


def test_atomic_path_with_nothing_written_fails_and_leaves_no_file(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "x.bin"):
        pass
    assert _names(tmp_path) == []


def test_atomic_folder_swaps_in_a_complete_folder(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.tmp-")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"1")
        (tmp / "config.json").write_text("{}")
        assert not target.exists()
    assert (target / "sub" / "w.bin").read_bytes() == b"1"
    with atomic_folder(target) as tmp:
        (tmp / "config.json").write_text('{"v": 2}')
        assert (target / "sub" / "w.bin").exists()  # the old folder stays whole until the swap
    assert _names(target) == ["config.json"] and (target / "config.json").read_text() == '{"v": 2}'
    assert _names(tmp_path) == ["ckpt"]  # neither the temporary nor the old folder is left


def test_atomic_folder_error_leaves_the_old_folder(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "config.json").write_text("new")
        raise RuntimeError("killed")
    assert (target / "config.json").read_text() == "old"
    assert _names(tmp_path) == ["ckpt"]


def test_replace_folder_and_fsync_tree(tmp_path):
    new = tmp_path / "new"
    (new / "a").mkdir(parents=True)
    (new / "a" / "f.txt").write_text("x")
    fsync_tree(new)
    replace_folder(new, tmp_path / "dest")
    assert (tmp_path / "dest" / "a" / "f.txt").read_text() == "x"
    assert _names(tmp_path) == ["dest"]


def test_atomic_folder_onto_a_symbolic_link_replaces_the_link_and_leaves_no_old_entry(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "config.json").write_text("old")
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone", target_is_directory=True)
    for name in ("link", "dangling"):
        with atomic_folder(tmp_path / name) as tmp:
            (tmp / "config.json").write_text("new")
        assert not (tmp_path / name).is_symlink() and (tmp_path / name / "config.json").read_text() == "new"
    assert (target / "config.json").read_text() == "old"  # what the link pointed at is not touched
    assert _names(tmp_path) == ["dangling", "link", "real"]


def test_a_full_disk_is_one_line_naming_the_target_and_leaves_nothing(tmp_path):
    with (
        pytest.raises(RuntimeError) as error,
        write_errors_explained(tmp_path / "out.jsonl", "output path"),
        atomic_open(tmp_path / "out.jsonl") as f,
    ):
        f.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    message = str(error.value)
    assert message == (
        f"disk full (or not writable) while writing {tmp_path / 'out.jsonl'} (No space left on device): "
        "free space or choose another output path"
    )
    assert _names(tmp_path) == []
    with pytest.raises(ValueError, match="not a write"), write_errors_explained(tmp_path):
        raise ValueError("not a write")  # other errors pass through untouched
