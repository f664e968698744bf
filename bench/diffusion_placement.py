"""The RED site placement part of the diffusion benchmark (issue 13): the runs it adds and its page section.

The base part's student+RED has the five output-side sites (``red.sites=outputs``). This part distils the same
student from the same teacher with the paper code's placement (``red.sites=paper``, ``train.unet.paper_sites``:
10 blocks) at alpha 1, the paper code's CIFAR-10 value (pipeline_diffusion/config/reedx2_dist_config.yaml), and
at alpha 0.1, the paper code's other DDPM setting (reedx2_dist_config_alpha0.1.yaml, used by
CIFAR10-DISTILLx2_alpha0.1.txt and by its only Celeb-A RED run, CELEBA-DISTILLx2_alpha0.1.txt). 0.1 rather than
another value because it is the one the paper's authors ran, and because at alpha 1 the base run's RED student
came out worse than the student alone: a ten times weaker RED term tests whether the matching competes with the
denoising loss. The section is rendered from the part's record alone (``bench.diffusion_bench`` reads the files).
"""

from __future__ import annotations

from typing import Dict, List, Optional

from redistill.memory import fmt_bytes
from redistill.report import machine_line, md_table

#: the placement part's RED students: (label, run name suffix, red.alpha), each with red.sites=paper
PLACEMENT_RUNS = (("student+RED paper sites", "-paper", 1.0), ("student+RED paper sites alpha 0.1", "-paper-alpha0.1", 0.1))
#: the row of the teacher these students distil from, sampled, scored and measured in this part's session
TEACHER = "placement teacher"
#: the step that trains that teacher again when the base run's is not on disk (as run NAME-teacher)
TEACHER_STEP = "train teacher"
PAPER_CONFIG = "pipeline_diffusion/config/reedx2_dist_config.yaml"


def _sites(cfg: dict) -> str:
    return ", ".join(f"{s['student']} {s['where']} -> {s['teacher']} {s.get('teacher_where') or s['where']}"
                     for s in cfg["red"]["sites"])


