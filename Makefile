# Two entry points, both from a fresh machine:
#   make quickstart   build a real condensed Fashion-MNIST set on the CPU (minutes)
#   make test         run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup test quickstart fashion-mnist clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed fashion-mnist

# The Debian package carries Fashion-MNIST; install it when apt is usable.
fashion-mnist:
	@if [ -f $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "note: apt is not usable here; Fashion-MNIST tests will look under ./data or skip"; fi

test: setup
	$(PY) -m pytest -q

quickstart: setup
	$(VENV)/bin/condensed-build recipes/quickstart.yaml --out data --overwrite

clean:
	rm -rf $(VENV) build *.egg-info
