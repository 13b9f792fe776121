"""
Zero-shot text-to-speech by continuation, in small (PAPER.md §6, the paper's Table 3 on LibriSpeech): espeak-ng
voices as speakers, a mel codec on the project's RVQ, ResGen with a phoneme prefix, and the paper's three numbers
(WER, CER by an offline recogniser; SIM by a speaker encoder) on voices and sentences never seen in training.

    python speech.py data   --out runs/tts/data                      # sentences x espeak-ng voices, 16 kHz, phonemes
    python speech.py codec  --data runs/tts/data --out runs/tts/codec --steps 1200     # log-mel -> conv -> RVQ -> mel
    python speech.py encode --codec runs/tts/codec/codec.pt --data runs/tts/data --out runs/tts/codes
    python train.py --data runs/tts/codes --model small --out runs/tts/mog --steps 1500 --batch-size 32 --lr 1e-3
    python speech.py continue --ckpt runs/tts/mog/last.pt --codec runs/tts/codec/codec.pt --data runs/tts/data \\
        --steps 16 --out runs/tts/wav/mog_T16           # the unseen speakers' utterances, continued after their prompt
    python speech.py reference --mode codec --codec runs/tts/codec/codec.pt --data runs/tts/data --out runs/tts/wav/codec
    python speech.py score --wavs runs/tts/wav/mog_T16 --data runs/tts/data --json-out runs/tts/results.jsonl
    python speech.py say --ckpt runs/tts/mog/last.pt --codec runs/tts/codec/codec.pt --prompt-wav me.wav \\
        --prompt-text "put the red box" --text "on the table now" --out said.wav

The continuation task (VALL-E's, the paper's §6): the text of the whole utterance and the codes of its first part are
given; the rest is generated through ResGen.generate's prompt path (prompt_codes / prompt_mask keep the prompt's
codes fixed). Every utterance is two halves, each spoken by espeak-ng and joined by a short pause, so the prompt ends
at a known frame inside the pause and the words of the generated part are known: WER/CER are of the generated part
only, and SIM is between the generated part and the real prompt (the paper's SIM-o).
"""
import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import wave

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import resgen
import train
from checkpoints import UserError, check_writable_dir, file_hash, run_cli
from tokenizer import RVQ, save_code_cache, write_code_cache

SR = 16000           # sample rate of everything here (espeak-ng speaks at 22,050 Hz: resampled)
N_FFT, HOP = 1024, 320  # 64 ms windows, 20 ms hop: 50 mel frames per second
N_MELS = 80
DOWN = 4             # mel frames per code frame: 80 ms, 12.5 codes per second (Mimi's rate)
FRAMES = 48          # L: code positions per utterance window (3.84 s); utterances are padded with silence to it
WINDOW = FRAMES * DOWN * HOP  # samples per window
LEAD, GAP = 0.10, 0.16  # seconds of silence before the first half and between the halves (two code frames)


#################################################################################
#                      Sentences: a small grammar, fixed splits                 #
#################################################################################
# GRID-like sentences "VERB the ADJ NOUN | PREP the PLACE END": the first half is the prompt's text, the second half
# the text the model must speak. A grammar (instead of free text) keeps the vocabulary small enough for a tiny model
# to learn in minutes, and lets an offline recogniser decode the generated half against a closed vocabulary.

VERBS = "put place move bring take find paint push give hold show drop lift pull send set".split()
ADJS = "red blue green white black brown pink gray big small old new soft warm round tall".split()
NOUNS = "box cup ball book coat lamp key bag hat bell shoe clock plate brush doll kite stone fork bottle spoon".split()
PREPS = "on under near behind beside by in over".split()
PLACES = "table door bed floor window shelf desk wall tree road car house fence stairs sink garden".split()
ENDS = "now soon again today please later tonight twice quickly slowly first here".split()

# Speakers: espeak-ng voice variants, each with its own pitch and rate. Every sixth variant is held out: those voices
# are never heard in training (the zero-shot speakers).
VARIANTS = ("m1 m2 m3 m4 m5 m6 m7 m8 f1 f2 f3 f4 f5 croak klatt klatt2 klatt3 klatt4 whisper whisperf Alex Alicia "
            "Andy Annie adam anika announcer antonio aunty belinda benjamin boris caleb david ed edward iven john "
            "linda max michael mike paul pedro quincy rob robert steph").split()


def speakers():
    """[(variant, pitch 0-99, rate words/min, split)]: a fixed list; split is 'test' for every sixth variant."""
    g = np.random.default_rng(1234)
    return [(v, int(g.integers(25, 75)), int(g.integers(150, 186)), "test" if i % 6 == 5 else "train")
            for i, v in enumerate(VARIANTS)]


