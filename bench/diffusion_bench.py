"""The diffusion benchmark (issues 7 and 13): a DDPM teacher vs its student alone vs student+RED, and the RED
student with the paper's site placement.

One command, resumable (every finished step is skipped on a re-run), meant for the background:

    nohup python -m bench.diffusion_bench --remarks bench/results/diffusion_remarks.md > runs/ddpm-bench-work/log.txt 2>&1 &

Part ``base`` trains the ``ddpm_bench`` pair (teacher, then student+RED with the five output-side RED sites,
``red.sites=outputs``, against the frozen teacher, then the student alone; the same steps, schedule and seed
for all three), samples each with DDIM (and a small DDPM grid), scores the samples with the
classifier-feature Frechet distance (CFD) and k-NN precision/recall on the project's own classifier,
exports each to an FP32 bundle for the TX2 target (verified against PyTorch) and measures one denoising
step at batch 1 through the real deploy path on a loopback sshd (ONNX Runtime CPU). Part ``placement``
(``bench.diffusion_placement``) distils two more students with the paper's sites (``red.sites=paper``) at
alpha 1 and 0.1 for the same steps from the base run's teacher (``runs/NAME/teacher``; trained again as
``NAME-teacher`` when it is not on disk), and samples, scores, exports and measures them beside that teacher
in its own session. ``--parts placement`` runs only that part. The runs' configs, metrics and summaries, the
quality and sample records, the step logs and state.json are copied to ``<results>/`` (the placement part's
to ``<results>/placement/``) and the page ``<results>.md`` is written from those copies; ``--pages-only``
rewrites it from them without running anything. ``--stop-after-s S`` ends a session's share cleanly: the step
running then is stopped (a training run resumes from its last finished epoch), the command exits 0 without
writing the page, and the next run goes on.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from bench import diffusion_placement as placement
from bench.distill_report import clean_log
from bench.quality import balanced_seeded_indices
from bench.reproduce import _read_json
from bench.steps import Steps, StopReached, add_stop_option, deadline, run_command, stopped
from redistill.io import atomic_write, atomic_write_json, atomic_write_text
from redistill.memory import fmt_bytes
from redistill.report import add_page_options, machine, machine_line, md_table, remarks_section, timestamp
from train.checkpoint import load_checkpoint
from train.data import DATASETS
from train.losses import METHODS
from train.models import parse_arch

PROG = "python -m bench.diffusion_bench"

#: (label in the tables, run name suffix, stage folder)
NETWORKS = (("teacher", "", "teacher"), ("student+RED", "", "student"), ("student alone", "-student", "student"))
PARTS = ("base", "placement")

TARGETS = {"theory_ratio": 3.5}  # the acceptance: student+RED theoretical peak >= 3.5x below the teacher's

#: row figures read from the checkpoints and bundle manifests (not copied): kept in ``<results>.json``
BUNDLE_KEYS = ("params", "verify_max_abs_diff", "verify_atol", "preflight_passed", "preflight_runtime")


def checkpoints(a) -> Dict[str, Path]:
    return {label: Path(a.runs) / f"{a.name}{suffix}" / stage / "best.pt" for label, suffix, stage in NETWORKS}


def placement_teacher(a, state: Dict[str, dict]) -> Path:
    """The stage folder of the teacher the placement runs distil from: the base run's when it finished, else
    (or once this part has trained one) ``NAME-teacher``'s, trained by this part with the same preset and seed."""
    base = Path(a.runs) / a.name / "teacher"
    if placement.TEACHER_STEP in state or not (base / "summary.json").is_file():
        return Path(a.runs) / f"{a.name}-teacher" / "teacher"
    return base


def placement_checkpoints(a, state: Dict[str, dict]) -> Dict[str, Path]:
    return {placement.TEACHER: placement_teacher(a, state) / "best.pt",
            **{label: Path(a.runs) / f"{a.name}{suffix}" / "student" / "best.pt"
               for label, suffix, _ in placement.PLACEMENT_RUNS}}


def slug(label: str) -> str:
    return label.replace("+", "-").replace(" ", "-")


