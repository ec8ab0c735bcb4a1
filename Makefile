# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv and installs what it needs (torch pinned to the 2.13.0 CPU wheel first).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench bench-long bench-fmnist bench-fmnist-cosine report install clean

$(STAMP): requirements.txt setup.py
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The main job: stage 1 (meta-train a rater) + stage 2 (hard selection vs uniform) + report, on the
# built-in digits data (bundled with scikit-learn). About 6 minutes: 5m47s measured on 2 CPU cores, one busy
# with another job. Live progress per stage on the terminal, full log in demo_output/job.log; run it again to
# resume. Budgets and threads: $(PY) examples/run_pipeline.py --help
demo: $(STAMP)
	$(PY) examples/run_pipeline.py --output_dir demo_output

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# One piece (< 2.5 h on 2 cores, two runs at once with one thread each, stops cleanly) of the many-seed
# digits comparison; run again to continue.
bench: $(STAMP)
	$(PY) benchmarks/run_benchmark.py --protocol digits8 --jobs 2 --max_hours 2.3
	$(PY) benchmarks/report.py

# The same for digits8_long (4x the steps, cosine decay).
bench-long: $(STAMP)
	$(PY) benchmarks/run_benchmark.py --protocol digits8_long --jobs 2 --max_hours 2.3
	$(PY) benchmarks/report.py

# The same on Fashion-MNIST 16x16 (with FD): fmnist16, and fmnist16_cosine (cosine learning-rate decay, so that
# FD is taken at a decayed final iterate).
bench-fmnist: FMNIST_PROTOCOL := fmnist16
bench-fmnist-cosine: FMNIST_PROTOCOL := fmnist16_cosine
bench-fmnist bench-fmnist-cosine: $(STAMP)
	@test -d /usr/share/datasets/fashion-mnist || apt-get install -y dataset-fashion-mnist
	$(PY) benchmarks/run_benchmark.py --protocol $(FMNIST_PROTOCOL) --jobs 2 --max_hours 2.3
	$(PY) benchmarks/report.py

report: $(STAMP)
	$(PY) benchmarks/report.py

clean:
	rm -rf demo_output
