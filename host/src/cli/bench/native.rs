//! The native baseline: the least a server can do to answer `echo` over the oslo wire format,
//! written straight on lapin with no Wasm, no registry and no dispatcher. It is the
//! broker-bound limit Warren is measured against, so it keeps Warren's delivery guarantees
//! and nothing else:
//!
//! - its own consume and publish connections, as a Warren session has;
//! - `basic.qos` prefetch per consumer (Warren's default, 64), manual acks;
//! - one task per delivery, as Warren spawns one;
//! - the request decoded and the reply encoded with Warren's codec (`crate::wire`), so the
//!   reply is byte-for-byte the shape oslo callers accept;
//! - the reply published `mandatory` and non-persistent to the default exchange on a channel
//!   in confirm mode, and the request acked only once the broker confirmed the reply.
//!
//! It answers only modern oslo callers (the `_timeout` key, one reply per call), which is
//! what the load generator sends. Bench-only code: it is not part of the daemon, and it uses
//! lapin directly on purpose (ARCHITECTURE.md keeps lapin inside `amqp.rs` for the daemon).

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, ConnectionProperties, ExchangeKind};
use serde::Deserialize;
use serde_json::value::RawValue;

use warren::wire;

/// `echo`'s arguments: the value is copied through without being parsed into a tree.
#[derive(Deserialize)]
struct EchoArgs<'a> {
    #[serde(borrow)]
    value: Option<&'a RawValue>,
}

/// Serve `echo` on `topic` until SIGINT or SIGTERM. Prints `READY` on stdout once consuming.
pub async fn serve(url: &str, exchange: &str, topic: &str, prefetch: u16) -> anyhow::Result<()> {
    let props =
        || ConnectionProperties::default().with_connection_name("warren-bench-native".into());
    let consume = lapin::Connection::connect(url, props()).await?;
    let publish = lapin::Connection::connect(url, props()).await?;

    let channel = consume.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await?;
    // The same flags Warren and oslo.messaging use by default (non-durable, not auto-deleted).
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            topic.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            topic.into(),
            exchange.into(),
            topic.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let replies = publish.create_channel().await?;
    replies
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            topic.into(),
            format!("native-{topic}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    println!("READY");

    let stop = super::peers::stop_signal();
    tokio::pin!(stop);
    loop {
        let delivery = tokio::select! {
            _ = &mut stop => break,
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => break,
            },
        };
        tokio::spawn(handle(delivery, replies.clone()));
    }
    let _ = consume.close(200, "bye".into()).await;
    let _ = publish.close(200, "bye".into()).await;
    Ok(())
}

async fn handle(delivery: lapin::message::Delivery, replies: lapin::Channel) {
    let request = match wire::decode_request(&delivery.data) {
        Ok(r) => r,
        Err(_) => {
            let _ = delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await;
            return;
        }
    };
    let (Some(msg_id), Some(key)) = (request.msg_id.as_deref(), request.reply_routing_key()) else {
        // A cast: nothing to answer.
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        return;
    };
    let value = serde_json::from_str::<EchoArgs>(request.args.get())
        .ok()
        .and_then(|a| a.value);
    let body = wire::encode_oslo_reply(msg_id, value, None, true, request.enveloped);
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(1);
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirmed = match replies
        .basic_publish("".into(), key.into(), options, &body, props)
        .await
    {
        Ok(confirm) => matches!(confirm.await, Ok(Confirmation::Ack(_))),
        Err(_) => false,
    };
    if confirmed {
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
    } else {
        let _ = delivery
            .acker
            .reject(BasicRejectOptions { requeue: true })
            .await;
    }
}
