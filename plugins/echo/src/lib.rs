//! Warren example plugin: `echo` returns `args.value`, `context` the request context.

use serde::Deserialize;
use warren_guest::serde_json::{Map, Value, value::RawValue};
use warren_guest::{Context, Error};

#[derive(Deserialize)]
struct EchoArgs {
    // Raw JSON text rather than a `Value`: echoed byte for byte (big numbers keep every digit),
    // and no tree is built just to be serialized again.
    value: Box<RawValue>,
}

fn echo(args: EchoArgs) -> Result<Box<RawValue>, Error> {
    Ok(args.value)
}

fn context(ctx: &Context) -> Result<Map<String, Value>, Error> {
    Ok(ctx.as_map().clone())
}

warren_guest::export!(echo, context);
