//! Connections: how many, and for how long a client may keep one without a request.
//!
//! Every connection must send a request's headers within [`HEADER_TIMEOUT`] of opening, and
//! of its previous answer (an idle keep-alive connection is closed after the same time).
//! At most [`MAX_CONNECTIONS`] are open at once; a new one beyond that takes the place of the
//! oldest connection that is not serving a request (one that opened and sent nothing yet, or
//! sits idle between requests), so that clients sending partial headers on thousands of
//! connections cannot keep `/healthz` or the API from answering. When every connection is
//! serving a request, the new one is closed at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections at most.
pub const MAX_CONNECTIONS: usize = 512;

/// The open connections, oldest first, with how many requests each is serving.
#[derive(Default)]
struct Open {
    next: u64,
    by_age: BTreeMap<u64, Slot>,
}

struct Slot {
    busy: Arc<AtomicUsize>,
    close: Arc<Notify>,
}

impl Open {
    /// Registers a connection; `None` when it must be refused (every slot is serving).
    fn admit(&mut self) -> Option<(u64, Arc<AtomicUsize>, Arc<Notify>)> {
        if self.by_age.len() >= MAX_CONNECTIONS {
            let idle = self
                .by_age
                .iter()
                .find(|(_, s)| s.busy.load(Ordering::Acquire) == 0)
                .map(|(id, _)| *id)?;
            if let Some(slot) = self.by_age.remove(&idle) {
                slot.close.notify_one();
            }
        }
        self.next += 1;
        let slot = Slot {
            busy: Arc::new(AtomicUsize::new(0)),
            close: Arc::new(Notify::new()),
        };
        let handles = (self.next, slot.busy.clone(), slot.close.clone());
        self.by_age.insert(self.next, slot);
        Some(handles)
    }
}

/// Counts a request as being served for as long as it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Self(n.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body, holding its connection's [`Busy`] until it is sent or dropped.
struct Tracked {
    inner: axum::body::Body,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `app` on `listener` until `stop` turns true, then lets the open requests finish.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    let open = Arc::new(Mutex::new(Open::default()));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: wait a little instead of spinning.
                    warn!(cause = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let admitted = open.lock().map(|mut o| o.admit()).unwrap_or(None);
        let Some((id, busy, close)) = admitted else {
            debug!("refused a connection: every connection is serving a request");
            continue;
        };
        let app = app.clone();
        let open = open.clone();
        let mut stop = stop.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let busy = Busy::new(&busy);
                // A router is always ready: no `poll_ready` needed.
                let call = tower_service::Service::call(&mut app.clone(), request);
                async move {
                    // Busy until the whole answer is sent: live streams and large exports
                    // are never taken for idle connections.
                    let response = call.await?;
                    Ok::<_, std::convert::Infallible>(
                        response.map(|inner| axum::body::Body::new(Tracked { inner, _busy: busy })),
                    )
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = close.notified() => {}
                () = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                }
            }
            if let Ok(mut o) = open.lock() {
                o.by_age.remove(&id);
            }
        });
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
