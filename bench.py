"""
Speed and memory benchmarks for ResGen (PAPER.md §1, §6, §12, §13). Not tests: nothing here
asserts a speed. It prints one table and appends one JSON line per measurement to --json-out.

    # CPU, under a minute (every row, `tiny` model, fewer repeats)
    python bench.py --quick --threads 1
    # CPU, the figures in BENCHMARKS.md (about 4 minutes on one thread)
    python bench.py --only cpu --threads 1
    # 1 GPU: the xl rows (sampling throughput and MFU, outside-transformer share, training MFU, max batch)
    python bench.py --only cuda
    # 1 GPU, every GPU row with eager vs compiled (make bench-gpu: at most 8 minutes)
    python bench.py --only cuda --compile
    # only row 8 (ResGen against the RQ-Transformer), CPU or GPU
    python bench.py --only cpu --rows versus --threads 1
    # the same at the batch RESULTS' evaluations sample at (100 images, 200 rows per pass with CFG)
    python bench.py --only cpu --rows versus --threads 1 --batch 100

What it measures, each as a ratio or a share inside one run, so machine noise cancels:
  1. depth decoupling: sampling time at D = 4, 8, 16 (same L, width, layers, steps, batch), MoG and token head;
  2. where sampling time goes: the share of generate() spent outside the transformer forward pass;
  3. training throughput: steps/s, tokens/s (tokens = B·L·D) and, on CUDA, model FLOP utilisation (MFU);
  4. sampling throughput on CUDA (xl, D = 16, T = 64, CFG, bf16, batch 256): images/s and MFU;
  5. the largest sampling batch of xl on one GPU (predicted from two small batches' peak memory, then bisected);
  6. with --compile, eager vs compiled: torch.compile(model) for training (train.py --compile), ResGen.compile_sampler
     for sampling (rows 1, 2 and 4);
  7. re-quantization alone (resgen.requantize), eager vs torch.compile, at the shapes rows 1, 2 and 4 run;
  8. the paper's Table 2 in small: sampling time of ResGen (MoG and token heads, T passes) and of the
     RQ-Transformer (rqtransformer.py: L spatial + L·D depth passes) at matched parameters, D = 4, 8, 16 at the same
     L, batch and hardware, and the same at L = 16, 64, 144 (D = 4): how each grows with D and with L.
Repeats are interleaved (round-robin over the settings being compared) and the best time is reported, so a
burst of load from another process hits every setting alike. Every model has random weights and random
codebooks, with a trained-like σ and codebook scale (SAMPLE_LOG_SIGMA: on the CPU the sampler's cost depends on
them). Rows that need CUDA print "not measured (no CUDA)" on a machine without it.
"""
import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

import resgen
import rqtransformer
from checkpoints import UserError, check_writable_dir, file_hash, run_cli
from resgen import ResGen, make_config
from train import step_noise, update_ema


#################################################################################
#                           Settings of every row                               #
#################################################################################

# The codes each row runs on (L = 64, an 8x8 grid, everywhere):
# - the Fashion-MNIST demo codes of tokenizer.CONFIGS["fmnist"] (c = 16, V = 256, D = 4) for the CPU rows;
# - ImageNet-like codes for xl: D = 16 as the paper's ResGen-d16, V = 4096 and c = 16 (the paper does not
#   state V and c; these are this bench's choice and set the re-quantization cost, O(D·V·c) per position).
FMNIST_CODES = dict(length=64, depth=4, codebook_size=256, code_dim=16, num_classes=10)
IMAGENET_CODES = dict(length=64, depth=16, codebook_size=4096, code_dim=16, num_classes=1000)
DEPTHS = (4, 8, 16)         # row 1
DEPTH_CODEBOOKS = (256, 4096)  # row 1 at both codebook sizes: the MoG head's only D-dependent cost scales with V
NARROW = dict(width=128, layers=4, heads=4)  # row 1 also on a narrow model at B = 64: a cheap transformer shows
NARROW_BATCH = 64                            # the D-dependent cost first
CFG_SCALE = 2.0             # any w != 1 turns guidance on (2B rows per pass); the cost does not depend on w
# Random weights stand in for a trained model, but on the CPU the sampler's cost depends on two values: torch.exp
# takes a slow path (10-25x) when its result underflows, which re-quantization's confidence hits once the
# sampled σ is small against the code distances. So the random model is given trained-like values:
SAMPLE_LOG_SIGMA = -2.0     # MoG log-scale bias: the demo model (small, 1200 steps on Fashion-MNIST codes)
                            # samples log σ with median -2.2 (10%-90%: -3.7 to -1.1)
CODEBOOK_RMS_DECAY = 2.0    # codebook j has rms 1 / (1 + 2j) per dimension in scaled units, like a trained RVQ
                            # (demo, D = 4: 0.94, 0.25, 0.15, 0.11; a D = 16 tokenizer: 1.02, 0.34, 0.21, ..., 0.027)
DECODE_CHUNK = 64           # images decoded at once: 256x256 activations of a 128-channel decoder are large
MAX_BATCH_STEPS = 2         # every sampling step has the same shapes, so 2 steps reach the peak memory of 64
MAX_BATCH_LIMIT = 1 << 17   # never try more
MAX_BATCH_PROBES = (256, 512)  # two batches that fit: peak memory is affine in B, so they predict the largest
MAX_BATCH_GROWTH = 1.125    # from the prediction, step by this factor until the outcome flips, then bisect


