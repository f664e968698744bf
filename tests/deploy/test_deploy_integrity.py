"""Only the files a bundle's manifest lists travel to the device, symlinks and paths outside the bundle are refused
before anything is sent, and a manifest edited after export is refused (real OpenSSH server on 127.0.0.1)."""

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from export.bundle import bundle_id, export_record_path, read_export_record, write_bundle
from redistill.errors import UserError
from tests.deploy.test_deploy_loopback import assert_one_line_error, reports_in, run_deploy

SECRET = b"local secret: must never reach the device\n"
LISTED = ["manifest.json", "model.onnx", "reference/inputs.npy", "reference/outputs.npy"]


def copy_bundle(src, dst):
    """The bundle folder and its export record, as `redistill export` left them."""
    shutil.copytree(src, dst, symlinks=True)
    shutil.copy2(export_record_path(src), export_record_path(dst))
    return dst


def rewrite_manifest(bundle, edit):
    """Edit the manifest in place (what someone tampering after export does); the export record is left alone."""
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def test_only_listed_files_are_sent(fleet, bundles, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    b = copy_bundle(bundles["fp32"], tmp_path / "tiny-fp32")
    (b / "leak.txt").symlink_to(secret)       # not listed: a symlink rsync -L would have followed
    (b / "notes.txt").write_text("my notes")  # not listed either
    (b / "reference" / "more").mkdir()
    (b / "reference" / "more" / "x.npy").symlink_to(secret)
    p = run_deploy(b, "loop0", fleet.config, tmp_path)
    assert p.returncode == 0, p.stderr
    remote = tmp_path / "device" / bundle_id(b)
    assert files_under(remote / "bundle") == sorted(LISTED)
    assert not any(SECRET in f.read_bytes() for f in remote.rglob("*") if f.is_file() and not f.is_symlink())
    report = json.loads(reports_in(tmp_path)[0].read_text())
    # the id the server verified, the one export recorded and the one the device computed are the same
    assert report["deploy"]["bundle_id"] == report["deploy"]["exported_bundle_id"] == report["bundle"]["id"] \
        == bundle_id(b)


def test_a_listed_symlink_is_refused_before_anything_is_sent(fleet, bundles, tmp_path):
    b = copy_bundle(bundles["fp32"], tmp_path / "tiny-fp32")
    outside = tmp_path / "outputs.npy"
    shutil.move(str(b / "reference" / "outputs.npy"), outside)
    (b / "reference" / "outputs.npy").symlink_to(outside)  # same bytes, same sha256: only the link is wrong
    p = run_deploy(b, "loop0", fleet.config, tmp_path)
    assert_one_line_error(p, "reference/outputs.npy", "is a symlink", "re-export")
    assert "preflight" not in p.stderr and not (tmp_path / "device").exists()


def test_a_listed_path_outside_the_bundle_is_refused_before_it_is_read(fleet, bundles, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    b = copy_bundle(bundles["fp32"], tmp_path / "tiny-fp32")
    export_record_path(b).unlink()  # a bundle from before export records: the path check alone must refuse it

    def add(m):
        m["files"]["../secret.txt"] = {"sha256": hashlib.sha256(SECRET).hexdigest(), "bytes": len(SECRET)}
    rewrite_manifest(b, add)
    p = run_deploy(b, "loop0", fleet.config, tmp_path)
    assert_one_line_error(p, "'../secret.txt'", "outside the bundle", "re-export")
    assert "preflight" not in p.stderr and not (tmp_path / "device").exists()


@pytest.mark.parametrize("edit", [
    lambda m: m["reference"].update(atol=1e9),
    lambda m: m["memory"].update(peak_bytes=1),
])
def test_a_manifest_edited_after_export_is_refused(bundles, tmp_path, edit):
    b = copy_bundle(bundles["fp32"], tmp_path / "tiny-fp32")
    rewrite_manifest(b, edit)  # every file still matches its sha256: only the export record can tell
    p = run_deploy(b, "nowhere.invalid", tmp_path / "no-ssh-config", tmp_path)
    assert_one_line_error(p, "manifest.json was changed after export", "tiny-fp32.id.json", "re-export the bundle")
    assert "preflight" not in p.stderr


def test_export_writes_the_record_beside_the_bundle_and_in_its_tarball(bundles, tmp_path):
    src = bundles["fp32"]
    out = write_bundle(tmp_path / "b", {"model.onnx": src / "model.onnx"}, {"name": "b"}, tarball=True)
    rec = read_export_record(out)
    assert rec == bundle_id(out)
    assert json.loads(export_record_path(out).read_text())["bundle_id"] == bundle_id(out)
    with tarfile.open(out.with_name("b.tar.gz")) as tar:
        assert sorted(tar.getnames()) == ["b", "b.id.json", "b/manifest.json", "b/model.onnx"]
    export_record_path(out).write_text("{not json")
    with pytest.raises(UserError, match=r"b.id.json is not an export record.*re-export"):
        read_export_record(out)
