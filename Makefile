# imgsearch: everything a fresh clone needs, offline except for the package registries.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
WEIGHTS ?= auto
DATA    ?= demo
ARCH    ?=
PORT    ?= 8000
# PYTEST_ARGS goes to both runs below: paths, -k, -x; a marker expression goes in TEST_MARK
# (e.g. TEST_MARK="not browser"), as a second -m would replace the first
PYTEST_ARGS ?=
TEST_MARK ?=
# test files run on this many workers (pytest-xdist; each file stays on one worker, so its
# module fixtures are built once); TEST_WORKERS=0 runs them in this process, one after another.
# Files marked `alone` (bounds in wall-clock time) run afterwards, one at a time: a test file
# beside them would be measured too. (pytest exits 5 when the selection has none of them.)
TEST_WORKERS ?= 2
MARK_AND = $(if $(strip $(TEST_MARK)),($(TEST_MARK)) and ,)

.PHONY: setup lint test demo demo-data export index serve loadtest bench clean help
help:
	@echo "make setup     create $(VENV) and install everything, as locked in uv.lock (idempotent)"
	@echo "make lock      re-resolve uv.lock after a change to the dependencies; export requirements/*.txt"
	@echo "make test      setup + lint + the whole test suite (real Triton, Milvus Lite, uvicorn, chromium)"
	@echo "make lint      ruff (pyflakes, import order: ruff.toml)"
	@echo "make demo      setup, export, build demo images, index, serve on :$(PORT)"
	@echo "               WEIGHTS=auto|packaged|imagenet|random|/path/ckpt.pth  DATA=demo|stanford-dogs|/path/folder"
	@echo "make loadtest  30 s Locust smoke against the stack 'make demo' started"
	@echo "make gpu-prepare | gpu-dry | gpu-sim   the GPU device check: carry, CPU dry run, rehearsal (docs/gpu.md)"

# The locked install: uv.lock, exported for pip as requirements/dev.txt (hashes). uv when it
# is on PATH (markedly faster: README, "Set-up"), else pip; `make setup UV=` forces pip.
UV      ?= $(shell command -v uv 2>/dev/null)
setup: $(STAMP)
$(STAMP): pyproject.toml uv.lock requirements/dev.txt
ifneq ($(strip $(UV)),)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --locked --extra dev --python $(PY)
else
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install --require-hashes -r requirements/dev.txt
	$(BIN)/python -m pip install --no-deps -e .
endif
	@touch $(STAMP)

# After editing the dependencies in pyproject.toml: re-resolve uv.lock (keeping every pin
# it can) and export it for pip. LOCK_ARGS="--upgrade" moves everything to the newest.
# uv: from PATH, else the one the [dev] extra installs in $(VENV).
LOCK_ARGS ?=
UV_LOCK  = $(or $(strip $(UV)),$(BIN)/uv)
EXPORT   = $(UV_LOCK) export --frozen --no-emit-project
.PHONY: lock
lock:
	@test -x "$(UV_LOCK)" || { echo "make lock needs uv: pip install uv" >&2; exit 2; }
	$(UV_LOCK) lock $(LOCK_ARGS)
	$(EXPORT) --extra dev -o requirements/dev.txt
	$(EXPORT) --extra gateway -o requirements/gateway.txt

lint: setup
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "$(MARK_AND)not alone" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m "$(MARK_AND)alone" $(PYTEST_ARGS) || [ $$? -eq 5 ]

