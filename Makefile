# Herald's front door. `make run` starts a dev cluster; `make test` runs every test.
CARGO ?= cargo
HERALD := ./target/release/herald

.PHONY: all build release run certs test sim fuzz lint fmt doc bench clean

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

## Generate certs/ (cluster CA, node and client certificates) if missing.
certs: release
	@test -f certs/ca/ca.key || $(HERALD) certs --dir certs $$(test -f certs/ca.pem && echo --force)

## Build, make certificates, and run a naming server + 3 topic servers on loopback (Ctrl-C stops).
run: certs
	$(HERALD) dev

## Unit, property and integration tests (integration tests start real herald processes).
test:
	$(CARGO) build --examples
	$(CARGO) test --all-targets

## More simulator seeds than `make test` runs, in release: `make sim SEEDS=100000 FIRST=0`.
SEEDS ?= 20000
FIRST ?= 0
sim:
	HERALD_SIM_SEEDS=$(SEEDS) HERALD_SIM_FIRST=$(FIRST) $(CARGO) test --release --test simulation seeds_run_clean -- --exact --nocapture

## The wire decoders under many more random and mutated frames than `make test` tries
## (proptest, stable toolchain): `make fuzz CASES=1000000`.
CASES ?= 200000
fuzz:
	PROPTEST_CASES=$(CASES) $(CARGO) test --release --lib fuzz_ -- --nocapture

## The standard benchmark set on a fresh release cluster (see docs/performance.md).
bench: release
	$(HERALD) bench disk
	$(HERALD) bench suite --dev
	$(HERALD) bench topics --dev --topics 2000 --replicas 3 --producers 100 --consumers 10 --records 200000
	$(HERALD) bench consume --dev --subscriptions 3 --read-from leader --records 200000
	$(HERALD) bench consume --dev --subscriptions 3 --read-from replica --records 200000
	$(HERALD) bench clients --dev --connections 1000

## Formatting and lints, as CI checks them.
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps

clean:
	$(CARGO) clean
	rm -rf .herald
