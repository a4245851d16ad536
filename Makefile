VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.stamp

.PHONY: venv test demo lint clean fuzz

venv: $(STAMP)

# torch is pinned and installed first: 2.14.1 + torchvision 0.29.1 install from local files,
# while an unpinned torch would pull gigabytes of CUDA wheels.
# rebasin/__init__.py is a prerequisite (when present) so the editable install is
# redone once the package exists; before that setuptools records it as a namespace.
$(STAMP): pyproject.toml $(wildcard rebasin/__init__.py)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -m "not slow" tests

demo: venv
	$(PY) examples/demo.py

# Nightly-style fuzzing (not part of `make test`): FUZZ_EXAMPLES random architectures through
# both frontends (tests/test_property.py, hypothesis "fuzz" profile), then FUZZ_CASES mutated
# ONNX files through the loader. Counts go to out/fuzz-summary.txt.
FUZZ_EXAMPLES ?= 2000
FUZZ_CASES    ?= 20000
FUZZ_SEED     ?= 0
FUZZ_JOBS     ?= 2
fuzz: venv
	mkdir -p out
	rm -f out/fuzz-architectures.jsonl
	HYPOTHESIS_PROFILE=fuzz REBASIN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) REBASIN_FUZZ_LOG=out/fuzz-architectures.jsonl \
		$(PY) -m pytest -q -n $(FUZZ_JOBS) tests/test_property.py
	$(PY) -m tests.test_property out/fuzz-architectures.jsonl | tee out/fuzz-summary.txt
	$(PY) -m tests.fuzz_loader --cases $(FUZZ_CASES) --seed $(FUZZ_SEED) 2>/dev/null | tee -a out/fuzz-summary.txt

lint:
	$(VENV)/bin/ruff check rebasin tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache out
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
