"""
ResGen: masked generative modelling of RVQ tokens by predicting cumulative embeddings (arXiv 2412.10208).

This file holds the forward masking process, the transformer, the two output heads (mixture of Gaussians
over the cumulative embedding, and the "predict tokens directly" ablation), the confidence-ordered
sampler, and the named model sizes (PAPER.md §3-§5; this code's choices: §10-§13). It is a library: train with
train.py, sample with sample.py.

    import resgen, tokenizer
    tok = tokenizer.load_tokenizer("runs/tokenizer/last.pt")
    cfg = resgen.make_config("small", length=64, depth=tok.rvq.depth, codebook_size=tok.rvq.codebook_size,
                             code_dim=tok.rvq.dim, num_classes=10)
    model = resgen.ResGen(cfg, tok.rvq.codebooks * tok.latent_scale)
    loss, stats = model(codes, labels)                        # codes (B, L, D) int64, labels (B,)
    codes = model.generate(labels, steps=16, cfg=2.0)         # (B, L, D) int64
    model = resgen.load_resgen("runs/resgen/last.pt")         # a checkpoint generates on its own
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import (UserError, check_sizes, config_from_checkpoint, keep_codebooks, load_checkpoint,
                         model_from_checkpoint, prompt_tensors, sized_config)


#################################################################################
#                          Masking schedules γ(r)                               #
#################################################################################
# γ maps r in [0, 1] to the masked fraction: γ(0) = 1 (all masked), γ(1) = 0 (all revealed). Training
# draws r ~ U[0, 1) (PAPER.md §3); the sampler follows γ(s/T) after step s (PAPER.md §5). One registry
# serves both, so the two always agree.

SCHEDULES = {
    "cosine": lambda r: torch.cos(0.5 * math.pi * r),        # MaskGIT's choice; ∫γ = 2/π
    "linear": lambda r: 1.0 - r,                              # ∫γ = 1/2
    "arccos": lambda r: torch.arccos(r) * (2.0 / math.pi),    # masks more at the start; ∫γ = 2/π
}


def gamma(schedule, r):
    """Masking schedule γ(r) (PAPER.md §3): fraction of the L·D tokens that are masked at time r."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown masking schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    return SCHEDULES[schedule](r)


def masking_plan(steps, total, schedule="cosine"):
    """Number of tokens still masked after each sampling step s = 0..T (PAPER.md §5).

    masked[s] = floor(γ(s/T)·total), but at least one token is revealed per step (while any is left) and all
    are revealed at s = T. total: an int or an int64 tensor (...,) of tokens to generate (per row, when a prompt
    gives some of them). Returns int64 (..., T + 1) on total's device, computed without leaving it, so the
    sampler can plan per row before its step loop and the loop never syncs.
    """
    total = torch.as_tensor(total, dtype=torch.long)
    s = torch.arange(steps + 1, dtype=torch.float64) / steps
    target = torch.floor(gamma(schedule, s).to(total.device) * total.unsqueeze(-1)).long()  # (..., T+1)
    target[..., 0] = total
    # m_s = max(0, min(t_s, m_{s-1} - 1)) unrolls to max(0, min_{s' <= s}(t_{s'} + s') - s): a running min, no loop
    t = torch.arange(steps + 1, device=total.device)
    masked = ((target + t).cummin(-1).values - t).clamp_min(0)
    masked[..., -1] = 0
    return masked


#################################################################################
#                      Forward masking (training), PAPER.md §3                  #
#################################################################################

def suffix_mask(num_masked, depth):
    """Mask the k_i deepest depths at each position.  num_masked (..., ) int -> (..., D) bool, True = masked."""
    d = torch.arange(depth, device=num_masked.device)
    return d >= (depth - num_masked).unsqueeze(-1)


def random_masks(n, length, depth, generator=None):
    """Choose n[b] of the L·D slots uniformly at random and mask the k_i deepest depths at every position,
    where k_i = number of chosen slots at position i (multivariate hypergeometric counts, PAPER.md §3).

    n (B,) int64 -> (B, L, D) bool. One batched rank of uniform noise: no Python loop over the batch.
    """
    B, N = n.shape[0], length * depth
    noise = torch.rand(B, N, generator=generator, device=n.device)
    rank = noise.argsort(-1).argsort(-1)  # (B, N): a uniform random permutation per row
    picked = (rank < n.unsqueeze(-1)).view(B, length, depth)
    return suffix_mask(picked.sum(-1), depth)  # (B, L, D)


def sample_mask(batch, length, depth, generator=None, device=None, schedule="cosine"):
    """Forward masking process (PAPER.md §3, §10).

    r ~ U[0, 1); n = clamp(ceil(γ(r)·L·D), 1, L·D) masked tokens, placed by `random_masks`.
    Returns (B, L, D) bool, True = masked; at every position the masked set is a suffix of depths.
    """
    N = length * depth
    r = torch.rand(batch, generator=generator, device=device)
    n = torch.ceil(gamma(schedule, r) * N).long().clamp(1, N)  # (B,)
    return random_masks(n, length, depth, generator=generator)


#################################################################################
#                        Cumulative embeddings, PAPER.md §2                     #
#################################################################################

def code_rows(codebooks, depth, code):
    """e(v; j) for one (depth j, code v) pair per entry: codebooks (D, V, c), depth and code (...) int64 -> (..., c)."""
    D, V, c = codebooks.shape
    return F.embedding(depth * V + code, codebooks.reshape(D * V, c))


def embed_codes(codes, codebooks):
    """Per-depth code embeddings e(x_ij; j).  codes (..., D) int64, codebooks (D, V, c) -> (..., D, c)."""
    return code_rows(codebooks, torch.arange(codebooks.shape[0], device=codes.device), codes)


def cumulative_embeddings(codes, mask, codebooks):
    """Split the quantized latent into its visible and masked parts (PAPER.md §2).

    visible_i = Σ_j [x_ij revealed]·e(x_ij; j) is the model's input; z_i = Σ_j [x_ij masked]·e(x_ij; j)
    is the cumulative embedding of the masked tokens, the MoG head's target. Their sum is the full latent.
    codes (B, L, D), mask (B, L, D) bool -> (visible (B, L, c), target (B, L, c)) float32.
    """
    emb = embed_codes(codes, codebooks)  # (B, L, D, c)
    m = mask.unsqueeze(-1).to(emb.dtype)
    target = (emb * m).sum(-2)
    visible = (emb * (1.0 - m)).sum(-2)
    return visible, target


