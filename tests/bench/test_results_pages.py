"""Every committed results page is what its writer makes of the committed run files (nothing typed by hand).

Each page is rewritten in a scratch copy of bench/results by the option that rereads the run files,
and must come out identical; a writer or formatter change that moves a figure fails here until the
pages are regenerated.
"""

import shutil
from pathlib import Path

import pytest

from bench import diffusion_bench, distill_report, loopback_bench, measured_memory, memory_pairs, plan_timing, reproduce
from bench import int8_accuracy, red_vs_kd, step_speed
from redistill.cli import main as redistill_main
from tests import fault_injection

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"


def _compare_pages(out: str) -> int:
    """compare.md and compare.csv rewritten from the copied folder's compare.json alone (the copied ones removed)."""
    for name in ("compare.md", "compare.csv"):
        Path(out, name).unlink()
    return redistill_main(["compare", "--pages-only", "--out", out])


#: page -> (what it is made from, the command that rewrites it from those files)
PAGES = {
    **{f"{n}.md": ([f"{n}.json"], lambda n=n: loopback_bench.main(["--pages-only", "--out", f"bench/results/{n}"]))
       for n in ("deploy_loopback", "reproduce_deploy", "reproduce_probe128", "diffusion_deploy")},
    "distill_quick.md": (["distill_quick.json", "distill_quick_run", "distill_quick_remarks.md"],
                         lambda: distill_report.main(["--pages-only", "--remarks", "bench/results/distill_quick_remarks.md"])),
    "export_quick.md": (["export_quick.json"],
                        lambda: redistill_main(["export-report", "--pages-only", "--out", "bench/results/export_quick"])),
    "memory_paper_pairs.md": (["memory_paper_pairs.json"], lambda: memory_pairs.main(["--pages-only"])),
    "bad_input.md": (["bad_input.json"],
                     lambda: fault_injection.main(["--pages-only", "--out", "bench/results/bad_input"])),
    "plan_timing.md": (["plan_timing.json", "plan_timing_remarks.md"],
                       lambda: plan_timing.main(["--pages-only", "--remarks", "bench/results/plan_timing_remarks.md"])),
    "reproduce.md": (["reproduce", "reproduce_run", "reproduce.json", "reproduce_deploy.json", "reproduce_probe128.json",
                      "reproduce_remarks.md"],
                     lambda: reproduce.main(["--pages-only", "--remarks", "bench/results/reproduce_remarks.md"])),
    "diffusion.md": (["diffusion", "diffusion.json", "diffusion_deploy.json", "diffusion_remarks.md"],
                     lambda: diffusion_bench.main(["--pages-only", "--remarks", "bench/results/diffusion_remarks.md"])),
    **{f"{d}/{page}": ([d], lambda d=d: _compare_pages(f"bench/results/{d}"))
       for d in ("reproduce", "diffusion/compare") for page in ("compare.md", "compare.csv")},
    "measured_memory.md": (["measured_memory.json", "measured_memory_remarks.md"],
                           lambda: measured_memory.main(["--pages-only", "--remarks",
                                                         "bench/results/measured_memory_remarks.md"])),
    "int8_accuracy.md": (["int8_accuracy", "int8_accuracy_remarks.md"],
                         lambda: int8_accuracy.main(["--pages-only", "--remarks", "bench/results/int8_accuracy_remarks.md"])),
    "step_speed.md": (["step_speed.json", "step_speed_remarks.md"],
                      lambda: step_speed.main(["--pages-only", "--remarks", "bench/results/step_speed_remarks.md"])),
    "red_vs_kd.md": (["red_vs_kd_run", "red_vs_kd_remarks.md"],
                     lambda: red_vs_kd.main(["--pages-only", "--remarks", "bench/results/red_vs_kd_remarks.md"])),
}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_committed_page_is_regenerated_unchanged(page, tmp_path, monkeypatch, capsys):
    inputs, rewrite = PAGES[page]
    scratch = tmp_path / "bench" / "results"
    scratch.mkdir(parents=True)
    for name in inputs:
        src = RESULTS / name
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, scratch / name)
    monkeypatch.chdir(tmp_path)
    assert rewrite() == 0
    assert (scratch / page).read_text() == (RESULTS / page).read_text()
