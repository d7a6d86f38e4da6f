//! Spans made only when something is logged in them.
//!
//! Every line logged about a delivery carries its ids (topic, tag, method, `msg_id`, ...) as
//! the fields of a `delivery` span. Most deliveries log nothing at the default level, yet
//! making a span costs what the rest of a call's bookkeeping does: the subscriber stores it,
//! formats its fields, and enters and leaves it at every poll. So a delivery runs inside a
//! [`Scoped`] future that only makes its [`LazySpan`] current, on this thread, while it is
//! polled; the [`in_span!`](crate::in_span) macro makes the span (once) and logs in it when
//! the event's level is enabled. A span once made is entered at every later poll, so events
//! from libraries land in it too.
//!
//! An event logged with plain `tracing` macros inside a delivery, before its span exists,
//! carries only the fields of whatever span is current, so every event about a delivery
//! goes through `in_span!`.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tracing::Span;

/// What the span of a piece of work is made from, and the span once it is.
pub trait SpanSource: Sync {
    /// Make the span (called once, on first use).
    fn make(&self) -> Span;
    /// Where the span is kept once made.
    fn cell(&self) -> &OnceLock<Span>;

    /// The span, made now if need be.
    fn span(&self) -> &Span {
        self.cell().get_or_init(|| self.make())
    }
}

/// A [`SpanSource`] from a closure.
pub struct LazySpan<F> {
    make: F,
    span: OnceLock<Span>,
}

impl<F: Fn() -> Span + Sync> LazySpan<F> {
    /// A span that `make` makes on first use.
    pub fn new(make: F) -> Self {
        Self {
            make,
            span: OnceLock::new(),
        }
    }
}

impl<F: Fn() -> Span + Sync> SpanSource for LazySpan<F> {
    fn make(&self) -> Span {
        (self.make)()
    }

    fn cell(&self) -> &OnceLock<Span> {
        &self.span
    }
}

thread_local! {
    /// The source of the work being polled on this thread, if any (see [`Scoped`]).
    static CURRENT: Cell<Option<NonNull<dyn SpanSource>>> = const { Cell::new(None) };
}

/// Puts back the previous source when a poll ends, including by unwinding.
struct Restore(Option<NonNull<dyn SpanSource>>);

impl Drop for Restore {
    fn drop(&mut self) {
        CURRENT.with(|current| current.set(self.0));
    }
}

/// Run `f` with `source` current on this thread.
fn with_source<R>(source: &dyn SpanSource, f: impl FnOnce() -> R) -> R {
    let erased: NonNull<dyn SpanSource + '_> = NonNull::from(source);
    // SAFETY: only the lifetime bound of the trait object changes. The pointer is read only
    // by `current` while it is current, which is while `f` runs (`Restore` takes it back out
    // even if `f` panics), and `source` is borrowed for all of that.
    let erased: NonNull<dyn SpanSource> = unsafe { std::mem::transmute(erased) };
    let _restore = Restore(CURRENT.with(|current| current.replace(Some(erased))));
    f()
}

/// Call `f` with the span of the work being polled on this thread, made now if need be
/// (`None` outside any work).
fn with_current<R>(f: impl FnOnce(Option<&Span>) -> R) -> R {
    let source = CURRENT.with(Cell::get);
    // SAFETY: set by `with_source` for the duration of a poll, during which the source is
    // borrowed; the reference does not leave this call, which happens within that poll.
    let span = source.map(|source| unsafe { source.as_ref() }.span());
    f(span)
}

/// The span to carry work to another thread: the current work's (made now), else the
/// ambient `tracing` span.
pub fn current_or_ambient() -> Span {
    with_current(|span| span.cloned().unwrap_or_else(Span::current))
}

/// Run `f` inside the current work's span, making it if need be; outside any, just run it.
pub fn in_current<R>(f: impl FnOnce() -> R) -> R {
    with_current(|span| match span {
        Some(span) => span.in_scope(f),
        None => f(),
    })
}

/// Log an event inside the current work's span (see the module docs): `in_span!(Level::WARN,
/// error = %e, "message")`, or with a `target:` first. The span is made only if the event's
/// level is enabled.
#[macro_export]
macro_rules! in_span {
    (target: $target:expr, $level:expr, $($rest:tt)+) => {
        if ::tracing::enabled!(target: $target, $level) {
            $crate::log::lazy::in_current(|| ::tracing::event!(target: $target, $level, $($rest)+))
        }
    };
    ($level:expr, $($rest:tt)+) => {
        if ::tracing::enabled!($level) {
            $crate::log::lazy::in_current(|| ::tracing::event!($level, $($rest)+))
        }
    };
}

