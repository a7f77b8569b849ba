//! A host's Docker engine through bollard, locally or over SSH, and images handed from one
//! engine to another without a registry.
//!
//! # Transport
//! [`over_ssh`] talks to the remote engine through `docker system dial-stdio` run on the host's
//! already logged-in, multiplexed SSH session ([`HostSession`]): the remote docker CLI connects
//! to its daemon's socket and copies bytes between that socket and its stdin/stdout, so each
//! HTTP connection of bollard's hyper client is one SSH channel with one `dial-stdio` on it. A
//! channel on an open connection costs a round trip, not a login. Connections are pooled for
//! [`POOL_IDLE`] and at most [`MAX_CHANNELS`] are open per host at once (more requests wait
//! for one), which leaves room in sshd's `MaxSessions` (10 by default) for the other commands
//! sharing the session. When a
//! `dial-stdio` ends (the daemon closed the connection) the stream reads EOF, hyper drops the
//! connection from its pool, and further writes fail instead of vanishing; shutting down the
//! write half closes the remote stdin, which is how `dial-stdio` learns the client is done.
//!
//! bollard's own `ssh` feature is not used: it takes neither a port, nor a known_hosts file, nor
//! our other ssh options, and it starts a new ssh master (a full login) for every connection.
//!
//! Before opening the transport, [`over_ssh`] runs `docker version` over the session, because
//! that is where the reason Docker is unusable shows up in words (not installed, permission
//! denied on the socket, daemon not running); a `dial-stdio` that fails only closes its stream.
//!
//! # Timeouts
//! bollard's per-request timeout covers reaching the response headers, not reading the body.
//! Ordinary requests get [`REQUEST_TIMEOUT`]; connecting (version check, negotiation, ping)
//! [`CONNECT_TIMEOUT`]. Image transfers use [`IMAGE_TIMEOUT`]: `docker load` answers only after
//! it has received and unpacked the whole tarball, and an older daemon's `docker save` writes
//! its first byte only after staging the whole image. Once bytes flow, a source that sends
//! nothing for [`STALL_TIMEOUT`] fails the transfer.
//!
//! # Images without a registry
//! The gridq images are built on the operator's machine (`scripts/build-images.sh`). The
//! [`ensure_image`] handoff compares image IDs on both engines and, when the destination lacks
//! the image, streams the source's `docker save` tarball (which carries the repo tags) straight
//! into the destination's `docker load`: chunk by chunk, never the whole tarball in memory or
//! on disk. The ID is checked again afterwards. [`pull_image`] is the registry alternative.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{CreateImageOptionsBuilder, ImportImageOptionsBuilder};
use futures_util::{Stream, StreamExt};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::ssh::{HostSession, SshError};

/// How long an ordinary Docker API request may take to reach its response headers.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the version check, API negotiation and ping of a new connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an image export, load or pull may take to reach its response headers.
pub const IMAGE_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// How long an image transfer may go without a byte from its source, once bytes flow.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// How many `dial-stdio` channels one host's client keeps open at most.
pub const MAX_CHANNELS: usize = 6;
/// How long an idle connection stays in the pool.
pub const POOL_IDLE: Duration = Duration::from_secs(30);

/// The host name in the URLs bollard sends; `dial-stdio` ignores it.
const CLIENT_ADDR: &str = "http://docker";

/// `Result` with [`DockerError`].
pub type Result<T, E = DockerError> = std::result::Result<T, E>;

