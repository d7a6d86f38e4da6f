//! A Jepsen-style audit (after rabbitmq/jepsen's checker): publishers send uniquely numbered
//! requests to the `receipt` plugin with publisher confirms and remember which the broker
//! confirmed; the plugin's receipts file records which ran, and how often. The verdict:
//!
//! * **lost**: confirmed, never handled (must be none: the promise is at-least-once);
//! * **duplicated**: handled more than once (allowed, at-least-once; reported);
//! * **recovered**: published without a confirm (the connection died first), handled anyway;
//! * **unexpected**: handled but never published (must be none).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use serde_json::Map;
use serde_json::value::RawValue;
use warren::wire::{self, OutgoingRequest};

/// One numbered request for the `receipt` plugin.
#[derive(Debug, Clone)]
pub struct Msg {
    /// The number the plugin records.
    pub id: u64,
    /// A call (with a reply queue) rather than a cast.
    pub call: bool,
    /// How long the handler spins before recording.
    pub spin_ms: u64,
    /// Method: `record`, or `poison` for a request that traps.
    pub method: &'static str,
}

impl Msg {
    /// A `record` cast.
    pub fn cast(id: u64, spin_ms: u64) -> Msg {
        Msg {
            id,
            call: false,
            spin_ms,
            method: "record",
        }
    }

    /// A `record` call.
    pub fn call(id: u64, spin_ms: u64) -> Msg {
        Msg {
            call: true,
            ..Msg::cast(id, spin_ms)
        }
    }

    /// `count` requests from `first` on, every `call_every`-th a call (0: all casts).
    pub fn batch(first: u64, count: u64, call_every: u64, spin_ms: u64) -> Vec<Msg> {
        (first..first + count)
            .map(|id| {
                if call_every > 0 && id % call_every == 0 {
                    Msg::call(id, spin_ms)
                } else {
                    Msg::cast(id, spin_ms)
                }
            })
            .collect()
    }
}

/// What a publisher knows at the end.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Ids the broker confirmed (`basic.ack`, routed).
    pub confirmed: BTreeSet<u64>,
    /// Ids published at least once (confirmed or not).
    pub attempted: BTreeSet<u64>,
    /// Ids sent as calls.
    pub calls: BTreeSet<u64>,
    /// Ids sent as `poison` (never recorded by the plugin).
    pub poison: BTreeSet<u64>,
    /// Publishes whose outcome was unknown (connection lost) or refused, retried.
    pub retries: usize,
    /// Reconnections of the publisher.
    pub reconnects: usize,
}

impl Ledger {
    /// Merge another publisher's ledger in.
    pub fn merge(&mut self, other: Ledger) {
        self.confirmed.extend(other.confirmed);
        self.attempted.extend(other.attempted);
        self.calls.extend(other.calls);
        self.poison.extend(other.poison);
        self.retries += other.retries;
        self.reconnects += other.reconnects;
    }

    /// Confirmed `record` requests: the ones that must show up in the receipts.
    pub fn must_handle(&self) -> BTreeSet<u64> {
        self.confirmed.difference(&self.poison).copied().collect()
    }
}

/// A reply a publisher received for one of its calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The result's JSON text.
    Ok(String),
    /// The remote error's class.
    Failed(String),
}

struct Link {
    conn: Connection,
    channel: lapin::Channel,
}

/// A confirming publisher of [`Msg`]s, with its own connection straight to a broker (not through
/// a relay: the faults are injected between the daemon and the broker). It reconnects and
/// re-publishes whatever was not confirmed, so every message ends up confirmed unless the
/// deadline passes. Calls carry a reply queue of its own, consumed in the background.
pub struct Publisher {
    rt: tokio::runtime::Runtime,
    url: String,
    exchange: String,
    key: String,
    reply_q: String,
    /// `_msg_id` → id, and `_unique_id` per id (a re-publish reuses both).
    ids: HashMap<u64, (String, String)>,
    msg_ids: Arc<Mutex<HashMap<String, u64>>>,
    answers: Arc<Mutex<BTreeMap<u64, Vec<Answer>>>>,
    link: Option<Link>,
    /// What it did.
    pub ledger: Ledger,
}

