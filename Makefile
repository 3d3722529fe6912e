# Two commands for a newcomer on a fresh machine (Python >= 3.10, a C++ compiler, CMake):
#   make demo    set everything up (once) and speak a sentence with the default model (demo.wav)
#   make test    set everything up (once) and run the tests
# The environment is .venv (created when missing, refreshed when the build files change).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chattts-ort-installed

.PHONY: env demo test fuzz sanitize bench clean-env

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU torch wheel (export and the PyTorch reference only); other versions download gigabytes.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,export,bench,serve,ray,numbers]"
	# Optional: ChatTTS 0.2.5 and vocos 0.1.0 themselves, the references of the parity tests (its GPT.generate,
	# its Decoder, vocos's vocoder), without their dependencies: torchaudio has no build for this torch. The
	# tests skip with the reason if they are absent.
	$(BIN)/python -m pip install -q requests && $(BIN)/python -m pip install -q --no-deps chattts==0.2.5 vocos==0.1.0 \
	  || echo "chattts 0.2.5 / vocos 0.1.0 not installed: the parity tests against them will skip"
	$(BIN)/python -c "import chattts_ort, chattts_ort._core; print('chattts_ort', chattts_ort.__version__)"
	touch $@

env: $(STAMP)

demo: env
	$(BIN)/chattts-ort say -o demo.wav

test: env
	$(BIN)/python -m pytest -q -ra tests

fuzz: env  # the property-based fuzz suite alone, with more examples and the counts report
	CHATTTS_ORT_FUZZ_EXAMPLES=500 CHATTTS_ORT_FUZZ_REPORT=fuzz-report.json $(BIN)/python -m pytest -q tests/test_fuzz.py

sanitize: env  # the core built with ASan + UBSan, on a short workload
	bash tools/sanitize.sh $(BIN)/python

bench: env
	$(BIN)/python bench/run.py

clean-env:
	rm -rf $(VENV)
