import pytest

from redistill.io import atomic_dir, atomic_write, atomic_write_json, sha256_file


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
        with atomic_dir(target) as d:
            (d / "x").write_text("half")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as d:
        (d / "x").write_text("one")
    with atomic_dir(target) as d:
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
