//! Secrets that must never leave a process in what a job prints: the broker password, the
//! master's token.
//!
//! A job may print a secret it found somewhere (its environment is scrubbed, but a job can read
//! files or be handed a URL by its own configuration). Every process that forwards or stores a
//! job's output and results redacts the secrets it knows before the text leaves it: the worker
//! its broker password, the master its broker password and its API token.

use std::borrow::Cow;

/// What a redacted secret is replaced with.
pub const MASK: &str = "***";

/// Known secret strings, replaced by [`MASK`] wherever they appear.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Longest first, so a secret that contains another is masked whole.
    needles: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets themselves.
        f.debug_struct("Redactor")
            .field("secrets", &self.needles.len())
            .finish()
    }
}

impl Redactor {
    /// A redactor for the password in a broker URL (as written and percent-decoded). `guest`'s
    /// well-known password is no secret and is left alone.
    pub fn for_broker_url(url: &str) -> Self {
        let mut r = Self::default();
        if let Some((user, password)) = crate::amqp::credentials(url) {
            if user != "guest" {
                r.add(password);
            }
        }
        r
    }

    /// Adds a secret. Empty strings are ignored.
    pub fn add(&mut self, secret: impl Into<String>) -> &mut Self {
        let secret = secret.into();
        if !secret.is_empty() && !self.needles.contains(&secret) {
            // A percent-encoded password is also looked for as it would be decoded.
            let decoded = crate::amqp::percent_decode(&secret);
            self.needles.push(secret);
            if let Some(d) = decoded.filter(|d| !d.is_empty() && !self.needles.contains(d)) {
                self.needles.push(d);
            }
            self.needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        }
        self
    }

    /// Whether there is nothing to redact.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// Whether `text` contains a known secret.
    pub fn finds_in(&self, text: &str) -> bool {
        self.needles.iter().any(|n| text.contains(n.as_str()))
    }

    /// `text` with every known secret replaced by [`MASK`]; borrowed when there was none.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = Cow::Owned(out.replace(n.as_str(), MASK));
            }
        }
        out
    }

    /// Redacts `text` in place; true when something was masked.
    pub fn redact_in_place(&self, text: &mut String) -> bool {
        match self.redact(text) {
            Cow::Borrowed(_) => false,
            Cow::Owned(masked) => {
                *text = masked;
                true
            }
        }
    }

    /// Masks the secrets in what a worker message carries of a job's own making: output lines,
    /// results and failure reasons. Every process that forwards or stores such a message calls
    /// this one function, so they agree on which fields a job can fill.
    pub fn redact_event(&self, event: &mut crate::wire::FromWorker) {
        use crate::wire::FromWorker;
        if self.is_empty() {
            return;
        }
        match event {
            FromWorker::Output(batch) => {
                for l in &mut batch.lines {
                    self.redact_in_place(&mut l.line);
                }
            }
            FromWorker::Finished(results) => {
                for f in &mut results.results {
                    if let Some(r) = &mut f.result {
                        self.redact_object(r);
                    }
                    if let Some(reason) = &mut f.reason {
                        self.redact_in_place(reason);
                    }
                }
            }
            FromWorker::Claim(_)
            | FromWorker::Release(_)
            | FromWorker::Heartbeat(_)
            | FromWorker::Stopped(_) => {}
        }
    }

    /// Redacts every string inside a JSON value (keys and values).
    pub fn redact_json(&self, value: &mut serde_json::Value) {
        use serde_json::Value;
        if self.is_empty() {
            return;
        }
        match value {
            Value::String(s) => {
                self.redact_in_place(s);
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            Value::Object(map) => self.redact_object(map),
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }

    /// Redacts every string inside a JSON object (keys and values).
    pub fn redact_object(&self, map: &mut serde_json::Map<String, serde_json::Value>) {
        if self.is_empty() {
            return;
        }
        if map.keys().any(|k| self.finds_in(k)) {
            let entries = std::mem::take(map);
            for (k, v) in entries {
                map.insert(self.redact(&k).into_owned(), v);
            }
        }
        map.values_mut().for_each(|v| self.redact_json(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_broker_password_as_written_and_decoded() {
        let r = Redactor::for_broker_url("amqp://gridq:p%40ss-w0rd@host:5672/%2f");
        assert_eq!(
            r.redact("url amqp://gridq:p%40ss-w0rd@host, plain p@ss-w0rd."),
            "url amqp://gridq:***@host, plain ***."
        );
        assert!(matches!(r.redact("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn guest_and_no_credentials_have_nothing_to_mask() {
        assert!(Redactor::for_broker_url("amqp://guest:guest@127.0.0.1/").is_empty());
        assert!(Redactor::for_broker_url("amqp://127.0.0.1:5672").is_empty());
    }

    #[test]
    fn the_longest_secret_is_masked_whole() {
        let mut r = Redactor::default();
        r.add("abc").add("abcdef");
        assert_eq!(r.redact("xabcdefx abc"), "x***x ***");
    }

    #[test]
    fn json_strings_and_keys_are_masked() {
        let mut r = Redactor::default();
        r.add("tok3n");
        let mut v = serde_json::json!({"k": "a tok3n", "tok3n": [1, "tok3n"], "n": 1});
        r.redact_json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"k": "a ***", "***": [1, "***"], "n": 1})
        );
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let mut r = Redactor::default();
        r.add("s3cr3t");
        assert!(!format!("{r:?}").contains("s3cr3t"));
    }
}
