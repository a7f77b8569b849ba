//! The Prometheus `/metrics` exposition: a job-duration histogram the master feeds as results
//! arrive, and gauges read from a [`Snapshot`] of the store and broker at scrape time.
//!
//! Encoding is `prometheus-client`'s OpenMetrics text format; serve it with
//! [`CONTENT_TYPE`]. The gauges go through a [`Collector`] rather than long-lived gauge
//! families, so a worker or queue that disappears disappears from the next scrape too, and
//! series come out in the snapshot's order instead of a hash map's.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `gridq_jobs` | gauge | `state` |
//! | `gridq_job_duration_seconds` | histogram | |
//! | `gridq_store_errors_total` | counter | |
//! | `gridq_rejected_messages_total` | counter | `reason` |
//! | `gridq_workers_online` | gauge | |
//! | `gridq_worker_running_jobs` | gauge | `worker` |
//! | `gridq_queue_messages` | gauge | `queue`, `kind` = `ready` or `unacked` (when known) |
//! | `gridq_gpu_utilization_ratio` | gauge, 0..1 | `worker`, `gpu` |

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::broker_stats::QueueStats;

/// The `Content-Type` of [`Metrics::render`]'s output: OpenMetrics text 1.0.0, which
/// Prometheus negotiates by default. (`prometheus-client` names only the older Prometheus text
/// format's content type; its examples serve this one.)
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the duration buckets, in seconds: from a crashed-at-start 10 ms job to a
/// day-long training run.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
    43200.0, 86400.0,
];

/// The master's metrics. Clones share the same histogram and counter.
#[derive(Debug, Clone)]
pub struct Metrics {
    durations: Histogram,
    store_errors: Counter,
    rejected: Family<Vec<(String, String)>, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the gauges show at one scrape, read from the store and the broker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Jobs per state: `gridq_jobs{state}`.
    pub jobs_by_state: Vec<(String, u64)>,
    /// `gridq_workers_online`.
    pub workers_online: u64,
    /// Jobs running per worker: `gridq_worker_running_jobs{worker}`.
    pub running_by_worker: Vec<(String, u64)>,
    /// Queue depths: `gridq_queue_messages{queue,kind}`.
    pub queues: Vec<QueueStats>,
    /// Per worker and GPU index, utilization as a ratio 0..1:
    /// `gridq_gpu_utilization_ratio{worker,gpu}`.
    pub gpu_utilization: Vec<(String, u32, f64)>,
}

impl Metrics {
    /// An empty histogram with [`DURATION_BUCKETS`].
    pub fn new() -> Self {
        Self {
            durations: Histogram::new(DURATION_BUCKETS),
            store_errors: Counter::default(),
            rejected: Family::default(),
        }
    }

    /// Counts one failed step of the master's core: its store transaction was rolled back and
    /// the broker delivers its messages again.
    pub fn store_error(&self) {
        self.store_errors.inc();
    }

    /// How many steps of the master's core have failed since it started.
    pub fn store_errors(&self) -> u64 {
        self.store_errors.get()
    }

    /// Counts one event refused and dead-lettered, by why (`undecodable`, `no_user_id`,
    /// `wrong_user`).
    pub fn rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    /// How many events were refused for `reason`.
    pub fn rejected_count(&self, reason: &str) -> u64 {
        self.rejected
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .get()
    }

    /// Records the wall-clock duration of one finished job.
    pub fn observe_duration(&self, seconds: f64) {
        self.durations.observe(seconds);
    }

