//! Log output. [`JsonSpanFields`] formats span fields for `WARREN_LOG_FORMAT=json`;
//! [`lazy`] makes a delivery's span only when something is logged in it.

pub mod lazy;

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
        // Built on the stack and handed over in one piece: the span's buffer starts empty, and
        // growing it field by field reallocated it five or six times per delivery.
        let mut object = StackText::new();
        let mut visitor = ObjectWriter::new(&mut object, false);
        fields.record(&mut visitor);
        visitor.finish()?;
        writer.write_str(object.as_str())
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

/// Text written into a fixed buffer on the stack, moved to the heap only if it outgrows it.
struct StackText {
    buf: [u8; StackText::CAPACITY],
    len: usize,
    spilled: Option<String>,
}

impl StackText {
    /// Enough for a delivery span's fields with oslo's 32-character ids.
    const CAPACITY: usize = 384;

    fn new() -> Self {
        Self {
            buf: [0; Self::CAPACITY],
            len: 0,
            spilled: None,
        }
    }

    fn as_str(&self) -> &str {
        match &self.spilled {
            Some(text) => text,
            // SAFETY: only whole `&str`s are ever copied in (`write_str`), so the filled prefix
            // is UTF-8; checking it again cost as much as escaping it.
            None => unsafe { std::str::from_utf8_unchecked(&self.buf[..self.len]) },
        }
    }
}

impl fmt::Write for StackText {
    #[inline]
    fn write_char(&mut self, c: char) -> fmt::Result {
        match u8::try_from(c) {
            Ok(byte) if byte.is_ascii() && self.spilled.is_none() && self.len < Self::CAPACITY => {
                self.buf[self.len] = byte;
                self.len += 1;
                Ok(())
            }
            _ => self.write_str(c.encode_utf8(&mut [0; 4])),
        }
    }

    #[inline]
    fn write_str(&mut self, text: &str) -> fmt::Result {
        if let Some(spilled) = &mut self.spilled {
            spilled.push_str(text);
            return Ok(());
        }
        let end = self.len + text.len();
        if end <= Self::CAPACITY {
            self.buf[self.len..end].copy_from_slice(text.as_bytes());
            self.len = end;
        } else {
            let mut spilled = String::with_capacity(end * 2);
            spilled.push_str(self.as_str());
            spilled.push_str(text);
            self.spilled = Some(spilled);
        }
        Ok(())
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
        self.member(field, |out| {
            if value < 0 {
                out.write_char('-')?;
            }
            write_u64(out, value.unsigned_abs())
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |out| write_u64(out, value));
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

/// Write `value` in decimal (what `{value}` writes, without the formatting machinery).
fn write_u64(out: &mut impl fmt::Write, mut value: u64) -> fmt::Result {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.write_str(std::str::from_utf8(&digits[start..]).unwrap_or_default())
}

/// Write `text` as a JSON string literal.
fn write_str(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(text)?;
    out.write_char('"')
}

/// Bytes that cannot appear as themselves in a JSON string: `"`, `\` and the controls.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Whether any of the eight bytes in `word` is in [`NEEDS_ESCAPE`]: a control (below 0x20),
/// `"` or `\`. Exact for the word as a whole: the borrows that make these tests report a byte
/// wrongly come only from a lower byte that did match.
fn word_needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH;
    let control = below(word, 0x20);
    let quote = below(word ^ (ONES * u64::from(b'"')), 1);
    let backslash = below(word ^ (ONES * u64::from(b'\\')), 1);
    control | quote | backslash != 0
}

/// Escapes what it is given into the body of a JSON string literal.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let bytes = text.as_bytes();
        let mut clean_from = 0;
        // Whole words of eight bytes that need no escape are skipped at once (ids and names
        // are most of a span's fields); any other word is looked at byte by byte.
        let mut start = 0;
        while start + 8 <= bytes.len() {
            let mut word = [0; 8];
            word.copy_from_slice(&bytes[start..start + 8]);
            if !word_needs_escape(u64::from_le_bytes(word)) {
                start += 8;
                continue;
            }
            break;
        }
        for (i, &byte) in bytes.iter().enumerate().skip(start) {
            if !NEEDS_ESCAPE[usize::from(byte)] {
                continue;
            }
            // Escaped bytes are ASCII, so `i` is on a char boundary.
            self.0.write_str(&text[clean_from..i])?;
            match byte {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                b'\n' => self.0.write_str("\\n")?,
                b'\r' => self.0.write_str("\\r")?,
                b'\t' => self.0.write_str("\\t")?,
                _ => write!(self.0, "\\u{byte:04x}")?,
            }
            clean_from = i + 1;
        }
        self.0.write_str(&text[clean_from..])
    }
}

/// A log writer for tests: everything written, kept in memory.
#[cfg(test)]
pub(crate) mod capture {
    use std::io;
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing_subscriber::fmt::MakeWriter;

    /// Collects what a subscriber writes; clones share the bytes.
    #[derive(Clone, Default)]
    pub(crate) struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Buffer {
        /// Everything written so far, as text.
        pub(crate) fn text(&self) -> String {
            let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(bytes);
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
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly by design")]

    use proptest::prelude::*;
    use serde_json::Value;
    use tracing_subscriber::fmt::format::JsonFields;

    use super::capture::Buffer;
    use super::*;

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
        buffer
            .text()
            .lines()
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

    #[test]
    fn fields_longer_than_the_stack_buffer_are_all_kept() {
        let long = "ü\"x".repeat(StackText::CAPACITY);
        let (theirs, ours) = both(|| {
            let span = tracing::info_span!("s", before = 1u64, text = long.as_str(), after = -2i64);
            span.in_scope(|| tracing::info!("x"));
        });
        assert_eq!(ours, theirs);
        assert_eq!(ours[0]["span"]["text"], Value::from(long.clone()));
        assert_eq!(ours[0]["span"]["after"], -2);
    }

    #[test]
    fn integers_are_written_as_display_writes_them() {
        for n in [0, 7, 10, 99, 100, u64::MAX] {
            let mut out = String::new();
            write_u64(&mut out, n).unwrap();
            assert_eq!(out, n.to_string());
        }
    }

    #[test]
    fn a_word_needs_escaping_exactly_when_one_of_its_bytes_does() {
        // Every byte value at every position, among clean neighbours and among bytes that
        // themselves need escaping.
        for fill in [b'a', 0xff, b'"', 0x1f] {
            for position in 0..8 {
                for byte in 0..=255u8 {
                    let mut word = [fill; 8];
                    word[position] = byte;
                    let expected = word.iter().any(|&b| NEEDS_ESCAPE[usize::from(b)]);
                    assert_eq!(
                        word_needs_escape(u64::from_le_bytes(word)),
                        expected,
                        "{word:?}"
                    );
                }
            }
        }
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
