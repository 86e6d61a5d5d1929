# Quick start: `make run` then `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INPUT ?=
OUTPUT ?= out-webp
SAMPLES := samples

.PHONY: run test lint typecheck pytest samples clean chromium azurite redis report-demo

$(STAMP): pyproject.toml setup.py src/optimizr/_ssimulacra2.c src/optimizr/_ssimulacra2_kernels.h
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# With no INPUT, convert a small sample set that optimizr's own code draws.
run: $(STAMP)
ifeq ($(strip $(INPUT)),)
	$(BIN)/python -m optimizr.samples $(SAMPLES)
	$(BIN)/optimizr convert $(SAMPLES) $(OUTPUT)
else
	$(BIN)/optimizr convert "$(INPUT)" "$(OUTPUT)"
endif

samples: $(STAMP)
	$(BIN)/python -m optimizr.samples $(SAMPLES)

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench) deploy
	$(BIN)/ruff format --check src tests $(wildcard bench) deploy

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) chromium azurite redis
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) $(SAMPLES) $(OUTPUT) $(REPORT_DEMO) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# The report test (tests/test_report.py) opens the page in headless Chromium: Debian's,
# installed when missing (as root; apt-get update only then; about 12 s here). Without
# root and without chromium, say so and go on: that test then skips, saying why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y --no-install-recommends chromium; \
	  else \
	    echo "chromium is missing and installing it needs root: the browser test will skip"; \
	  fi; }

# The Redis server of tests/test_brokers.py: Debian's redis-tools (installed when missing,
# as root, like chromium). That package holds the server binary (redis-server is the same
# program as redis-check-rdb, chosen by argv[0]; the tests start it under that name) and,
# unlike the redis-server package, no init script that would start a system-wide daemon.
# Without root and without it, say so and go on: the Redis broker tests then skip.
redis:
	@command -v redis-server >/dev/null 2>&1 || command -v redis-check-rdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y --no-install-recommends redis-tools; \
	  else \
	    echo "redis-server is missing and installing it needs root: the Redis broker tests will skip"; \
	  fi; }

# Azurite (npm package azurite), the Azure Blob server of tests/test_storage.py, pinned
# with its lock file in tests/azurite/ and installed by `npm ci` into .venv/azurite, only
# where node and npm are on PATH: elsewhere the Azure tests skip, saying why. The stamp
# keeps a second `make test` from calling npm at all.
AZURITE := $(VENV)/azurite
AZURITE_STAMP := $(AZURITE)/.installed

azurite:
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory $(AZURITE_STAMP); \
	else \
	  echo "node or npm is missing: the Azure storage tests (Azurite) will skip"; \
	fi

# Install scripts are not run: Azurite's blob server needs none of them.
$(AZURITE_STAMP): tests/azurite/package.json tests/azurite/package-lock.json
	rm -rf $(AZURITE)
	mkdir -p $(AZURITE)
	cp tests/azurite/package.json tests/azurite/package-lock.json $(AZURITE)/
	cd $(AZURITE) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

# `optimizr report` on the sample set plus 40 more photos (a run long enough for every
# chart), and a screenshot of the page to look at. --force: a second demo converts again
# rather than report a run where all was up to date.
REPORT_DEMO := report-demo
CHROMIUM_FLAGS := --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
	--disable-background-networking --disable-component-update --disable-sync --hide-scrollbars

report-demo: $(STAMP) chromium
	$(BIN)/python -m optimizr.samples $(REPORT_DEMO)/samples --photos 40 >/dev/null
	$(BIN)/optimizr convert $(REPORT_DEMO)/samples $(REPORT_DEMO)/webp --no-progress --force
	$(BIN)/optimizr report $(REPORT_DEMO)/webp/optimizr-summary.json -o $(REPORT_DEMO)/report.html
	rm -rf $(REPORT_DEMO)/.chromium-profile
	chromium $(CHROMIUM_FLAGS) --user-data-dir=$(REPORT_DEMO)/.chromium-profile \
	  --virtual-time-budget=10000 --window-size=1280,2900 \
	  --screenshot=$(REPORT_DEMO)/report.png file://$(CURDIR)/$(REPORT_DEMO)/report.html \
	  2>$(REPORT_DEMO)/chromium.log || { cat $(REPORT_DEMO)/chromium.log; exit 1; }
	rm -rf $(REPORT_DEMO)/.chromium-profile
	@echo "report: $(REPORT_DEMO)/report.html  screenshot: $(REPORT_DEMO)/report.png"

# Benchmarks (bench/README.md): they print figures and assert nothing. Peers (cwebp,
# sharp) install into bench/.peers when possible and are skipped when not; corpora
# are built once into bench/.data. `make bench` runs compare, scaling, then memory.
BENCH_DATA := bench/.data
BENCH_ROUNDS ?= 3
BENCH_WORKERS ?= 2

