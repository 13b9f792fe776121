"""
Checkpoint files, exported weights, and the checks every command shares: the one-line error and the command-line
runner, devices, atomic saves, weights-only loads, configs from checkpoints, the one loader of both model
architectures, config size checks, frozen codebooks, prompt checks, file hashes (PAPER.md §14).

    # shipped weights: the EMA weights in float16, the buffers (codebooks) in float32, no optimiser
    python checkpoints.py export --ckpt runs/resgen/last.pt --out weights/<name>.pt --tokenizer-out weights/<tok>.pt
    python checkpoints.py export --ckpt runs/tokenizer/last.pt --out weights/<tok>.pt

Every other file may import this one and it imports none of them at load time; only the export command imports the
model files, to read each checkpoint through its own loader.
"""
import argparse
import hashlib
import os
import sys
import tempfile
from dataclasses import asdict, fields

import torch


#################################################################################
#                          Errors and the command line                          #
#################################################################################

class UserError(Exception):
    """Bad input from the user: reported as one line on stderr and a non-zero exit, never a traceback."""


def run_cli(main):
    """Run a command-line `main()`, turning UserError (and a few OS errors) into one clear line and exit 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


#################################################################################
#               Checkpoint files: atomic saves, weights-only loads              #
#################################################################################

def publish(tmp, path):
    """Rename a finished temporary file into place, with the permissions a plainly created file would get
    (mkstemp makes files private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_checkpoint(obj, path):
    """Atomic write: a temporary file in the same folder, fsync, then rename, so a kill never leaves a broken file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, kind):
    """Load a checkpoint dict written by this project, of `kind` (or of one of a tuple of kinds).
    weights_only=True: a checkpoint never runs pickled code."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, truncated file, or a file holding pickled objects
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load checkpoint {path}: not a valid weights-only checkpoint ({first[:160]})")
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no 'kind' field)")
    kinds = (kind,) if isinstance(kind, str) else kind
    if ckpt["kind"] not in kinds:
        raise UserError(f"{path} is a {ckpt['kind']!r} checkpoint, expected a {' or '.join(map(repr, kinds))} "
                        f"checkpoint")
    return ckpt


def strip_prefixes(state_dict):
    """Remove the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes from state-dict keys."""
    out = {}
    for k, v in state_dict.items():
        for p in ("module.", "_orig_mod."):
            k = k.replace(p, "")
        out[k] = v
    return out


#################################################################################
#                            Models from checkpoints                            #
#################################################################################

def sized_config(cls, sizes, size, overrides):
    """A config of dataclass `cls` from a named size in `sizes` plus the data-dependent fields (length, depth, ...)."""
    if size not in sizes:
        raise UserError(f"unknown model size {size!r}; choose from {', '.join(sizes)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
    if unknown:
        raise UserError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**{**sizes[size], **overrides})


def config_from_checkpoint(ckpt, path, config_class, what):
    """The config (ResGenConfig or rqtransformer's RQTransformerConfig) a train.py checkpoint was trained with; `what`
    ("a ResGen", "an RQ-Transformer") names the model in errors. Fields added to the class since the checkpoint was
    written take their defaults (so older checkpoints load and resume); fields the class lacks (a retired head's,
    another version's) are a UserError that names them."""
    if "config" not in ckpt:
        raise UserError(f"{path} has no 'config' entry: not {what} training checkpoint")
    config = dict(ckpt["config"])
    unknown = sorted(set(config) - {f.name for f in fields(config_class)})
    if unknown:
        raise UserError(f"{path} has config fields {', '.join(unknown)} that this {config_class.__module__}.py's "
                        f"{config_class.__name__} lacks")
    try:
        return config_class(**config)
    except TypeError as e:
        raise UserError(f"{path}: config does not fit {config_class.__name__} ({e})")


