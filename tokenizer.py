"""
RVQ tokenizer: residual vector quantization, the RVQ-VAE that turns images into (h, w, D) code grids,
the image data sets, and the code caches the ResGen model trains on (PAPER.md §9, §14; README.md has the commands).

    # Fashion-MNIST demo tokenizer on the CPU (a few minutes)
    python tokenizer.py train  --data fashion_mnist --out runs/tokenizer
    python tokenizer.py encode --ckpt runs/tokenizer/last.pt --data fashion_mnist --split train --out runs/fashion_mnist_codes
    python tokenizer.py reconstruct --ckpt runs/tokenizer/last.pt --data fashion_mnist --out recon.png

    # ImageNet 256x256 (8x8 grid, D = 16 as in the paper), one GPU or N GPUs
    python tokenizer.py train --data /data/imagenet --config imagenet256 --out runs/tok_in256 --batch-size 64 --steps 400000
    torchrun --nproc_per_node=8 tokenizer.py train --data /data/imagenet --config imagenet256 --out runs/tok_in256
    python tokenizer.py encode --ckpt runs/tok_in256/last.pt --data /data/imagenet --split train --out imagenet_latents

Rerunning `train` with the same --out resumes from OUT/last.pt.
"""
import argparse
import gc
import gzip
import json
import math
import os
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import (DEVICE_HELP, UserError, check_writable_dir, default_device, file_hash, load_checkpoint,
                         parse_device, publish, run_cli, save_checkpoint, strip_prefixes)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


#################################################################################
#                         Residual vector quantization                          #
#################################################################################

def squared_distances(r, codebook):
    """||r - e_v||^2 for every code v, in fp32 even under autocast (argmin over bf16 distances picks wrong codes).

    r: (..., c); codebook: (V, c) -> (..., V) float32.
    """
    with torch.autocast(device_type=r.device.type, enabled=False):
        r = r.float()
        codebook = codebook.float()
        return (r.pow(2).sum(-1, keepdim=True)
                - 2.0 * r @ codebook.t()
                + codebook.pow(2).sum(-1))


def _is_dist():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class RVQ(nn.Module):
    """Residual vector quantizer with D codebooks of V codes (PAPER.md §2, §9).

    Greedy residual quantization: r_0 = z; x_j = argmin_v ||r_{j-1} - e(v; j)||^2; r_j = r_{j-1} - e(x_j; j).
    The quantized latent is sum_j e(x_j; j). Codebooks are learned by EMA (no gradients), with Laplace
    smoothing, k-means initialisation on the first batch, and restart of dead codes.
    """

    def __init__(self, depth, codebook_size, dim, shared=False, decay=0.99, eps=1e-5,
                 kmeans_iters=10, dead_threshold=0.5):
        super().__init__()
        if depth < 1 or codebook_size < 2 or dim < 1:
            raise UserError(f"RVQ needs depth >= 1, codebook size >= 2, dim >= 1 (got {depth}, {codebook_size}, {dim})")
        self.depth, self.codebook_size, self.dim, self.shared = depth, codebook_size, dim, shared
        self.decay = decay                    # EMA decay of the code counts and sums
        self.eps = eps                        # Laplace smoothing of the counts (keeps every code's mean finite)
        self.kmeans_iters = kmeans_iters      # Lloyd iterations for the first-batch initialisation
        self.dead_threshold = dead_threshold  # a code whose EMA count falls below this is restarted
        nb = 1 if shared else depth
        self.register_buffer("weight", torch.randn(nb, codebook_size, dim) * 0.1)  # (D or 1, V, c)
        self.register_buffer("ema_count", torch.ones(nb, codebook_size))
        self.register_buffer("ema_sum", self.weight.clone())
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("usage", torch.zeros(depth, codebook_size))  # code counts of the last batch, per depth

    # ---- lookups -------------------------------------------------------------------------------------
    @property
    def codebooks(self):
        """(D, V, c) float32: the codebook of every depth (the shared one repeated when shared=True)."""
        return self.weight.expand(self.depth, -1, -1)

    def quantize(self, z, start_depth=0):
        """Greedy residual quantization of z from depth `start_depth` to D-1.  z (..., c) -> codes (..., D-start) int64."""
        return self._quantize(z, start_depth)[0]

    def _quantize(self, z, start_depth=0):
        """Codes and the residual each depth saw (the EMA update needs the latter).  fp32 throughout."""
        if not 0 <= start_depth <= self.depth:
            raise ValueError(f"start_depth {start_depth} outside 0..{self.depth}")
        codebooks = self.codebooks
        r = z.float()
        codes, residuals = [], []
        for j in range(start_depth, self.depth):
            idx = squared_distances(r, codebooks[j]).argmin(-1)  # (...,)
            residuals.append(r)
            codes.append(idx)
            r = r - codebooks[j][idx]
        if not codes:
            return z.new_zeros(z.shape[:-1] + (0,), dtype=torch.long), residuals
        return torch.stack(codes, -1), residuals  # (..., D') int64

    def embed(self, codes, start_depth=0):
        """Per-depth code embeddings.  codes (..., D') -> (..., D', c) with D' <= D - start_depth."""
        n = codes.shape[-1]
        offsets = (start_depth + torch.arange(n, device=codes.device)) * self.codebook_size
        flat = self.codebooks.reshape(-1, self.dim)  # (D*V, c)
        return F.embedding(codes.long() + offsets, flat)

    def dequantize(self, codes, start_depth=0):
        """Sum of the code embeddings: the quantized latent.  codes (..., D') -> (..., c)."""
        return self.embed(codes, start_depth).sum(-2)

    def prefix_sums(self, codes):
        """Cumulative sums over depth: prefix d holds sum_{j<=d} e(x_j; j).  codes (..., D) -> (..., D, c)."""
        return self.embed(codes).cumsum(-2)

    # ---- training ------------------------------------------------------------------------------------
    def forward(self, z):
        """Quantize z (..., c) and, in training mode, update the codebooks by EMA.

        Returns (z_q, codes, commit_loss): z_q carries the straight-through gradient of the full sum, and
        commit_loss is the cumulative commitment loss: every prefix sum should approximate z (RQ-VAE style).
        """
        flat = z.reshape(-1, self.dim).float()  # (N, c)
        if self.training and not bool(self.initialized):
            self._kmeans_init(flat.detach())
        codes, residuals = self._quantize(flat.detach())
        prefixes = self.prefix_sums(codes)  # (N, D, c), from the codebooks that chose the codes
        if self.training:
            self._ema_update(codes, residuals)
        commit = (flat.unsqueeze(1) - prefixes.detach()).pow(2).mean()
        z_q = prefixes[:, -1]
        z_q = flat + (z_q - flat).detach()  # one straight-through estimator on the sum
        return z_q.view_as(z).to(z.dtype), codes.view(*z.shape[:-1], self.depth), commit

    @torch.no_grad()
    def _kmeans_init(self, flat):
        """k-means on the first batch, depth by depth on the residuals left by the depths above (rank 0, then broadcast)."""
        if not _is_dist() or dist.get_rank() == 0:
            g = torch.Generator(device="cpu").manual_seed(0)
            r = flat.clone()
            nb = self.weight.shape[0]
            for j in range(nb):
                cb = _kmeans(r if not self.shared else flat, self.codebook_size, self.kmeans_iters, g)
                self.weight[j] = cb
                if not self.shared:
                    r = r - cb[squared_distances(r, cb).argmin(-1)]
        if _is_dist():
            dist.broadcast(self.weight, 0)
        self.ema_sum.copy_(self.weight)
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, codes, residuals):
        """EMA of code counts and residual sums (all-reduced under DDP), Laplace-smoothed means, dead-code restarts."""
        nb, V = self.weight.shape[:2]
        counts = torch.zeros(self.depth, V, device=codes.device)
        sums = torch.zeros(self.depth, V, self.dim, device=codes.device)
        for j in range(self.depth):
            counts[j].index_add_(0, codes[:, j], torch.ones_like(codes[:, j], dtype=torch.float))
            sums[j].index_add_(0, codes[:, j], residuals[j])
        if _is_dist():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.usage.copy_(counts)
        if self.shared:  # one codebook sees the residuals of every depth
            counts, sums = counts.sum(0, keepdim=True), sums.sum(0, keepdim=True)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_count.sum(-1, keepdim=True)
        smoothed = (self.ema_count + self.eps) / (n + V * self.eps) * n  # Laplace smoothing
        self.weight.copy_(self.ema_sum / smoothed.unsqueeze(-1))
        self._restart_dead(residuals)

    @torch.no_grad()
    def _restart_dead(self, residuals):
        """Move dead codes onto random residuals of the current batch and reset their EMA statistics.

        The dead set is the same on every rank (counts are all-reduced); the replacement vectors are drawn on
        rank 0 and broadcast, so every rank makes the same restarts and the codebooks stay identical.
        """
        dead = self.ema_count < self.dead_threshold  # (nb, V)
        if not bool(dead.any()):
            return
        nb, V = dead.shape
        candidates = torch.empty(nb, V, self.dim, device=self.weight.device)
        if not _is_dist() or dist.get_rank() == 0:
            for j in range(nb):
                pool = torch.cat(residuals) if self.shared else residuals[j]  # (N, c)
                pick = torch.randint(0, pool.shape[0], (V,), device=pool.device)
                candidates[j] = pool[pick]
        if _is_dist():
            dist.broadcast(candidates, 0)
        self.weight[dead] = candidates[dead]
        self.ema_sum[dead] = candidates[dead]
        self.ema_count[dead] = 1.0

    def usage_stats(self):
        """Per-depth perplexity and fraction of codes used in the last training batch."""
        p = self.usage / self.usage.sum(-1, keepdim=True).clamp_min(1)
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum(-1))
        return perplexity.tolist(), (self.usage > 0).float().mean(-1).tolist()