def sentences(n_train, n_test, seed=0):
    """(train, test) lists of (first half, second half). The test sentences' second halves are never a second half in
    training: the generated words are a sequence the model has not heard (the words themselves recur)."""
    g = np.random.default_rng(seed)
    pick = lambda words: words[int(g.integers(len(words)))]
    tail = lambda: f"{pick(PREPS)} the {pick(PLACES)} {pick(ENDS)}"
    test_tails = []
    while len(test_tails) < n_test:
        t = tail()
        if t not in test_tails:
            test_tails.append(t)
    head = lambda: f"{pick(VERBS)} the {pick(ADJS)} {pick(NOUNS)}"
    test = [(head(), t) for t in test_tails]
    held = set(test_tails)
    train_set = []
    while len(train_set) < n_train:
        t = tail()
        if t not in held:
            train_set.append((head(), t))
    return train_set, test


#################################################################################
#                      espeak-ng: waveforms and phonemes                        #
#################################################################################

def espeak():
    """The espeak-ng executable (ESPEAK_NG overrides the name), or one clear UserError."""
    exe = shutil.which(os.environ.get("ESPEAK_NG", "espeak-ng"))
    if exe is None:
        raise UserError("espeak-ng not found on PATH: install it (apt-get install espeak-ng, or make setup-tts)")
    return exe


