# Entry points for people and CI. `make run` serves the example plugins on a local broker;
# `make test` builds everything and runs every test.

CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
PLUGINS := echo calc files
PLUGIN_OUT := plugins/out

.PHONY: all build plugins run test lint bench broker venv clean

all: build

# Example handlers, built from source for wasm32-wasip1 and copied to plugins/out/.
plugins:
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	$(CARGO) build --release --target $(WASM_TARGET) --manifest-path plugins/Cargo.toml
	@mkdir -p $(PLUGIN_OUT)
	@for p in $(PLUGINS); do \
	  cp plugins/target/$(WASM_TARGET)/release/$$p.wasm $(PLUGIN_OUT)/.$$p.wasm.tmp && \
	  mv $(PLUGIN_OUT)/.$$p.wasm.tmp $(PLUGIN_OUT)/$$p.wasm; done
	@echo "plugins: $(addprefix $(PLUGIN_OUT)/,$(addsuffix .wasm,$(PLUGINS)))"

build: plugins
	$(CARGO) build --release -p warren

broker:
	@scripts/ensure-rabbitmq.sh

venv:
	@scripts/python-venv.sh

# The daemon with the example plugins on the local broker. Try, in another shell:
#   ./target/release/warren call echo echo '{"value": 42}'
run: build broker
	./target/release/warren serve --config config/warren.toml

# Every test: unit, runtime, CLI, daemon against the real RabbitMQ, and oslo.messaging interop.
test: plugins broker venv
	$(CARGO) test --workspace

lint:
	$(CARGO) fmt --all -- --check
	cd plugins && $(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --manifest-path plugins/Cargo.toml --target $(WASM_TARGET) -- -D warnings

bench: plugins
	$(CARGO) bench -p warren --bench invoke

clean:
	$(CARGO) clean
	$(CARGO) clean --manifest-path plugins/Cargo.toml
	rm -rf $(PLUGIN_OUT)
