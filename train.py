"""
Train ResGen on a cache of RVQ codes (PAPER.md §10, §11, §13, §14).

    # 1 CPU (the Fashion-MNIST demo model)
    python train.py --data runs/fashion_mnist_codes --model small --out runs/resgen --steps 1200 --batch-size 32 --lr 1e-3 --warmup 100 --device cpu
    # the autoregressive baseline of the paper's Table 2 on the same codes (rqtransformer.py), same flags otherwise
    python train.py --arch rqtransformer --data runs/fashion_mnist_codes --model small --out runs/rq --steps 1200 --batch-size 32 --lr 1e-3 --warmup 100 --device cpu
    # 1 GPU (bf16 autocast, TF32)
    python train.py --data imagenet_latents --model xl --out runs/resgen_xl --batch-size 256 --compile
    # 8 GPUs on one node (DDP over NCCL); --batch-size is the global batch
    torchrun --nproc_per_node=8 train.py --data imagenet_latents --model xl --out runs/resgen_xl --batch-size 2048 --lr 8e-4
    # 2 nodes x 8 GPUs: run on every node, NODE_RANK = 0 or 1, MASTER = the address of node 0
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER:29500 \
        train.py --data imagenet_latents --model xl --out runs/resgen_xl --batch-size 2048 --lr 8e-4

`--data` is a code cache: made by `python tokenizer.py encode` (codes.npy, labels.npy, meta.json naming the
tokenizer), or by `tokenizer.save_code_cache` from the codes of any RVQ tokenizer (the cache then carries its
codebooks.npy and needs no tokenizer checkpoint). Codes (N, h, w, D) are image grids, (N, L, D) sequences.
Rerunning the same command resumes from OUT/last.pt: model, EMA, optimiser, step, data position and RNG
states, so an interrupted run ends where an uninterrupted one would: bit for bit on the CPU when both have the
same number of threads (another thread count can change the last bits). `--time-limit SECONDS` ends a run early
with a checkpoint (a job's wall-clock limit); the same command without it, or with a new limit, continues.
SIGTERM or SIGINT (a scheduler's stop, `timeout`, a container stop, Ctrl-C) does the same: the current optimiser
step finishes, last.pt is written as at any checkpoint, and the run exits with 128 + the signal number (143, 130).
Under torchrun the ranks agree on the stop every STOP_EVERY = 10 steps, so the grace period before SIGKILL
(torchrun's --shutdown-timeout, 30 s by default) must cover that many steps and one checkpoint write.
"""
import argparse
import copy
import glob
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import resgen
import rqtransformer
from checkpoints import (DEVICE_HELP, UserError, check_writable_dir, default_device, file_hash, load_checkpoint,
                         parse_device, run_cli, save_checkpoint)
from resgen import HEADS, ResGen, sample_mask
from rqtransformer import ARCHS, RQTransformer, arch_of, checkpoint_arch, checkpoint_config
from tokenizer import code_range, load_cache_codebooks, load_code_cache, load_tokenizer, setup_dist, teardown_dist


#################################################################################
#                                Data on cached codes                           #
#################################################################################

def check_codes_in_range(codes, codebook_size):
    """Scan the (memory-mapped) cache once: a code >= V would index past the codebook."""
    hi = code_range(codes)[1]
    if hi >= codebook_size:
        raise UserError(f"codes.npy holds code {hi} but meta.json says the codebook has {codebook_size} codes")


def batch_indices(step, n, global_batch, seed):
    """Indices of the global batch at `step`: a permutation per epoch from (seed, epoch), taken in order.

    A pure function of the step, so a resumed run (and every rank) reads exactly the batches an uninterrupted
    run would: the distributed sampler is this function plus a per-rank slice.
    """
    per_epoch = max(1, n // global_batch)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    idx = perm[pos * global_batch:(pos + 1) * global_batch]
    if len(idx) < global_batch:  # fewer examples than one batch: draw with replacement
        idx = torch.randint(0, n, (global_batch,), generator=torch.Generator().manual_seed(seed * 7 + step))
    return idx.numpy()


def load_batch(codes, labels, idx, device, text=None):
    """Rows `idx` of the cache, in the order of idx (each row keeps the mask and label drop drawn for its slot);
    with text (a cache's text.npy, (N, P)), its rows too, else None."""
    order = np.argsort(idx)  # read in sorted order, which is kinder to a memory-mapped file ...
    back = np.argsort(order)  # ... then put the rows back in the order asked for
    x = torch.from_numpy(np.asarray(codes[idx[order]])[back].astype(np.int64))
    y = torch.from_numpy(np.asarray(labels[idx[order]])[back].astype(np.int64))
    x = x.reshape(len(idx), -1, x.shape[-1])  # (B, L, D) from (B, L, D) or (B, h, w, D)
    t = None if text is None else torch.from_numpy(np.asarray(text[idx[order]])[back].astype(np.int64)).to(device)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), t