def resample(x, sr_in, sr_out):
    """Band-limited resampling by the FFT (zero-padding or truncating the spectrum): exact for a periodic signal,
    and the utterances here start and end in silence. x (n,) float -> (round(n·sr_out/sr_in),) float32."""
    x = torch.as_tensor(x, dtype=torch.float64)
    n_out = int(round(len(x) * sr_out / sr_in))
    spec = torch.fft.rfft(x)
    keep = min(len(spec), n_out // 2 + 1)
    y = torch.fft.irfft(spec[:keep], n_out) * (n_out / len(x))
    return y.float()


def speak(text, variant, pitch, rate, tmp):
    """One espeak-ng utterance, 16 kHz float32 with its leading and trailing silence trimmed."""
    path = os.path.join(tmp, "say.wav")
    p = subprocess.run([espeak(), "-v", f"en-us+{variant}", "-p", str(pitch), "-s", str(rate), "-w", path, text],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(f"espeak-ng failed on {text!r} with voice {variant}: {p.stderr.strip()[:200]}")
    x, sr = read_wav(path)
    x = resample(x, sr, SR)
    loud = (x.abs() > 0.02).nonzero()
    if not len(loud):
        raise UserError(f"espeak-ng produced silence for {text!r} with voice {variant}")
    return x[max(0, int(loud[0]) - 160):int(loud[-1]) + 160]  # keep 10 ms on either side


def phonemes(text):
    """espeak-ng's own phonemes of a text (IPA, `espeak-ng -q --ipa`): the model's text input."""
    if not text.strip():
        raise UserError("empty text: there is nothing to speak")
    p = subprocess.run([espeak(), "-q", "--ipa", "-v", "en-us", text], capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(f"espeak-ng failed to phonemize {text!r}: {p.stderr.strip()[:200]}")
    return " ".join(p.stdout.split())


def text_ids(phones, vocab, length):
    """Phoneme string -> int64 (length,) ids (0 = padding); UserError for an unknown symbol or a text too long."""
    ids = [vocab.index(ch) + 1 if ch in vocab else -1 for ch in phones]
    if -1 in ids:
        raise UserError(f"phoneme {phones[ids.index(-1)]!r} of {phones!r} is not in the model's phoneme set")
    if len(ids) > length:
        raise UserError(f"the text has {len(ids)} phoneme symbols; the model takes at most {length}")
    return np.array(ids + [0] * (length - len(ids)), np.int64)


def utterance(first, second, speaker, tmp):
    """(waveform (WINDOW,) float32, prompt frames): LEAD silence, the first half, GAP, the second half, silence to
    the window. The prompt is the code frames up to the middle of the pause. None when it does not fit."""
    v, pitch, rate, _ = speaker
    a, b = speak(first, v, pitch, rate, tmp), speak(second, v, pitch, rate, tmp)
    lead, gap = int(LEAD * SR), int(GAP * SR)
    if lead + len(a) + gap + len(b) > WINDOW - SR // 20:  # keep 50 ms of silence at the end
        return None
    x = torch.zeros(WINDOW)
    x[lead:lead + len(a)] = a
    x[lead + len(a) + gap:lead + len(a) + gap + len(b)] = b
    frame = DOWN * HOP
    return x, int(round((lead + len(a) + gap / 2) / frame))


#################################################################################
#                       WAV files and the log-mel filterbank                    #
#################################################################################

def write_wav(path, x, sr=SR):
    """16-bit mono PCM WAV (the standard library's wave module); x float in [-1, 1], clipped."""
    pcm = (np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sr))
        f.writeframes(pcm.tobytes())


def read_wav(path):
    """(float32 tensor (n,) in [-1, 1], sample rate) of a 16-bit PCM WAV (channels averaged); UserError otherwise."""
    try:
        with wave.open(path if not isinstance(path, bytes) else io.BytesIO(path), "rb") as f:
            if f.getsampwidth() != 2:
                raise UserError(f"{path}: only 16-bit PCM WAV files are read, this one has {8 * f.getsampwidth()} bits")
            ch, sr = f.getnchannels(), f.getframerate()
            pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    except (OSError, EOFError, wave.Error) as e:
        raise UserError(f"cannot read WAV file {path}: {e}")
    x = torch.from_numpy(pcm.astype(np.float32) / 32767.0)
    return x.view(-1, ch).mean(-1), sr


def mel_filterbank(n_mels=N_MELS, n_fft=N_FFT, sr=SR):
    """Triangular filters on the HTK mel scale m = 2595·log10(1 + f/700), 0 Hz to Nyquist: (n_mels, n_fft/2 + 1)."""
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    edges = hz(torch.linspace(0.0, 2595.0 * np.log10(1.0 + sr / 2 / 700.0), n_mels + 2, dtype=torch.float64))
    freqs = torch.linspace(0.0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise, fall = (freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)
    return torch.minimum(rise, fall).clamp_min(0.0).float()


FILTERS = mel_filterbank()
WINDOW_FN = torch.hann_window(N_FFT)


def stft(x):
    """x (..., n) -> complex (..., n_fft/2 + 1, n/HOP + 1), centred frames."""
    return torch.stft(x, N_FFT, HOP, window=WINDOW_FN, center=True, return_complex=True)


def log_mel(x):
    """Waveform (..., n) -> natural-log mel magnitudes (..., N_MELS, n/HOP): the codec's input and output."""
    mag = stft(x).abs()[..., :-1]  # the last centred frame starts past the window: dropped, n/HOP frames
    return torch.log((FILTERS @ mag).clamp_min(1e-5))


def griffin_lim(logmel, iters=32, momentum=0.99, seed=0):
    """Log-mel (B, N_MELS, T) -> waveform (B, T·HOP): the mel is mapped back to linear magnitudes by the filterbank's
    pseudo-inverse, then the phase is found by the fast Griffin-Lim iteration (Perraudin et al. 2013): alternate
    projections between consistent spectrograms (stft of an istft) and the given magnitudes, with momentum."""
    mag = (torch.linalg.pinv(FILTERS) @ logmel.exp()).clamp_min(0.0)
    mag = torch.cat([mag, mag[..., -1:]], -1)  # the dropped last frame, for istft's length
    n = logmel.shape[-1] * HOP
    g = torch.Generator().manual_seed(seed)
    angles = torch.polar(torch.ones_like(mag), 2 * np.pi * torch.rand(mag.shape, generator=g))
    previous = torch.zeros_like(angles)
    for _ in range(iters):
        rebuilt = stft(torch.istft(mag * angles, N_FFT, HOP, window=WINDOW_FN, center=True, length=n))
        angles = rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / angles.abs().clamp_min(1e-12)
        previous = rebuilt
    x = torch.istft(mag * angles, N_FFT, HOP, window=WINDOW_FN, center=True, length=n)
    return x / x.abs().amax(-1, keepdim=True).clamp_min(1.0)  # no clipping in the 16-bit file


#################################################################################
#                         The data set: make and load                           #
#################################################################################

def make_data(out, n_train, n_test_per_speaker, seed=0):
    """Speak the sentences: training sentences by training speakers (mels only), held-out sentences by held-out
    speakers (waveforms kept for the evaluation). Writes out/data.npz and out/meta.json."""
    espeak()
    check_writable_dir(out)
    spk = speakers()
    train_spk = [i for i, s in enumerate(spk) if s[3] == "train"]
    test_spk = [i for i, s in enumerate(spk) if s[3] == "test"]
    train_sents, test_sents = sentences(n_train, n_test_per_speaker * len(test_spk), seed)
    words = sorted({w for a, b in train_sents + test_sents for w in (a + " " + b).split()})
    word_phones = {w: phonemes(w) for w in words}  # the grammar is closed: one espeak-ng call per word
    phones = lambda a, b: " ".join(word_phones[w] for w in (a + " " + b).split())
    vocab = sorted({ch for p in word_phones.values() for ch in p} | {" "})
    length = 8 * -(-max(len(phones(a, b)) for a, b in train_sents + test_sents) // 8)
    g = np.random.default_rng(seed)
    data = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for split, sents, who in (("train", train_sents, None), ("test", test_sents, test_spk)):
            mels, waves, prompt, text, speaker, kept = [], [], [], [], [], []
            for k, (a, b) in enumerate(sents):
                s = who[k % len(who)] if who else train_spk[int(g.integers(len(train_spk)))]
                u = utterance(a, b, spk[s], tmp)
                if u is None:
                    continue
                x, p = u
                mels.append(log_mel(x).half())
                if split == "test":
                    waves.append((x.clamp(-1, 1) * 32767).round().short())
                prompt.append(p)
                text.append(text_ids(phones(a, b), vocab, length))
                speaker.append(s)
                kept.append([a, b])
            data[f"{split}_mel"] = torch.stack(mels).numpy()
            data[f"{split}_prompt"], data[f"{split}_text"] = np.array(prompt), np.stack(text)
            data[f"{split}_speaker"], data[f"{split}_sentences"] = np.array(speaker), np.array(kept)
            if waves:
                data["test_wave"] = torch.stack(waves).numpy()
            print(f"{split}: {len(mels)} utterances of {len(sents)} ({len(set(speaker))} speakers), "
                  f"{time.time() - t0:.0f} s", flush=True)
    mel = torch.from_numpy(data["train_mel"]).float()
    meta = {"sr": SR, "n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS, "down": DOWN, "frames": FRAMES,
            "vocab": vocab, "text_length": length, "mel_mean": float(mel.mean()), "mel_std": float(mel.std()),
            "speakers": spk}
    np.savez(os.path.join(out, "data.npz"), **data)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def load_data(path):
    """(arrays of data.npz, meta) of a `speech.py data` folder; UserError when it is not one."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        return dict(np.load(os.path.join(path, "data.npz"))), meta
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not a speech data folder (make one with `python speech.py data`): {e}")


#################################################################################
#                    The speech codec: log-mel -> conv -> RVQ -> mel            #
#################################################################################
# The codec plays the RVQ-VAE's part for audio: a 1-D conv encoder turns 4 mel frames into one c-dim latent, the
# project's RVQ quantizes it with D codebooks (greedy residuals, EMA, k-means init), a mirrored decoder predicts the
# normalised log-mel. Waveforms come back by Griffin-Lim: no neural vocoder, so every row of the table (the real mel
# included) is heard through the same phase reconstruction.

class ResBlock1d(nn.Module):
    def __init__(self, ch, dilation):
        super().__init__()
        self.net = nn.Sequential(nn.GELU(), nn.Conv1d(ch, ch, 3, padding=dilation, dilation=dilation),
                                 nn.GELU(), nn.Conv1d(ch, ch, 1))

    def forward(self, x):
        return x + self.net(x)


class SpeechCodec(nn.Module):
    """Mel codec over RVQ tokens: (B, N_MELS, 4L) normalised log-mel <-> codes (B, L, D)."""

    def __init__(self, depth=8, codebook_size=256, dim=16, channels=128):
        super().__init__()
        self.cfg = dict(depth=depth, codebook_size=codebook_size, dim=dim, channels=channels)
        c = channels
        self.encoder = nn.Sequential(
            nn.Conv1d(N_MELS, c, 5, padding=2), ResBlock1d(c, 1),
            nn.Conv1d(c, c, 4, stride=2, padding=1), ResBlock1d(c, 1), ResBlock1d(c, 3),
            nn.Conv1d(c, c, 4, stride=2, padding=1), ResBlock1d(c, 1), ResBlock1d(c, 3), nn.GELU(),
            nn.Conv1d(c, dim, 3, padding=1))
        self.rvq = RVQ(depth, codebook_size, dim)
        self.decoder = nn.Sequential(
            nn.Conv1d(dim, c, 3, padding=1), ResBlock1d(c, 1), ResBlock1d(c, 3),
            nn.ConvTranspose1d(c, c, 4, stride=2, padding=1), ResBlock1d(c, 1), ResBlock1d(c, 3),
            nn.ConvTranspose1d(c, c, 4, stride=2, padding=1), ResBlock1d(c, 1), nn.GELU(),
            nn.Conv1d(c, N_MELS, 5, padding=2))
        self.register_buffer("norm", torch.tensor([0.0, 1.0]))  # mean and std of the training log-mels

    def latent(self, logmel):  # (B, N_MELS, T) log-mel -> (B, T/4, c)
        return self.encoder((logmel - self.norm[0]) / self.norm[1]).transpose(1, 2)

    def decode_latent(self, z):  # (B, L, c) -> (B, N_MELS, 4L) log-mel
        return self.decoder(z.transpose(1, 2)) * self.norm[1] + self.norm[0]

    def encode(self, logmel):  # -> codes (B, L, D) int64
        return self.rvq.quantize(self.latent(logmel))

    def decode(self, codes):  # codes (B, L, D) -> log-mel (B, N_MELS, 4L)
        return self.decode_latent(self.rvq.dequantize(codes))

    def forward(self, logmel):
        """(reconstructed log-mel, commitment loss): the straight-through RVQ of tokenizer.RVQ.forward."""
        zq, _, commit = self.rvq(self.latent(logmel))
        return self.decode_latent(zq), commit


def train_codec(data, out, steps, batch_size=16, lr=2e-3, commit_weight=0.1, depth=8, codebook_size=256, seed=0):
    """Train the codec on the training speakers' mels (L1 + L2 on the log-mel, cumulative commitment); writes
    out/codec.pt and returns the test log-mels' L1 error per code depth prefix."""
    arrays, meta = load_data(data)
    check_writable_dir(out)
    torch.manual_seed(seed)
    codec = SpeechCodec(depth, codebook_size)
    codec.norm.copy_(torch.tensor([meta["mel_mean"], meta["mel_std"]]))
    mels = torch.from_numpy(arrays["train_mel"])
    opt = torch.optim.AdamW(codec.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # linear warm-up, cosine decay: a short run that ends settled
            group["lr"] = lr * min(1.0, step / 100) * (0.55 + 0.45 * np.cos(np.pi * step / steps))
        x = mels[torch.randint(0, len(mels), (batch_size,), generator=g)].float()
        rec, commit = codec(x)
        err = (rec - x) / meta["mel_std"]
        loss = err.abs().mean() + err.pow(2).mean() + commit_weight * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps:
            print(f"codec step {step}/{steps} | loss {loss.item():.4f} | commit {commit.item():.4f} | "
                  f"{time.time() - t0:.0f} s", flush=True)
    codec.eval()
    torch.save({"kind": "speech_codec", "cfg": codec.cfg, "state": codec.state_dict(), "data_meta": meta},
               os.path.join(out, "codec.pt"))
    with torch.no_grad():
        x = torch.from_numpy(arrays["test_mel"]).float()
        codes = codec.encode(x)
        by_depth = [float((codec.decode_latent(codec.rvq.dequantize(codes[..., :d])) - x).abs().mean())
                    for d in range(1, depth + 1)]
    print("test log-mel L1 by depth prefix: " + " ".join(f"{e:.3f}" for e in by_depth), flush=True)
    return by_depth


def load_codec(path):
    """SpeechCodec from `speech.py codec`'s codec.pt, in eval mode, with .data_meta attached."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"cannot read codec checkpoint {path}: {e}")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "speech_codec":
        raise UserError(f"{path} is not a speech codec checkpoint (speech.py codec writes codec.pt)")
    codec = SpeechCodec(**ckpt["cfg"])
    codec.load_state_dict(ckpt["state"])
    codec.data_meta = ckpt["data_meta"]
    return codec.eval()


@torch.no_grad()
def encode_mels(codec, mels, batch_size=256):
    return torch.cat([codec.encode(torch.as_tensor(mels[i:i + batch_size]).float())
                      for i in range(0, len(mels), batch_size)])


def encode_cache(codec_path, data, out):
    """The training speakers' codes as a code cache with text (train.py's input): codes.npy, codebooks.npy, and the
    phoneme prefix text.npy with meta.json's text_vocab and text_length (train.load_cache_text)."""
    codec = load_codec(codec_path)
    arrays, meta = load_data(data)
    codes = encode_mels(codec, arrays["train_mel"]).numpy()
    cache = save_code_cache(out, codes, None, codec.rvq.codebooks.numpy())
    np.save(os.path.join(out, train.TEXT_FILE), arrays["train_text"])
    cache.update(text_vocab=len(meta["vocab"]) + 1, text_length=meta["text_length"],
                 codec=os.path.abspath(codec_path), codec_hash=file_hash(codec_path))
    write_code_cache(out, np.zeros(len(codes), np.int64), cache)
    print(f"{out}: {codes.shape} codes, text {arrays['train_text'].shape}", flush=True)


#################################################################################
#                  Continuation: the prompt's codes fixed, the rest generated   #
#################################################################################

def continuation_prompt(codes, prompt_frames, length):
    """(prompt_codes, prompt_mask) for ResGen.generate: all D depths of the first p_b frames given, the rest masked.
    codes (B, L, D); prompt_frames (B,) ints; a prompt that leaves no frame to generate is a UserError."""
    prompt_frames = torch.as_tensor(prompt_frames, dtype=torch.long)
    if int(prompt_frames.max()) >= length or int(prompt_frames.min()) < 1:
        raise UserError(f"a prompt of {int(prompt_frames.max())} code frames leaves nothing to generate in the "
                        f"window of {length} frames ({length * DOWN * HOP / SR:.2f} s); give a shorter prompt")
    given = torch.arange(length) < prompt_frames[:, None]  # (B, L)
    mask = given[..., None].expand(*codes.shape).clone()
    return torch.where(mask, codes, 0), mask


@torch.no_grad()
def continue_codes(model, codes, prompt_frames, text, steps, cfg=1.0, temperature=1.0, batch_size=32, seed=0):
    """Generate every utterance's frames after its prompt: codes (N, L, D) int64 with the prompt unchanged."""
    out = []
    for b, i in enumerate(range(0, len(codes), batch_size)):
        pc, pm = continuation_prompt(codes[i:i + batch_size], prompt_frames[i:i + batch_size], model.config.length)
        gen = torch.Generator().manual_seed(seed + b)
        out.append(model.generate(torch.zeros(len(pc), dtype=torch.long), steps, cfg=cfg, temperature=temperature,
                                  generator=gen, prompt_codes=pc, prompt_mask=pm,
                                  text=torch.as_tensor(text[i:i + batch_size]).long()))
    return torch.cat(out)


def write_set(out, waves, arrays, how):
    """The WAV files of one row of the table (out/NNN.wav) and out/manifest.json: which utterance each file is, where
    its prompt ends, and how it was made."""
    check_writable_dir(out)
    frame = DOWN * HOP
    items = []
    for k, x in enumerate(waves):
        name = f"{k:03d}.wav"
        write_wav(os.path.join(out, name), x)
        items.append({"file": name, "index": k, "prompt_end": int(arrays["test_prompt"][k]) * frame,
                      "speaker": int(arrays["test_speaker"][k]), "text": " ".join(arrays["test_sentences"][k])})
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"how": how, "items": items}, f, indent=1)


def check_model_fits(model, codec, meta):
    c = model.config
    want = (codec.rvq.depth, codec.rvq.codebook_size, codec.rvq.dim, FRAMES, meta["text_length"])
    if (c.depth, c.codebook_size, c.code_dim, c.length, c.text_length) != want:
        raise UserError(f"the model has (D, V, c, L, P) = {(c.depth, c.codebook_size, c.code_dim, c.length, c.text_length)}"
                        f" but this codec and data give {want}")


def continue_test_set(ckpt, codec_path, data, out, steps, cfg, temperature, limit=None):
    """Continue the held-out speakers' utterances after their prompts; WAVs and manifest in out. Returns seconds per
    utterance spent in generate (the sampler alone, one batch)."""
    codec, model = load_codec(codec_path), resgen.load_resgen(ckpt)
    arrays, meta = load_data(data)
    check_model_fits(model, codec, meta)
    n = len(arrays["test_mel"]) if limit is None else limit
    codes = encode_mels(codec, arrays["test_mel"][:n])
    t0 = time.time()
    gen = continue_codes(model, codes, arrays["test_prompt"][:n], arrays["test_text"][:n], steps, cfg, temperature,
                         batch_size=n)
    seconds = (time.time() - t0) / n
    with torch.no_grad():
        waves = griffin_lim(codec.decode(gen))
    write_set(out, waves.numpy(), arrays, {"ckpt": ckpt, "head": model.config.head, "steps": steps, "cfg": cfg,
                                           "temperature": temperature, "sampling_s_per_utt": seconds})
    torch.save(gen, os.path.join(out, "codes.pt"))
    print(f"{out}: {n} continuations, T = {steps}, {seconds:.3f} s per utterance in generate", flush=True)


def reference_set(mode, data, out, codec_path=None):
    """The comparison rows: real espeak-ng audio (real), its log-mel through Griffin-Lim (mel), and its codec
    resynthesis (codec: encode, decode, Griffin-Lim), written as continue_test_set writes generated speech."""
    arrays, meta = load_data(data)
    if mode == "real":
        waves = torch.from_numpy(arrays["test_wave"]).float() / 32767.0
    elif mode == "mel":
        waves = griffin_lim(torch.from_numpy(arrays["test_mel"]).float())
    else:
        codec = load_codec(codec_path)
        with torch.no_grad():
            waves = griffin_lim(codec.decode(encode_mels(codec, arrays["test_mel"])))
    write_set(out, waves.numpy(), arrays, {"mode": mode})


#################################################################################
#            Metrics: WER / CER (pocketsphinx), SIM (resemblyzer)               #
#################################################################################

def recogniser():
    """pocketsphinx's US English acoustic model (shipped in its wheel) with the generated halves' grammar, PREP the
    PLACE END (as GRID is scored): a word is heard among its slot's 8-16 choices. A free loop over the same words
    scored real audio at 47% WER against the grammar's 11% (16 dev utterances): too weak to tell rows apart."""
    try:
        from pocketsphinx import Decoder
    except ImportError:
        raise UserError("pocketsphinx is not installed: make setup-tts (pip install pocketsphinx)")
    slots = {"p": PREPS, "pl": PLACES, "e": ENDS}
    grammar = ("#JSGF V1.0;\ngrammar tail;\npublic <tail> = <p> the <pl> <e>;\n"
               + "".join(f"<{k}> = {' | '.join(v)};\n" for k, v in slots.items()))
    dec = Decoder(samprate=SR, jsgf=None, lm=None, loglevel="FATAL")
    dec.set_jsgf_string("tail", grammar)
    dec.activate_search("tail")
    return dec


def transcribe(dec, x, seed=0):
    """The recogniser's words for waveform x. Dithered (seeded, -70 dB): espeak-ng's digital silence (exact zeros)
    made pocketsphinx's features degenerate and it returned nothing for most real utterances."""
    x = np.asarray(x) + 3e-4 * np.random.default_rng(seed).standard_normal(len(x))
    pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes()
    dec.start_utt()
    dec.process_raw(pcm, full_utt=True)
    dec.end_utt()
    return dec.hyp().hypstr if dec.hyp() is not None else ""


def score(wavs, data, json_out=None):
    """WER and CER of the generated halves (everything after prompt_end) against their text, and SIM: the cosine
    between resemblyzer embeddings of the generated half and of the real prompt (the paper's SIM-o)."""
    try:
        import jiwer
        from resemblyzer import VoiceEncoder, preprocess_wav
    except ImportError as e:
        raise UserError(f"{e.name} is not installed: make setup-tts (pip install jiwer resemblyzer)")
    arrays, _ = load_data(data)
    try:
        with open(os.path.join(wavs, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{wavs} holds no manifest.json of speech.py continue / reference: {e}")
    dec, enc = recogniser(), VoiceEncoder("cpu", verbose=False)
    real = torch.from_numpy(arrays["test_wave"]).float().numpy() / 32767.0
    refs, hyps, sims = [], [], []
    for item in manifest["items"]:
        x, _ = read_wav(os.path.join(wavs, item["file"]))
        cut = item["prompt_end"]
        refs.append(str(arrays["test_sentences"][item["index"]][1]))  # the second half: the generated words
        hyps.append(transcribe(dec, x[cut:].numpy()))
        prompt = preprocess_wav(real[item["index"]][:cut], SR)
        sims.append(float(np.dot(enc.embed_utterance(preprocess_wav(x[cut:].numpy(), SR)), enc.embed_utterance(prompt))))
    row = {"wavs": wavs, **manifest["how"], "n": len(refs), "wer": round(100 * jiwer.wer(refs, hyps), 2),
           "cer": round(100 * jiwer.cer(refs, hyps), 2), "sim": round(float(np.mean(sims)), 4)}
    print(json.dumps(row), flush=True)
    print("  e.g. " + " | ".join(f"{r} -> {h}" for r, h in list(zip(refs, hyps))[:3]), flush=True)
    if json_out:
        with open(json_out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


#################################################################################
#                   Sampling cost against the codec depth D                     #
#################################################################################

def bench_depth(ckpt, depths, steps, batch_size, repeats=3):
    """Seconds per utterance of generate() at T = steps for a model of the checkpoint's size at each depth D (random
    weights and codebooks: the cost does not depend on them), the same prompt fraction and text. One line each."""
    base = resgen.load_resgen(ckpt).config
    rows = []
    for head in ("mog", "tokens"):
        for D in depths:
            torch.manual_seed(0)
            cfg = resgen.ResGenConfig(**{**base.__dict__, "depth": D, "head": head})
            model = resgen.ResGen(cfg, torch.randn(D, cfg.codebook_size, cfg.code_dim)).eval()
            codes = torch.randint(0, cfg.codebook_size, (batch_size, cfg.length, D))
            text = torch.randint(1, cfg.text_vocab, (batch_size, cfg.text_length))
            best = float("inf")
            for _ in range(repeats):
                t0 = time.time()
                continue_codes(model, codes, [cfg.length // 2] * batch_size, text, steps, batch_size=batch_size)
                best = min(best, time.time() - t0)
            rows.append({"head": head, "depth": D, "steps": steps, "batch": batch_size,
                         "s_per_utt": round(best / batch_size, 4)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


#################################################################################
#          say: one utterance in a new voice, from a WAV prompt and text        #
#################################################################################

def say(ckpt, codec_path, prompt_wav, prompt_text, text, out, steps, cfg, temperature, seed=0):
    """Continue a 16-bit WAV prompt (any rate, resampled to 16 kHz; its words are prompt_text) with `text`."""
    if not text.strip() or not prompt_text.strip():
        raise UserError("empty text: --text and --prompt-text must both name words")
    phones = phonemes(prompt_text) + " " + phonemes(text)
    codec, model = load_codec(codec_path), resgen.load_resgen(ckpt)
    meta = codec.data_meta
    x, sr = read_wav(prompt_wav)
    x = resample(x, sr, SR) if sr != SR else x
    frames = len(x) // (DOWN * HOP)
    if frames >= model.config.length:
        raise UserError(f"the prompt is {len(x) / SR:.2f} s ({frames} code frames); the window holds "
                        f"{model.config.length} frames ({model.config.length * DOWN * HOP / SR:.2f} s) and needs some "
                        f"left to generate: give a shorter prompt")
    ids = text_ids(phones, meta["vocab"], model.config.text_length)
    window = torch.zeros(WINDOW)
    window[:frames * DOWN * HOP] = x[:frames * DOWN * HOP]
    codes = codec.encode(log_mel(window)[None])
    gen = continue_codes(model, codes, [frames], ids[None], steps, cfg, temperature, seed=seed)
    with torch.no_grad():
        write_wav(out, griffin_lim(codec.decode(gen))[0].numpy())
    print(f"{out}: {frames} prompt frames continued to {model.config.length}", flush=True)


#################################################################################
#                      Figure: prompt | generated, as mels                      #
#################################################################################

def figure(wav_dirs, data, out, index=0):
    """One row per WAV folder (real first): the log-mel of utterance `index`, a line where the prompt ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(wav_dirs), 1, figsize=(7, 1.6 * len(wav_dirs)), sharex=True)
    for ax, d in zip(np.atleast_1d(axes), wav_dirs):
        with open(os.path.join(d, "manifest.json")) as f:
            item = json.load(f)["items"][index]
        x, _ = read_wav(os.path.join(d, item["file"]))
        ax.imshow(log_mel(x).numpy(), origin="lower", aspect="auto", cmap="magma",
                  extent=(0, len(x) / SR, 0, N_MELS))
        ax.axvline(item["prompt_end"] / SR, color="cyan", lw=1.5)
        ax.set_ylabel(os.path.basename(d.rstrip("/")), fontsize=8)
        ax.set_yticks([])
    np.atleast_1d(axes)[0].set_title(f"prompt | generated: \"{item['text']}\"", fontsize=9)
    np.atleast_1d(axes)[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


#################################################################################
#                                 Command line                                  #
#################################################################################

def main(argv=None):
    p = argparse.ArgumentParser(description="Zero-shot TTS by continuation with ResGen, in small.")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("data", help="speak the sentences with espeak-ng voices")
    q.add_argument("--out", required=True)
    q.add_argument("--train", type=int, default=2000, help="training utterances")
    q.add_argument("--test-per-speaker", type=int, default=8, help="utterances per held-out speaker")
    q = sub.add_parser("codec", help="train the mel codec")
    q.add_argument("--data", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--steps", type=int, default=1200)
    q.add_argument("--depth", type=int, default=8)
    q.add_argument("--codebook-size", type=int, default=256)
    q = sub.add_parser("encode", help="the training codes as a code cache with text")
    q.add_argument("--codec", required=True)
    q.add_argument("--data", required=True)
    q.add_argument("--out", required=True)
    sampler = argparse.ArgumentParser(add_help=False)
    sampler.add_argument("--ckpt", required=True)
    sampler.add_argument("--codec", required=True)
    sampler.add_argument("--steps", type=int, default=16, help="T, the sampler's forward passes")
    sampler.add_argument("--cfg", type=float, default=1.0, help="guidance scale on class and text")
    sampler.add_argument("--temperature", type=float, default=0.7)
    q = sub.add_parser("continue", parents=[sampler], help="continue the held-out speakers' utterances")
    q.add_argument("--data", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--limit", type=int, default=None)
    q = sub.add_parser("reference", help="real audio, mel + Griffin-Lim, or codec resynthesis of the test set")
    q.add_argument("--mode", choices=["real", "mel", "codec"], required=True)
    q.add_argument("--data", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--codec", default=None)
    q = sub.add_parser("score", help="WER, CER and SIM of a folder of WAVs")
    q.add_argument("--wavs", required=True)
    q.add_argument("--data", required=True)
    q.add_argument("--json-out", default=None)
    q = sub.add_parser("bench-depth", help="sampling seconds per utterance against D")
    q.add_argument("--ckpt", required=True)
    q.add_argument("--depths", default="4,8,16")
    q.add_argument("--steps", type=int, default=16)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--json-out", default=None)
    q = sub.add_parser("say", parents=[sampler], help="speak text in the voice of a WAV prompt")
    q.add_argument("--prompt-wav", required=True)
    q.add_argument("--prompt-text", required=True, help="the words of the prompt")
    q.add_argument("--text", required=True, help="the words to say after it")
    q.add_argument("--out", required=True)
    q = sub.add_parser("figure", help="log-mel pictures, prompt | generated")
    q.add_argument("--wavs", nargs="+", required=True)
    q.add_argument("--data", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--index", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "data":
        make_data(a.out, a.train, a.test_per_speaker)
    elif a.cmd == "codec":
        train_codec(a.data, a.out, a.steps, depth=a.depth, codebook_size=a.codebook_size)
    elif a.cmd == "encode":
        encode_cache(a.codec, a.data, a.out)
    elif a.cmd == "continue":
        continue_test_set(a.ckpt, a.codec, a.data, a.out, a.steps, a.cfg, a.temperature, a.limit)
    elif a.cmd == "reference":
        if a.mode == "codec" and not a.codec:
            raise UserError("--mode codec needs --codec")
        reference_set(a.mode, a.data, a.out, a.codec)
    elif a.cmd == "score":
        score(a.wavs, a.data, a.json_out)
    elif a.cmd == "bench-depth":
        rows = bench_depth(a.ckpt, [int(d) for d in a.depths.split(",")], a.steps, a.batch_size)
        if a.json_out:
            with open(a.json_out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    elif a.cmd == "say":
        say(a.ckpt, a.codec, a.prompt_wav, a.prompt_text, a.text, a.out, a.steps, a.cfg, a.temperature)
    elif a.cmd == "figure":
        figure(a.wavs, a.data, a.out, a.index)


if __name__ == "__main__":
    run_cli(main)