    /// The complete exposition of the histogram and the snapshot's gauges, ending in `# EOF`;
    /// serve it with [`CONTENT_TYPE`].
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut registry = Registry::default();
        // Registered without the unit suffix: the crate appends `_seconds` and adds the
        // `# UNIT` line OpenMetrics asks for.
        registry.register_with_unit(
            "gridq_job_duration",
            "Wall-clock duration of finished jobs",
            Unit::Seconds,
            self.durations.clone(),
        );
        // Registered without the suffix: the crate appends `_total` to counters.
        registry.register(
            "gridq_store_errors",
            "Failed steps of the master's core (the store transaction rolled back, its messages delivered again)",
            self.store_errors.clone(),
        );
        registry.register(
            "gridq_rejected_messages",
            "Events refused and dead-lettered, by reason: undecodable, no_user_id (no sender), wrong_user (a broker user speaking for another's worker)",
            self.rejected.clone(),
        );
        registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Encodes a [`Snapshot`]'s gauges, in its order.
#[derive(Debug)]
struct SnapshotCollector(Snapshot);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = &self.0;
        // Unit-less descriptors carry their full names: the crate adds no suffix to gauges.
        // Help texts end in a full stop, as the registry makes them for registered metrics.
        gauge_family(
            &mut encoder,
            "gridq_jobs",
            "Jobs by state.",
            None,
            snapshot
                .jobs_by_state
                .iter()
                .map(|(state, n)| (vec![("state", state.clone())], *n)),
        )?;
        gauge_family(
            &mut encoder,
            "gridq_workers_online",
            "Workers with a recent heartbeat.",
            None,
            [(Vec::new(), snapshot.workers_online)],
        )?;
        gauge_family(
            &mut encoder,
            "gridq_worker_running_jobs",
            "Jobs running on each worker.",
            None,
            snapshot
                .running_by_worker
                .iter()
                .map(|(worker, n)| (vec![("worker", worker.clone())], *n)),
        )?;
        gauge_family(
            &mut encoder,
            "gridq_queue_messages",
            "Messages in each gridq broker queue, ready or delivered and unacknowledged.",
            None,
            snapshot.queues.iter().flat_map(|queue| {
                let ready = (
                    vec![("queue", queue.name.clone()), ("kind", "ready".to_owned())],
                    queue.ready,
                );
                let unacked = queue.unacked.map(|n| {
                    (
                        vec![
                            ("queue", queue.name.clone()),
                            ("kind", "unacked".to_owned()),
                        ],
                        n,
                    )
                });
                std::iter::once(ready).chain(unacked)
            }),
        )?;
        gauge_family(
            &mut encoder,
            "gridq_gpu_utilization",
            "GPU utilization reported by workers, 0 to 1.",
            Some(&Unit::Other("ratio".into())),
            snapshot.gpu_utilization.iter().map(|(worker, gpu, ratio)| {
                (
                    vec![("worker", worker.clone()), ("gpu", gpu.to_string())],
                    *ratio,
                )
            }),
        )?;
        Ok(())
    }
}

