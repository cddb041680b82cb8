# Every target does its own set-up: the venv is made (and reinstalled when pyproject.toml changes) on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export MLFLOW_ENABLE_TELEMETRY := false

.PHONY: demo demo-locon demo-flux test lint ui mlflow-ui clean install docs fuzz cluster-demo browser screenshots

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --quiet --no-compile -e '.[dev,cluster]'
	@# pip compiles the installed modules on one core; compileall uses every core (about 40 s less here). torch's
	@# py312_intrinsics.py is Python 3.12 syntax, which pip's compile step skips too.
	$(BIN)/python -m compileall -q -j 0 -x py312_intrinsics "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
	touch $(STAMP)

install: $(STAMP)

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/lora-pipeline demo

# LoCon with samples while training (data/recipes/demo-tiny-locon.yaml) on the demo's dataset version.
demo-locon: demo
	$(BIN)/lora-pipeline train hardware-design-aesthetic-v2 --recipe demo-tiny-locon

# FLUX.1 on the generated tiny FLUX.1 [dev]-shaped model (data/recipes/demo-tiny-flux.yaml): trained on the
# rectified-flow objective, then its epoch x weight grid through FluxPipeline and its validation loss.
demo-flux: demo
	$(BIN)/lora-pipeline train hardware-design-aesthetic-v2 --recipe demo-tiny-flux
	$(BIN)/lora-pipeline evaluate hardware-design-aesthetic-v2 --recipe demo-tiny-flux

# The cluster profile on this machine (README, "Running on several machines"): Dagster webserver and daemon on
# Postgres, one Celery worker per queue, MLflow on Postgres; the demo chain through them. HOLD=1 keeps them up
# until Enter. Needs the local Postgres, RabbitMQ and Redis.
cluster-demo: $(STAMP)
	$(BIN)/python scripts/cluster.py demo $(if $(HOLD),--hold)

# The browser test drives Debian's Chromium through Playwright (lora_pipeline_tests/test_ui_browser.py).
CHROMIUM := /usr/bin/chromium
browser: $(CHROMIUM)
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's chromium for the browser test (apt-get)"; \
	  (apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null)) && \
	  test -x $(CHROMIUM); \
	else \
	  echo "error: the browser test needs $(CHROMIUM): install Debian's package as root (apt-get install chromium)" >&2; \
	  exit 1; \
	fi

# Three workers on two cores: a third of the tests' time is waiting (CLI and Dagster subprocesses, sensors,
# the browser, the cluster's services), which a third worker fills (885 tests in 8.7 min of pytest here; a fourth
# worker only added CPU).
test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check lora_pipeline lora_pipeline_tests benchmarks scripts
	$(BIN)/python -m pytest -n 3 --dist loadgroup -q

# The README's UI walkthrough: the browser test's screenshots, written to docs/ui/ (its data root is then
# ~/lora-pipeline-ui-demo, removed afterwards, so the pictures show a path like a user's).
screenshots: $(STAMP) $(CHROMIUM)
	UI_SCREENSHOTS=$(CURDIR)/docs/ui $(BIN)/python -m pytest -q -p no:cacheprovider lora_pipeline_tests/test_ui_browser.py

docs: $(STAMP)
	$(BIN)/python scripts/fielddocs.py docs/fields.md
	$(BIN)/python scripts/settingsdocs.py README.md

# The fuzz tests (configs, masks, the exec wrapper's arguments) for FUZZ_SECONDS (default 600) in all instead of
# make test's few hundred examples each.
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q -p no:xdist -p no:cacheprovider -s \
	  lora_pipeline_tests/test_schema.py lora_pipeline_tests/test_fuzz_inputs.py -k fuzz

lint: $(STAMP)
	$(BIN)/ruff check lora_pipeline lora_pipeline_tests benchmarks scripts

# Run from $(DAGSTER_HOME), where the instance's dagster.yaml is (dg dev warns about one in any other folder).
ui: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	cd $(DAGSTER_HOME) && $(CURDIR)/$(BIN)/dg dev -h 127.0.0.1 -p 3000 -w $(CURDIR)/workspace.yaml

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 \
	  --backend-store-uri sqlite:///$(CURDIR)/data/mlflow/mlflow.db \
	  --default-artifact-root $(CURDIR)/data/mlflow/artifacts

# Also the specs the auto-rebuild sensor wrote (specs/ files git does not track); never data/sources.
clean:
	rm -rf data/datasets data/loras data/evals data/mlflow data/models data/.cache data/.tmp data/registered $(DAGSTER_HOME) .cluster_demo
	git ls-files --others --exclude-standard -z -- data/specs | xargs -0 -r grep -lZE '^intent: .?auto-rebuild of ' -- | \
	  xargs -0 -r rm -f --
