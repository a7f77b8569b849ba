//! Connecting to the broker: URL redaction, connection names, and reconnection backoff.
//!
//! gridq services do not rely on client-side auto-recovery: when a connection drops, a service
//! throws away its channels and consumers and builds its session again from its own state, with
//! exponential backoff between attempts. That keeps the semantics explicit (what is in flight,
//! what must be re-sent) and the same for a broker restart, a network cut or a channel error.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

/// The default broker for local use.
pub const DEFAULT_BROKER: &str = "amqp://127.0.0.1:5672/%2f";

/// The URL with its password replaced by `***`, for logs and messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // userinfo ends at the last '@' before the first '/'.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{masked}{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// The URL's authority (`user:pass@host:port`) and the rest (the vhost path and query).
fn split_authority(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    Some((scheme, &rest[..end], &rest[end..]))
}

/// The user and password in a broker URL, as written (percent-encoded); `None` without both.
pub fn credentials(url: &str) -> Option<(&str, &str)> {
    let (_, authority, _) = split_authority(url)?;
    let at = authority.rfind('@')?;
    authority[..at].split_once(':')
}

/// The host a broker URL names (an IPv6 address keeps its brackets); `127.0.0.1` without one.
pub fn host(url: &str) -> String {
    let Some((_, authority, _)) = split_authority(url) else {
        return "127.0.0.1".to_owned();
    };
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host_port.starts_with('[') {
        host_port.split_inclusive(']').next().unwrap_or(host_port)
    } else {
        host_port.split(':').next().unwrap_or(host_port)
    };
    if host.is_empty() {
        "127.0.0.1".to_owned()
    } else {
        host.to_owned()
    }
}

/// The user a broker URL logs in as, decoded: what RabbitMQ checks a message's `user_id`
/// property against. `guest` when the URL names none (AMQP clients' default).
pub fn user(url: &str) -> String {
    let Some((_, authority, _)) = split_authority(url) else {
        return "guest".to_owned();
    };
    match authority.rsplit_once('@') {
        Some((userinfo, _)) => {
            let u = userinfo.split(':').next().unwrap_or("");
            percent_decode(u).unwrap_or_else(|| u.to_owned())
        }
        None => "guest".to_owned(),
    }
}

/// `%XX` escapes decoded; `None` when there are none or the result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return None;
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The vhost a broker URL names, decoded; `/` when it names none (as AMQP clients take it).
pub fn vhost(url: &str) -> String {
    let Some((_, _, rest)) = split_authority(url) else {
        return "/".to_owned();
    };
    let path = rest.split('?').next().unwrap_or("");
    match path.strip_prefix('/') {
        None => "/".to_owned(),
        Some(v) => percent_decode(v).unwrap_or_else(|| v.to_owned()),
    }
}

/// The same URL with its vhost replaced by `vhost` (percent-encoded), keeping any query.
pub fn with_vhost(url: &str, vhost: &str) -> String {
    let Some((scheme, authority, rest)) = split_authority(url) else {
        return url.to_owned();
    };
    let query = rest.find('?').map_or("", |q| &rest[q..]);
    format!("{scheme}://{authority}/{}{query}", percent_encode(vhost))
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for URL paths (a vhost in
/// an AMQP URL or a management API path).
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Whether the URL logs in as `guest`, which RabbitMQ allows only over loopback.
pub fn uses_guest(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => authority[..at].split(':').next() == Some("guest"),
        // No credentials: clients default to guest.
        None => true,
    }
}

/// The URL query parameter naming a PEM file of the CA certificates that an `amqps://` broker's
/// certificate must chain to (the name RabbitMQ's URI spec gives it). Without it, the public CAs
/// of webpki-roots are trusted.
pub const CA_FILE_PARAM: &str = "cacertfile";

/// The value of query parameter `name` in a URL, percent-decoded.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v).unwrap_or_else(|| v.to_owned()))
    })
}

/// The URL with query parameter `name` set to `value` (replacing one it had).
pub fn with_query_param(url: &str, name: &str, value: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some(name))
        .map(str::to_owned)
        .collect();
    pairs.push(format!("{name}={}", percent_encode(value)));
    format!("{base}?{}", pairs.join("&"))
}

/// Whether the URL is `amqps://` (TLS).
pub fn is_tls(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("amqps://"))
}

/// The TLS settings a URL asks for: the CA file of [`CA_FILE_PARAM`], read now.
fn tls_config(url: &str) -> Result<lapin::tcp::OwnedTLSConfig, lapin::Error> {
    let mut config = lapin::tcp::OwnedTLSConfig::default();
    if let Some(path) = query_param(url, CA_FILE_PARAM) {
        let pem = std::fs::read_to_string(&path).map_err(|e| {
            lapin::Error::from(std::io::Error::new(
                e.kind(),
                format!("{CA_FILE_PARAM} {path}: {e}"),
            ))
        })?;
        config.cert_chain = Some(pem);
    }
    Ok(config)
}