/// Why Docker could not be used on a host. Every message starts with the host's label
/// (`host N [user@]addr[:port]`, or `local`) and says what to do.
///
/// Worth retrying (see [`DockerError::is_retryable`]): [`DaemonNotRunning`](Self::DaemonNotRunning)
/// (it may be restarting), [`Timeout`](Self::Timeout), a retryable [`Ssh`](Self::Ssh) error and
/// an [`Api`](Self::Api) error that never got an answer from the daemon. The others need a fix.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// There is no `docker` program on the host.
    #[error(
        "{host}: Docker is not installed (no `docker` on {user}'s PATH there); install Docker Engine there (e.g. Debian's docker.io package) and add {user} to the docker group"
    )]
    NotInstalled {
        /// The host's label.
        host: String,
        /// The remote user.
        user: String,
    },
    /// The user may not open the daemon's socket.
    #[error(
        "{host}: permission denied on the Docker socket {socket}: {user} may not use Docker there; add {user} to the docker group: `sudo usermod -aG docker {user}`, then log in again"
    )]
    PermissionDenied {
        /// The host's label.
        host: String,
        /// The user denied.
        user: String,
        /// The socket, e.g. `/var/run/docker.sock`.
        socket: String,
    },
    /// Docker is installed but its daemon does not answer.
    #[error(
        "{host}: the Docker daemon is not running ({detail}); start it: `sudo systemctl start docker`"
    )]
    DaemonNotRunning {
        /// The host's label.
        host: String,
        /// What docker said.
        detail: String,
    },
    /// SSH failed underneath (its message names the host).
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// The image to hand over is not on the source engine.
    #[error(
        "{host}: there is no image {image} to copy; load or build it here first (`docker load`; `scripts/build-images.sh` builds gridq-python, gridq:local and gridq-rabbitmq:local), or let the hosts pull it (--pull)"
    )]
    ImageMissing {
        /// The source's label.
        host: String,
        /// The image asked for.
        image: String,
    },
    /// After a load or pull, the image on the engine is not the one expected.
    #[error(
        "{host}: after {op}, {image} is {found} there, not {expected}; another process may be changing that tag: try again"
    )]
    ImageMismatch {
        /// The destination's label.
        host: String,
        /// What was done (`loading it from local`).
        op: String,
        /// The image.
        image: String,
        /// The ID expected.
        expected: String,
        /// The ID found, or `missing`.
        found: String,
    },
    /// A request got no answer in time.
    #[error("{host}: {op} got no answer from Docker within {limit}")]
    Timeout {
        /// The host's label.
        host: String,
        /// The operation (`inspecting image gridq:local`).
        op: String,
        /// The time limit, e.g. `2m`.
        limit: String,
    },
    /// A Docker API request failed: the daemon refused it, or the connection broke.
    #[error("{host}: {op} failed: {detail}")]
    Api {
        /// The host's label.
        host: String,
        /// The operation (`loading gridq:local from local`).
        op: String,
        /// The error and its causes, in one line.
        detail: String,
        /// bollard's error, to look at (e.g. the HTTP status).
        error: BollardError,
    },
    /// Docker failed in a way not classified above.
    #[error("{host}: docker failed: {detail}")]
    Other {
        /// The host's label.
        host: String,
        /// What docker said.
        detail: String,
    },
}

impl DockerError {
    /// Whether trying again later may succeed without anything being fixed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::DaemonNotRunning { .. } | Self::Timeout { .. } => true,
            Self::Ssh(e) => e.is_retryable(),
            // The connection broke before an answer; a refusal by the daemon stands.
            Self::Api { error, .. } => matches!(
                error,
                BollardError::HyperLegacyError { .. }
                    | BollardError::HyperResponseError { .. }
                    | BollardError::IOError { .. }
                    | BollardError::RequestTimeoutError
            ),
            _ => false,
        }
    }

    /// The HTTP status of a refused API request (404 for no such image, say).
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api {
                error: BollardError::DockerResponseServerError { status_code, .. },
                ..
            } => Some(*status_code),
            _ => None,
        }
    }
}

/// One Docker engine, and how errors name it.
#[derive(Debug, Clone)]
pub struct DockerHost {
    docker: Docker,
    label: String,
}

impl DockerHost {
    /// The bollard client, with [`REQUEST_TIMEOUT`]; clone it `.with_timeout(..)` for
    /// requests that answer late (waiting on a container).
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// `host N [user@]addr[:port]`, or `local`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The ID (`sha256:...`) of `image` on this engine, or `None` when it has no such image.
    ///
    /// # Errors
    /// [`DockerError::Api`] when the engine cannot be asked.
    pub async fn image_id(&self, image: &str) -> Result<Option<String>> {
        match self.docker.inspect_image(image).await {
            Ok(inspect) => Ok(inspect.id),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(self.error(format!("inspecting image {image}"), REQUEST_TIMEOUT, e)),
        }
    }