def model_from_checkpoint(ckpt, path, model_class, config_class, what, ema=True, device="cpu"):
    """`model_class` (ResGen or RQTransformer) with the weights of a train.py checkpoint already read (PAPER.md §14),
    in eval mode, with `.meta` (the code cache's meta.json) and `.step` attached: the one loader of both
    architectures. ema=True takes the EMA weights when the checkpoint has them; a state dict that does not fit the
    model its config describes (missing, extra or reshaped entries) is a UserError that lists them."""
    if "model" not in ckpt:
        raise UserError(f"{path} has no 'model' entry: not {what} training checkpoint")
    config = config_from_checkpoint(ckpt, path, config_class, what)
    model_state = strip_prefixes(ckpt["model"])
    state = strip_prefixes(ckpt["ema"]) if ema and ckpt.get("ema") is not None else model_state
    if "codebooks" not in state and "codebooks" in model_state:  # an EMA of the trained parameters only
        state["codebooks"] = model_state["codebooks"]
    model = model_class(config, torch.zeros(config.depth, config.codebook_size, config.code_dim))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        parts = ([f"missing in checkpoint: {', '.join(missing[:5])}"] if missing else []) + \
                ([f"not in model: {', '.join(extra[:5])}"] if extra else []) + shapes[:5]
        raise UserError(f"{path} does not match the model its config describes ({asdict(config)}): " + "; ".join(parts))
    model.load_state_dict(state)
    model.meta = ckpt.get("meta", {})
    model.step = ckpt.get("step", 0)
    return model.to(device).eval()


#################################################################################
#                            Checks both models share                           #
#################################################################################

def check_sizes(config, positive):
    """One clear UserError for a model config's sizes: the fields named in `positive` >= 1, num_classes >= 0,
    width divisible by heads."""
    name = type(config).__name__
    for field in positive:
        if getattr(config, field) < 1:
            raise UserError(f"{name}.{field} must be >= 1, got {getattr(config, field)}")
    if config.num_classes < 0:
        raise UserError(f"{name}.num_classes must be >= 0, got {config.num_classes}")
    if config.width % config.heads:
        raise UserError(f"{name}.width {config.width} is not divisible by heads {config.heads}")


def keep_codebooks(model, config, codebooks):
    """model.config = config and the codebooks (D, V, c), checked against it, as a frozen buffer: a checkpoint then
    embeds codes and decodes samples on its own."""
    expected = (config.depth, config.codebook_size, config.code_dim)
    if tuple(codebooks.shape) != expected:
        raise UserError(f"codebooks have shape {tuple(codebooks.shape)} (D, V, c) but the {type(model).__name__} "
                        f"config expects {expected} (depth, codebook_size, code_dim)")
    model.config = config
    model.register_buffer("codebooks", codebooks.detach().float().clone())


def prompt_tensors(prompt_codes, prompt_mask, want, V, device, check_order):
    """A prompt's codes (B, L, D) int64 (0 where not given) and given (B, L, D) bool on `device`, or None for no
    prompt; one clear UserError for a missing half, a wrong shape or dtype, codes out of 0..V-1 where given, or a
    mask that check_order(prompt_mask) refuses (each architecture continues prompts of its own shape). Reads the
    tensors on the host: once, before a sampler's step loop."""
    if prompt_codes is None and prompt_mask is None:
        return None
    if prompt_codes is None or prompt_mask is None:
        raise UserError("a prompt needs both prompt_codes and prompt_mask")
    for name, t in (("prompt_codes", prompt_codes), ("prompt_mask", prompt_mask)):
        if tuple(t.shape) != want:
            raise UserError(f"{name} has shape {tuple(t.shape)}; this model samples (B, L, D) = {want}")
    if prompt_mask.dtype != torch.bool:
        raise UserError(f"prompt_mask must be bool (True = given), got {prompt_mask.dtype}")
    check_order(prompt_mask)
    if prompt_codes.dtype.is_floating_point or prompt_codes.dtype == torch.bool:
        raise UserError(f"prompt_codes must be integer codes, got {prompt_codes.dtype}")
    given = prompt_mask.to(device)
    codes = torch.where(given, prompt_codes.to(device=device, dtype=torch.long), 0)
    bad = given & ((codes < 0) | (codes >= V))
    if bool(bad.any()):
        b, i, j = bad.nonzero()[0].tolist()
        raise UserError(f"prompt_codes must be in 0..{V - 1} where given; row {b}, position {i}, depth {j} "
                        f"holds {int(codes[b, i, j])}")
    return codes, given


