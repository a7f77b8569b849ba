//! In-process expansion throughput on a 1,000,000-job grid (target: >= 2,000,000 jobs/s).
//!
//! Run with `cargo bench -p gridq-master --bench expand`. Each round expands the whole grid,
//! touching every job's argv and id so nothing is optimised away; the best and median rounds are
//! reported.

use std::hint::black_box;
use std::time::Instant;

use gridq_master::sweep::{LoadOptions, load_str};

const GRID: &str = "\
name: bench
command: python train.py {args}
max_jobs: 1000000
parameters:
  lr: {geomspace: [1e-5, 1e-1, 10]}
  epochs: !!python/tuple [1, 101, 1]
  batch_size: [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
  seed: {range: [0, 100]}
  model: resnet18
";

fn main() {
    let loaded =
        load_str(GRID, "bench.yaml", "bench", &LoadOptions::default()).expect("bench sweep loads");
    let sweep = loaded.sweep;
    assert_eq!(sweep.count().jobs, 1_000_000);
    let rounds = 7;
    let mut rates = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        let mut n = 0u64;
        let mut bytes = 0usize;
        for job in sweep.expand().expect("within max_jobs") {
            n += 1;
            bytes += job.argv.len() + usize::from(job.id.as_bytes()[0]);
            black_box(&job);
        }
        let secs = start.elapsed().as_secs_f64();
        black_box(bytes);
        assert_eq!(n, 1_000_000);
        rates.push(n as f64 / secs);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "expand 1M jobs in-process: median {:.0} jobs/s, best {:.0} jobs/s ({rounds} rounds)",
        rates[rounds / 2],
        rates[rounds - 1]
    );
}
