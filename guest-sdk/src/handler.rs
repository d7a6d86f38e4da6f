//! The functions that can serve a method.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;

use crate::output::IntoOutput;
use crate::{Context, Error, abi};

/// A function that can serve an RPC method. It is implemented for
///
/// * `Fn(A) -> Result<T, E>`: takes the args object, deserialized into `A`;
/// * `Fn(A, &Context) -> Result<T, E>`: also reads the request [`Context`];
/// * `Fn(&Context) -> Result<T, E>` and `Fn() -> Result<T, E>`: ignore the args,
///
/// where `A: DeserializeOwned`, `T:` [`IntoOutput`] (any `Serialize` value, a
/// [`Stream`](crate::Stream), or `()` for no result) and `E: Into<`[`Error`]`>`.
///
/// Args that do not deserialize into `A` fail the call with class [`Error::INVALID_ARGS`] and
/// serde's message, before the function runs.
///
/// `M` only tells the implementations apart; it is inferred and never needs naming.
///
/// ```
/// use serde::Deserialize;
/// use warren_guest::{Context, Error, Handler, testing};
///
/// #[derive(Deserialize)]
/// struct Greet {
///     name: String,
/// }
///
/// fn greet(args: Greet, ctx: &Context) -> Result<String, Error> {
///     Ok(format!("hello {} from {}", args.name, ctx.user_id().unwrap_or("nobody")))
/// }
///
/// fn assert_handler<M>(_: impl Handler<M>) {}
/// assert_handler(greet);
///
/// let out = testing::invoke(greet, r#"{"name": "bob"}"#, r#"{"user_id": "u1"}"#);
/// assert_eq!(out.results, ["hello bob from u1"]);
///
/// let out = testing::invoke(greet, r#"{"nom": "bob"}"#, "{}");
/// assert_eq!(out.error.unwrap().class, "InvalidArgs");
/// ```
pub trait Handler<M> {
    /// Reads the args, runs the function and writes its results; what
    /// [`export!`](crate::export) calls for each invocation.
    ///
    /// ```
    /// use warren_guest::{Context, Error, Handler};
    ///
    /// fn ping() -> Result<&'static str, Error> { Ok("pong") }
    ///
    /// // Outside `testing::invoke` the result goes nowhere, but the call still succeeds.
    /// assert_eq!(ping.call(&Context::from_map(Default::default())), Ok(()));
    /// ```
    fn call(&self, ctx: &Context) -> Result<(), Error>;
}

/// Markers selecting a [`Handler`] implementation by the function's parameters.
#[doc(hidden)]
pub mod marker {
    use super::PhantomData;

    pub struct Args<A>(PhantomData<fn() -> A>);
    pub struct ArgsContext<A>(PhantomData<fn() -> A>);
    pub struct ContextOnly;
    pub struct Nothing;
}

fn args<A: DeserializeOwned>() -> Result<A, Error> {
    // Straight from the host's bytes: no intermediate `Value` and no UTF-8 pass of its own.
    serde_json::from_slice(&abi::input()).map_err(|err| Error::invalid_args(err.to_string()))
}

impl<F, A, T, E> Handler<marker::Args<A>> for F
where
    F: Fn(A) -> Result<T, E>,
    A: DeserializeOwned,
    T: IntoOutput,
    E: Into<Error>,
{
    fn call(&self, _ctx: &Context) -> Result<(), Error> {
        self(args()?).map_err(Into::into)?.write_output()
    }
}

impl<F, A, T, E> Handler<marker::ArgsContext<A>> for F
where
    F: Fn(A, &Context) -> Result<T, E>,
    A: DeserializeOwned,
    T: IntoOutput,
    E: Into<Error>,
{
    fn call(&self, ctx: &Context) -> Result<(), Error> {
        self(args()?, ctx).map_err(Into::into)?.write_output()
    }
}

impl<F, T, E> Handler<marker::ContextOnly> for F
where
    F: Fn(&Context) -> Result<T, E>,
    T: IntoOutput,
    E: Into<Error>,
{
    fn call(&self, ctx: &Context) -> Result<(), Error> {
        self(ctx).map_err(Into::into)?.write_output()
    }
}

impl<F, T, E> Handler<marker::Nothing> for F
where
    F: Fn() -> Result<T, E>,
    T: IntoOutput,
    E: Into<Error>,
{
    fn call(&self, _ctx: &Context) -> Result<(), Error> {
        self().map_err(Into::into)?.write_output()
    }
}
