//! Log output. [`JsonSpanFields`] formats span fields for `WARREN_LOG_FORMAT=json`.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::{FormatFields, Writer};

/// Formats a span's fields as one JSON object, written directly into the span's buffer.
///
/// The daemon opens a span for every delivery, and the fmt layer formats its fields when the
/// span is created, whether or not a line is ever logged inside it. tracing-subscriber's
/// `JsonFields` does that by building a `BTreeMap` of `serde_json::Value`s (a `String` for
/// each text field) and serialising the map. That cost about 2 µs per delivery. This
/// formatter writes the same object without the intermediate values.
///
/// The JSON event formatter parses a span's fields to nest them in each line, so the output
/// must be exactly one JSON object. A field recorded again later is appended to it, and
/// parsing keeps the last value, as `JsonFields` does.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonSpanFields;

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = ObjectWriter::new(&mut writer, false);
        fields.record(&mut visitor);
        visitor.finish()
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        // `current` is empty or one object that this formatter wrote; reopen it.
        let opened = match current.fields.as_str() {
            "" => false,
            "{}" => {
                current.fields.clear();
                false
            }
            _ => {
                current.fields.pop();
                true
            }
        };
        let mut writer = current.as_writer();
        let mut visitor = ObjectWriter::new(&mut writer, opened);
        fields.record(&mut visitor);
        visitor.finish()
    }
}

/// Writes the fields of one record as members of a JSON object.
struct ObjectWriter<'a, W: fmt::Write> {
    out: &'a mut W,
    /// Whether `{` and at least one member have been written.
    opened: bool,
    result: fmt::Result,
}

impl<'a, W: fmt::Write> ObjectWriter<'a, W> {
    fn new(out: &'a mut W, opened: bool) -> Self {
        Self {
            out,
            opened,
            result: Ok(()),
        }
    }

    /// Write one member: `"name":` (after `{` or `,`), then the value by `write`. Fields a
    /// JSON line leaves out are skipped.
    fn member(&mut self, field: &Field, write: impl FnOnce(&mut W) -> fmt::Result) {
        let name = field.name();
        // Metadata of events bridged from the `log` crate, which the line already carries.
        if name.starts_with("log.") || self.result.is_err() {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let sep = if self.opened { ',' } else { '{' };
        self.opened = true;
        self.result = self
            .out
            .write_char(sep)
            .and_then(|()| write_str(self.out, name))
            .and_then(|()| self.out.write_char(':'))
            .and_then(|()| write(self.out));
    }

    fn finish(self) -> fmt::Result {
        self.result?;
        self.out.write_str(if self.opened { "}" } else { "{}" })
    }
}

impl<W: fmt::Write> Visit for ObjectWriter<'_, W> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity; serde_json writes them as null.
        self.member(field, |out| {
            if value.is_finite() {
                write!(out, "{value:?}")
            } else {
                out.write_str("null")
            }
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |out| write_str(out, value));
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        // As `JsonFields` has them: an array of numbers.
        self.member(field, |out| {
            out.write_char('[')?;
            for (i, byte) in value.iter().enumerate() {
                if i > 0 {
                    out.write_char(',')?;
                }
                write!(out, "{byte}")?;
            }
            out.write_char(']')
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |out| {
            out.write_char('"')?;
            write!(Escaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// Write `text` as a JSON string literal.
fn write_str(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(text)?;
    out.write_char('"')
}

/// Escapes what it is given into the body of a JSON string literal.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut clean_from = 0;
        for (i, byte) in text.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            // Escaped bytes are ASCII, so `i` is on a char boundary.
            self.0.write_str(&text[clean_from..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            clean_from = i + 1;
        }
        self.0.write_str(&text[clean_from..])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly by design")]

    use std::io;
    use std::sync::{Arc, Mutex};

    use proptest::prelude::*;
    use serde_json::Value;
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::fmt::format::JsonFields;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// The JSON lines `log` writes with span fields formatted by `fields`, timestamps removed.
    fn lines<N>(fields: N, log: impl FnOnce()) -> Vec<Value>
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .fmt_fields(fields)
            .with_writer(buffer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| {
                let mut v: Value = serde_json::from_str(line).unwrap();
                v.as_object_mut().unwrap().remove("timestamp");
                v
            })
            .collect()
    }

    /// What tracing-subscriber's own `JsonFields` writes, and what this formatter writes.
    fn both(log: impl Fn()) -> (Vec<Value>, Vec<Value>) {
        (lines(JsonFields::new(), &log), lines(JsonSpanFields, &log))
    }

    #[test]
    fn lines_are_the_same_as_with_json_fields() {
        let (theirs, ours) = both(|| {
            let topic = "echo \"quoted\"\n\ttabbed\u{1} ünïcode \\";
            let span = tracing::info_span!("delivery", topic = %topic, tag = 7u64,
                method = "echo", msg_id = Some("a1"), unique_id = None::<&str>,
                delta = -3i64, ok = true, ratio = 0.25f64, nan = f64::NAN,
                big = u128::MAX, bytes = &b"\x00ab"[..], debug = ?vec!["x", "y"],
                r#type = "raw", later = tracing::field::Empty);
            span.in_scope(|| tracing::info!(n = 1, "inside"));
            span.record("later", "recorded");
            span.record("tag", 8u64);
            span.in_scope(|| {
                tracing::info_span!("inner", depth = 2).in_scope(|| tracing::warn!("nested"));
            });
            let empty = tracing::info_span!("empty");
            empty.in_scope(|| tracing::info!("in a span without fields"));
            let filled = tracing::info_span!("filled", a = tracing::field::Empty);
            filled.record("a", "then set");
            filled.in_scope(|| tracing::info!("in a span filled later"));
        });
        assert_eq!(ours.len(), 4, "{ours:#?}");
        assert_eq!(ours, theirs);
        // And the fields are really there, with the recorded values.
        assert_eq!(ours[1]["spans"][0]["later"], "recorded");
        assert_eq!(ours[1]["span"]["depth"], 2);
        assert_eq!(ours[1]["spans"][0]["tag"], 8);
        assert_eq!(ours[0]["span"]["type"], "raw");
        assert_eq!(ours[0]["span"]["nan"], Value::Null);
    }

    proptest! {
        #[test]
        fn any_text_round_trips(text in any::<String>(), number in any::<i64>()) {
            let (theirs, ours) = both(|| {
                let span = tracing::info_span!("s", text = text.as_str(), shown = %text, number);
                span.in_scope(|| tracing::info!("x"));
            });
            prop_assert_eq!(&ours[0]["span"]["text"], &Value::from(text.clone()));
            prop_assert_eq!(&ours[0]["span"]["shown"], &Value::from(text.clone()));
            prop_assert_eq!(ours, theirs);
        }
    }
}