def _kmeans(x, k, iters, generator):
    """Plain Lloyd k-means (init: k random points); an empty cluster keeps its centre."""
    idx = torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)
    if idx.numel() < k:  # fewer points than codes: repeat points, jitter so codes differ
        extra = torch.randint(0, x.shape[0], (k - idx.numel(),), generator=generator).to(x.device)
        idx = torch.cat([idx, extra])
    centres = x[idx].clone() + 1e-4 * torch.randn(k, x.shape[1], generator=generator).to(x.device)
    for _ in range(iters):
        assign = squared_distances(x, centres).argmin(-1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled].unsqueeze(-1)
    return centres


#################################################################################
#                              RVQ-VAE tokenizer                                #
#################################################################################

@dataclass
class TokenizerConfig:
    image_size: int = 32        # images are square, image_size x image_size
    channels: int = 1           # 1 (grayscale) or 3 (RGB)
    base_channels: int = 64     # width of the first conv stage; doubled at each downsampling (capped at 4x)
    downsample: int = 2         # number of stride-2 stages: grid = image_size / 2**downsample
    res_blocks: int = 1         # residual blocks per stage
    full_res_blocks: bool = False  # residual blocks at full resolution too (costly; off for the CPU demo)
    code_dim: int = 16          # c: latent (code) dimension
    depth: int = 4              # D: RVQ depth
    codebook_size: int = 256    # V: codes per codebook
    shared_codebook: bool = False
    commit_weight: float = 0.25  # beta of the cumulative commitment loss
    ema_decay: float = 0.99

    @property
    def grid(self):
        return self.image_size // 2 ** self.downsample


# Named configurations: architectures, with the image format they were made for. `tokenizer.py train` fits them
# to the data (fit_to_images): channels follow the images, --image-size / --grid set any square size and grid.
# Fashion-MNIST 28x28 is zero-padded to 32x32.
CONFIGS = {
    "fmnist": dict(image_size=32, channels=1, base_channels=32, downsample=2, code_dim=16, depth=4, codebook_size=256),
    "fmnist-4x4": dict(image_size=32, channels=1, base_channels=32, downsample=3, code_dim=32, depth=8,
                       codebook_size=256),
    # ImageNet 256x256 -> 8x8 grid with D = 16 (PAPER.md §2): five stride-2 stages.
    "imagenet256": dict(image_size=256, channels=3, base_channels=128, downsample=5, res_blocks=2,
                        full_res_blocks=True, code_dim=256, depth=16, codebook_size=16384),
}