    /// A bollard error of operation `op` (which ran under `limit`) as a [`DockerError`].
    fn error(&self, op: impl Into<String>, limit: Duration, error: BollardError) -> DockerError {
        let (host, op) = (self.label.clone(), op.into());
        if matches!(error, BollardError::RequestTimeoutError) {
            return DockerError::Timeout {
                host,
                op,
                limit: humantime::format_duration(limit).to_string(),
            };
        }
        DockerError::Api {
            host,
            op,
            detail: error_chain(&error),
            error,
        }
    }
}

/// The engine on this machine, through its Unix socket (`/var/run/docker.sock`, or the
/// `unix://` socket `DOCKER_HOST` names), after negotiating the API version and a ping.
///
/// # Errors
/// [`DockerError::PermissionDenied`] when this user may not open the socket,
/// [`DockerError::DaemonNotRunning`] when nothing listens on it.
pub async fn local() -> Result<DockerHost> {
    const LABEL: &str = "local";
    let local_user = || std::env::var("USER").unwrap_or_else(|_| "your user".to_owned());
    let docker = Docker::connect_with_unix_defaults().map_err(|e| match e {
        BollardError::SocketNotFoundError(socket) => DockerError::DaemonNotRunning {
            host: LABEL.to_owned(),
            detail: format!("no socket {socket}"),
        },
        e => DockerError::Other {
            host: LABEL.to_owned(),
            detail: error_chain(&e),
        },
    })?;
    checked(docker, LABEL.to_owned()).await.map_err(|e| {
        let kind = match &e {
            DockerError::Api { error, .. } => io_error_kind(error),
            _ => None,
        };
        match kind {
            Some(io::ErrorKind::PermissionDenied) => DockerError::PermissionDenied {
                host: LABEL.to_owned(),
                user: local_user(),
                socket: local_socket(),
            },
            Some(io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => {
                DockerError::DaemonNotRunning {
                    host: LABEL.to_owned(),
                    detail: format!("nothing answers on {}", local_socket()),
                }
            }
            _ => e,
        }
    })
}

fn local_socket() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_owned))
        .unwrap_or_else(|| "/var/run/docker.sock".to_owned())
}

/// The engine on the host of `session`, through `docker system dial-stdio` on that session
/// (see the module documentation), after checking that Docker is usable there, negotiating
/// the API version and a ping. The client holds the session until it is dropped.
///
/// # Errors
/// [`DockerError::NotInstalled`], [`DockerError::PermissionDenied`] (the user is not in the
/// docker group), [`DockerError::DaemonNotRunning`], or the [`DockerError::Ssh`] error of the
/// session.
pub async fn over_ssh(session: Arc<HostSession>) -> Result<DockerHost> {
    let label = session.who();
    check_engine(&session).await?;
    let connector = DialStdio {
        session,
        channels: Arc::new(Semaphore::new(MAX_CHANNELS)),
    };
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(MAX_CHANNELS)
        .build(connector);
    let docker = Docker::connect_with_custom_transport(
        move |request: bollard::BollardRequest| {
            let client = client.clone();
            async move { client.request(request).await.map_err(BollardError::from) }
        },
        Some(CLIENT_ADDR),
        REQUEST_TIMEOUT.as_secs(),
        bollard::API_DEFAULT_VERSION,
    )
    .map_err(|e| DockerError::Other {
        host: label.clone(),
        detail: error_chain(&e),
    })?;
    checked(docker, label).await
}

/// Negotiates the API version (an older daemon refuses requests of a newer client) and
/// pings, all within [`CONNECT_TIMEOUT`].
async fn checked(docker: Docker, label: String) -> Result<DockerHost> {
    let host = DockerHost {
        docker: docker.with_timeout(CONNECT_TIMEOUT),
        label,
    };
    let docker = host
        .docker
        .clone()
        .negotiate_version()
        .await
        .map_err(|e| host.error("negotiating the API version", CONNECT_TIMEOUT, e))?;
    docker
        .ping()
        .await
        .map_err(|e| host.error("ping", CONNECT_TIMEOUT, e))?;
    Ok(DockerHost {
        docker: docker.with_timeout(REQUEST_TIMEOUT),
        label: host.label,
    })
}