.PHONY: bench bench-peers bench-corpus bench-big-corpus bench-compare bench-scaling bench-memory bench-calibrate bench-resume bench-encoder bench-decode

bench: $(STAMP) bench-peers bench-corpus
	$(BIN)/python bench/compare.py $(BENCH_DATA)/corpus --rounds $(BENCH_ROUNDS) --workers $(BENCH_WORKERS)
	$(BIN)/python bench/scaling.py $(BENCH_DATA)/corpus
	$(MAKE) --no-print-directory bench-memory

bench-peers: $(STAMP)
	PYTHON=$(BIN)/python sh bench/install_peers.sh

# A stamp file, not the folder, says the corpus is complete (a build may be interrupted).
bench-corpus: $(STAMP)
	@test -f $(BENCH_DATA)/corpus.done || { \
	  $(BIN)/python bench/make_corpus.py $(BENCH_DATA)/corpus && touch $(BENCH_DATA)/corpus.done; }

# big-2: the big corpus with its rotated JPEGs and PNGs (an older one gets them added).
bench-big-corpus: $(STAMP)
	@test -f $(BENCH_DATA)/big-2.done || { \
	  $(BIN)/python bench/make_corpus.py $(BENCH_DATA)/big --big && touch $(BENCH_DATA)/big-2.done; }

bench-compare: $(STAMP) bench-peers bench-corpus
	$(BIN)/python bench/compare.py $(BENCH_DATA)/corpus --rounds $(BENCH_ROUNDS) --workers $(BENCH_WORKERS)

bench-scaling: $(STAMP) bench-corpus
	$(BIN)/python bench/scaling.py $(BENCH_DATA)/corpus

bench-memory: $(STAMP) bench-big-corpus
	$(BIN)/python bench/memory.py --corpus $(BENCH_DATA)/big --workers $(BENCH_WORKERS)

bench-calibrate: $(STAMP)
	$(BIN)/python bench/calibrate_memory.py

bench-decode: $(STAMP) bench-corpus
	$(BIN)/python bench/decode_speed.py

bench-encoder: $(STAMP) bench-peers bench-corpus
	$(BIN)/python bench/encoder_speed.py $$(ls $(BENCH_DATA)/corpus/*.jpg | awk 'NR % 10 == 1')

# Trees of tiny images and their first conversion are cached in bench/.data/resume.
bench-resume: $(STAMP)
	$(BIN)/python bench/resume.py --rounds $(BENCH_ROUNDS) --workers $(BENCH_WORKERS)

# optimizr watch fed by SeaweedFS webhook posts and NATS/Redis/SQS messages against a batch
# run (issue 16; it starts every server itself). EVENTS_COUNT=2000 for the issue's figure.
EVENTS_COUNT ?= 200
.PHONY: bench-events
bench-events: $(STAMP) redis
	$(BIN)/python bench/events.py --count $(EVENTS_COUNT) --workers $(BENCH_WORKERS)

# The container image (Dockerfile; README "Deployment") built without a Docker engine:
# deploy/image.sh installs buildah, podman, runc and debootstrap with apt when missing,
# debootstraps a Debian base matching this machine (cached in IMAGE_CACHE and in the
# container storage, so a second build reuses it and buildah's layer cache), builds the
# Dockerfile on it, then runs the smoke test. Needs root and minutes: not part of `make test`.
IMAGE ?= localhost/optimizr:latest
IMAGE_BASE ?= localhost/optimizr-base:bookworm
IMAGE_CACHE ?= /var/tmp/optimizr-image
IMAGE_ENV = IMAGE=$(IMAGE) BASE=$(IMAGE_BASE) IMAGE_CACHE=$(IMAGE_CACHE)

.PHONY: image image-build image-smoke image-cluster-smoke

# The smoke test runs in the same recipe, after the build (not a prerequisite, which make -j
# could start first).
image:
	$(IMAGE_ENV) bash deploy/image.sh build
	$(IMAGE_ENV) bash deploy/image.sh smoke

image-build:
	$(IMAGE_ENV) bash deploy/image.sh build

image-smoke:
	$(IMAGE_ENV) bash deploy/image.sh smoke

# docker-compose.yml's cluster from the built image, with podman on the host network
# (127.0.0.1, free ports): weed (the test extra's) on the host, a scheduler and two worker
# containers, the seed, `optimizr convert --cluster` s3:// to s3://, checked from the host
# (deploy/cluster_smoke.py). Root, the image (make image) and about two minutes.
image-cluster-smoke: $(STAMP)
	$(IMAGE_ENV) HOST_PYTHON=$(BIN)/python WEED=$(BIN)/weed bash deploy/image.sh cluster
