//! Turning a handler's return value into results.

use serde::Serialize;

use crate::{Error, abi};

/// A value a handler can return: it becomes zero or more results of the invocation.
///
/// * Any [`Serialize`] value is one result, except that a value serializing to `null` (`()`,
///   `None`) writes nothing. To the caller that is the same single `null`, and it lets a handler
///   that streamed with [`emit`] end with `Ok(())` without adding a trailing `null`.
/// * [`Stream`] writes one result per item.
///
/// ```
/// use warren_guest::{Error, Stream, testing};
///
/// fn three() -> Result<Stream<std::ops::Range<u32>>, Error> { Ok(Stream(0..3)) }
/// fn nothing() -> Result<(), Error> { Ok(()) }
///
/// assert_eq!(testing::invoke(three, "{}", "{}").results, [0, 1, 2]);
/// assert!(testing::invoke(nothing, "{}", "{}").results.is_empty());
/// ```
pub trait IntoOutput {
    /// Writes `self` as results of the current invocation.
    ///
    /// ```
    /// use warren_guest::{IntoOutput, testing};
    ///
    /// fn handler() -> Result<(), warren_guest::Error> {
    ///     "first".write_output()?;
    ///     "second".write_output()
    /// }
    /// assert_eq!(testing::invoke(handler, "{}", "{}").results, ["first", "second"]);
    /// ```
    fn write_output(self) -> Result<(), Error>;
}

impl<T: Serialize> IntoOutput for T {
    fn write_output(self) -> Result<(), Error> {
        let json = serde_json::to_vec(&self).map_err(|err| Error::invalid_result(&err))?;
        if json != b"null" {
            abi::output_write(&json);
        }
        Ok(())
    }
}

/// Streams each item of an iterator as a separate result.
///
/// A `multicall` caller receives every item in order; a `call` caller only the last. An empty
/// stream writes nothing, which the caller sees as a single `null`.
///
/// ```
/// use serde::Deserialize;
/// use warren_guest::{Error, Stream, testing};
///
/// #[derive(Deserialize)]
/// struct Args {
///     n: u64,
/// }
///
/// fn squares(Args { n }: Args) -> Result<Stream<impl Iterator<Item = u64>>, Error> {
///     Ok(Stream((1..=n).map(|i| i * i)))
/// }
///
/// assert_eq!(testing::invoke(squares, r#"{"n": 3}"#, "{}").results, [1, 4, 9]);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stream<I>(pub I);

impl<I> IntoOutput for Stream<I>
where
    I: IntoIterator,
    I::Item: Serialize,
{
    fn write_output(self) -> Result<(), Error> {
        // One buffer for the whole stream rather than one allocation per item.
        let mut json = Vec::new();
        for item in self.0 {
            json.clear();
            serde_json::to_writer(&mut json, &item).map_err(|err| Error::invalid_result(&err))?;
            abi::output_write(&json);
        }
        Ok(())
    }
}

/// Writes `value` as one more result right away, for handlers that stream imperatively.
///
/// Unlike a returned value, an emitted `null` is a result of its own. Results emitted before
/// the handler fails are discarded by the host.
///
/// ```
/// use warren_guest::{Error, emit, serde_json::json, testing};
///
/// fn countdown() -> Result<(), Error> {
///     for i in (1..=3).rev() {
///         emit(&i)?;
///     }
///     emit("liftoff")
/// }
///
/// let out = testing::invoke(countdown, "{}", "{}");
/// assert_eq!(out.results, [json!(3), json!(2), json!(1), json!("liftoff")]);
/// ```
pub fn emit<T: Serialize + ?Sized>(value: &T) -> Result<(), Error> {
    let json = serde_json::to_vec(value).map_err(|err| Error::invalid_result(&err))?;
    abi::output_write(&json);
    Ok(())
}