/// Runs `docker version` on the host and turns its failure into a [`DockerError`].
async fn check_engine(session: &HostSession) -> Result<()> {
    let argv = ["docker", "version", "--format", "{{.Server.Version}}"];
    let label = session.who();
    let remote_user = session.host().user.clone();
    let output = match session.run(&argv, Some(CONNECT_TIMEOUT)).await {
        Ok(output) => output,
        Err(SshError::CommandNotFound { user, .. }) => {
            return Err(DockerError::NotInstalled { host: label, user });
        }
        Err(e) => return Err(e.into()),
    };
    if output.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(match classify_version_failure(&stderr) {
        Failure::PermissionDenied { socket } => {
            let user = match remote_user {
                Some(user) => user,
                None => remote_login_name(session).await,
            };
            DockerError::PermissionDenied {
                host: label,
                user,
                socket,
            }
        }
        Failure::NotRunning { detail } => DockerError::DaemonNotRunning {
            host: label,
            detail,
        },
        Failure::Other { detail } => DockerError::Other {
            host: label,
            detail: format!(
                "`docker version` exited with status {}: {detail}",
                output.code
            ),
        },
    })
}

/// The remote user's name (`id -un`), for a host given without one.
async fn remote_login_name(session: &HostSession) -> String {
    match session.run(&["id", "-un"], Some(CONNECT_TIMEOUT)).await {
        Ok(out) if out.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        _ => "the remote user".to_owned(),
    }
}

/// What a failed `docker version` said.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    PermissionDenied { socket: String },
    NotRunning { detail: String },
    Other { detail: String },
}

/// Classifies the standard error of a failed `docker version`. Docker words these as
/// `permission denied while trying to connect to the Docker daemon socket at unix:///...`
/// (`... the docker API at ...` since 28) and `Cannot connect to the Docker daemon at
/// unix:///var/run/docker.sock. Is the docker daemon running?`.
fn classify_version_failure(stderr: &str) -> Failure {
    let lower = stderr.to_ascii_lowercase();
    let last = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("no error message")
        .to_owned();
    if lower.contains("permission denied") && (lower.contains("docker") || lower.contains(".sock"))
    {
        let socket = stderr
            .split_whitespace()
            .find_map(|w| w.strip_prefix("unix://"))
            .map(|s| s.trim_end_matches([':', '.', ',']))
            .filter(|s| !s.is_empty())
            .unwrap_or("/var/run/docker.sock")
            .to_owned();
        return Failure::PermissionDenied { socket };
    }
    if lower.contains("cannot connect to the docker daemon")
        || lower.contains("is the docker daemon running")
    {
        return Failure::NotRunning { detail: last };
    }
    Failure::Other { detail: last }
}

/// The connector of the SSH transport: every connection is a new `docker system dial-stdio`
/// on the host's session, at most [`MAX_CHANNELS`] at once.
#[derive(Clone)]
struct DialStdio {
    session: Arc<HostSession>,
    channels: Arc<Semaphore>,
}

impl tower_service::Service<hyper::Uri> for DialStdio {
    type Response = TokioIo<DialStdioStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: hyper::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.dial().await.map(TokioIo::new) })
    }
}

impl DialStdio {
    async fn dial(self) -> io::Result<DialStdioStream> {
        let permit = Arc::clone(&self.channels)
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let who = self.session.who();
        let mut child = Arc::clone(self.session.openssh())
            .arc_command("docker")
            .arg("system")
            .arg("dial-stdio")
            .stdin(openssh::Stdio::piped())
            .stdout(openssh::Stdio::piped())
            .stderr(openssh::Stdio::piped())
            .spawn()
            .await
            .map_err(|e| {
                io::Error::other(format!(
                    "cannot start `docker system dial-stdio` over SSH: {}",
                    error_chain(&e)
                ))
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin().take(), child.stdout().take()) else {
            return Err(io::Error::other("dial-stdio without piped stdin/stdout"));
        };
        // What dial-stdio says (it cannot reach the socket, say) goes to the log; the task
        // ends at EOF, when dial-stdio exits or its channel is closed.
        if let Some(stderr) = child.stderr().take() {
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(host = %who, line, "docker system dial-stdio");
                }
            });
        }
        Ok(DialStdioStream {
            stdin: Some(stdin),
            stdout,
            eof: false,
            _child: child,
            _permit: permit,
        })
    }
}