TEXT_FILE = "text.npy"  # a speech cache's phoneme ids (N, P), 0 = padding; meta.json: text_vocab, text_length


def load_cache_text(data, meta, n):
    """A code cache's text prefix, memory-mapped int (N, P), or None when meta.json names no text_vocab."""
    if not meta.get("text_vocab"):
        return None
    try:
        text = np.load(os.path.join(data, TEXT_FILE), mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"{data}: meta.json names text_vocab but {TEXT_FILE} cannot be read: {e}")
    if text.shape != (n, meta.get("text_length")) or not np.issubdtype(text.dtype, np.integer):
        raise UserError(f"{data}/{TEXT_FILE} holds {text.dtype} {text.shape}; meta.json wants ints "
                        f"({n}, {meta.get('text_length')})")
    return text


def codebooks_for(data, meta, tokenizer_path=None):
    """The codebooks times the latent scale s: (D, V, c) in the model's (scaled) units. From the cache's own
    codebooks.npy when it carries one (codes of any RVQ tokenizer), else from the tokenizer that made the codes."""
    own = load_cache_codebooks(data, meta)
    if own is not None:
        return own * meta["latent_scale"]
    path = tokenizer_path or meta.get("tokenizer")
    if not path or not os.path.isfile(path):
        raise UserError(f"tokenizer checkpoint {path!r} named by the code cache was not found; pass --tokenizer")
    h = file_hash(path)
    if h != meta["tokenizer_hash"]:
        raise UserError(f"tokenizer {path} (hash {h}) is not the one that made the code cache "
                        f"(hash {meta['tokenizer_hash']})")
    tok = load_tokenizer(path)
    return tok.rvq.codebooks.detach().clone() * meta["latent_scale"]


def codes_origin(meta):
    """What made a cache's codes, for the resume check: its tokenizer's hash, or its own codebooks' hash."""
    if meta.get("tokenizer_hash"):
        return f"tokenizer {meta['tokenizer_hash']}"
    return f"codebooks {meta.get('codebooks_hash')}"


#################################################################################
#                 Stopping early: SIGTERM / SIGINT and --time-limit             #
#################################################################################

STOP_EVERY = 10  # under torchrun, steps between the ranks' agreements to stop (see agree_to_stop)


class StopSignals:
    """SIGTERM and SIGINT (a scheduler's stop, `timeout`, a container stop, Ctrl-C) ask the run to stop after the
    current optimiser step, with a checkpoint. A context manager around the training loop only.

    The handler only records the first signal: a step is never cut in half, and a second signal while the step
    finishes or last.pt is written cannot raise KeyboardInterrupt inside the write. The previous handlers come
    back on exit, because train.main also runs inside other programs (the tests).
    """
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0  # the first signal received, 0 if none
        self.previous = {}

    def record(self, signum, frame):
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers there only
            for s in self.SIGNALS:
                # a signal the parent chose to ignore (a script's `cmd &` ignores SIGINT) stays ignored, as Python
                # itself leaves an ignored SIGINT alone
                if signal.getsignal(s) is signal.SIG_IGN:
                    continue
                self.previous[s] = signal.signal(s, self.record)
                # restart system calls the signal interrupts (a gloo or NCCL socket read, a file write) instead
                # of failing them with EINTR: the flag is read at the end of the step, nothing needs waking
                signal.siginterrupt(s, False)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python


def time_is_up(start_time, limit):
    """Whether `limit` seconds (--time-limit; None: no limit) of training have passed on this process's clock."""
    return limit is not None and time.time() - start_time >= limit


