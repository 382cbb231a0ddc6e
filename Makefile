# Set-up, tests and the demo. Every target creates .venv and installs what it needs.
#   make test                      install (once), run the test suite, then the portability leg
#   make test-portability          only the portability leg: the tests marked `trajectory` again
#                                  under other CPUs' kernels (MKL SSE4_2 and AVX2, ATen's default)
#   make demo                      install (once) and run the training command with defaults
#   make bench                     side-by-side benchmarks against torch
#   make test TORCH=torch==2.6.0   use another torch (any pip requirement spec)
#
# TORCH defaults to the pinned CPU build that is on disk on the build machines; an
# unpinned `torch` would pull several GB of CUDA wheels there.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
# One stamp per TORCH spec, so overriding TORCH reinstalls and repeating a target does not.
STAMP  := $(VENV)/.installed-$(shell printf '%s' '$(TORCH)' | cksum | cut -d' ' -f1)

# Other CPUs' kernel paths, reproduced on this one: float32 results differ in the last bits from
# one path to the next, so whatever trains or follows a trajectory must pass on each.
PORTABILITY_ENVS ?= MKL_ENABLE_INSTRUCTIONS=SSE4_2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=default

.PHONY: install test test-portability demo bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml Makefile
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-portability

test-portability: install
	@for e in $(PORTABILITY_ENVS); do \
		echo "portability leg: $$e $(PY) -m pytest -q -m trajectory"; \
		env $$e $(PY) -m pytest -q -m trajectory || exit 1; \
	done

demo: install
	$(PY) -m train

bench: install
	$(PY) benchmarks/bench_mlp.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
