//! Broker security: TLS with certificate verification against a private CA and a client
//! certificate, on a private RabbitMQ node with a TLS listener set up here; and a password
//! kept out of the config file and out of the log.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::faults::broker::{PrivateBroker, free_port};
use crate::support::*;

/// The `warren` CLI with exactly `args` (no default `--broker`).
fn cli(args: &[&str]) -> Output {
    Proc::spawn(&format!("warren {}", args.join(" ")), {
        let mut cmd = warren();
        cmd.args(args);
        cmd
    })
    .finish(Duration::from_secs(60))
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by
/// the CA, in `dir` (`ca.pem`, `server.pem`/`server.key`, `client.pem`/`client.key`).
fn make_pki(dir: &Path) {
    std::fs::create_dir_all(dir).expect("pki dir");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=warren-test-ca",
        ],
    );
    for (name, usage, san) in [
        (
            "server",
            "serverAuth",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        ),
        ("client", "clientAuth", ""),
    ] {
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!(
                "{san}basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
            ),
        )
        .expect("ext file");
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

/// A private node with a TLS listener that verifies client certificates; returns it, its TLS
/// port and a directory holding the client's copies of the CA and client certificate.
fn tls_broker() -> (PrivateBroker, u16, tempfile::TempDir) {
    let client_pki = tempfile::tempdir().expect("tempdir");
    make_pki(client_pki.path());
    let tls_port = free_port();
    let pki = client_pki.path().to_owned();
    let broker = PrivateBroker::start_with(|root| {
        let tls = root.join("tls");
        std::fs::create_dir_all(&tls).expect("tls dir");
        for f in ["ca.pem", "server.pem", "server.key"] {
            std::fs::copy(pki.join(f), tls.join(f)).expect("copy pki");
        }
        format!(
            "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
             ssl_options.cacertfile = {0}/ca.pem\n\
             ssl_options.certfile = {0}/server.pem\n\
             ssl_options.keyfile = {0}/server.key\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n",
            tls.display()
        )
    });
    (broker, tls_port, client_pki)
}

fn tls_config(server: &str, port: u16, pki: &Path, client_cert: bool, topic: &str) -> String {
    let cert = if client_cert {
        format!(
            "tls_cert_file = \"{0}/client.pem\"\ntls_key_file = \"{0}/client.key\"\n",
            pki.display()
        )
    } else {
        String::new()
    };
    format!(
        "[broker]\nurl = \"amqps://guest:guest@localhost:{port}/%2f\"\nexchange = \"{EXCHANGE}\"\n\
         tls_ca_file = \"{}/ca.pem\"\n{cert}\n\
         [server]\nname = \"{server}\"\nshutdown_timeout_secs = 10\n\n\
         [[handler]]\ntopic = \"{topic}\"\nmodule = \"{}\"\n",
        pki.display(),
        plugin("echo").display()
    )
}

