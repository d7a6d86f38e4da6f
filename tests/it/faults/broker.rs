//! A private RabbitMQ node for tests that restart the broker: its own node name, AMQP and
//! distribution ports (free ones, found at runtime), data, log and config files and `HOME` (so its
//! own Erlang cookie), listening on loopback only. The shared broker on 127.0.0.1:5672 is never
//! touched. Dropping it stops the node, and kills it by pid if that does not work.
//!
//! Debian's `rabbitmq-server` runs the node as user `rabbitmq`; when the tests run as root the
//! node runs as that user too (via `runuser`) and its directory is handed to it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{eventually, unique};

/// Boots are slow on a loaded two-core machine.
const BOOT: Duration = Duration::from_secs(120);

/// A RabbitMQ node of this test's own.
pub struct PrivateBroker {
    dir: tempfile::TempDir,
    node: String,
    port: u16,
    dist_port: u16,
    server: Option<Child>,
    as_rabbitmq: bool,
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn bin_dir() -> PathBuf {
    std::env::var_os("WARREN_TEST_RABBITMQ_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/rabbitmq/bin"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PrivateBroker {
    /// Start a fresh node and wait until it accepts AMQP connections.
    pub fn start() -> PrivateBroker {
        Self::start_with(|_| String::new())
    }

    /// As [`PrivateBroker::start`]; `extra` may write files into the node's directory (it is
    /// handed its path, before ownership goes to the `rabbitmq` user) and returns more
    /// `rabbitmq.conf` lines (e.g. a TLS listener).
    pub fn start_with(extra: impl FnOnce(&Path) -> String) -> PrivateBroker {
        let dir = tempfile::Builder::new()
            .prefix("warren-rabbit-")
            .tempdir()
            .expect("tempdir");
        let as_rabbitmq = is_root();
        let port = free_port();
        let mut dist_port = free_port();
        while dist_port == port {
            dist_port = free_port();
        }
        let root = dir.path();
        for sub in ["mnesia", "log", "home"] {
            std::fs::create_dir_all(root.join(sub)).expect("broker dirs");
        }
        // No env file of the system's (it names the shared node), our own config and plugins.
        std::fs::write(root.join("rabbitmq-env.conf"), "").expect("env file");
        std::fs::write(
            root.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{port}\n\
                 log.file.level = info\n\
                 log.console = false\n{}",
                extra(root)
            ),
        )
        .expect("rabbitmq.conf");
        std::fs::write(root.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        if as_rabbitmq {
            let ok = Command::new("chown")
                .args(["-R", "rabbitmq:rabbitmq"])
                .arg(root)
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "chown of the private broker's directory to rabbitmq failed"
            );
            let ok = Command::new("chmod")
                .arg("755")
                .arg(root)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chmod of the private broker's directory failed");
        }
        let mut broker = PrivateBroker {
            node: format!("{}@localhost", unique("warren-test")),
            dir,
            port,
            dist_port,
            server: None,
            as_rabbitmq,
        };
        broker.boot();
        broker
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A command running `script` from RabbitMQ's bin dir with this node's environment, as the
    /// `rabbitmq` user when we are root.
    fn command(&self, script: &str) -> Command {
        let root = self.root();
        let vars: Vec<(String, String)> = [
            ("HOME", root.join("home").display().to_string()),
            ("RABBITMQ_NODENAME", self.node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", self.port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            (
                "RABBITMQ_MNESIA_BASE",
                root.join("mnesia").display().to_string(),
            ),
            ("RABBITMQ_LOG_BASE", root.join("log").display().to_string()),
            ("RABBITMQ_PID_FILE", root.join("pid").display().to_string()),
            (
                "RABBITMQ_CONF_ENV_FILE",
                root.join("rabbitmq-env.conf").display().to_string(),
            ),
            (
                "RABBITMQ_CONFIG_FILE",
                root.join("rabbitmq.conf").display().to_string(),
            ),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                root.join("enabled_plugins").display().to_string(),
            ),
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let program = bin_dir().join(script);
        let mut cmd = if self.as_rabbitmq {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "rabbitmq", "--", "env"]);
            cmd.args(vars.iter().map(|(k, v)| format!("{k}={v}")));
            cmd.arg(&program);
            cmd
        } else {
            let mut cmd = Command::new(&program);
            cmd.envs(vars);
            cmd
        };
        cmd.current_dir(root).stdin(Stdio::null());
        cmd
    }

    /// Start the Erlang node and RabbitMQ in it; wait for the AMQP port.
    fn boot(&mut self) {
        let out = std::fs::File::create(self.root().join("server.out")).expect("server.out");
        let err = out.try_clone().expect("clone");
        let child = self
            .command("rabbitmq-server")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start rabbitmq-server");
        self.server = Some(child);
        self.wait_port(true);
        self.await_startup();
    }

    /// An open AMQP port does not mean `rabbitmqctl` will answer: CI once saw `list_queues`
    /// fail with "requires the 'rabbit' app to be running" right after `start_app` and the
    /// port. `await_startup` returns once the app is running (or fails after its timeout).
    fn await_startup(&self) {
        self.ctl_ok(&["await_startup", "--timeout", "60"]);
    }

    fn wait_port(&self, up: bool) {
        let reached = eventually(BOOT, || (self.accepts_connections() == up).then_some(()));
        assert!(
            reached.is_some(),
            "the private broker {} did not {} within {BOOT:?}; log:\n{}",
            self.node,
            if up { "come up" } else { "stop listening" },
            self.log_tail()
        );
    }

    fn accepts_connections(&self) -> bool {
        TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok()
    }

    /// The node's AMQP address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// An AMQP URL for the default `guest` account (allowed from loopback).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Run `rabbitmqctl -n <node> <args>` and return its output (bounded by `--timeout` where the
    /// command takes one; these are all quick).
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.command("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .output()
            .expect("run rabbitmqctl")
    }

    fn ctl_ok(&self, args: &[&str]) {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} on {} failed: {}{}\nlog:\n{}",
            self.node,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    /// `stop_app`, then `start_app`: the broker goes away (closing every connection), refuses
    /// connections while RabbitMQ restarts, and comes back with its durable queues and
    /// persistent messages. Returns how long until it had booted again.
    pub fn restart_app(&self) -> Duration {
        let start = Instant::now();
        self.ctl_ok(&["stop_app"]);
        assert!(
            !self.accepts_connections(),
            "the broker still listens after stop_app"
        );
        self.ctl_ok(&["start_app"]);
        self.wait_port(true);
        self.await_startup();
        start.elapsed()
    }

    /// Stop the whole node (Erlang VM included) and boot it again on the same ports and data.
    pub fn restart_node(&mut self) -> Duration {
        let start = Instant::now();
        self.ctl_ok(&["stop"]);
        if let Some(mut child) = self.server.take() {
            let _ = eventually(Duration::from_secs(30), || child.try_wait().ok().flatten());
            let _ = child.kill();
            let _ = child.wait();
        }
        self.wait_port(false);
        self.boot();
        start.elapsed()
    }

    /// Every queue as `(name, messages_ready, messages_unacknowledged)`.
    pub fn list_queues(&self) -> Vec<(String, u64, u64)> {
        let out = self.ctl(&[
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        assert!(
            out.status.success(),
            "rabbitmqctl list_queues failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_queue_lines(&String::from_utf8_lossy(&out.stdout))
    }

    /// `(messages_ready, messages_unacknowledged)` of `queue`, or `None` when there is none.
    pub fn queue_counts(&self, queue: &str) -> Option<(u64, u64)> {
        self.list_queues()
            .into_iter()
            .find(|(name, _, _)| name == queue)
            .map(|(_, ready, unacked)| (ready, unacked))
    }

    /// The end of the node's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        for name in [
            self.root().join("server.out"),
            self.root().join("log").join(format!("{}.log", self.node)),
        ] {
            if let Ok(all) = std::fs::read_to_string(&name) {
                let lines: Vec<&str> = all.lines().collect();
                let from = lines.len().saturating_sub(30);
                text.push_str(&format!(
                    "== {}\n{}\n",
                    name.display(),
                    lines[from..].join("\n")
                ));
            }
        }
        text
    }

    fn beam_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.root().join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Parse `rabbitmqctl -q list_queues name messages_ready messages_unacknowledged` output.
pub fn parse_queue_lines(text: &str) -> Vec<(String, u64, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut cols = line.split('\t');
            let name = cols.next()?.to_owned();
            let ready = cols.next()?.trim().parse().ok()?;
            let unacked = cols.next()?.trim().parse().ok()?;
            Some((name, ready, unacked))
        })
        .collect()
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let pid = self.beam_pid();
        // A clean stop first (bounded: rabbitmqctl gives up on its own), then by pid.
        let _ = self
            .command("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output();
        if let Some(pid) = pid {
            let gone = eventually(Duration::from_secs(15), || {
                (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
            });
            if gone.is_none() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        if let Some(mut child) = self.server.take() {
            let _ = eventually(Duration::from_secs(5), || child.try_wait().ok().flatten());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_list_queues_output() {
        let rows = parse_queue_lines("a\t1\t2\nbroken\nb\t0\t0\n");
        assert_eq!(rows, [("a".to_owned(), 1, 2), ("b".to_owned(), 0, 0)]);
    }

    #[test]
    fn free_ports_are_free() {
        let port = free_port();
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
    }
}