def real_baseline(a, out: Path) -> Path:
    """``samples.npz`` of real *training* images (class-balanced, seeded): the CFD floor at this sample count."""
    import numpy as np
    import torch

    path = out / "samples.npz"
    if path.exists():
        return path
    train = DATASETS.get("imagefolder")(a.data_root, "train")
    idx = balanced_seeded_indices(train.labels, a.n, seed=1)
    images = torch.stack([train.images[i] for i in idx]).permute(0, 2, 3, 1).contiguous().numpy()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, images=images.astype(np.uint8), labels=train.labels[idx].numpy()))
    return path


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--preset", default="ddpm_bench", help="the pair and recipe (default: ddpm_bench)")
    ap.add_argument("--name", default="ddpm-bench", help="run name; the student alone is NAME-student")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--bundles", default="bundles")
    ap.add_argument("--reports", default="reports/ddpm-bench")
    ap.add_argument("--classifier", default="runs/quick/teacher/best.pt",
                    help="the project's CIFAR-10 classifier whose features define CFD (trained by `make distill`; "
                         "trained here with the quick preset when missing)")
    ap.add_argument("--n", type=int, default=2000, help="DDIM samples per network for CFD and precision/recall")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--ddpm-n", type=int, default=32, help="DDPM (1000-step) samples per network, for a grid")
    ap.add_argument("--real", type=int, default=10000, help="real test images in the CFD reference")
    ap.add_argument("--results", default="bench/results/diffusion")
    ap.add_argument("--data-root", default="data/cifar10")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="which parts to run (default: both): base (teacher, student+RED with red.sites=outputs, student "
                         "alone) and placement (student+RED with red.sites=paper at alpha 1 and 0.1, from base's teacher)")
    add_stop_option(ap)
    add_page_options(ap, "the run files in <results>/ and <results>_deploy.json (checkpoint and manifest figures from "
                         "<results>.json)")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    command = run_command(PROG, argv)
    old = json.loads(Path(a.results + ".json").read_text()) if Path(a.results + ".json").is_file() else {}
    if a.pages_only:
        old = _read_json(Path(a.results + ".json"), "the benchmark's record")
        write_results(a, command, old_facts(old), page_command=" ".join([PROG, *map(shlex.quote, argv)]), old=old)
        return 0
    try:
        run_benchmark(a, deadline(a))
    except StopReached as e:
        return stopped("ddpm-bench", e)
    copy_run_files(a, Path(a.results))
    write_results(a, command, {**old_facts(old), **bundle_facts(a)}, old=old, ran=a.parts)
    return 0


def old_facts(old: dict) -> Dict[str, dict]:
    """The checkpoint and manifest figures of every network in a stored record, by label."""
    rows = old.get("rows", []) + (old.get("placement") or {}).get("rows", [])
    return {r["network"]: {k: r.get(k) for k in BUNDLE_KEYS} for r in rows}


def run_benchmark(a, until: Optional[float] = None) -> None:
    """Every step of the parts asked for (finished ones are skipped); ``until``: the ``--stop-after-s`` deadline."""
    cli = [sys.executable, "-m", "redistill.cli"]
    if "base" in a.parts:
        run_base(a, cli, until)
    if "placement" in a.parts:
        run_placement(a, cli, until)


def _classifier(a, steps: Steps, cli: List[str], work: Path) -> None:
    """Train the CFD classifier when it is not on disk, or when this benchmark's training of it was cut short
    (its best.pt is written at every better epoch, so its presence alone does not say it finished)."""
    name = "train the CIFAR-10 classifier for CFD"
    if not Path(a.classifier).is_file() or (name in steps.state and not steps.done(name)):
        steps.run(name, cli + ["distill", "quick", "method=teacher", f"out_dir={a.runs}", f"data.root={a.data_root}",
                               "--resume"], work / "logs" / "classifier.log")


def ship(a, steps: Steps, cli: List[str], work: Path, cks: Dict[str, Path], deploy: List[str],
         ddpm=lambda label: True) -> List[str]:
    """Sample, score, export and measure the networks ``cks`` ({label: checkpoint}) into ``work``; returns the
    bundles. ``deploy``: the loopback bench's ``--reports`` and ``--out``."""
    top = Path(a.runs) / f"{a.name}-work"
    for label, ck in cks.items():
        s = slug(label)
        steps.run(f"sample {label} (DDIM {a.steps})", cli + ["sample", str(ck), "--sampler", "ddim", "--steps", str(a.steps),
                                                             "--n", str(a.n), "--seed", "0",
                                                             "--out", str(work / "samples" / f"{s}-ddim")],
                  work / "logs" / f"sample-{s}.log")
        if a.ddpm_n and ddpm(label):
            steps.run(f"sample {label} (DDPM)", cli + ["sample", str(ck), "--sampler", "ddpm", "--n", str(a.ddpm_n), "--seed", "0",
                                                       "--out", str(work / "samples" / f"{s}-ddpm")],
                      work / "logs" / f"sample-{s}-ddpm.log")
    baseline = real_baseline(a, top / "samples" / f"real-train-n{a.n}")
    for label, npz in [(label, work / "samples" / f"{slug(label)}-ddim" / "samples.npz") for label in cks] + [("real", baseline)]:
        steps.run(f"quality {label}", cli + ["quality", str(npz), "--classifier", a.classifier, "--real", str(a.real),
                                             "--data-root", a.data_root, "--cache", str(top / "quality-cache"),
                                             "--json", str(work / "quality" / f"{slug(label)}.json")],
                  work / "logs" / f"quality-{slug(label)}.log")
    bundles = []
    for label, ck in cks.items():
        out = Path(a.bundles) / f"{a.name}-{slug(label)}-fp32"
        bundles.append(str(out))
        steps.run(f"export {label}", cli + ["export", str(ck), "--target", "tx2", "--out", str(out), "--data-root", a.data_root],
                  work / "logs" / f"export-{slug(label)}.log")
    steps.run("deploy (loopback)", [sys.executable, "-m", "bench.loopback_bench", *bundles, "--reports", deploy[0],
                                    "--out", deploy[1]], work / "logs" / "deploy.log")
    return bundles