/// One gauge metric family with a sample per label set. A family without samples still gets
/// its `# HELP`/`# TYPE` lines, so dashboards see the metric exists.
fn gauge_family<V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, V)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        unit,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    fn assert_has(text: &str, line: &str) {
        assert!(
            lines(text).contains(&line),
            "missing line {line:?} in:\n{text}"
        );
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            jobs_by_state: vec![("queued".into(), 12), ("succeeded".into(), 3)],
            workers_online: 2,
            running_by_worker: vec![("gpu-01".into(), 4), ("gpu-02".into(), 0)],
            queues: vec![
                QueueStats {
                    name: "gridq.events".into(),
                    ready: 1,
                    unacked: None,
                    consumers: 1,
                },
                QueueStats {
                    name: "gridq.jobs.default".into(),
                    ready: 5,
                    unacked: Some(2),
                    consumers: 1,
                },
            ],
            gpu_utilization: vec![("gpu-01".into(), 0, 0.75), ("gpu-01".into(), 1, 1.0)],
        }
    }

    #[test]
    fn gauges_come_out_with_their_exact_names_and_labels() {
        let text = Metrics::new().render(&snapshot());
        for line in [
            "# TYPE gridq_jobs gauge",
            r#"gridq_jobs{state="queued"} 12"#,
            r#"gridq_jobs{state="succeeded"} 3"#,
            "# TYPE gridq_workers_online gauge",
            "gridq_workers_online 2",
            "# TYPE gridq_worker_running_jobs gauge",
            r#"gridq_worker_running_jobs{worker="gpu-01"} 4"#,
            r#"gridq_worker_running_jobs{worker="gpu-02"} 0"#,
            "# TYPE gridq_queue_messages gauge",
            r#"gridq_queue_messages{queue="gridq.events",kind="ready"} 1"#,
            r#"gridq_queue_messages{queue="gridq.jobs.default",kind="ready"} 5"#,
            r#"gridq_queue_messages{queue="gridq.jobs.default",kind="unacked"} 2"#,
            "# TYPE gridq_gpu_utilization_ratio gauge",
            "# UNIT gridq_gpu_utilization_ratio ratio",
            r#"gridq_gpu_utilization_ratio{worker="gpu-01",gpu="0"} 0.75"#,
            r#"gridq_gpu_utilization_ratio{worker="gpu-01",gpu="1"} 1.0"#,
        ] {
            assert_has(&text, line);
        }
        // An unknown unacked count is left out, not shown as 0.
        assert!(
            !text.contains(r#"queue="gridq.events",kind="unacked""#),
            "{text}"
        );
        // Every sample belongs to one of the seven metrics, under its exact name.
        let names = [
            "gridq_jobs",
            "gridq_store_errors_total",
            "gridq_rejected_messages_total",
            "gridq_job_duration_seconds_bucket",
            "gridq_job_duration_seconds_sum",
            "gridq_job_duration_seconds_count",
            "gridq_workers_online",
            "gridq_worker_running_jobs",
            "gridq_queue_messages",
            "gridq_gpu_utilization_ratio",
        ];
        for line in lines(&text).into_iter().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(names.contains(&name), "unexpected sample {line:?}");
        }
    }

    #[test]
    fn histogram_counts_observations_per_bucket() {
        let metrics = Metrics::new();
        let shared = metrics.clone();
        for seconds in [0.005, 2.0, 45.0, 45.0, 100_000.0] {
            shared.observe_duration(seconds);
        }
        let text = metrics.render(&Snapshot::default());
        for line in [
            "# TYPE gridq_job_duration_seconds histogram",
            "# UNIT gridq_job_duration_seconds seconds",
            "gridq_job_duration_seconds_count 5",
            "gridq_job_duration_seconds_sum 100092.005",
            r#"gridq_job_duration_seconds_bucket{le="0.01"} 1"#,
            r#"gridq_job_duration_seconds_bucket{le="1.0"} 1"#,
            r#"gridq_job_duration_seconds_bucket{le="5.0"} 2"#,
            r#"gridq_job_duration_seconds_bucket{le="30.0"} 2"#,
            r#"gridq_job_duration_seconds_bucket{le="60.0"} 4"#,
            r#"gridq_job_duration_seconds_bucket{le="86400.0"} 4"#,
            r#"gridq_job_duration_seconds_bucket{le="+Inf"} 5"#,
        ] {
            assert_has(&text, line);
        }
        let buckets = lines(&text)
            .into_iter()
            .filter(|l| l.starts_with("gridq_job_duration_seconds_bucket"))
            .count();
        assert_eq!(buckets, DURATION_BUCKETS.len() + 1, "{text}");
    }

    #[test]
    fn store_errors_are_counted_across_clones() {
        let metrics = Metrics::new();
        let shared = metrics.clone();
        shared.store_error();
        shared.store_error();
        assert_eq!(metrics.store_errors(), 2);
        let text = metrics.render(&Snapshot::default());
        assert_has(&text, "# TYPE gridq_store_errors counter");
        assert_has(&text, "gridq_store_errors_total 2");
    }

    #[test]
    fn hostile_label_values_are_escaped() {
        let snapshot = Snapshot {
            running_by_worker: vec![("evil\"} 1\nfake_metric 9\\".into(), 1)],
            ..Snapshot::default()
        };
        let text = Metrics::new().render(&snapshot);
        assert_has(
            &text,
            r#"gridq_worker_running_jobs{worker="evil\"} 1\nfake_metric 9\\"} 1"#,
        );
        assert!(
            !lines(&text).iter().any(|l| l.starts_with("fake_metric")),
            "{text}"
        );
    }

    #[test]
    fn an_empty_snapshot_still_declares_every_metric_and_ends_with_eof() {
        let text = Metrics::default().render(&Snapshot::default());
        for name in [
            "gridq_jobs",
            "gridq_job_duration_seconds",
            "gridq_store_errors",
            "gridq_workers_online",
            "gridq_worker_running_jobs",
            "gridq_queue_messages",
            "gridq_gpu_utilization_ratio",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}:\n{text}");
        }
        assert_has(&text, "gridq_workers_online 0");
        assert_has(&text, "gridq_job_duration_seconds_count 0");
        assert_has(&text, "gridq_store_errors_total 0");
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    }
}
