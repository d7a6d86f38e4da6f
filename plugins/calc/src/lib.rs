//! Warren example plugin: a small calculator showing typed errors, streaming, logging and what a
//! panic looks like to the caller.
//!
//! | method | args | result |
//! |---|---|---|
//! | `add` | `{"a": 1, "b": 2}` | `3` (integers stay integers; `1.5` + `1` is `2.5`) |
//! | `div` | `{"a": 1, "b": 4}` | `0.25`; `ZeroDivisionError` when `b` is 0 |
//! | `fib` | `{"n": 5}` | streams `0`, `1`, `1`, `2`, `3` (`n` ≤ 90) |
//! | `stats` | `{"values": [1, 2, 3]}` | `{"count": 3, "sum": 6.0, "mean": 2.0, "min": 1.0, "max": 3.0}` |
//! | `panic` | `{}` | traps with "calc panicked on purpose" |

use serde::{Deserialize, Serialize};
use warren_guest::serde_json::{Number, json};
use warren_guest::{Error, Stream};

/// The largest `n` for `fib`: F(89), the last number it streams, is far inside `u64`.
const MAX_FIB: u32 = 90;

#[derive(Deserialize)]
struct Operands {
    a: Number,
    b: Number,
}

impl Operands {
    /// Both operands as integers, if they are; `i128` so that any mix of `i64` and `u64`
    /// values adds without overflow.
    fn integers(&self) -> Option<(i128, i128)> {
        Some((integer(&self.a)?, integer(&self.b)?))
    }

    fn floats(&self) -> (f64, f64) {
        // A JSON number always has an f64 reading (possibly rounded).
        (
            self.a.as_f64().unwrap_or(f64::NAN),
            self.b.as_f64().unwrap_or(f64::NAN),
        )
    }

    fn data(&self) -> warren_guest::Value {
        json!({"a": self.a, "b": self.b})
    }
}

fn integer(n: &Number) -> Option<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
}

/// `a + b`: an integer when both are integers, else a float.
fn add(args: Operands) -> Result<Number, Error> {
    let sum = match args.integers() {
        Some((a, b)) => {
            let sum = a + b;
            i64::try_from(sum)
                .map(Number::from)
                .or_else(|_| u64::try_from(sum).map(Number::from))
                .ok()
        }
        None => {
            let (a, b) = args.floats();
            Number::from_f64(a + b)
        }
    };
    sum.ok_or_else(|| {
        Error::new("OverflowError", "the result does not fit a JSON number").with_data(args.data())
    })
}

/// `a / b` as a float, like Python's true division.
fn div(args: Operands) -> Result<f64, Error> {
    let (a, b) = args.floats();
    if b == 0.0 {
        return Err(Error::new("ZeroDivisionError", "division by zero").with_data(args.data()));
    }
    finite(a / b, || args.data())
}

/// JSON has no infinity: serde_json would quietly write `null` for it.
fn finite(x: f64, data: impl FnOnce() -> warren_guest::Value) -> Result<f64, Error> {
    if x.is_finite() {
        Ok(x)
    } else {
        Err(Error::new("OverflowError", "the result does not fit a JSON number").with_data(data()))
    }
}

#[derive(Deserialize)]
struct FibArgs {
    n: u32,
}

/// Streams F(0) … F(n-1), one result each.
fn fib(FibArgs { n }: FibArgs) -> Result<Stream<impl Iterator<Item = u64>>, Error> {
    if n > MAX_FIB {
        return Err(Error::invalid_args(format!(
            "n must be at most {MAX_FIB}, got {n}"
        )));
    }
    warren_guest::info!("streaming {n} Fibonacci numbers");
    // `checked_add` ends the sequence instead of overflowing; within MAX_FIB it never does.
    let numbers = std::iter::successors(Some((0_u64, 1_u64)), |&(a, b)| {
        a.checked_add(b).map(|c| (b, c))
    });
    Ok(Stream(numbers.map(|(a, _)| a).take(n as usize)))
}