def run_base(a, cli: List[str], until: Optional[float] = None) -> None:
    """Part ``base``: teacher, student+RED (the outputs placement) and student alone, ending with ``redistill compare``."""
    work = Path(a.runs) / f"{a.name}-work"
    steps = Steps(work / "state.json", until, tag="ddpm-bench")
    common = [f"out_dir={a.runs}", f"data.root={a.data_root}", "--resume"]
    steps.run("train teacher and student+RED", cli + ["distill", a.preset, f"name={a.name}", "red.sites=outputs", *common],
              work / "logs" / "red.log")
    steps.run("train student alone", cli + ["distill", a.preset, "method=student", f"name={a.name}-student", *common],
              work / "logs" / "student.log")
    _classifier(a, steps, cli, work)
    bundles = ship(a, steps, cli, work, checkpoints(a), [a.reports, a.results + "_deploy"])
    steps.state.pop("compare", None)  # always refresh the tables
    quality = [str(work / "quality" / f"{slug(label)}.json") for label in checkpoints(a)]
    steps.run("compare", cli + ["compare", str(Path(a.runs) / a.name), str(Path(a.runs) / f"{a.name}-student"), *bundles,
                                a.reports, "--quality", *quality,
                                "--out", str(Path(a.results) / "compare")], work / "logs" / "compare.log")
    total = sum(v["seconds"] for v in steps.state.values() if v.get("done"))
    print(f"[ddpm-bench] base: all steps done; {total / 60:.1f} min of step time (state: {steps.path})", flush=True)


def run_placement(a, cli: List[str], until: Optional[float] = None) -> None:
    """Part ``placement``: the paper's RED sites at each alpha of ``PLACEMENT_RUNS``, from the base run's teacher."""
    work = Path(a.runs) / f"{a.name}-work" / "placement"
    steps = Steps(work / "state.json", until, tag="ddpm-bench")
    common = [f"out_dir={a.runs}", f"data.root={a.data_root}", "--resume"]
    teacher = placement_teacher(a, steps.state)
    if teacher.parent.name != a.name:
        steps.run(placement.TEACHER_STEP, cli + ["distill", a.preset, "method=teacher", f"name={teacher.parent.name}",
                                                 *common],
                  work / "logs" / "teacher.log")
    for label, suffix, alpha in placement.PLACEMENT_RUNS:
        steps.run(f"train {label}", cli + ["distill", a.preset, f"name={a.name}{suffix}", "red.sites=paper",
                                           f"red.alpha={alpha}", f"teacher.checkpoint={teacher / 'best.pt'}", *common],
                  work / "logs" / f"train-{slug(label)}.log")
    _classifier(a, steps, cli, work)
    ship(a, steps, cli, work, placement_checkpoints(a, steps.state),
         [a.reports + "-placement", str(Path(a.results) / "placement" / "deploy")],
         ddpm=lambda label: label != placement.TEACHER)
    total = sum(v["seconds"] for v in steps.state.values() if v.get("done"))
    print(f"[ddpm-bench] placement: all steps done; {total / 60:.1f} min of step time (state: {steps.path})", flush=True)


