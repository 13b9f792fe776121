"""
RQ-Transformer: autoregressive generation of RVQ codes (Lee et al., CVPR 2022, "Autoregressive Image Generation
using Residual Quantization"), the baseline the ResGen paper measures its efficiency against on the same codes
(PAPER.md §6, v1 Table 2: ResGen 594M, FID 9.26 in 1.25 s; RQ-Transformer 821M, FID 13.11 in 2.38 s).

A spatial transformer, causal over the L positions in raster order, reads at position i the sum of position
i−1's code embeddings (a start token, the class, at i = 0) and gives a context h_i; a small depth transformer,
causal over the D depths, reads h_i and the running sums of the embeddings of depths < j of position i and
gives the logits of depth j. Training: cross-entropy over all L·D tokens. Sampling: L steps of the spatial
transformer and L·D steps of the depth transformer, each reading its KV cache, so no prefix is recomputed.
ResGen needs T passes whatever L and D are; that difference is what bench.py and `make table2` measure.

Facts taken from the authors' public code (kakaobrain/rq-vae-transformer, rqvae/models/rqtransformer/ and the
ImageNet stage-2 configs), written here from scratch: the class embedding is the spatial start token; inputs are
the RVQ codebook embeddings through a linear map (input_emb_vqvae), summed over depth for the spatial
transformer and summed cumulatively over depth for the depth transformer (cumsum_depth_ctx: true); the depth
transformer's first input is h_i, its others carry no spatial position embedding; its blocks are few (24 spatial
to 4 depth in the 821M model); a final LayerNorm and a linear map give the logits. Decisions of this project:
both transformers are stacks of ResGen's DiT blocks (adaLN-Zero from the class), so the two models differ in how
they generate and not in their blocks; one linear map per depth (this project's codebooks are separate per
depth); hard-code cross-entropy (the authors train on soft targets from stochastic codes); CFG on the logits.

    import rqtransformer, tokenizer
    tok = tokenizer.load_tokenizer("runs/tokenizer/last.pt")
    cfg = rqtransformer.make_config("small", length=64, depth=4, codebook_size=256, code_dim=16, num_classes=10)
    model = rqtransformer.RQTransformer(cfg, tok.rvq.codebooks * tok.latent_scale)
    loss, stats = model(codes, labels)                        # codes (B, L, D) int64, labels (B,)
    codes = model.generate(labels, cfg=3.0, top_k=0, top_p=1.0, temperature=1.0)   # (B, L, D) int64
    model = rqtransformer.load_model("runs/rq/last.pt")       # either architecture, from train.py's checkpoint

Train with `python train.py --arch rqtransformer ...`; sample.py and eval_fid.py read the architecture from the
checkpoint.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import resgen
from checkpoints import (UserError, check_sizes, config_from_checkpoint, keep_codebooks, load_checkpoint,
                         model_from_checkpoint, prompt_tensors, sized_config)
from resgen import Attention, Block, dit_initialize, embed_codes, gumbel, modulate, sampling_rows, top_p_filter


#################################################################################
#                                 Config and sizes                              #
#################################################################################

ARCH = "rqtransformer"  # the `arch` a train.py checkpoint records for this model (ResGen's: "resgen")


@dataclass
class RQTransformerConfig:
    length: int                  # L: latent positions (h·w), generated in raster order
    depth: int                   # D: RVQ depth, generated coarse to fine at every position
    codebook_size: int           # V: codes per codebook
    code_dim: int                # c: latent dimension of a code
    num_classes: int             # class labels 0..num_classes-1; row num_classes is the null class (CFG)
    width: int                   # C: width of both transformers
    layers: int                  # DiT blocks of the spatial transformer (causal over L)
    depth_layers: int            # DiT blocks of the depth transformer (causal over D)
    heads: int                   # attention heads (both transformers)
    mlp_ratio: float = 4.0       # MLP hidden width = mlp_ratio·C, as in DiT
    dropout: float = 0.0         # dropout in attention and MLP
    label_dropout: float = 0.1   # p of replacing the label by the null class in training (CFG), as ResGen

    def __post_init__(self):
        check_sizes(self, ("length", "depth", "codebook_size", "code_dim", "width", "layers", "depth_layers", "heads"))


# Named sizes at ResGen's widths and heads (resgen.SIZES), with the blocks split between the two transformers about
# as the authors split them (24 spatial to 4 depth blocks in their 821M ImageNet model) and their total chosen so
# the parameter count matches ResGen's with the M = 1 MoG head within 10% (the default M = 4 has 7.68M at small,
# D = 4): on the Fashion-MNIST codes (L = 64, V = 256, c = 16) small has 4.96M / 5.55M at D = 4 / 16 against
# ResGen's 5.16M, base 0.96-0.97x, large and xl 0.98-0.99x; on ImageNet-like codes (V = 4096, D = 16) 0.96-0.98x
# (xl: 653M against 666M). The output layer has D·V·C weights, as ResGen's token head.
SIZES = {
    "tiny":  dict(width=64, layers=1, depth_layers=1, heads=4),      # tests: seconds on a CPU
    "small": dict(width=192, layers=6, depth_layers=1, heads=3),     # Fashion-MNIST on a CPU: ResGen small's 6 + 1
    "base":  dict(width=768, layers=10, depth_layers=2, heads=12),   # DiT-B widths, 12 blocks as ResGen base
    "large": dict(width=1024, layers=20, depth_layers=4, heads=16),  # DiT-L widths, 24 blocks as ResGen large
    "xl":    dict(width=1152, layers=20, depth_layers=4, heads=16),  # DiT-XL widths, 24 blocks as ResGen xl
}


def make_config(size, **overrides):
    """RQTransformerConfig from a named size in SIZES plus the data-dependent fields (length, depth, ...)."""
    return sized_config(RQTransformerConfig, SIZES, size, overrides)


#################################################################################
#                       Causal DiT blocks with a KV cache                       #
#################################################################################
# Both transformers are causal: a token sees itself and the tokens before it (in raster order for the spatial
# transformer, in depth order for the depth transformer). In training every token is computed at once under a
# causal mask; in sampling one token per step, its keys and values written into a cache that later steps read, so
# generating L·D tokens costs L·D one-token steps and never recomputes a prefix.

class KVCache:
    """Keys and values of every block of one transformer for positions 0..n-1 (1-D, in sequence order).

    k, v: (blocks, B, heads, length, C/heads), preallocated; a step writes its slots in place (no reallocation,
    no host sync). The depth transformer's cache is reused at every spatial position: step j overwrites slot j and
    reads slots 0..j, so entries of the previous position are never read."""

    def __init__(self, blocks, batch, heads, length, head_dim, device=None, dtype=torch.float32):
        shape = (blocks, batch, heads, length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def check(self, name, blocks, batch, heads, length, head_dim):
        """A cache of another shape (batch, length, width, ...) is a UserError naming both shapes."""
        want = (blocks, batch, heads, length, head_dim)
        for t in (self.k, self.v):
            if tuple(t.shape) != want:
                raise UserError(f"{name} KV cache has shape {tuple(t.shape)}; this model and batch need "
                                f"(blocks, B, heads, length, C/heads) = {want}")


class CausalAttention(Attention):
    """resgen.Attention made causal, with an optional KV cache: x holds the tokens at slots start..start+T-1."""

    def forward(self, x, cache=None, block=0, start=0):  # x (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, C/H)
        p = self.dropout if self.training else 0.0
        if cache is None:  # all tokens at once (training, uncached sampling): a causal mask
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            end = start + T
            cache.k[block, :, :, start:end] = k
            cache.v[block, :, :, start:end] = v
            k, v = cache.k[block, :, :, :end], cache.v[block, :, :, :end]  # (B, H, end, C/H)
            # query t (slot start + t) sees slots 0..start + t: the mask is needed only when T > 1 (a prefill)
            mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class CausalBlock(Block):
    """ResGen's DiT block (adaLN-Zero from the class) with causal attention and an optional KV cache."""

    def __init__(self, width, heads, mlp_ratio, dropout):
        super().__init__(width, heads, mlp_ratio, dropout)
        self.attn = CausalAttention(width, heads, dropout)

    def modulation(self, cond):
        """shift, scale, gate of both sub-layers from the class embedding cond (N, C): computed once per generate(),
        not once per step (for a one-token step it would cost half the block's own matmuls)."""
        return self.ada(cond).chunk(6, dim=-1)

    def forward(self, x, cond=None, mod=None, cache=None, block=0, start=0):  # x (N, T, C), cond (N, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond) if mod is None else mod
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), cache, block, start)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