impl Publisher {
    /// A publisher of requests to `key` on `exchange` at `url`; it connects on first use.
    pub fn new(url: &str, exchange: &str, key: &str) -> Publisher {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        Publisher {
            rt,
            url: url.to_owned(),
            exchange: exchange.to_owned(),
            key: key.to_owned(),
            reply_q: format!("reply_{}", wire::new_id()),
            ids: HashMap::new(),
            msg_ids: Arc::default(),
            answers: Arc::default(),
            link: None,
            ledger: Ledger::default(),
        }
    }

    /// The reply queue its calls name.
    pub fn reply_queue(&self) -> &str {
        &self.reply_q
    }

    /// Replies received so far, by id (more than one if the call ran more than once).
    pub fn answers(&self) -> BTreeMap<u64, Vec<Answer>> {
        self.answers.lock().expect("answers lock").clone()
    }

    async fn connect(
        url: &str,
        reply_q: &str,
        msg_ids: Arc<Mutex<HashMap<String, u64>>>,
        answers: Arc<Mutex<BTreeMap<u64, Vec<Answer>>>>,
    ) -> lapin::Result<Link> {
        let props = ConnectionProperties::default().with_connection_name("warren-audit".into());
        let conn = Connection::connect(url, props).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        // The reply queue is exclusive: it goes with the connection and is declared again on
        // the next one (a broker restart has removed it by then).
        let replies = conn.create_channel().await?;
        replies
            .queue_declare(
                reply_q.into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut consumer = replies
            .basic_consume(
                reply_q.into(),
                "audit-replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        tokio::spawn(async move {
            let _replies = replies;
            while let Some(Ok(delivery)) = consumer.next().await {
                let Ok(reply) = wire::decode_reply(&delivery.data) else {
                    continue;
                };
                if reply.is_heartbeat() {
                    continue;
                }
                let id = reply
                    .msg_id
                    .as_ref()
                    .and_then(|m| msg_ids.lock().expect("ids lock").get(m).copied());
                let Some(id) = id else { continue };
                let answer = match (&reply.failure, &reply.result) {
                    (Some(f), _) => Answer::Failed(f.class.clone()),
                    (None, Some(r)) => Answer::Ok(r.get().to_owned()),
                    (None, None) => Answer::Ok("null".into()),
                };
                answers
                    .lock()
                    .expect("answers lock")
                    .entry(id)
                    .or_default()
                    .push(answer);
            }
        });
        Ok(Link { conn, channel })
    }

