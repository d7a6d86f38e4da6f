//! The daemon's side of outbound RPC: sends what guests ask for (already checked against their
//! grants by [`crate::runtime::outbound`]) through one lazily connected [`Client`].
//!
//! A guest waiting for a reply gives its invocation slot back for the wait and takes one again
//! before it resumes: waiting costs no CPU, and a chain of handler-to-handler calls (a handler
//! calling itself, two calling each other) must not hold every slot while the calls it waits
//! for queue behind it. What bounds the waiting invocations is each handler's prefetch (their
//! deliveries stay unacked), the call depth limit and the invocation's own time limit.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::amqp::Tls;
use crate::client::{CallError, Client, Notification, Target};
use crate::runtime::outbound::{Kind, Message, Outbound, classes};
use crate::runtime::{Failure, class};

/// Sends guests' outbound messages. One per daemon; connects on first use.
pub struct Sender {
    client: Client,
    /// This server's name, for notifications' `publisher_id` (`<topic>.<server>`).
    server: String,
    handle: Handle,
}

impl Sender {
    /// A sender for the broker at `url`; nothing connects until a guest sends something.
    pub fn new(url: &str, exchange: &str, tls: &Tls, server: &str, handle: Handle) -> Self {
        Self {
            client: Client::lazy(url, exchange, tls),
            server: server.to_owned(),
            handle,
        }
    }

    /// Close the connection, if one was opened (at shutdown, after the drain).
    pub async fn close(&self) {
        self.client.disconnect().await;
    }

    async fn send(&self, m: &Message) -> Result<Option<Box<RawValue>>, CallError> {
        let target = Target {
            topic: m.topic.clone(),
            server: m.server.clone(),
        };
        match m.kind {
            Kind::Call => {
                let result = self
                    .client
                    .call(&target, &m.method, &m.args, &m.context, m.wait)
                    .await?;
                Ok(Some(result))
            }
            Kind::Cast => {
                self.client
                    .cast(&target, &m.method, &m.args, &m.context)
                    .await?;
                Ok(None)
            }
            Kind::FanoutCast => {
                self.client
                    .fanout_cast(&m.topic, &m.method, &m.args, &m.context)
                    .await?;
                Ok(None)
            }
            Kind::Notify => {
                let publisher_id = format!("{}.{}", m.from, self.server);
                self.client
                    .notify(&Notification {
                        publisher_id: &publisher_id,
                        event_type: &m.method,
                        priority: &m.priority,
                        topic: &m.topic,
                        payload: &m.args,
                        context: &m.context,
                    })
                    .await?;
                Ok(None)
            }
        }
    }
}

/// One invocation's view of the [`Sender`]: it holds the invocation's slot and lends it back
/// while the guest waits.
pub struct Invocation {
    sender: Arc<Sender>,
    slots: Arc<Semaphore>,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Invocation {
    /// The outbound side of an invocation that holds `permit` of `slots`.
    pub fn new(sender: Arc<Sender>, slots: Arc<Semaphore>, permit: OwnedSemaphorePermit) -> Self {
        Self {
            sender,
            slots,
            permit: Mutex::new(Some(permit)),
        }
    }
}

impl Outbound for Invocation {
    fn send(&self, m: Message) -> Result<Option<Box<RawValue>>, Failure> {
        if let Ok(mut permit) = self.permit.lock() {
            permit.take();
        }
        let sender = &self.sender;
        let sent = sender
            .handle
            .block_on(async { tokio::time::timeout(m.wait, sender.send(&m)).await });
        // Resume only with a slot again; a closed semaphore means shutdown, when the guest
        // may as well finish.
        let permit = sender
            .handle
            .block_on(self.slots.clone().acquire_owned())
            .ok();
        if let Ok(mut slot) = self.permit.lock() {
            *slot = permit;
        }
        let what = format!("{} to '{}'", m.kind.as_str(), m.topic);
        match sent {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => Err(failure(e, &what)),
            Err(_) => Err(timeout(&what, m.wait)),
        }
    }
}

fn timeout(what: &str, after: Duration) -> Failure {
    Failure::new(
        class::TIMEOUT,
        format!("{what} got no reply within {} ms", after.as_millis()),
    )
}

/// How a guest sees a failed send: a remote error keeps its class, message and data, so a
/// handler can pass it on with `?` and its caller sees the original error.
fn failure(e: CallError, what: &str) -> Failure {
    match e {
        CallError::Remote(remote) => Failure {
            data: remote.kwargs.get("data").cloned(),
            class: remote.class,
            message: remote.message,
        },
        CallError::Timeout { after, .. } => timeout(what, after),
        CallError::NoRoute { .. } => Failure::new(
            classes::UNAVAILABLE,
            format!("{what}: no server listens on that topic"),
        ),
        other => Failure::new(classes::UNAVAILABLE, format!("{what} failed: {other}")),
    }
}
