//! What a job inherits from the worker's environment, and what it never sees.
//!
//! The worker's environment holds its secrets (the broker URL with its password, and whatever
//! else an operator exported to it), and a job is code the worker does not trust with them:
//! many training scripts print their whole environment. So a job's environment is built from
//! an allow-list, in this order (a later value of a name wins):
//!
//! 1. the worker's own environment, minus every variable whose name marks it as gridq's or the
//!    broker's ([`is_secret_name`]: `GRIDQ_*`, `RABBITMQ_*`, `AMQP_*`) and every variable whose
//!    value contains a secret the worker knows (its broker password, under any name);
//! 2. the sweep's `env`;
//! 3. the job variables the README documents (`GRIDQ_JOB_ID`, `GRIDQ_PARAM_*`, `GRIDQ_RESULT`...).

use std::ffi::{OsStr, OsString};
use std::sync::Arc;

use gridq_common::secret::Redactor;

/// Name prefixes of variables a job never inherits from the worker.
pub const SECRET_PREFIXES: [&str; 3] = ["GRIDQ_", "RABBITMQ_", "AMQP_"];

/// Whether a variable of the worker's environment is kept from jobs by its name alone.
pub fn is_secret_name(name: &OsStr) -> bool {
    let name = name.as_encoded_bytes();
    SECRET_PREFIXES
        .iter()
        .any(|p| name.len() >= p.len() && name[..p.len()].eq_ignore_ascii_case(p.as_bytes()))
}

/// What a job inherits of `vars` (the worker's environment), given the secrets the worker knows.
pub fn filter(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
    secrets: &Redactor,
) -> Vec<(OsString, OsString)> {
    vars.into_iter()
        .filter(|(name, value)| {
            !is_secret_name(name) && !secrets.finds_in(&value.to_string_lossy())
        })
        .collect()
}

/// What a job inherits of this process's environment: computed once per worker, shared by
/// every job.
pub fn inherited(secrets: &Redactor) -> Arc<[(OsString, OsString)]> {
    filter(std::env::vars_os(), secrets).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    #[test]
    fn keeps_the_environment_but_gridq_and_broker_variables() {
        let secrets = Redactor::for_broker_url("amqp://gridq:Pw-123456@h/%2f");
        let kept = filter(
            vars(&[
                ("PATH", "/usr/bin"),
                ("HOME", "/home/a"),
                ("GRIDQ_BROKER", "amqp://gridq:Pw-123456@h/%2f"),
                ("GRIDQ_TOKEN", "t0k"),
                ("gridq_state_dir", "/x"),
                ("RABBITMQ_DEFAULT_PASS", "x"),
                ("AMQP_URL", "amqp://h"),
                ("CELERY_BROKER_URL", "amqp://gridq:Pw-123456@h//"),
                ("NOTE", "uses Pw-123456 somewhere"),
                ("CUDA_HOME", "/usr/local/cuda"),
            ]),
            &secrets,
        );
        assert_eq!(
            kept,
            vars(&[
                ("PATH", "/usr/bin"),
                ("HOME", "/home/a"),
                ("CUDA_HOME", "/usr/local/cuda")
            ])
        );
    }
}