def bundle_facts(a) -> Dict[str, dict]:
    """Per network of the parts run, what only the checkpoint and the bundle manifest hold: parameters,
    verification, pre-flight."""
    out, cks = {}, {}
    if "base" in a.parts:
        cks.update(checkpoints(a))
    if "placement" in a.parts:
        state = _read_json(Path(a.runs) / f"{a.name}-work" / "placement" / "state.json", "the placement part's steps")
        cks.update(placement_checkpoints(a, state))
    for label, ck_path in cks.items():
        ck = load_checkpoint(ck_path)
        manifest = json.loads((Path(a.bundles) / f"{a.name}-{slug(label)}-fp32" / "manifest.json").read_text())
        verify = (manifest.get("verification") or {}).get("fp32") or {}
        pre = (manifest.get("preflight") or {}).get("fp32") or {}
        out[label] = {"params": sum(v.numel() for k, v in ck["model"].items() if v.is_floating_point() and "running_" not in k),
                      "verify_max_abs_diff": verify.get("max_abs_diff"), "verify_atol": verify.get("atol"),
                      "preflight_passed": pre.get("passed"), "preflight_runtime": pre.get("runtime")}
    return out


def _jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def level_sizes(arch: str, image_size: int) -> str:
    """The feature-map sizes of a U-Net's levels, e.g. 32/16/8/4 px for unet-1-222 at 32 px."""
    name = parse_arch(arch)
    sizes = [image_size // name.stem]
    for s in name.strides:
        sizes.append(sizes[-1] // s)
    return "/".join(map(str, sizes)) + " px"


def collect_rows(a, facts: Dict[str, dict]) -> List[dict]:
    """One row per base network from the copied run files, the deploy record and the checkpoint/manifest ``facts``."""
    res = Path(a.results)
    deps = _deploys(Path(a.results + "_deploy.json"))
    return [_row(a, label, res / "runs" / f"{a.name}{suffix}", stage, res / "quality", deps, facts)
            for label, suffix, stage in NETWORKS]


def placement_rows(a, facts: Dict[str, dict]) -> List[dict]:
    """The placement part's rows: its teacher (stage files copied to ``placement/teacher``) and its students."""
    res = Path(a.results) / "placement"
    deps = _deploys(res / "deploy.json")
    return [_row(a, placement.TEACHER, res, "teacher", res / "quality", deps, facts)] + [
        _row(a, label, Path(a.results) / "runs" / f"{a.name}{suffix}", "student", res / "quality", deps, facts)
        for label, suffix, _ in placement.PLACEMENT_RUNS]


def _deploys(path: Path) -> Dict[str, dict]:
    dep = _read_json(path, "the loopback deploy record")
    return {r["bundle"].rstrip("/").split("/")[-1]: r for r in dep["results"]}


def _row(a, label: str, run: Path, stage: str, quality: Path, deps: Dict[str, dict], facts: Dict[str, dict]) -> dict:
    """One network's row from its run folder's ``stage`` files, its quality record and its bundle's deploy result."""
    summ = _read_json(run / stage / "summary.json", f"{label}'s summary")
    hist = _jsonl(run / stage / "metrics.jsonl")
    q = _read_json(quality / f"{slug(label)}.json", f"{label}'s quality record")
    d = deps.get(f"{a.name}-{slug(label)}-fp32") or {}
    uses_red = stage == "student" and METHODS.get(summ["method"]).needs_sites
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if uses_red else {}
    return {
        "network": label, "arch": summ["arch"], "method": summ["method"], "params": facts[label]["params"],
        "red_blocks": len(cfg["red"]["sites"]) if uses_red else 0, "steps": hist[-1]["steps"] if hist else None,
        "train_s": round(sum(h["train_time_s"] for h in hist), 1),
        "train_diffusion_loss": hist[-1].get("train_diffusion") if hist else None,
        "train_red_loss": hist[-1].get("train_red") if hist else None,
        "first_epoch_losses": {k: hist[0].get(k) for k in ("train_diffusion", "train_red")} if hist else None,
        "test_diffusion_loss": summ["best"]["test_diffusion_loss"], "best_epoch": summ["best"]["epoch"],
        "test_images": summ["best"]["test_images"],
        "cfd": q["cfd"], "precision": q["precision"], "recall": q["recall"], "fid": q.get("fid"),
        "theory_peak_bytes": d.get("theoretical_peak_bytes"),
        "measured_activation_bytes": d.get("measured_activation_bytes"),
        "p50_ms": (d.get("latency_ms") or {}).get("p50_ms"),
        **{k: facts[label].get(k) for k in BUNDLE_KEYS if k != "params"},
    }


def write_results(a, command: str, facts: Dict[str, dict], page_command: Optional[str] = None, old: Optional[dict] = None,
                  ran: Sequence[str] = ()) -> None:
    """``<results>.md/.json`` from the run files in ``<results>/``, the deploy records and ``facts``; the placement
    section once ``<results>/placement/`` holds that part's files. ``ran``: the parts this command ran (their
    command, machine and time are this one's; the others' come from ``old``)."""
    res = Path(a.results)
    rows = collect_rows(a, facts)
    state = _read_json(res / "state.json", "the benchmark's step record")
    real_q = _read_json(res / "quality" / "real.json", "the real-image floor")
    cfg = yaml.safe_load((res / "runs" / a.name / "config.yaml").read_text())
    samples = {p.parent.name: json.loads(p.read_text()) for p in sorted((res / "samples").glob("*/sample.json"))}
    dep = json.loads(Path(a.results + "_deploy.json").read_text())
    by = {r["network"]: r for r in rows}
    t, red, alone = by["teacher"], by["student+RED"], by["student alone"]

    def ratio(x, y):
        return (x / y) if x and y else None

    derived = {
        "theory_ratio_red": ratio(t["theory_peak_bytes"], red["theory_peak_bytes"]),
        "theory_ratio_alone": ratio(t["theory_peak_bytes"], alone["theory_peak_bytes"]),
        "measured_ratio_red": ratio(t["measured_activation_bytes"], red["measured_activation_bytes"]),
        "measured_ratio_alone": ratio(t["measured_activation_bytes"], alone["measured_activation_bytes"]),
        "latency_ratio_red": ratio(t["p50_ms"], red["p50_ms"]),
        "cfd_real_floor": real_q["cfd"],
    }
    old, fresh = old or {}, "base" in ran
    created = timestamp() if fresh else old.get("created")
    record = {"command": command if page_command or fresh else old.get("command", command),
              "machine": machine() if fresh else old.get("machine"),
              **({"created": created} if created else {}), "rows": rows, "real_floor": real_q, "facts": derived,
              "targets": TARGETS, "steps": state}
    lines, p_samples = render(record, cfg, samples, dep, res, page_command), {}
    if (res / "placement" / "state.json").is_file():
        record["placement"], p_samples, extra = placement_record(a, facts, old.get("placement") or {}, "placement" in ran,
                                                                 command)
        lines += placement.section(by, cfg, real_q, (samples.get(f"{slug('teacher')}-ddim") or {}).get("checkpoint_sha256"),
                                   {**record["placement"], **extra}, res.name)
    md = "\n".join(lines + remarks_section(a.remarks)) + "\n"
    md += samples_section(res, rows, samples, record.get("placement", {}).get("rows", []), p_samples)
    atomic_write_text(a.results + ".md", md)
    atomic_write_json(a.results + ".json", record)
    print(f"[ddpm-bench] wrote {a.results}.md", flush=True)


def placement_record(a, facts: Dict[str, dict], old: dict, fresh: bool, command: str):
    """The placement part's record (its rows, real-image floor, steps, teacher), its sample settings, and what the page
    section reads beside them (the runs' configs, the sample count, the deploy note)."""
    res = Path(a.results) / "placement"
    samples = {p.parent.name: json.loads(p.read_text()) for p in sorted((res / "samples").glob("*/sample.json"))}
    teacher = samples.get(f"{slug(placement.TEACHER)}-ddim") or {}
    created = timestamp() if fresh else old.get("created")
    record = {"command": command if fresh else old.get("command"), "machine": machine() if fresh else old.get("machine"),
              **({"created": created} if created else {}), "rows": placement_rows(a, facts),
              "real_floor": _read_json(res / "quality" / "real.json", "the placement part's real-image floor"),
              "steps": _read_json(res / "state.json", "the placement part's step record"),
              "teacher": {"checkpoint": teacher.get("checkpoint"), "sha256": teacher.get("checkpoint_sha256")}}
    extra = {"configs": {label: yaml.safe_load((Path(a.results) / "runs" / f"{a.name}{suffix}" / "config.yaml").read_text())
                         for label, suffix, _ in placement.PLACEMENT_RUNS},
             "samples_n": teacher.get("n"), "deploy_note": _read_json(res / "deploy.json", "deploy record").get("note")}
    return record, samples, extra


def render(r: dict, cfg: dict, samples: Dict[str, dict], dep: dict, res: Path, page_command: Optional[str]) -> List[str]:
    """The page down to the remarks: every figure from the record ``r`` and the copied run files."""
    rows, real_q, facts, state = r["rows"], r["real_floor"], r["facts"], r["steps"]
    by = {row["network"]: row for row in rows}
    t, red, alone = by["teacher"], by["student+RED"], by["student alone"]
    data, optim, dif, red_cfg, unet = cfg["data"], cfg["optim"], cfg["diffusion"], cfg["red"], cfg["unet"]
    size = data["image_size"]
    train_s = sum(row["train_s"] for row in rows)
    other_s = sum(v["seconds"] for k, v in state.items() if v.get("done") and not k.startswith("train"))
    subset = f"a {data['train_subset']:,}-image subset of the" if data["train_subset"] else "all the"
    ddim = samples.get(f"{slug('teacher')}-ddim") or {}
    ddpm = samples.get(f"{slug('teacher')}-ddpm")
    exports = [v["argv"] for k, v in state.items() if k.startswith("export ")]
    target = exports[0][exports[0].index("--target") + 1] if exports and "--target" in exports[0] else "?"
    preset = _preset(state)
    fid = any(row.get("fid") is not None for row in rows)
    L = [f"# Diffusion benchmark: DDPM U-Net teacher vs student alone vs student+RED (`{data['root']}`, {size} px)", "",
         f"Command: `{r['command']}` (resumable; run in the background)"
         + (f"; this page rewritten from the run files by `{page_command}`" if page_command else ""), "",
         f"Machine: {machine_line(r['machine'])}", "",
         f"Wall time: **{(train_s + other_s) / 60:.1f} min**: training {train_s / 60:.1f} min (the sum of every epoch's "
         "time in the runs' `metrics.jsonl`: " + ", ".join(f"{row['network']} {row['train_s'] / 60:.1f}" for row in rows)
         + f"), the other steps {other_s / 60:.1f} min (`{res.name}/state.json`).", "",
         "## Setup", "",
         f"- Pair: the `{preset}` preset. Teacher `{t['arch']}` (levels at {level_sizes(t['arch'], size)}), student "
         f"`{red['arch']}` (levels at {level_sizes(red['arch'], size)}). U-Net width {unet['ch']}, channel multipliers "
         f"{unet['ch_mult']}, attention at level(s) {unet['attn']}, {unet['num_res_blocks']} residual blocks per level, "
         f"dropout {unet['dropout']:g}; T={dif['timesteps']}, {dif['schedule']} betas {dif['beta_start']:g}..{dif['beta_end']:g}, "
         "epsilon prediction.",
         f"- Training: every network for the same {t['steps']} steps ({cfg['epochs']} epoch(s) over {subset} training "
         f"images, {data['val_fraction']:.0%} of them held out, batch {data['batch_size']}), {optim['name']} lr "
         f"{optim['lr']} with {optim['schedule']} decay, gradient clipping {optim['grad_clip']}, EMA {dif['ema_decay']} "
         "(evaluated, sampled and exported). "
         f"Student+RED: `{cfg['loss']['w_ce']} * diffusion loss + {cfg['loss']['w_dist']} * RED loss`, "
         f"{red['red_blocks']} RED blocks (student -> teacher: "
         + ", ".join(f"{s['student']} {s['where']} -> {s['teacher']}" for s in red_cfg["sites"])
         + f"), alpha {red_cfg['alpha']}, {red_cfg['distance']} distance. The best epoch is picked by the denoising "
         f"loss on the held-out images at fixed noise; the test loss is on {t['test_images']:,} test images at fixed noise.",
         f"- Samples: {ddim.get('n')} per network with DDIM ({ddim.get('steps')} steps, eta {ddim.get('eta') or 0:g}, seed "
         f"{ddim.get('seed')})" + (f", plus {ddpm['n']} with the {ddpm['steps']}-step DDPM sampler for a grid." if ddpm else "."),
         f"- Quality: **{real_q['cfd_name']}** (CFD) and k-NN precision/recall (k={real_q['k']}) on the same features, "
         f"against {real_q['n_real']} real images (`{real_q['real_source']}`, seed {real_q['real_seed']}); the floor row "
         f"scores {real_q['n_generated']} real training images the same way. "
         + ("FID with the Inception weights given." if fid else "**No FID**: no `--inception-weights` were given."),
         f"- Memory and latency: each network's EMA weights exported to an FP32 bundle for the `{target}` target "
         "(pre-flight of its runtime, ONNX verified against PyTorch), then one denoising step at batch 1 measured "
         "through the loopback deploy bench (ssh to an sshd on this machine, the on-device agent)"
         + (f"; deploy record: {dep['note']}." if dep.get("note") else "."), "",
         "## Results", ""]
    L += md_table(["network", "params", "RED blocks", "test denoising loss", "CFD (lower is better)", "precision", "recall"]
                  + (["FID"] if fid else []) + ["theoretical peak (one step)", "measured activation", "latency p50"],
                  [[f"{row['network']} (`{row['arch']}`)", f"{row['params'] / 1e6:.2f} M", row["red_blocks"],
                    f"{row['test_diffusion_loss']:.5f}", f"{row['cfd']:.2f}", f"{row['precision']:.3f}", f"{row['recall']:.3f}"]
                   + ([f"{row['fid']:.2f}" if row.get("fid") is not None else "-"] if fid else [])
                   + [fmt_bytes(row["theory_peak_bytes"]), fmt_bytes(row["measured_activation_bytes"]),
                      f"{row['p50_ms'] or 0:.2f} ms"] for row in rows]
                  + [["real training images (floor)", "-", "-", "-", f"{real_q['cfd']:.2f}", f"{real_q['precision']:.3f}",
                      f"{real_q['recall']:.3f}"] + (["-"] if fid else []) + ["-", "-", "-"]])
    L += ["", f"- *test denoising loss*: mean epsilon MSE of the EMA weights on {t['test_images']:,} test images, time "
          "steps and noise fixed by a seed (the same inputs for every network).",
          "- *CFD*: the Frechet distance of the penultimate features of the classifier named above; its scale is that "
          "classifier's, so compare rows with each other and with the floor, not with published FIDs.",
          "- *theoretical peak*: the liveness peak of the exported graph (`redistill memory`, FP32, batch 1, one step, "
          "inputs x and t), weights excluded.",
          "- *measured activation*: the agent's memory run in a fresh process (resident memory during inference minus "
          "after loading); an upper bound at page granularity.", "",
          "## Targets", ""]
    L += md_table(["target", "result", "verdict"],
                  [[f"student+RED theoretical peak >= {TARGETS['theory_ratio']}x below the teacher's (one step, {size} px, "
                    "FP32, batch 1)", f"{facts['theory_ratio_red']:.2f}x",
                    "met" if facts["theory_ratio_red"] >= TARGETS["theory_ratio"] else "**missed**"]])
    L += ["", "## Reading (generated from the figures above)", "",
          f"- Memory: the student+RED's theoretical peak is {facts['theory_ratio_red']:.2f}x below the teacher's "
          f"(student alone {facts['theory_ratio_alone']:.2f}x). Measured on ONNX Runtime CPU the ratio is "
          f"{facts['measured_ratio_red'] or 0:.2f}x (student alone {facts['measured_ratio_alone'] or 0:.2f}x)."]
    best = min(rows, key=lambda row: row["cfd"])
    L.append(f"- Quality: CFD teacher {t['cfd']:.2f}, student+RED {red['cfd']:.2f}, student alone {alone['cfd']:.2f} "
             f"(real-image floor {real_q['cfd']:.2f}); the lowest is the {best['network']}. "
             + ("RED lowered the student's CFD" if red["cfd"] < alone["cfd"] else "RED did not lower the student's CFD")
             + f" and its test denoising loss is {red['test_diffusion_loss']:.5f} vs {alone['test_diffusion_loss']:.5f} "
             f"alone (teacher {t['test_diffusion_loss']:.5f}).")
    if red["first_epoch_losses"] and red["first_epoch_losses"].get("train_red") is not None:
        f0 = red["first_epoch_losses"]
        L.append(f"- The RED term: in the first epoch the student+RED's mean RED loss was {f0['train_red']:.4f} against a "
                 f"diffusion loss of {f0['train_diffusion']:.4f} (student alone: "
                 f"{(alone['first_epoch_losses'] or {}).get('train_diffusion') or 0:.4f}); by the last epoch "
                 f"{red['train_red_loss']:.4f} against {red['train_diffusion_loss']:.4f} ({alone['train_diffusion_loss']:.4f} "
                 f"alone), with alpha {red_cfg['alpha']}.")
    diffs = [row["verify_max_abs_diff"] for row in rows if row.get("verify_max_abs_diff") is not None]
    passed = all(row.get("preflight_passed") for row in rows)
    runtimes = sorted({row["preflight_runtime"] for row in rows if row.get("preflight_runtime")})
    atols = sorted({row["verify_atol"] for row in rows if row.get("verify_atol") is not None})
    L.append(f"- Export: {'every' if passed else '**not every**'} bundle passed the `{target}` pre-flight"
             + (f" ({', '.join(runtimes)})" if runtimes else "") + ", and ONNX Runtime matched PyTorch's epsilon within "
             f"max |diff| {max(diffs) if diffs else float('nan'):.1e}"
             + (f" (tolerance {', '.join(f'{x:g}' for x in atols)})" if atols else "") + " on noisy test images.")
    L.append(f"- Latency of one step on this CPU: teacher {t['p50_ms'] or 0:.2f} ms, student+RED {red['p50_ms'] or 0:.2f} ms "
             f"({facts['latency_ratio_red'] or 0:.2f}x faster), student alone {alone['p50_ms'] or 0:.2f} ms.")
    return L


def _preset(state: Dict[str, dict]) -> str:
    argv = next((v["argv"] for k, v in state.items() if k.startswith("train")), [])
    return argv[argv.index("distill") + 1] if "distill" in argv else "?"


def samples_section(res: Path, rows: List[dict], samples: Dict[str, dict], p_rows: Sequence[dict] = (),
                    p_samples: Optional[Dict[str, dict]] = None) -> str:
    """The grids: a list of the files and each network's DDIM grid inline (the placement part's after the base's)."""
    groups = [(res.name, rows, samples)] + ([(f"{res.name}/placement", p_rows, p_samples or {})] if p_rows else [])
    L = ["", "## Samples", ""]
    for folder, rs, smp in groups:
        for label in [r["network"] for r in rs]:
            s, ddim, ddpm = slug(label), smp.get(f"{slug(label)}-ddim") or {}, smp.get(f"{slug(label)}-ddpm") or {}
            L.append(f"- {label}: DDIM {ddim.get('steps')} steps `{folder}/{s}-ddim.png` (the first "
                     f"{ddim.get('grid_images') or min(64, ddim.get('n') or 0)} of {ddim.get('n')})"
                     + (f", DDPM {ddpm.get('steps')} steps `{folder}/{s}-ddpm.png` ({ddpm.get('n')})"
                        if ddpm and (res.parent / folder / f"{s}-ddpm.png").exists() else ""))
    for folder, rs, smp in groups:
        for label in [r["network"] for r in rs]:
            L.append(f"\n**{label}** (DDIM, seed {(smp.get(f'{slug(label)}-ddim') or {}).get('seed')})\n\n"
                     f"![{label}]({folder}/{slug(label)}-ddim.png)")
    L += ["", f"Files: `{res.name}/` (grids, quality JSON, sample settings, each run's config, metrics and summaries, step "
          f"logs, state.json), `{res.name}/compare/` (`redistill compare` over the three runs, bundles and device reports) "
          f"and `{res.name}_deploy.md/.json` (device measurements)"
          + (f"; the placement part's in `{res.name}/placement/` (its own state.json, quality, samples, logs, its "
             "teacher's stage files, `deploy.md/.json`), its runs in `" + res.name + "/runs/`" if p_rows else "")
          + "; every figure above is read from those."]
    return "\n".join(L) + "\n"


def _copy_work(work: Path, dest: Path) -> None:
    """A work folder's state, quality JSON, sample settings, cleaned step logs and grids into ``dest``."""
    for f in [work / "state.json", *sorted((work / "quality").glob("*.json")), *sorted((work / "samples").glob("*/sample.json")),
              *sorted((work / "logs").glob("*.log"))]:
        if not f.is_file():
            continue
        target = dest / f.relative_to(work)
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".log":
            atomic_write_text(target, clean_log(f.read_text(errors="replace")))
        else:
            shutil.copyfile(f, target)
    for grid in sorted((work / "samples").glob("*/grid.png")):
        shutil.copyfile(grid, dest / f"{grid.parent.name}.png")


def copy_run_files(a, dest: Path) -> None:
    """Copy the parts' run configs, metrics, summaries, quality JSON, sample settings and grids, step logs and state
    (no checkpoints); the placement part's into ``dest/placement`` with its teacher's stage files."""
    work = Path(a.runs) / f"{a.name}-work"
    runs = {"base": [a.name, f"{a.name}-student"],
            "placement": [f"{a.name}{suffix}" for _, suffix, _ in placement.PLACEMENT_RUNS] + [f"{a.name}-teacher"]}
    for part in a.parts:
        for run in [Path(a.runs) / name for name in runs[part]]:
            for f in list(run.glob("*.json")) + list(run.glob("*.yaml")) + list(run.glob("*/*.json*")):
                target = dest / "runs" / run.name / f.relative_to(run)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
    if "base" in a.parts:
        _copy_work(work, dest)
    if "placement" in a.parts:
        _copy_work(work / "placement", dest / "placement")
        teacher = placement_teacher(a, _read_json(work / "placement" / "state.json", "the placement part's steps"))
        (dest / "placement" / "teacher").mkdir(parents=True, exist_ok=True)
        for name in ("summary.json", "metrics.jsonl"):
            shutil.copyfile(teacher / name, dest / "placement" / "teacher" / name)


if __name__ == "__main__":
    raise SystemExit(main())
