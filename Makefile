# The two commands a newcomer needs: `make serve` and `make test`. Both set up the default
# model first (idempotent; the only network access tagllm ever makes).
.PHONY: setup build serve test bench reproduce

# `make setup MODEL=qwen2.5-coder-0.5b` fetches another model of the catalogue.
MODEL ?= smollm2-135m
setup:
	scripts/setup-model.sh $(MODEL)

build: setup
	cargo build --release

serve: build
	./target/release/tagllm serve --model $(MODEL)

# Every test on SQLite, then the job-store tests again on a real local Postgres
# (scripts/start-postgres.sh installs and starts one on 127.0.0.1:55432).
test: setup
	cargo test
	url=$$(scripts/start-postgres.sh) && TAGLLM_TEST_DATABASE_URL=$$url cargo test --test http_jobs --test worker_kill

bench: setup
	cargo bench --bench core
	cargo bench --bench serve
	cargo bench --bench train

# The Tag-LLM reproduction: datasets from pinned packages, every tag trained with
# `tagllm train`, then baselines and the results table (docs/reproduction.md).
reproduce: build
	python3 -m pip install -q -r scripts/repro/requirements.txt
	python3 scripts/repro/prepare_data.py --check
	python3 scripts/repro/train_tags.py
	python3 scripts/repro/evaluate.py
	python3 scripts/repro/qed_sources.py --tags "QED v3 (mixed)=tags"
	python3 scripts/repro/translate_prompts.py --tags tags
	python3 scripts/repro/plot_curves.py QED Descriptor
