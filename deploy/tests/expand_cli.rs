//! `gridq expand`, run as a user runs it: the example projects expand to their documented jobs,
//! each output format says exactly what it promises, and every bad input exits 2 with nothing on
//! stdout and one `error: FILE:LINE:COL: ...` line on stderr.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use serde_json::{Value, json};
use tempfile::TempDir;

fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn gridq() -> Command {
    Command::cargo_bin("gridq").expect("the gridq binary is built for integration tests")
}

/// What one run printed.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run_in(dir: &Path, args: &[&str]) -> Run {
    let out = gridq()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("gridq runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    }
}

/// Runs `gridq expand ARGS` from the repository root and expects success.
fn expand_ok(args: &[&str]) -> Run {
    let mut all = vec!["expand"];
    all.extend_from_slice(args);
    let run = run_in(&repo_root(), &all);
    assert_eq!(run.code, Some(0), "gridq {all:?} failed: {run:?}");
    run
}

/// A scratch directory holding sweep files, which runs use as their working directory so that
/// the paths in messages are exactly the names passed on the command line.
struct Scratch(TempDir);

impl Scratch {
    fn new() -> Self {
        Self(tempfile::tempdir().expect("a temporary directory"))
    }

    fn write(&self, name: &str, text: &str) -> &Self {
        std::fs::write(self.0.path().join(name), text).expect("writing a sweep file");
        self
    }

    fn run(&self, args: &[&str]) -> Run {
        run_in(self.0.path(), args)
    }

    fn expand_ok(&self, args: &[&str]) -> Run {
        let mut all = vec!["expand"];
        all.extend_from_slice(args);
        let run = self.run(&all);
        assert_eq!(run.code, Some(0), "gridq {all:?} failed: {run:?}");
        run
    }
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn argvs(jobs: &[Value]) -> Vec<Vec<String>> {
    jobs.iter()
        .map(|j| {
            j["argv"]
                .as_array()
                .unwrap_or_else(|| panic!("no argv array in {j}"))
                .iter()
                .map(|a| a.as_str().expect("argv elements are strings").to_owned())
                .collect()
        })
        .collect()
}

fn is_job_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks what every JSON listing promises: `index` runs 0..n and the ids are distinct job ids.
fn check_indices_and_ids(jobs: &[Value]) {
    let mut seen = std::collections::HashSet::new();
    for (i, job) in jobs.iter().enumerate() {
        assert_eq!(job["index"], json!(i), "{job}");
        let id = job["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {job}"));
        assert!(is_job_id(id), "bad id in {job}");
        assert!(seen.insert(id.to_owned()), "duplicate id in {job}");
    }
}

