# v4forge: `make demo` runs the main job on the embedded data; `make test` runs the test suite.
# Both create .venv on first use. On a CPU-only machine torch is pinned to the 2.13.0 CPU build
# (an unpinned torch pulls a multi-GB CUDA build); override with TORCH_SPEC=... on GPU hosts.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*; touch $@

# The full pipeline on the embedded corpus: pretrain the tiny preset, then fine-tune one expert per
# domain from it and distil them back into one student (on-policy distillation).
demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m train experiment=demo run.dir=runs/demo run.overwrite=true
	OMP_NUM_THREADS=1 $(PY) -m distill distill=demo distill.base=runs/demo run.dir=runs/demo-distill run.overwrite=true

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs outputs