def agree_to_stop(signum, time_up, world, device):
    """(signal number or 0, time limit reached): the same answer on every rank, so all ranks stop at one step and
    save one checkpoint together. Under torchrun one all-reduce (max) of both flags: a signal that reached any
    rank stops them all (the larger number names it when two differ); only rank 0 passes its clock's verdict.

    Why every STOP_EVERY steps under torchrun, not every step: the host reads the all-reduce's result, so on a
    GPU it waits for the step's kernels and the next step's host work no longer overlaps them. On 2 CPU processes
    over gloo (a loaded 2-core machine) one call took 0.7-0.9 ms, and checking after every step ran the `tiny`
    model at 13.0 steps/s against 13.7 every 10 steps (three runs each). A single process reads its flag after
    every step (0.3 us).
    """
    if world == 1:
        return signum, time_up
    flags = torch.tensor([signum, int(time_up)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    signum, up = flags.tolist()
    return signum, bool(up)


#################################################################################
#                                     Training                                  #
#################################################################################

@torch.no_grad()
def update_ema(ema, model, decay):
    """EMA of the weights, DiT style (buffers, i.e. the frozen codebooks, are copied)."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)


def lr_at(step, args):
    """Linear warm-up, then constant or cosine decay to 10%."""
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    if args.decay == "cosine":
        t = min(1.0, step / max(1, args.steps))
        return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    return args.lr * warm


def step_noise(step, args, config, device):
    """Forward masks and label drops for the whole global batch of `step`, from a generator seeded by the step.

    Every rank draws the same global noise and keeps its slice, so N processes compute exactly the batch one
    process would, and a resumed run redraws exactly what the interrupted one would have. An autoregressive model
    (RQ-Transformer) scores every token: its mask is all True and only the label drops are random.
    """
    g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step + 1)
    if arch_of(config) == rqtransformer.ARCH:
        mask = torch.ones(args.batch_size, config.length, config.depth, dtype=torch.bool, device=device)
    else:
        mask = sample_mask(args.batch_size, config.length, config.depth, generator=g, device=device,
                           schedule=config.schedule)
    drop = torch.rand(args.batch_size, generator=g, device=device) < config.label_dropout
    return mask, drop


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


#################################################################################
#                                  Command line                                 #
#################################################################################

HEAD_FLAGS = ("components_per_code", "head_layers", "classification_weight", "log_scale_min")


def parse_args(argv=None):
    """train.py's flags (the module docstring has the commands)."""
    p = argparse.ArgumentParser(description="Train ResGen on cached RVQ codes.",
                                epilog="SIGTERM or SIGINT finishes the current step, writes last.pt and exits with 128 + "
                                       "the signal (143, 130); rerun the same command to continue. Under torchrun the "
                                       f"ranks agree on the stop every {STOP_EVERY} steps: the grace period before "
                                       "SIGKILL (torchrun's --shutdown-timeout, 30 s by default) must cover that many "
                                       "steps and one checkpoint write.")
    p.add_argument("--data", default="imagenet_latents",
                   help="code cache folder (tokenizer.py encode, or tokenizer.save_code_cache)")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint (default: the one named in meta.json)")
    p.add_argument("--out", default="runs/resgen", help="run folder: last.pt, log.jsonl, samples")
    p.add_argument("--arch", default="resgen", help="resgen (the paper's model) or rqtransformer (the autoregressive "
                   "baseline of its Table 2, rqtransformer.py)")
    p.add_argument("--model", default="xl", help=f"size: {', '.join(resgen.SIZES)} (xl = the paper's 574M; the "
                   "RQ-Transformer's sizes match their parameter counts)")
    p.add_argument("--head", default="mog", help="mog: cumulative embedding (the paper); tokens: the ablation")
    # the MoG head's knobs; each defaults to ResGenConfig's
    p.add_argument("--components-per-code", type=int, default=None,
                   help="M, MoG components per code of the first masked depth (K = V*M)")
    p.add_argument("--head-layers", type=int, default=None, help="gated-MLP blocks in the MoG head")
    p.add_argument("--classification-weight", type=float, default=None,
                   help="lambda on the MoG head's classification term (-1: the code dimension c)")
    p.add_argument("--log-scale-min", type=float, default=None, help="floor of the MoG head's log-scale s "
                   "(sigma = e^s)")
    p.add_argument("--steps", type=int, default=400_000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (all processes, all micro-batches)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (for large global batches)")
    p.add_argument("--lr", type=float, default=4e-4, help="peak AdamW learning rate (MAR: 8e-4 at batch 2048)")
    p.add_argument("--warmup", type=int, default=1000, help="linear warm-up steps")
    p.add_argument("--decay", default="constant", choices=["constant", "cosine"],
                   help="after warm-up: constant, or cosine to 10%% of --lr at --steps")
    p.add_argument("--weight-decay", type=float, default=0.02,
                   help="AdamW weight decay of the weight matrices (none on embeddings, biases, norms)")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (0.95, as MAR and VAR)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA of weights (warmed up: min(decay, (1+t)/(10+t)))")
    p.add_argument("--label-dropout", type=float, default=0.1, help="p of the null class in training (CFG)")
    p.add_argument("--device", default=default_device(), help=DEVICE_HELP)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data order, masks and "
                   "label drops")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop after this many seconds of training, with a checkpoint (run again to resume)")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines (stdout and OUT/log.jsonl)")
    p.add_argument("--ckpt-every", type=int, default=5000, help="steps between checkpoints (OUT/last.pt; also at the "
                   "end and at a stop)")
    p.add_argument("--keep-steps", default="", help="comma-separated steps whose checkpoint is also kept as "
                   "OUT/step_NNNNNNN.pt (e.g. the ends of epochs 1, 2, 5, 10, 20 for a curve of quality against training)")
    p.add_argument("--sample-every", type=int, default=0, help="write a small sample grid every N steps (0: off)")
    return p.parse_args(argv)


def validate(args, world):
    """One clear UserError for a bad flag value, before any work."""
    for k in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "components_per_code"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1 (got {getattr(args, k)})")
    if args.arch not in ARCHS:
        raise UserError(f"unknown --arch {args.arch!r} (choose from {', '.join(ARCHS)})")
    sizes = rqtransformer.SIZES if args.arch == rqtransformer.ARCH else resgen.SIZES
    if args.model not in sizes:
        raise UserError(f"unknown --model {args.model!r} (choose from {', '.join(sizes)})")
    if args.arch == rqtransformer.ARCH and (args.head != "mog" or any(getattr(args, k) is not None for k in HEAD_FLAGS)):
        raise UserError("--head and the MoG head's flags (--" + ", --".join(k.replace("_", "-") for k in HEAD_FLAGS)
                        + ") set ResGen's head; the RQ-Transformer (--arch rqtransformer) has none")
    if args.head not in HEADS:
        raise UserError(f"unknown --head {args.head!r} (choose from {', '.join(HEADS)})")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0 (got {args.lr})")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1) (got {args.ema_decay})")
    if not 0 <= args.label_dropout < 1:
        raise UserError(f"--label-dropout must be in [0, 1) (got {args.label_dropout})")
    try:
        args.keep_steps = sorted({int(x) for x in args.keep_steps.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--keep-steps takes comma-separated step numbers (got {args.keep_steps!r})")
    if any(k < 1 for k in args.keep_steps):
        raise UserError(f"--keep-steps must be >= 1 (got {args.keep_steps})")
    if args.time_limit is not None and not args.time_limit > 0:
        raise UserError(f"--time-limit must be > 0 seconds (got {args.time_limit})")
    if args.batch_size % (world * args.grad_accum):
        raise UserError(f"--batch-size {args.batch_size} must divide by processes x --grad-accum "
                        f"({world} x {args.grad_accum})")


#################################################################################
#                  Set-up: process, model, checkpoint to resume                 #
#################################################################################

def setup(args):
    """This process's place in the run (rank, world size) and its device, once the flags are checked."""
    rank, world = setup_dist()
    validate(args, world)
    device = parse_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


def build_config(args, meta):
    """The model's config (of --arch) from the flags and the code cache's meta.json."""
    data = dict(length=int(np.prod(meta["grid"])), depth=meta["depth"], codebook_size=meta["codebook_size"],
                code_dim=meta["code_dim"], num_classes=meta["num_classes"], label_dropout=args.label_dropout)
    if args.arch == rqtransformer.ARCH:
        if meta.get("text_vocab"):
            raise UserError("this code cache has a text prefix (text.npy): --arch rqtransformer takes no text")
        return rqtransformer.make_config(args.model, **data)
    head = {k: getattr(args, k) for k in HEAD_FLAGS if getattr(args, k) is not None}
    text = {k: meta[k] for k in ("text_vocab", "text_length") if meta.get("text_vocab")}
    return resgen.make_config(args.model, head=args.head, **data, **head, **text)


def build_model(config, codebooks):
    """ResGen or RQTransformer, whichever the config is of."""
    return (RQTransformer if arch_of(config) == rqtransformer.ARCH else ResGen)(config, codebooks)


def checkpoint_to_resume(ckpt_path, args, config, meta):
    """OUT/last.pt when it exists, else None. A checkpoint of another model (architecture, config) or of other codes
    is a UserError: resuming it would silently train something else than these flags and data describe."""
    if not os.path.exists(ckpt_path):
        return None
    ckpt = load_checkpoint(ckpt_path, "resgen")
    if checkpoint_arch(ckpt, ckpt_path) != args.arch:
        raise UserError(f"{ckpt_path} holds a {checkpoint_arch(ckpt, ckpt_path)} model, not --arch {args.arch}; "
                        f"use another --out")
    if asdict(checkpoint_config(ckpt, ckpt_path)) != asdict(config):
        raise UserError(f"{ckpt_path} holds a model {ckpt.get('config')} but these flags and data give "
                        f"{asdict(config)}; use another --out")
    if codes_origin(ckpt["meta"]) != codes_origin(meta):
        raise UserError(f"{ckpt_path} was trained on codes of {codes_origin(ckpt['meta'])}, "
                        f"--data holds codes of {codes_origin(meta)}")
    return ckpt


def prepare_out(args, meta, rank):
    """Check the run folder before any work (the last of the input checks), and clear what a kill left there."""
    if args.sample_every and not (args.tokenizer or meta.get("tokenizer")):
        raise UserError("--sample-every decodes pictures: this cache names no tokenizer, pass --tokenizer")
    if rank == 0:
        check_writable_dir(args.out)
        for stale in glob.glob(os.path.join(args.out, ".tmp-*")):  # left by a kill during a write
            os.unlink(stale)


def build_optimizer(model, args, device):
    """AdamW; weight decay on the weight matrices only (not on embeddings, biases and norms)."""
    decay_params = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other_params = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay_params, "weight_decay": args.weight_decay},
                              {"params": other_params, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, args.beta2), fused=device.type == "cuda")