#[derive(Deserialize)]
struct StatsArgs {
    values: Vec<f64>,
}

#[derive(Serialize)]
struct Stats {
    count: usize,
    sum: f64,
    mean: f64,
    min: f64,
    max: f64,
}

fn stats(StatsArgs { values }: StatsArgs) -> Result<Stats, Error> {
    if values.is_empty() {
        return Err(Error::invalid_args("values must not be empty"));
    }
    let sum = finite(values.iter().sum(), || json!({"values": values}))?;
    Ok(Stats {
        count: values.len(),
        sum,
        mean: sum / values.len() as f64,
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

/// Lets tests check that a Rust panic's message reaches the caller (as a `GuestTrap`).
fn panic() -> Result<(), Error> {
    panic!("calc panicked on purpose")
}

warren_guest::export!(add, div, fib, stats, panic);

#[cfg(test)]
mod tests {
    use warren_guest::serde_json::json;
    use warren_guest::testing::invoke;

    use super::*;

    #[test]
    fn add_keeps_integers() {
        assert_eq!(
            invoke(add, r#"{"a": 1, "b": 2}"#, "{}").value(),
            Ok(json!(3))
        );
        assert_eq!(
            invoke(add, r#"{"a": 1.5, "b": 1}"#, "{}").value(),
            Ok(json!(2.5))
        );
        let big = format!(r#"{{"a": {}, "b": 1}}"#, i64::MAX);
        assert_eq!(
            invoke(add, &big, "{}").value(),
            Ok(json!(i64::MAX as u64 + 1))
        );
        let too_big = format!(r#"{{"a": {}, "b": 1}}"#, u64::MAX);
        let err = invoke(add, &too_big, "{}").error.map(|e| e.class);
        assert_eq!(err.as_deref(), Some("OverflowError"));
    }

    #[test]
    fn add_rejects_non_numbers() {
        let err = invoke(add, r#"{"a": "1", "b": 2}"#, "{}").error;
        assert_eq!(err.map(|e| e.class).as_deref(), Some("InvalidArgs"));
    }

    #[test]
    fn div_by_zero_is_typed() {
        assert_eq!(
            invoke(div, r#"{"a": 1, "b": 4}"#, "{}").value(),
            Ok(json!(0.25))
        );
        let out = invoke(div, r#"{"a": 1, "b": 0}"#, "{}");
        let expected =
            Error::new("ZeroDivisionError", "division by zero").with_data(json!({"a": 1, "b": 0}));
        assert_eq!(out.error, Some(expected));
    }

    #[test]
    fn fib_streams_and_caps_n() {
        let out = invoke(fib, r#"{"n": 7}"#, "{}");
        assert_eq!(out.results, [0, 1, 1, 2, 3, 5, 8]);
        assert_eq!(out.logs.len(), 1);
        let out = invoke(fib, r#"{"n": 90}"#, "{}");
        assert_eq!(out.value(), Ok(json!(1_779_979_416_004_714_189_u64)));
        let out = invoke(fib, r#"{"n": 91}"#, "{}");
        assert_eq!(out.error.map(|e| e.class).as_deref(), Some("InvalidArgs"));
    }

    #[test]
    fn stats_summarises() {
        let out = invoke(stats, r#"{"values": [3, 1, 2]}"#, "{}");
        let expected = json!({"count": 3, "sum": 6.0, "mean": 2.0, "min": 1.0, "max": 3.0});
        assert_eq!(out.value(), Ok(expected));
        let out = invoke(stats, r#"{"values": [1e308, 1e308]}"#, "{}");
        assert_eq!(out.error.map(|e| e.class).as_deref(), Some("OverflowError"));
        let out = invoke(stats, r#"{"values": []}"#, "{}");
        assert_eq!(out.error.map(|e| e.class).as_deref(), Some("InvalidArgs"));
    }

    #[test]
    fn panic_is_a_trap() {
        let err = invoke(panic, "{}", "{}").error;
        let expected = Error::new("GuestTrap", "calc panicked on purpose");
        assert_eq!(err, Some(expected));
    }
}
