# Two entry points: `make repro` (set up, then run the whole DVC pipeline on params.yaml)
# and `make test` (set up, then run the test suite). Both create .venv on first use.
# `make report` rewrites the class default's results block (in docs/class-default.md) from
# data/eval/metrics.json after a run (`make repro` does it too, with the variants block and README's
# defaults table). stages.report finds each block in the one markdown file (README.md, docs/) holding it.
# `make repro-text` runs the text-to-image defaults' pipeline (pipelines/text/dvc.yaml) and their tables.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
# progress bars redraw at most once a second (tqdm reads TQDM_* defaults from the environment)
export TQDM_MININTERVAL := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup repro repro-text bases test report clean-venv

setup: $(STAMP)

# pip prints a warning per package for index folders this machine's global pip config names but
# lacks; they are noise, so they are filtered out (pipefail keeps pip's exit status).
# constraints.txt pins every package to the versions dvc.lock was made with (bit-for-bit outputs).
$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --progress-bar off -c constraints.txt -e '.[all,dev]' 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	touch $(STAMP)

# then the results, variants and defaults blocks from what the run wrote, so the tracked results stay
# consistent with each other (a run on another CPU type changes timings and some bits, and the tests
# check that the blocks render the tracked metrics)
repro: $(STAMP)
	dvc repro
	python -m stages.report
	python -m stages.report --variants class
	python -m stages.report --defaults

# the embedded text-to-image defaults (SD, SDXL, SD3): their own DVC pipeline, then their tables
# (docs/text-defaults.md, docs/class-default.md's SD3 variants, README's defaults table)
repro-text: $(STAMP)
	dvc repro pipelines/text/dvc.yaml
	for family in sd sdxl sd3; do \
		python -m stages.report --metrics data/text/$$family/eval/metrics.json --block text-$$family || exit 1; \
	done
	python -m stages.report --variants sd3
	python -m stages.report --defaults

# the shipped base checkpoints (pretrained/) rebuilt from their recipes (pipelines/bases/dvc.yaml): the
# class DiT, the text defaults' shared data and the SD, SDXL and SD3 bases; `make repro` and
# `make repro-text` never run this, they start from pretrained/ as from a downloaded base
BASES := data/base:toy-dit data/text/shared:text-shared data/text/sd/base:text-sd data/text/sdxl/base:text-sdxl data/text/sd3/base:text-sd3
bases: $(STAMP)
	dvc repro pipelines/bases/dvc.yaml
	for pair in $(BASES); do \
		src=$${pair%%:*}; dst=pretrained/$${pair##*:}; \
		rm -rf $$dst.new && cp -rL $$src $$dst.new && find $$dst.new -name '*agd.lock' -delete && \
		rm -rf $$dst && mv $$dst.new $$dst || exit 1; \
	done

test: $(STAMP)
	python -m pytest -q

report: $(STAMP)
	python -m stages.report

clean-venv:
	rm -rf $(VENV)