/// One `dial-stdio`: reads its stdout, writes its stdin. Dropping it closes the channel.
struct DialStdioStream {
    /// `None` once the write half is shut down: dropping it closes the remote stdin.
    stdin: Option<openssh::ChildStdin>,
    stdout: openssh::ChildStdout,
    /// The remote end closed: nothing more may be written.
    eof: bool,
    _child: openssh::Child<Arc<openssh::Session>>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for DialStdioStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.stdout).poll_read(cx, buf))?;
        if buf.filled().len() == before && buf.remaining() > 0 {
            self.eof = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl DialStdioStream {
    fn stdin(&mut self) -> io::Result<Pin<&mut openssh::ChildStdin>> {
        if self.eof {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "docker system dial-stdio closed the connection",
            ));
        }
        self.stdin
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "the write half is shut down"))
    }
}

impl AsyncWrite for DialStdioStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stdin()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stdin()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stdin
            .as_ref()
            .is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.stdin.as_mut() {
            Some(stdin) if !this.eof => Pin::new(stdin).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(stdin) = self.stdin.as_mut() {
            // Best effort: the remote end may be gone already.
            let _ = ready!(Pin::new(stdin).poll_flush(cx));
        }
        // Shutting down a pipe does nothing; closing it is the EOF dial-stdio waits for.
        self.stdin = None;
        Poll::Ready(Ok(()))
    }
}

impl Connection for DialStdioStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// What [`ensure_image`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageOutcome {
    /// The destination had the image with the same ID already.
    Present,
    /// The image was streamed over: `bytes` of `docker save` tarball.
    Transferred {
        /// The tarball's size.
        bytes: u64,
    },
}

/// Makes sure `dst` has `image` with the same ID as on `src`: nothing to do when it has,
/// otherwise [`transfer_image`], then a check of the ID on `dst`. `on_progress` gets the bytes
/// sent so far as the transfer goes on. Returns the image's ID (the same on both) and what was
/// done.
///
/// # Errors
/// [`DockerError::ImageMissing`] when `src` has no such image (build it first),
/// [`DockerError::ImageMismatch`] when `dst` has another ID after the load; the errors of
/// [`transfer_image`].
pub async fn ensure_image(
    src: &DockerHost,
    dst: &DockerHost,
    image: &str,
    on_progress: impl FnMut(u64),
) -> Result<(String, ImageOutcome)> {
    let Some(expected) = src.image_id(image).await? else {
        return Err(DockerError::ImageMissing {
            host: src.label.clone(),
            image: image.to_owned(),
        });
    };
    if dst.image_id(image).await?.as_ref() == Some(&expected) {
        return Ok((expected, ImageOutcome::Present));
    }
    let bytes = transfer_image(src, dst, image, on_progress).await?;
    match dst.image_id(image).await? {
        Some(found) if found == expected => Ok((expected, ImageOutcome::Transferred { bytes })),
        found => Err(DockerError::ImageMismatch {
            host: dst.label.clone(),
            op: format!("loading it from {}", src.label),
            image: image.to_owned(),
            expected,
            found: found.unwrap_or_else(|| "missing".to_owned()),
        }),
    }
}

/// Streams `src`'s `docker save` of `image` into `dst`'s `docker load`, whether or not `dst`
/// has it, and returns the size of the tarball. `on_progress` gets the bytes sent so far.
///
/// # Errors
/// [`DockerError::Api`] (or [`DockerError::Timeout`]) naming `src` when the export fails, and
/// `dst` when the load does.
pub async fn transfer_image(
    src: &DockerHost,
    dst: &DockerHost,
    image: &str,
    on_progress: impl FnMut(u64),
) -> Result<u64> {
    let export = src
        .docker
        .clone()
        .with_timeout(IMAGE_TIMEOUT)
        .export_image(image);
    // The load sees only an I/O error of its body; the export's own error is kept here so
    // that the failure is reported against the engine that failed.
    let failed: Arc<Mutex<Option<BollardError>>> = Arc::default();
    let slot = Arc::clone(&failed);
    let body = export.map(move |chunk| {
        chunk.map_err(|e| {
            let err = io::Error::other(error_chain(&e));
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(e);
            }
            err
        })
    });
    let loaded = load(
        dst,
        body,
        on_progress,
        &format!("loading {image} from {}", src.label),
    )
    .await;
    let export_error = failed.lock().ok().and_then(|mut slot| slot.take());
    match export_error {
        Some(e) => Err(src.error(format!("exporting {image}"), IMAGE_TIMEOUT, e)),
        None => loaded,
    }
}

