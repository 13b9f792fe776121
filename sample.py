"""
Sample images from a trained ResGen checkpoint (EMA weights) with the confidence-ordered sampler
(PAPER.md §12) and decode them with the RVQ tokenizer; or complete real images' codes (prompted generation).
An RQ-Transformer checkpoint (train.py --arch rqtransformer) samples through the same commands, autoregressively.

    python sample.py --n 64                                   # runs/resgen/last.pt -> samples.png
    python sample.py --ckpt runs/resgen/last.pt --n 64 --steps 16 --cfg 3 --out samples.png
    python sample.py --ckpt runs/resgen_xl/last.pt --n 50000 --batch-size 256 --npz samples.npz   # ADM evaluator

    # prompted: keep part of real test images' codes, regenerate the rest (one picture: originals, kept, completions)
    python sample.py --inpaint bottom --n 10 --out inpaint.png      # keep the top half, regenerate the bottom
    python sample.py --keep-depth 1 --n 10 --out redetail.png       # keep depth 1 everywhere, regenerate depths 2..D

    # a model trained on a cache that carries its own codebooks (no tokenizer): codes only
    python sample.py --ckpt runs/resgen_audio/last.pt --n 16 --codes-out samples.npy

The PNG grid has one row per class (class-balanced, or the labels given by --classes).

An RQ-Transformer checkpoint takes L spatial and L·D depth passes whatever --steps says: --steps and
--choice-temperature (ResGen's) are ignored for it, and --top-k (its own) must stay 0 for ResGen; the passes each
model made are printed (and recorded by eval_fid.py). Its prompts continue a prefix: --inpaint bottom (the top
half given) on an image grid, --inpaint right on a sequence; any other prompt is one clear error.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

from checkpoints import (DEVICE_HELP, UserError, beside, check_writable_dir, default_device, file_hash, parse_device,
                         run_cli)
from resgen import SCHEDULES
from rqtransformer import ARCH, arch_of, load_model
from tokenizer import (load_code_cache, load_tokenizer, real_images, save_grid, save_npy, spread_indices, to_float,
                       to_uint8)

# Sampler defaults, shared by sample.py and eval_fid.py (the paper's Fig. 3 knobs): the settings RESULTS.md scores
# ResGen with (w = 3, tau = 0.7; confidence order, the better Inception FID, RESULTS.md §4.4). The RQ-Transformer does better at
# --temperature 1 (at the demo's budget, measured before this round: fd_classifier 80.3 against 93.2 at 0.7).
SAMPLER_DEFAULTS = dict(steps=16, cfg=3.0, cfg_schedule="constant", top_p=1.0, temperature=0.7, choice_temperature=1.0,
                        top_k=0, emit="drawn", confidence="pi", schedule="cosine", noise_temperature=None)
# The flags each architecture's sampler ignores (ResGen's T and confidence temperature mean nothing to an
# autoregressive model; top-k over codes is the RQ-Transformer's, ResGen's MoG head has no codes to rank).
IGNORED = {"resgen": ("top_k",), ARCH: ("steps", "choice_temperature", "emit", "confidence", "schedule",
                                             "noise_temperature")}


def add_sampler_args(p):
    """The sampler flags, one place for sample.py and eval_fid.py."""
    d = SAMPLER_DEFAULTS
    p.add_argument("--steps", type=int, default=d["steps"], help="T: forward passes (independent of the RVQ depth); "
                   "an RQ-Transformer ignores it (L + L*D passes)")
    p.add_argument("--cfg", type=float, default=d["cfg"], help="classifier-free guidance scale w (1 = off)")
    p.add_argument("--cfg-schedule", default=d["cfg_schedule"], choices=["constant", "linear"],
                   help="w constant, or rising linearly with the revealed fraction")
    p.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus over mixture components, in (0, 1]")
    p.add_argument("--temperature", type=float, default=d["temperature"], help="tau: z = e(v; p) + b + e^s (delta_k + tau * eps) (MoG); softmax temperature (tokens)")
    p.add_argument("--noise-temperature", type=float, default=d["noise_temperature"], help="MoG head: the noise scale "
                   "tau_eps in z = e(v; p) + b + e^s (delta_k + tau_eps * eps), apart from pi's tau (default: tau)")
    p.add_argument("--schedule", default=d["schedule"], choices=sorted(SCHEDULES),
                   help="gamma: the masked fraction after step s is gamma(s/T) (cosine reveals most tokens in the last steps)")
    p.add_argument("--choice-temperature", type=float, default=d["choice_temperature"],
                   help="Gumbel noise on the confidences, annealed to 0 over the steps (ResGen)")
    p.add_argument("--emit", default=d["emit"], choices=["drawn", "requantized"],
                   help="MoG head: depth p's token is the code of the drawn component (drawn), or every token comes "
                   "from re-quantising the drawn embedding (requantized)")
    p.add_argument("--confidence", default=d["confidence"], choices=["requantizer", "pi"],
                   help="MoG head: the confidence of depth p's token, log pi_v (the default: the better Inception FID) or "
                   "the re-quantiser's log-probability (more diverse samples)")
    p.add_argument("--top-k", type=int, default=d["top_k"], help="RQ-Transformer only: keep the k most likely codes "
                   "(0 = all); an error for ResGen")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (same seed, same samples)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per generate() call (eval_fid.py: also images per "
                   "Inception batch)")
    p.add_argument("--device", default=default_device(), help=DEVICE_HELP)
    p.add_argument("--compile", action="store_true", help="ResGen only: torch.compile the transformer and the "
                   "re-quantiser (ResGen.compile_sampler; CUDA graphs on a GPU): pays over many samples, not for one "
                   "grid (BENCHMARKS.md §6)")
    p.add_argument("--classes", default=None, help="comma-separated class labels, cycled (default: balanced; with a "
                   "prompt, the real images' labels); 'null' is the null class (unconditional)")
    p.add_argument("--inpaint", default=None, choices=INPAINT_REGIONS,
                   help="prompted: keep real images' codes except in this region, and regenerate it (centre: the "
                   "middle half of each side; border: the rest); with --keep-depth, depths 1..d inside it are kept")
    p.add_argument("--keep-depth", type=int, default=0,
                   help="prompted: keep depths 1..d of real images' codes, regenerate the finer depths")


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
    if args.noise_temperature is not None and not args.noise_temperature >= 0:
        raise UserError(f"--noise-temperature must be >= 0 (got {args.noise_temperature})")
    if not args.choice_temperature >= 0:
        raise UserError(f"--choice-temperature must be >= 0 (got {args.choice_temperature})")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = off; got {args.top_k})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    return {k: getattr(args, k) for k in SAMPLER_DEFAULTS}


def sampler_settings(model, settings):
    """The sampler settings `model`'s generate() uses, from SAMPLER_DEFAULTS-style settings: the flags its
    architecture ignores are dropped (IGNORED), so what is printed and recorded is what shaped the samples. A top-k
    for ResGen is a UserError (it would silently do nothing)."""
    arch = arch_of(model)
    out = {**SAMPLER_DEFAULTS, **settings}
    if arch == "resgen" and out["top_k"]:
        raise UserError(f"--top-k {out['top_k']} is the RQ-Transformer's; ResGen samples with --top-p")
    return {k: v for k, v in out.items() if k not in IGNORED[arch]}


def forward_passes(model, settings):
    """Sequential network passes per generate() call (per image, whatever the batch): ResGen's T transformer passes,
    or the RQ-Transformer's L spatial and L·D depth passes."""
    if arch_of(model) == ARCH:
        return model.forward_passes()
    return {"transformer": int(settings.get("steps", SAMPLER_DEFAULTS["steps"]))}


