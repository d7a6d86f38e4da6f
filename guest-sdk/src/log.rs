//! Log lines sent to the host's log.
//!
//! Use the functions here for plain messages and the [`trace!`](crate::trace),
//! [`debug!`](crate::debug), [`info!`](crate::info), [`warn!`](crate::warn) and
//! [`error!`](crate::error) macros to format. Filtering by level is up to the host.
//!
//! ```
//! use warren_guest::log;
//!
//! log::info("cache warmed");
//! warren_guest::debug!("{} entries", 42);
//! ```

use std::fmt;

/// Severity of a log line; the discriminants are the ABI's level numbers.
///
/// ```
/// use warren_guest::log::Level;
///
/// assert_eq!(Level::Warn as i32, 3);
/// assert!(Level::Error > Level::Info);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(i32)]
pub enum Level {
    /// Level 0.
    Trace = 0,
    /// Level 1.
    Debug = 1,
    /// Level 2.
    Info = 2,
    /// Level 3.
    Warn = 3,
    /// Level 4.
    Error = 4,
}

impl Level {
    /// The level a host gives the ABI number `level`: unknown numbers count as info.
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub(crate) fn from_abi(level: i32) -> Self {
        match level {
            0 => Self::Trace,
            1 => Self::Debug,
            3 => Self::Warn,
            4 => Self::Error,
            _ => Self::Info,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Trace => "TRACE",
            Self::Debug => "DEBUG",
            Self::Info => "INFO",
            Self::Warn => "WARN",
            Self::Error => "ERROR",
        })
    }
}

/// Writes `message` to the host's log at `level`.
///
/// ```
/// use warren_guest::log::{self, Level};
///
/// log::log(Level::Info, "started");
/// ```
pub fn log(level: Level, message: &str) {
    crate::abi::log(level as i32, message);
}

/// Writes `message` at [`Level::Trace`].
///
/// ```
/// warren_guest::log::trace("entering fib");
/// ```
pub fn trace(message: &str) {
    log(Level::Trace, message);
}

/// Writes `message` at [`Level::Debug`].
///
/// ```
/// warren_guest::log::debug("cache miss");
/// ```
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Writes `message` at [`Level::Info`].
///
/// ```
/// warren_guest::log::info("user created");
/// ```
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Writes `message` at [`Level::Warn`].
///
/// ```
/// warren_guest::log::warn("deprecated method called");
/// ```
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Writes `message` at [`Level::Error`].
///
/// ```
/// warren_guest::log::error("backend unreachable");
/// ```
pub fn error(message: &str) {
    log(Level::Error, message);
}

/// What the logging macros expand to.
#[doc(hidden)]
pub fn log_fmt(level: Level, args: fmt::Arguments<'_>) {
    // A format string without arguments needs no allocation.
    match args.as_str() {
        Some(message) => log(level, message),
        None => log(level, &args.to_string()),
    }
}

/// Logs a formatted message at [`Level::Trace`](crate::log::Level::Trace).
///
/// ```
/// warren_guest::trace!("step {} of {}", 1, 3);
/// ```
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => {
        $crate::log::log_fmt($crate::log::Level::Trace, ::core::format_args!($($arg)+))
    };
}

/// Logs a formatted message at [`Level::Debug`](crate::log::Level::Debug).
///
/// ```
/// let key = "u1";
/// warren_guest::debug!("cache miss for {key}");
/// ```
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => {
        $crate::log::log_fmt($crate::log::Level::Debug, ::core::format_args!($($arg)+))
    };
}

/// Logs a formatted message at [`Level::Info`](crate::log::Level::Info).
///
/// ```
/// let n = 10;
/// warren_guest::info!("streaming {n} numbers");
/// ```
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => {
        $crate::log::log_fmt($crate::log::Level::Info, ::core::format_args!($($arg)+))
    };
}

/// Logs a formatted message at [`Level::Warn`](crate::log::Level::Warn).
///
/// ```
/// warren_guest::warn!("{} is deprecated", "old_add");
/// ```
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => {
        $crate::log::log_fmt($crate::log::Level::Warn, ::core::format_args!($($arg)+))
    };
}

/// Logs a formatted message at [`Level::Error`](crate::log::Level::Error).
///
/// ```
/// warren_guest::error!("backend {} unreachable", "db1");
/// ```
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => {
        $crate::log::log_fmt($crate::log::Level::Error, ::core::format_args!($($arg)+))
    };
}
