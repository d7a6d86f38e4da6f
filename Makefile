# Entry points for people and CI. `make run` serves the example plugins on a local broker;
# `make test` builds everything and runs every test.

CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
PLUGINS := echo calc files receipt api
PLUGIN_OUT := plugins/out

.PHONY: all build plugins example-plugins run test lint bench broker venv clean fuzz

all: build

# Every example handler: the Rust ones `make run` serves, and the polyglot ones (C,
# AssemblyScript, Python, JavaScript, Rust components) the tests run.
plugins: example-plugins polyglot-plugins

# The Rust example handlers, built from source for wasm32-wasip1 and copied to plugins/out/.
# Only a Rust toolchain is needed for these.
example-plugins:
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	$(CARGO) build --release --target $(WASM_TARGET) --manifest-path plugins/Cargo.toml
	@mkdir -p $(PLUGIN_OUT)
	@for p in $(PLUGINS); do \
	  cp plugins/target/$(WASM_TARGET)/release/$$p.wasm $(PLUGIN_OUT)/.$$p.wasm.tmp && \
	  mv $(PLUGIN_OUT)/.$$p.wasm.tmp $(PLUGIN_OUT)/$$p.wasm; done
	@echo "plugins: $(addprefix $(PLUGIN_OUT)/,$(addsuffix .wasm,$(PLUGINS)))"

# The polyglot example plugins (plugins/polyglot.md): one per language, all with the same
# methods and replies, built into plugins/out/<name>.wasm. tests/it/polyglot.rs runs this too.
POLYGLOT := hello-rust hello-c hello-as hello-py hello-js hello-rust-component
WASI_CC ?= clang
WASI_CFLAGS := --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Werror -I guest-sdk/c
C_HINT := needs clang for wasm32-wasi (Debian: apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32)
AS_HINT := needs Node.js and npm (Debian: apt-get install nodejs npm)

.PHONY: polyglot-plugins $(addprefix polyglot-,$(POLYGLOT))
polyglot-plugins: $(addprefix polyglot-,$(POLYGLOT))
	@echo "polyglot plugins: $(addprefix $(PLUGIN_OUT)/,$(addsuffix .wasm,$(POLYGLOT)))"

polyglot-hello-rust:
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	$(CARGO) build --release --target $(WASM_TARGET) --manifest-path plugins/Cargo.toml -p hello-rust
	@mkdir -p $(PLUGIN_OUT)
	@cp plugins/target/$(WASM_TARGET)/release/hello_rust.wasm $(PLUGIN_OUT)/.hello-rust.wasm.tmp && \
	  mv $(PLUGIN_OUT)/.hello-rust.wasm.tmp $(PLUGIN_OUT)/hello-rust.wasm

polyglot-hello-c:
	@command -v $(WASI_CC) >/dev/null || { echo "hello-c $(C_HINT)" >&2; exit 1; }
	@mkdir -p $(PLUGIN_OUT)
	$(WASI_CC) $(WASI_CFLAGS) -o $(PLUGIN_OUT)/.hello-c.wasm.tmp plugins/hello-c/hello.c || \
	  { echo "hello-c $(C_HINT)" >&2; exit 1; }
	@mv $(PLUGIN_OUT)/.hello-c.wasm.tmp $(PLUGIN_OUT)/hello-c.wasm

# npm ci only when node_modules is missing or older than the lock file.
polyglot-hello-as:
	@command -v npm >/dev/null || { echo "hello-as $(AS_HINT)" >&2; exit 1; }
	@cd plugins/hello-as && { [ node_modules/.package-lock.json -nt package-lock.json ] || \
	  npm ci --no-audit --no-fund --loglevel=error; }
	cd plugins/hello-as && npm run --silent build
	@mkdir -p $(PLUGIN_OUT)
	@cp plugins/hello-as/build/hello-as.wasm $(PLUGIN_OUT)/.hello-as.wasm.tmp && \
	  mv $(PLUGIN_OUT)/.hello-as.wasm.tmp $(PLUGIN_OUT)/hello-as.wasm

# Components (guest-sdk/wit): Python (componentize-py, installed into plugins/hello-py/.venv),
# JavaScript (componentize-js, npm) and Rust on wasm32-wasip2. The Python and JavaScript ones
# take tens of seconds, so they are rebuilt only when a source is newer than the output.
WIT := guest-sdk/wit/warren.wit
PY_HINT := needs python3 with venv (Debian: apt-get install python3-venv)

polyglot-hello-py: $(PLUGIN_OUT)/hello-py.wasm
$(PLUGIN_OUT)/hello-py.wasm: plugins/hello-py/app.py plugins/hello-py/build.sh plugins/hello-py/requirements.txt $(WIT)
	@command -v python3 >/dev/null || { echo "hello-py $(PY_HINT)" >&2; exit 1; }
	@mkdir -p $(PLUGIN_OUT)
	plugins/hello-py/build.sh $(CURDIR)/$(PLUGIN_OUT)/.hello-py.wasm.tmp
	@mv $(PLUGIN_OUT)/.hello-py.wasm.tmp $@

polyglot-hello-js: $(PLUGIN_OUT)/hello-js.wasm
$(PLUGIN_OUT)/hello-js.wasm: plugins/hello-js/hello.js plugins/hello-js/build.mjs plugins/hello-js/package-lock.json $(WIT)
	@command -v npm >/dev/null || { echo "hello-js $(AS_HINT)" >&2; exit 1; }
	@cd plugins/hello-js && { [ node_modules/.package-lock.json -nt package-lock.json ] || \
	  npm ci --no-audit --no-fund --loglevel=error; }
	@mkdir -p $(PLUGIN_OUT)
	node plugins/hello-js/build.mjs $(PLUGIN_OUT)/.hello-js.wasm.tmp
	@mv $(PLUGIN_OUT)/.hello-js.wasm.tmp $@

polyglot-hello-rust-component:
	@rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
	$(CARGO) build --release --target wasm32-wasip2 --manifest-path plugins/hello-rust-component/Cargo.toml
	@mkdir -p $(PLUGIN_OUT)
	@cp plugins/hello-rust-component/target/wasm32-wasip2/release/hello_rust_component.wasm \
	  $(PLUGIN_OUT)/.hello-rust-component.wasm.tmp && \
	  mv $(PLUGIN_OUT)/.hello-rust-component.wasm.tmp $(PLUGIN_OUT)/hello-rust-component.wasm

build: example-plugins
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
	cd plugins/hello-rust-component && $(CARGO) fmt -- --check
	$(CARGO) clippy --manifest-path plugins/hello-rust-component/Cargo.toml --target wasm32-wasip2 --features hostile -- -D warnings

# The wire decoder's fuzz target (fuzz/README.md): nightly and cargo-fuzz, 30 s over the
# committed corpus by default; `make fuzz FUZZ_SECONDS=600` runs longer.
fuzz:
	FUZZ_SECONDS=$(or $(FUZZ_SECONDS),30) scripts/fuzz-smoke.sh

bench: example-plugins
	$(CARGO) bench -p warren --bench invoke

# Warren against a native Rust baseline and a real oslo.messaging server on the local broker,
# with the release build (BENCHMARKS.md): several minutes; prints the table, writes the chart.
.PHONY: bench-compare
bench-compare: build broker venv
	./target/release/warren bench --compare --chart docs/bench.svg

clean:
	$(CARGO) clean
	$(CARGO) clean --manifest-path plugins/Cargo.toml
	rm -rf $(PLUGIN_OUT)
