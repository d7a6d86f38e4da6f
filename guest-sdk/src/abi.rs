//! The host imports of ABI v1 behind safe byte-slice functions.
//!
//! On wasm32 they are the real `warren_v1` imports. Everywhere else a thread-local stand-in plays
//! the host, so handlers can be unit-tested natively (see [`crate::testing`]) and doctests link.

#[cfg(target_arch = "wasm32")]
mod imp {
    mod sys {
        // Pointers and `usize` are both `i32` in the wasm32 C ABI, so these match the `i32`
        // signatures of ABI.md while keeping the casts out of the callers.
        #[link(wasm_import_module = "warren_v1")]
        unsafe extern "C" {
            pub(super) safe fn input_len() -> usize;
            pub(super) fn input_read(dst: *mut u8);
            pub(super) safe fn context_len() -> usize;
            pub(super) fn context_read(dst: *mut u8);
            pub(super) fn output_write(src: *const u8, len: usize);
            pub(super) fn error_write(src: *const u8, len: usize);
            pub(super) fn log(level: i32, src: *const u8, len: usize);
            pub(super) fn call(src: *const u8, len: usize) -> i32;
            pub(super) fn cast(src: *const u8, len: usize) -> i32;
            pub(super) fn fanout_cast(src: *const u8, len: usize) -> i32;
            pub(super) fn notify(src: *const u8, len: usize) -> i32;
            pub(super) safe fn reply_len() -> usize;
            pub(super) fn reply_read(dst: *mut u8);
        }
    }

    /// Send an outbound request; the status and the reply (result or error JSON).
    pub(crate) fn send(kind: super::Kind, request: &[u8]) -> (i32, Vec<u8>) {
        let import = match kind {
            super::Kind::Call => sys::call,
            super::Kind::Cast => sys::cast,
            super::Kind::FanoutCast => sys::fanout_cast,
            super::Kind::Notify => sys::notify,
        };
        // SAFETY: the host only reads `request.len()` bytes from a live slice.
        let status = unsafe { import(request.as_ptr(), request.len()) };
        (status, read(sys::reply_len(), sys::reply_read))
    }

    /// Has the host copy a `len`-byte payload out through `fill` (`input_read` or
    /// `context_read`).
    fn read(len: usize, fill: unsafe extern "C" fn(*mut u8)) -> Vec<u8> {
        let mut buf = Vec::with_capacity(len);
        // An empty Vec's pointer is dangling; there is nothing to copy anyway.
        if len > 0 {
            // SAFETY: `buf` has room for `len` bytes and the host writes exactly that many: the
            // payload does not change during an invocation.
            unsafe {
                fill(buf.as_mut_ptr());
                buf.set_len(len);
            }
        }
        buf
    }

    pub(crate) fn input() -> Vec<u8> {
        read(sys::input_len(), sys::input_read)
    }

    pub(crate) fn context() -> Vec<u8> {
        read(sys::context_len(), sys::context_read)
    }

    pub(crate) fn output_write(bytes: &[u8]) {
        // SAFETY: the host only reads `bytes.len()` bytes from a live slice.
        unsafe { sys::output_write(bytes.as_ptr(), bytes.len()) }
    }

    pub(crate) fn error_write(bytes: &[u8]) {
        // SAFETY: as for `output_write`.
        unsafe { sys::error_write(bytes.as_ptr(), bytes.len()) }
    }

    pub(crate) fn log(level: i32, message: &str) {
        // SAFETY: as for `output_write`.
        unsafe { sys::log(level, message.as_ptr(), message.len()) }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use std::cell::RefCell;

    /// What the native stand-in host holds for one invocation.
    #[derive(Debug, Default)]
    pub(crate) struct Invocation {
        pub(crate) args: Vec<u8>,
        pub(crate) context: Vec<u8>,
        pub(crate) outputs: Vec<Vec<u8>>,
        pub(crate) error: Option<Vec<u8>>,
        pub(crate) logs: Vec<(i32, String)>,
    }

    thread_local! {
        static CURRENT: RefCell<Option<Invocation>> = const { RefCell::new(None) };
    }

    /// Installs `next` as the current invocation and returns the one it replaces, so nested
    /// `testing::invoke` calls restore their caller's state.
    pub(crate) fn swap(next: Option<Invocation>) -> Option<Invocation> {
        CURRENT.with(|current| current.replace(next))
    }

    // Outside `testing::invoke` there is no caller: args and context read as `{}` (what the host
    // sends when there are none), results go nowhere and logs go to stderr.

    pub(crate) fn input() -> Vec<u8> {
        CURRENT.with_borrow(|current| match current {
            Some(invocation) => invocation.args.clone(),
            None => b"{}".to_vec(),
        })
    }

    pub(crate) fn context() -> Vec<u8> {
        CURRENT.with_borrow(|current| match current {
            Some(invocation) => invocation.context.clone(),
            None => b"{}".to_vec(),
        })
    }

    pub(crate) fn output_write(bytes: &[u8]) {
        CURRENT.with_borrow_mut(|current| {
            if let Some(invocation) = current {
                invocation.outputs.push(bytes.to_vec());
            }
        });
    }

    pub(crate) fn error_write(bytes: &[u8]) {
        CURRENT.with_borrow_mut(|current| {
            if let Some(invocation) = current {
                invocation.error = Some(bytes.to_vec());
            }
        });
    }

    pub(crate) fn log(level: i32, message: &str) {
        CURRENT.with_borrow_mut(|current| match current {
            Some(invocation) => invocation.logs.push((level, message.to_owned())),
            None => eprintln!("[{}] {message}", crate::log::Level::from_abi(level)),
        });
    }

    /// Stands in for the host's outbound RPC in native tests (`testing::stub_rpc`).
    pub(crate) type Stub =
        Box<dyn FnMut(&str, &serde_json::Value) -> Result<serde_json::Value, crate::Error>>;

    thread_local! {
        pub(crate) static STUB: RefCell<Option<Stub>> = const { RefCell::new(None) };
    }

    pub(crate) fn send(kind: super::Kind, request: &[u8]) -> (i32, Vec<u8>) {
        let request: serde_json::Value = serde_json::from_slice(request).unwrap_or_default();
        let outcome = STUB.with_borrow_mut(|stub| match stub {
            Some(stub) => stub(kind.as_str(), &request),
            None => Err(crate::Error::new(
                "Unavailable",
                "outbound RPC needs the Warren host; in native tests install testing::stub_rpc",
            )),
        });
        match outcome {
            Ok(value) => (0, serde_json::to_vec(&value).unwrap_or_default()),
            Err(error) => (1, error.to_json()),
        }
    }
}

/// The outbound imports, named as in ABI.md.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Call,
    Cast,
    FanoutCast,
    Notify,
}

impl Kind {
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Call => "call",
            Kind::Cast => "cast",
            Kind::FanoutCast => "fanout_cast",
            Kind::Notify => "notify",
        }
    }
}

pub(crate) use imp::*;
