# Two commands for a newcomer: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: setup demo test test-slow bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned (==2.13.0, the CPU wheel); constraints.txt pins everything we test with
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

setup: $(VENV)/.installed
	@bash scripts/setup_system.sh data

demo: setup
	$(VENV)/bin/genbench compare --dataset digits --preset quick --out $(OUT)

test: setup
	@bash scripts/setup_system.sh chromium
	$(PY) -m pytest -n 2 -q

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
