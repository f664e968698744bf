"""``redistill sample``: draw images from a denoiser checkpoint (``redistill quality``, in bench/, scores them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from redistill.errors import UserError


def add_sampling_args(p, n_default: int) -> None:
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
    add_sampling_args(s, 64)
    s.add_argument("--nrow", type=int, default=8, help="images per grid row (default 8)")
    s.add_argument("--grid", type=int, default=64, help="images in grid.png: the first GRID of --n (default 64)")
    s.add_argument("--out", default=None, help="output folder (default: samples/ beside the checkpoint)")
    s.set_defaults(func=_sample)


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


def draw_samples(args, checkpoint: str):
    """Load, validate and sample; returns (images [-1,1], labels or None, settings, seconds)."""
    import time

    import torch

    from train.sampling import SAMPLERS, load_denoiser, resolve_labels, sample
    from train.runtime import resolve_device

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
    images, labels, settings, secs = draw_samples(args, args.checkpoint)
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


def load_samples(path: Path):
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
