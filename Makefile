# kvstream — the two commands a newcomer needs are `make demo` and `make test` (see README.md).
PY ?= .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup setup-dev demo test lint proto bench bench-gpu cluster-demo soak

setup:  ## runtime venv
	deploy/setup.sh

setup-dev:  ## venv with test/lint/bench tools and redis-server
	deploy/setup.sh --dev --redis

demo: setup  ## main job on the embedded default: serve, store a real KV cache, fetch it, compare logits
	$(PY) -m deploy.demo

test: setup-dev  ## the whole test suite (starts its own redis-server processes)
	KVSTREAM_REQUIRE_REDIS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup-dev
	$(PY) -m ruff check .
	$(PY) -m mypy codec kvstore client kernels

proto:  ## regenerate kvstore/rpc from proto/
	$(PY) -m grpc_tools.protoc --proto_path=kvstore/rpc=proto/kvstream/v1 --python_out=. --grpc_python_out=. \
		--mypy_out=. proto/kvstream/v1/kvstream.proto

bench: setup-dev  ## CPU benchmarks, JSON into reports/bench/
	mkdir -p reports/bench
	$(PY) -m benchmarks.run --out reports/bench $(BENCH_ARGS)

bench-gpu: setup-dev  ## GPU kernel benchmarks (needs CUDA)
	mkdir -p reports/bench
	$(PY) -m benchmarks.kernels_bench_gpu --json reports/bench/kernels_gpu.json

cluster-demo: setup-dev  ## 3+3 Redis Cluster + 3 front ends on loopback, smoke workload, clean shutdown
	$(PY) -m deploy.cluster_demo --front-ends 3

soak: setup-dev  ## bounded 5-minute load soak over a local Redis Cluster (JSON into reports/bench/)
	mkdir -p reports/bench
	$(PY) -m benchmarks.soak --seconds 300 --json reports/bench/soak.json
