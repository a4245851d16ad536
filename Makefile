VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.stamp

.PHONY: venv test demo lint clean

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

lint:
	$(VENV)/bin/ruff check rebasin tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache out
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
