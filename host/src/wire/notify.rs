//! Notifications (§4): the message oslo's `Notifier._notify` builds, plus the Python
//! `str(datetime)` timestamp it carries.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{encode, new_id, serialize_context};

struct Notification<'a> {
    message_id: &'a str,
    publisher_id: &'a str,
    event_type: &'a str,
    priority: &'a str,
    payload: &'a RawValue,
    timestamp: &'a str,
    unique_id: &'a str,
    context: &'a Map<String, Value>,
}

impl Serialize for Notification<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("message_id", self.message_id)?;
        map.serialize_entry("publisher_id", self.publisher_id)?;
        map.serialize_entry("event_type", self.event_type)?;
        map.serialize_entry("priority", self.priority)?;
        map.serialize_entry("payload", self.payload)?;
        map.serialize_entry("timestamp", self.timestamp)?;
        map.serialize_entry("_unique_id", self.unique_id)?;
        serialize_context(&mut map, self.context)?;
        map.end()
    }
}

/// Encodes a notification: `message_id` is a dashed uuid4 (`str(uuid4())`), `timestamp` is
/// now in UTC as [`format_timestamp`] writes it. `priority` is sent as given (`INFO`,
/// `WARN`, `ERROR`, …); the routing key is `<topic>.<priority in lower case>`. Set
/// `enveloped` for oslo's `messagingv2` driver, clear it for `messaging` and nova.
pub fn encode_notification(
    publisher_id: &str,
    event_type: &str,
    priority: &str,
    payload: &RawValue,
    context: &Map<String, Value>,
    enveloped: bool,
) -> Vec<u8> {
    let notification = Notification {
        message_id: &super::new_uuid().hyphenated().to_string(),
        publisher_id,
        event_type,
        priority,
        payload,
        timestamp: &format_timestamp(SystemTime::now()),
        unique_id: &new_id(),
        context,
    };
    encode(&notification, enveloped, payload.get().len())
}

/// Formats a UTC time as Python's `str(datetime)`: `YYYY-MM-DD HH:MM:SS.ffffff`, without
/// the fraction when it is exactly zero, as Python omits it too. Times before 1970 are
/// clamped to the epoch.
pub fn format_timestamp(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let micros = since_epoch.subsec_micros();
    let (year, month, day) = civil_from_days(seconds / 86_400);
    let of_day = seconds % 86_400;
    let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    let date = format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}");
    if micros == 0 {
        date
    } else {
        format!("{date}.{micros:06}")
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date, after Howard Hinnant's
/// `civil_from_days`, restricted to non-negative days so it needs no signed arithmetic.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of each year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}
