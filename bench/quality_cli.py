"""``redistill quality``: score generated images (CFD, k-NN precision/recall, FID with local weights), downloading nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

from redistill.errors import UserError
from train.diffusion_cli import add_sampling_args, draw_samples, load_samples


def add_commands(sub) -> None:
    q = sub.add_parser(
        "quality", help="sample quality: classifier-feature Frechet distance (CFD), precision/recall, FID with local weights",
        description="Score generated images against real test images, downloading nothing: CFD (the Frechet distance "
        "of the project's own classifier's penultimate features; not FID), k-NN precision and recall on the same "
        "features, and FID only with --inception-weights on disk. INPUT is a samples.npz written by `redistill sample` "
        "or a denoiser checkpoint (then --n images are sampled first). See docs/diffusion.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  redistill quality samples/teacher/samples.npz --classifier runs/quick/teacher/best.pt --json q.json\n"
        "  redistill quality runs/ddpm/student/best.pt --n 1000 --classifier runs/quick/teacher/best.pt "
        "--inception-weights pt_inception-2015-12-05-6726825d.pth",
    )
    q.add_argument("input", metavar="SAMPLES.npz|CHECKPOINT")
    q.add_argument("--classifier", required=True, metavar="CKPT",
                   help="classifier checkpoint whose penultimate features define CFD (e.g. runs/quick/teacher/best.pt)")
    q.add_argument("--real", type=int, default=10000, help="real test images for the reference (default 10000, capped at the set)")
    q.add_argument("--real-seed", type=int, default=0, help="seed of the class-balanced real subset (default 0)")
    q.add_argument("--k", type=int, default=3, help="k of the k-NN precision/recall (default 3)")
    q.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="local FID Inception weights (torch-fidelity weights-inception-2015-12-05 or pytorch-fid "
                        "pt_inception-2015-12-05 .pth): adds FID")
    q.add_argument("--data-root", default=None, help="real image folder (default: the one the denoiser/classifier was trained on)")
    q.add_argument("--data-name", default=None, help="imagefolder | cifar10 | stl10")
    q.add_argument("--cache", default=None, metavar="DIR", help="reference-statistics cache folder (default: beside the classifier)")
    q.add_argument("--json", default=None, metavar="OUT", help="also write the result to this JSON file")
    add_sampling_args(q, 1000)
    q.set_defaults(func=_quality)


def _quality(args) -> int:
    from bench.quality import ClassifierFeatures, evaluate_quality, format_report
    from redistill.io import atomic_write_json
    from train.trainer import resolve_device

    src = Path(args.input)
    if not src.is_file():
        raise UserError(f"{src} not found: give a samples.npz written by `redistill sample` or a denoiser checkpoint")
    device = resolve_device(args.device)
    fx = ClassifierFeatures(args.classifier, device)
    if src.suffix == ".npz":
        images, settings = load_samples(src)
    else:
        images, _, settings, _ = draw_samples(args, str(src))
    cdata = fx.data_config
    sdata = settings.get("data") or {}
    root = args.data_root or sdata.get("root") or cdata.get("root")
    if not root:
        raise UserError("no real-image folder known for these samples: give --data-root DIR (train/ and test/ class folders)")
    name = args.data_name or sdata.get("name") or cdata.get("name") or "imagefolder"
    r = evaluate_quality(images, fx, root, real=args.real, data_name=name, seed=args.real_seed, k=args.k,
                         inception_weights=args.inception_weights, cache_dir=args.cache, device=device)
    r = {"input": str(src), "samples": settings, **r}
    print(format_report(r))
    if args.json:
        atomic_write_json(args.json, r)
        print(f"-> {args.json}")
    return 0