def passes_text(passes):
    return " + ".join(f"{n} {name}" for name, n in passes.items()) + " passes"


def load_for_sampling(ckpt, tokenizer=None, device="cpu", decoder=True, compile=False):
    """(model with EMA weights, Tokenizer) on `device`: a ResGen or an RQ-Transformer, whichever the checkpoint
    holds (rqtransformer.load_model); the tokenizer must be the one that made the codes. The one the checkpoint
    names is looked up in the checkpoint's folder too (checkpoints.beside: shipped weights name it that way).
    decoder=False: the tokenizer is optional (None when neither given nor named by the checkpoint): codes only.
    compile: ResGen.compile_sampler (the first batch then takes the compile time)."""
    model = load_model(ckpt, ema=True, device=device)
    if compile:
        model.compile_sampler()
    path = tokenizer or (model.meta.get("tokenizer") and beside(model.meta["tokenizer"], ckpt))
    if not path and not decoder:
        return model, None
    if not path:
        raise UserError(f"{ckpt} was trained on codes with their own codebooks and names no tokenizer to decode "
                        f"pictures: pass --tokenizer, or write the codes with --codes-out FILE.npy")
    if not os.path.isfile(path):
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
def generate_codes(model, labels, batch_size=64, seed=0, device=None, progress=False, prompt_codes=None,
                   prompt_mask=None, **sampler):
    """Generate one code grid per label, batch by batch: codes (N, L, D) int64 on the CPU.

    labels: (N,) int64 tensor. prompt_codes (N, L, D) / prompt_mask (N, L, D) bool: prompted generation (the
    given tokens are kept). Batch b uses seed + b, so results do not depend on what else was sampled before.
    The one generation loop of the project (generate_images, the prompted commands and eval_fid.py use it); either
    architecture (sampler_settings drops the flags the model ignores).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    kwargs = sampler_settings(model, sampler)
    out, t0 = [], time.time()
    for b, i in enumerate(range(0, len(labels), batch_size)):
        y = labels[i:i + batch_size].to(device)
        if prompt_codes is not None:
            kwargs.update(prompt_codes=prompt_codes[i:i + batch_size].to(device),
                          prompt_mask=prompt_mask[i:i + batch_size].to(device))
        gen = torch.Generator(device=device).manual_seed(seed + b)
        out.append(model.generate(y, generator=gen, **kwargs).cpu())  # (B, L, D)
        if progress:
            n = i + len(y)
            print(f"sampled {n}/{len(labels)} ({n / (time.time() - t0):.1f} images/s)", file=sys.stderr, flush=True)
    return torch.cat(out)


@torch.no_grad()
def decode_codes(tok, codes, batch_size=64, given=None):
    """Codes (N, L, D) -> uint8 images (N, H, W, C) through the tokenizer's decoder.

    given (N, L, D) bool: decode only the given tokens, and paint gray the positions where none is given (their
    latent would be 0): the picture of what a prompt keeps."""
    device = tok.scale.device
    g = tok.cfg.grid
    out = []
    for i in range(0, len(codes), batch_size):
        c = codes[i:i + batch_size].to(device).view(-1, g, g, codes.shape[-1])  # (B, h, w, D)
        m = None if given is None else given[i:i + batch_size].to(device).view(c.shape)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            images = tok.decode(c, m)  # (B, C, H, W)
        if m is not None:  # positions with nothing kept, blown up to their pixels
            empty = ~m.any(-1)  # (B, h, w)
            f = images.shape[-1] // g
            empty = empty.repeat_interleave(f, 1).repeat_interleave(f, 2).unsqueeze(1)  # (B, 1, H, W)
            images = images.masked_fill(empty, 0.0)  # 0 in [-1, 1] is mid gray
        out.append(to_uint8(images))
    return np.concatenate(out)


def generate_images(model, tok, labels, batch_size=64, seed=0, device=None, progress=False, **sampler):
    """Generate one image per label: ResGen codes (N, L, D) -> code grid (N, h, w, D) -> decoder.
    labels: (N,) int64 tensor. Returns uint8 (N, H, W, C) (eval_fid.py and train.py reuse it)."""
    codes = generate_codes(model, labels, batch_size, seed, device, progress, **sampler)
    return decode_codes(tok, codes, batch_size)


#################################################################################
#                Prompted generation: inpainting and re-detailing               #
#################################################################################
# A prompt keeps some tokens of real codes and the sampler generates the rest (ResGen.generate's prompt_codes /
# prompt_mask). Masked modelling over RVQ tokens makes two edits natural: inpainting (keep every depth outside a
# region) and re-detailing (keep the coarse depths 1..d everywhere and generate the fine ones: same content, new
# detail). The two combine: outside the region every depth is kept, inside it depths 1..d.

INPAINT_REGIONS = ("top", "bottom", "left", "right", "centre", "border")


def region_mask(grid, region):
    """The positions of `region` on a grid (h, w), or on a sequence (L,) laid out as one row (so `right` is
    its second half: continuation). Returns (h·w,) bool, True = in the region."""
    h, w = grid if len(grid) == 2 else (1, grid[0])
    r = torch.arange(h).view(h, 1).expand(h, w)
    c = torch.arange(w).view(1, w).expand(h, w)
    centre = (r >= h // 4) & (r < h - h // 4) & (c >= w // 4) & (c < w - w // 4)
    regions = {"top": r < h // 2, "bottom": r >= h // 2, "left": c < w // 2, "right": c >= w // 2,
               "centre": centre, "border": ~centre}
    return regions[region].flatten()


def prompt_mask(grid, depth, inpaint=None, keep_depth=0):
    """Which tokens a prompt keeps: every depth outside the `inpaint` region, depths 1..keep_depth inside it (and
    everywhere when there is no region). grid: [h, w] or [L]. Returns (L, D) bool, True = kept; at every position
    a prefix of depths, as ResGen.generate requires."""
    if not 0 <= keep_depth < depth:
        raise UserError(f"--keep-depth must be in 0..{depth - 1} (the model's codes have {depth} depths; "
                        f"keeping all of them leaves nothing to generate), got {keep_depth}")
    region = region_mask(grid, inpaint) if inpaint else torch.ones(int(np.prod(grid)), dtype=torch.bool)
    kept = ~region.unsqueeze(-1) | (torch.arange(depth) < keep_depth)  # (L, D)
    if not region.any():
        raise UserError(f"--inpaint {inpaint} covers no position of a {list(grid)} grid: nothing to generate")
    if not kept.any():
        raise UserError(f"--inpaint {inpaint} covers every position of a {list(grid)} grid and --keep-depth is 0: "
                        f"nothing is kept (plain sampling needs no prompt)")
    return kept


def real_prompts(data, tok, n, split="test", data_dir=None):
    """The codes of n real items spread over `data`, to prompt with: a code cache folder (codes as they are), or
    images ('fashion_mnist' or an image folder, its `split`) encoded with the tokenizer.
    Returns (codes (n, L, D) int64, labels (n,) int64, images uint8 (n, H, W, C) or None for a cache)."""
    if os.path.isfile(os.path.join(data, "codes.npy")):
        codes, labels, _ = load_code_cache(data)
        idx = spread_indices(len(codes), n)
        x = torch.from_numpy(np.asarray(codes[idx]).astype(np.int64))
        return x.reshape(len(idx), -1, x.shape[-1]), torch.from_numpy(np.asarray(labels[idx]).astype(np.int64)), None
    if tok is None:
        raise UserError(f"prompts from the images of {data} need the tokenizer to encode them: pass --tokenizer")
    images, labels, _ = real_images(data, split, n, data_dir, tok.cfg.image_size)
    if images.shape[-1] != tok.cfg.channels:
        raise UserError(f"{data} images have {images.shape[-1]} channels; the tokenizer expects {tok.cfg.channels}")
    device = tok.scale.device
    codes = torch.cat([tok.encode(to_float(images[i:i + 256]).to(device)).cpu() for i in range(0, len(images), 256)])
    return codes.flatten(1, 2), torch.from_numpy(labels), images  # (n, L, D)


def complete_real_items(model, tok, data, n, inpaint=None, keep_depth=0, classes=None, batch_size=64, seed=0,
                        device=None, progress=False, data_dir=None, **sampler):
    """Prompted generation on real items: keep what `prompt_mask` says of the codes of n real items of `data`
    (`real_prompts`) and generate the rest, conditioned on the items' own labels (or on --classes).

    Returns a dict: codes (n, L, D) completions, real (n, L, D) the items' codes, given (n, L, D) bool the kept
    tokens, labels (n,) the items' labels, originals uint8 images (None for a code cache)."""
    c = model.config
    kept = prompt_mask(model.meta.get("grid", [c.length]), c.depth, inpaint, keep_depth)  # (L, D)
    if arch_of(model) == ARCH:  # it continues a prefix only: fail before reading any data
        model.check_prompt(kept.unsqueeze(0))
    real, labels, originals = real_prompts(data, tok, n, data_dir=data_dir)
    given = kept.expand(len(real), -1, -1)
    cond = class_labels(len(real), c.num_classes, classes) if classes else labels
    codes = generate_codes(model, cond, batch_size, seed, device, progress, prompt_codes=real, prompt_mask=given,
                           **sampler)
    return {"codes": codes, "real": real, "given": given, "labels": labels, "originals": originals}