/// The Cartesian product of `params`, first parameter slowest, as `--name=value` flags after
/// `prefix`.
fn product(prefix: &[&str], params: &[(&str, &[&str])]) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = vec![prefix.iter().map(|s| (*s).to_owned()).collect()];
    for (name, values) in params {
        rows = rows
            .into_iter()
            .flat_map(|row| {
                values.iter().map(move |v| {
                    let mut row = row.clone();
                    row.push(format!("--{name}={v}"));
                    row
                })
            })
            .collect();
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// The example projects

#[test]
fn train_sweep_expands_to_its_24_jobs_in_product_order() {
    let run = expand_ok(&["projects/train/sweep.yaml", "--format", "json"]);
    assert_eq!(run.stderr, "");
    let jobs = json_lines(&run.stdout);
    assert_eq!(jobs.len(), 24);
    check_indices_and_ids(&jobs);
    assert_eq!(
        argvs(&jobs),
        product(
            &["python3", "train.py"],
            &[
                ("lr", &["0.01", "0.05", "0.1", "0.5"]),
                ("epochs", &["5", "10", "15"]),
                ("batch_size", &["16", "64"]),
                ("seed", &["0"]),
            ]
        )
    );

    // First and last lines, byte for byte apart from the id: key order, numbers as numbers,
    // parameters in file order.
    let lines: Vec<&str> = run.stdout.lines().collect();
    let id = |j: &Value| j["id"].as_str().unwrap().to_owned();
    assert_eq!(
        lines[0],
        format!(
            r#"{{"id":"{}","index":0,"params":{{"lr":0.01,"epochs":5,"batch_size":16,"seed":0}},"argv":["python3","train.py","--lr=0.01","--epochs=5","--batch_size=16","--seed=0"]}}"#,
            id(&jobs[0])
        )
    );
    assert_eq!(
        lines[23],
        format!(
            r#"{{"id":"{}","index":23,"params":{{"lr":0.5,"epochs":15,"batch_size":64,"seed":0}},"argv":["python3","train.py","--lr=0.5","--epochs=15","--batch_size=64","--seed=0"]}}"#,
            id(&jobs[23])
        )
    );
}

#[test]
fn project_files_expand_to_their_documented_jobs() {
    let cases = [
        (
            "projects/train/parameters.yml",
            Some("python3 train.py"),
            8,
            product(
                &["python3", "train.py"],
                &[
                    ("lr", &["0.01", "0.1"]),
                    ("epochs", &["5", "10"]),
                    ("batch_size", &["32", "128"]),
                ],
            ),
        ),
        (
            "projects/echo/sweep.yaml",
            None,
            6,
            product(
                &["python3", "echo.py"],
                &[
                    ("word", &["alpha", "beta", "gamma"]),
                    ("n", &["1", "2"]),
                    ("lines", &["3"]),
                    ("sleep", &["0.1"]),
                ],
            ),
        ),
        (
            "projects/echo/parameters.yml",
            Some("python3 echo.py"),
            6,
            product(
                &["python3", "echo.py"],
                &[
                    ("message", &["hello", "world"]),
                    ("count", &["1", "2", "3"]),
                ],
            ),
        ),
    ];
    for (file, command, n, want) in cases {
        let mut args = vec![file];
        if let Some(c) = command {
            args.extend(["--command", c]);
        }
        let count = expand_ok(&[&args[..], &["--format", "count"]].concat());
        assert_eq!(count.stdout, format!("{n}\n"), "{file}");
        let run = expand_ok(&[&args[..], &["--format", "json"]].concat());
        assert_eq!(run.stderr, "", "{file}");
        let jobs = json_lines(&run.stdout);
        check_indices_and_ids(&jobs);
        assert_eq!(argvs(&jobs), want, "{file}");
    }
}

// ---------------------------------------------------------------------------------------------
// Output formats

#[test]
fn text_format_is_id_two_spaces_and_the_shell_quoted_argv() {
    let text = expand_ok(&["projects/train/sweep.yaml"]);
    assert_eq!(text.stderr, "24 jobs\n");
    let json = expand_ok(&["projects/train/sweep.yaml", "--format", "json"]);
    let jobs = json_lines(&json.stdout);
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert_eq!(lines.len(), 24);
    for (line, job) in lines.iter().zip(&jobs) {
        let (id, rest) = line.split_at(32);
        assert!(is_job_id(id), "{line}");
        assert_eq!(id, job["id"].as_str().unwrap(), "text and json ids differ");
        let quoted = rest
            .strip_prefix("  ")
            .unwrap_or_else(|| panic!("no two spaces after the id: {line}"));
        assert!(!quoted.starts_with(' '), "{line}");
        let words = shell_words::split(quoted).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(words, argvs(std::slice::from_ref(job))[0], "{line}");
    }
    assert_eq!(
        &lines[0][32..],
        "  python3 train.py '--lr=0.01' '--epochs=5' '--batch_size=16' '--seed=0'"
    );
}

#[test]
fn json_keeps_numbers_numbers_bools_bools_and_strings_strings() {
    let dir = Scratch::new();
    dir.write(
        "types.yaml",
        "command: prog\nparameters:\n  lr: [0.01, 1e-5]\n  flag: [true, false]\n  name: [abc, \"007\"]\n  n: 3\n",
    );
    let run = dir.expand_ok(&["types.yaml", "--format", "json"]);
    assert_eq!(run.stderr, "");
    let lines: Vec<&str> = run.stdout.lines().collect();
    let jobs = json_lines(&run.stdout);
    assert_eq!(jobs.len(), 8);
    check_indices_and_ids(&jobs);

    let first = &jobs[0];
    assert_eq!(
        first["params"],
        json!({"lr": 0.01, "flag": true, "name": "abc", "n": 3})
    );
    assert!(first["params"]["lr"].is_number() && first["params"]["n"].is_u64());
    assert_eq!(
        first["argv"],
        json!(["prog", "--lr=0.01", "--flag", "--name=abc", "--n=3"])
    );
    // `false` is a JSON false and omits the flag; a quoted number is a string.
    assert_eq!(
        jobs[3]["params"],
        json!({"lr": 0.01, "flag": false, "name": "007", "n": 3})
    );
    assert_eq!(
        jobs[3]["argv"],
        json!(["prog", "--lr=0.01", "--name=007", "--n=3"])
    );
    // `1e-5` is a JSON number written as in the file, and renders as written.
    assert!(
        lines[4].contains(r#""params":{"lr":1e-5,"flag":true,"name":"abc","n":3}"#),
        "{}",
        lines[4]
    );
    assert_eq!(
        jobs[4]["argv"],
        json!(["prog", "--lr=1e-5", "--flag", "--name=abc", "--n=3"])
    );
}

#[test]
fn count_format_prints_the_number_alone() {
    let run = expand_ok(&["projects/train/sweep.yaml", "--format", "count"]);
    assert_eq!(run.stdout, "24\n");
    assert_eq!(run.stderr, "");
    // With --limit, the count is what would be produced.
    let run = expand_ok(&[
        "projects/train/sweep.yaml",
        "--format",
        "count",
        "--limit",
        "5",
    ]);
    assert_eq!(run.stdout, "5\n");
}

#[test]
fn limit_gives_exactly_the_first_n_jobs() {
    let all = json_lines(&expand_ok(&["projects/train/sweep.yaml", "-f", "json"]).stdout);
    let run = expand_ok(&["projects/train/sweep.yaml", "-f", "json", "--limit", "3"]);
    assert_eq!(json_lines(&run.stdout), all[..3]);

    let text = expand_ok(&["projects/train/sweep.yaml", "--limit", "3"]);
    assert_eq!(text.stdout.lines().count(), 3);
    assert_eq!(text.stderr, "3 jobs\n");

    let none = expand_ok(&["projects/train/sweep.yaml", "--limit", "0"]);
    assert_eq!(none.stdout, "");
    assert_eq!(none.stderr, "0 jobs\n");
}

#[test]
fn above_max_jobs_count_works_and_expansion_is_refused() {
    let dir = Scratch::new();
    let grid = "command: prog\nparameters:\n  a: {range: [0, 1000]}\n  b: {range: [0, 1000]}\n  c: {range: [0, 1000]}\n";
    dir.write("big.yaml", grid);
    let count = dir.expand_ok(&["big.yaml", "--format", "count"]);
    assert_eq!(count.stdout, "1000000000\n");
    assert_eq!(count.stderr, "");

    let expected = "error: big.yaml:3:3: this sweep would produce 1000000000 jobs, more than max_jobs (100000); add `max_jobs: 1000000000` to the sweep file or pass `--max-jobs 1000000000` to allow it, or narrow the parameters\n";
    for format in ["json", "text"] {
        gridq()
            .current_dir(dir.0.path())
            .args(["expand", "big.yaml", "--format", format])
            .assert()
            .code(2)
            .stdout("")
            .stderr(expected);
    }

    // Following the advice works, and expansion is lazy: the first jobs come at once.
    dir.write("raised.yaml", &format!("max_jobs: 1000000000\n{grid}"));
    let run = dir.expand_ok(&["raised.yaml", "--format", "json", "--limit", "2"]);
    assert_eq!(
        argvs(&json_lines(&run.stdout)),
        [
            ["prog", "--a=0", "--b=0", "--c=0"],
            ["prog", "--a=0", "--b=0", "--c=1"]
        ]
    );
}

#[test]
fn a_bare_file_above_the_limit_names_max_jobs_and_max_jobs_raises_it() {
    let dir = Scratch::new();
    // A bare mlframework parameters.yml: 1000 x 200 = 200,000 jobs, twice the default limit.
    dir.write(
        "parameters.yml",
        "a: {range: [0, 1000]}\nb: {range: [0, 200]}\n",
    );
    let refused = |limit: &str| {
        format!(
            "error: parameters.yml:1:1: this sweep would produce 200000 jobs, more than the limit of {limit}; pass `--max-jobs 200000` to allow it (a bare parameters file cannot set `max_jobs`: it would be a parameter), or narrow the parameters\n"
        )
    };
    for (extra, limit) in [
        (&[][..], "100000"),
        (&["--max-jobs", "199999"][..], "199999"),
    ] {
        let mut args = vec!["expand", "parameters.yml", "-c", "prog"];
        args.extend_from_slice(extra);
        let run = dir.run(&args);
        assert_eq!(run.code, Some(2), "{run:?}");
        assert_eq!(run.stdout, "");
        assert_eq!(run.stderr, refused(limit));
    }
    let run = dir.expand_ok(&["parameters.yml", "-c", "prog", "--max-jobs", "200000"]);
    assert_eq!(run.stderr, "200000 jobs\n");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 200_000);
    assert!(lines[0].ends_with("  prog '--a=0' '--b=0'"), "{}", lines[0]);
    assert!(
        lines[199_999].ends_with("  prog '--a=999' '--b=199'"),
        "{}",
        lines[199_999]
    );

    // `--max-jobs` replaces a full file's `max_jobs`, either way.
    dir.write(
        "full.yaml",
        "max_jobs: 10\ncommand: prog\nparameters:\n  a: [1, 2, 3]\n  b: [1, 2, 3, 4]\n",
    );
    let run = dir.run(&["expand", "full.yaml"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert_eq!(
        run.stderr,
        "error: full.yaml:4:3: this sweep would produce 12 jobs, more than max_jobs (10); add `max_jobs: 12` to the sweep file or pass `--max-jobs 12` to allow it, or narrow the parameters\n"
    );
    assert_eq!(
        dir.expand_ok(&["full.yaml", "--max-jobs", "12"]).stderr,
        "12 jobs\n"
    );
    let run = dir.run(&["expand", "full.yaml", "--max-jobs", "11"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("more than max_jobs (11)"),
        "{}",
        run.stderr
    );

    // Zero or a word is a usage error naming the flag.
    for bad in ["0", "many"] {
        let run = dir.run(&["expand", "full.yaml", "--max-jobs", bad]);
        assert_eq!(run.code, Some(2), "{run:?}");
        assert_eq!(run.stdout, "");
        assert!(
            run.stderr.starts_with(&format!(
                "error: invalid value '{bad}' for '--max-jobs <N>': "
            )),
            "{}",
            run.stderr
        );
    }
}

#[test]
fn limit_lists_the_first_jobs_of_a_billion_job_grid_without_counting_it() {
    let dir = Scratch::new();
    // 10^9 combinations; `{a}-{b}` in one element makes it collision-prone, so an exact count
    // would need a full expansion: `--limit` must not try.
    dir.write(
        "big.yml",
        "command: [prog, \"{a}-{b}\"]\nparameters:\n  a: {range: [0, 1000]}\n  b: {range: [0, 1000]}\n  c: {range: [0, 1000]}\n",
    );
    let run = dir.expand_ok(&["big.yml", "--limit", "5", "--format", "json"]);
    assert_eq!(
        argvs(&json_lines(&run.stdout)),
        (0..5)
            .map(|c| vec!["prog".to_owned(), "0-0".to_owned(), format!("--c={c}")])
            .collect::<Vec<_>>()
    );
    assert_eq!(run.stderr, "");
    let run = dir.expand_ok(&["big.yml", "--limit", "5"]);
    assert_eq!(run.stdout.lines().count(), 5);
    assert_eq!(run.stderr, "5 jobs\n");
    // Without a limit the whole sweep is checked, and refused.
    let run = dir.run(&["expand", "big.yml"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert_eq!(run.stdout, "");
    assert_eq!(
        run.stderr,
        "error: big.yml:3:3: this sweep would produce up to 1000000000 jobs, more than max_jobs (100000); add `max_jobs: 1000000000` to the sweep file or pass `--max-jobs 1000000000` to allow it, or narrow the parameters\n"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad input: exit 2, nothing on stdout, one error line on stderr

/// What stderr must be.
enum Stderr {
    /// Exactly this line.
    Line(&'static str),
    /// One line starting with this (the rest comes from a library or the OS).
    Starts(&'static str),
}

struct Bad {
    file: &'static str,
    text: &'static str,
    args: &'static [&'static str],
    stderr: Stderr,
}

const NO_ARGS: &[&str] = &[];

fn bad_cases() -> Vec<Bad> {
    use Stderr::{Line, Starts};
    fn bad(
        file: &'static str,
        text: &'static str,
        args: &'static [&'static str],
        stderr: Stderr,
    ) -> Bad {
        Bad {
            file,
            text,
            args,
            stderr,
        }
    }
    vec![
        bad(
            "syntax.yaml",
            "command: x\nparameters:\n  lr: [1, 2\n  b: 3\n",
            NO_ARGS,
            Starts("error: syntax.yaml:4:4: YAML syntax error: "),
        ),
        bad(
            "dup.yaml",
            "command: x\nparameters:\n  lr: [1]\n  epochs: 2\n  lr: 3\n",
            NO_ARGS,
            Line("error: dup.yaml:5:3: duplicate key `lr` (first defined at line 3, column 3)"),
        ),
        bad(
            "dup-bare.yaml",
            "lr: [1]\nepochs: 2\nlr: 3\n",
            &["--command", "prog"],
            Line(
                "error: dup-bare.yaml:3:1: duplicate key `lr` (first defined at line 1, column 1)",
            ),
        ),
        bad(
            "empty.yaml",
            "",
            NO_ARGS,
            Line(
                "error: empty.yaml:1:1: the file is empty: expected a mapping of sweep options (with `parameters:`) or of parameters",
            ),
        ),
        bad(
            "comment.yaml",
            "# nothing but a comment\n",
            NO_ARGS,
            Line(
                "error: comment.yaml:1:1: the file is empty: expected a mapping of sweep options (with `parameters:`) or of parameters",
            ),
        ),
        bad(
            "list.yaml",
            "- lr\n- epochs\n",
            NO_ARGS,
            Line("error: list.yaml:1:1: the top level must be a mapping, found a list"),
        ),
        bad(
            "scalar.yaml",
            "hello\n",
            NO_ARGS,
            Line("error: scalar.yaml:1:1: the top level must be a mapping, found a scalar"),
        ),
        bad(
            "null.yaml",
            "command: x\nparameters:\n  lr: ~\n",
            NO_ARGS,
            Line(
                "error: null.yaml:3:7: parameter `lr`: null value: expected a value (write \"\" for an empty string, or remove the parameter)",
            ),
        ),
        bad(
            "null-word.yaml",
            "command: x\nparameters:\n  epochs: 5\n  lr: null\n",
            NO_ARGS,
            Line(
                "error: null-word.yaml:4:7: parameter `lr`: null value: expected a value (write \"\" for an empty string, or remove the parameter)",
            ),
        ),
        bad(
            "typo.yaml",
            "command: x\nparametrs:\n  a: 1\nparameters:\n  lr: [1, 2]\n",
            NO_ARGS,
            Line(
                "error: typo.yaml:2:1: unknown field `parametrs`, expected one of `name`, `command`, `parameters`, `zip`, `exclude`, `max_jobs`, `repeat`, `arg_style`, `retries`, `timeout`, `gpus`, `queue`, `env`, `workdir`, `same_code`",
            ),
        ),
        bad(
            "tag.yaml",
            "command: x\nparameters:\n  lr: !!python/object:os.system [echo hi]\n",
            NO_ARGS,
            Line(
                "error: tag.yaml:3:7: unsupported tag `!!python/object:os.system`: the only tag gridq accepts is `!!python/tuple` (tags are never executed)",
            ),
        ),
        bad(
            "empty-list.yaml",
            "command: x\nparameters:\n  lr: []\n",
            NO_ARGS,
            Line(
                "error: empty-list.yaml:3:7: parameter `lr`: empty list: expected at least one value",
            ),
        ),
        bad(
            "tuple1.yaml",
            "command: x\nparameters:\n  lr: !!python/tuple [1]\n",
            NO_ARGS,
            Line(
                "error: tuple1.yaml:3:7: parameter `lr`: `!!python/tuple` expects [start, end] or [start, end, step], found 1 element",
            ),
        ),
        bad(
            "tuple4.yaml",
            "command: x\nparameters:\n  lr: !!python/tuple [1, 2, 3, 4]\n",
            NO_ARGS,
            Line(
                "error: tuple4.yaml:3:7: parameter `lr`: `!!python/tuple` expects [start, end] or [start, end, step], found 4 elements",
            ),
        ),
        bad(
            "step0.yaml",
            "command: x\nparameters:\n  lr: !!python/tuple [1, 5, 0]\n",
            NO_ARGS,
            Line("error: step0.yaml:3:29: parameter `lr`: `!!python/tuple`: step must not be 0"),
        ),
        bad(
            "bound.yaml",
            "command: x\nparameters:\n  lr: !!python/tuple [1, abc, 1]\n",
            NO_ARGS,
            Line(
                "error: bound.yaml:3:26: parameter `lr`: `!!python/tuple`: end must be a number, found `abc`",
            ),
        ),
        bad(
            "space.yaml",
            "command: x\nparameters:\n  \"learning rate\": [1, 2]\n",
            NO_ARGS,
            Line(
                "error: space.yaml:3:3: parameter `learning rate`: invalid parameter name: it contains whitespace; expected a name such as `lr` or `model.depth`",
            ),
        ),
        bad(
            "equals.yaml",
            "command: x\nparameters:\n  \"lr=1\": [1, 2]\n",
            NO_ARGS,
            Line(
                "error: equals.yaml:3:3: parameter `lr=1`: invalid parameter name: it contains `=`; expected a name such as `lr` or `model.depth`",
            ),
        ),
        bad(
            "dash.yaml",
            "command: x\nparameters:\n  epochs: 5\n  --lr: [1, 2]\n",
            NO_ARGS,
            Line(
                "error: dash.yaml:4:3: parameter `--lr`: invalid parameter name: it starts with `-` (gridq adds the dashes itself); expected a name such as `lr` or `model.depth`",
            ),
        ),
        bad(
            "placeholder.yaml",
            "command: python t.py {lrr} {args}\nparameters:\n  lr: [1, 2]\n  b: 1\n",
            NO_ARGS,
            Line(
                "error: placeholder.yaml:1:10: placeholder `{lrr}` names no parameter; expected one of: lr, b (or `{args}`; write `{{` for a literal brace)",
            ),
        ),
        bad(
            "cli-placeholder.yaml",
            "lr: [1, 2]\nb: 1\n",
            &["--command", "python t.py {x}"],
            Line(
                "error: --command: placeholder `{x}` names no parameter; expected one of: lr, b (or `{args}`; write `{{` for a literal brace)",
            ),
        ),
        bad(
            "bare.yaml",
            "lr: [1, 2]\nb: 3\n",
            &["--format", "json"],
            Line(
                "error: bare.yaml:1:1: no command: add `command:` to the file, or pass --command \"python train.py\"",
            ),
        ),
        bad(
            "bare-text.yaml",
            "lr: [1, 2]\nb: 3\n",
            NO_ARGS,
            Line(
                "error: bare-text.yaml:1:1: no command: add `command:` to the file, or pass --command \"python train.py\"",
            ),
        ),
        bad(
            "overflow.yaml",
            "command: x\nparameters:\n  lr: [0.1, 1e400]\n",
            NO_ARGS,
            Line(
                "error: overflow.yaml:3:13: parameter `lr`: `1e400` is out of range for a number; quote it to pass the text as a string",
            ),
        ),
        bad(
            "nan.yaml",
            "command: x\nparameters:\n  lr: .nan\n",
            NO_ARGS,
            Line(
                "error: nan.yaml:3:7: parameter `lr`: `.nan` is not a finite number; quote it to pass the text as a string",
            ),
        ),
        bad(
            "collide.yaml",
            "command: x\nparameters:\n  a.b: 1\n  A/B: 2\n",
            NO_ARGS,
            Line(
                "error: collide.yaml:4:3: parameter `A/B`: its environment variable `GRIDQ_PARAM_A_B` is also that of parameter `a.b` (line 3); rename one of them",
            ),
        ),
        bad(
            "dotdot.yaml",
            "command: x\nname: ..\nparameters:\n  a: 1\n",
            NO_ARGS,
            Line(
                "error: dotdot.yaml:2:7: `name` must be 1 to 128 letters, digits, `-`, `_` or `.`, starting with a letter or digit, found `..`",
            ),
        ),
        bad(
            "..yaml",
            "a: 1\n",
            &["--command", "x"],
            Line(
                "error: ..yaml: the sweep is named after its file, and `.` is not a valid name: a name must be 1 to 128 letters, digits, `-`, `_` or `.`, starting with a letter or digit; rename the file",
            ),
        ),
        bad(
            "bom.yaml",
            "\u{feff}command: x\nparameters:\n  lr: [1, 2\n  b: 3\n",
            NO_ARGS,
            Starts("error: bom.yaml:4:4: YAML syntax error: "),
        ),
        bad(
            "bom-null.yaml",
            "\u{feff}lr: ~\n",
            &["--command", "x"],
            Line(
                "error: bom-null.yaml:1:5: parameter `lr`: null value: expected a value (write \"\" for an empty string, or remove the parameter)",
            ),
        ),
    ]
}

#[test]
fn bad_files_exit_2_with_nothing_on_stdout_and_the_exact_error_line() {
    let dir = Scratch::new();
    let mut failures = Vec::new();
    for case in bad_cases() {
        dir.write(case.file, case.text);
        let mut args = vec!["expand", case.file];
        args.extend_from_slice(case.args);
        let run = dir.run(&args);
        let stderr_ok = match &case.stderr {
            Stderr::Line(line) => run.stderr == format!("{line}\n"),
            Stderr::Starts(prefix) => {
                run.stderr.starts_with(prefix)
                    && run.stderr.ends_with('\n')
                    && run.stderr.lines().count() == 1
            }
        };
        if run.code != Some(2) || !run.stdout.is_empty() || !stderr_ok {
            let want = match &case.stderr {
                Stderr::Line(line) => format!("{line:?}"),
                Stderr::Starts(prefix) => format!("one line starting {prefix:?}"),
            };
            failures.push(format!(
                "{}: exit {:?}, stdout {:?}\n  stderr {:?}\n  wanted {want}",
                case.file, run.code, run.stdout, run.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn a_bare_file_counts_without_a_command() {
    let dir = Scratch::new();
    dir.write("bare.yaml", "lr: [1, 2]\nb: !!python/tuple [0, 3]\n");
    let run = dir.expand_ok(&["bare.yaml", "--format", "count"]);
    assert_eq!(run.stdout, "6\n");
    assert_eq!(run.stderr, "");
}

#[test]
fn a_missing_file_exits_2_and_names_the_path() {
    let dir = Scratch::new();
    let missing = dir.0.path().join("no-such-sweep.yaml");
    let shown = missing.display().to_string();
    for args in [
        vec!["expand", shown.as_str()],
        vec!["expand", shown.as_str(), "--format", "count"],
    ] {
        let run = dir.run(&args);
        assert_eq!(run.code, Some(2), "{run:?}");
        assert_eq!(run.stdout, "");
        assert!(
            run.stderr.starts_with(&format!("error: {shown}: ")) && run.stderr.lines().count() == 1,
            "{}",
            run.stderr
        );
    }
}

#[test]
fn a_file_over_8_mib_exits_2_naming_its_size() {
    let dir = Scratch::new();
    // Sparse: the size is refused before anything is read.
    let big = std::fs::File::create(dir.0.path().join("big.yaml")).expect("creating big.yaml");
    big.set_len(52_428_800).expect("sizing big.yaml");
    for args in [
        vec!["expand", "big.yaml"],
        vec!["expand", "big.yaml", "--format", "count"],
    ] {
        let run = dir.run(&args);
        assert_eq!(run.code, Some(2), "{run:?}");
        assert_eq!(run.stdout, "");
        assert_eq!(
            run.stderr,
            "error: big.yaml: 52428800 bytes, more than the 8 MiB a sweep file may hold\n"
        );
    }
    // A file of exactly 8 MiB is read and expands.
    let head = "command: x\nparameters:\n  i: [1, 2]\n#";
    let text = format!("{head}{}\n", "x".repeat(8 * 1024 * 1024 - head.len() - 1));
    assert_eq!(text.len(), 8 * 1024 * 1024);
    dir.write("at-cap.yaml", &text);
    assert_eq!(
        dir.expand_ok(&["at-cap.yaml", "--format", "count"]).stdout,
        "2\n"
    );
    dir.write("over-cap.yaml", &format!("{text}#"));
    let run = dir.run(&["expand", "over-cap.yaml"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert_eq!(
        run.stderr,
        "error: over-cap.yaml: 8388609 bytes, more than the 8 MiB a sweep file may hold\n"
    );
}

#[test]
fn a_byte_order_mark_is_ignored() {
    let dir = Scratch::new();
    let text = "command: x\nparameters:\n  lr: [0.1, 1e-5]\n  b: [yes]\n";
    dir.write("plain.yaml", text);
    dir.write("bom.yaml", &format!("\u{feff}{text}"));
    let plain = dir.expand_ok(&["plain.yaml", "--format", "json"]);
    let marked = dir.expand_ok(&["bom.yaml", "--format", "json"]);
    assert_eq!(marked.stdout, plain.stdout);
    assert_eq!(
        argvs(&json_lines(&marked.stdout)),
        [["x", "--lr=0.1", "--b=yes"], ["x", "--lr=1e-5", "--b=yes"]]
    );
    assert_eq!(
        marked.stderr,
        plain.stderr.replace("plain.yaml", "bom.yaml")
    );
    assert_eq!(
        marked.stderr,
        "warning: bom.yaml:4:7: parameter `b`: `yes` is the string \"yes\" (YAML 1.2), not a boolean; write true or false, or quote it to silence this warning\n"
    );
}

#[test]
fn a_bad_flag_value_exits_2() {
    let run = run_in(
        &repo_root(),
        &["expand", "projects/train/sweep.yaml", "--format", "xml"],
    );
    assert_eq!(run.code, Some(2), "{run:?}");
    assert_eq!(run.stdout, "");
    assert!(run.stderr.contains("'xml'"), "{}", run.stderr);
}

// ---------------------------------------------------------------------------------------------
// Warnings

#[test]
fn values_rendering_the_same_are_one_job_with_a_warning() {
    let dir = Scratch::new();
    dir.write(
        "seed.yaml",
        "command: x\nparameters:\n  seed: [1, 1, \"1\", 2]\n",
    );
    let run = dir.expand_ok(&["seed.yaml", "--format", "json"]);
    assert_eq!(
        argvs(&json_lines(&run.stdout)),
        [["x", "--seed=1"], ["x", "--seed=2"]]
    );
    assert_eq!(
        run.stderr,
        "warning: seed.yaml:3:13: parameter `seed`: value `1` renders the same as the value at line 3, column 10; it is expanded once\n\
         warning: seed.yaml:3:16: parameter `seed`: value `1` renders the same as the value at line 3, column 10; it is expanded once\n"
    );
    assert_eq!(
        dir.expand_ok(&["seed.yaml", "--format", "count"]).stdout,
        "2\n"
    );
}

#[test]
fn warnings_stop_at_100_with_a_count_of_the_rest() {
    let dir = Scratch::new();
    let values = vec!["7"; 5000].join(", ");
    dir.write(
        "dups.yaml",
        &format!("command: x\nparameters:\n  seed: [{values}]\n"),
    );
    let run = dir.expand_ok(&["dups.yaml", "--format", "count"]);
    assert_eq!(run.stdout, "1\n");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 101, "{}", run.stderr);
    assert_eq!(
        lines[99],
        "warning: dups.yaml:3:310: parameter `seed`: value `7` renders the same as the value at line 3, column 10; it is expanded once"
    );
    assert_eq!(
        lines[100],
        "warning: dups.yaml: and 4899 more warnings like these (only the first 100 are listed)"
    );
}

#[test]
fn yaml11_booleans_are_strings_with_a_warning() {
    let dir = Scratch::new();
    dir.write(
        "flags.yaml",
        "command: x\nparameters:\n  flag: [yes, on]\n  quoted: \"yes\"\n",
    );
    let run = dir.expand_ok(&["flags.yaml", "--format", "json"]);
    let jobs = json_lines(&run.stdout);
    assert_eq!(
        argvs(&jobs),
        [
            ["x", "--flag=yes", "--quoted=yes"],
            ["x", "--flag=on", "--quoted=yes"]
        ]
    );
    assert_eq!(jobs[0]["params"], json!({"flag": "yes", "quoted": "yes"}));
    assert_eq!(jobs[1]["params"], json!({"flag": "on", "quoted": "yes"}));
    // Only the plain ones warn; the quoted one is a string on purpose.
    assert_eq!(
        run.stderr,
        "warning: flags.yaml:3:10: parameter `flag`: `yes` is the string \"yes\" (YAML 1.2), not a boolean; write true or false, or quote it to silence this warning\n\
         warning: flags.yaml:3:15: parameter `flag`: `on` is the string \"on\" (YAML 1.2), not a boolean; write true or false, or quote it to silence this warning\n"
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile values

const HOSTILE: &str = "command: x\nparameters:\n  s: [\"; rm -rf /\", \"$(whoami)\", \"a b\\tc\\nd\", \"ünï ✓\", \"it's\", \"`id` | cat *\"]\n";
const HOSTILE_VALUES: [&str; 6] = [
    "; rm -rf /",
    "$(whoami)",
    "a b\tc\nd",
    "ünï ✓",
    "it's",
    "`id` | cat *",
];

#[test]
fn hostile_values_are_single_exact_argv_elements() {
    let dir = Scratch::new();
    dir.write("hostile.yaml", HOSTILE);
    let run = dir.expand_ok(&["hostile.yaml", "--format", "json"]);
    let jobs = json_lines(&run.stdout);
    let want: Vec<Vec<String>> = HOSTILE_VALUES
        .iter()
        .map(|v| vec!["x".to_owned(), format!("--s={v}")])
        .collect();
    assert_eq!(argvs(&jobs), want);
    for (job, value) in jobs.iter().zip(HOSTILE_VALUES) {
        assert_eq!(job["params"]["s"], json!(value));
    }

    // The text format quotes them on one line each, so that a shell gives back the same argv.
    let text = dir.expand_ok(&["hostile.yaml"]);
    assert_eq!(text.stderr, "6 jobs\n");
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert_eq!(lines.len(), want.len(), "{:?}", text.stdout);
    for ((line, job), argv) in lines.iter().zip(&jobs).zip(&want) {
        let id = job["id"].as_str().unwrap();
        let quoted = line
            .strip_prefix(&format!("{id}  "))
            .unwrap_or_else(|| panic!("expected id {id} first in {line:?}"));
        assert_eq!(&through_bash(quoted), argv, "{line:?}");
    }
}

/// What bash makes of a pasted command line: the words it would pass to a program.
fn through_bash(quoted: &str) -> Vec<String> {
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("printf '%s\\0' {quoted}"))
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "bash failed on {quoted:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    text.strip_suffix('\0')
        .unwrap_or(&text)
        .split('\0')
        .map(str::to_owned)
        .collect()
}

#[test]
fn text_format_quotes_control_characters_on_one_line() {
    let dir = Scratch::new();
    dir.write(
        "ctl.yaml",
        "command: x\nparameters:\n  s: [\"a\\nb\", \"c\\r\\td\", \"e\\x01f\", \"back\\\\slash 'q'\"]\n",
    );
    let run = dir.expand_ok(&["ctl.yaml"]);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{:?}", run.stdout);
    let want = ["a\nb", "c\r\td", "e\u{1}f", "back\\slash 'q'"];
    for (line, value) in lines.iter().zip(want) {
        assert_eq!(
            through_bash(&line[34..]),
            ["x".to_owned(), format!("--s={value}")],
            "{line:?}"
        );
    }
    assert_eq!(&lines[0][34..], "x $'--s=a\\nb'");
}

// ---------------------------------------------------------------------------------------------
// A reader that stops early (`gridq expand ... | head -1`)

/// Waits for the child with a deadline, killing it if the deadline passes.
fn wait_with_deadline(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("polling gridq") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("gridq did not exit within {limit:?} after its reader went away");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_reader_that_stops_early_does_not_crash_gridq() {
    let dir = Scratch::new();
    // 100000 jobs: far more output than a pipe holds, so gridq is still writing when the
    // reader goes away.
    dir.write(
        "many.yaml",
        "command: prog\nparameters:\n  i: {range: [0, 100000]}\n",
    );
    for format in ["text", "json"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gridq"))
            .current_dir(dir.0.path())
            .args(["expand", "many.yaml", "--format", format])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gridq starts");
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut first)
            .expect("reading the first line");
        // The reader (and with it the pipe) is dropped here.
        assert!(first.contains("--i=0"), "{format}: first line {first:?}");
        let status = wait_with_deadline(&mut child, Duration::from_secs(120));
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
            .expect("reading stderr");
        assert!(
            status.success(),
            "{format}: exit {status:?}, stderr {stderr:?}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("error"),
            "{format}: {stderr:?}"
        );
    }
}
