"""
Sample images from a trained ResGen checkpoint (EMA weights) with the confidence-ordered sampler
(DESIGN.md §4.4) and decode them with the RVQ tokenizer.

    python sample.py --n 64                                   # runs/resgen/last.pt -> samples.png
    python sample.py --ckpt runs/resgen/last.pt --n 64 --steps 16 --cfg 3 --out samples.png
    python sample.py --ckpt runs/resgen_xl/last.pt --n 50000 --batch-size 256 --npz samples.npz   # ADM evaluator

The PNG grid has one row per class (class-balanced, or the labels given by --classes).
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch

from resgen import load_resgen
from tokenizer import (UserError, check_writable_dir, default_device, file_hash, load_tokenizer, parse_device,
                       run_cli, save_grid)

# Sampler defaults, shared by sample.py and eval_fid.py (the paper's Fig. 3 knobs).
SAMPLER_DEFAULTS = dict(steps=16, cfg=1.0, cfg_schedule="constant", top_p=1.0, temperature=1.0, choice_temperature=1.0)


def add_sampler_args(p):
    """The sampler flags, one place for sample.py and eval_fid.py."""
    d = SAMPLER_DEFAULTS
    p.add_argument("--steps", type=int, default=d["steps"], help="T: forward passes (independent of the RVQ depth)")
    p.add_argument("--cfg", type=float, default=d["cfg"], help="classifier-free guidance scale w (1 = off)")
    p.add_argument("--cfg-schedule", default=d["cfg_schedule"], choices=["constant", "linear"],
                   help="w constant, or rising linearly with the revealed fraction")
    p.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus over mixture components, in (0, 1]")
    p.add_argument("--temperature", type=float, default=d["temperature"], help="tau: z = mu + tau * sigma * eps")
    p.add_argument("--choice-temperature", type=float, default=d["choice_temperature"],
                   help="Gumbel noise on the confidences, annealed to 0 over the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=default_device())


def sampler_kwargs(args):
    """Validate the sampler flags (one clear error each) and return them as generate() keyword arguments."""
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1 (got {args.steps})")
    if not args.cfg >= 0:
        raise UserError(f"--cfg must be >= 0 (got {args.cfg})")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if not args.temperature >= 0:
        raise UserError(f"--temperature must be >= 0 (got {args.temperature})")
    if not args.choice_temperature >= 0:
        raise UserError(f"--choice-temperature must be >= 0 (got {args.choice_temperature})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    return {k: getattr(args, k) for k in SAMPLER_DEFAULTS}


def load_for_sampling(ckpt, tokenizer=None, device="cpu"):
    """(ResGen with EMA weights, Tokenizer) on `device`; the tokenizer must be the one that made the codes."""
    model = load_resgen(ckpt, ema=True, device=device)
    path = tokenizer or model.meta.get("tokenizer")
    if not path or not os.path.isfile(path):
        raise UserError(f"tokenizer checkpoint {path!r} named by {ckpt} was not found; pass --tokenizer")
    want = model.meta.get("tokenizer_hash")
    if want and file_hash(path) != want:
        raise UserError(f"tokenizer {path} (hash {file_hash(path)}) is not the one {ckpt} was trained on (hash {want})")
    tok = load_tokenizer(path, device)
    c = model.config
    have = (tok.cfg.depth, tok.cfg.codebook_size, tok.cfg.code_dim, tok.cfg.grid ** 2)
    if have != (c.depth, c.codebook_size, c.code_dim, c.length):
        raise UserError(f"tokenizer {path} has (depth, V, c, L) = {have} but {ckpt} expects "
                        f"{(c.depth, c.codebook_size, c.code_dim, c.length)}")
    return model, tok


@torch.no_grad()
def generate_images(model, tok, labels, batch_size=64, seed=0, device=None, progress=False, **sampler):
    """Generate one image per label: ResGen codes (B, L, D) -> code grid (B, h, w, D) -> decoder.

    labels: (N,) int64 tensor. Returns uint8 (N, H, W, C). Batch b uses seed + b, so results do not depend on
    what else was sampled before. The one generation function of the project (eval_fid.py reuses it).
    """
    from tokenizer import to_uint8
    device = torch.device(device) if device is not None else next(model.parameters()).device
    kwargs = {**SAMPLER_DEFAULTS, **sampler}
    g = tok.cfg.grid
    out, t0 = [], time.time()
    for b, i in enumerate(range(0, len(labels), batch_size)):
        y = labels[i:i + batch_size].to(device)
        gen = torch.Generator(device=device).manual_seed(seed + b)
        codes = model.generate(y, generator=gen, **kwargs)  # (B, L, D)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            images = tok.decode(codes.view(len(y), g, g, -1))
        out.append(to_uint8(images))
        if progress:
            n = i + len(y)
            print(f"sampled {n}/{len(labels)} ({n / (time.time() - t0):.1f} images/s)", file=sys.stderr, flush=True)
    return np.concatenate(out)


def class_labels(n, num_classes, classes=None):
    """Class-balanced labels sorted by class (or --classes cycled to n). Returns an int64 tensor (n,)."""
    if classes:
        try:
            base = [int(c) for c in classes.split(",")]
        except ValueError:
            raise UserError(f"--classes must be comma-separated integers (got {classes!r})")
        bad = [c for c in base if not 0 <= c < num_classes]
        if bad:
            raise UserError(f"--classes {bad} outside 0..{num_classes - 1}")
        return torch.tensor([base[i % len(base)] for i in range(n)], dtype=torch.long)
    return torch.arange(n, dtype=torch.long) * max(1, num_classes) // n


def grid_by_class(images, labels):
    """Lay images out with one row per class (in order of appearance); short rows are padded with gray."""
    rows = list(dict.fromkeys(labels.tolist()))
    per_row = max((labels == c).sum().item() for c in rows)
    h, w, ch = images.shape[1:]
    cells = np.full((len(rows) * per_row, h, w, ch), 128, dtype=np.uint8)
    for r, c in enumerate(rows):
        idx = (labels == c).nonzero().flatten().numpy()
        cells[r * per_row:r * per_row + len(idx)] = images[idx]
    return cells, per_row


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample a PNG grid (and an ADM-style .npz) from a ResGen checkpoint.")
    p.add_argument("--ckpt", default="runs/resgen/last.pt")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the one named in the checkpoint)")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--classes", default=None, help="comma-separated class labels, cycled to --n (default: balanced)")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--npz", default=None, help="also write uint8 arr_0 (N, H, W, 3) for the ADM evaluator")
    add_sampler_args(p)
    args = p.parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be >= 1 (got {args.n})")
    kwargs = sampler_kwargs(args)
    device = parse_device(args.device)
    for path in filter(None, (args.out, args.npz)):
        check_writable_dir(os.path.dirname(os.path.abspath(path)))
    model, tok = load_for_sampling(args.ckpt, args.tokenizer, device)
    labels = class_labels(args.n, model.config.num_classes, args.classes)
    t0 = time.time()
    images = generate_images(model, tok, labels, batch_size=args.batch_size, seed=args.seed, device=device,
                             progress=True, **kwargs)
    dt = time.time() - t0
    cells, per_row = grid_by_class(images, labels)
    save_grid(cells, args.out, nrow=per_row)
    print(f"wrote {args.out}: {args.n} samples in {dt:.1f} s ({args.n / dt:.2f} images/s), step {model.step}, "
          + ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    if args.npz:
        rgb = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)
        tmp = args.npz + ".tmp.npz"
        np.savez(tmp, arr_0=rgb, arr_1=labels.numpy())  # arr_1: class labels, as in ADM's class-conditional files
        os.replace(tmp, args.npz if args.npz.endswith(".npz") else args.npz + ".npz")
        print(f"wrote {args.npz}: arr_0 {rgb.shape} uint8, arr_1 labels")


if __name__ == "__main__":
    run_cli(main)
