//! SSH local port forwards: a port on this machine's loopback that leads to a port on a
//! host's loopback, over the host's multiplexed SSH connection (lazycluster's port exposure).
//! The monitor binds to the master host's loopback only, so this is how it is reached.
//!
//! The forward is held by the host's ssh master, which gridq owns (see [`crate::ssh`]): it
//! answers, used or idle, for as long as the connection is open, and goes with it. A
//! [`Tunnel`] holds its session, so the connection lasts at least as long as the tunnel;
//! closing the session (or gridq ending, however it ends) closes the forward.

use std::net::SocketAddr;
use std::sync::Arc;

use openssh::ForwardType;

use crate::ssh::HostSession;

/// An open forward; closed with [`Tunnel::close`], or with its session's connection.
#[derive(Debug)]
pub struct Tunnel {
    /// The local end, on 127.0.0.1.
    pub local: SocketAddr,
    /// The port on the host's loopback.
    pub remote_port: u16,
    session: Arc<HostSession>,
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// No free local port, or the one asked for is taken.
    #[error("cannot listen on {addr}: {source}")]
    Local {
        /// The local address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// ssh refused the forward.
    #[error("{host}: cannot forward {local} to 127.0.0.1:{remote} there: {detail}")]
    Forward {
        /// The host.
        host: String,
        /// The local end.
        local: SocketAddr,
        /// The remote port.
        remote: u16,
        /// What openssh said.
        detail: String,
    },
}

impl Tunnel {
    /// Forwards `local` (a free port on 127.0.0.1 when `None`) to `127.0.0.1:remote_port` on
    /// the session's host.
    ///
    /// # Errors
    /// [`TunnelError`].
    pub async fn open(
        session: &Arc<HostSession>,
        remote_port: u16,
        local: Option<SocketAddr>,
    ) -> Result<Self, TunnelError> {
        let local = match local {
            Some(a) => {
                // Fail early, with the OS's words, when the port is taken.
                std::net::TcpListener::bind(a).map_err(|source| TunnelError::Local {
                    addr: a.to_string(),
                    source,
                })?;
                a
            }
            None => free_local_port().map_err(|source| TunnelError::Local {
                addr: "127.0.0.1:0".into(),
                source,
            })?,
        };
        let remote: SocketAddr = ([127, 0, 0, 1], remote_port).into();
        session
            .openssh()
            .request_port_forward(ForwardType::Local, local, remote)
            .await
            .map_err(|e| TunnelError::Forward {
                host: session.who(),
                local,
                remote: remote_port,
                detail: e.to_string(),
            })?;
        Ok(Self {
            local,
            remote_port,
            session: Arc::clone(session),
        })
    }

    /// Closes the forward.
    pub async fn close(self) {
        let remote: SocketAddr = ([127, 0, 0, 1], self.remote_port).into();
        let _ = self
            .session
            .openssh()
            .close_port_forward(ForwardType::Local, self.local, remote)
            .await;
    }
}

/// A free port on this machine's loopback, for a tunnel's local end.
fn free_local_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}
