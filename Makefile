# The two commands a newcomer needs: `make serve` and `make test`. Both set up the default
# model first (idempotent; the only network access tagllm ever makes).
.PHONY: setup build serve test bench

setup:
	scripts/setup-model.sh

build: setup
	cargo build --release

serve: build
	./target/release/tagllm serve

test: setup
	cargo test

bench: setup
	cargo bench --bench core
	cargo bench --bench serve