@dataclass
class Plan:
    """How big and how often, per device and mode (--quick: a smoke run of every row)."""
    size: str          # model size for the sampling and training rows
    batch: int         # sampling batch B (2B rows per pass with CFG)
    steps: int         # sampling steps T
    repeats: int       # interleaved repeats; the best is reported
    train_batch: int
    train_steps: int   # timed optimiser steps per repeat
    bisect_tol: float  # max-batch search stops when hi - lo <= tol·lo
    versus_steps: int = 16                 # row 8: ResGen's T (the sampler's default, RESULTS' setting)
    versus_lengths: tuple = (16, 64, 144)  # row 8: L for the growth with L (square grids 4x4, 8x8, 12x12)


PLANS = {
    ("cpu", False): Plan("small", batch=8, steps=8, repeats=5, train_batch=32, train_steps=3, bisect_tol=0.0),
    ("cpu", True): Plan("tiny", batch=4, steps=4, repeats=2, train_batch=8, train_steps=2, bisect_tol=0.0,
                        versus_steps=4, versus_lengths=(16, 64)),
    ("cuda", False): Plan("xl", batch=256, steps=64, repeats=2, train_batch=256, train_steps=10, bisect_tol=1 / 32),
    ("cuda", True): Plan("xl", batch=32, steps=8, repeats=2, train_batch=32, train_steps=3, bisect_tol=1 / 4,
                         versus_steps=4, versus_lengths=(16, 64)),
}

# Dense bf16 tensor-core peak in TFLOP/s, from the vendors' data sheets (no sparsity). The first substring of
# torch.cuda.get_device_name() that matches wins, so the specific names come before the general ones.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.4),   # also GH200
    ("H100", 989.4),   # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]


#################################################################################
#                                 Model FLOPs                                   #
#################################################################################

def head_params(config, components=None):
    """Multiply-adds per position of the head. MoG: its gated-MLP blocks (3C² each), K = V·M logits, the shift (c)
    and log-scale (1), and the offsets of `components` components per position, w·C each (w = r or c) plus c·r for
    the low-rank lift (MoGHead.component_offsets gathers only those): the data's code's M in training, the drawn one
    in sampling, all K (None) for the weights the model holds. Tokens: D·V logits."""
    C, c, r = config.width, config.code_dim, config.offset_rank
    K = config.codebook_size * config.components_per_code
    if config.head != "mog":
        return C * config.depth * config.codebook_size
    used = K if components is None else components
    return config.head_layers * 3 * C * C + C * K + C * c + C + used * ((r or c) * C + c * r)


def matmul_params(config, components=None):
    """Weights of the matmuls, from the config: (applied per position, applied once per sequence).

    Per position: input projection c·C, per block qkv 3C² + attention output C² + MLP 2·mlp_ratio·C², and the
    head (head_params, with `components` of its offsets). Per sequence: the adaLN modulation (6C² per block and 2C²
    at the output) reads only the class embedding. Embedding tables are lookups, biases are adds: neither counted.
    """
    C, c, layers = config.width, config.code_dim, config.layers
    hidden = int(C * config.mlp_ratio)
    block = 3 * C * C + C * C + 2 * C * hidden
    return c * C + layers * block + head_params(config, components), layers * 6 * C * C + 2 * C * C


def forward_flops(config, sequences, sampling=False):
    """Model FLOPs of one forward pass over `sequences` sequences of L positions (sampling: the MoG head computes
    only the drawn component's mean).

    2 FLOPs per multiply-add of every matmul weight, per position (the transformer runs on L positions, not on
    the L·D tokens) or per sequence (adaLN), plus attention's QKᵀ and AV: 4·layers·L²·C per sequence.
    Training = 3x forward (the backward pass is 2x), i.e. 6·N·positions + 12·layers·L²·C per sequence.
    The sampler's re-quantization and selection are not model FLOPs.
    """
    L = config.length
    per_position, per_sequence = matmul_params(config, 1 if sampling else getattr(config, "components_per_code", 1))
    return sequences * (2 * (per_position * L + per_sequence) + 4 * config.layers * L * L * config.width)


def check_flop_count(model):
    """The FLOP count is written from the config; fail loudly if resgen.py's layers no longer match it (the
    linear layers' weights and the low-rank lift, against the count with every component's offsets)."""
    counted = sum(matmul_params(model.config))
    lift = getattr(model.head, "lift", None)
    actual = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) + \
        (lift.numel() if lift is not None else 0)
    if counted != actual:
        raise RuntimeError(f"bench.matmul_params counts {counted} matmul weights, the model has {actual}: "
                           "update matmul_params to the model in resgen.py")


def peak_tflops(device):
    """Dense bf16 peak of a CUDA device from PEAK_BF16_TFLOPS, or None when unknown (then MFU is not reported)."""
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def mfu(flops, seconds, device):
    peak = peak_tflops(device)
    return None if peak is None else flops / seconds / (peak * 1e12)


#################################################################################
#                                   Timing                                      #
#################################################################################

def sync(device):
    """CUDA kernels run asynchronously: a timer must wait for them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns, repeats, device, warmup=True):
    """Time every callable in `fns` (name -> fn) `repeats` times, round-robin, after one untimed warm-up call each
    (allocator, thread pools, compilation). Returns name -> list of seconds."""
    if warmup:
        for fn in fns.values():
            fn()
    times = defaultdict(list)
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def summary(seconds):
    return {"best_s": min(seconds), "median_s": statistics.median(seconds), "all_s": [round(s, 5) for s in seconds]}


#################################################################################
#                              Models and workloads                             #
#################################################################################

def trained_like_codebooks(depth, codebook_size, code_dim, generator=None):
    """Random codebooks (D, V, c) in scaled units with a trained RVQ's spread: depth j has rms 1 / (1 + 2j)."""
    rms = 1.0 / (1.0 + CODEBOOK_RMS_DECAY * torch.arange(depth))  # (D,)
    return rms[:, None, None] * torch.randn(depth, codebook_size, code_dim, generator=generator)


