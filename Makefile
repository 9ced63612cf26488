# The two commands a newcomer needs: `make serve` and `make test`. Both set up the default
# model first (idempotent; the only network access tagllm ever makes).
.PHONY: setup build test bench

setup:
	scripts/setup-model.sh

build: setup
	cargo build --release

test: setup
	cargo test

bench: setup
	cargo bench --bench core
