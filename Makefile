# `make run` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCE ?= tests/data
ENGINE ?=
OUT ?= out
# e.g. QUICKSTART_ARGS='--weights random:0 --width-div 8 --area 256': the narrow smoke network
QUICKSTART_ARGS ?=
# `make bench`: the default benchmark (under five minutes on a laptop CPU); a full VGG-16 engine
# with random weights is exported first if BENCH_ENGINE holds none. More flags: BENCH_ARGS.
BENCH_ENGINE ?= engines/vgg16-last-p2-random0
BENCH_ARGS ?=

.PHONY: help install run test test-fast lint format typecheck clean gpu-check gpu-check-engine bench

help:
	@echo "make run [SOURCE=dir]  install, export the default engine for SOURCE's buckets, extract"
	@echo "make test              install, lint, type-check and run the whole test suite"
	@echo "make test-fast         the suite without the slow tests"
	@echo "make bench [BENCH_ARGS=...]  backends vs autograd peers and floors (interactive bench)"
	@echo "make gpu-check [WHEELS=dir] [GPU_CHECK_ARGS=...]  on a GPU host, 6 min: torch CUDA"
	@echo "                       conformance, TensorRT plumbing, benchmark; one results file"
	@echo "make gpu-check-engine  the check's engine without weights.bin, to carry (out/)"
	@echo "make lint | format | typecheck | clean"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: the CPU build on disk; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[export,test,bench,viz,ray,heic,eval,remote,knn]'
	# tensorrt-stubs declares a dependency on tensorrt itself, which PyPI cannot serve here.
	$(BIN)/pip install --quiet --no-deps tensorrt-stubs
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python -m interactive_features.export.quickstart $(SOURCE) --out $(OUT) $(if $(ENGINE),--engine $(ENGINE)) \
		$(QUICKSTART_ARGS)

bench: install
	test -f $(BENCH_ENGINE)/manifest.json || $(BIN)/interactive export --weights random:0 \
		--buckets 512x512 --out $(BENCH_ENGINE)
	$(BIN)/interactive bench --engine $(BENCH_ENGINE) $(BENCH_ARGS)

test: install lint typecheck
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# tensorrt-stubs 10.13 ships no py.typed (mypy would treat tensorrt as untyped) and its .pyi has
# syntax errors (parameters named `in`, a default before a non-default); mypy reads a fixed copy.
TRT_STUBS := $(VENV)/trt-stubs
$(TRT_STUBS)/.fixed: $(VENV)/.installed
	rm -rf $(TRT_STUBS) && mkdir -p $(TRT_STUBS)
	cp -r $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/tensorrt \
		$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/tensorrt_bindings \
		$(TRT_STUBS)/
	sed -i -E 's/([(,] *)in: /\1in_: /g; s/channel_axis: int\)/channel_axis: int = ...)/' \
		$(TRT_STUBS)/tensorrt_bindings/tensorrt.pyi
	touch $@

typecheck: install $(TRT_STUBS)/.fixed
	$(BIN)/mypy runtime engines export/torch_backend.py

# No venv and no install: the GPU host's own python3 (with torch) runs the check from this tree,
# within 6 minutes. GPU_CHECK_ARGS: e.g. --require torch-cuda,cuda-plumbing,benchmark-cuda;
# --dry-run runs the same steps on a CPU.
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) bench/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS)) $(GPU_CHECK_ARGS)

# On any machine with the venv: the full-width gpu-check engine without weights.bin (a few
# hundred KiB: manifest and graph) in out/gpu-check-engine, to carry to the GPU host, where
# the check rebuilds weights.bin from random:0 and verifies its sha256.
gpu-check-engine: install
	test -f out/gpu-check-full/manifest.json || $(BIN)/interactive export --weights random:0 \
		--buckets 512x512 --no-validate --out out/gpu-check-full
	$(BIN)/python -c "from pathlib import Path; from interactive_features.bench.gpu_engine import strip; \
		strip(Path('out/gpu-check-full'), Path('out/gpu-check-engine'))"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache $(OUT)