clean:
	rm -rf data/ model_repository/*/1 model_repository/*/model_card.json model_repository/*/labels.txt .pytest_cache

# 30 s Locust smoke against the stack `make demo` started; report in loadtest/out/report.html.
# More: make loadtest LOADTEST_ARGS="--shape step --users 16 --step-users 2 --slo-p99-ms 2000"
LOADTEST_ARGS ?=
loadtest: setup
	$(BIN)/imgsearch loadtest --host http://127.0.0.1:$(PORT) --images data/images --run-time 30s \
		--out loadtest/out $(LOADTEST_ARGS)

# --- demo / serve (gateway) --------------------------------------------------------------
# make demo                               pretrained weights (auto: torchvision's ImageNet ResNet-152
#                                         when cached or downloadable, else the packaged ImageNet
#                                         EfficientNet-Lite0) + scikit-image demo photos, offline
# make demo WEIGHTS=imagenet DATA=stanford-dogs   the real thing (needs internet)
# make demo WEIGHTS=/path/resnet152.pth   the original project's Kaggle checkpoint
# make demo WEIGHTS=random ARCH=resnet152 untrained: shows the plumbing, not search quality
# make demo DATA=/path/folder             your own label folders
# The demo's model lives in data/model_repository/encoder (git-ignored); model_repository/ holds
# the production ResNet-152's checked-in configs and is left alone.
IMAGE_DIR = $(if $(filter demo,$(DATA)),data/images,$(if $(filter stanford-dogs,$(DATA)),data/stanford-dogs/Images,$(DATA)))
EXPORT_ARCH = $(if $(ARCH),--arch $(ARCH),)
demo serve: export IMGSEARCH_MODEL_REPOSITORY ?= data/model_repository
demo serve: export IMGSEARCH_MODEL_NAME ?= encoder

demo: setup
	@set -e; recreate=""; \
	if $(BIN)/python -m imgsearch.gateway.demo card-matches "$(WEIGHTS)" "$(ARCH)"; then :; else \
	  $(BIN)/imgsearch export --weights "$(WEIGHTS)" $(EXPORT_ARCH); recreate="--recreate"; fi; \
	case "$(DATA)" in \
	  demo) $(BIN)/imgsearch demo-data data/images ;; \
	  stanford-dogs) $(BIN)/imgsearch fetch stanford-dogs ;; \
	  *) test -d "$(DATA)" || { echo "DATA=$(DATA): not demo, stanford-dogs or a folder" >&2; exit 2; } ;; \
	esac; \
	$(BIN)/imgsearch index "$(IMAGE_DIR)" $$recreate
	@$(MAKE) --no-print-directory serve

serve: setup
	@echo ""
	@echo "  page:    http://127.0.0.1:$(PORT)/        API docs: http://127.0.0.1:$(PORT)/docs"
	@echo "  search:  curl -F file=@$$($(BIN)/python -m imgsearch.gateway.demo example-image "$(IMAGE_DIR)") 'http://127.0.0.1:$(PORT)/v1/search?top_k=5'"
	@echo ""
	IMGSEARCH_IMAGE_ROOT="$(IMAGE_DIR)" $(BIN)/imgsearch serve --port $(PORT)

# --- indexer benchmark: indexer end to end vs raw Triton on the same images -------------
# Uses the exported model in model_repository (make demo exports one) and a local Triton.
# make bench-index BENCH_INDEX_ARGS="--generate 1000 --batch-size 32 --in-flight 2 --rounds 3"
BENCH_INDEX_ARGS ?= --generate 640
bench-index: setup
	$(BIN)/python -m bench.index $(BENCH_INDEX_ARGS) --out loadtest/out/bench_index.json

# --- reliability figures: flood at 10x capacity, Triton queue, Triton/Milvus faults, SIGTERM drain ---
# Builds its own stack on loopback ports (resnet18 random weights); docs/reliability.md quotes it.
# make reliability RELIABILITY_ARGS="--scenarios triton_kill --outage-s 45"
RELIABILITY_ARGS ?=
.PHONY: reliability
reliability: setup
	$(BIN)/python -m bench.flood --out loadtest/out/flood.json $(RELIABILITY_ARGS)

# --- the GPU device check: see docs/gpu.md ----------------------------------------------
# gpu-prepare  build .carry/ for the device call: run(command="bash bench/gpu_check.sh", carry=[".carry"])
# gpu-dry      the check end to end on this CPU (resnet18, short; figures meaningless)
# gpu-sim      the check down its device path (carry, stub env) in a stand-in of the GPU image
.PHONY: gpu-prepare gpu-dry gpu-sim
gpu-prepare: setup
	bash bench/gpu_prepare.sh
gpu-dry: setup
	GPU_CHECK_DRY=1 OUT=loadtest/out/gpu-dry bash bench/gpu_check.sh
gpu-sim: setup
	bash bench/gpu_sim.sh
