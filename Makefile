# Two commands do everything on a fresh machine (see README.md):
#   make report   data, training, executed notebooks, figures/ and report.pdf
#   make test     the test suite
# Both create .venv from requirements.txt when it is missing.
PYTHON := .venv/bin/python

.PHONY: setup test report bench zip clean

setup:
	@tools/setup.sh

test: setup
	$(PYTHON) -m pytest

# QUICK=1: the same pipeline on a small subset with one epoch (a few minutes);
# OUT=dir: write notebooks, figures and the PDF there instead of the repository;
# LANES=1: one notebook at a time (default on 2+ cores: two side by side).
report:
	@tools/setup.sh --latex
	$(PYTHON) tools/build_report.py $(if $(QUICK),--quick) $(if $(OUT),--out $(OUT)) $(if $(LANES),--lanes $(LANES))

bench: setup
	$(PYTHON) benchmarks/bench.py $(if $(QUICK),--quick)
	$(PYTHON) benchmarks/bench_rnn.py $(if $(QUICK),--quick)

zip: setup
	$(PYTHON) tools/make_zip.py

clean:
	rm -rf build .pytest_cache runs/quick
