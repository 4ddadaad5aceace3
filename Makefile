# make run: install if needed, then the default experiment (ALF and the linear baseline)
# make test: install if needed, then the whole test suite; it prints its 15 slowest tests
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint ui bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 not found: set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so that nothing pulls a CUDA build on a CPU machine
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# both probes selected on validation over the same small lr grid (a fair comparison)
run: install
	$(BIN)/python -m alfusion probe=alf search=quick
	$(BIN)/python -m alfusion probe=linear search=quick

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15

lint: install
	$(BIN)/ruff check .

# make ui [PORT=5000]: the MLflow UI over outputs/mlflow.db (runs, metrics, heatmaps, plots);
# without MLflow's GenAI job runner (seven worker processes that browsing runs does not need).
# It prints the address of the experiment's runs table, sorted by test balanced accuracy.
# A missing store (no run yet) or a file that is no MLflow store is refused in one line.
PORT ?= 5000
EXPERIMENT ?= alfusion
ui: install
	@$(BIN)/python -c "from alfusion.report import check_store; \
	check_store('sqlite:///outputs/mlflow.db', 'make ui')"
	@$(BIN)/python -c "from alfusion.tracking import runs_view_url; \
	print('alfusion runs:', runs_view_url('sqlite:///outputs/mlflow.db', \
	'http://127.0.0.1:$(PORT)', '$(EXPERIMENT)'))"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
	$(BIN)/mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db --host 127.0.0.1 --port $(PORT)

bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf outputs multirun