def build(size, codes, device, head="mog", seed=0, compiled=False, **overrides):
    """ResGen with random weights, random codebooks (D, V, c) in scaled units and a trained-like σ, in eval mode;
    compiled: with ResGen.compile_sampler. overrides: ResGenConfig fields (NARROW)."""
    torch.manual_seed(seed)
    config = make_config(size, head=head, **codes, **overrides)
    with torch.device(device):  # initialise on the device: xl's 574M parameters are slow to init on a CPU
        model = ResGen(config, trained_like_codebooks(config.depth, config.codebook_size, config.code_dim))
    if head == "mog":  # the per-position log-scale s starts at 0 (MoGHead.initialize); give it a trained value
        with torch.no_grad():
            model.head.log_scale.bias.fill_(SAMPLE_LOG_SIGMA)
    check_flop_count(model)
    return model.eval().compile_sampler() if compiled else model.eval()


def build_rq(size, codes, device, seed=0):
    """RQ-Transformer (rqtransformer.py) of a named size with random weights and the same random codebooks as
    `build`, in eval mode. Its sampling cost depends on the shapes only (no σ: it samples codes from logits)."""
    torch.manual_seed(seed)
    config = rqtransformer.make_config(size, **codes)
    with torch.device(device):
        return rqtransformer.RQTransformer(config, trained_like_codebooks(config.depth, config.codebook_size,
                                                                          config.code_dim)).eval()


def labels_for(model, batch, device):
    return torch.arange(batch, device=device) % model.config.num_classes


def sampling_fn(model, batch, steps, device, seed=0):
    """One full generate() with guidance on; the same seed every call, so every repeat does the same work. An
    RQ-Transformer ignores `steps` (its L + L·D steps are fixed)."""
    labels = labels_for(model, batch, device)

    def run():
        g = torch.Generator(device=device).manual_seed(seed)
        return model.generate(labels, steps=steps, cfg=CFG_SCALE, generator=g)
    return run


def backbone_fn(model, batch, steps, device):
    """T backbone calls (transformer and the head's features) on the shapes generate() feeds it: 2B rows under
    CFG, inside the same bf16 autocast. The time of generate() minus this is the time outside the transformer."""
    L, D, c = model.config.length, model.config.depth, model.config.code_dim
    rows = 2 * batch
    visible = torch.randn(rows, L, c, device=device)
    num_masked = torch.randint(0, D + 1, (rows, L), device=device)
    labels = labels_for(model, rows, device)

    @torch.no_grad()
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for _ in range(steps):
                torch.compiler.cudagraph_mark_step_begin()  # as generate() does at every step
                model.backbone(visible, num_masked, labels)
    return run


def train_fn(model, batch, device, forward=None):
    """One optimiser step as train.py takes it: forward masks and label drops from train.step_noise, bf16 autocast
    on CUDA, AdamW (fused on CUDA), gradient clipping, EMA by train.update_ema. Codes are random and already on
    the device: train.py's memory-mapped read is not timed. forward: the loss function (default: the model;
    torch.compile(model), as train.py --compile runs it)."""
    forward = model if forward is None else forward
    config = model.config
    model.train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02,
                            fused=device.type == "cuda")
    noise_args = SimpleNamespace(seed=0, batch_size=batch)
    codes = torch.randint(0, config.codebook_size, (batch, config.length, config.depth), device=device)
    labels = labels_for(model, batch, device)
    step = [0]

    def run():
        mask, drop = step_noise(step[0], noise_args, config, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = forward(codes, labels, mask=mask, drop=drop)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9999)
        step[0] += 1
    return run


def repeat(fn, n):
    def run():
        for _ in range(n):
            fn()
    return run


@contextlib.contextmanager
def component_timers(model, device):
    """Wall-clock time per sampler component, by wrapping the functions generate() calls (resgen.py unchanged):
    the backbone, the head's features (its MLP blocks, inside the backbone), the head's sampler, re-quantization
    (the MoG head's `requantize`) and the input embeddings (`cumulative_embeddings`). Yields name -> seconds.
    Each wrapper synchronises on CUDA, which slows the run a little: the share row does not use these timers."""
    totals = defaultdict(float)

    def wrap(name, fn):
        def run(*args, **kwargs):
            sync(device)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            totals[name] += time.perf_counter() - t
            return out
        return run

    head = model.head
    saved = resgen.cumulative_embeddings, model.__dict__.get("backbone"), head.__dict__.get("requantize")
    resgen.cumulative_embeddings = wrap("inputs", resgen.cumulative_embeddings)
    model.backbone = wrap("backbone", model.backbone)
    head.forward = wrap("head_features", head.forward)
    head.sample = wrap("head_sample", head.sample)
    if hasattr(head, "requantize"):
        head.requantize = wrap("requantize", head.requantize)
    try:
        yield totals
    finally:
        resgen.cumulative_embeddings = saved[0]
        for obj, name, before in ((model, "backbone", saved[1]), (head, "requantize", saved[2])):
            obj.__dict__.pop(name, None)
            if before is not None:  # a compiled version that was in place before
                setattr(obj, name, before)
        del head.forward, head.sample


#################################################################################
#                                 Measurements                                  #
#################################################################################

def bench_depth(plan, head, codebook_size, device, batch, compiled=False, **overrides):
    """Row 1: depth decoupling. Sampling time at D = 4, 8, 16 with everything else equal (L, width, layers, T, B).
    The MoG head's output size does not depend on D (only re-quantization does, through a loop over depths);
    the token head's output is D·V logits per position."""
    models = {D: build(plan.size, {**FMNIST_CODES, "depth": D, "codebook_size": codebook_size}, device, head=head,
                       compiled=compiled, **overrides) for D in DEPTHS}
    times = interleaved({D: sampling_fn(m, batch, plan.steps, device) for D, m in models.items()},
                        plan.repeats, device)
    return {D: summary(t) for D, t in times.items()}


