//! Warren's integration tests: one binary (faster to link than one per file).
//! The daemon tests talk to the real RabbitMQ (WARREN_TEST_BROKER_URL, default the local one).

mod acks;
mod cli;
mod components;
mod daemon;
mod faults;
mod interop;
mod metrics;
mod outbound;
mod polyglot;
mod prepared;
mod reload;
mod runtime;
mod security;
mod support;
