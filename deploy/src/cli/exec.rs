//! `gridq exec --each-host`: run one argv on every host in parallel (DistributedEnvironments'
//! `@eachmachine`), e.g. to download a dataset everywhere before a sweep. The hosts are those
//! of `-a`, or of a deployed cluster's file (`-f`, `--config FILE`; see [`super::probe`]).
//!
//! Output lines stream as they come, each prefixed with its host (`[1 gridq-h1@127.0.0.2]`),
//! stdout to stdout and stderr to stderr. Then stderr gets one status line per host and a
//! count. Ctrl-C stops waiting and closes the sessions (exit 130). Every argv element is quoted for the remote shell by `openssh`, so it reaches the
//! remote program as one argument, literally.

use std::io::Write;
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;

use super::Failure;
use super::probe::SshArgs;
use crate::ssh::{Sessions, Stream};

#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// Run the command once on every host of --hosts or of the cluster file (the only mode so
    /// far).
    #[arg(long, required = true)]
    each_host: bool,
    #[command(flatten)]
    ssh: SshArgs,
    /// Stop waiting for a host's command after this long (e.g. 30m); no limit by default.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// The command and its arguments, after `--`. Each is passed as one argument, never
    /// interpreted by a shell (run `sh -c '...'` explicitly for that).
    #[arg(last = true, required = true, value_name = "CMD")]
    argv: Vec<String>,
}

pub(crate) fn run(args: &ExecArgs) -> Result<(), Failure> {
    debug_assert!(args.each_host);
    let (hosts, options) = args.ssh.resolve()?;
    let argv = args.argv.clone();
    let timeout = args.timeout;
    let outcomes = super::services::runtime()?.block_on(async move {
        let sessions = Sessions::connect(&hosts, &options)
            .await
            .map_err(|e| Failure::Other(e.into()))?;
        let work = sessions.for_each(move |session| {
            let argv = argv.clone();
            async move {
                let prefix = format!("[{}] ", session.host().label());
                session
                    .run_lines(&argv, timeout, |stream, line| {
                        print_line(stream, &prefix, line);
                    })
                    .await
            }
        });
        tokio::select! {
            outcomes = work => {
                sessions.close().await;
                Ok(outcomes)
            }
            _ = tokio::signal::ctrl_c() => {
                sessions.abort().await;
                eprintln!(
                    "exec: interrupted; the SSH connections are closed (a remote command still running is not killed: it gets EOF and SIGPIPE)"
                );
                Err(Failure::Silent(130))
            }
        }
    })?;
    let mut failed = 0;
    for (host, outcome) in &outcomes {
        let status = match outcome {
            Ok(0) => "exit 0".to_owned(),
            Ok(code) => {
                failed += 1;
                format!("exit {code}")
            }
            Err(e) => {
                failed += 1;
                format!("error: {e}")
            }
        };
        eprintln!("[{}] {status}", host.label());
    }
    if failed == 0 {
        eprintln!("exec: succeeded on all {} hosts", outcomes.len());
        Ok(())
    } else {
        Err(Failure::Other(anyhow!(
            "exec: failed on {failed} of {} hosts",
            outcomes.len()
        )))
    }
}

/// Writes one prefixed line whole, so lines from different hosts never mix. A closed stdout
/// (`| head`) is ignored: the remote commands still run to the end.
fn print_line(stream: Stream, prefix: &str, line: &[u8]) {
    let mut buf = Vec::with_capacity(prefix.len() + line.len() + 1);
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(line);
    buf.push(b'\n');
    let _ = match stream {
        Stream::Stdout => std::io::stdout().lock().write_all(&buf),
        Stream::Stderr => std::io::stderr().lock().write_all(&buf),
    };
}