VERSUS_MODELS = ("mog", "tokens", "rq")  # row 8: ResGen with either head, and the RQ-Transformer


def build_versus(name, size, codes, device):
    return build_rq(size, codes, device) if name == "rq" else build(size, codes, device, head=name)


def bench_versus(plan, device, size, codes, batch, settings, names=VERSUS_MODELS):
    """Row 8: sampling time of ResGen (MoG, tokens: T = plan.versus_steps passes) and the RQ-Transformer (L spatial +
    L·D depth passes), same size, batch, CFG and codes; settings: code-set overrides, one model each, e.g.
    [{"depth": 4}, {"depth": 16}]; every model of every setting timed interleaved in one process.
    Returns {(name, i): summary} for settings[i]."""
    models = {(name, i): build_versus(name, size, {**codes, **over}, device)
              for i, over in enumerate(settings) for name in names}
    times = interleaved({k: sampling_fn(m, batch, plan.versus_steps, device) for k, m in models.items()},
                        plan.repeats, device)
    return {k: summary(t) for k, t in times.items()}


def bench_share(model, plan, device, split=True):
    """Row 2: share of generate() outside the transformer forward pass = 1 - (T backbone calls) / generate(),
    both timed interleaved on the same shapes. Then one instrumented run splits the sampler by component (not for
    a compiled model: its timers would sit inside the compiled graph)."""
    run = sampling_fn(model, plan.batch, plan.steps, device)
    times = interleaved({"generate": run, "backbone": backbone_fn(model, plan.batch, plan.steps, device)},
                        plan.repeats, device)
    gen = min(times["generate"])
    share = 1.0 - min(times["backbone"]) / gen
    out = {"share_outside": share, "generate_s": gen, "backbone_s": min(times["backbone"])}
    if not split:
        return out
    with component_timers(model, device) as parts:
        total = timed(run, device)
    parts = dict(parts)
    split = {
        "backbone": parts["backbone"] - parts["head_features"],
        "head_features": parts["head_features"],  # the MoG head's MLP blocks (the token head: its linear map)
        "requantize": parts.get("requantize", 0.0),
        "head_sample_other": parts["head_sample"] - parts.get("requantize", 0.0),  # projections, pick, draw
        "inputs": parts["inputs"],
        "rest": total - parts["backbone"] - parts["head_sample"] - parts["inputs"],  # CFG, confidence, selection
    }
    return {**out, "split_frac": {k: v / total for k, v in split.items()}, "instrumented_total_s": total}


def bench_train(model, plan, device, compiled=False):
    """Row 3 (and 6): steps/s of train_fn; with `compiled`, eager and torch.compile(model) (train.py --compile)
    blocks interleaved on the same weights."""
    fns = {"eager": repeat(train_fn(model, plan.train_batch, device), plan.train_steps)}
    if compiled:
        step = train_fn(model, plan.train_batch, device, forward=torch.compile(model))
        fns["compiled"] = repeat(step, plan.train_steps)
    times = interleaved(fns, plan.repeats, device)
    c = model.config
    out = {}
    for name, t in times.items():
        rate = plan.train_steps / min(t)
        flops = 3 * forward_flops(c, plan.train_batch)  # per step
        out[name] = {"steps_per_s": rate, "tokens_per_s": rate * plan.train_batch * c.length * c.depth,
                     "model_tflops": flops * rate / 1e12,
                     "mfu": mfu(flops, 1 / rate, device) if device.type == "cuda" else None,
                     **summary(t)}
    return out


def bench_sampling(models, plan, device):
    """Row 4 (and 6): images/s of generate() (codes only), MFU of its T forward passes; models: name -> model
    ("eager", and "compiled" with ResGen.compile_sampler, same weights), timed interleaved."""
    times = interleaved({name: sampling_fn(m, plan.batch, plan.steps, device) for name, m in models.items()},
                        plan.repeats, device)
    model = models["eager"]
    flops = plan.steps * forward_flops(model.config, 2 * plan.batch, sampling=True)
    out = {name: {"images_per_s": plan.batch / min(t), "mfu": mfu(flops, min(t), device), **summary(t)}
           for name, t in times.items()}
    return out


def bench_decode(codes, device, repeats):
    """Row 4, decoder included: the imagenet256 tokenizer's decoder (random weights) on the sampled codes, bf16."""
    import tokenizer
    with torch.device(device):
        tok = tokenizer.Tokenizer(tokenizer.TokenizerConfig(**tokenizer.CONFIGS["imagenet256"])).eval()
    grid = int(round(codes.shape[1] ** 0.5))
    codes = codes.view(codes.shape[0], grid, grid, codes.shape[2])

    @torch.no_grad()
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for i in range(0, codes.shape[0], DECODE_CHUNK):
                tok.decode(codes[i:i + DECODE_CHUNK])
    return summary(interleaved({"decode": run}, repeats, device)["decode"])


