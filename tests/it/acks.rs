//! Ack coalescing (`host/src/amqp/acks.rs`) against the real broker: acks of a channel's
//! deliveries share `basic.ack(multiple)` frames, and such a frame must never cover a delivery
//! that is still being handled, was abandoned, or was rejected. What the broker redelivers after
//! the channel closes tells which deliveries it holds as acked.

use std::time::Duration;

use warren::amqp::{Channel, Connection, Consumer, Delivery, PublishOptions, QueueSpec};

use crate::support::{broker_url, unique};

const LIMIT: Duration = Duration::from_secs(10);

/// A connection with an exclusive queue (gone with the connection) holding `bodies`.
async fn queue_with(bodies: &[String]) -> (Connection, String) {
    let conn = Connection::open(&broker_url(), "it-acks", 10)
        .await
        .expect("connect");
    let queue = unique("it_acks");
    let channel = conn.channel().await.expect("channel");
    let spec = QueueSpec {
        exclusive: true,
        ..QueueSpec::default()
    };
    channel.declare_queue(&queue, &spec).await.expect("declare");
    let publisher = channel.into_publisher().await.expect("confirms");
    for body in bodies {
        publisher
            .publish("", &queue, body.as_bytes(), &PublishOptions::default())
            .await
            .expect("publish");
    }
    (conn, queue)
}

/// A consumer on a fresh channel with Warren's default prefetch (so acks batch by 16).
async fn consume(conn: &Connection, queue: &str) -> (Channel, Consumer) {
    let channel = conn.channel().await.expect("channel");
    channel.prefetch(64).await.expect("prefetch");
    let consumer = channel
        .consume(queue, &unique("it_acks_c"))
        .await
        .expect("consume");
    (channel, consumer)
}

async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(LIMIT, consumer.next())
        .await
        .expect("a delivery in time")
        .expect("consumer open")
        .expect("delivery")
}

fn body(delivery: &Delivery) -> String {
    String::from_utf8_lossy(delivery.body()).into_owned()
}

/// Close `channel`, then consume `queue` again after publishing a sentinel: the bodies the
/// broker redelivers, in order, before the sentinel.
async fn redelivered_after_close(conn: &Connection, queue: &str, channel: Channel) -> Vec<String> {
    channel.close().await;
    let publisher = conn
        .channel()
        .await
        .expect("channel")
        .into_publisher()
        .await
        .expect("confirms");
    publisher
        .publish("", queue, b"sentinel", &PublishOptions::default())
        .await
        .expect("publish sentinel");
    let (_channel, mut consumer) = consume(conn, queue).await;
    let mut again = Vec::new();
    loop {
        let delivery = next(&mut consumer).await;
        let text = body(&delivery);
        if text == "sentinel" {
            return again;
        }
        assert!(delivery.redelivered(), "{text} came back as a redelivery");
        again.push(text);
    }
}

fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| i.to_string()).collect()
}

#[test]
fn every_ack_of_a_burst_reaches_the_broker() {
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let (conn, queue) = queue_with(&numbered(200)).await;
        let (channel, mut consumer) = consume(&conn, &queue).await;
        // Acked concurrently as they arrive, finishing in whatever order the tasks run: runs of
        // 16 go out as one frame, the rest after lingering.
        let mut acks = Vec::new();
        for _ in 0..200 {
            let delivery = next(&mut consumer).await;
            acks.push(tokio::spawn(async move { delivery.ack().await }));
        }
        for ack in acks {
            let acked = ack.await.expect("ack task");
            assert!(matches!(acked, Ok(true)), "ack sent: {acked:?}");
        }
        let again = redelivered_after_close(&conn, &queue, channel).await;
        assert!(
            again.is_empty(),
            "every delivery was acked, yet {again:?} came back"
        );
    });
}

/// Ack `deliveries` concurrently; each must report its frame sent.
async fn ack_all(deliveries: Vec<Delivery>) {
    let acks = deliveries.into_iter().map(|delivery| {
        tokio::spawn(async move {
            let acked = delivery.ack().await;
            (body(&delivery), acked)
        })
    });
    for ack in futures_util::future::join_all(acks).await {
        let (text, acked) = ack.expect("ack task");
        assert!(matches!(acked, Ok(true)), "ack of {text} sent: {acked:?}");
    }
}

#[test]
fn acks_never_cover_a_delivery_still_being_handled_rejected_or_abandoned() {
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let (conn, queue) = queue_with(&numbered(40)).await;
        let (channel, mut consumer) = consume(&conn, &queue).await;
        let mut deliveries = Vec::new();
        for _ in 0..40 {
            deliveries.push(next(&mut consumer).await);
        }
        let mut rest = deliveries.split_off(20);
        // 0..19 first: the floor moves up through frames covering runs of them.
        ack_all(deliveries).await;
        // Above it: 30 is still being handled, 35 is dropped unsettled, and 25 is rejected
        // with requeue (the broker puts it back at once; it is left in the consumer's buffer,
        // not pulled). Everything else is acked in reverse, so the frames that cover the
        // rest must stop below each of them.
        let abandoned = rest.remove(15);
        assert_eq!(body(&abandoned), "35");
        drop(abandoned);
        let held = rest.remove(10);
        assert_eq!(body(&held), "30");
        let rejected = rest.remove(5);
        assert_eq!(body(&rejected), "25");
        assert!(matches!(rejected.reject(true).await, Ok(true)));
        assert!(
            matches!(rejected.ack().await, Ok(false)),
            "a settled delivery is not settled again"
        );
        rest.reverse();
        ack_all(rest).await;
        let mut again = redelivered_after_close(&conn, &queue, channel).await;
        again.sort_by_key(|s| s.parse::<u32>().unwrap_or(u32::MAX));
        assert_eq!(
            again,
            ["25", "30", "35"],
            "exactly the unsettled deliveries come back"
        );
        drop(held);
    });
}

#[test]
fn a_finished_delivery_is_acked_within_its_linger_while_an_earlier_one_runs_on() {
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let (conn, queue) = queue_with(&numbered(2)).await;
        let (channel, mut consumer) = consume(&conn, &queue).await;
        let slow = next(&mut consumer).await;
        let quick = next(&mut consumer).await;
        // The ack of 1 cannot share a frame with 0's (0 is not done), and must not wait for it.
        let acked = tokio::time::timeout(Duration::from_secs(2), quick.ack())
            .await
            .expect("acked without waiting for the earlier delivery");
        assert!(matches!(acked, Ok(true)), "{acked:?}");
        let again = redelivered_after_close(&conn, &queue, channel).await;
        assert_eq!(again, ["0"], "only the unfinished delivery comes back");
        drop(slow);
    });
}