/// Opens a connection named `name` (shown in the broker's management UI). An `amqps://` URL
/// connects with TLS and verifies the broker's certificate and address against the CA of
/// [`CA_FILE_PARAM`] (or the public CAs).
///
/// # Errors
/// lapin's error; the caller adds the redacted URL as context.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let uri = url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
        lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    })?;
    connect_uri(url, uri, name).await
}

async fn connect_uri(
    url: &str,
    uri: lapin::uri::AMQPUri,
    name: &str,
) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let tls = tls_config(url)?;
    Connection::connect_uri_with_config(uri, properties, tls, lapin::runtime::default_runtime()?)
        .await
}

/// The largest frame a small connection asks for (AMQP's minimum is 4,096 bytes).
pub const SMALL_FRAME_MAX: u32 = 16 * 1024;

/// Like [`connect`], for a process that should stay small (a worker): it asks the broker for
/// frames of at most [`SMALL_FRAME_MAX`] bytes unless the URL sets `frame_max` itself.
///
/// lapin keeps a send and a receive buffer of 32 frames each, zero-filled, so with RabbitMQ's
/// default `frame_max` of 128 KiB a connection holds 8 MiB of resident memory (which every
/// `fork` of a job then copies page tables for). A message larger than a frame is split into
/// more body frames: a little more framing for large results, none for claims and grants.
///
/// # Errors
/// lapin's error, also for a URL that does not parse.
pub async fn connect_small(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let Ok(mut uri) = url.parse::<lapin::uri::AMQPUri>() else {
        // lapin reports the parse error.
        return connect(url, name).await;
    };
    if uri.query.frame_max.is_none() {
        uri.query.frame_max = Some(SMALL_FRAME_MAX);
    }
    connect_uri(url, uri, name).await
}

/// Exponential backoff with a cap: 100 ms, 200 ms, ... up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            next: initial,
            initial,
            max,
        }
    }

    /// The delay to wait now; the next one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// After a success, start again from the initial delay.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("amqp://gridq:s3cr3t@10.0.0.1:5672/%2f"),
            "amqp://gridq:***@10.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://p%40ss@host/vh"), "amqp://p%40ss@host/vh");
        assert_eq!(redact("amqp://u:p@ss@host/vh"), "amqp://u:***@host/vh");
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn reads_credentials_and_vhosts() {
        assert_eq!(credentials("amqp://u:p%40w@h:1/v"), Some(("u", "p%40w")));
        assert_eq!(credentials("amqp://h:1/v"), None);
        assert_eq!(percent_decode("p%40w%2F"), Some("p@w/".to_owned()));
        assert_eq!(percent_decode("plain"), None);
        assert_eq!(percent_decode("bad%zz%4"), Some("bad%zz%4".to_owned()));
        assert_eq!(vhost("amqp://u:p@h:1"), "/");
        assert_eq!(vhost("amqp://u:p@h:1/%2f"), "/");
        assert_eq!(vhost("amqps://u:p@h:1/gridq-a?heartbeat=5"), "gridq-a");
        assert_eq!(
            with_vhost("amqp://u:p@h:1/%2f?heartbeat=5", "gridq/x"),
            "amqp://u:p@h:1/gridq%2Fx?heartbeat=5"
        );
        assert_eq!(with_vhost("amqp://h", "v"), "amqp://h/v");
        assert_eq!(host("amqps://u:p@broker.lan:5671/v"), "broker.lan");
        assert_eq!(host("amqp://[::1]:5672"), "[::1]");
        assert_eq!(host("amqp://"), "127.0.0.1");
        assert_eq!(user("amqp://w%2B1:p@h/v"), "w+1");
        assert_eq!(user("amqp://h:5672"), "guest");
    }

    #[test]
    fn reads_and_sets_query_parameters() {
        let url = "amqps://u:p@h:5671/v?heartbeat=5&cacertfile=%2Fetc%2Fca.pem";
        assert_eq!(
            query_param(url, CA_FILE_PARAM).as_deref(),
            Some("/etc/ca.pem")
        );
        assert_eq!(query_param("amqp://h/v", CA_FILE_PARAM), None);
        assert_eq!(
            with_query_param(url, CA_FILE_PARAM, "/x/ca.pem"),
            "amqps://u:p@h:5671/v?heartbeat=5&cacertfile=%2Fx%2Fca.pem"
        );
        assert_eq!(
            with_query_param("amqps://h/v", CA_FILE_PARAM, "/ca"),
            "amqps://h/v?cacertfile=%2Fca"
        );
        assert!(is_tls("AMQPS://h") && !is_tls("amqp://h"));
    }

    #[test]
    fn detects_guest() {
        assert!(uses_guest("amqp://guest:guest@10.0.0.1/"));
        assert!(uses_guest("amqp://127.0.0.1:5672"));
        assert!(!uses_guest("amqp://gridq:x@127.0.0.1:5672/%2f"));
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }
}