def bench_requantize(shapes, device, repeats, compiled):
    """Row 7: one resgen.requantize call (all D depths) on random codebooks with the bench's trained-like scales,
    eager and (compiled) torch.compile'd, interleaved. shapes: [(positions, D, V)]. Checks that both pick the
    same codes. Returns a list of dicts."""
    fast = torch.compile(resgen.requantize, dynamic=False) if compiled else None
    out = []
    for positions, D, V in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        with torch.device(device):
            cb = trained_like_codebooks(D, V, FMNIST_CODES["code_dim"], generator=g)
        z = torch.randn(1, positions, cb.shape[-1], generator=g, device=device)
        start = torch.randint(0, D + 1, (1, positions), generator=g, device=device)
        log_scale = torch.full((1, positions), SAMPLE_LOG_SIGMA, device=device)
        fns = {"eager": lambda: resgen.requantize(z, start, cb, log_scale)}
        if fast is not None:
            fns["compiled"] = lambda: fast(z, start, cb, log_scale)
        times = interleaved(fns, repeats, device)
        row = {"positions": positions, "depth": D, "codebook_size": V, **{k: summary(t) for k, t in times.items()}}
        if fast is not None:
            a, b = resgen.requantize(z, start, cb, log_scale)[0], fast(z, start, cb, log_scale)[0]
            row["same_codes"] = float((a == b).float().mean())
        out.append(row)
    return out


def largest(fits, guess, limit, tol, growth=MAX_BATCH_GROWTH):
    """Largest b in [1, limit] with fits(b), for a monotone fits: from `guess`, step up while it fits or down while
    it fails, by `growth` and then by its square, its fourth power, ... (a good guess costs a few tries, a bad one
    only a logarithm), until the outcome flips; then bisect until hi - lo <= max(1, tol·lo).
    Returns (lo, hi): lo fits (0: nothing does), hi fails (None: limit reached)."""
    lo, hi, b, step = 0, None, max(1, min(int(guess), limit)), growth
    while True:
        if fits(b):
            lo = b
            if hi is not None or b >= limit:
                break
            b = min(limit, max(b + 1, int(b * step)))
        else:
            hi = b
            if lo or b == 1:
                break
            b = max(1, min(b - 1, int(b / step)))
        step *= step
    if hi is None:
        return lo, None
    while hi - lo > max(1, int(tol * lo)):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi


def is_oom(e):
    """CUDA memory exhaustion: the allocator's error, or a library (cuBLAS, cuDNN) failing to allocate."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "ALLOC_FAILED" in str(e))


def predicted_batch(peaks, capacity):
    """The batch whose peak memory reaches `capacity`, from peak memory at two batches (peak = base + slope·B)."""
    (b1, p1), (b2, p2) = sorted(peaks.items())[:2]
    slope = (p2 - p1) / (b2 - b1)
    return b2 if slope <= 0 else b2 + (capacity - p2) / slope


def bench_max_batch(model, plan, device):
    """Row 5: the largest xl sampling batch (CFG on) that runs without running out of GPU memory. Two small
    batches give the memory per latent; the search starts at the batch that predicts to fill the GPU."""
    peaks, tries, t0 = {}, [], time.perf_counter()

    def fits(b):
        torch.cuda.reset_peak_memory_stats(device)
        try:
            sampling_fn(model, b, MAX_BATCH_STEPS, device)()
            sync(device)
            ok = True
        except Exception as e:
            if not is_oom(e):
                raise
            ok = False
        # outside the except block: the traceback's frames hold the failed step's tensors until it ends
        gc.collect()
        torch.cuda.empty_cache()
        if ok:
            peaks[b] = torch.cuda.max_memory_allocated(device)
        tries.append((b, ok))
        print(f"  max batch search: B = {b} {'fits' if ok else 'out of memory'}", file=sys.stderr, flush=True)
        return ok

    props = torch.cuda.get_device_properties(device)
    # the probes that fit predict the start; if one fails, the search starts below it
    guess = predicted_batch(peaks, props.total_memory) if all(fits(b) for b in MAX_BATCH_PROBES) else None
    lo, hi = largest(fits, guess or min(b for b, ok in tries if not ok) - 1, MAX_BATCH_LIMIT, plan.bisect_tol)
    return {"max_batch": lo, "first_failing": hi, "peak_bytes_at_max": peaks.get(lo),
            "predicted": None if guess is None else int(guess), "tries": tries,
            "search_s": time.perf_counter() - t0, "device_name": props.name, "device_bytes": props.total_memory}


#################################################################################
#                                   Report                                      #
#################################################################################

NO_CUDA = "not measured (no CUDA)"


class Report:
    """The printed table (one row per figure) and the JSON lines (one per measurement)."""

    def __init__(self, json_out, context):
        self.rows, self.json_out, self.context, self.failed = [], json_out, context, False

    def row(self, number, measurement, setting, result, target="", how=""):
        self.rows.append((str(number), measurement, setting, result, target, how))

    def record(self, bench, **fields):
        line = {"bench": bench, **fields, **self.context}
        with open(self.json_out, "a") as f:
            f.write(json.dumps(line, default=float) + "\n")

    @contextlib.contextmanager
    def guard(self, number, measurement):
        """A failing row (say, an untested CUDA path) is reported and the other rows still run."""
        try:
            yield
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:
            traceback.print_exc()
            self.failed = True
            self.row(number, measurement, "", f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")

    def print(self):
        header = ("#", "measurement", "setting", "result", "target", "how")
        widths = [max(len(r[i]) for r in self.rows + [header]) for i in range(len(header))]
        fmt = lambda r: "| " + " | ".join(s.ljust(w) for s, w in zip(r, widths)) + " |"
        print(fmt(header))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in self.rows:
            print(fmt(r))


def machine():
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "resgen_py": file_hash(resgen.__file__),  # the numbers belong to this version of the model code
            "rqtransformer_py": file_hash(rqtransformer.__file__)}


def describe(size, codes, batch, steps):
    return (f"{size}, L={codes['length']} D={codes['depth']} V={codes['codebook_size']} c={codes['code_dim']}, "
            f"B={batch} T={steps} cfg={CFG_SCALE}")


def split_text(split):
    names = {"backbone": "transformer", "head_features": "head MLP", "requantize": "requantize",
             "head_sample_other": "head projections+pick+draw",
             "inputs": "inputs", "rest": "CFG+confidence+selection"}
    return ", ".join(f"{names[k]} {v:.1%}" for k, v in split.items())


#################################################################################
#                                     Rows                                      #
#################################################################################

def row_depth(report, plan, head, codebook_size, narrow=False, compiled=False):
    cpu = torch.device("cpu")
    batch, overrides = (NARROW_BATCH, NARROW) if narrow else (plan.batch, {})
    res = bench_depth(plan, head, codebook_size, cpu, batch, compiled, **overrides)
    ratio = res[16]["best_s"] / res[4]["best_s"]
    model = "narrow (" + ", ".join(f"{k} {v}" for k, v in NARROW.items()) + ")" if narrow else plan.size
    report.record("depth", device="cpu", head=head, size=model, codebook_size=codebook_size, batch=batch,
                  steps=plan.steps, compiled=compiled, ratio_16_4=ratio, times={str(D): r for D, r in res.items()})
    target = "(ablation)" if head == "tokens" else "<= 1.25" if codebook_size > 256 else "<= 1.10"
    report.row(1 if not compiled else 6, f"depth decoupling, {head} head" + (", compiled sampler" if compiled else ""),
               f"{model}, L={FMNIST_CODES['length']} V={codebook_size} c={FMNIST_CODES['code_dim']}, B={batch} "
               f"T={plan.steps} cfg={CFG_SCALE}, cpu",
               ", ".join(f"D={D} {r['best_s']:.2f}s" for D, r in res.items()) + f"; D16/D4 = {ratio:.2f}",
               target, f"best of {plan.repeats}, interleaved")


def row_share_cpu(report, plan, codes, compiled=False):
    cpu = torch.device("cpu")
    res = bench_share(build(plan.size, codes, cpu, compiled=compiled), plan, cpu, split=not compiled)
    report.record("share", device="cpu", size=plan.size, batch=plan.batch, steps=plan.steps, compiled=compiled,
                  **codes, **res)
    split = f"; split: {split_text(res['split_frac'])}" if "split_frac" in res else ""
    report.row(2 if not compiled else 6, "outside-transformer share" + (", compiled sampler" if compiled else ""),
               describe(plan.size, codes, plan.batch, plan.steps) + ", cpu",
               f"{res['share_outside']:.1%} (generate {res['generate_s']:.2f}s, {plan.steps} backbone calls "
               f"{res['backbone_s']:.2f}s){split}", "<= 10%",
               f"1 - T backbone calls / generate(), best of {plan.repeats}, interleaved; split: one run, wrapped functions")


def row_requantize(report, plan, device, shapes, compiled):
    res = bench_requantize(shapes, device, plan.repeats, compiled)
    for r in res:
        report.record("requantize", device=device.type, **r)
        setting = f"{r['positions']} positions, D={r['depth']} V={r['codebook_size']} c={FMNIST_CODES['code_dim']}, {device.type}"
        text = f"eager {r['eager']['best_s'] * 1e3:.1f} ms"
        if "compiled" in r:
            text += (f", compiled {r['compiled']['best_s'] * 1e3:.1f} ms ({r['eager']['best_s'] / r['compiled']['best_s']:.2f}x;"
                     f" same codes {r['same_codes']:.1%})")
        report.row(7, "re-quantization, one call (all depths)", setting, text, "", f"best of {plan.repeats}, interleaved")


def row_train(report, plan, device, codes, compile_):
    model = build(plan.size, codes, device)
    res = bench_train(model, plan, device, compile_)
    report.record("train", device=device.type, size=plan.size, batch=plan.train_batch, **codes, **res)
    cuda = device.type == "cuda"
    setting = (f"{plan.size}, L={codes['length']} D={codes['depth']} V={codes['codebook_size']} c={codes['code_dim']}, "
               f"B={plan.train_batch}, " + (f"bf16, {torch.cuda.get_device_name(device)}" if cuda else "fp32, cpu"))
    for name, r in res.items():
        speed = f"{r['model_tflops']:.0f} model TFLOP/s, MFU {fmt_frac(r['mfu'])}" if cuda else \
            f"{r['model_tflops'] * 1e3:.1f} model GFLOP/s"
        report.row(3 if name == "eager" else 6, f"training throughput ({name})", setting,
                   f"{r['steps_per_s']:.2f} steps/s, {r['tokens_per_s']:,.0f} tokens/s (B·L·D), {speed}", "",
                   f"{plan.train_steps} steps per block, best of {plan.repeats}")
    if "compiled" in res:
        report.row(6, "torch.compile speed-up, training", setting,
                   f"{res['compiled']['steps_per_s'] / res['eager']['steps_per_s']:.2f}x")


def row_sampling_cuda(report, plan, device, compile_):
    """Rows 4 and 2 on the same xl model."""
    models = {"eager": build(plan.size, IMAGENET_CODES, device)}
    if compile_:
        models["compiled"] = build(plan.size, IMAGENET_CODES, device, compiled=True)
    res = bench_sampling(models, plan, device)
    model = models["eager"]
    codes = sampling_fn(model, plan.batch, plan.steps, device)()
    dec = bench_decode(codes, device, plan.repeats)
    del codes
    report.record("sampling", device="cuda", size=plan.size, batch=plan.batch, steps=plan.steps, **IMAGENET_CODES,
                  **res, decode=dec)
    setting = describe(plan.size, IMAGENET_CODES, plan.batch, plan.steps) + f", bf16, {torch.cuda.get_device_name(device)}"
    for name, r in res.items():
        with_decoder = plan.batch / (r["best_s"] + dec["best_s"])
        report.row(4 if name == "eager" else 6, f"sampling throughput ({name})", setting,
                   f"{r['images_per_s']:.1f} images/s codes only, {with_decoder:.1f} images/s with the imagenet256 "
                   f"decoder (random weights); MFU {fmt_frac(r['mfu'])}", "",
                   f"best of {plan.repeats}, interleaved; decoder timed apart in chunks of {DECODE_CHUNK}")
    if "compiled" in res:
        report.row(6, "torch.compile speed-up, sampling", setting,
                   f"{res['compiled']['images_per_s'] / res['eager']['images_per_s']:.2f}x")
    share = bench_share(model, plan, device)
    report.record("share", device="cuda", size=plan.size, batch=plan.batch, steps=plan.steps, **IMAGENET_CODES, **share)
    report.row(2, "outside-transformer share, xl", setting,
               f"{share['share_outside']:.1%}; split (synchronised per call): {split_text(share['split_frac'])}", "",
               f"1 - T backbone calls / generate(), best of {plan.repeats}, interleaved")
    if compile_:
        share = bench_share(models["compiled"], plan, device, split=False)
        report.record("share", device="cuda", size=plan.size, batch=plan.batch, steps=plan.steps, compiled=True,
                      **IMAGENET_CODES, **share)
        report.row(6, "outside-transformer share, xl, compiled sampler", setting, f"{share['share_outside']:.1%}", "",
                   f"1 - T backbone calls / generate(), best of {plan.repeats}, interleaved")


def row_max_batch(report, plan, device):
    res = bench_max_batch(build(plan.size, IMAGENET_CODES, device), plan, device)
    report.record("max_batch", device="cuda", size=plan.size, **IMAGENET_CODES, **res)
    bound = "limit reached" if res["first_failing"] is None else f"B = {res['first_failing']} fails"
    peak = res["peak_bytes_at_max"] or 0
    c = IMAGENET_CODES
    report.row(5, "max sampling batch, xl", f"{plan.size}, L={c['length']} D={c['depth']} V={c['codebook_size']} "
               f"c={c['code_dim']}, cfg={CFG_SCALE}, eager bf16, {res['device_name']} {res['device_bytes'] / 2**30:.0f} GiB",
               f"{res['max_batch']} latents ({bound}; peak {peak / 2**30:.1f} GiB allocated; predicted "
               f"{res['predicted']}; {len(res['tries'])} tries in {res['search_s']:.0f} s)", ">= 19,150 (paper: 1,915)",
               f"predicted from B = {MAX_BATCH_PROBES}, steps of {MAX_BATCH_GROWTH}x, then bisect to "
               f"{plan.bisect_tol:.0%}; {MAX_BATCH_STEPS} steps per try")


def passes(name, codes, steps):
    """Sequential passes per batch: ResGen's T, the RQ-Transformer's L + L·D."""
    return f"{codes['length']} + {codes['length'] * codes['depth']}" if name == "rq" else f"{steps}"


def row_versus(report, plan, device, size, codes, batch):
    """Row 8 twice: over D = 4, 8, 16 at the codes' L, then over L (versus_lengths) at D = 4."""
    where = device.type if device.type == "cpu" else f"bf16, {torch.cuda.get_device_name(device)}"
    for axis, values in (("depth", DEPTHS), ("length", plan.versus_lengths)):
        fixed = {"depth": 4} if axis == "length" else {}
        settings = [{**fixed, axis: v} for v in values]
        res = bench_versus(plan, device, size, codes, batch, settings)
        for name in VERSUS_MODELS:
            per = {v: res[name, i] for i, v in enumerate(values)}
            growth = per[values[-1]]["best_s"] / per[values[0]]["best_s"]
            report.record("versus", device=device.type, model=name, axis=axis, size=size, batch=batch,
                          steps=plan.versus_steps if name != "rq" else None, **{**codes, **fixed},
                          times={str(v): r for v, r in per.items()},
                          passes={str(v): passes(name, {**codes, **fixed, axis: v}, plan.versus_steps) for v in values},
                          growth=growth)
        label = {"mog": "ResGen MoG", "tokens": "ResGen tokens", "rq": "RQ-Transformer"}
        short = "D" if axis == "depth" else "L"
        text = "; ".join(
            f"{short}={v}: " + ", ".join(f"{label[n]} {res[n, i]['best_s'] / batch:.3f}" for n in VERSUS_MODELS)
            + f" s/image (RQ/MoG {res['rq', i]['best_s'] / res['mog', i]['best_s']:.2f})" for i, v in enumerate(values))
        text += "; growth " + ", ".join(
            f"{label[n]} {res[n, len(values) - 1]['best_s'] / res[n, 0]['best_s']:.2f}x" for n in VERSUS_MODELS)
        other = "D=4" if axis == "length" else f"L={codes['length']}"
        report.row(8, f"ResGen vs RQ-Transformer over {short} (Table 2)",
                   f"{size}, {other} V={codes['codebook_size']} c={codes['code_dim']}, B={batch} cfg={CFG_SCALE}; "
                   f"ResGen T={plan.versus_steps}, RQ L + L·D passes; {where}", text,
                   "D=16: MoG >= 2x faster than RQ; MoG D16/D4 <= 1.10" if axis == "depth" else "",
                   f"best of {plan.repeats}, interleaved, random weights")