pin_project_lite::pin_project! {
    /// A future that makes `source` current while it is polled (and enters its span once
    /// made): the lazy counterpart of `tracing::Instrumented`.
    pub struct Scoped<'a, F> {
        source: &'a dyn SpanSource,
        #[pin]
        inner: F,
    }
}

impl<'a, F> Scoped<'a, F> {
    /// `inner`, polled with `source` current.
    pub fn new(source: &'a dyn SpanSource, inner: F) -> Self {
        Self { source, inner }
    }
}

impl<F: Future> Future for Scoped<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let source: &dyn SpanSource = *this.source;
        let inner = this.inner;
        with_source(source, || match source.cell().get() {
            Some(span) => span.in_scope(|| inner.poll(cx)),
            None => inner.poll(cx),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly by design")]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use tracing::Level;

    use super::*;
    use crate::log::capture::Buffer;

    /// What `run` logged at `level` and above, one line per event, without ANSI or time.
    fn logged(level: Level, run: impl FnOnce()) -> Vec<String> {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .without_time()
            .with_writer(buffer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, run);
        buffer.text().lines().map(str::to_owned).collect()
    }

    /// Polls `future` to completion on this thread (the futures here never wait).
    fn finish<F: Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
        }
    }

    /// Yields once, so that the work is polled twice.
    async fn yield_once() {
        let mut yielded = false;
        std::future::poll_fn(|cx| {
            if yielded {
                Poll::Ready(())
            } else {
                yielded = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
        .await;
    }

    #[test]
    fn the_span_is_made_only_when_an_enabled_event_is_logged_in_it() {
        let made = AtomicUsize::new(0);
        let source = LazySpan::new(|| {
            made.fetch_add(1, Ordering::SeqCst);
            tracing::info_span!("delivery", tag = 7u64)
        });
        let lines = logged(Level::INFO, || {
            finish(Scoped::new(&source, async {
                in_span!(Level::DEBUG, "filtered out");
                yield_once().await;
            }));
        });
        assert!(lines.is_empty(), "{lines:?}");
        assert_eq!(made.load(Ordering::SeqCst), 0, "no enabled event, no span");

        let lines = logged(Level::INFO, || {
            finish(Scoped::new(&source, async {
                in_span!(Level::WARN, answer = 42u64, "first");
                in_span!(Level::INFO, "second");
            }));
        });
        assert_eq!(made.load(Ordering::SeqCst), 1, "made once for both events");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("delivery{tag=7}") && lines[0].contains("answer=42"));
        assert!(lines[1].contains("delivery{tag=7}") && lines[1].contains("second"));
    }

    #[test]
    fn a_made_span_is_entered_at_later_polls_for_plain_events() {
        let source = LazySpan::new(|| tracing::info_span!("delivery", tag = 9u64));
        let lines = logged(Level::INFO, || {
            finish(Scoped::new(&source, async {
                tracing::info!("before: no span yet");
                in_span!(Level::INFO, "makes it");
                yield_once().await;
                tracing::info!("after: inside it");
            }));
        });
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(!lines[0].contains("delivery{"), "{}", lines[0]);
        assert!(lines[2].contains("delivery{tag=9}"), "{}", lines[2]);
    }

    #[test]
    fn outside_any_work_events_are_logged_as_they_are() {
        let lines = logged(Level::INFO, || {
            in_span!(Level::INFO, "no work");
            assert!(with_current(|span| span.is_none()));
        });
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("no work") && !lines[0].contains('{'));
    }

    #[test]
    fn the_source_is_current_only_while_its_work_is_polled() {
        let outer = LazySpan::new(|| tracing::info_span!("outer"));
        let inner = LazySpan::new(|| tracing::info_span!("inner"));
        let lines = logged(Level::INFO, || {
            finish(Scoped::new(&outer, async {
                finish(Scoped::new(&inner, async {
                    in_span!(Level::INFO, "in inner");
                }));
                in_span!(Level::INFO, "back in outer");
            }));
            assert!(
                with_current(|span| span.is_none()),
                "restored after the poll"
            );
        });
        assert!(lines[0].contains("inner:"), "{}", lines[0]);
        assert!(
            lines[1].contains("outer:") && !lines[1].contains("inner"),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn a_panicking_poll_puts_the_previous_source_back() {
        let source = LazySpan::new(|| tracing::info_span!("doomed"));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            finish(Scoped::new(&source, async { panic!("in the work") }))
        }));
        assert!(result.is_err());
        assert!(with_current(|span| span.is_none()));
    }
}
