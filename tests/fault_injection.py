"""Bad input on purpose: run every case of the project's bad-input list through the real commands and record
what a user sees: the exit code and the message. Every case must end with a one-line error or a success,
never a traceback; the table it writes is the project's committed bad-input table.

    python -m tests.fault_injection [--out bench/results/bad_input]

It trains a tiny real run on generated images, exports it, starts a throwaway sshd on 127.0.0.1 (OpenSSH and
rsync must be installed, as for the deploy tests) and runs each case as a subprocess in a scratch folder.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from deploy.loopback import LoopbackSshd
from redistill.io import atomic_write_json, atomic_write_text
from redistill.report import add_page_options, machine, machine_line, md_table, timestamp
from tests.conftest import cli_env, make_imagefolder

REPO = Path(__file__).resolve().parent.parent
REDISTILL = [sys.executable, "-m", "redistill.cli"]


@dataclass
class Case:
    """One bad (or borderline) input: the command, what must hold afterwards, and what kind of end is expected."""

    name: str
    what: str  # the input, in words
    argv: Callable[["Workspace"], List[str]]
    expect: str = "error"  # error: exit 2 with one line; ok: exit 0
    #: environment over the default (JETSON_PYTHON = this interpreter, which has onnxruntime)
    env: Callable[["Workspace"], Dict[str, str]] = field(default=lambda ws: {})
    setup: Optional[Callable[["Workspace"], None]] = None
    check: Optional[Callable[["Workspace", str], Optional[str]]] = None  # a problem in words, or None


class Workspace:
    """The scratch folder every case runs in: tiny data, a trained run, a bundle, a loopback device."""

    def __init__(self, root: Path, sshd: LoopbackSshd):
        self.root, self.sshd = root, sshd
        self.data = root / "data"
        self.runs = root / "runs"
        self.bundles = root / "bundles"
        self.ck = self.runs / "tiny" / "student" / "best.pt"
        self.bundle = self.bundles / "tiny-fp32"
        self.device = root / "device"

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def distill(self, *extra: str) -> List[str]:
        return [*REDISTILL, "distill", "quick", f"data.root={self.data}", f"out_dir={self.runs}", "epochs=1",
                "data.batch_size=16", *extra]

    def deploy(self, bundle: Path, *extra: str) -> List[str]:
        return [*REDISTILL, "deploy", str(bundle), "--host", self.sshd.aliases[0], "--ssh-config", str(self.sshd.config),
                "--remote-dir", str(self.device), "--reports", str(self.path("reports")), "--iters", "5",
                "--warmup", "1", "--mem-iters", "2", *extra]

    def copy_bundle(self, name: str) -> Path:
        dst = self.bundles / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(self.bundle, dst, symlinks=True)
        sidecars = [p for p in self.bundles.glob(self.bundle.name + ".*") if p.is_file()]
        for p in sidecars:  # export's records beside the bundle, if any, follow the copy
            shutil.copyfile(p, self.bundles / (name + p.name[len(self.bundle.name):]))
        return dst


def _run(argv: Sequence[str], env: Dict[str, str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, env={**cli_env(), **env}, capture_output=True, text=True, timeout=timeout)


def prepare(ws: Workspace) -> None:
    """Tiny images, one real RED run of the quick preset on them, its FP32 bundle."""
    make_imagefolder(ws.data, n_train=16, n_test=8)
    for argv in (ws.distill("name=tiny"),
                 [*REDISTILL, "export", str(ws.ck), "--target", "cpu", "--out", str(ws.bundle), "--verify-images", "8",
                  "--reference-images", "4"]):
        p = _run(argv, {}, ws.root)
        if p.returncode != 0:
            raise SystemExit(f"fault_injection: setting up failed: {shlex.join(argv)}\n{p.stdout}\n{p.stderr}")


# --- the cases ----------------------------------------------------------------------------------------------


def _keep_folder(ws: Workspace) -> None:
    ws.path("keep").mkdir(exist_ok=True)
    ws.path("keep", "notes.txt").write_text("keep\n")


def _kept(ws: Workspace, _out: str) -> Optional[str]:
    return None if ws.path("keep", "notes.txt").is_file() else "notes.txt was deleted"


def _run_folder_kept(ws: Workspace, _out: str) -> Optional[str]:
    return None if ws.ck.is_file() else "the run's best.pt was deleted"


def _bundles_kept(ws: Workspace, _out: str) -> Optional[str]:
    return None if (ws.bundle / "manifest.json").is_file() else "the bundles folder was replaced"


def _garbage(ws: Workspace) -> None:
    ws.path("garbage.pt").write_text("hello\n")


def _no_numpy_python(ws: Workspace) -> None:
    if not ws.path("nonumpy", "bin", "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(ws.path("nonumpy"))], check=True)


def _symlinked_bundle(ws: Workspace) -> None:
    b = ws.copy_bundle("tiny-symlink")
    (b / "model.onnx").unlink()
    (b / "model.onnx").symlink_to(ws.bundle / "model.onnx")


def _escaping_bundle(ws: Workspace) -> None:
    b = ws.copy_bundle("tiny-escape")
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    (b / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def _edited_manifest(ws: Workspace) -> None:
    b = ws.copy_bundle("tiny-edited")
    m = json.loads((b / "manifest.json").read_text())
    m["reference"]["atol"] = 1e9
    (b / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def _no_agent_left(ws: Workspace, _out: str) -> Optional[str]:
    time.sleep(1)
    p = subprocess.run(["pgrep", "-f", f"agent --bundle {ws.device}"], capture_output=True, text=True)
    return f"agent processes left running: {p.stdout.split()}" if p.stdout.strip() else None


def _bad_site_config(ws: Workspace) -> None:
    ws.path("bad_site.yaml").write_text(
        "name: badsite\nmethod: red\nteacher: {arch: mobilenetv3_small-1-22121111211}\n"
        "student: {arch: mobilenetv3_small-4-22111111111}\n"
        "red:\n  sites:\n    - {student: features.99, where: out, teacher: features.4}\n")


def _no_teacher_trained(ws: Workspace, _out: str) -> Optional[str]:
    return "a teacher was trained first" if (ws.runs / "badsite" / "teacher" / "best.pt").exists() else None


def _truncated_report(ws: Workspace) -> None:
    d = ws.path("reports_bad", "loop0", "tiny")
    d.mkdir(parents=True, exist_ok=True)
    (d / "truncated.json").write_text('{"schema": "redistill-device-report", "bundle": {"id": "ab')
    (d / "schema_only.json").write_text('{"schema": "redistill-device-report", "schema_version": 1}\n')


def _names_the_skipped(ws: Workspace, out: str) -> Optional[str]:
    missing = [n for n in ("truncated.json", "schema_only.json") if n not in out]
    return f"not named as skipped: {missing}" if missing else None


def _two_models(ws: Workspace) -> None:
    for d in ("a", "b"):
        ws.path("models", d).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ws.bundle / "model.onnx", ws.path("models", d, "model.onnx"))


def _distinct_labels(ws: Workspace, out: str) -> Optional[str]:
    return None if ("a/model.onnx" in out and "b/model.onnx" in out) else "the two rows are not told apart"


def _second_run_ok(ws: Workspace, _out: str) -> Optional[str]:
    p = _run(ws.distill("name=neglr", "method=teacher", "data.train_subset=8", "data.test_subset=4"), {}, ws.root)
    return None if p.returncode == 0 else f"the run name stayed blocked: {_last_line(p.stderr)}"


CASES: List[Case] = [
    Case("export-out-not-a-bundle", "`export --out DIR` where DIR holds a user's notes.txt",
         lambda ws: [*REDISTILL, "export", str(ws.ck), "--target", "cpu", "--out", str(ws.path("keep"))],
         setup=_keep_folder, check=_kept),
    Case("export-out-bundles-folder", "`export --out bundles` (the folder of all bundles)",
         lambda ws: [*REDISTILL, "export", str(ws.ck), "--target", "cpu", "--out", str(ws.bundles)], check=_bundles_kept),
    Case("export-out-run-folder", "`export --out runs/NAME/student` (checkpoints there)",
         lambda ws: [*REDISTILL, "export", str(ws.ck), "--target", "cpu", "--out", str(ws.ck.parent)],
         check=_run_folder_kept),
    Case("export-out-unwritable", "`export --out` in a folder nobody can write (/proc)",
         lambda ws: [*REDISTILL, "export", str(ws.ck), "--target", "cpu", "--out", "/proc/redistill-bundle"]),
    Case("export-not-a-checkpoint", "`export garbage.pt` (a text file)",
         lambda ws: [*REDISTILL, "export", str(ws.path("garbage.pt")), "--target", "cpu"], setup=_garbage),
    Case("evaluate-not-a-checkpoint", "`echo hello > best.pt; redistill evaluate best.pt`",
         lambda ws: [*REDISTILL, "evaluate", str(ws.path("garbage.pt"))], setup=_garbage),
    Case("distill-negative-lr", "`optim.lr=-0.1`, then the same run name with a good value",
         lambda ws: ws.distill("name=neglr", "optim.lr=-0.1"), check=_second_run_ok),
    Case("distill-negative-subset", "`data.train_subset=-1`", lambda ws: ws.distill("name=negsub", "data.train_subset=-1")),
    Case("distill-negative-weight-decay", "`optim.weight_decay=-1e-4`",
         lambda ws: ws.distill("name=negwd", "optim.weight_decay=-1e-4")),
    Case("distill-negative-alpha", "`red.alpha=-50`", lambda ws: ws.distill("name=negalpha", "red.alpha=-50")),
    Case("distill-bad-site", "a RED site naming a layer the student lacks (found before the teacher trains)",
         lambda ws: [*REDISTILL, "distill", str(ws.path("bad_site.yaml")), f"data.root={ws.data}",
                     f"out_dir={ws.runs}", "epochs=1"], setup=_bad_site_config, check=_no_teacher_trained),
    Case("distill-resume-changed-red", "`--resume` of a finished run with a changed RED setting (`red.alpha=10`)",
         lambda ws: ws.distill("name=tiny", "red.alpha=10", "--resume")),
    Case("deploy-python-without-numpy", "`JETSON_PYTHON` a stock python3 without numpy",
         lambda ws: ws.deploy(ws.bundle), env=lambda ws: {"JETSON_PYTHON": str(ws.path("nonumpy", "bin", "python"))},
         setup=_no_numpy_python),
    Case("deploy-python2", "`JETSON_PYTHON=python2`", lambda ws: ws.deploy(ws.bundle),
         env=lambda ws: {"JETSON_PYTHON": "python2"}),
    Case("deploy-bin-false", "`JETSON_PYTHON=/bin/false`", lambda ws: ws.deploy(ws.bundle),
         env=lambda ws: {"JETSON_PYTHON": "/bin/false"}),
    Case("deploy-agent-bad-argument", "`deploy --warmup -5`", lambda ws: ws.deploy(ws.bundle, "--warmup", "-5")),
    Case("deploy-run-timeout", "`--run-timeout 3` on a measurement that takes minutes (the agent must be stopped)",
         lambda ws: ws.deploy(ws.bundle, "--run-timeout", "3", "--iters", "100000000"), check=_no_agent_left),
    Case("deploy-symlink-in-bundle", "a bundle file replaced by a symlink", lambda ws: ws.deploy(ws.bundles / "tiny-symlink"),
         setup=_symlinked_bundle),
    Case("deploy-path-outside-bundle", "a manifest listing `../../etc/passwd`",
         lambda ws: ws.deploy(ws.bundles / "tiny-escape"), setup=_escaping_bundle),
    Case("deploy-edited-manifest", "a manifest edited after export (tolerance 1e9)",
         lambda ws: ws.deploy(ws.bundles / "tiny-edited"), setup=_edited_manifest),
    Case("compare-bad-reports", "a truncated report and a schema-only report among the reports", lambda ws: [
        *REDISTILL, "compare", "--runs", str(ws.runs), "--bundles", str(ws.bundles), "--reports",
        str(ws.path("reports_bad")), "--out", str(ws.path("compare")), "--no-analyze"],
         expect="ok", setup=_truncated_report, check=_names_the_skipped),
    Case("memory-two-model-onnx", "`redistill memory a/model.onnx b/model.onnx`",
         lambda ws: [*REDISTILL, "memory", "models/a/model.onnx", "models/b/model.onnx"], expect="ok",
         setup=_two_models, check=_distinct_labels),
]


# --- running and recording ----------------------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _scrub(text: str, ws: Workspace) -> str:
    """Scratch paths as WS (the workspace) and TMP (the rest of the scratch folder), so the table is stable."""
    return text.replace(str(ws.root), "WS").replace(str(ws.root.parent), "TMP")


def run_case(case: Case, ws: Workspace) -> Dict[str, object]:
    if case.setup:
        case.setup(ws)
    argv = case.argv(ws)
    t0 = time.perf_counter()
    p = _run(argv, {"JETSON_PYTHON": sys.executable, **case.env(ws)}, ws.root)
    out = p.stdout + p.stderr
    problems = []
    if "Traceback (most recent call last)" in out:
        problems.append("a traceback")
    if case.expect == "error":
        errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
        if p.returncode != 2:
            problems.append(f"exit {p.returncode}, not 2")
        if len(errors) != 1:
            problems.append(f"{len(errors)} error lines, not one")
    elif p.returncode != 0:
        problems.append(f"exit {p.returncode}, not 0")
    if case.check:
        problem = case.check(ws, out)
        if problem:
            problems.append(problem)
    message = (_last_line(p.stderr) if case.expect == "error" else _last_line(p.stdout)) or _last_line(out)
    if case.expect == "ok" and len(message) > 160:  # a success's last output line can be a long table row
        message = message[:159] + "…"
    return {"case": case.name, "input": case.what, "expect": case.expect, "exit": p.returncode,
            "message": _scrub(message, ws), "seconds": round(time.perf_counter() - t0, 1), "ok": not problems,
            "problems": problems, "command": _scrub(" ".join(shlex.quote(a) for a in argv), ws)}


def render(doc: Dict[str, object]) -> str:
    rows = [[f"`{r['case']}`", r["input"], r["exit"], "yes" if r["ok"] else "NO: " + "; ".join(r["problems"]),
             r["message"].replace("|", "\\|")] for r in doc["results"]]
    bad = [r["case"] for r in doc["results"] if not r["ok"]]
    return "\n".join([
        "# Bad input: what a user sees",
        "",
        f"Written by `{doc['command']}` on {doc['created']}.",
        "",
        f"Machine: {machine_line(doc['machine'])}.",
        "Each case ran the real command as a subprocess in a scratch folder WS (tiny generated images, a real "
        "one-epoch RED run of the `quick` preset on them, its FP32 bundle, a throwaway sshd on 127.0.0.1 as the "
        "device). A case holds when it ends as expected (an error: exit 2 with exactly one error line; ok: exit 0), "
        "prints no traceback, and passes its own check (what it must leave behind).",
        "",
        *md_table(["case", "input", "exit", "holds", "message (last line)"], rows),
        "",
        f"{len(doc['results']) - len(bad)} of {len(doc['results'])} cases hold" + (f"; not: {', '.join(bad)}." if bad else "."),
        "",
    ])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fault_injection", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json (the committed table: bench/results/bad_input)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these cases")
    add_page_options(ap, "OUT.json", remarks=False)
    a = ap.parse_args(argv)
    if a.pages_only:
        if not a.out:
            ap.error("--pages-only needs --out")
        atomic_write_text(Path(a.out).with_suffix(".md"), render(json.loads(Path(a.out).with_suffix(".json").read_text())))
        print(f"wrote {a.out}.md")
        return 0
    cases = [c for c in CASES if a.only is None or c.name in a.only]
    results = []
    with tempfile.TemporaryDirectory(prefix="redistill-faults-") as tmp, LoopbackSshd(Path(tmp) / "sshd") as sshd:
        ws = Workspace(Path(tmp) / "ws", sshd)
        ws.root.mkdir()
        prepare(ws)
        for case in cases:
            r = run_case(case, ws)
            results.append(r)
            print(f"{'ok ' if r['ok'] else 'BAD'} {r['case']}: exit {r['exit']}: {r['message']}"
                  + ("" if r["ok"] else f"  [{'; '.join(r['problems'])}]"), flush=True)
    doc = {"schema": "redistill-bad-input", "created": timestamp(), "machine": machine(),
           "command": "python -m tests.fault_injection" + "".join(f" {shlex.quote(x)}" for x in (argv or sys.argv[1:])),
           "results": results}
    if a.out:
        atomic_write_json(Path(a.out).with_suffix(".json"), doc)
        atomic_write_text(Path(a.out).with_suffix(".md"), render(doc))
        print(f"wrote {a.out}.md and {a.out}.json")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