#################################################################################
#                                 Config and sizes                              #
#################################################################################

LOW_RANK_ABOVE = 64      # latent widths c above this get low-rank MoG offsets by default ...
LOW_RANK = 64            # ... of this rank (the authors' code uses 64 for its means), lowered so that ...
OFFSET_OUTPUTS = 1 << 14  # ... K·r stays at the free-means head's 256·64 (BENCHMARKS.md §2: V = 16384 has K = V)


@dataclass
class ResGenConfig:
    length: int                  # L: latent positions (h·w), 64 for ImageNet 256 (8x8)
    depth: int                   # D: RVQ depth (8 or 16 in the paper)
    codebook_size: int           # V: codes per codebook
    code_dim: int                # c: latent dimension of a code
    num_classes: int             # class labels 0..num_classes-1; row num_classes is the null class (CFG)
    width: int                   # C: transformer width
    layers: int                  # DiT blocks
    heads: int                   # attention heads
    components_per_code: int = -1  # M: MoG components per code of depth p (K = V·M); -1 = auto (RESULTS.md §1.3)
    head_layers: int = 2         # gated-MLP blocks in the MoG head before its projections
    offset_rank: int = -1        # r: per-component offsets as r-vectors lifted by c×r matrices; 0 = full; -1 = auto
    classification_weight: float = -1.0  # λ on the MoG head's classification term; -1 = c (RESULTS.md §1)
    log_scale_min: float = -4.0  # floor of the MoG head's log-scale s (the authors' e^−4): a discrete target lets σ → 0
    head: str = "mog"            # "mog" (the paper) or "tokens" (predict tokens directly, the ablation)
    mlp_ratio: float = 4.0       # MLP hidden width = mlp_ratio·C, as in DiT
    dropout: float = 0.0         # dropout in attention and MLP (DiT uses none)
    label_dropout: float = 0.1   # p of replacing the label by the null class in training (CFG)
    schedule: str = "cosine"     # masking schedule γ for training (the sampler takes its own)
    text_vocab: int = 0          # phoneme symbols of a text prefix (zero-shot TTS, PAPER.md §6); 0 = no text; 0 pads
    text_length: int = 0         # P: prefix positions before the L code positions: never masked, never scored

    def __post_init__(self):
        if self.components_per_code == -1:  # 4 (draws a position's depths jointly) while K = V·M stays <= 2^14
            self.components_per_code = max(1, min(4, OFFSET_OUTPUTS // max(1, self.codebook_size)))
        if self.offset_rank == -1:  # full offsets while they are cheap; low rank for wide latents (imagenet256: c = 256)
            K = max(1, self.codebook_size * self.components_per_code)
            self.offset_rank = 0 if self.code_dim <= LOW_RANK_ABOVE else max(1, min(LOW_RANK, OFFSET_OUTPUTS // K))
        if self.classification_weight == -1:  # one K-way term per position against a regression over c dimensions
            self.classification_weight = float(self.code_dim)
        check_sizes(self, ("length", "depth", "codebook_size", "code_dim", "width", "layers", "heads",
                           "components_per_code"))
        if self.head not in HEADS:
            raise UserError(f"unknown head {self.head!r}; choose from {', '.join(HEADS)}")
        if not 0 <= self.offset_rank < self.code_dim:
            raise UserError(f"ResGenConfig.offset_rank must be 0 (full offsets) or in 1..{self.code_dim - 1}, "
                            f"got {self.offset_rank}")
        if self.head_layers < 0 or not self.classification_weight > 0:
            raise UserError(f"ResGenConfig: head_layers >= 0 and classification_weight > 0 (or -1 for c) required, "
                            f"got {self.head_layers}, {self.classification_weight}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown masking schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.text_vocab < 0 or self.text_length < 0 or (self.text_vocab > 0) != (self.text_length > 0):
            raise UserError(f"ResGenConfig: text_vocab and text_length are both 0 (no text) or both positive, got "
                            f"{self.text_vocab}, {self.text_length}")


# Named sizes, like DiT's registry. xl is the DiT-XL block stack: 574M parameters at L = 64, D = 16
# (PAPER.md §4 and §6: the paper's ImageNet models have 574M).
SIZES = {
    "tiny":  dict(width=64, layers=2, heads=4),      # tests: seconds on a CPU
    "small": dict(width=192, layers=6, heads=3),     # Fashion-MNIST demo on a CPU (4M parameters)
    "mini":  dict(width=128, layers=4, heads=4),     # make tts on one CPU thread (speech.py)
    "base":  dict(width=768, layers=12, heads=12),   # DiT-B
    "large": dict(width=1024, layers=24, heads=16),  # DiT-L
    "xl":    dict(width=1152, layers=24, heads=16),  # DiT-XL, the paper's 574M
}


def make_config(size, **overrides):
    """ResGenConfig from a named size in SIZES plus the data-dependent fields (length, depth, ...)."""
    return sized_config(ResGenConfig, SIZES, size, overrides)


#################################################################################
#                            Transformer (DiT blocks)                           #
#################################################################################

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention: every position sees every other (masked modelling)."""

    def __init__(self, width, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):  # (B, L, C)
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, C/H)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    """DiT block with adaLN-Zero: the class embedding sets shift/scale/gate of both sub-layers; gates start
    at zero so every block starts as the identity (stable training of deep stacks, DiT §3.2)."""

    def __init__(self, width, heads, mlp_ratio, dropout):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, cond):  # x (B, L, C), cond (B, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


def dit_initialize(model, embeddings, ada_layers):
    """DiT initialisation: xavier linears with zero biases, small embeddings, and zero adaLN modulation (adaLN-Zero:
    every block starts as the identity)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for emb in embeddings:
        nn.init.normal_(emb, std=0.02)
    for layer in ada_layers:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


#################################################################################
#                           Sampling helpers (shared)                           #
#################################################################################

def sampling_rows(labels, batch_size, cfg, null_class, device):
    """(B, guided, the class of each transformer row (R,)): R = 2B when classifier-free guidance is on (cfg != 1), the
    conditional rows first, then the null-class rows; R = B otherwise. labels (B,) or None (unconditional: then
    batch_size gives B). Guidance needs a class: all-null labels sample as labels=None does."""
    if labels is None:
        if batch_size is None:
            raise UserError("unconditional sampling (labels=None) needs batch_size")
        return batch_size, False, torch.full((batch_size,), null_class, dtype=torch.long, device=device)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > null_class):
        raise UserError(f"labels must be in 0..{null_class} ({null_class} = unconditional), "
                        f"got {int(labels.min())}..{int(labels.max())}")
    guided = cfg != 1.0 and labels.numel() > 0 and int(labels.min()) < null_class
    labels = labels.to(device=device, dtype=torch.long)
    return labels.shape[0], guided, torch.cat([labels, torch.full_like(labels, null_class)]) if guided else labels


def gumbel(shape, generator, device):
    """Standard Gumbel noise -log(-log U)."""
    u = torch.rand(shape, generator=generator, device=device).clamp_min(1e-20)
    return -torch.log(-torch.log(u))


def top_p_filter(logits, top_p):
    """Nucleus filtering: keep the most likely entries whose mass reaches top_p (always the top one);
    the rest get -inf. logits (..., K) -> (..., K)."""
    if top_p >= 1.0:
        return logits
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # the mass before this entry already reaches top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


LOG2E = 1.4426950408889634  # e^x = 2^(x·log2 e): torch.exp2 runs about twice as fast as torch.exp on the CPU
EXP2_FLOOR = -115.0  # 2^-115 = 2.4e-35: a term below it cannot change a sum >= 1 in fp32
REQUANTIZE_ROWS = 1 << 16  # positions per block: a (rows, V) fp32 distance block is 1 GiB at V = 4096, whatever B is


def requantize(z, start, codebooks, log_scale, first=None):
    """Re-quantization of a sampled cumulative embedding with per-token confidence (PAPER.md §5, §12).

    Greedy RVQ of z from depth start_i to D-1 with the (scaled) codebooks: x_ij = argmin_v ||r_{j-1} - e(v;j)||²,
    r_j = r_{j-1} - e(x_ij; j). The log-probability of the chosen code is log softmax_v(-||r_{j-1} - e(v;j)||²/(2σ²))
    with σ = e^s, the position's scale: how clearly z picks that code at the scale the model is unsure at.
    first (B, L) int64, optional: the code to emit at depth start_i instead of the argmin (the MoG head's drawn
    code), with its own log-probability; the depths below are then the greedy RVQ of z − e(first; start_i).
    All D depths are looped over, subtracting only where j >= start_i; positions go in blocks of REQUANTIZE_ROWS so
    the (positions, V) distances never set the batch's memory; `torch.compile(requantize)` fuses each depth's
    minimum and confidence into one kernel after the matmul (ResGen.compile_sampler; BENCHMARKS.md §5).

    z (B, L, c), start (B, L) int64, codebooks (D, V, c), log_scale (B, L)
    -> tokens (B, L, D) int64, logp (B, L, D) float32 (0 where j < start_i; tokens there are meaningless).
    Everything in fp32: an argmin over bf16 distances picks wrong codes.
    """
    B, L, c = z.shape
    z, start, log_scale = z.reshape(B * L, c), start.reshape(B * L), log_scale.reshape(B * L)
    first = None if first is None else first.reshape(B * L)
    blocks = [requantize_rows(z[i:i + REQUANTIZE_ROWS], start[i:i + REQUANTIZE_ROWS], codebooks,
                              log_scale[i:i + REQUANTIZE_ROWS], None if first is None else first[i:i + REQUANTIZE_ROWS])
              for i in range(0, B * L, REQUANTIZE_ROWS)]
    tokens, logp = (torch.cat(parts) for parts in zip(*blocks))
    return tokens.view(B, L, -1), logp.view(B, L, -1)


def requantize_rows(r, start, codebooks, log_scale, first=None):
    """requantize on a block of positions: r (N, c), start (N,), log_scale (N,), first (N,) or None
    -> tokens, logp (N, D)."""
    with torch.autocast(r.device.type, enabled=False):
        inv_var = torch.exp(-2.0 * log_scale.float()).unsqueeze(-1)  # (N, 1)
        codebooks = codebooks.float()
        e2 = codebooks.pow(2).sum(-1)  # (D, V): ||e(v; j)||², once for all depths
        r = r.float()
        tokens, logps = [], []
        for j in range(codebooks.shape[0]):
            # ||r - e_v||² less the per-row constant ||r||²: the same argmin and the same d_v - d_min, in one addmm
            d = torch.addmm(e2[j], r, codebooks[j].t(), alpha=-2.0)  # (N, V)
            d_min, tok = d.min(-1, keepdim=True)  # (N, 1)
            gap = 0.0  # (d_x - d_min)/(2σ²) of an emitted code x that is not the argmin
            if first is not None:
                tok = torch.where((start == j).unsqueeze(-1), first.unsqueeze(-1), tok)
                gap = (d.gather(-1, tok) - d_min).squeeze(-1) * 0.5 * inv_var.squeeze(-1)
            # log softmax at the argmin = -log Σ_v exp(-(d_v - d_min)/(2σ²)), each term as a power of 2. The sum is
            # >= 1 (the argmin's own term), so it needs no max-shift; in place, so no further (N, V) temporaries;
            # the floor keeps exp2 off the CPU's slow path for results that underflow (most codes once σ is small).
            logp = -d.sub_(d_min).mul_(-0.5 * LOG2E * inv_var).clamp_(min=EXP2_FLOOR).exp2_().sum(-1).log_() - gap
            active = start <= j  # (N,)
            tok = tok.squeeze(-1)
            r = torch.where(active.unsqueeze(-1), r - codebooks[j][tok], r)
            tokens.append(tok)
            logps.append(logp * active)
    return torch.stack(tokens, -1), torch.stack(logps, -1)


#################################################################################
#                     Output heads (each owns loss and sampling)                #
#################################################################################
# The MoG head takes from the authors' public code for a related RVQ model (NVIDIA-NeMo/NeMo, speechlm2/modules/
# ear_tts_model.py): ONE shift b and ONE log-scale s per position shared by unit-Gaussian components, low rank for
# a wide latent, the Jensen split of the mixture NLL. It departs in three ways, each measured in RESULTS.md: the
# components sit on the codebook of the first masked depth, the responsibilities q are fixed by the data's code
# there, and the classification term is weighted by λ = c.

def mog_component_log_likelihood(means, shift, log_scale, z):
    """log N(z; b + e^s·μ_k, e^{2s} I) for every component k (PAPER.md §4: mixture of Gaussians with one affine
    map per position). In the normalised space z̃ = (z − b)·e^{−s} every component is a unit Gaussian at μ_k;
    the change of variables adds the Jacobian −c·s.

    means (..., K, c), shift (..., c), log_scale (..., 1), z (..., c) -> (..., K)."""
    c = z.shape[-1]
    z_norm = (z - shift) * torch.exp(-log_scale)  # (..., c)
    dist2 = (means - z_norm.unsqueeze(-2)).pow(2).sum(-1)  # (..., K)
    return -0.5 * dist2 - 0.5 * c * math.log(2 * math.pi) - c * log_scale


def code_components(code, M):
    """The M mixture components of code v, k = v·M + m: code (...) int64 -> (..., M)."""
    return code.unsqueeze(-1) * M + torch.arange(M, device=code.device)


def code_log_pi(logits, M):
    """log π of each code, its M components' probabilities summed: logits (..., V·M) -> (..., V)."""
    return F.log_softmax(logits, -1).unflatten(-1, (-1, M)).logsumexp(-1)


def mog_jensen_split(logits, code_ll, code):
    """The paper's Jensen split of the mixture NLL into a classification and a regression term (PAPER.md §3):

        −log Σ_k π_k N_k  <=  Σ_k q_k (−log N_k)  +  KL(q ‖ π)      for any responsibilities q
                              regression            classification

    The K = V·M components come in groups of M per code v of depth p (k = v·M + m). The target, the cumulative
    embedding of the masked depths, was made by the data's code x_p, so q sits on x_p's M components only: one-hot
    for M = 1, where the classification term is the cross-entropy of x_p under π (the token head's loss at depth
    p), and for M > 1 the posterior within x_p's components under a uniform prior, q_m ∝ N_(x_p, m), held fixed.
    The bound is on the same NLL as any other q's; this q trains π toward the code the sampler emits, where the
    likelihoods alone spread q over every code that explains z at the current σ (RESULTS.md §1).

    logits (..., K), code_ll (..., M): log N of x_p's components, code (...) int64: x_p -> (classification, regression)."""
    with torch.no_grad():
        q = code_ll.softmax(-1)  # (..., M)
    log_pi = F.log_softmax(logits, -1).gather(-1, code_components(code, code_ll.shape[-1]))  # (..., M): x_p's
    regression = -(q * code_ll).sum(-1)
    classification = (torch.xlogy(q, q) - q * log_pi).sum(-1)  # KL(q ‖ π); xlogy: 0·log 0 = 0
    return classification, regression


def draw_component(logits, top_p, generator=None):
    """A mixture component per position from the top-p nucleus of π = softmax(logits) (PAPER.md §5, Fig. 3's
    top-p), by Gumbel-max: logits (..., K) -> (...,) int64."""
    return (top_p_filter(logits, top_p) + gumbel(logits.shape, generator, logits.device)).argmax(-1)


def perplexity(p):
    """exp(entropy) of a distribution p (..., K) summing to 1: how many of the K entries are in use."""
    return torch.exp(-torch.xlogy(p, p).sum(-1))


def gathered_linear(x, weight, bias, index, max_elements=1 << 26):
    """y_n = W[index_n]·x_n + b[index_n]: one of K linear maps per row, without computing the other K − 1.

    x (N, in), weight (K, out, in), bias (K, out) or None, index (N,) int64 -> (N, out). Rows go in chunks of
    static size so the gathered weights stay under max_elements (no host sync, bounded memory). The rows are
    gathered with F.embedding, not weight[index]: on the CPU the backward of advanced indexing adds the N rows'
    gradients with atomic float adds from several threads, in whatever order they run (training was then not
    reproducible at more than one thread); embedding's backward adds them in index order, and runs faster."""
    N, (K, n_out, n_in) = x.shape[0], weight.shape
    rows = max(1, max_elements // (n_out * n_in))
    flat = weight.reshape(K, n_out * n_in)
    y = torch.cat([torch.bmm(F.embedding(index[i:i + rows], flat).view(-1, n_out, n_in), x[i:i + rows].unsqueeze(-1))
                   .squeeze(-1) for i in range(0, N, rows)]) if N else x.new_zeros(0, n_out)
    return y if bias is None else y + F.embedding(index, bias)


class GatedMLPBlock(nn.Module):
    """Residual gated-GELU MLP with a normalised branch, x + n₂(W_down(gelu(W_gate n₁x) ⊙ W_up n₁x)): the
    head's own small stack between the transformer and the mixture's projections."""

    def __init__(self, width, hidden):
        super().__init__()
        self.pre, self.post = nn.RMSNorm(width, eps=1e-6), nn.RMSNorm(width, eps=1e-6)
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        y = self.pre(x)
        return x + self.post(self.down(F.gelu(self.gate(y), approximate="tanh") * self.up(y)))


class MoGHead(nn.Module):
    """Mixture-of-Gaussians head over the cumulative embedding of the masked tokens (PAPER.md §4, §11),
    its components on the codebook of each position's first masked depth p_i.

    From the transformer's h_i: a small gated-MLP stack, then per position ONE shift b (c) and ONE log-scale s
    (floored) shared by all components, and for each of the K = V·M components (v, m), v a code of depth p_i:

        component (v, m) = N(e(v; p_i) + b + e^s·δ_vm,  e^{2s} I),    π = softmax over the K components

    e(v; p_i) puts component v where the re-quantiser emits code v at depth p_i; b, σ = e^s and δ_vm (c, or r lifted
    by a c×r matrix when offset_rank r > 0) carry the deeper masked depths given v. With M > 1 the components of a
    code hold several modes of the deeper depths, drawn jointly with v in one step. π is a distribution over depth
    p_i's codes, as the token head's softmax is, and is trained on the data's code there (mog_jensen_split).
    """

    def __init__(self, config):
        super().__init__()
        C, self.c, self.r, self.M = config.width, config.code_dim, config.offset_rank, config.components_per_code
        self.K = config.codebook_size * self.M
        self.log_scale_min, self.classification_weight = config.log_scale_min, config.classification_weight
        self.mlp = nn.Sequential(*[GatedMLPBlock(C, C) for _ in range(config.head_layers)], nn.RMSNorm(C, eps=1e-6))
        self.logits = nn.Linear(C, self.K)
        self.shift = nn.Linear(C, self.c)
        self.log_scale = nn.Linear(C, 1)
        self.offsets = nn.Linear(C, self.K * (self.r or self.c))
        # low rank (CLaM-TTS style, as in the authors' code for its means): δ_k = A_k·u_k, u_k = the r-vector from h
        self.lift = nn.Parameter(torch.randn(self.K, self.c, self.r) / math.sqrt(self.r)) if self.r else None

    def initialize(self):
        """π starts near uniform, b = 0, s = 0 (σ = 1: the targets have unit variance in scaled units), and δ = 0
        with one component per code. With M > 1 a code's offsets start at random points about one σ apart: M
        identical components get identical gradients and would stay one (RESULTS.md §1)."""
        nn.init.normal_(self.logits.weight, std=0.02)
        for lin in (self.shift, self.log_scale, self.offsets):
            nn.init.zeros_(lin.weight)
        for lin in (self.logits, self.shift, self.log_scale, self.offsets):
            nn.init.zeros_(lin.bias)
        if self.M > 1:  # δ = A·u has unit variance per dimension when u does (A's entries have variance 1/r)
            nn.init.normal_(self.offsets.bias, std=1.0)

    def forward(self, h):  # (B, L, C) -> features (B, L, C): what CFG acts on, before the projections
        return self.mlp(h)

    def affine(self, f):
        """The per-position affine map: shift b (B, L, c) and floored log-scale s (B, L, 1), fp32."""
        return self.shift(f).float(), self.log_scale(f).float().clamp_min(self.log_scale_min)

    def component_offsets(self, f, k):
        """δ_k for the given components only (a gather of their weights, not all K·c outputs):
        f (B, L, C), k (B, L, J) int64 -> (B, L, J, c)."""
        (B, L, C), J = f.shape, k.shape[-1]
        width, k = self.r or self.c, k.reshape(-1)
        x = f.float().unsqueeze(2).expand(B, L, J, C).reshape(B * L * J, C)
        delta = gathered_linear(x, self.offsets.weight.view(self.K, width, C), self.offsets.bias.view(self.K, width), k)
        if self.r:
            delta = gathered_linear(delta, self.lift, None, k)
        return delta.view(B, L, J, self.c)

    @staticmethod
    def scored(mask):
        """How many terms the loss averages over: positions with k_i > 0."""
        return mask.any(-1).sum()

    def loss(self, f, codes, mask, target, codebooks, count=None):
        """λ·classification + regression, the Jensen split of the mixture NLL of z_i with q on the data's code x_p at
        the first masked depth (only its M components enter), per position with k_i > 0, in nats per dimension.
        λ = 1 is the paper's bound on the NLL; λ = c (the default) weighs a position's one V-way choice like the
        c dimensions of its regression, which otherwise drowns it (RESULTS.md §1). count: divide the sum by this
        instead of this batch's count (train.py: a share of the global batch). Stats: the classification term in
        nats per position (M = 1: π's cross-entropy of x_p), the regression term per dimension, π's top-1 accuracy
        of x_p, π's perplexity over the batch, the mean log-scale."""
        D = mask.shape[-1]
        p = (D - mask.sum(-1)).clamp(max=D - 1)  # (B, L): p_i, the first masked depth
        code = codes.gather(-1, p.unsqueeze(-1)).squeeze(-1)  # (B, L): x_p, the data's code there
        logits = self.logits(f).float()  # (B, L, K)
        shift, log_scale = self.affine(f)
        rows = code_rows(codebooks.float(), p, code) * torch.exp(-log_scale)  # (B, L, c): e(x_p; p), normalised
        means = rows.unsqueeze(-2) + self.component_offsets(f, code_components(code, self.M))  # (B, L, M, c)
        code_ll = mog_component_log_likelihood(means, shift, log_scale, target.float())  # (B, L, M)
        classification, regression = mog_jensen_split(logits, code_ll, code)
        valid = mask.any(-1).float()  # (B, L): positions with k_i > 0
        local = self.scored(mask).float().clamp_min(1.0)
        loss = ((self.classification_weight * classification + regression) * valid).sum() / (
            (local if count is None else count) * self.c)
        with torch.no_grad():
            mean = lambda x: (x * valid).sum() / local  # noqa: E731
            pi = code_log_pi(logits, self.M).exp()  # (B, L, V): π over depth p's codes
            stats = {"classification": mean(classification), "regression": mean(regression) / self.c,
                     "code_acc": mean((pi.argmax(-1) == code).float()),
                     "pi_perplexity": perplexity((pi * valid.unsqueeze(-1)).sum((0, 1)) / local),
                     "log_scale": mean(log_scale.squeeze(-1))}
        return loss, stats

    def code_log_probs(self, f, start):
        """log π over the V codes of depth p_i (π is already at p_i; start is unused): f (B, L, C) -> (B, L, V)."""
        return code_log_pi(self.logits(f).float(), self.M)

    def sample(self, f, prefix, codebooks, top_p, temperature, generator, emit="drawn", confidence="pi",
               noise_temperature=None):
        """Sampler steps 2-3 (PAPER.md §12): a component k = (v, m) from the top-p nucleus of π tempered by τ
        (Gumbel-max; τ = 0: the most likely), z = e(v; p_i) + b + e^s·(δ_k + τ_ε·ε), then re-quantization from p_i;
        τ_ε = noise_temperature, τ when None (the paper's one τ).
        emit "drawn": depth p_i's token is v and the depths below re-quantise z − e(v; p_i); "requantized": every
        token from z's re-quantisation (the offsets can move z into another code's cell). The confidence of depth
        p_i's token: log π_v under the untempered π, as the token head's is its softmax's ("pi", the default: the
        better Inception FID, RESULTS.md §1.2), or the re-quantiser's log-probability ("requantizer": more diverse);
        deeper tokens always the re-quantiser's. Returns tokens (B, L, D) int64 and confidences (B, L, D) (0 above
        p_i)."""
        D = codebooks.shape[0]
        logits = self.logits(f).float()  # (B, L, K)
        shift, log_scale = self.affine(f)
        if temperature > 0:  # π tempered as the token head's softmax is
            k = draw_component(logits / temperature, top_p, generator)  # (B, L)
        else:
            k = top_p_filter(logits, top_p).argmax(-1)  # τ = 0: the most likely component
        v = k // self.M  # (B, L)
        eps = torch.randn(shift.shape, generator=generator, device=shift.device)
        anchor = code_rows(codebooks.float(), prefix.clamp(max=D - 1), v)  # (B, L, c): e(v; p_i)
        delta = self.component_offsets(f, k.unsqueeze(-1)).squeeze(-2)  # (B, L, c)
        tau_eps = temperature if noise_temperature is None else noise_temperature
        z = anchor + shift + log_scale.exp() * (delta + tau_eps * eps)  # (B, L, c)
        tokens, logp = self.requantize(z, prefix, codebooks, log_scale.squeeze(-1), v if emit == "drawn" else None)
        if confidence == "pi":
            log_pi = code_log_pi(logits, self.M)  # (B, L, V)
            at_p = torch.arange(D, device=prefix.device) == prefix.unsqueeze(-1)  # (B, L, D)
            emitted = tokens.gather(-1, prefix.clamp(max=D - 1).unsqueeze(-1))  # (B, L, 1)
            logp = torch.where(at_p, log_pi.gather(-1, emitted), logp)
        return tokens, logp

    requantize = staticmethod(requantize)  # ResGen.compile_sampler puts the compiled one on the instance


class TokenHead(nn.Module):
    """Per-depth softmax over the V codes ("predict tokens directly", the paper's ablation; PAPER.md §6, §11).
    Same masking, backbone and sampler as the MoG head; only the prediction target differs."""

    def __init__(self, config):
        super().__init__()
        self.D, self.V = config.depth, config.codebook_size
        self.linear = nn.Linear(config.width, self.D * self.V)

    def initialize(self):
        """Small logits at the start: near-uniform predictions over the V codes."""
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h):  # (B, L, C) -> (B, L, D·V) logits: what CFG acts on (for a linear map, the same as h)
        return self.linear(h)

    @staticmethod
    def scored(mask):
        """How many terms the loss averages over: masked tokens."""
        return mask.sum()

    def loss(self, out, codes, mask, target, codebooks, count=None):
        """Cross-entropy of the masked tokens, averaged over masked tokens, in nats per token.
        count: divide the sum by this instead of this batch's own count (train.py: a share of the global batch)."""
        logits = out.float().unflatten(-1, (self.D, self.V))  # (B, L, D, V)
        ce = F.cross_entropy(logits.flatten(0, 2), codes.flatten(), reduction="none").view_as(codes)
        m = mask.float()
        local = self.scored(mask).float().clamp_min(1.0)
        loss = (ce * m).sum() / (local if count is None else count)
        with torch.no_grad():
            stats = {"token_acc": ((logits.argmax(-1) == codes).float() * m).sum() / local}
        return loss, stats

    def code_log_probs(self, out, start):
        """log-softmax over the V codes of depth p_i = start (B, L) (clamped to D - 1): out -> (B, L, V)."""
        logits = out.float().unflatten(-1, (self.D, self.V))  # (B, L, D, V)
        p = start.clamp(max=self.D - 1)[..., None, None].expand(*start.shape, 1, self.V)
        return F.log_softmax(logits.gather(-2, p).squeeze(-2), -1)

    def sample(self, out, prefix, codebooks, top_p, temperature, generator, **mog_only):
        """Each masked depth's token from its own softmax (temperature τ, top-p); its log-prob under the
        untempered softmax is the confidence. Returns tokens (B, L, D) int64 and log-probs (B, L, D)."""
        logits = out.float().unflatten(-1, (self.D, self.V))  # (B, L, D, V)
        if temperature > 0:
            noisy = top_p_filter(logits / temperature, top_p) + gumbel(logits.shape, generator, logits.device)
        else:
            noisy = top_p_filter(logits, top_p)  # τ = 0: greedy
        tokens = noisy.argmax(-1)  # (B, L, D)
        logp = F.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        active = torch.arange(self.D, device=prefix.device) >= prefix.unsqueeze(-1)
        return tokens, logp * active


HEADS = {"mog": MoGHead, "tokens": TokenHead}


#################################################################################
#                                     ResGen                                    #
#################################################################################

class ResGen(nn.Module):
    """Masked generative transformer over RVQ tokens (PAPER.md §1, §4, §11).

    codebooks: (D, V, c) float, the tokenizer's codebooks times the latent scale s. Kept as a buffer so a
    checkpoint embeds inputs and re-quantizes samples on its own (frozen: never trained here).
    """

    def __init__(self, config, codebooks):
        super().__init__()
        keep_codebooks(self, config, codebooks)
        C = config.width
        self.code_in = nn.Linear(config.code_dim, C)  # visible cumulative embedding -> width
        self.count_embed = nn.Embedding(config.depth + 1, C)  # k_i = masked depths at position i, 0..D
        self.pos_embed = nn.Parameter(torch.zeros(1, config.length, C))
        self.null_class = config.num_classes
        self.class_embed = nn.Embedding(config.num_classes + 1, C)  # last row: the null class for CFG
        if config.text_vocab:  # the phoneme prefix: P extra positions every code position attends to
            self.text_embed = nn.Embedding(config.text_vocab, C)
            self.text_pos = nn.Parameter(torch.zeros(1, config.text_length, C))
        self.blocks = nn.ModuleList([Block(C, config.heads, config.mlp_ratio, config.dropout)
                                     for _ in range(config.layers)])
        self.norm_out = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.head = HEADS[config.head](config)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT initialisation (dit_initialize); each head initialises its own projections (MoGHead.initialize,
        TokenHead.initialize)."""
        text = (self.text_embed.weight, self.text_pos) if self.config.text_vocab else ()
        dit_initialize(self, (self.count_embed.weight, self.class_embed.weight, self.pos_embed, *text),
                       [block.ada[-1] for block in self.blocks] + [self.ada_out[-1]])
        self.head.initialize()

    def num_params(self):
        """Trainable parameters (the frozen codebooks are a buffer, not counted)."""
        return sum(p.numel() for p in self.parameters())

    def compile_sampler(self):
        """torch.compile the sampler's two heavy parts, the backbone and the MoG head's re-quantiser (on CUDA as
        CUDA graphs: the shapes repeat at every step). forward() calls the same backbone: call this on a model used
        to sample, not one training. Eager is the default: compiling pays only over many samples (BENCHMARKS.md §6)."""
        # dynamic=False: a new batch size compiles anew; kernels for symbolic shapes run slower on the CPU
        mode = "reduce-overhead" if self.codebooks.device.type == "cuda" else None
        self.backbone = torch.compile(self.backbone, mode=mode, dynamic=False)
        if isinstance(self.head, MoGHead):
            self.head.requantize = torch.compile(requantize, mode=mode, dynamic=False)
        return self

    # ---- backbone --------------------------------------------------------------------------------------
    def backbone(self, visible, num_masked, labels, text=None):
        """Transformer from the visible tokens to the head's features (PAPER.md §4, §11).

        Input per position: Linear(c→C)(visible cumulative embedding) + embed(k_i) + position embedding.
        visible (B, L, c) float, num_masked (B, L) int64 (k_i), labels (B,) int64 -> (B, L, head features).
        text (B, P) int64 (models with text_vocab): phoneme ids, prepended as P positions that are never masked;
        they are cut off before the head, so they are never predicted nor scored.
        """
        x = self.code_in(visible) + self.count_embed(num_masked) + self.pos_embed  # (B, L, C)
        if self.config.text_vocab:
            x = torch.cat([self.text_embed(text) + self.text_pos, x], 1)  # (B, P + L, C)
        cond = self.class_embed(labels)  # (B, C)
        for block in self.blocks:
            x = block(x, cond)
        x = x[:, x.shape[1] - visible.shape[1]:]  # the L code positions
        shift, scale = self.ada_out(cond).chunk(2, dim=-1)
        return self.head(modulate(self.norm_out(x), shift, scale))

    def _labels(self, labels, batch, device):
        if labels is None:  # unconditional: the null class
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        return labels.to(device=device, dtype=torch.long)

    def _text(self, text, batch, device):
        """text (B, P) ids in 0..text_vocab-1 (0 = padding), or None: all padding (no text). UserError otherwise."""
        P, vocab = self.config.text_length, self.config.text_vocab
        if not vocab:
            if text is not None:
                raise UserError("this model has no text input (ResGenConfig.text_vocab = 0) but text was given")
            return None
        if text is None:
            return torch.zeros(batch, P, dtype=torch.long, device=device)
        if text.shape != (batch, P) or (text.numel() and not 0 <= int(text.min()) <= int(text.max()) < vocab):
            raise UserError(f"text must be ({batch}, {P}) ids in 0..{vocab - 1}, got {tuple(text.shape)}")
        return text.to(device=device, dtype=torch.long)

    # ---- training --------------------------------------------------------------------------------------
    def forward(self, codes, labels, mask=None, drop=None, count=None, text=None):
        """Training loss (PAPER.md §3): mask a random suffix of depths per position (forward masking), predict
        the masked part. codes (B, L, D) int64, labels (B,) int64 or None; mask (B, L, D) bool to fix it;
        drop (B,) bool: which labels become the null class (default: random, p = label_dropout, in training).
        count: the loss is the sum over scored terms divided by count (default: their number in this batch);
        train.py passes its share of the global batch's count so that DDP and micro-batches average exactly.
        text (B, P) int64: the phoneme prefix (models with text_vocab); a dropped label drops the text too, so CFG
        guides on both.
        Returns (loss, stats): MoG NLL in nats per latent dimension, or token cross-entropy in nats per token;
        stats is a dict of detached scalar tensors."""
        B, L, D = codes.shape
        if mask is None:
            mask = sample_mask(B, L, D, device=codes.device, schedule=self.config.schedule)
        labels = self._labels(labels, B, codes.device)
        if drop is None and self.training and self.config.label_dropout > 0:
            # Classifier-free guidance needs p(x | null) from the same network: dropping labels at random
            # trains the unconditional model alongside the conditional one.
            drop = torch.rand(B, device=codes.device) < self.config.label_dropout
        text = self._text(text, B, codes.device)
        if drop is not None:
            labels = labels.masked_fill(drop.to(labels.device), self.null_class)
            text = None if text is None else text.masked_fill(drop.to(text.device).unsqueeze(-1), 0)
        visible, target = cumulative_embeddings(codes, mask, self.codebooks)
        out = self.backbone(visible, mask.sum(-1), labels, text)
        loss, stats = self.head.loss(out, codes, mask, target, self.codebooks, count)
        stats["masked_frac"] = mask.float().mean().detach()
        return loss, stats

    # ---- sampling --------------------------------------------------------------------------------------
    def prompt_state(self, prompt_codes, prompt_mask, batch, device):
        """The sampler's starting state from a prompt: (codes (B, L, D) int64, masked (B, L, D) bool).

        prompt_mask (B, L, D) bool, True = given: at every position the given depths must be a prefix (depths
        0..p_i - 1), as the sampler only ever reveals prefixes; prompt_codes (B, L, D) holds the given codes
        (in 0..V-1 where given, anything elsewhere). No prompt: nothing given, everything masked. Validation reads
        the tensors on the host; it runs once, before the step loop.
        """
        L, D, V = self.config.length, self.config.depth, self.config.codebook_size
        state = prompt_tensors(prompt_codes, prompt_mask, (batch, L, D), V, device, self.check_prompt)
        if state is None:
            return (torch.zeros(batch, L, D, dtype=torch.long, device=device),
                    torch.ones(batch, L, D, dtype=torch.bool, device=device))
        codes, given = state
        return codes, ~given

    @staticmethod
    def check_prompt(prompt_mask):
        """UserError unless prompt_mask (B, L, D) bool gives a prefix of depths at every position."""
        gap = prompt_mask[..., 1:] & ~prompt_mask[..., :-1]  # depth j given, depth j-1 not
        if bool(gap.any()):
            b, i, j = gap.nonzero()[0].tolist()
            raise UserError(f"prompt_mask must give a prefix of depths at every position; row {b}, position {i} "
                            f"gives depth {j + 1} but not depth {j}")

    @torch.no_grad()
    def generate(self, labels, steps, cfg=1.0, cfg_schedule="constant", top_p=1.0, temperature=1.0,
                 choice_temperature=1.0, generator=None, schedule="cosine", batch_size=None, callback=None,
                 prompt_codes=None, prompt_mask=None, emit="drawn", confidence="pi", text=None,
                 noise_temperature=None):
        """Confidence-ordered sampler (PAPER.md §5, §12). T = `steps` forward passes whatever D is.

        labels: (B,) int64, or None for unconditional samples (then `batch_size` gives B).
        cfg: guidance scale w on the head's features before its projections, u + w·(c − u) (the MoG head's MLP
        output; the token head's logits); 1 = no guidance. cfg_schedule: "constant" or "linear" (w_s = 1 + (w − 1)·
        revealed/(L·D), per row; given tokens count as revealed). top_p: nucleus over mixture components (over
        codes for the token head). temperature: τ, the softmax temperature of π and the noise scale in
        z = e(v; p) + b + e^s·(δ_k + τ·ε) (the token head's softmax temperature); noise_temperature: the MoG head's
        noise scale apart from π's, τ_ε in place of τ·ε's τ (None: τ). emit, confidence: how the MoG head
        turns its draw into tokens (MoGHead.sample). choice_temperature: Gumbel noise on the confidences, annealed
        by (1 − s/T); unit scale is the scale of the log-probabilities it perturbs (nats); the default, 1, reveals
        in confidence order, the better Inception FID on both models measured; 50 drowns the confidences until the
        last steps (a random order: the better classifier distance; RESULTS.md §4.4).
        generator: a torch.Generator on the model's device (same seed -> same codes).
        callback(step, codes, masked): called after each step; masked (B, L, D) bool, True = not yet revealed.
        prompt_codes (B, L, D) int, prompt_mask (B, L, D) bool (True = given, a prefix of depths at every
        position): prompted generation (inpainting, keeping coarse depths, continuation). Given tokens are
        returned unchanged; each row's reveal schedule covers only its tokens left, still in T passes.
        text (B, P) int64: the phoneme prefix (models with text_vocab; the null-class rows get none).
        Returns codes (B, L, D) int64.
        """
        if steps != int(steps) or steps < 1:
            raise UserError(f"steps must be a positive integer, got {steps!r}")
        steps = int(steps)
        if cfg_schedule not in ("constant", "linear"):
            raise UserError(f"unknown cfg schedule {cfg_schedule!r}; choose from constant, linear")
        if not 0.0 < top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {top_p}")
        if temperature < 0 or choice_temperature < 0 or (noise_temperature or 0) < 0:
            raise UserError(f"temperature, choice_temperature and noise_temperature must be >= 0, got {temperature}, "
                            f"{choice_temperature}, {noise_temperature}")
        if emit not in ("drawn", "requantized") or confidence not in ("requantizer", "pi"):
            raise UserError(f"emit must be drawn or requantized and confidence requantizer or pi, got {emit!r}, "
                            f"{confidence!r}")
        device = self.codebooks.device
        L, D = self.config.length, self.config.depth
        N = L * D
        B, guided, labels = sampling_rows(labels, batch_size, cfg, self.null_class, device)  # labels (2B,) if guided
        codes, masked = self.prompt_state(prompt_codes, prompt_mask, B, device)  # masked: a suffix of depths
        text = self._text(text, B, device)
        if text is not None and guided:
            text = torch.cat([text, torch.zeros_like(text)])
        # Each row's schedule over the tokens it has left, planned on the device: the step loop never syncs.
        masked_after = masking_plan(steps, masked.flatten(1).sum(-1), schedule)  # (B, T+1)
        slot = torch.arange(N, device=device).expand(B, N)

        was_training = self.training
        self.eval()
        for s in range(1, steps + 1):
            # a new step for CUDA graphs (compile_sampler): the last step's graph outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
            # 1. one forward pass; cond and null halves in one batch when guided
            visible, _ = cumulative_embeddings(codes, masked, self.codebooks)  # (B, L, c)
            num_masked = masked.sum(-1)  # (B, L): k_i = D - p_i
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                if guided:
                    out = self.backbone(visible.repeat(2, 1, 1), num_masked.repeat(2, 1), labels, text)
                else:
                    out = self.backbone(visible, num_masked, labels, text)
            out = out.float()  # CFG, the head's projections, the Gaussian arithmetic and the quantizer run in fp32
            if guided:
                w = cfg
                if cfg_schedule == "linear":  # per row, in float64 like the scalar it generalises
                    w = ((N - masked_after[:, s - 1]).double() * (cfg - 1.0) / N + 1.0).float().view(B, 1, 1)
                cond, uncond = out.chunk(2)
                out = uncond + w * (cond - uncond)
            # 2-3. sample candidates for every masked slot, with per-token log-probabilities
            cand, logp = self.head.sample(out, D - num_masked, self.codebooks, top_p, temperature, generator,
                                          emit=emit, confidence=confidence, noise_temperature=noise_temperature)
            # 4. cumulative confidence from p_i along depth (logp is 0 above p_i), Gumbel noise annealed to 0,
            #    running min along depth so a deeper token never outscores a shallower one at its position
            noise = choice_temperature * (1.0 - s / steps) * gumbel((B, L, D), generator, device)
            score = (logp.cumsum(-1) + noise).masked_fill(~masked, float("inf")).cummin(-1).values
            score = score.masked_fill(~masked, float("-inf")).view(B, N)
            # Reveal each row's n_b best slots, n_b from its own schedule: rank every slot by one stable sort,
            # keep ranks < n_b. The stable sort breaks the ties the running min creates in favour of the shallower
            # depth (it comes first in the flattened (L, D) order), so the revealed depths stay a prefix.
            n_reveal = masked_after[:, s - 1] - masked_after[:, s]  # (B,)
            order = score.sort(dim=-1, descending=True, stable=True).indices  # (B, N)
            rank = torch.empty_like(order).scatter_(1, order, slot)  # (B, N): slot -> its place in the order
            reveal = (rank < n_reveal.unsqueeze(-1)).view(B, L, D) & masked  # given tokens are never resampled
            codes = torch.where(reveal, cand, codes)
            masked = masked & ~reveal
            if callback is not None:
                callback(s, codes, masked)
        self.train(was_training)
        return codes


#################################################################################
#                                   Checkpoints                                 #
#################################################################################

def checkpoint_config(ckpt, path):
    """The ResGenConfig a checkpoint was trained with (config_from_checkpoint)."""
    return config_from_checkpoint(ckpt, path, ResGenConfig, "a ResGen")


def load_resgen(path, ema=True, device="cpu"):
    """ResGen from a train.py checkpoint (PAPER.md §14), in eval mode, with `.meta` (the code cache's meta.json)
    and `.step` attached. ema=True takes the EMA weights when the checkpoint has them."""
    return model_from_checkpoint(load_checkpoint(path, "resgen"), path, ResGen, ResGenConfig, "a ResGen", ema, device)