def cpu_rows(report, plan, compile_):
    cpu = torch.device("cpu")
    for head in ("mog", "tokens"):
        for V in DEPTH_CODEBOOKS:
            with report.guard(1, f"depth decoupling, {head} head"):
                row_depth(report, plan, head, V)
    with report.guard(1, "depth decoupling, narrow model"):
        row_depth(report, plan, "mog", 256, narrow=True)
    for codes in (FMNIST_CODES, IMAGENET_CODES):  # the demo's codes, then the ImageNet-like ones
        with report.guard(2, "outside-transformer share"):
            row_share_cpu(report, plan, codes)
    with report.guard(7, "re-quantization"):
        positions = plan.batch * FMNIST_CODES["length"]  # rows 1 and 2; the narrow model's batch
        row_requantize(report, plan, cpu, [(positions, 16, 4096), (NARROW_BATCH * FMNIST_CODES["length"], 16, 256)],
                       compile_)
    if compile_:
        with report.guard(6, "depth decoupling, compiled sampler"):
            row_depth(report, plan, "mog", 4096, compiled=True)
            row_depth(report, plan, "mog", 256, narrow=True, compiled=True)
        for codes in (FMNIST_CODES, IMAGENET_CODES):
            with report.guard(6, "outside-transformer share, compiled sampler"):
                row_share_cpu(report, plan, codes, compiled=True)
    with report.guard(3, "training throughput"):
        row_train(report, plan, torch.device("cpu"), FMNIST_CODES, compile_)
    with report.guard(8, "ResGen vs RQ-Transformer"):
        row_versus(report, plan, cpu, plan.size, FMNIST_CODES, plan.batch)