/// Loads a `docker save` tarball into `dst` (`docker load`), streaming `body` as it comes, and
/// returns its size. `on_progress` gets the bytes sent so far.
///
/// # Errors
/// [`DockerError::Api`] when the load fails (the body's own error among its causes), or
/// [`DockerError::Timeout`].
pub async fn load_image<S>(dst: &DockerHost, body: S, on_progress: impl FnMut(u64)) -> Result<u64>
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    load(dst, body, on_progress, "loading an image").await
}

async fn load<S>(
    dst: &DockerHost,
    body: S,
    mut on_progress: impl FnMut(u64),
    op: &str,
) -> Result<u64>
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    let (sent, mut progress) = watch::channel(0u64);
    let body = counted(body, sent);
    let options = ImportImageOptionsBuilder::default().quiet(true).build();
    let docker = dst.docker.clone().with_timeout(IMAGE_TIMEOUT);
    let mut replies = std::pin::pin!(docker.import_image_stream(options, body, None));
    let mut reported = 0;
    let mut counting = true;
    loop {
        tokio::select! {
            reply = replies.next() => match reply {
                None => break,
                Some(Ok(info)) => {
                    if let Some(line) = info.stream.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
                        tracing::info!(host = %dst.label, line, "docker load");
                    }
                }
                Some(Err(e)) => return Err(dst.error(op, IMAGE_TIMEOUT, e)),
            },
            changed = progress.changed(), if counting => match changed {
                Ok(()) => {
                    reported = *progress.borrow_and_update();
                    on_progress(reported);
                }
                // The body is finished and dropped.
                Err(_) => counting = false,
            },
        }
    }
    let total = *progress.borrow();
    if total != reported {
        on_progress(total);
    }
    Ok(total)
}

/// `body`, counting its bytes into `sent` and failing once it stalls for [`STALL_TIMEOUT`]
/// after its first chunk (the first waits on the source's own timeout).
fn counted<S>(body: S, sent: watch::Sender<u64>) -> impl Stream<Item = io::Result<Bytes>> + Send
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    let state = (Box::pin(body), sent, 0u64, false);
    futures_util::stream::unfold(state, |(mut body, sent, total, done)| async move {
        if done {
            return None;
        }
        let next = if total == 0 {
            body.next().await
        } else {
            match tokio::time::timeout(STALL_TIMEOUT, body.next()).await {
                Ok(next) => next,
                Err(_) => Some(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the image source sent nothing for {}",
                        humantime::format_duration(STALL_TIMEOUT)
                    ),
                ))),
            }
        };
        match next? {
            Ok(chunk) => {
                let total = total + chunk.len() as u64;
                sent.send_replace(total);
                Some((Ok(chunk), (body, sent, total, false)))
            }
            Err(e) => Some((Err(e), (body, sent, total, true))),
        }
    })
}

/// Pulls `image` from its registry onto `dst` (`docker pull`; `:latest` when it names no tag
/// or digest) and returns its ID.
///
/// # Errors
/// [`DockerError::Api`] when the pull fails (no such image, registry unreachable).
pub async fn pull_image(dst: &DockerHost, image: &str) -> Result<String> {
    let reference = with_default_tag(image);
    let op = format!("pulling {reference}");
    let options = CreateImageOptionsBuilder::default()
        .from_image(&reference)
        .build();
    let docker = dst.docker.clone().with_timeout(IMAGE_TIMEOUT);
    let mut progress = docker.create_image(Some(options), None, None);
    while let Some(item) = progress.next().await {
        item.map_err(|e| dst.error(op.as_str(), IMAGE_TIMEOUT, e))?;
    }
    dst.image_id(&reference)
        .await?
        .ok_or_else(|| DockerError::ImageMismatch {
            host: dst.label.clone(),
            op,
            image: reference.clone(),
            expected: "an image".to_owned(),
            found: "missing".to_owned(),
        })
}