#################################################################################
#                               Files and devices                               #
#################################################################################

def file_hash(path):
    """Short sha256 of a file: ties a code cache and a ResGen checkpoint to the tokenizer that made the codes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def check_writable_dir(path):
    """Create `path` if needed and make sure we can write there; UserError otherwise (before any work is done)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {path}: {e.strerror or e}")


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE_HELP = "torch device: cpu, cuda or cuda:N (default: cuda when there is one, else cpu)"


def parse_device(name):
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown --device {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available here")
    return dev


#################################################################################
#                                Exported weights                               #
#################################################################################

def beside(name, path):
    """A file that the checkpoint at `path` names (its tokenizer): `name` as given when that file exists (or the
    name is absolute), else `name` in the checkpoint's own folder, where an exported model names its tokenizer, so
    shipped weights load from any working directory."""
    if os.path.isabs(name) or os.path.isfile(name):
        return name
    there = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    return there if os.path.isfile(there) else name


def half_state(model):
    """`model`'s state dict to ship: floating parameters in float16 (half the bytes; loading copies them into the
    model's float32), every buffer as it is, so the frozen codebooks, the RVQ's EMA statistics and the latent scale
    stay exact and codes embed, re-quantize and decode as in training."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    state = {}
    for name, v in model.state_dict().items():
        if name in params and v.is_floating_point():
            v = v.half()
            if not bool(torch.isfinite(v).all()):
                raise UserError(f"parameter {name} is not finite in float16 (|x| > 65504, or NaN); not exported")
        state[name] = v
    return state


def same_content(a, b):
    """Whether two loaded checkpoints hold the same entries: equal values, and tensors of equal dtype and values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_content(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return not torch.is_tensor(b) and not isinstance(b, dict) and a == b


def save_or_keep(obj, path):
    """save_checkpoint(obj, path), unless `path` already holds `obj` (True: written, False: left as it was). A file
    there that holds anything else is an error and stays: the models exported before name it by its hash."""
    if not os.path.exists(path):
        save_checkpoint(obj, path)
        return True
    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a checkpoint at all: refused below like any other content
        old = None
    if not same_content(old, obj):
        raise UserError(f"{path} exists and holds another file than this export (hash {file_hash(path)}); models "
                        f"exported before may name it: remove it or choose another --tokenizer-out")
    return False


def describe(obj, path):
    """One line on an exported file: its size against its weights in float32."""
    state = obj["model"]
    n16 = sum(v.numel() for v in state.values() if v.dtype == torch.float16)
    fp32 = sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in state.values())
    return (f"{path}: {obj['kind']} at step {obj['step']}, {n16:,} parameters in float16, "
            f"{os.path.getsize(path) / 1e6:.2f} MB (its weights in float32: {fp32 / 1e6:.2f} MB)")


def same_path(a, b):
    """Whether two paths name one file (the second of them may not exist yet)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def shipped_tokenizer(path):
    """A checkpoint of `tokenizer.py train` as shipped weights: kind, config, weights (half_state), step."""
    from tokenizer import load_tokenizer  # the models import this file: imported here, not at load time
    tok = load_tokenizer(path)
    return {"kind": "tokenizer", "config": asdict(tok.cfg), "model": half_state(tok),
            "step": load_checkpoint(path, "tokenizer").get("step", 0)}


def model_tokenizer(model, path):
    """The tokenizer file that the train.py checkpoint at `path` (loaded as `model`) names, checked against the hash
    its codes were made with; UserError when it names none (codes that carry their own codebooks) or another file."""
    name = model.meta.get("tokenizer")
    if not name:
        raise UserError(f"{path} was trained on codes that carry their own codebooks and names no tokenizer; "
                        f"drop --tokenizer-out")
    source = beside(name, path)
    if not os.path.isfile(source):
        raise UserError(f"tokenizer checkpoint {name!r} named by {path} was not found")
    want = model.meta.get("tokenizer_hash")
    if want and file_hash(source) != want:
        raise UserError(f"tokenizer {source} (hash {file_hash(source)}) is not the one {path} was trained on "
                        f"(hash {want})")
    return source


def cmd_export(args):
    """`export`: a train.py checkpoint (ResGen or RQ-Transformer, kind "resgen") or a tokenizer.py checkpoint (kind
    "tokenizer") as shipped weights, which the loaders read as they read any checkpoint (PAPER.md §14): kind,
    config, the EMA weights (the model's when there is no EMA) through half_state, the code cache's meta and the
    step; no optimiser, RNG states or data position. --tokenizer-out exports the tokenizer the model's codes came
    from as well, and the model's meta names it by a path relative to --out's folder and by its new hash. Every
    input is checked before the output folders are made and anything is written."""
    from rqtransformer import arch_of, load_model  # the models import this file: imported here, not at load time
    kind = load_checkpoint(args.ckpt, ("resgen", "tokenizer"))["kind"]
    for flag, path in (("--out", args.out), ("--tokenizer-out", args.tokenizer_out)):
        if path and same_path(path, args.ckpt):
            raise UserError(f"{flag} {path} is --ckpt itself; the export would replace the training checkpoint")
    if args.tokenizer_out and kind == "tokenizer":
        raise UserError("--tokenizer-out goes with a model checkpoint; --ckpt is a tokenizer (its export is --out)")
    if args.tokenizer_out and same_path(args.tokenizer_out, args.out):
        raise UserError("--tokenizer-out and --out name the same file")
    if kind == "tokenizer":
        obj = shipped_tokenizer(args.ckpt)
        check_writable_dir(os.path.dirname(os.path.abspath(args.out)))
        save_checkpoint(obj, args.out)
        print(f"wrote {describe(obj, args.out)}")
        return
    model = load_model(args.ckpt, ema=True)
    state, meta = half_state(model), dict(model.meta)
    if meta.get("tokenizer") and os.path.isfile(beside(meta["tokenizer"], args.ckpt)):  # valid from any folder
        meta["tokenizer"] = os.path.abspath(beside(meta["tokenizer"], args.ckpt))
    tok = None
    if args.tokenizer_out:
        source = model_tokenizer(model, args.ckpt)
        if same_path(args.tokenizer_out, source):
            raise UserError(f"--tokenizer-out {args.tokenizer_out} is the tokenizer's training checkpoint itself")
        tok = shipped_tokenizer(source)
    for path in filter(None, (args.tokenizer_out, args.out)):
        check_writable_dir(os.path.dirname(os.path.abspath(path)))
    if tok is not None:
        if save_or_keep(tok, args.tokenizer_out):
            print(f"wrote {describe(tok, args.tokenizer_out)}")
        else:
            print(f"{args.tokenizer_out} already holds this tokenizer's export; left as it was")
        meta["tokenizer"] = os.path.relpath(os.path.abspath(args.tokenizer_out),
                                            os.path.dirname(os.path.abspath(args.out)))
        meta["tokenizer_hash"] = file_hash(args.tokenizer_out)
    obj = {"kind": "resgen", "arch": arch_of(model), "config": asdict(model.config), "model": state, "meta": meta,
           "step": model.step}
    save_checkpoint(obj, args.out)
    print(f"wrote {describe(obj, args.out)}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Checkpoint files: export a checkpoint as shipped weights.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="a small weights-only file: EMA weights in float16, buffers in float32, "
                       "no optimiser")
    e.add_argument("--ckpt", required=True, help="a train.py checkpoint (ResGen or RQ-Transformer) or a "
                   "tokenizer.py train checkpoint")
    e.add_argument("--out", required=True, help="the exported file")
    e.add_argument("--tokenizer-out", default=None, help="also export the tokenizer the model's codes came from, to "
                   "this file (left as it is when it already holds that export); the model names it relative to "
                   "--out's folder")
    args = p.parse_args(argv)
    {"export": cmd_export}[args.cmd](args)


if __name__ == "__main__":
    import checkpoints  # the module the models import: run_cli must catch the UserError class they raise
    checkpoints.run_cli(checkpoints.main)
