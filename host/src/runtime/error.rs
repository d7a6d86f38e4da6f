//! The errors an invocation or a load can end with.
//!
//! Invocation failures are data, not exceptions: every one carries a `class` that travels to
//! callers as the remote exception's class, so the class names are part of the public contract
//! (`guest-sdk/ABI.md`, "Error classes raised by the host").

use serde::Serialize;
use serde_json::Value;

/// Error classes the host itself raises. Guests may raise any class of their own.
pub mod class {
    /// The method is not a callable export of the module.
    pub const NO_SUCH_METHOD: &str = "NoSuchMethod";
    /// The args are not a JSON object (or do not fit the guest's schema).
    pub const INVALID_ARGS: &str = "InvalidArgs";
    /// The invocation ran past its wall-clock limit.
    pub const TIMEOUT: &str = "Timeout";
    /// Linear memory or a table tried to grow past the cap.
    pub const MEMORY_LIMIT_EXCEEDED: &str = "MemoryLimitExceeded";
    /// The guest trapped (including a Rust panic).
    pub const GUEST_TRAP: &str = "GuestTrap";
    /// The guest failed without a well-formed error.
    pub const GUEST_ERROR: &str = "GuestError";
    /// An output was not valid JSON.
    pub const INVALID_RESULT: &str = "InvalidResult";
    /// The results were larger than the cap.
    pub const RESULT_TOO_LARGE: &str = "ResultTooLarge";
    /// The host had no capacity to start the invocation.
    pub const OVERLOADED: &str = "Overloaded";
    /// The host failed for a reason of its own (should not happen; logged loudly).
    pub const INTERNAL: &str = "InternalError";
}

/// A failed invocation: what the caller sees as a remote error.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[error("{class}: {message}")]
pub struct Failure {
    /// Short type name, e.g. `Timeout` or a guest's own `ZeroDivisionError`.
    pub class: String,
    /// Human-readable text.
    pub message: String,
    /// Structured details from the guest, if it gave any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl Failure {
    /// A failure without structured data.
    pub fn new(class: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            class: class.into(),
            message: message.into(),
            data: None,
        }
    }
}

/// Why a module could not be loaded. A module that fails to load never serves.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a valid WebAssembly module or component (or WAT text).
    #[error("not a valid WebAssembly module: {0}")]
    Compile(String),
    /// A component that does not target the Warren WIT world (`guest-sdk/wit/warren.wit`).
    #[error("component does not target the Warren world warren:handler@1.0.0: {0}")]
    World(String),
    /// `warren_abi_version` is missing or has the wrong type.
    #[error(
        "module does not export `warren_abi_version: () -> i32`; it was not built for the Warren ABI (see guest-sdk/ABI.md)"
    )]
    MissingAbiMarker,
    /// The module was built for another ABI version.
    #[error("module was built for Warren ABI v{found}, this host speaks v{expected}")]
    AbiVersion {
        /// What the module's marker returned.
        found: i32,
        /// What this host implements.
        expected: i32,
    },
    /// The module does not export its linear memory as `memory`.
    #[error("module does not export its linear memory as `memory`")]
    MissingMemory,
    /// An import the host does not provide, or a type mismatch.
    #[error("cannot link module: {0}")]
    Link(String),
    /// Instantiation, `_initialize` or the marker call failed in the smoke test.
    #[error("module failed its start-up check: {0}")]
    Startup(Failure),
}
