//! Write Warren RPC handlers in Rust.
//!
//! A plugin is a `cdylib` crate built for `wasm32-wasip1`. Each method is a plain function
//! taking its args (any [`DeserializeOwned`](serde::de::DeserializeOwned) type, deserialized
//! from the request's args object) and optionally the request [`Context`], and returning
//! `Result<T, E>` where `T` is any `Serialize` value (or a [`Stream`] of them) and
//! `E: Into<`[`Error`]`>`. [`export!`] turns the functions into the module's exports.
//!
//! ```
//! use serde::Deserialize;
//! use warren_guest::Error;
//!
//! #[derive(Deserialize)]
//! struct Div { a: f64, b: f64 }
//!
//! fn div(Div { a, b }: Div) -> Result<f64, Error> {
//!     if b == 0.0 {
//!         return Err(Error::new("ZeroDivisionError", "division by zero"));
//!     }
//!     Ok(a / b)
//! }
//!
//! warren_guest::export!(div);
//! # assert_eq!(warren_guest::testing::invoke(div, r#"{"a": 1, "b": 2}"#, "{}").value(), Ok(0.5.into()));
//! ```
//!
//! `{"method": "div", "args": {"a": 1, "b": 2}}` then returns `0.5`; `{"a": 1, "b": 0}` fails
//! with class `ZeroDivisionError`, and args without `a` fail with `InvalidArgs` before `div`
//! runs. The plugin's `Cargo.toml` needs `crate-type = ["cdylib"]`, this crate, and `serde` with
//! the `derive` feature; `cargo build --release --target wasm32-wasip1` produces the module.
//!
//! The crate implements the guest side of Warren ABI v1 (`ABI.md` beside its sources): the
//! `warren_v1` imports on wasm32, and off wasm32 a stand-in host, so that handlers can be
//! unit-tested natively with [`testing::invoke`] and logging or [`emit`] calls outside it do
//! nothing harmful. It never panics on bad input.

#![deny(missing_docs)]

mod abi;
mod context;
mod error;
mod handler;
pub mod log;
mod output;
pub mod rpc;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use context::Context;
pub use error::Error;
pub use handler::Handler;
pub use output::{IntoOutput, Stream, emit};
#[doc(no_inline)]
pub use serde;
#[doc(no_inline)]
pub use serde_json::{self, Value};

/// The ABI version this crate implements, returned by the `warren_abi_version` export.
///
/// ```
/// assert_eq!(warren_guest::ABI_VERSION, 1);
/// ```
pub const ABI_VERSION: i32 = 1;

/// `Result` with [`Error`] as the default error type.
///
/// ```
/// fn ping() -> warren_guest::Result<&'static str> {
///     Ok("pong")
/// }
/// # assert_eq!(ping(), Ok("pong"));
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exports functions as the module's RPC methods, plus the `warren_abi_version` marker.
///
/// Each entry is a function name, exported as a method of the same name, or `"name" => path`
/// to export under another name (a path to a function elsewhere works too). Call it once per
/// module: a second call would export `warren_abi_version` twice and fail to link.
///
/// Each export reads the args, calls the function through [`Handler`], writes the results or
/// the error, and returns `0` on success or `1` on failure. Names the host would never call
/// (starting with `_`, `warren_` or `cabi_`, or `memory`) are refused at compile time.
///
/// Off wasm32 nothing is exported (so a native `cargo test` of the plugin links without symbol
/// clashes such as libc's `div`), but the functions are still checked to be handlers.
///
/// ```
/// use warren_guest::{Context, Error, export};
///
/// fn ping() -> Result<&'static str, Error> { Ok("pong") }
/// fn whoami(ctx: &Context) -> Result<Option<String>, Error> {
///     Ok(ctx.user_id().map(str::to_owned))
/// }
/// mod admin {
///     pub fn reset() -> Result<(), warren_guest::Error> { Ok(()) }
/// }
///
/// export!(ping, whoami, "admin.reset" => admin::reset);
/// ```
#[macro_export]
macro_rules! export {
    ($($methods:tt)*) => {
        const _: () = {
            #[cfg_attr(target_arch = "wasm32", unsafe(export_name = "warren_abi_version"))]
            #[allow(dead_code)]
            extern "C" fn __warren_abi_version() -> i32 {
                $crate::ABI_VERSION
            }
        };
        $crate::__export_methods!($($methods)*);
    };
}

/// Expands each entry of [`export!`], one at a time.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_methods {
    () => {};
    ($name:literal => $handler:path $(, $($rest:tt)*)?) => {
        $crate::__export_method!(::core::concat!("rpc:", $name), $name, $handler);
        $crate::__export_methods!($($($rest)*)?);
    };
    ($handler:ident $(, $($rest:tt)*)?) => {
        $crate::__export_method!(
            ::core::concat!("rpc:", ::core::stringify!($handler)),
            ::core::stringify!($handler),
            $handler
        );
        $crate::__export_methods!($($($rest)*)?);
    };
}

/// Exports one method, as `rpc:<name>` (ABI.md): a plain `read` or `write` export would be the
/// same linker symbol as libc's, and std's file I/O would call the handler instead.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_method {
    ($export:expr, $name:expr, $handler:path) => {
        const _: () = {
            $crate::__private::check_method_name($name);

            #[cfg_attr(target_arch = "wasm32", unsafe(export_name = $export))]
            #[allow(dead_code)]
            extern "C" fn __warren_method() -> i32 {
                $crate::__private::run($handler)
            }
        };
    };
}

/// What [`export!`] expands to; not a public API.
#[doc(hidden)]
pub mod __private {
    use crate::{Context, Handler};

    /// Runs one invocation of `handler` and returns its status.
    pub fn run<M, H: Handler<M>>(handler: H) -> i32 {
        match handler.call(&Context::from_host()) {
            Ok(()) => 0,
            Err(err) => {
                crate::abi::error_write(&err.to_json());
                1
            }
        }
    }

    /// Fails compilation (in a const context) for names the host never treats as methods.
    pub const fn check_method_name(name: &str) {
        let name = name.as_bytes();
        assert!(!name.is_empty(), "warren_guest::export!: empty method name");
        assert!(
            name[0] != b'_',
            "warren_guest::export!: method names must not start with `_`"
        );
        assert!(
            !starts_with(name, b"warren_") && !starts_with(name, b"cabi_"),
            "warren_guest::export!: method names must not start with `warren_` or `cabi_`"
        );
        assert!(
            !(name.len() == 6 && starts_with(name, b"memory")),
            "warren_guest::export!: `memory` is not a valid method name"
        );
    }

    const fn starts_with(name: &[u8], prefix: &[u8]) -> bool {
        if name.len() < prefix.len() {
            return false;
        }
        let mut i = 0;
        while i < prefix.len() {
            if name[i] != prefix[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}