def cuda_rows(report, plan, compile_):
    if not torch.cuda.is_available():
        for number, name in ((2, "outside-transformer share, xl"), (3, "training throughput and MFU, xl"),
                             (4, "sampling throughput and MFU, xl"), (5, "max sampling batch, xl"),
                             (6, "torch.compile effect on 3 and 4"), (7, "re-quantization, xl shapes"),
                             (8, "ResGen vs RQ-Transformer, xl")):
            report.row(number, name, "cuda", NO_CUDA)
        return
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py does (the bf16 autocast regions do not use it)
    torch.backends.cudnn.allow_tf32 = True
    # most telling first: `make bench-gpu` stops at 8 minutes, and every measurement is written as it finishes
    with report.guard(4, "sampling throughput, xl"):
        row_sampling_cuda(report, plan, device, compile_)
    free(device)  # each row builds its own xl; the last one's memory goes back before the next
    with report.guard(7, "re-quantization, xl shapes"):
        row_requantize(report, plan, device, [(plan.batch * IMAGENET_CODES["length"], 16, 4096)], compile_)
    free(device)
    with report.guard(5, "max sampling batch, xl"):
        row_max_batch(report, plan, device)
    free(device)
    with report.guard(3, "training throughput, xl"):
        row_train(report, plan, device, IMAGENET_CODES, compile_)
    free(device)
    with report.guard(8, "ResGen vs RQ-Transformer, xl"):  # last: make bench-gpu's time limit cuts here first
        row_versus(report, plan, device, plan.size, IMAGENET_CODES, plan.batch)
    free(device)


def fmt_frac(x):
    return "n/a (peak unknown)" if x is None else f"{x:.1%}"


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


#################################################################################
#                                     Main                                      #
#################################################################################

def main(argv=None):
    p = argparse.ArgumentParser(description="ResGen speed and memory benchmarks (prints one table).")
    p.add_argument("--quick", action="store_true", help="every row at small sizes, under a minute on a CPU")
    p.add_argument("--only", choices=["cpu", "cuda"], default=None, help="run only the CPU rows or the CUDA rows")
    p.add_argument("--compile", action="store_true", help="also time compiled training (torch.compile(model)) and "
                   "sampling (ResGen.compile_sampler)")
    p.add_argument("--rows", choices=["all", "versus"], default="all",
                   help="versus: only row 8, ResGen against the RQ-Transformer (the paper's Table 2 in small)")
    p.add_argument("--batch", type=int, default=None,
                   help="the sampling batch B of rows 2, 4, 7 and 8 (default: the plan's, 8 on the CPU, 256 on CUDA; "
                        "RESULTS' evaluations sample at 100)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--json-out", default="runs/bench.jsonl", help="one JSON line per measurement is appended here")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1 (got {args.threads})")
        torch.set_num_threads(args.threads)
    if args.batch is not None and args.batch < 1:
        raise UserError(f"--batch must be >= 1 (got {args.batch})")

    def plan_for(kind):
        plan = PLANS[kind, args.quick]
        return plan if args.batch is None else replace(plan, batch=args.batch)
    check_writable_dir(os.path.dirname(os.path.abspath(args.json_out)))
    # every model the bench builds compiles its own backbone, and requantize meets many shapes: past dynamo's
    # default of 8 compiled versions per function it would run eager and the "compiled" rows would not be
    torch._dynamo.config.recompile_limit = 64

    info = machine()
    report = Report(args.json_out, {**info, "quick": args.quick, "compile": args.compile,
                                    "time": datetime.datetime.now().isoformat(timespec="seconds")})
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} CPU threads, "
          f"GPU: {info['gpu'] or 'none'}", flush=True)
    t0 = time.time()
    if args.rows == "versus":
        if args.only != "cuda":
            with report.guard(8, "ResGen vs RQ-Transformer"):
                plan = plan_for("cpu")
                row_versus(report, plan, torch.device("cpu"), plan.size, FMNIST_CODES, plan.batch)
        if args.only != "cpu":
            if not torch.cuda.is_available():
                report.row(8, "ResGen vs RQ-Transformer, xl", "cuda", NO_CUDA)
            else:
                with report.guard(8, "ResGen vs RQ-Transformer, xl"):
                    plan = plan_for("cuda")
                    row_versus(report, plan, torch.device("cuda"), plan.size, IMAGENET_CODES, plan.batch)
    else:
        if args.only != "cuda":
            cpu_rows(report, plan_for("cpu"), args.compile)
        if args.only != "cpu":
            cuda_rows(report, plan_for("cuda"), args.compile)
    report.print()
    print(f"({time.time() - t0:.0f} s; JSON lines appended to {args.json_out})")
    if report.failed:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
