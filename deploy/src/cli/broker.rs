//! `gridq broker`: a private RabbitMQ node in the foreground, for local use and for tests.
//!
//! It needs Debian's `rabbitmq-server` package and nothing else: the node lives under `--dir`
//! with its own ports, a generated user (never `guest`) and a stored password. With `--env-file`
//! it writes `GRIDQ_BROKER=...` (and the management URL and credentials) for scripts, mode 0600.
//! With `--tls` it also listens for AMQP over TLS, with a certificate from a CA of its own under
//! `DIR/tls` (made on first use, kept afterwards), and writes `GRIDQ_BROKER_TLS=amqps://...`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use gridq_common::rabbit_node::{NodeOptions, NodeTls, RabbitNode};

use crate::pki as gridq_deploy_pki;

use super::Failure;

#[derive(Debug, Args)]
pub(crate) struct BrokerArgs {
    /// The node's directory (data, logs, configuration, credentials).
    #[arg(long, default_value = ".gridq/broker")]
    dir: PathBuf,
    /// AMQP port on 127.0.0.1 (default: the last one used, else any free port).
    #[arg(long)]
    port: Option<u16>,
    /// Enable the management plugin (HTTP API on a free loopback port).
    #[arg(long)]
    management: bool,
    /// RabbitMQ's consumer_timeout (default: RabbitMQ's 30 minutes).
    #[arg(long, value_parser = humantime::parse_duration)]
    consumer_timeout: Option<Duration>,
    /// Also listen for AMQP over TLS, with a CA and certificate of its own (under DIR/tls).
    #[arg(long)]
    tls: bool,
    /// Write the connection settings here as KEY=value lines (mode 0600).
    #[arg(long)]
    env_file: Option<PathBuf>,
}

pub(crate) fn run(args: &BrokerArgs) -> Result<(), Failure> {
    let rt = super::services::runtime()?;
    rt.block_on(async {
        let mut stop = super::services::stop_signals()?;
        let mut options = NodeOptions::new(args.dir.clone());
        options.amqp_port = args.port;
        options.management = args.management;
        options.consumer_timeout = args.consumer_timeout;
        if args.tls {
            let addresses = ["127.0.0.1".to_owned(), "localhost".to_owned()];
            let month = Duration::from_secs(30 * 24 * 3600);
            let (files, _) =
                gridq_deploy_pki::ensure(&args.dir.join("tls"), "broker", &addresses, month)
                    .context("making the broker's TLS certificates")?;
            options.tls = Some(NodeTls {
                ca_cert: std::fs::canonicalize(&files.ca_cert)?,
                cert: std::fs::canonicalize(&files.server_cert)?,
                key: std::fs::canonicalize(&files.server_key)?,
            });
        }
        let mut node = RabbitNode::start(options)
            .await
            .context("starting the RabbitMQ node")?;
        if let Some(path) = &args.env_file {
            let (user, pass) = node.credentials();
            let mut text = format!(
                "GRIDQ_BROKER={}\nGRIDQ_BROKER_USER={user}\nGRIDQ_BROKER_PASSWORD={pass}\n",
                node.amqp_url("/")
            );
            if let Some(m) = node.management_url() {
                text.push_str(&format!("GRIDQ_BROKER_MANAGEMENT={m}\n"));
            }
            if let Some(tls) = node.amqps_url("/") {
                text.push_str(&format!("GRIDQ_BROKER_TLS={tls}\n"));
            }
            write_private(path, &text).with_context(|| format!("writing {}", path.display()))?;
        }
        eprintln!(
            "RabbitMQ node ready at {} (Ctrl-C stops it)",
            node.redacted_url("/")
        );
        let _ = stop.wait_for(|n| *n >= 1).await.map(|_| ());
        node.stop().await.context("stopping the node")?;
        Ok::<_, anyhow::Error>(())
    })
    .map_err(Failure::Other)
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    drop(f);
    // Appear whole: readers wait for the file to exist.
    std::fs::rename(tmp, path)
}