def _cell(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def section(base: Dict[str, dict], base_cfg: dict, base_real: dict, base_teacher_sha: Optional[str], p: dict,
            res_name: str) -> List[str]:
    """The page section of the placement part: ``base`` rows by label and the base RED run's config, the base
    real-image floor and teacher sha256; ``p`` the part's record (rows, real floor, steps, configs, teacher)."""
    rows = {r["network"]: r for r in p["rows"]}
    teacher, red, alone = base["teacher"], base["student+RED"], base["student alone"]
    pt = rows[TEACHER]
    students = [rows[label] for label, _, _ in PLACEMENT_RUNS]
    cfgs = p["configs"]
    first_cfg = cfgs[PLACEMENT_RUNS[0][0]]
    real = p["real_floor"]
    same_clf = (real.get("classifier") or {}).get("sha256") == (base_real.get("classifier") or {}).get("sha256")
    trained_teacher = TEACHER_STEP in p["steps"]
    train_rows = students + ([pt] if trained_teacher else [])
    train_s = sum(r["train_s"] for r in train_rows)
    other_s = sum(v["seconds"] for k, v in p["steps"].items() if v.get("done") and not k.startswith("train"))
    sha = p["teacher"].get("sha256") or ""
    L = ["", "## RED site placement: the paper's sites against the five output-side sites", "",
         f"Command: `{p['command']}` (part `placement`, resumable); machine: {machine_line(p['machine'])}.", "",
         f"Wall time: **{(train_s + other_s) / 60:.1f} min**: training {train_s / 60:.1f} min (the sum of every epoch's "
         "time in the runs' `metrics.jsonl`: " + ", ".join(f"{r['network']} {r['train_s'] / 60:.1f}" for r in train_rows)
         + f"), the other steps {other_s / 60:.1f} min (`{res_name}/placement/state.json`).", "",
         f"- Placements: `outputs`, the student+RED above ({red['red_blocks']} blocks, student -> teacher): "
         f"{_sites(base_cfg)}. `paper`, the paper code's ({PAPER_CONFIG} in its repository; `train/unet.py` "
         f"`paper_sites`; {students[0]['red_blocks']} blocks): {_sites(first_cfg)}. As in the paper's U-Net, the RED "
         "outputs on the head and on a down conv's output are what those skips carry, and a block on a down conv's "
         "input feeds that conv only; with `outputs`, the RED output of the last level-0 block is on its skip.",
         f"- Runs: the `{_preset(p['steps'])}` preset with `red.sites=paper` and `red.alpha` "
         + " and ".join(f"{cfgs[label]['red']['alpha']:g}" for label, _, _ in PLACEMENT_RUNS)
         + f", for the same {students[0]['steps']} steps, schedule, seed, data and loss weights "
         f"({first_cfg['loss']['w_ce']} * diffusion + {first_cfg['loss']['w_dist']} * RED) as the runs above. Alpha 1 "
         "is the paper code's CIFAR-10 value, 0.1 its other DDPM setting (its CIFAR-10 alpha-0.1 run and its only "
         "Celeb-A RED run).",
         f"- Teacher: `{p['teacher'].get('checkpoint')}` (sha256 `{sha[:16]}`), "
         + ("the teacher of the runs above (the same sha256)." if sha and sha == base_teacher_sha else
            f"trained again by this part with the same preset and seed (the committed teacher's sha256 is "
            f"`{(base_teacher_sha or '')[:16]}`); its test denoising loss is {pt['test_diffusion_loss']:.5f} against "
            f"{teacher['test_diffusion_loss']:.5f} above." if trained_teacher else
            f"not the committed teacher (sha256 `{(base_teacher_sha or '')[:16]}`); test denoising loss "
            f"{pt['test_diffusion_loss']:.5f} against {teacher['test_diffusion_loss']:.5f} above."),
         f"- Quality: {real['cfd_name']} (sha256 `{real['classifier']['sha256'][:16]}`), "
         + ("the classifier of the table above, so CFD compares across both tables."
            if same_clf else "**not the classifier of the table above**: CFD, precision and recall compare only "
            "within this table (its teacher and floor rows); the rows from the runs above show theirs in the table "
            "above only.")
         + f" Samples: {p['samples_n']} per network with DDIM, as above.",
         f"- Memory and latency: measured in this part's session (`{res_name}/placement/deploy.md`"
         + (f"; {p['deploy_note']}" if p.get("deploy_note") else "") + "); the rows from the runs above show their "
         "theoretical peak only (their measurements are in the table above).", ""]

    def row(r, name, sites, alpha, here):
        q = here or same_clf
        return [name, sites, alpha, r["red_blocks"], f"{r['test_diffusion_loss']:.5f}",
                _cell(r["cfd"] if q else None, ".2f"), _cell(r["precision"] if q else None, ".3f"),
                _cell(r["recall"] if q else None, ".3f"), fmt_bytes(r["theory_peak_bytes"]),
                fmt_bytes(r["measured_activation_bytes"]) if here else "-", f"{r['p50_ms'] or 0:.2f} ms" if here else "-"]

    L += md_table(["network", "RED sites", "alpha", "RED blocks", "test denoising loss", "CFD (lower is better)",
                   "precision", "recall", "theoretical peak (one step)", "measured activation", "latency p50"],
                  [row(teacher, f"teacher (`{teacher['arch']}`, run above)", "-", "-", False),
                   row(pt, f"teacher (`{pt['arch']}`, this part)", "-", "-", True),
                   row(red, f"student+RED (`{red['arch']}`, run above)", "outputs", f"{base_cfg['red']['alpha']:g}", False)]
                  + [row(r, f"{r['network']} (`{r['arch']}`)", "paper", f"{cfgs[r['network']]['red']['alpha']:g}", True)
                     for r in students]
                  + [row(alone, f"student alone (`{alone['arch']}`, run above)", "-", "-", False),
                     ["real training images (floor, this part)", "-", "-", "-", "-", f"{real['cfd']:.2f}",
                      f"{real['precision']:.3f}", f"{real['recall']:.3f}", "-", "-", "-"]])
    L += ["", "- *test denoising loss*: on the same test images at the same fixed noise and time steps for every row "
          "of both tables, so it compares across them.", "", "### Reading (generated from the figures above)", ""]
    reds = [(r["network"], r) for r in students] + [("student+RED outputs", red)]
    best_name, best = min(reds, key=lambda nr: nr[1]["test_diffusion_loss"])
    L.append("- Denoising: test loss " + ", ".join(f"{n} {r['test_diffusion_loss']:.5f}" for n, r in reds)
             + f"; student alone {alone['test_diffusion_loss']:.5f}, teacher {teacher['test_diffusion_loss']:.5f}. The "
             f"lowest RED student is the {best_name}, "
             + ("below" if best["test_diffusion_loss"] < alone["test_diffusion_loss"] else "not below")
             + " the student alone.")
    parts = []
    for n, r in reds:
        f0, alpha = r.get("first_epoch_losses") or {}, cfgs[n]["red"]["alpha"] if n in cfgs else base_cfg["red"]["alpha"]
        if f0.get("train_red") is not None and r.get("train_red_loss") is not None:
            parts.append(f"{n} {f0['train_red']:.4f} -> {r['train_red_loss']:.4f} (mean 1 - cos "
                         f"{r['train_red_loss'] / alpha:.4f} at alpha {alpha:g})" if alpha else f"{n} 0")
    if parts:
        L.append("- The RED term (alpha x the mean over blocks of 1 - cos), first epoch -> last epoch: " + "; ".join(parts)
                 + ".")
    L.append(f"- Memory: theoretical peak of one step {fmt_bytes(students[0]['theory_peak_bytes'])} with the paper's "
             f"{students[0]['red_blocks']} blocks, {fmt_bytes(red['theory_peak_bytes'])} with the outputs' "
             f"{red['red_blocks']}, {fmt_bytes(alone['theory_peak_bytes'])} alone; the teacher's "
             f"{fmt_bytes(pt['theory_peak_bytes'])} is {pt['theory_peak_bytes'] / students[0]['theory_peak_bytes']:.2f}x "
             "the paper placement's.")
    here = [pt] + students
    diffs = [r["verify_max_abs_diff"] for r in here if r.get("verify_max_abs_diff") is not None]
    L.append(f"- Export: {'every' if all(r.get('preflight_passed') for r in here) else '**not every**'} bundle of this "
             f"part passed its pre-flight, and ONNX Runtime matched PyTorch within max |diff| "
             f"{max(diffs) if diffs else float('nan'):.1e}. Latency of one step in this session: "
             + ", ".join(f"{r['network']} {r['p50_ms'] or 0:.2f} ms" for r in here) + ".")
    return L


def _preset(steps: Dict[str, dict]) -> str:
    argv = next((v["argv"] for k, v in steps.items() if k.startswith("train")), [])
    return argv[argv.index("distill") + 1] if "distill" in argv else "?"
