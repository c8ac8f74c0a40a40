# Two entry points (see README): `make demo` runs the main job (the pipeline), `make test` runs the tests.
# Both create .venv on first use. torch is installed first so that deepspeed builds against it.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	# No CUDA ops at install; the CPU shared-memory comm op is built now instead of at first start.
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.19,<0.20"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The whole pipeline on the CPU with Prefect's temporary local server (no PREFECT_API_URL).
# A second run reuses finished work and only re-reports.
# DEMO=retrain remakes the committed teacher first, by its own recipe (hours on a CPU).
DEMO ?=
DEMO_SPEC := configs/demo/pipeline$(if $(DEMO),-$(DEMO)).yaml
demo: $(VENV)/.installed
	env -u PREFECT_API_URL PREFECT_SERVER_ANALYTICS_ENABLED=false $(PY) -m flows.pipeline $(DEMO_SPEC)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The edit loop: no Docker build, no Prefect server, no multi-rank launch, no long training run (about 3 minutes).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not docker and not prefect_server and not multirank and not slow and not browser"

clean:
	rm -rf $(VENV) runs