    fn body(&mut self, msg: &Msg) -> Vec<u8> {
        let (msg_id, unique_id) = self
            .ids
            .entry(msg.id)
            .or_insert_with(|| (wire::new_id(), wire::new_id()))
            .clone();
        let args = if msg.method == "poison" {
            format!(r#"{{"id": {}}}"#, msg.id)
        } else {
            format!(r#"{{"id": {}, "spin_ms": {}}}"#, msg.id, msg.spin_ms)
        };
        let args = RawValue::from_string(args).expect("JSON args");
        let context = Map::new();
        if msg.call {
            self.msg_ids
                .lock()
                .expect("ids lock")
                .insert(msg_id.clone(), msg.id);
        }
        wire::encode_request(
            &OutgoingRequest {
                method: msg.method,
                args: &args,
                context: &context,
                msg_id: msg.call.then_some(msg_id.as_str()),
                reply_q: msg.call.then_some(self.reply_q.as_str()),
                timeout: None,
                version: None,
                namespace: None,
            },
            &unique_id,
        )
    }

    /// Publish `msgs` (pipelined `window` at a time), retrying whatever is not confirmed through
    /// reconnections until every one is confirmed; panics past `deadline`.
    pub fn publish(&mut self, msgs: Vec<Msg>, window: usize, deadline: Instant) {
        let mut pending: VecDeque<(Msg, Vec<u8>)> = VecDeque::with_capacity(msgs.len());
        for msg in msgs {
            if msg.call {
                self.ledger.calls.insert(msg.id);
            }
            if msg.method == "poison" {
                self.ledger.poison.insert(msg.id);
            }
            let body = self.body(&msg);
            pending.push_back((msg, body));
        }
        let mut backoff = Duration::from_millis(50);
        while !pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "publisher: {} messages still unconfirmed at the deadline ({} confirmed, {} \
                 reconnects)",
                pending.len(),
                self.ledger.confirmed.len(),
                self.ledger.reconnects
            );
            if self.link.is_none() {
                let connected = self.rt.block_on(Self::connect(
                    &self.url,
                    &self.reply_q,
                    self.msg_ids.clone(),
                    self.answers.clone(),
                ));
                match connected {
                    Ok(link) => {
                        self.link = Some(link);
                        backoff = Duration::from_millis(50);
                    }
                    Err(_) => {
                        // The broker is away (restarting): back off, bounded by the deadline.
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        self.ledger.reconnects += 1;
                        continue;
                    }
                }
            }
            let n = pending.len().min(window);
            let batch: Vec<(Msg, Vec<u8>)> = pending.drain(..n).collect();
            let channel = self.link.as_ref().expect("connected").channel.clone();
            let (exchange, key) = (self.exchange.clone(), self.key.clone());
            let outcomes: Vec<bool> = self.rt.block_on(async {
                let mut confirms = Vec::with_capacity(batch.len());
                for (_, body) in &batch {
                    let props = BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2);
                    let published = channel
                        .basic_publish(
                            exchange.as_str().into(),
                            key.as_str().into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..Default::default()
                            },
                            body,
                            props,
                        )
                        .await;
                    confirms.push(published.ok());
                }
                let mut outcomes = Vec::with_capacity(confirms.len());
                for confirm in confirms {
                    let ok = match confirm {
                        Some(c) => matches!(
                            tokio::time::timeout(Duration::from_secs(30), c).await,
                            Ok(Ok(Confirmation::Ack(None)))
                        ),
                        None => false,
                    };
                    outcomes.push(ok);
                }
                outcomes
            });
            let mut failed = false;
            for ((msg, body), ok) in batch.into_iter().zip(outcomes).rev() {
                self.ledger.attempted.insert(msg.id);
                if ok {
                    self.ledger.confirmed.insert(msg.id);
                } else {
                    failed = true;
                    self.ledger.retries += 1;
                    pending.push_front((msg, body));
                }
            }
            if failed {
                // Unknown outcome (or refused / unroutable): start over on a fresh connection.
                if let Some(link) = self.link.take() {
                    let _ = self.rt.block_on(link.conn.close(200, "retry".into()));
                }
                self.ledger.reconnects += 1;
            }
        }
    }

    /// Close the connection (the reply queue goes with it).
    pub fn close(&mut self) {
        if let Some(link) = self.link.take() {
            let _ = self.rt.block_on(link.conn.close(200, "done".into()));
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.close();
    }
}

/// The receipts directory the `receipt` plugin writes to (granted as `/receipts`).
pub struct Receipts {
    dir: tempfile::TempDir,
}

impl Default for Receipts {
    fn default() -> Self {
        Self::new()
    }
}

impl Receipts {
    /// A fresh, empty receipts directory.
    pub fn new() -> Receipts {
        let dir = tempfile::Builder::new()
            .prefix("warren-receipts-")
            .tempdir()
            .expect("tempdir");
        Receipts { dir }
    }

    /// The host directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// The handler keys that grant the directory to the plugin.
    pub fn grant(&self) -> String {
        format!(
            "dirs = [{{ host = \"{}\", guest = \"/receipts\", writable = true }}]",
            self.dir().display()
        )
    }