def prompt_picture(originals, kept, completions, path):
    """One PNG: a row of originals, a row of what the prompt kept, a row of completions (one column each)."""
    save_grid(np.concatenate([originals, kept, completions]), path, nrow=len(originals))


def class_labels(n, num_classes, classes=None):
    """Class-balanced labels sorted by class (or --classes cycled to n; 'null' is the null class, num_classes:
    unconditional). Returns an int64 tensor (n,)."""
    if classes:
        try:
            base = [num_classes if c.strip() == "null" else int(c) for c in classes.split(",")]
        except ValueError:
            raise UserError(f"--classes must be comma-separated integers or 'null' (got {classes!r})")
        bad = [c for c in base if not 0 <= c <= num_classes]
        if bad:
            raise UserError(f"--classes {bad} outside 0..{num_classes - 1} (or null)")
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
    p = argparse.ArgumentParser(description="Sample a PNG grid (and an ADM-style .npz, or the codes) from a ResGen "
                                            "checkpoint; with --inpaint / --keep-depth, complete real items' codes.")
    p.add_argument("--ckpt", default="runs/resgen/last.pt", help="a ResGen or RQ-Transformer checkpoint (train.py)")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the one named in the checkpoint)")
    p.add_argument("--n", type=int, default=64, help="number of samples (prompted: of real items, one completion each)")
    p.add_argument("--out", default=None, help="the PNG (default samples.png; none when only --codes-out is given)")
    p.add_argument("--npz", default=None, help="also write uint8 arr_0 (N, H, W, 3) for the ADM evaluator")
    p.add_argument("--codes-out", default=None,
                   help="write the generated codes, uint16 (N, h, w, D) or (N, L, D) .npy (needs no decoder)")
    p.add_argument("--data", default=None, help="prompted: the real items, 'fashion_mnist' or an image folder (its "
                   "test split), or a code cache (default: the data the checkpoint was trained on)")
    add_sampler_args(p)
    args = p.parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n must be >= 1 (got {args.n})")
    kwargs = sampler_kwargs(args)
    device = parse_device(args.device)
    out = args.out or (None if args.codes_out else "samples.png")
    if args.codes_out and not args.codes_out.endswith(".npy"):
        raise UserError(f"--codes-out must name a .npy file (got {args.codes_out})")
    for path in filter(None, (out, args.npz, args.codes_out)):
        check_writable_dir(os.path.dirname(os.path.abspath(path)))
    model, tok = load_for_sampling(args.ckpt, args.tokenizer, device, decoder=bool(out or args.npz),
                                   compile=args.compile)
    grid, D = model.meta.get("grid", [model.config.length]), model.config.depth
    prompted = args.inpaint is not None or args.keep_depth != 0
    t0 = time.time()
    settings = sampler_settings(model, kwargs)
    if prompted:
        prompt_mask(grid, D, args.inpaint, args.keep_depth)  # bad flags fail before any data is read
        data = args.data or model.meta.get("data")
        if not data:
            raise UserError(f"--inpaint / --keep-depth prompt with real items: {args.ckpt} names no data, pass --data")
        done = complete_real_items(model, tok, data, args.n, args.inpaint, args.keep_depth, args.classes,
                                   args.batch_size, args.seed, device, True, **kwargs)
        codes, truth = done["codes"], done["labels"]
    else:
        labels = class_labels(args.n, model.config.num_classes, args.classes)
        codes = generate_codes(model, labels, args.batch_size, args.seed, device, True, **kwargs)
        truth = labels if int(labels.max()) < model.config.num_classes else None  # the null class has none
    images = decode_codes(tok, codes, args.batch_size) if tok is not None and (out or args.npz) else None
    dt = time.time() - t0
    what = f"{len(codes)} {'completions' if prompted else 'samples'} in {dt:.1f} s ({len(codes) / dt:.2f}/s)"
    settings = (f"step {model.step}, " + ", ".join(f"{k}={v}" for k, v in settings.items())
                + f", {passes_text(forward_passes(model, settings))} per batch")
    if out and prompted:
        real = done["real"]
        originals = done["originals"] if done["originals"] is not None else decode_codes(tok, real, args.batch_size)
        prompt_picture(originals, decode_codes(tok, real, args.batch_size, given=done["given"]), images, out)
        print(f"wrote {out} (rows: originals, kept, completions): {what}, {settings}")
    elif out:
        cells, per_row = grid_by_class(images, labels)
        save_grid(cells, out, nrow=per_row)
        print(f"wrote {out}: {what}, {settings}")
    if args.npz:
        rgb = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)
        tmp = args.npz + ".tmp.npz"
        # arr_1: the class each image should show, as in ADM's class-conditional files (a prompt's: its item's)
        np.savez(tmp, arr_0=rgb, **({} if truth is None else {"arr_1": truth.numpy()}))
        os.replace(tmp, args.npz if args.npz.endswith(".npz") else args.npz + ".npz")
        print(f"wrote {args.npz}: arr_0 {rgb.shape} uint8" + ("" if truth is None else ", arr_1 labels"))
    if args.codes_out:
        save_npy(args.codes_out, codes.view(len(codes), *grid, D).numpy(), np.uint16)
        print(f"wrote {args.codes_out}: uint16 {(len(codes), *grid, D)} codes: {what}, {settings}")


if __name__ == "__main__":
    run_cli(main)