def restore(ckpt, model, ema, opt, rank, device):
    """Model, EMA, optimiser and this rank's RNG state from last.pt; returns the step to go on from."""
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"][min(rank, len(ckpt["rng"]) - 1)], device)
    return ckpt["step"]


#################################################################################
#                                The training loop                              #
#################################################################################

@dataclass
class Run:
    """What the stages of one training process share: its flags, its place in the run, the data and the models."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    config: object               # ResGenConfig or RQTransformerConfig
    meta: dict                   # the code cache's meta.json
    codes: np.ndarray            # (N, L, D) or (N, h, w, D), memory-mapped
    labels: np.ndarray           # (N,)
    text: object                 # (N, P) phoneme ids (a speech cache's text.npy), or None
    model: nn.Module
    ema: nn.Module
    opt: torch.optim.Optimizer
    ckpt_path: str               # OUT/last.pt
    log_path: str                # OUT/log.jsonl


class Progress:
    """Steps per second since the last log line, and the time left at the rate since this process started."""

    def __init__(self, step):
        self.start_time = self.t0 = time.time()
        self.start_step = self.last_step = step

    def update(self, step, steps):
        """(steps/s since the last call, seconds left to `steps`)."""
        now = time.time()
        rate = (step - self.last_step) / max(now - self.t0, 1e-9)
        self.t0, self.last_step = now, step
        eta = (steps - step) / max((step - self.start_step) / (now - self.start_time), 1e-9)
        return rate, eta


def start_log(run, step):
    """Rank 0: trim log.jsonl to the checkpoint's step and say what is trained."""
    # keep the log in step with the checkpoint: lines written after it by a killed run are dropped
    lines = []
    if os.path.exists(run.log_path):
        with open(run.log_path) as f:
            lines = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
    with open(run.log_path, "w") as f:
        f.writelines(lines)
    args, config = run.args, run.config
    name = (f"RQ-Transformer {args.model}" if args.arch == rqtransformer.ARCH
            else f"ResGen {args.model} ({args.head} head)")
    print(f"{name}: {run.model.num_params() / 1e6:.2f}M parameters, L={config.length}, "
          f"D={config.depth}, V={config.codebook_size}, {len(run.codes)} training grids, {run.world} process(es) on "
          f"{run.device.type}" + (f"; resuming at step {step}" if step else ""), flush=True)


