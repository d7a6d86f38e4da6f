//! Warren: RPC over RabbitMQ in the nova.rpc / oslo.messaging wire format, served by
//! WebAssembly handlers.
//!
//! Layout (see ARCHITECTURE.md for the full code map and the invariants):
//! - [`runtime`]: wasmtime engine, module loading, guest ABI v1, one sandbox per invocation.

mod admin;
pub mod amqp;
pub mod client;
pub mod config;
pub mod dispatch;
pub mod log;
pub mod metrics;
pub mod outbound;
pub mod registry;
pub mod runtime;
pub mod server;
pub mod watch;
pub mod wire;
