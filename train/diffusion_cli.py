"""``redistill sample`` and ``redistill quality``: draw images from a denoiser checkpoint and score them."""

from __future__ import annotations

import argparse
from pathlib import Path

from redistill.errors import UserError


def _add_sampling_args(p, n_default: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", default="ddim", help="ddim (default) or ddpm (ancestral, all T steps)")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps, evenly spaced over the schedule (default 50)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 = deterministic (default), 1 = DDPM-like")
    g.add_argument("--variance", default="fixedlarge", choices=["fixedlarge", "fixedsmall"],
                   help="DDPM reverse variance: fixedlarge = beta_t (default), fixedsmall = posterior beta-tilde")
    g.add_argument("--n", type=int, default=n_default, help=f"number of images (default {n_default})")
    g.add_argument("--seed", type=int, default=0, help="sample i's noise depends only on (seed, i)")
    g.add_argument("--batch", type=int, default=64, help="images per network batch (default 64)")
    g.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance w (conditional models): eps = (1+w) eps_cond - w eps_uncond")
    g.add_argument("--label", type=int, default=None,
                   help="class index for every image (conditional models; default: cycle over the classes)")
    g.add_argument("--no-clip", action="store_true", help="do not clip each x0 prediction to [-1, 1]")
    g.add_argument("--weights", default="auto", choices=["auto", "raw"], help="auto = EMA weights (default), raw = trained")
    g.add_argument("--device", default="auto")


def add_commands(sub) -> None:
    s = sub.add_parser(
        "sample", help="draw images from a denoiser checkpoint (DDIM or DDPM, classifier-free guidance)",
        description="Sample a U-Net denoiser written by `redistill distill` and write OUT/grid.png, OUT/samples.npz "
        "(uint8 NHWC images, labels) and OUT/sample.json (the exact settings). See docs/diffusion.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  redistill sample runs/ddpm/teacher/best.pt --n 64 --out samples/teacher\n"
        "  redistill sample runs/ddpm/student/best.pt --sampler ddpm --n 16 --seed 1 --out /tmp/s",
    )
    s.add_argument("checkpoint", help="denoiser checkpoint (best.pt / last.pt of a unet run)")
    _add_sampling_args(s, 64)
    s.add_argument("--nrow", type=int, default=8, help="images per grid row (default 8)")
    s.add_argument("--grid", type=int, default=64, help="images in grid.png: the first GRID of --n (default 64)")
    s.add_argument("--out", default=None, help="output folder (default: samples/ beside the checkpoint)")
    s.set_defaults(func=_sample)

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
                   help="local Inception-v3 weights (torchvision or pytorch-fid pt_inception .pth): adds FID")
    q.add_argument("--data-root", default=None, help="real image folder (default: the one the denoiser/classifier was trained on)")
    q.add_argument("--data-name", default=None, help="imagefolder | cifar10 | stl10")
    q.add_argument("--cache", default=None, metavar="DIR", help="reference-statistics cache folder (default: beside the classifier)")
    q.add_argument("--json", default=None, metavar="OUT", help="also write the result to this JSON file")
    _add_sampling_args(q, 1000)
    q.set_defaults(func=_quality)


def _sample_settings(args, ck, checkpoint: str, diffusion) -> dict:
    from redistill.io import sha256_file

    return {
        "checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint), "arch": ck["arch"], "role": ck.get("role"),
        "sampler": args.sampler, "steps": args.steps if args.sampler == "ddim" else diffusion.T,
        "eta": args.eta if args.sampler == "ddim" else None, "variance": args.variance if args.sampler == "ddpm" else None,
        "n": args.n, "seed": args.seed, "batch": args.batch, "guidance": args.guidance, "label": args.label,
        "clip_denoised": not args.no_clip, "weights": "ema" if args.weights == "auto" and ck.get("ema") is not None else "raw",
        "diffusion": ck["diffusion"], "image_size": ck["image_size"], "num_classes": ck["num_classes"],
        "classes": ck.get("classes"), "data": ck.get("config", {}).get("data", {}),
    }


def _draw(args, checkpoint: str):
    """Load, validate and sample; returns (images [-1,1], labels or None, settings, seconds)."""
    import time

    import torch

    from train.sampling import SAMPLERS, load_denoiser, resolve_labels, sample
    from train.trainer import resolve_device

    SAMPLERS.get(args.sampler)  # unknown name -> did-you-mean before the checkpoint is loaded
    device = resolve_device(args.device)
    model, diffusion, ck = load_denoiser(checkpoint, device, args.weights)
    settings = _sample_settings(args, ck, checkpoint, diffusion)
    labels = resolve_labels(model, args.n, args.label, args.guidance)
    t0 = time.perf_counter()
    images = sample(model, diffusion, args.n, args.sampler, steps=args.steps, eta=args.eta, guidance=args.guidance,
                    labels=labels, clip_denoised=not args.no_clip, variance=args.variance, seed=args.seed,
                    batch_size=args.batch, image_size=ck["image_size"], device=device)
    settings["device"] = str(device)
    settings["torch_version"] = str(torch.__version__)
    return images, labels, settings, time.perf_counter() - t0


def _sample(args) -> int:
    import io
    import json

    import numpy as np

    from redistill.io import atomic_write, atomic_write_json
    from train.sampling import save_grid, to_uint8

    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "samples"
    images, labels, settings, secs = _draw(args, args.checkpoint)
    arrays = {"images": to_uint8(images).numpy(), "settings": np.array(json.dumps(settings, sort_keys=True))}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(out / "samples.npz", lambda f: f.write(buf.getvalue()))
    save_grid(images[:max(args.grid, 1)], out / "grid.png", nrow=args.nrow)
    atomic_write_json(out / "sample.json", {**settings, "seconds": round(secs, 3), "grid_images": min(args.grid, args.n),
                                            "files": {"grid": "grid.png", "samples": "samples.npz"}})
    print(f"{args.n} images ({args.sampler}, {settings['steps']} steps, seed {args.seed}) in {secs:.1f} s -> {out}/grid.png, "
          f"samples.npz, sample.json")
    return 0


def _load_samples(path: Path):
    import json

    import numpy as np

    from train.sampling import from_uint8

    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
            settings = json.loads(str(z["settings"])) if "settings" in z.files else {}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not a samples.npz written by `redistill sample` ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{path}: 'images' must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    return from_uint8(images), settings


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
        images, settings = _load_samples(src)
    else:
        images, _, settings, _ = _draw(args, str(src))
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