    /// How often each id was recorded. A line without its newline is still being written
    /// (not possible with one O_APPEND write, but harmless to skip).
    pub fn counts(&self) -> BTreeMap<u64, usize> {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let mut counts = BTreeMap::new();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        for line in complete.lines() {
            let id: u64 = line
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("a receipt line that is not a number: {line:?}"));
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    /// Distinct ids recorded so far.
    pub fn distinct(&self) -> usize {
        self.counts().len()
    }

    /// Lines recorded so far (cheap: counts newlines).
    pub fn lines(&self) -> usize {
        std::fs::read(self.log()).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
    }

    /// Wait (polling every `every`, at most `limit`) until every id `ledger` must see handled
    /// is recorded, then return the audit. Past the limit it returns the audit as it stands, with
    /// the missing ids as lost.
    pub fn wait_audit(&self, ledger: &Ledger, limit: Duration, every: Duration) -> Report {
        let start = Instant::now();
        let must = ledger.must_handle();
        loop {
            let counts = self.counts();
            let done = must.iter().all(|id| counts.contains_key(id));
            if done || start.elapsed() > limit {
                let mut report = Report::new(ledger, &counts);
                report.waited = start.elapsed();
                return report;
            }
            std::thread::sleep(every);
        }
    }
}

/// The verdict of an audit.
#[derive(Debug, Default)]
pub struct Report {
    /// Published (at least attempted), confirmed, and distinct ids handled.
    pub attempted: usize,
    pub confirmed: usize,
    pub handled: usize,
    /// Confirmed but never handled.
    pub lost: Vec<u64>,
    /// Handled more than once: id → times.
    pub duplicated: BTreeMap<u64, usize>,
    /// Not confirmed, handled anyway.
    pub recovered: Vec<u64>,
    /// Handled but never published (or a poison request that ran).
    pub unexpected: Vec<u64>,
    /// How long the final wait took.
    pub waited: Duration,
}

impl Report {
    /// Compare a ledger with the receipts.
    pub fn new(ledger: &Ledger, counts: &BTreeMap<u64, usize>) -> Report {
        let must = ledger.must_handle();
        Report {
            attempted: ledger.attempted.len(),
            confirmed: ledger.confirmed.len(),
            handled: counts.len(),
            lost: must
                .iter()
                .filter(|id| !counts.contains_key(id))
                .copied()
                .collect(),
            duplicated: counts
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(id, n)| (*id, *n))
                .collect(),
            recovered: counts
                .keys()
                .filter(|id| ledger.attempted.contains(id) && !ledger.confirmed.contains(id))
                .copied()
                .collect(),
            unexpected: counts
                .keys()
                .filter(|id| !ledger.attempted.contains(id) || ledger.poison.contains(id))
                .copied()
                .collect(),
            waited: Duration::ZERO,
        }
    }

    /// Panic (with the report) unless nothing was lost and nothing unexpected ran.
    pub fn assert_clean(&self, context: &str) {
        assert!(
            self.lost.is_empty() && self.unexpected.is_empty(),
            "audit failed: {self}\n{context}"
        );
    }
}

fn sample(ids: impl IntoIterator<Item = u64>) -> String {
    let ids: Vec<String> = ids.into_iter().take(20).map(|i| i.to_string()).collect();
    ids.join(",")
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "attempted={} confirmed={} handled={} lost={} [{}] duplicated={} [{}] recovered={} \
             unexpected={} [{}] (final wait {:?})",
            self.attempted,
            self.confirmed,
            self.handled,
            self.lost.len(),
            sample(self.lost.iter().copied()),
            self.duplicated.len(),
            sample(self.duplicated.keys().copied()),
            self.recovered.len(),
            self.unexpected.len(),
            sample(self.unexpected.iter().copied()),
            self.waited,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_classifies_lost_duplicated_recovered_and_unexpected() {
        let mut ledger = Ledger::default();
        ledger.attempted.extend([1, 2, 3, 4, 5]);
        ledger.confirmed.extend([1, 2, 3, 5]);
        ledger.poison.insert(5);
        let counts: BTreeMap<u64, usize> = [(1, 1), (2, 3), (4, 1), (9, 1)].into();
        let r = Report::new(&ledger, &counts);
        assert_eq!(r.lost, [3]);
        assert_eq!(r.duplicated, BTreeMap::from([(2, 3)]));
        assert_eq!(r.recovered, [4]);
        assert_eq!(r.unexpected, [9]);
        assert_eq!((r.attempted, r.confirmed, r.handled), (5, 4, 4));
    }

    #[test]
    fn receipts_count_complete_lines_only() {
        let receipts = Receipts::new();
        std::fs::write(receipts.log(), "1\n2\n2\n3").expect("write");
        assert_eq!(receipts.counts(), BTreeMap::from([(1, 1), (2, 2)]));
        assert_eq!(receipts.lines(), 3);
    }

    #[test]
    fn batches_mix_calls_and_casts() {
        let msgs = Msg::batch(10, 6, 3, 7);
        let calls: Vec<u64> = msgs.iter().filter(|m| m.call).map(|m| m.id).collect();
        assert_eq!(calls, [12, 15]);
        assert!(msgs.iter().all(|m| m.spin_ms == 7 && m.method == "record"));
    }
}