def fit_to_images(config, shape, grid=None):
    """A named configuration fitted to the data: channels and image size from the images (H, W, C), and as many
    stride-2 stages as take the image size down to `grid` (default: the configuration's number of stages).
    A configuration names an architecture; any square image size and channel count work with it."""
    size, channels = shape[0], shape[-1]
    grid = grid or size // 2 ** config["downsample"]
    downsample = int(round(math.log2(size / grid))) if 0 < grid <= size else -1
    if downsample < 0 or grid * 2 ** downsample != size:
        raise UserError(f"--grid {grid} does not divide {size}x{size} images by a power of 2 "
                        f"(try {', '.join(str(size >> k) for k in range(1, 5) if size >> k)})")
    return {**config, "image_size": size, "channels": channels, "downsample": downsample}


class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(min(32, ch // 4), ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(min(32, ch // 4), ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.block(x)


def _stage_channels(cfg):
    return [cfg.base_channels * min(2 ** i, 4) for i in range(cfg.downsample + 1)]


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = _stage_channels(cfg)
        layers = [nn.Conv2d(cfg.channels, chs[0], 3, padding=1)]
        for i in range(cfg.downsample):
            layers += [ResBlock(chs[i]) for _ in range(cfg.res_blocks if i > 0 or cfg.full_res_blocks else 0)]
            layers += [nn.Conv2d(chs[i], chs[i + 1], 4, stride=2, padding=1)]
        layers += [ResBlock(chs[-1]) for _ in range(cfg.res_blocks)]
        layers += [nn.GroupNorm(min(32, chs[-1] // 4), chs[-1]), nn.SiLU(), nn.Conv2d(chs[-1], cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (B, C, H, W) -> (B, c, h, w)
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = _stage_channels(cfg)[::-1]
        layers = [nn.Conv2d(cfg.code_dim, chs[0], 3, padding=1)]
        layers += [ResBlock(chs[0]) for _ in range(cfg.res_blocks)]
        for i in range(cfg.downsample):
            # a 4x4 stride-2 transposed conv costs half of upsample + 3x3 conv at the higher resolution
            layers += [nn.ConvTranspose2d(chs[i], chs[i + 1], 4, stride=2, padding=1)]
            last = i == cfg.downsample - 1
            layers += [ResBlock(chs[i + 1]) for _ in range(cfg.res_blocks if not last or cfg.full_res_blocks else 0)]
        layers += [nn.GroupNorm(min(32, chs[-1] // 4), chs[-1]), nn.SiLU(), nn.Conv2d(chs[-1], cfg.channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # (B, c, h, w) -> (B, C, H, W)
        return self.net(z)


class Tokenizer(nn.Module):
    """RVQ-VAE: conv encoder -> RVQ over the (h, w) grid -> conv decoder (PAPER.md §9).

    Images are float (B, C, H, W) in [-1, 1]; codes are (B, h, w, D) int64.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.rvq = RVQ(cfg.depth, cfg.codebook_size, cfg.code_dim, shared=cfg.shared_codebook, decay=cfg.ema_decay)
        # s: maps quantized latents to unit variance for the generative model (measured after training).
        self.register_buffer("scale", torch.tensor(1.0))

    @property
    def config(self):
        return asdict(self.cfg)

    @property
    def latent_scale(self):
        return float(self.scale)

    def encode_latent(self, images):  # (B, C, H, W) -> (B, h, w, c)
        return self.encoder(images).permute(0, 2, 3, 1)

    def decode_latent(self, zq):  # (B, h, w, c) -> (B, C, H, W)
        return self.decoder(zq.permute(0, 3, 1, 2))

    @torch.no_grad()
    def encode(self, images):
        """Images (B, C, H, W) in [-1, 1] -> codes (B, h, w, D) int64."""
        return self.rvq.quantize(self.encode_latent(images))

    @torch.no_grad()
    def decode(self, codes, given=None):
        """Codes (B, h, w, D') -> images (B, C, H, W) in [-1, 1]; D' < D decodes a coarse prefix.
        given (B, h, w, D') bool: decode the sum of only those tokens' embeddings (the part a prompt keeps)."""
        emb = self.rvq.embed(codes.to(self.scale.device))  # (B, h, w, D', c)
        if given is not None:
            emb = emb * given.to(emb.device).unsqueeze(-1)
        zq = emb.sum(-2)
        return self.decode_latent(zq.to(next(self.decoder.parameters()).dtype)).float().clamp(-1, 1)

    def forward(self, images):
        """Training pass: returns (reconstruction, loss, stats)."""
        z = self.encode_latent(images)
        zq, codes, commit = self.rvq(z)
        recon = self.decode_latent(zq)
        rec = F.mse_loss(recon.float(), images.float())
        loss = rec + self.cfg.commit_weight * commit
        return recon, loss, {"recon_mse": rec.detach(), "commit": commit.detach()}


def load_tokenizer(path, device="cpu"):
    """Tokenizer in eval mode from a checkpoint written by `tokenizer.py train`."""
    ckpt = load_checkpoint(path, "tokenizer")
    try:
        cfg = TokenizerConfig(**ckpt["config"])
        tok = Tokenizer(cfg)
        tok.load_state_dict(strip_prefixes(ckpt["model"]))
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: tokenizer checkpoint does not match this code ({str(e).splitlines()[0][:160]})")
    return tok.to(device).eval()


#################################################################################
#                                  Image data                                   #
#################################################################################

def _read_idx(path):
    """Read an IDX file (the MNIST format), gzipped or not, into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}")


def _fashion_mnist(split, data_dir):
    data_dir = data_dir or FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [os.path.join(data_dir, f"{prefix}-{kind}{ext}") for ext in (".gz", "")]
        found = [p for p in cands if os.path.isfile(p)]
        if not found:
            raise UserError(f"Fashion-MNIST file {prefix}-{kind}.gz not found in {data_dir} "
                            f"(install it with: apt-get install dataset-fashion-mnist, or pass --data-dir)")
        paths.append(found[0])
    images, labels = _read_idx(paths[0]), _read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"Fashion-MNIST files in {data_dir} have unexpected shapes {images.shape}, {labels.shape}")
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]  # 28x28 -> 32x32, (N, 32, 32, 1)
    return images, labels.astype(np.int64), 10


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ImageFolder(torch.utils.data.Dataset):
    """An ImageNet-style folder of class folders (sorted class names -> labels 0..N-1), read lazily with Pillow."""

    def __init__(self, root, image_size):
        self.root, self.image_size = root, image_size
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not classes:
            raise UserError(f"{root} holds no class folders")
        self.files, labels = [], []
        for i, c in enumerate(classes):
            for name in sorted(os.listdir(os.path.join(root, c))):
                if name.lower().endswith(IMAGE_EXTS):
                    self.files.append(os.path.join(root, c, name))
                    labels.append(i)
        if not self.files:
            raise UserError(f"no images found in the class folders of {root}")
        self.classes, self.labels = classes, np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return torch.from_numpy(load_image_file(self.files[i], self.image_size)), int(self.labels[i])


def load_image_file(path, size):
    """Center crop to a square, resize to size x size (bicubic), RGB uint8 (size, size, 3)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}")


class ArrayImages(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]), int(self.labels[i])


def open_images(data, split="train", data_dir=None, image_size=None, limit=None):
    """An image data set: `fashion_mnist` (in memory) or an image folder (lazy). Returns (dataset, num_classes).

    dataset[i] -> (uint8 tensor (H, W, C), label); dataset.labels is an int64 numpy array.
    """
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r} (train or test)")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1 (got {limit})")
    if data == "fashion_mnist":
        images, labels, nc = _fashion_mnist(split, data_dir)
        if image_size not in (None, images.shape[1]):
            raise UserError(f"Fashion-MNIST images are {images.shape[1]}x{images.shape[1]} (padded); got --image-size {image_size}")
        ds = ArrayImages(images[:limit], labels[:limit])
        return ds, nc
    if not os.path.isdir(data):
        raise UserError(f"--data {data!r} is neither 'fashion_mnist' nor an existing folder")
    root = data
    for name in ((split,) if split == "train" else (split, "val")):
        if os.path.isdir(os.path.join(data, name)):
            root = os.path.join(data, name)
            break
    ds = ImageFolder(root, image_size or 256)
    nc = len(ds.classes)
    if limit is not None:
        ds.files, ds.labels = ds.files[:limit], ds.labels[:limit]
    return ds, nc


def load_images(data, split="train", data_dir=None, image_size=None, limit=None):
    """All images of a split in memory: (uint8 (N, H, W, C), int64 labels (N,), num_classes)."""
    ds, nc = open_images(data, split, data_dir, image_size, limit)
    if isinstance(ds, ArrayImages):
        return np.ascontiguousarray(ds.images), ds.labels, nc
    images = np.stack([ds[i][0].numpy() for i in range(len(ds))])
    return images, ds.labels, nc


def spread_indices(total, n=None):
    """min(n, total) indices spread evenly over 0..total-1 (all of them when n is None), int64 numpy."""
    n = total if n is None else min(n, total)
    return np.unique(np.linspace(0, total - 1, n).round().astype(np.int64))


def real_images(data, split, n=None, data_dir=None, image_size=None):
    """Up to n real images of a split, spread evenly over the split: (uint8 (n, H, W, C), labels (n,), num_classes).

    Evenly spaced indices, not the first n: image folders are sorted by class, so the first n images
    would cover only a few classes. Through open_images so that only the chosen files are read.
    """
    ds, num_classes = open_images(data, split, data_dir, image_size)
    idx = spread_indices(len(ds), n)
    if hasattr(ds, "images"):                                                     # in-memory (Fashion-MNIST)
        return np.ascontiguousarray(ds.images[idx]), ds.labels[idx], num_classes
    images = np.stack([ds[int(i)][0].numpy() for i in idx])
    return images, ds.labels[idx], num_classes


def to_float(images):
    """uint8 (N, H, W, C) numpy or tensor -> float (N, C, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x):
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C) numpy."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, nrow):
    """Write uint8 (N, H, W, C) images as one PNG grid with `nrow` images per row."""
    from PIL import Image
    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + 2) + 2, nrow * (w + 2) + 2, c), dtype=np.uint8)
    for i in range(n):
        y, x = divmod(i, nrow)
        grid[2 + y * (h + 2): 2 + y * (h + 2) + h, 2 + x * (w + 2): 2 + x * (w + 2) + w] = images[i]
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    os.close(fd)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format="PNG")
    publish(tmp, path)


#################################################################################
#                                 Code caches                                   #
#################################################################################

def write_code_cache(out, labels, meta):
    """Write labels.npy (int64) and meta.json into `out`, each by atomic rename (codes.npy is streamed by encode)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=out)
    with os.fdopen(fd, "wb") as f:
        np.save(f, np.asarray(labels, dtype=np.int64))
    publish(tmp, os.path.join(out, "labels.npy"))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=out)
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2)
    publish(tmp, os.path.join(out, "meta.json"))


# A code cache is a folder of: codes.npy (uint16 (N, L, D) or (N, h, w, D)), labels.npy (int64 (N,)) and
# meta.json (depth, codebook_size, grid, code_dim, latent_scale, num_classes); then either the tokenizer that made
# the codes (meta.json: tokenizer, tokenizer_hash; `tokenizer.py encode` writes these) or the codebooks themselves,
# codebooks.npy (float32 (D, V, c), the tokenizer's units; `save_code_cache` writes these, from any RVQ tokenizer).
META_KEYS = ("depth", "codebook_size", "grid", "code_dim", "latent_scale", "num_classes")
CODEBOOKS_FILE = "codebooks.npy"


def save_npy(path, array, dtype=None):
    """np.save to path (as `dtype`, default the array's) by atomic rename; the array is copied in chunks of rows,
    so a memory-mapped input never sits in RAM."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype or array.dtype, shape=array.shape)
        for i in range(0, len(array), 1 << 16):  # chunks of rows, as in code_range
            dst[i:i + (1 << 16)] = array[i:i + (1 << 16)]
        dst.flush()
        del dst
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def code_range(codes, chunk=1 << 16):
    """(smallest, largest) code of a (memory-mapped) array, read once in chunks of rows: ImageNet-sized caches
    never sit in RAM."""
    parts = [(int(np.min(codes[i:i + chunk])), int(np.max(codes[i:i + chunk]))) for i in range(0, len(codes), chunk)]
    return min(p[0] for p in parts), max(p[1] for p in parts)


@torch.no_grad()
def codes_latent_scale(codes, codebooks, max_rows=10000):
    """s = 1 / std of the quantized latents Σ_j e(x_j; j) of (up to max_rows evenly spread) code grids, the
    latent scale of PAPER.md §9 measured on the codes themselves.  codes (N, ..., D), codebooks (D, V, c)."""
    x = torch.from_numpy(np.asarray(codes[spread_indices(len(codes), max_rows)]).astype(np.int64))
    D, V, c = codebooks.shape
    zq = F.embedding(x + torch.arange(D) * V, torch.as_tensor(codebooks).float().reshape(D * V, c)).sum(-2).double()
    return 1.0 / max(float(zq.std(unbiased=False)), 1e-12)  # as measure_latent_scale: the population std


def save_code_cache(out, codes, labels, codebooks, latent_scale=None, num_classes=None):
    """Write a code cache that carries its own codebooks, from the codes of any RVQ tokenizer (an RQ-VAE, EnCodec,
    DAC, Mimi, ...). train.py trains on it with no tokenizer checkpoint; sample.py --codes-out samples codes from it.

    codes: ints (N, L, D) (sequences, e.g. audio frames) or (N, h, w, D) (image grids), each in 0..V-1.
    labels: ints (N,) in 0..num_classes-1, or None (one class: unconditional data).
    codebooks: float (D, V, c), code v of depth j is codebooks[j, v] (the tokenizer's units; a shared codebook is
    repeated D times). latent_scale: s, default 1 / std of the quantized latents of the codes (PAPER.md §9).
    num_classes: default labels.max() + 1. Memory-mapped inputs are copied in chunks.
    Writes out/codes.npy (uint16), labels.npy (int64), codebooks.npy (float32) and meta.json; returns the meta dict.
    """
    codebooks = np.asarray(codebooks)
    if codebooks.ndim != 3 or not np.issubdtype(codebooks.dtype, np.floating) or not np.isfinite(codebooks).all():
        raise UserError(f"codebooks must be finite floats of shape (D, V, c), got {codebooks.dtype} {codebooks.shape}")
    D, V, c = codebooks.shape
    codes = codes if isinstance(codes, np.ndarray) else np.asarray(codes)  # a memmap stays a memmap
    if V > 65536:
        raise UserError(f"codebooks hold {V} codes per depth; code caches store uint16 (at most 65536)")
    if codes.ndim not in (3, 4) or codes.shape[-1] != D or not np.issubdtype(codes.dtype, np.integer) or not codes.size:
        raise UserError(f"codes must be integers of shape (N, L, {D}) or (N, h, w, {D}) for codebooks of depth {D}, "
                        f"got {codes.dtype} {codes.shape}")
    lo, hi = code_range(codes)
    if lo < 0 or hi >= V:
        raise UserError(f"codes must be in 0..{V - 1} (the codebooks hold {V} codes), got {lo}..{hi}")
    labels = np.zeros(len(codes), np.int64) if labels is None else np.asarray(labels)
    if labels.shape != (len(codes),) or not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
        raise UserError(f"labels must be {len(codes)} non-negative integers, got {labels.dtype} {labels.shape}")
    num_classes = int(labels.max(initial=0)) + 1 if num_classes is None else int(num_classes)
    if labels.max(initial=0) >= num_classes:
        raise UserError(f"labels go up to {int(labels.max())} but num_classes is {num_classes}")
    if latent_scale is None:
        latent_scale = codes_latent_scale(codes, codebooks)
    if not (np.isfinite(latent_scale) and latent_scale > 0):
        raise UserError(f"latent_scale must be a positive number, got {latent_scale}")
    check_writable_dir(out)
    save_npy(os.path.join(out, "codes.npy"), codes, np.uint16)
    save_npy(os.path.join(out, CODEBOOKS_FILE), codebooks, np.float32)
    meta = {"depth": D, "codebook_size": V, "grid": list(codes.shape[1:-1]), "code_dim": c,
            "latent_scale": float(latent_scale), "num_classes": num_classes,
            "codebooks_hash": file_hash(os.path.join(out, CODEBOOKS_FILE))}
    write_code_cache(out, labels, meta)
    return meta


def load_code_cache(path):
    """(codes uint16 memmap (N, L, D) or (N, h, w, D), labels int64 (N,), meta dict); UserError on anything wrong."""
    if not os.path.isdir(path):
        raise UserError(f"code cache folder not found: {path}")
    files = {n: os.path.join(path, n) for n in ("codes.npy", "labels.npy", "meta.json")}
    for n, p in files.items():
        if not os.path.isfile(p):
            raise UserError(f"{path} is not a code cache: {n} missing (make one with `python tokenizer.py encode` "
                            f"or tokenizer.save_code_cache)")
    try:
        with open(files["meta.json"]) as f:
            meta = json.load(f)
        codes = np.load(files["codes.npy"], mmap_mode="r")
        labels = np.load(files["labels.npy"], mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read code cache {path}: {e}")
    missing = [k for k in META_KEYS if k not in meta]
    if "tokenizer_hash" not in meta and not os.path.isfile(os.path.join(path, CODEBOOKS_FILE)):
        missing.append(f"tokenizer_hash (or a {CODEBOOKS_FILE} beside it)")
    if missing:
        raise UserError(f"{files['meta.json']} lacks {', '.join(missing)}")
    if codes.ndim not in (3, 4) or codes.shape[-1] != meta["depth"]:
        raise UserError(f"{files['codes.npy']} has shape {codes.shape}; expected (N, L, {meta['depth']}) or "
                        f"(N, h, w, {meta['depth']})")
    if int(np.prod(meta["grid"])) != int(np.prod(codes.shape[1:-1])):
        raise UserError(f"{files['codes.npy']} has {int(np.prod(codes.shape[1:-1]))} positions per item but "
                        f"meta.json's grid {meta['grid']} has {int(np.prod(meta['grid']))}")
    if labels.shape != (codes.shape[0],):
        raise UserError(f"{path}: {codes.shape[0]} code grids but labels of shape {labels.shape}")
    return codes, labels, meta


def load_cache_codebooks(path, meta):
    """The codebooks a code cache carries (codebooks.npy): float32 tensor (D, V, c) in the tokenizer's units, or
    None when the cache names its tokenizer instead. UserError when the file does not fit meta.json."""
    file = os.path.join(path, CODEBOOKS_FILE)
    if not os.path.isfile(file):
        return None
    try:
        codebooks = np.load(file)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {file}: {e}")
    want = (meta["depth"], meta["codebook_size"], meta["code_dim"])
    if codebooks.shape != want or not np.issubdtype(codebooks.dtype, np.floating):
        raise UserError(f"{file} holds {codebooks.dtype} {codebooks.shape}; meta.json says float (D, V, c) = {want}")
    if not np.isfinite(codebooks).all():
        raise UserError(f"{file} holds NaN or inf")
    if meta.get("codebooks_hash") not in (None, file_hash(file)):  # the hash ties checkpoints to these codebooks
        raise UserError(f"{file} (hash {file_hash(file)}) is not the file meta.json records ({meta['codebooks_hash']})")
    return torch.from_numpy(codebooks.astype(np.float32))


#################################################################################
#                                Commands                                       #
#################################################################################

def setup_dist():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python` run is a world of one."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def teardown_dist(world):
    """End a torchrun process group. The barrier first: a rank that tears down while another is still writing
    the checkpoint can abort inside gloo ("terminate called without an active exception"). Callers drop their DDP
    wrapper first and it is collected here: its reducer holds the group, which would otherwise be freed during
    interpreter shutdown, where gloo's threads have aborted a finished run the same way."""
    if world > 1:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


@torch.no_grad()
def measure_latent_scale(tok, images, batch_size=256):
    """s = 1 / std of the quantized latents over `images` (uint8 (N, H, W, C)): scaled latents have unit variance."""
    dev = tok.scale.device
    total, total_sq, n = 0.0, 0.0, 0
    for i in range(0, len(images), batch_size):
        zq = tok.rvq.dequantize(tok.encode(to_float(images[i:i + batch_size]).to(dev))).double()
        total += zq.sum().item()
        total_sq += zq.pow(2).sum().item()
        n += zq.numel()
    var = total_sq / n - (total / n) ** 2
    return 1.0 / math.sqrt(max(var, 1e-12))


@torch.no_grad()
def psnr_by_depth(tok, images, batch_size=256):
    """How much each RVQ depth carries, over `images` (in [0, 1] for the PSNR). Returns a dict:
    psnr (D,): dB of reconstructions decoded from depth prefixes 1..D; psnr_latent: dB of the unquantised latent
    decoded, the ceiling no depth can pass; residual_db (D,): the latent's relative residual after each prefix,
    10·log10(Σ‖z − Σ_{j≤d} e_j‖² / Σ‖z‖²); perplexity (D,) and used (D,): code usage per depth."""
    dev = tok.scale.device
    D, V = tok.rvq.depth, tok.rvq.codebook_size
    se = torch.zeros(D, dtype=torch.float64)
    residual = torch.zeros(D, dtype=torch.float64)
    se_latent, energy = 0.0, 0.0
    counts = torch.zeros(D, V, dtype=torch.float64)
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size]).to(dev)
        z = tok.encode_latent(x).float()  # (B, h, w, c)
        codes = tok.rvq.quantize(z)
        for j in range(D):
            counts[j] += torch.bincount(codes[..., j].flatten(), minlength=V).double().cpu()
        prefix = tok.rvq.prefix_sums(codes)  # (B, h, w, D, c): the quantised latent after each depth
        residual += (z.unsqueeze(-2) - prefix).pow(2).sum((0, 1, 2, 4)).double().cpu()
        energy += z.pow(2).sum().double().item()
        for d in range(1, D + 1):
            rec = tok.decode(codes[..., :d])
            se[d - 1] += ((rec - x) / 2).pow(2).double().sum().cpu()
        se_latent += ((tok.decode_latent(z).float().clamp(-1, 1) - x) / 2).pow(2).double().sum().item()
    pixels = len(images) * images[0].size
    p = counts / counts.sum(-1, keepdim=True)
    return {"psnr": (10 * torch.log10(pixels / se)).tolist(),
            "psnr_latent": 10 * math.log10(pixels / max(se_latent, 1e-30)),
            "residual_db": (10 * torch.log10(residual / max(energy, 1e-30))).tolist(),
            "perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum(-1)).tolist(),
            "used": (counts > 0).double().mean(-1).tolist()}


def tokenizer_config(args):
    """The RVQ-VAE's architecture as a dict: --config's, with the flags that override it, checked."""
    if args.config not in CONFIGS:
        raise UserError(f"unknown --config {args.config!r} (choose from {', '.join(CONFIGS)})")
    overrides = {k: v for k, v in dict(depth=args.depth, codebook_size=args.codebook_size, code_dim=args.code_dim,
                                       shared_codebook=args.shared_codebook or None,
                                       commit_weight=args.commit_weight).items() if v is not None}
    base = {**CONFIGS[args.config], **overrides}
    if base["depth"] < 1 or base["codebook_size"] < 2 or base["code_dim"] < 1:
        raise UserError(f"--depth must be >= 1, --codebook-size >= 2, --code-dim >= 1 (got {base['depth']}, "
                        f"{base['codebook_size']}, {base['code_dim']})")
    if args.commit_weight is not None and not args.commit_weight >= 0:
        raise UserError(f"--commit-weight must be >= 0 (got {args.commit_weight})")
    if base["codebook_size"] > 65536:
        raise UserError("--codebook-size must be <= 65536 (code caches store uint16)")
    return base


def tokenizer_batch(ds, step, args, rank, world, device):
    """This rank's images of the global batch of `step`, in [-1, 1]. The order is a pure function of (seed, epoch):
    resuming at any step replays the same batches."""
    n, per_rank = len(ds), args.batch_size // world
    epoch, pos = divmod(step, max(1, n // args.batch_size))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000003 + epoch))
    idx = perm[pos * args.batch_size:(pos + 1) * args.batch_size]
    if len(idx) < args.batch_size:  # fewer images than one batch: sample with replacement
        idx = torch.randint(0, n, (args.batch_size,), generator=torch.Generator().manual_seed(args.seed + step))
    idx = idx[rank * per_rank:(rank + 1) * per_rank]
    return to_float(torch.stack([ds[int(i)][0] for i in idx])).to(device)


def save_tokenizer(tok, opt, ds, step, args, num_classes, path):
    """last.pt; the one written at --steps first measures the latent scale s on the training images (PAPER.md §9),
    once training has ended."""
    if step == args.steps:
        tok.eval()
        imgs = np.stack([ds[i][0].numpy() for i in range(min(len(ds), 5000))])
        tok.scale.fill_(measure_latent_scale(tok, imgs))
        tok.train()
    save_checkpoint({"kind": "tokenizer", "config": asdict(tok.cfg), "model": tok.state_dict(),
                     "optimizer": opt.state_dict(), "step": step, "num_classes": num_classes,
                     "args": vars(args)}, path)


def resume_tokenizer(path, tok, opt, rank):
    """Model and optimiser from last.pt when it exists; returns the step to go on from (0: a new run)."""
    if not os.path.exists(path):
        return 0
    ckpt = load_checkpoint(path, "tokenizer")
    if ckpt["config"] != asdict(tok.cfg):
        raise UserError(f"{path} was trained with another configuration; use a new --out")
    tok.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if rank == 0:
        print(f"resuming from {path} at step {ckpt['step']}", flush=True)
    return ckpt["step"]


def cmd_train(args):
    """`train`: the RVQ-VAE on images, single process or torchrun DDP, resumed from OUT/last.pt when it exists."""
    rank, world = setup_dist()
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1 (got {args.steps})")
    if args.batch_size < 1 or args.batch_size % world:
        raise UserError(f"--batch-size must be a positive multiple of the number of processes ({world})")
    device = parse_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    base = tokenizer_config(args)
    ds, num_classes = open_images(args.data, "train", args.data_dir, args.image_size or base["image_size"], args.limit)
    cfg = TokenizerConfig(**fit_to_images(base, ds[0][0].shape, args.grid))
    if rank == 0:
        check_writable_dir(args.out)
    torch.manual_seed(args.seed)
    tok = Tokenizer(cfg).to(device)
    opt = torch.optim.AdamW(tok.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ckpt_path = os.path.join(args.out, "last.pt")
    step = resume_tokenizer(ckpt_path, tok, opt, rank)
    model = tok
    if world > 1:
        model = nn.parallel.DistributedDataParallel(tok, broadcast_buffers=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    t0, last_log, start_step = time.time(), step, step
    tok.train()
    while step < args.steps:
        x = tokenizer_batch(ds, step, args, rank, world, device)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.5 * (1 + math.cos(math.pi * step / args.steps)) * 0.9 + 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast:
            _, loss, stats = model(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        step += 1
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            perp, _ = tok.rvq.usage_stats()
            rate = (step - last_log) / (time.time() - t0)
            t0, last_log = time.time(), step
            psnr = -10 * math.log10(max(stats["recon_mse"].item() / 4, 1e-12))
            print(f"step {step:6d} | loss {loss.item():.4f} | psnr {psnr:5.2f} dB | commit {stats['commit'].item():.4f} | "
                  f"perplexity/depth {' '.join(f'{p:.0f}' for p in perp)} | {rate:.2f} steps/s", flush=True)
        if rank == 0 and (step % args.ckpt_every == 0 or step == args.steps):
            save_tokenizer(tok, opt, ds, step, args, num_classes, ckpt_path)
    if rank == 0:
        done = f"saved {ckpt_path}" if step > start_step else f"{ckpt_path} is already at --steps; nothing to train"
        print(f"{done} (step {step}, latent scale s = {tok.latent_scale:.4f})", flush=True)
    del model  # the DDP wrapper, before the group it holds ends (teardown_dist)
    teardown_dist(world)


def cmd_encode(args):
    device = parse_device(args.device)
    tok = load_tokenizer(args.ckpt, device)
    ds, num_classes = open_images(args.data, args.split, args.data_dir, tok.cfg.image_size, args.limit)
    sample = ds[0][0]
    if sample.shape[0] != tok.cfg.image_size or sample.shape[-1] != tok.cfg.channels:
        raise UserError(f"tokenizer expects {tok.cfg.image_size}x{tok.cfg.image_size}x{tok.cfg.channels} images, "
                        f"--data gives {tuple(sample.shape)}")
    check_writable_dir(args.out)
    g = tok.cfg.grid
    n = len(ds)
    # Write into a temporary .npy memmap (ImageNet-sized caches never sit in RAM), then rename into place.
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=args.out)
    os.close(fd)
    try:
        codes = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(n, g, g, tok.cfg.depth))
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
        t0, i = time.time(), 0
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
        for x, _ in loader:
            with torch.no_grad(), autocast:
                c = tok.encode(to_float(x).to(device))
            codes[i:i + len(x)] = c.cpu().numpy().astype(np.uint16)
            i += len(x)
            if i % (args.batch_size * 20) < args.batch_size or i == n:
                print(f"encoded {i}/{n} images ({i / (time.time() - t0):.0f} images/s)", file=sys.stderr, flush=True)
        codes.flush()
        del codes
        publish(tmp, os.path.join(args.out, "codes.npy"))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    meta = {"depth": tok.cfg.depth, "codebook_size": tok.cfg.codebook_size, "grid": [g, g],
            "code_dim": tok.cfg.code_dim, "latent_scale": tok.latent_scale, "num_classes": num_classes,
            "image_size": tok.cfg.image_size, "channels": tok.cfg.channels, "split": args.split,
            "data": args.data, "tokenizer": os.path.abspath(args.ckpt), "tokenizer_hash": file_hash(args.ckpt)}
    write_code_cache(args.out, ds.labels, meta)
    print(f"wrote {n} code grids {g}x{g}x{tok.cfg.depth} to {args.out} in {time.time() - t0:.1f} s", flush=True)


def cmd_reconstruct(args):
    device = parse_device(args.device)
    tok = load_tokenizer(args.ckpt, device)
    images, _, _ = load_images(args.data, args.split, args.data_dir, tok.cfg.image_size, args.limit)
    folder = os.path.dirname(os.path.abspath(args.out))
    check_writable_dir(folder)
    stats = psnr_by_depth(tok, images)
    print(f"{len(images)} {args.split} images, codebook size {tok.cfg.codebook_size}; the unquantised latent "
          f"decodes to {stats['psnr_latent']:.2f} dB")
    print("depth | PSNR (dB) | gap to latent (dB) | latent residual (dB) | perplexity | codes used")
    for d in range(tok.cfg.depth):
        print(f"{d + 1:5d} | {stats['psnr'][d]:9.2f} | {stats['psnr_latent'] - stats['psnr'][d]:18.2f} | "
              f"{stats['residual_db'][d]:20.2f} | {stats['perplexity'][d]:10.1f} | {stats['used'][d] * 100:9.1f}%")
    print(json.dumps({**stats, "n": len(images)}))
    # The picture: originals on top, then decodes from depth prefixes 1..D (coarse to fine).
    k = min(args.show, len(images))
    x = to_float(images[:k]).to(device)
    codes = tok.encode(x)
    rows = [images[:k]] + [to_uint8(tok.decode(codes[..., :d])) for d in range(1, tok.cfg.depth + 1)]
    save_grid(np.concatenate(rows), args.out, nrow=k)
    print(f"wrote {args.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description="RVQ tokenizer: train, encode to a code cache, reconstruct.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def data_args(q):
        q.add_argument("--data", default="fashion_mnist", help="'fashion_mnist' or an ImageNet-style folder of class folders")
        q.add_argument("--data-dir", default=None, help=f"folder of the Fashion-MNIST IDX files (default {FASHION_MNIST_DIR})")
        q.add_argument("--limit", type=int, default=None, help="use only the first N images")
        q.add_argument("--device", default=default_device(), help=DEVICE_HELP)

    t = sub.add_parser("train", help="train the RVQ-VAE")
    data_args(t)
    t.add_argument("--out", default="runs/tokenizer", help="run folder for last.pt (rerunning resumes from it)")
    t.add_argument("--config", default="fmnist", help=f"named architecture: {', '.join(CONFIGS)} (channels follow "
                   "the data)")
    t.add_argument("--image-size", type=int, default=None, help="resize folder images to this size (default: the config's)")
    t.add_argument("--grid", type=int, default=None,
                   help="h = w of the code grid, image size / a power of 2 (default: the config's downsampling)")
    t.add_argument("--depth", type=int, default=None, help="D: RVQ depth (default: the config's)")
    t.add_argument("--codebook-size", type=int, default=None, help="V: codes per codebook (default: the config's)")
    t.add_argument("--code-dim", type=int, default=None, help="c: latent dimension (default: the config's)")
    t.add_argument("--shared-codebook", action="store_true", help="one codebook for all depths")
    t.add_argument("--commit-weight", type=float, default=None,
                   help="beta of the cumulative commitment loss (default: the config's, 0.25)")
    t.add_argument("--steps", type=int, default=600, help="optimiser steps")
    t.add_argument("--batch-size", type=int, default=128, help="global batch (split over torchrun processes)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay to 10%%)")
    t.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    t.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    t.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints (and one at --steps, "
                   "with the latent scale s)")

    e = sub.add_parser("encode", help="encode a split into a code cache (codes.npy, labels.npy, meta.json)")
    data_args(e)
    e.add_argument("--ckpt", default="runs/tokenizer/last.pt", help="tokenizer checkpoint")
    e.add_argument("--split", default="train", choices=["train", "test"], help="the split to encode")
    e.add_argument("--out", required=True, help="code cache folder: codes.npy, labels.npy, meta.json")
    e.add_argument("--batch-size", type=int, default=500, help="images per encoder pass")
    e.add_argument("--workers", type=int, default=0, help="DataLoader workers (image folders)")

    r = sub.add_parser("reconstruct", help="PSNR and code usage per depth, and a coarse-to-fine picture")
    data_args(r)
    r.add_argument("--ckpt", default="runs/tokenizer/last.pt", help="tokenizer checkpoint")
    r.add_argument("--split", default="test", choices=["train", "test"], help="the split to reconstruct")
    r.add_argument("--out", default="recon.png", help="the picture: originals, then decodes from depths 1..d for "
                   "d = 1..D")
    r.add_argument("--show", type=int, default=8, help="images in the picture")

    args = p.parse_args(argv)
    for k in ("steps", "batch_size", "log_every", "ckpt_every", "show"):
        if getattr(args, k, 1) is not None and getattr(args, k, 1) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1 (got {getattr(args, k)})")
    for k in ("depth", "codebook_size", "code_dim", "grid", "image_size"):
        v = getattr(args, k, None)
        if v is not None and v < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1 (got {v})")
    {"train": cmd_train, "encode": cmd_encode, "reconstruct": cmd_reconstruct}[args.cmd](args)


if __name__ == "__main__":
    run_cli(main)