def train_step(run, train_model, autocast, step):
    """One optimiser step on the global batch of `step`: this rank's rows of it in --grad-accum micro-batches, then
    the clipped AdamW update. Returns (lr, this rank's summed micro-batch losses, the last one's stats, grad norm)."""
    args, world, device = run.args, run.world, run.device
    lr = lr_at(step, args)
    for g in run.opt.param_groups:
        g["lr"] = lr
    idx = batch_indices(step, len(run.codes), args.batch_size, args.seed)
    mask, drop = step_noise(step, args, run.config, device)  # (B_global, L, D), (B_global,)
    micro = args.batch_size // (world * args.grad_accum)
    mine = slice(run.rank * micro * args.grad_accum, (run.rank + 1) * micro * args.grad_accum)
    # Every micro-batch's loss is its sum over scored terms divided by the global batch's count / world: the
    # gradient DDP averages is then exactly that of one mean over the global batch, whatever the split.
    count = run.model.head.scored(mask).float().clamp_min(1.0) / world
    idx, mask, drop = idx[mine], mask[mine], drop[mine]
    loss_sum = torch.zeros((), device=device)
    for m in range(args.grad_accum):
        part = slice(m * micro, (m + 1) * micro)
        x, y, t = load_batch(run.codes, run.labels, idx[part], device, run.text)
        sync = m == args.grad_accum - 1 or world == 1
        ctx = train_model.no_sync() if not sync and hasattr(train_model, "no_sync") else torch.enable_grad()
        with ctx, autocast:
            loss, stats = train_model(x, y, mask=mask[part], drop=drop[part], count=count,
                                      **({} if t is None else {"text": t}))
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return lr, loss_sum, stats, grad_norm


