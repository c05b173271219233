# Two commands for a newcomer: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: setup demo test clean

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
	# --dist loadfile: a module fixture (a trained tiny run) is built once, not once per worker
	$(PY) -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) runs .pytest_cache
