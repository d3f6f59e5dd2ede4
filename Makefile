# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv, install the package with its pinned dependencies, and install the Debian package
# dataset-fashion-mnist (the demo's data and some tests') when it is missing; `make test` also installs the
# Debian package chromium, the headless browser tests/report/test_report_browser.py opens the report pages in.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rcat-ray-installed
FASHION := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Local Ray binds to loopback only with this set before Ray is imported.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install test demo lint bench clean fashion-mnist chromium screenshots

install: $(STAMP) fashion-mnist

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

fashion-mnist:
	@test -f $(FASHION) || { echo "installing dataset-fashion-mnist (Debian)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

chromium:
	@test -x $(CHROMIUM) || { echo "installing chromium (Debian)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

# the linter and the formatter first (seconds): CI runs `make test`, so both hold on every submission
test: install chromium lint
	$(BIN)/python -m pytest

# the pages of docs/report-*.png, as tests/report/test_report_browser.py renders them
screenshots: install chromium
	RCAT_RAY_SCREENSHOTS=docs $(BIN)/python -m pytest tests/report/test_report_browser.py -q

lint: install
	$(BIN)/ruff check rcat_ray jobs tests bench
	$(BIN)/ruff format --check rcat_ray jobs tests bench

demo: install
	$(BIN)/rcat-ray demo --out demo-out

bench: install
	$(BIN)/python bench/eval_overhead.py

clean:
	rm -rf demo-out .pytest_cache