def log_step(run, step, progress, lr, loss_sum, grad_norm, stats):
    """One line on stdout and in log.jsonl (rank 0): the loss averaged over ranks, lr, gradient norm, speed."""
    if run.world > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= run.world
    if run.rank != 0:
        return
    args, config = run.args, run.config
    rate, eta = progress.update(step, args.steps)
    tokens_per_step = args.batch_size * config.length * config.depth
    rec = {"step": step, "loss": round(loss_sum.item(), 6), "lr": lr,
           "grad_norm": round(grad_norm.item(), 4), "steps_per_s": round(rate, 3),
           "tokens_per_s": round(rate * tokens_per_step), **{k: round(v.item(), 4) for k, v in stats.items()}}
    unit = "nats/dim" if getattr(config, "head", None) == "mog" else "nats/token"
    print(f"step {step:7d} | loss {rec['loss']:.4f} {unit} | lr {lr:.2e} | grad {rec['grad_norm']:.3f} | "
          f"{rate:.2f} steps/s | {rec['tokens_per_s']:,} tokens/s | ETA {eta / 60:.1f} min", flush=True)
    with open(run.log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def save_state(run, step):
    """last.pt (PAPER.md §14): model, EMA, optimiser, step, data position, every rank's RNG state, the config, the
    cache's meta and the flags; rank 0 writes it (atomically: a temporary file, then a rename)."""
    rngs = [rng_state(run.device)]
    if run.world > 1:  # every rank's RNG state, so masks and label drops resume exactly
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng_state(run.device))
    if run.rank == 0:
        args = run.args
        save_checkpoint({"kind": "resgen", "arch": args.arch, "config": asdict(run.config),
                         "model": run.model.state_dict(), "ema": run.ema.state_dict(),
                         "optimizer": run.opt.state_dict(), "step": step,
                         "data_position": step * args.batch_size, "rng": rngs, "meta": run.meta,
                         "args": vars(args)}, run.ckpt_path)


def write_sample_grid(ema, meta, args, step, device):
    """A small grid from the EMA weights, one row per class (at most 10 classes, 8 samples each)."""
    from sample import generate_images
    from tokenizer import save_grid
    tok = load_tokenizer(args.tokenizer or meta["tokenizer"], device)
    ncls = min(10, max(1, meta["num_classes"]))
    labels = torch.arange(ncls).repeat_interleave(8)
    images = generate_images(ema, tok, labels, batch_size=80, seed=0, device=device)
    save_grid(images, os.path.join(args.out, f"samples_{step:07d}.png"), nrow=8)


