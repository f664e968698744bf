import json

import pytest

from deploy.agent.contract import BUNDLE_SCHEMA
from export.bundle import is_bundle_dir
from redistill.errors import UserError
from redistill.io import atomic_dir, atomic_write, atomic_write_json, check_writable, sha256_file


def _bundle_manifest(folder):
    (folder / "manifest.json").write_text(json.dumps({"schema": BUNDLE_SCHEMA, "files": {}}))


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"a": 1})

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text().strip().startswith("{") and '"a": 1' in p.read_text()
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    target = tmp_path / "bundle"
    with pytest.raises(ValueError):
        with atomic_dir(target, is_bundle_dir, "a bundle") as d:
            (d / "x").write_text("half")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target, is_bundle_dir, "a bundle") as d:
        _bundle_manifest(d)
    with atomic_dir(target, is_bundle_dir, "a bundle") as d:
        (d / "y").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["y"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert len(sha256_file(target / "y")) == 64


def test_atomic_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    p = atomic_write_json(tmp_path / "r.json", {})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
    with atomic_dir(tmp_path / "d"):
        pass
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask


@pytest.mark.parametrize("make", ["notes", "folder_of_bundles", "file", "symlink"])
def test_atomic_dir_never_replaces_what_is_not_a_bundle(tmp_path, make):
    target = tmp_path / "out"
    if make == "notes":
        target.mkdir()
        (target / "notes.txt").write_text("keep")
    elif make == "folder_of_bundles":
        (target / "a").mkdir(parents=True)
        _bundle_manifest(target / "a")
    elif make == "file":
        target.write_text("keep")
    else:
        (tmp_path / "real").mkdir()
        _bundle_manifest(tmp_path / "real")
        target.symlink_to(tmp_path / "real")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    ran = []
    with pytest.raises(UserError, match=f"{target} is a .*refusing to replace it") as e:
        with atomic_dir(target, is_bundle_dir, "a bundle") as d:
            ran.append(d)
    assert "\n" not in str(e.value) and not ran, "refused before the block runs"
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_atomic_dir_replaces_an_empty_folder_and_keeps_a_users_dot_old(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "mine").write_text("keep")
    with atomic_dir(target, is_bundle_dir, "a bundle") as d:
        _bundle_manifest(d)
    with atomic_dir(target, is_bundle_dir, "a bundle") as d:
        (d / "y").write_text("two")
    assert [p.name for p in target.iterdir()] == ["y"]
    assert (tmp_path / ".out.old" / "mine").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old", "out"]


def test_check_writable_names_the_folder(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "b")
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match=f"{tmp_path / 'f'} is not a folder"):
        check_writable(tmp_path / "f" / "b")
    ro = read_only_folder(tmp_path)
    with pytest.raises(UserError, match=f"cannot write {ro / 'b'}: {ro} is not writable"):
        check_writable(ro / "b")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def read_only_folder(tmp_path):
    """A folder this process cannot write: chmod 555 for a user; root ignores modes, so a read-only /sys."""
    import os
    import stat
    from pathlib import Path

    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return ro
    try:
        check_writable(Path("/sys/x"))
    except UserError:
        return Path("/sys")
    pytest.skip("running as root and /sys is writable: no read-only folder to test with")