#################################################################################
#                                Sampling helpers                               #
#################################################################################

def check_sampling_args(cfg_schedule, top_p, temperature, top_k):
    """UserError for a sampler setting out of range; returns top_k as an int (0 = off)."""
    if cfg_schedule not in ("constant", "linear"):
        raise UserError(f"unknown cfg schedule {cfg_schedule!r}; choose from constant, linear")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k != int(top_k) or top_k < 0:
        raise UserError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    return int(top_k)


def top_k_filter(logits, k):
    """Keep the k largest logits (ties at the k-th value too), -inf elsewhere; k = 0 or k >= V: no filter.
    logits (..., V) -> (..., V). k is a Python int: no host sync."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def guided_logits(logits, w):
    """Classifier-free guidance on the logits: u + w·(c − u), the conditional rows first, then the null-class rows.
    Computed as c + (w − 1)·(c − u), the same value, so that w = 1 gives c bit for bit. logits (2B, V) -> (B, V)."""
    cond, uncond = logits.chunk(2)
    return cond + (w - 1.0) * (cond - uncond)


def sample_logits(logits, temperature, top_k, top_p, generator=None):
    """One token per row from softmax(logits / τ), filtered by top-k then top-p (τ = 0: the filtered argmax), by
    Gumbel-max on the device: logits (N, V) fp32 -> (N,) int64."""
    if temperature > 0:
        logits = logits / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    if temperature > 0:
        logits = logits + gumbel(logits.shape, generator, logits.device)
    return logits.argmax(-1)


#################################################################################
#                                 RQ-Transformer                                #
#################################################################################

class DepthClassifier(nn.Module):
    """The output layer: DiT's final adaLN (shift and scale from the class), then one linear map C → V per depth,
    logits (..., D, V)."""

    def __init__(self, config):
        super().__init__()
        C, self.D, self.V = config.width, config.depth, config.codebook_size
        self.norm = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.weight = nn.Parameter(torch.empty(self.D, self.V, C))
        self.bias = nn.Parameter(torch.zeros(self.D * self.V))  # 1-D, so train.py does not weight-decay it

    def initialize(self):
        """Zero modulation (adaLN-Zero), small logits: near-uniform predictions over the V codes at the start."""
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def modulation(self, cond):  # (N, C) -> shift, scale (N, C)
        return self.ada(cond).chunk(2, dim=-1)

    def forward(self, g, mod):
        """All depths at once: g (N, D, C) from the depth transformer, mod for N rows -> logits (N, D, V)."""
        x = modulate(self.norm(g), *mod)
        return torch.einsum("ndc,dvc->ndv", x, self.weight) + self.bias.view(self.D, self.V)

    def at_depth(self, g, mod, j):
        """Depth j only (a sampling step): g (N, 1, C) -> logits (N, V)."""
        x = modulate(self.norm(g), *mod).squeeze(1)
        return F.linear(x, self.weight[j], self.bias[j * self.V:(j + 1) * self.V])

    @staticmethod
    def scored(mask):
        """How many terms the loss averages over: the tokens it scores (every token, unless a mask says less)."""
        return mask.sum()


class RQTransformer(nn.Module):
    """Autoregressive transformer over RVQ codes (Lee et al. 2022; the baseline of PAPER.md §6, Table 2).

    codebooks: (D, V, c) float, the tokenizer's codebooks times the latent scale s, kept as a buffer (frozen), as
    in ResGen: the inputs are code embeddings, and a checkpoint generates on its own.
    """

    def __init__(self, config, codebooks):
        super().__init__()
        keep_codebooks(self, config, codebooks)
        C = config.width
        self.null_class = config.num_classes
        self.class_embed = nn.Embedding(config.num_classes + 1, C)  # the start token and the blocks' adaLN; last row: null
        self.code_in = nn.Linear(config.code_dim, C)  # Σ_j e(x_{i-1,j}) -> the spatial input at position i
        self.pos_embed = nn.Parameter(torch.zeros(1, config.length, C))
        self.spatial_blocks = nn.ModuleList([CausalBlock(C, config.heads, config.mlp_ratio, config.dropout)
                                             for _ in range(config.layers)])
        self.depth_in = nn.Linear(config.code_dim, C)  # Σ_{j'<j} e(x_{ij'}) -> the depth input at depth j >= 1
        self.depth_pos_embed = nn.Parameter(torch.zeros(1, config.depth, C))
        self.depth_blocks = nn.ModuleList([CausalBlock(C, config.heads, config.mlp_ratio, config.dropout)
                                           for _ in range(config.depth_layers)])
        self.head = DepthClassifier(config)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT initialisation as in ResGen (resgen.dit_initialize)."""
        dit_initialize(self, (self.class_embed.weight, self.pos_embed, self.depth_pos_embed),
                       [block.ada[-1] for block in list(self.spatial_blocks) + list(self.depth_blocks)])
        self.head.initialize()

    def num_params(self):
        """Trainable parameters (the frozen codebooks are a buffer, not counted)."""
        return sum(p.numel() for p in self.parameters())

    def compile_sampler(self):
        """Not available: the attention length grows at every one of the L + L·D steps, so a compiled step would
        recompile or run with symbolic shapes. One clear error instead of a silent no-op."""
        raise UserError("--compile compiles ResGen's sampler; the RQ-Transformer's steps change shape every step "
                        "(its KV caches grow) and are not compiled: run without --compile")

    # ---- inputs ----------------------------------------------------------------------------------------
    def spatial_inputs(self, codes, labels):
        """Spatial input sequence (PAPER.md §6's baseline; RQ-Transformer's "spatial transformer"): at i = 0 the
        start token, the class embedding; at i >= 1 Linear(c→C)(Σ_j e(x_{i-1,j})), the quantized latent of the
        previous position; plus a learned position embedding of i.
        codes (B, P, D) of positions 0..P-1 -> inputs (B, P + 1, C) of positions 0..P (clipped to L)."""
        B, P, _ = codes.shape
        latent = embed_codes(codes, self.codebooks).sum(-2)  # (B, P, c)
        x = torch.cat([self.class_embed(labels).unsqueeze(1), self.code_in(latent)], 1)[:, :self.config.length]
        return x + self.pos_embed[:, :x.shape[1]]

    def depth_inputs(self, codes, h):
        """Depth input sequences (RQ-Transformer's "depth transformer"): at depth 0 the spatial context h_i, at depth
        j >= 1 Linear(c→C)(Σ_{j'<j} e(x_{ij'})), the running sum of the depths already generated (the authors'
        cumsum_depth_ctx); plus a learned depth embedding. codes (B, L, D), h (B, L, C) -> (B, L, D, C)."""
        prefix = embed_codes(codes[..., :-1], self.codebooks[:-1]).cumsum(-2)  # (B, L, D-1, c): depths < 1..D-1
        x = torch.cat([h.unsqueeze(2), self.depth_in(prefix)], 2)  # (B, L, D, C)
        return x + self.depth_pos_embed

    # ---- all tokens at once (training, uncached sampling) --------------------------------------------------
    def logits(self, codes, labels):
        """Logits of every token given the tokens before it: codes (B, L, D) int64, labels (B,) -> (B, L, D, V).
        The logit of (i, j) depends only on the class and the tokens before (i, j) in raster-then-depth order."""
        B, L, D = codes.shape
        cond = self.class_embed(labels)  # (B, C)
        h = self.spatial_inputs(codes[:, :-1], labels)  # (B, L, C): position i reads positions < i
        for block in self.spatial_blocks:
            h = block(h, cond)
        x = self.depth_inputs(codes, h).flatten(0, 1)  # (B·L, D, C): one depth sequence per position
        cond_d = cond.repeat_interleave(L, 0)  # (B·L, C)
        for block in self.depth_blocks:
            x = block(x, cond_d)
        return self.head(x, self.head.modulation(cond_d)).view(B, L, D, -1)

    def _labels(self, labels, batch, device):
        if labels is None:  # unconditional: the null class
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        return labels.to(device=device, dtype=torch.long)

    def forward(self, codes, labels, mask=None, drop=None, count=None):
        """Training loss: cross-entropy of every token given the tokens before it, in nats per token.

        codes (B, L, D) int64, labels (B,) int64 or None. mask (B, L, D) bool: the tokens to score (default all; an
        autoregressive model predicts every token, train.py passes all True). drop (B,) bool: which labels become the
        null class (default: random with p = label_dropout in training, for CFG). count: the loss is the sum over
        scored tokens divided by count (default: their number here; train.py passes its share of the global batch's).
        Returns (loss, stats), stats a dict of detached scalar tensors."""
        B, L, D = codes.shape
        labels = self._labels(labels, B, codes.device)
        if drop is None and self.training and self.config.label_dropout > 0:
            # as in ResGen: the unconditional model p(x | null) for CFG is trained alongside the conditional one
            drop = torch.rand(B, device=codes.device) < self.config.label_dropout
        if drop is not None:
            labels = labels.masked_fill(drop.to(labels.device), self.null_class)
        logits = self.logits(codes, labels).float()  # (B, L, D, V)
        ce = F.cross_entropy(logits.flatten(0, 2), codes.flatten(), reduction="none").view_as(codes)
        m = torch.ones_like(codes, dtype=torch.float32) if mask is None else mask.float()
        local = m.sum().clamp_min(1.0)
        loss = (ce * m).sum() / (local if count is None else count)
        with torch.no_grad():
            stats = {"token_acc": ((logits.argmax(-1) == codes).float() * m).sum() / local,
                     "ce_first_depth": (ce[..., 0] * m[..., 0]).sum() / m[..., 0].sum().clamp_min(1.0),
                     "ce_last_depth": (ce[..., -1] * m[..., -1]).sum() / m[..., -1].sum().clamp_min(1.0)}
        return loss, stats

    # ---- one token per step (sampling) ----------------------------------------------------------------
    def new_caches(self, batch, device, dtype=torch.float32):
        """Empty KV caches for `batch` rows: (spatial, depth), each a KVCache."""
        c = self.config
        hd = c.width // c.heads
        return (KVCache(c.layers, batch, c.heads, c.length, hd, device, dtype),
                KVCache(c.depth_layers, batch, c.heads, c.depth, hd, device, dtype))

    def spatial_step(self, x, mods, cache, start):
        """The spatial transformer on the inputs of slots start..start+T-1, reading and extending its KV cache:
        x (N, T, C), mods: per block its modulation(cond) -> h (N, T, C). T = 1 in the step loop; T > 1 fills the
        cache with a given prefix in one pass."""
        c = self.config
        cache.check("spatial", c.layers, x.shape[0], c.heads, c.length, c.width // c.heads)
        if start + x.shape[1] > c.length:
            raise UserError(f"spatial step at slots {start}..{start + x.shape[1] - 1} is past the {c.length} positions")
        for b, (block, mod) in enumerate(zip(self.spatial_blocks, mods)):
            x = block(x, mod=mod, cache=cache, block=b, start=start)
        return x

    def depth_step(self, x, mods, cache, j):
        """The depth transformer on the input of depth j (x (N, 1, C)), reading depths 0..j-1 of this position from
        its KV cache -> (N, 1, C)."""
        c = self.config
        cache.check("depth", c.depth_layers, x.shape[0], c.heads, c.depth, c.width // c.heads)
        if not 0 <= j < c.depth:
            raise UserError(f"depth step {j} is outside depths 0..{c.depth - 1}")
        for b, (block, mod) in enumerate(zip(self.depth_blocks, mods)):
            x = block(x, mod=mod, cache=cache, block=b, start=j)
        return x

    def prompt_state(self, prompt_codes, prompt_mask, batch, device):
        """The starting state from a prompt: (codes (B, L, D) int64, given (B, L, D) bool, first position to generate).

        An autoregressive model continues a prefix: prompt_mask (B, L, D) bool (True = given) must give, in every row,
        a prefix of the tokens in generation order (positions in raster order, depths within a position), e.g. all
        depths of positions 0..P-1 (the top rows of an image, the start of a sequence). Rows may give prefixes of
        different lengths. Any other prompt is a UserError. Validation reads the tensors on the host, once, before the
        step loop; the cache is then filled with the positions every row gives in one pass."""
        L, D, V = self.config.length, self.config.depth, self.config.codebook_size
        state = prompt_tensors(prompt_codes, prompt_mask, (batch, L, D), V, device, self.check_prompt)
        if state is None:
            return (torch.zeros(batch, L, D, dtype=torch.long, device=device),
                    torch.zeros(batch, L, D, dtype=torch.bool, device=device), 0)
        codes, given = state
        full = int(given.flatten(1).sum(-1).min()) // D  # positions that every row gives entirely
        return codes, given, full

    def check_prompt(self, prompt_mask):
        """UserError unless every row of prompt_mask (B, L, D) bool gives a prefix in generation order."""
        flat = prompt_mask.flatten(1).cpu()  # (B, L·D) in generation order
        gap = flat[:, 1:] & ~flat[:, :-1]  # token t given, token t - 1 not
        if bool(gap.any()):
            b, t = gap.nonzero()[0].tolist()
            D = self.config.depth
            raise UserError(f"the RQ-Transformer continues a prefix (positions in raster order, every depth): "
                            f"prompt_mask row {b} gives position {(t + 1) // D} depth {(t + 1) % D} but not position "
                            f"{t // D} depth {t % D} (inpainting a region other than the last rows, or keeping "
                            f"coarse depths, needs ResGen)")

    @torch.no_grad()
    def generate(self, labels, steps=None, cfg=1.0, cfg_schedule="constant", top_p=1.0, temperature=1.0,
                 choice_temperature=None, generator=None, schedule=None, batch_size=None, callback=None,
                 prompt_codes=None, prompt_mask=None, top_k=0, cache=True):
        """Autoregressive sampling: positions in raster order, depths coarse to fine within each (Lee et al. 2022).

        Costs L steps of the spatial transformer and L·D steps of the depth transformer, whatever T a ResGen would
        take: `steps`, `choice_temperature` and `schedule` are accepted so that one call drives either model, and
        ignored (sample.py records the passes each model made).
        labels: (B,) int64, or None for unconditional samples (then `batch_size` gives B).
        cfg: guidance scale w on the logits, u + w·(c − u) (1 = off: one pass of B rows; else 2B rows per step).
        cfg_schedule: "constant" or "linear" (w at token t of the L·D in generation order: 1 + (w − 1)·t/(L·D)).
        top_k (0 = off), top_p, temperature: the token's distribution, softmax(logits / τ) filtered by top-k, then
        top-p (τ = 0: greedy).
        generator: a torch.Generator on the model's device (same seed -> same codes, cached or not).
        prompt_codes / prompt_mask (B, L, D): continue a given prefix (see prompt_state); given tokens come back
        unchanged. cache=False recomputes the full sequence at every step (L·D full passes): the reference the
        cached sampler is tested against.
        callback(position, codes, masked): after each position; masked (B, L, D) bool, True = not yet generated.
        Returns codes (B, L, D) int64. On CUDA the transformers run in bf16 and nothing in the step loop waits on
        the device.
        """
        top_k = check_sampling_args(cfg_schedule, top_p, temperature, top_k)
        device = self.codebooks.device
        L, D = self.config.length, self.config.depth
        B, guided, rows = sampling_rows(labels, batch_size, cfg, self.null_class, device)
        codes, given, start = self.prompt_state(prompt_codes, prompt_mask, B, device)

        def weight(t):  # the guidance scale at token t of the L·D (a Python float: no sync)
            return cfg if cfg_schedule == "constant" else 1.0 + (cfg - 1.0) * t / (L * D)

        def pick(logits, i, j):  # (R, V) fp32 -> the token of depth j at position i for each of the B rows
            if guided:
                logits = guided_logits(logits, weight(i * D + j))
            tok = sample_logits(logits, temperature, top_k, top_p, generator)  # (B,)
            return torch.where(given[:, i, j], codes[:, i, j], tok)

        was_training = self.training
        self.eval()
        # the uncached loop draws the same tokens in the same order as the cached one, from the same first position
        sample_tokens = self.sample_tokens if cache else self.sample_tokens_uncached
        sample_tokens(codes, given, start, rows, guided, pick, callback)
        self.train(was_training)
        return codes

    def sample_tokens(self, codes, given, start, rows, guided, pick, callback):
        """The sampler's loop with KV caches: positions start..L-1 of codes (B, L, D), filled in place, one spatial
        step per position and one depth step per token. pick(logits (R, V), i, j) -> the tokens (B,)."""
        B, L, D = codes.shape
        device = self.codebooks.device
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        R = rows.shape[0]
        twice = (lambda t: t.repeat(2, *([1] * (t.dim() - 1)))) if guided else (lambda t: t)
        with autocast:
            cond = self.class_embed(rows)  # (R, C)
            spatial_mods = [block.modulation(cond) for block in self.spatial_blocks]
            depth_mods = [block.modulation(cond) for block in self.depth_blocks]
            head_mod = self.head.modulation(cond)
            # the keys and values the blocks' linear maps write: bf16 under CUDA autocast, fp32 on the CPU
            kv_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            spatial_cache, depth_cache = self.new_caches(R, device, kv_dtype)
            inputs = self.spatial_inputs(twice(codes[:, :start]), rows)  # (R, start + 1, C) for positions 0..start
            if 0 < start < L:  # the positions every row gives: one pass fills their slots of the spatial cache
                self.spatial_step(inputs[:, :start], spatial_mods, spatial_cache, 0)
            x = inputs[:, start:start + 1]  # (R, 1, C): the input of the first position to generate
        for i in range(start, L):
            with autocast:
                h = self.spatial_step(x, spatial_mods, spatial_cache, i)  # (R, 1, C): context h_i
                y = h + self.depth_pos_embed[:, :1]
            latent = torch.zeros(B, self.config.code_dim, device=device)  # Σ_{j'<j} e(x_ij'), fp32
            for j in range(D):
                with autocast:
                    g = self.depth_step(y, depth_mods, depth_cache, j)
                    logits = self.head.at_depth(g, head_mod, j).float()  # (R, V)
                tok = pick(logits, i, j)  # (B,)
                codes[:, i, j] = tok
                latent = latent + F.embedding(tok, self.codebooks[j])  # (B, c)
                if j + 1 < D:
                    with autocast:
                        y = twice(self.depth_in(latent)).unsqueeze(1) + self.depth_pos_embed[:, j + 1:j + 2]
            if i + 1 < L:  # the next position's input: this position's quantized latent
                with autocast:
                    x = twice(self.code_in(latent)).unsqueeze(1) + self.pos_embed[:, i + 1:i + 2]
            if callback is not None:
                callback(i + 1, codes, self._not_generated(B, i, device) & ~given)

    def sample_tokens_uncached(self, codes, given, start, rows, guided, pick, callback):
        """sample_tokens without caches: the full sequence through the model for every token (L·D full passes), the
        reference the cached loop is tested against."""
        B, L, D = codes.shape
        device = self.codebooks.device
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        for i in range(start, L):
            for j in range(D):
                with autocast:
                    logits = self.logits(codes.repeat(2, 1, 1) if guided else codes, rows)[:, i, j].float()
                codes[:, i, j] = pick(logits, i, j)
            if callback is not None:
                callback(i + 1, codes, self._not_generated(B, i, device) & ~given)

    def _not_generated(self, batch, i, device):
        """(B, L, D) bool: the tokens of positions after i (those the sampler has not reached)."""
        after = torch.arange(self.config.length, device=device) > i
        return after.view(1, -1, 1).expand(batch, -1, self.config.depth)

    def forward_passes(self):
        """Sequential passes per generate(), whatever the batch: L of the spatial transformer, L·D of the depth."""
        return {"spatial": self.config.length, "depth": self.config.length * self.config.depth}


#################################################################################
#                         One interface for both models                         #
#################################################################################
# train.py writes checkpoints of kind "resgen" for either model and records the model in `arch` (checkpoints
# written before the RQ-Transformer existed have none: ResGen). sample.py and eval_fid.py load any of them with
# load_model and call the same .generate(labels, ..., cfg, top_p, temperature, generator, prompt_codes,
# prompt_mask) and .config.length / .depth.

ARCHS = ("resgen", ARCH)


def arch_of(config_or_model):
    """"rqtransformer" for an RQTransformer or its config, "resgen" otherwise."""
    config = getattr(config_or_model, "config", config_or_model)
    return ARCH if isinstance(config, RQTransformerConfig) else "resgen"


def checkpoint_arch(ckpt, path):
    """The architecture a train.py checkpoint holds: its `arch` entry, "resgen" when it has none (older files)."""
    arch = ckpt.get("arch", "resgen")
    if arch not in ARCHS:
        raise UserError(f"{path} holds a model of architecture {arch!r}; this code knows {', '.join(ARCHS)}")
    return arch


def checkpoint_config(ckpt, path):
    """The config a checkpoint was trained with, of its architecture (checkpoints.config_from_checkpoint)."""
    if checkpoint_arch(ckpt, path) == "resgen":
        return resgen.checkpoint_config(ckpt, path)
    return config_from_checkpoint(ckpt, path, RQTransformerConfig, "an RQ-Transformer")


def _peek(path):
    """The checkpoint's entries without reading its tensors (a memory map), to learn its architecture."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip file (legacy, corrupt, missing): load_checkpoint reports it properly
        return load_checkpoint(path, "resgen")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "resgen":
        return load_checkpoint(path, "resgen")  # its error names what the file is
    return ckpt


def load_model(path, ema=True, device="cpu"):
    """ResGen or RQTransformer from a train.py checkpoint, whichever it holds (PAPER.md §14): in eval mode, with
    `.meta` (the code cache's meta.json) and `.step`. ema=True takes the EMA weights when the checkpoint has them."""
    if checkpoint_arch(_peek(path), path) == "resgen":
        return resgen.load_resgen(path, ema=ema, device=device)
    return load_rqtransformer(path, ema=ema, device=device)


def load_rqtransformer(path, ema=True, device="cpu"):
    """RQTransformer from a train.py checkpoint, as resgen.load_resgen loads a ResGen
    (checkpoints.model_from_checkpoint)."""
    ckpt = load_checkpoint(path, "resgen")
    if checkpoint_arch(ckpt, path) != ARCH:
        raise UserError(f"{path} holds a {checkpoint_arch(ckpt, path)} model, not an RQ-Transformer")
    return model_from_checkpoint(ckpt, path, RQTransformer, RQTransformerConfig, "an RQ-Transformer", ema,
                                        device)