def train(run, step):
    """Optimiser steps from `step` to --steps, with log lines, sample grids and checkpoints on their schedules; a
    signal or --time-limit ends the loop early at a step, with a checkpoint. Returns that signal's number (0: none)."""
    args, rank, world, device = run.args, run.rank, run.world, run.device
    train_model = run.model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(run.model,
                                                          device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    progress = Progress(step)
    run.model.train()
    signum, out_of_time = 0, False
    # From here to the end, SIGTERM / SIGINT stop the run at the end of a step, with a checkpoint: all ranks hold
    # the handlers until after the last collective (teardown_dist), so none dies while rank 0 still writes.
    with StopSignals() as stop:
        while step < args.steps:
            lr, loss_sum, stats, grad_norm = train_step(run, train_model, autocast, step)
            step += 1
            update_ema(run.ema, run.model, min(args.ema_decay, (1 + step) / (10 + step)))
            # one process reads its signal flag after every step; torchrun ranks agree every STOP_EVERY steps, and
            # the time limit (rank 0's clock) is looked at every STOP_EVERY steps in both cases
            if world == 1 or step % STOP_EVERY == 0:
                up = rank == 0 and step % STOP_EVERY == 0 and time_is_up(progress.start_time, args.time_limit)
                signum, out_of_time = agree_to_stop(stop.signum, up, world, device)
            last = step == args.steps or out_of_time or signum > 0
            if step % args.log_every == 0 or last:
                log_step(run, step, progress, lr, loss_sum, grad_norm, stats)
            if rank == 0 and args.sample_every and step % args.sample_every == 0:
                write_sample_grid(run.ema, run.meta, args, step, device)
            keep = step in args.keep_steps
            if step % args.ckpt_every == 0 or last or keep:
                save_state(run, step)
            if keep and rank == 0:  # a copy of last.pt that later steps never overwrite
                kept = os.path.join(args.out, f"step_{step:07d}.pt")
                shutil.copyfile(run.ckpt_path, kept + ".tmp")
                os.replace(kept + ".tmp", kept)
            if out_of_time and rank == 0:
                print(f"--time-limit {args.time_limit:g} s reached at step {step}", flush=True)
            if out_of_time or signum:
                break
        if rank == 0 and signum:
            print(f"{signal.Signals(signum).name} received: stopped at step {step} with a checkpoint in "
                  f"{run.ckpt_path} (rerun the same command to resume)", flush=True)
        elif rank == 0:
            done = (f"saved {run.ckpt_path}" if step > progress.start_step
                    else f"{run.ckpt_path} is already at --steps; nothing to train")
            print(f"{done} (step {step})", flush=True)
        del train_model  # the DDP wrapper, before the group it holds ends (teardown_dist)
        teardown_dist(world)
    return signum


def main(argv=None):
    """Set-up, data, model, resume, then the loop; a run stopped by a signal exits with 128 + its number."""
    args = parse_args(argv)
    rank, world, device = setup(args)
    codes, labels, meta = load_code_cache(args.data)
    check_codes_in_range(codes, meta["codebook_size"])
    text = load_cache_text(args.data, meta, len(codes))
    config = build_config(args, meta)
    ckpt_path = os.path.join(args.out, "last.pt")
    ckpt = checkpoint_to_resume(ckpt_path, args, config, meta)
    codebooks = codebooks_for(args.data, meta, args.tokenizer)
    prepare_out(args, meta, rank)

    torch.manual_seed(args.seed + rank)  # per-rank seeds for anything else random (dropout); masks: step_noise
    model = build_model(config, codebooks).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = build_optimizer(model, args, device)
    step = 0 if ckpt is None else restore(ckpt, model, ema, opt, rank, device)
    run = Run(args, rank, world, device, config, meta, codes, labels, text, model, ema, opt, ckpt_path,
              os.path.join(args.out, "log.jsonl"))
    if rank == 0:
        start_log(run, step)
    signum = train(run, step)
    if signum:
        raise SystemExit(128 + signum)  # the shell's convention for a process ended by a signal: 143, 130


if __name__ == "__main__":
    run_cli(main)
