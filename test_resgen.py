"""
Tests: property tests (hypothesis) for quantization, masking, the MoG head and the sampler, and end-to-end
smoke tests through the real command lines.  Run with:  python -m pytest -q test_resgen.py
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import tokenizer as T

HERE = os.path.dirname(os.path.abspath(__file__))
FMNIST = os.path.isfile(os.path.join(T.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
PROPS = settings(max_examples=25, deadline=None)


def run_cmd(*args, check=True, timeout=600, env=None):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    p = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
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
    with pytest.raises(T.UserError):
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
    assert meta["tokenizer_hash"] == T.file_hash(str(tiny_tokenizer)) and meta["latent_scale"] > 0
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
    assert T.load_checkpoint(str(out / "last.pt"), "tokenizer")["step"] == 8


@needs_fmnist
def test_reconstruct_command(tiny_tokenizer, tmp_path):
    p = run_cmd("tokenizer.py", "reconstruct", "--ckpt", str(tiny_tokenizer), "--limit", "20",
                "--out", str(tmp_path / "r.png"), "--device", "cpu")
    stats = json.loads(p.stdout.strip().splitlines()[-2])
    assert len(stats["psnr"]) == 3 and all(np.isfinite(stats["psnr"]))
    assert (tmp_path / "r.png").stat().st_size > 0


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
    ]
    for args in cases:
        p = run_cmd("tokenizer.py", *args, "--device", "cpu", check=False, timeout=120)
        assert_clean_error(p)
    assert (keep / "last.pt").read_bytes() == b"precious"