/// `image` with `:latest` added when it names neither a tag nor a digest: the API pulls
/// every tag of a bare name.
fn with_default_tag(image: &str) -> String {
    let name = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || name.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// The kind of the I/O error among `err`'s causes, if there is one.
fn io_error_kind(err: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        source = e.source();
    }
    None
}

/// `err` and its causes in one line, skipping a cause whose text the line already ends with
/// (bollard and hyper repeat their sources' messages).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_denied_names_the_socket() {
        let old = "permission denied while trying to connect to the Docker daemon socket at unix:///var/run/docker.sock: Get \"http://%2Fvar%2Frun%2Fdocker.sock/v1.50/version\": dial unix /var/run/docker.sock: connect: permission denied\n";
        assert_eq!(
            classify_version_failure(old),
            Failure::PermissionDenied {
                socket: "/var/run/docker.sock".into()
            }
        );
        let new = "permission denied while trying to connect to the docker API at unix:///run/user/docker.sock\n";
        assert_eq!(
            classify_version_failure(new),
            Failure::PermissionDenied {
                socket: "/run/user/docker.sock".into()
            }
        );
    }

    #[test]
    fn a_stopped_daemon_is_told_apart() {
        let text = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?\n";
        assert_eq!(
            classify_version_failure(text),
            Failure::NotRunning {
                detail: text.trim().into()
            }
        );
        assert_eq!(
            classify_version_failure("warning\nsomething else broke\n"),
            Failure::Other {
                detail: "something else broke".into()
            }
        );
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = DockerError::PermissionDenied {
            host: "host 4 gridq-nodocker@127.0.0.5:2222".into(),
            user: "gridq-nodocker".into(),
            socket: "/var/run/docker.sock".into(),
        };
        assert_eq!(
            e.to_string(),
            "host 4 gridq-nodocker@127.0.0.5:2222: permission denied on the Docker socket /var/run/docker.sock: gridq-nodocker may not use Docker there; add gridq-nodocker to the docker group: `sudo usermod -aG docker gridq-nodocker`, then log in again"
        );
        assert!(!e.is_retryable());
        let e = DockerError::NotInstalled {
            host: "host 1 h".into(),
            user: "u".into(),
        };
        assert!(e.to_string().contains("install Docker Engine"), "{e}");
        assert!(
            DockerError::DaemonNotRunning {
                host: "local".into(),
                detail: "x".into()
            }
            .is_retryable()
        );
    }

    #[test]
    fn api_errors_are_retryable_only_without_an_answer() {
        let host = DockerHost {
            docker: Docker::connect_with_http(
                "http://127.0.0.1:9",
                1,
                bollard::API_DEFAULT_VERSION,
            )
            .unwrap(),
            label: "local".into(),
        };
        let refused = host.error(
            "inspecting image x",
            REQUEST_TIMEOUT,
            BollardError::DockerResponseServerError {
                status_code: 404,
                message: "No such image: x".into(),
            },
        );
        assert_eq!(refused.status(), Some(404));
        assert!(!refused.is_retryable());
        assert_eq!(
            refused.to_string(),
            "local: inspecting image x failed: Docker responded with status code 404: No such image: x"
        );
        let late = host.error(
            "ping",
            Duration::from_secs(30),
            BollardError::RequestTimeoutError,
        );
        assert_eq!(
            late.to_string(),
            "local: ping got no answer from Docker within 30s"
        );
        assert!(late.is_retryable());
    }

    #[test]
    fn bare_names_get_the_latest_tag() {
        assert_eq!(with_default_tag("busybox"), "busybox:latest");
        assert_eq!(with_default_tag("reg:5000/a/b"), "reg:5000/a/b:latest");
        assert_eq!(with_default_tag("reg:5000/a/b:1"), "reg:5000/a/b:1");
        assert_eq!(with_default_tag("a@sha256:00"), "a@sha256:00");
    }

    #[tokio::test]
    async fn counting_reports_every_byte() {
        let (sent, seen) = watch::channel(0);
        let chunks = vec![
            Ok(Bytes::from_static(b"abc")),
            Ok(Bytes::from_static(b"de")),
        ];
        let out: Vec<_> = counted(futures_util::stream::iter(chunks), sent)
            .collect()
            .await;
        assert_eq!(out.len(), 2);
        assert_eq!(*seen.borrow(), 5);
    }
}
