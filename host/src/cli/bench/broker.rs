//! The two broker operations the bench needs and `amqp.rs` does not offer: a queue's depth (a
//! passive declare) and deleting the queues a run created. Bench-only, so it uses lapin
//! directly rather than widening the daemon's broker API.

use std::time::Duration;

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

/// One connection for queue depths and clean-up.
pub struct Admin {
    conn: Connection,
    channel: Channel,
}

impl Admin {
    /// Connect to `url`.
    pub async fn connect(url: &str) -> anyhow::Result<Admin> {
        let props =
            ConnectionProperties::default().with_connection_name("warren-bench-admin".into());
        let conn = tokio::time::timeout(Duration::from_secs(15), Connection::connect(url, props))
            .await
            .map_err(|_| anyhow::anyhow!("no answer from the broker at {url} within 15 s"))??;
        let channel = conn.create_channel().await?;
        Ok(Admin { conn, channel })
    }

    /// A failed passive declare or delete closes the channel; open another one.
    async fn channel(&mut self) -> anyhow::Result<&Channel> {
        if !self.channel.status().connected() {
            self.channel = self.conn.create_channel().await?;
        }
        Ok(&self.channel)
    }

    /// Messages ready in `queue` (not counting those delivered and not yet acked).
    pub async fn depth(&mut self, queue: &str) -> anyhow::Result<u32> {
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = self
            .channel()
            .await?
            .queue_declare(queue.into(), options, FieldTable::default())
            .await?;
        Ok(declared.message_count())
    }

    /// Delete `queues`; ones already gone are skipped.
    pub async fn delete(&mut self, queues: &[String]) {
        for queue in queues {
            if let Ok(channel) = self.channel().await {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
    }

    /// Close the connection.
    pub async fn close(self) {
        let _ = self.conn.close(200, "bye".into()).await;
    }
}