#[test]
fn daemon_and_client_speak_tls_to_a_broker_with_a_private_ca_and_client_certificates() {
    let (_broker, port, pki) = tls_broker();
    let server = unique("tls");
    let topic = unique("tls_echo");
    let config = tls_config(&server, port, pki.path(), true, &topic);
    let daemon = Daemon::start_config(&server, &config);
    assert!(daemon.count_log("connected") > 0);

    // The CLI takes the TLS settings from the same config.
    let cfg_file = daemon.dir.path().join("warren.toml");
    let cfg = cfg_file.to_str().expect("utf-8 path");
    let out = cli(&[
        "call",
        "--config",
        cfg,
        &topic,
        "echo",
        r#"{"value": "over tls"}"#,
    ]);
    out.assert_success();
    assert_eq!(out.stdout.trim(), "\"over tls\"");

    // Without the private CA the broker's certificate is not trusted.
    let url = format!("amqps://guest:guest@localhost:{port}/%2f");
    let out = cli(&["call", "--broker", &url, &topic, "echo", r#"{"value": 1}"#]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.to_lowercase().contains("certificate") || out.stderr.contains("UnknownIssuer"),
        "{}",
        out.stderr
    );

    // Trusting the CA but without a client certificate, the broker refuses the handshake.
    let no_cert = pki.path().join("no-cert.toml");
    std::fs::write(
        &no_cert,
        tls_config(&server, port, pki.path(), false, &topic),
    )
    .expect("write config");
    let out = cli(&[
        "call",
        "--config",
        no_cert.to_str().expect("utf-8 path"),
        &topic,
        "echo",
        r#"{"value": 1}"#,
    ]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
}

#[test]
fn the_password_can_come_from_a_file_and_never_reaches_the_log() {
    let server = unique("secret");
    let topic = unique("secret_echo");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("password"), "guest\n").expect("password file");
    let url = broker_url().replacen("guest:guest@", "guest@", 1);
    assert!(!url.contains("guest:guest"), "{url}");
    let config = format!(
        "[broker]\nurl = \"{url}\"\npassword_file = \"{}\"\nexchange = \"{EXCHANGE}\"\n\n\
         [server]\nname = \"{server}\"\n\n\
         [[handler]]\ntopic = \"{topic}\"\nmodule = \"{}\"\n",
        dir.path().join("password").display(),
        plugin("echo").display()
    );
    let daemon = Daemon::start_config(&server, &config);
    let rpc = Rpc::connect();
    assert_eq!(
        rpc.call(
            &any_server(&topic),
            "echo",
            r#"{"value": 5}"#,
            Duration::from_secs(10)
        )
        .expect("echo"),
        "5"
    );
    let log = daemon.log_text();
    assert!(log.contains("connecting"), "{log}");
    assert!(
        !log.contains("guest:guest"),
        "the password reached the log:\n{log}"
    );
}

/// The login of the test broker's URL: the `user_id` RabbitMQ validates on the CLI's requests.
fn broker_user() -> String {
    url::Url::parse(&broker_url())
        .map(|u| u.username().to_owned())
        .expect("the test broker URL parses")
}

#[test]
fn the_admin_topic_answers_only_the_listed_broker_users() {
    let topic = unique("adm_echo");
    let who_topic = unique("adm_who");
    let (closed, open) = (unique("adm_closed"), unique("adm_open"));
    let _queues = [
        DeleteQueues::rpc(&topic, &[&closed, &open]),
        DeleteQueues::rpc(&who_topic, &[&closed]),
    ];
    let handlers = handler(&topic, &plugin("echo"), "");
    let modules = tempfile::tempdir().expect("tempdir");
    let who_module = wat_file(modules.path(), "who", &whoami_wat("v1"));

    // Someone else's daemon: every admin command is refused, and the handlers keep serving.
    let server = closed;
    let mut daemon = Daemon::start_with(
        &server,
        &format!("{handlers}{}", handler(&who_topic, &who_module, "")),
        "admin_users = [\"ops-only\"]",
    );
    let rpc = Rpc::connect();
    let who = || {
        rpc.call(
            &any_server(&who_topic),
            "whoami",
            "{}",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("whoami: {e}; log:\n{}", daemon.log_text()))
    };
    // A second version, so that a rollback would have somewhere to go.
    write_atomic(&who_module, whoami_wat("v2").as_bytes());
    let reloaded = eventually(Duration::from_secs(15), || {
        (who() == r#""v2""#).then_some(())
    });
    assert!(reloaded.is_some(), "v2 served; log:\n{}", daemon.log_text());
    let user = broker_user();
    for args in [
        vec!["status", "--server", server.as_str()],
        vec!["reload", "--server", server.as_str()],
        vec!["rollback", "--server", server.as_str(), topic.as_str()],
        vec!["rollback", "--server", server.as_str(), who_topic.as_str()],
    ] {
        let out = warren_remote(&args);
        assert_ne!(out.code, Some(0), "{args:?} must fail: {out:?}");
        assert!(
            out.stderr.contains("Forbidden")
                && out
                    .stderr
                    .contains(&format!("broker user '{user}' may not use the admin topic")),
            "{args:?} is refused as Forbidden, naming the user: {out:?}"
        );
    }
    let refused = daemon.wait_log("admin request refused", Duration::from_secs(10));
    assert!(
        refused.is_some_and(|line| line.contains(&user)),
        "the daemon logs the refusal with the user; log:\n{}",
        daemon.log_text()
    );
    // The refused rollback did nothing: v2 still answers.
    assert_eq!(who(), r#""v2""#, "a refused rollback must not roll back");
    // Claiming a listed user in the request context changes nothing: only the broker's word
    // counts.
    let spoofed = remote_error(rpc.call_with_context(
        &any_server(&warren::server::admin_topic(&server)),
        "status",
        "{}",
        r#"{"amqp_user_id": "ops-only"}"#,
        Duration::from_secs(10),
    ));
    assert_eq!(spoofed.class, "Forbidden", "{spoofed:?}");
    assert_eq!(
        rpc.call(
            &any_server(&topic),
            "echo",
            r#"{"value": 7}"#,
            Duration::from_secs(10)
        )
        .expect("echo still answers"),
        "7"
    );

    // admin_users applies as the config changes, without a restart: list the user, and the
    // daemon answers it.
    let config = daemon.dir.path().join("warren.toml");
    let text = std::fs::read_to_string(&config).expect("read config");
    let listed = text.replace(
        "admin_users = [\"ops-only\"]",
        &format!("admin_users = [\"ops-only\", \"{user}\"]"),
    );
    assert_ne!(listed, text, "the config lists admin_users");
    write_atomic(&config, listed.as_bytes());
    let answered = eventually(Duration::from_secs(15), || {
        let out = warren_remote(&["status", "--server", server.as_str()]);
        (out.code == Some(0)).then_some(())
    });
    assert!(
        answered.is_some(),
        "status answered once the user is listed; log:\n{}",
        daemon.log_text()
    );
    assert!(
        daemon.terminate(),
        "clean shutdown; log:\n{}",
        daemon.log_text()
    );

    // Listed: the same commands are answered (rollback with "no previous version", as it
    // would be on an open daemon).
    let server = open;
    let mut daemon = Daemon::start_with(
        &server,
        &handlers,
        &format!("admin_users = [\"ops\", \"{user}\"]"),
    );
    let out = warren_remote(&["status", "--server", &server, "--json"]);
    out.assert_success();
    assert_eq!(out.last_json()["server"], server.as_str(), "{out:?}");
    warren_remote(&["reload", "--server", &server]).assert_success();
    let out = warren_remote(&["rollback", "--server", &server, &topic]);
    assert!(
        out.stderr.contains("NoPreviousVersion") && !out.stderr.contains("Forbidden"),
        "{out:?}"
    );
    assert!(
        daemon.terminate(),
        "clean shutdown; log:\n{}",
        daemon.log_text()
    );
}

/// A login that must be percent-encoded in the broker URL (`ops@corp`) is still sent as the
/// `user_id` the broker validates: the broker accepts the CLI's messages, and `admin_users` can
/// list it. On a private node, where the test may add users.
#[test]
fn a_percent_encoded_login_is_the_user_id_that_admin_users_lists() {
    let broker = PrivateBroker::start();
    for args in [
        ["add_user", "ops@corp", "s3cr:t"].as_slice(),
        &["set_permissions", "-p", "/", "ops@corp", ".*", ".*", ".*"],
    ] {
        let out = broker.ctl(args);
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let server = unique("pct");
    let topic = unique("pct_echo");
    let config = format!(
        "[broker]\nurl = \"{}\"\nexchange = \"{EXCHANGE}\"\n\n\
         [server]\nname = \"{server}\"\nadmin_users = [\"ops@corp\"]\n\n\
         [[handler]]\ntopic = \"{topic}\"\nmodule = \"{}\"\n",
        broker.url(),
        plugin("echo").display()
    );
    let daemon = Daemon::start_config(&server, &config);
    let ops = format!("amqp://ops%40corp:s3cr%3At@{}/%2f", broker.addr());

    // Every message carries `user_id` "ops@corp"; a wrong one would be refused by the broker.
    let out = cli(&[
        "call",
        "--broker",
        &ops,
        &topic,
        "echo",
        r#"{"value": "pct"}"#,
    ]);
    out.assert_success();
    assert_eq!(out.stdout.trim(), r#""pct""#);
    let out = cli(&["status", "--server", &server, "--broker", &ops]);
    out.assert_success();
    assert!(
        out.stdout.contains(&topic),
        "status lists the handler: {out:?}; log:\n{}",
        daemon.log_text()
    );

    // The daemon's own login, guest, is not listed.
    let out = cli(&["status", "--server", &server, "--broker", &broker.url()]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr
            .contains("broker user 'guest' may not use the admin topic"),
        "{out:?}"
    );
}
