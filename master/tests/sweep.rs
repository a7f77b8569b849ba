//! The sweep language, end to end through the public API: every value form, the mlframework
//! semantics (golden), rendering, identity, and every error with its exact message.

use gridq_master::sweep::{LoadOptions, Loaded, MAX_SWEEP_BYTES, Sweep, load_str};

fn load_with(yaml: &str, command: Option<&str>) -> Loaded {
    let options = LoadOptions {
        command: command.map(str::to_owned),
    };
    match load_str(yaml, "sweep.yaml", "sweep", &options) {
        Ok(loaded) => loaded,
        Err(e) => panic!("expected the sweep to load, got: {e}"),
    }
}

fn load(yaml: &str) -> Loaded {
    load_with(yaml, None)
}

fn argvs(sweep: &Sweep) -> Vec<Vec<String>> {
    sweep
        .expand()
        .expect("expands")
        .map(|j| j.argv_strings())
        .collect()
}

fn argv_lines(yaml: &str) -> Vec<String> {
    argvs(&load(yaml).sweep)
        .iter()
        .map(|a| a.join(" "))
        .collect()
}

fn error(yaml: &str) -> String {
    error_with(yaml, None)
}

fn error_with(yaml: &str, command: Option<&str>) -> String {
    let options = LoadOptions {
        command: command.map(str::to_owned),
    };
    match load_str(yaml, "sweep.yaml", "sweep", &options) {
        Ok(loaded) => match loaded.sweep.expand() {
            Ok(_) => panic!("expected an error for:\n{yaml}"),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    }
}

fn warnings(loaded: &Loaded) -> Vec<String> {
    loaded.warnings.iter().map(ToString::to_string).collect()
}

// ---------------------------------------------------------------------------------------------
// mlframework semantics (golden)

#[test]
fn mlframework_readme_example_bare_file() {
    // The example of mlframework's README: single value, list and interval.
    let yaml = "gpu: -1\nbatchsize: [100, 500]\nepoch: !!python/tuple [5,20,5]\n";
    let loaded = load_with(yaml, Some("python train_mnist.py"));
    assert_eq!(loaded.sweep.count().jobs, 6);
    assert_eq!(
        argvs(&loaded.sweep),
        [
            [
                "python",
                "train_mnist.py",
                "--gpu=-1",
                "--batchsize=100",
                "--epoch=5"
            ],
            [
                "python",
                "train_mnist.py",
                "--gpu=-1",
                "--batchsize=100",
                "--epoch=10"
            ],
            [
                "python",
                "train_mnist.py",
                "--gpu=-1",
                "--batchsize=100",
                "--epoch=15"
            ],
            [
                "python",
                "train_mnist.py",
                "--gpu=-1",
                "--batchsize=500",
                "--epoch=5"
            ],
            [
                "python",
                "train_mnist.py",
                "--gpu=-1",
                "--batchsize=500",
                "--epoch=10"
            ],
            [
                "python",
                "train_mnist.py",
                "--gpu=-1",
                "--batchsize=500",
                "--epoch=15"
            ],
        ]
    );
    assert_eq!(loaded.sweep.name(), "sweep");
    assert!(loaded.warnings.is_empty());
}

#[test]
fn mlframework_train_task_used_space_separated_flags() {
    let yaml = "arg_style: space\ncommand: python train_mnist.py\nparameters:\n  gpu: 0\n  epoch: !!python/tuple [1, 3]\n";
    assert_eq!(
        argvs(&load(yaml).sweep),
        [
            ["python", "train_mnist.py", "--gpu", "0", "--epoch", "1"],
            ["python", "train_mnist.py", "--gpu", "0", "--epoch", "2"],
        ]
    );
}

#[test]
fn tuple_default_step_and_negative_step() {
    let yaml =
        "command: run\nparameters:\n  a: !!python/tuple [1, 4]\n  b: !!python/tuple [3, 0, -1]\n";
    assert_eq!(
        argv_lines(yaml),
        [
            "run --a=1 --b=3",
            "run --a=1 --b=2",
            "run --a=1 --b=1",
            "run --a=2 --b=3",
            "run --a=2 --b=2",
            "run --a=2 --b=1",
            "run --a=3 --b=3",
            "run --a=3 --b=2",
            "run --a=3 --b=1",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Value forms and rendering

#[test]
fn float_intervals_are_exact_in_decimal() {
    let yaml = "command: run\nparameters:\n  lr: !!python/tuple [0.1, 0.5, 0.1]\n";
    assert_eq!(
        argv_lines(yaml),
        [
            "run --lr=0.1",
            "run --lr=0.2",
            "run --lr=0.3",
            "run --lr=0.4"
        ]
    );
    let yaml = "command: run\nparameters:\n  x: {range: [0, 1, 0.25]}\n";
    assert_eq!(
        argv_lines(yaml),
        ["run --x=0.0", "run --x=0.25", "run --x=0.5", "run --x=0.75"]
    );
    let yaml = "command: run\nparameters:\n  x: {range: [1, 3, 1.0]}\n";
    assert_eq!(argv_lines(yaml), ["run --x=1.0", "run --x=2.0"]);
    // 100 steps of 0.01 never drift.
    let yaml = "command: run\nparameters:\n  x: {range: [0, 1, 0.01]}\n";
    let lines = argv_lines(yaml);
    assert_eq!(lines.len(), 100);
    assert_eq!(lines[29], "run --x=0.29");
    assert_eq!(lines[99], "run --x=0.99");
}

#[test]
fn linspace_and_geomspace() {
    let yaml = "command: run\nparameters:\n  x: {linspace: [0, 1, 5]}\n";
    assert_eq!(
        argv_lines(yaml),
        [
            "run --x=0.0",
            "run --x=0.25",
            "run --x=0.5",
            "run --x=0.75",
            "run --x=1.0"
        ]
    );
    let yaml = "command: run\nparameters:\n  x: {linspace: [0, 10, 3]}\n";
    assert_eq!(argv_lines(yaml), ["run --x=0", "run --x=5", "run --x=10"]);
    let yaml = "command: run\nparameters:\n  bs: {geomspace: [16, 128, 4]}\n";
    assert_eq!(
        argv_lines(yaml),
        ["run --bs=16", "run --bs=32", "run --bs=64", "run --bs=128"]
    );
    let yaml = "command: run\nparameters:\n  lr: {geomspace: [1e-4, 1e-1, 4]}\n";
    assert_eq!(
        argv_lines(yaml),
        [
            "run --lr=0.0001",
            "run --lr=0.001",
            "run --lr=0.01",
            "run --lr=0.1"
        ]
    );
}

#[test]
fn scalars_render_as_written() {
    let yaml = "command: run\nparameters:\n  a: 1e-5\n  b: 1.0e-5\n  c: 0.10\n  d: 0x1F\n  e: '007'\n  f: \"quoted text\"\n  g: +3\n";
    assert_eq!(
        argv_lines(yaml),
        ["run --a=1e-5 --b=1.0e-5 --c=0.10 --d=0x1F --e=007 --f=quoted text --g=+3"]
    );
}

#[test]
fn json_params_keep_numbers_and_bools() {
    let yaml = "command: run\nparameters:\n  a: 1e-5\n  b: 0.10\n  c: true\n  d: text\n  e: \"5\"\n  f: 0x10\n  g: .5\n  h: {range: [0.5, 1, 0.5]}\n";
    let loaded = load(yaml);
    let job = loaded.sweep.expand().unwrap().next().unwrap();
    let line = serde_json::to_string(&job.record(&loaded.sweep)).unwrap();
    assert!(
        line.contains(
            r#""params":{"a":1e-5,"b":0.10,"c":true,"d":"text","e":"5","f":16,"g":0.5,"h":0.5}"#
        ),
        "{line}"
    );
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["index"], 0);
    assert_eq!(value["id"].as_str().unwrap().len(), 32);
    assert_eq!(value["argv"][0], "run");
}

#[test]
fn yaml12_core_schema_only() {
    let yaml = "command: run\nparameters:\n  a: yes\n  b: on\n  c: 'off'\n  d: True\n";
    let loaded = load(yaml);
    assert_eq!(
        argvs(&loaded.sweep),
        [["run", "--a=yes", "--b=on", "--c=off", "--d"]]
    );
    assert_eq!(
        warnings(&loaded),
        [
            "sweep.yaml:3:6: parameter `a`: `yes` is the string \"yes\" (YAML 1.2), not a boolean; write true or false, or quote it to silence this warning",
            "sweep.yaml:4:6: parameter `b`: `on` is the string \"on\" (YAML 1.2), not a boolean; write true or false, or quote it to silence this warning",
        ]
    );
}

#[test]
fn booleans_toggle_flags() {
    let yaml = "command: run\nparameters:\n  verbose: true\n  quiet: false\n  amp: [true, false]\n";
    assert_eq!(argv_lines(yaml), ["run --verbose --amp", "run --verbose"]);
    let yaml =
        "arg_style: hydra\ncommand: run\nparameters:\n  amp: [true, false]\n  model.depth: 3\n";
    assert_eq!(
        argv_lines(yaml),
        ["run amp=true model.depth=3", "run amp=false model.depth=3"]
    );
}

#[test]
fn placeholders_substitute_and_args_marks_the_flags() {
    let yaml = "command: python train.py --out=runs/{lr}/{seed} {args} --verbose\nparameters:\n  lr: [0.1, 1e-3]\n  seed: 1\n  epochs: 5\n";
    assert_eq!(
        argv_lines(yaml),
        [
            "python train.py --out=runs/0.1/1 --epochs=5 --verbose",
            "python train.py --out=runs/1e-3/1 --epochs=5 --verbose",
        ]
    );
    // Literal braces: doubled, or around something that is not a name (JSON).
    let yaml = "command: [run, '{{lr}}', '{\"a\": 1}', 'x={lr}']\nparameters:\n  lr: 2\n";
    assert_eq!(
        argvs(&load(yaml).sweep),
        [["run", "{lr}", "{\"a\": 1}", "x=2"]]
    );
}

#[test]
fn command_string_uses_shell_quoting_without_a_shell() {
    let yaml =
        "command: python -c 'import sys; print(sys.argv)' \"two words\"\nparameters:\n  x: 1\n";
    assert_eq!(
        argvs(&load(yaml).sweep),
        [[
            "python",
            "-c",
            "import sys; print(sys.argv)",
            "two words",
            "--x=1"
        ]]
    );
}

#[test]
fn hostile_values_stay_single_argv_elements() {
    let hostile = [
        "; rm -rf /",
        "$(whoami)",
        "`id`",
        "a b\tc\nd",
        "ünï ✓ 日本",
        "' \" \\",
        "*",
        "--x=1 --y=2",
    ];
    let list: Vec<String> = hostile
        .iter()
        .map(|v| serde_json::to_string(v).unwrap())
        .collect();
    let yaml = format!("command: run\nparameters:\n  v: [{}]\n", list.join(", "));
    let got = argvs(&load(&yaml).sweep);
    let expected: Vec<Vec<String>> = hostile
        .iter()
        .map(|v| vec!["run".to_owned(), format!("--v={v}")])
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn product_order_first_parameter_slowest() {
    let yaml = "command: run\nparameters:\n  a: [1, 2]\n  b: [x, y]\n  c: [true, false]\n";
    assert_eq!(
        argv_lines(yaml),
        [
            "run --a=1 --b=x --c",
            "run --a=1 --b=x",
            "run --a=1 --b=y --c",
            "run --a=1 --b=y",
            "run --a=2 --b=x --c",
            "run --a=2 --b=x",
            "run --a=2 --b=y --c",
            "run --a=2 --b=y",
        ]
    );
}

#[test]
fn zip_groups_advance_together() {
    let yaml = "command: run\nzip: [[lr, warmup]]\nparameters:\n  model: [a, b]\n  lr: [0.1, 0.01]\n  seed: [1, 2]\n  warmup: [10, 100]\n";
    let loaded = load(yaml);
    assert_eq!(loaded.sweep.count().jobs, 8);
    assert_eq!(
        argvs(&loaded.sweep)
            .iter()
            .map(|a| a.join(" "))
            .collect::<Vec<_>>()[..4],
        [
            "run --model=a --lr=0.1 --seed=1 --warmup=10",
            "run --model=a --lr=0.1 --seed=2 --warmup=10",
            "run --model=a --lr=0.01 --seed=1 --warmup=100",
            "run --model=a --lr=0.01 --seed=2 --warmup=100",
        ]
    );
}

#[test]
fn exclude_skips_matching_combinations() {
    let yaml = "command: run\nparameters:\n  lr: [0.1, 0.01]\n  bs: [16, 64]\n  seed: [1, 2]\nexclude:\n  - {lr: 0.10, bs: 16}\n  - {seed: 2, bs: [16, 64], lr: 0.01}\n";
    let loaded = load(yaml);
    let lines: Vec<String> = argvs(&loaded.sweep).iter().map(|a| a.join(" ")).collect();
    assert_eq!(
        lines,
        [
            "run --lr=0.1 --bs=64 --seed=1",
            "run --lr=0.1 --bs=64 --seed=2",
            "run --lr=0.01 --bs=16 --seed=1",
            "run --lr=0.01 --bs=64 --seed=1",
        ]
    );
    assert_eq!(loaded.sweep.count().jobs, 4);
}

#[test]
fn exclude_count_is_exact_with_overlapping_entries() {
    // Overlapping boxes on large interval axes: the count is arithmetic, and matches expansion.
    let yaml = "command: run\nmax_jobs: 1000000\nparameters:\n  a: {range: [0, 50]}\n  b: {range: [0, 40]}\n  c: [x, y, z]\nexclude:\n  - {a: [1, 2, 3], c: x}\n  - {a: [2, 3, 4], b: [0, 1]}\n  - {c: [x, y], b: 5}\n  - {a: 49}\n";
    let loaded = load(yaml);
    let expanded = loaded.sweep.expand().unwrap().count() as u128;
    assert_eq!(loaded.sweep.count().jobs, expanded);
    // 50*40*3 = 6000, of which 349 are excluded (checked by brute force).
    assert_eq!(expanded, 5651);
}

#[test]
fn exclude_warns_about_values_that_match_nothing() {
    let yaml = "command: run\nparameters:\n  lr: [0.1, 0.01]\nexclude:\n  - {lr: 0.7}\n";
    let loaded = load(yaml);
    assert_eq!(loaded.sweep.count().jobs, 2);
    assert_eq!(
        warnings(&loaded),
        [
            "sweep.yaml:5:10: parameter `lr`: `exclude` entry 1: `0.7` matches no value of this parameter"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Identity and duplicates

#[test]
fn ids_are_pinned_and_depend_only_on_argv_and_env() {
    // Changing this id breaks resubmission of every existing sweep: it must never change.
    let yaml = "command: python3 train.py {args}\nenv: {PYTHONUNBUFFERED: \"1\"}\nparameters:\n  lr: 0.01\n  epochs: 5\n  batch_size: 16\n  seed: 0\n";
    let job = load(yaml).sweep.expand().unwrap().next().unwrap();
    assert_eq!(job.id.to_string(), "3df1d3889be0880460159032da507b30");

    // Same argv written differently: same id. Different name or options: same id.
    let same = "name: other\nretries: 3\ncommand: [python3, train.py]\nenv: {PYTHONUNBUFFERED: 1}\nparameters:\n  lr: [0.01]\n  epochs: !!python/tuple [5, 6]\n  batch_size: {range: [16, 17]}\n  seed: '0'\n";
    assert_eq!(
        load(same).sweep.expand().unwrap().next().unwrap().id,
        job.id
    );

    // Different environment: different id.
    let other_env = yaml.replace("\"1\"", "\"0\"");
    assert_ne!(
        load(&other_env).sweep.expand().unwrap().next().unwrap().id,
        job.id
    );
}

#[test]
fn values_rendering_identically_are_one_job() {
    let yaml = "command: run\nparameters:\n  seed: [1, 1, \"1\", 2]\n";
    let loaded = load(yaml);
    assert_eq!(argv_lines(yaml), ["run --seed=1", "run --seed=2"]);
    assert_eq!(loaded.sweep.count().jobs, 2);
    assert_eq!(
        warnings(&loaded),
        [
            "sweep.yaml:3:13: parameter `seed`: value `1` renders the same as the value at line 3, column 10; it is expanded once",
            "sweep.yaml:3:16: parameter `seed`: value `1` renders the same as the value at line 3, column 10; it is expanded once",
        ]
    );
}

#[test]
fn combinations_rendering_identically_across_parameters_are_one_job() {
    // `{a}{b}` makes (1, 23) and (12, 3) the same argv.
    let yaml = "command: run --x={a}{b}\nparameters:\n  a: ['1', '12']\n  b: ['23', '3']\n";
    let loaded = load(yaml);
    assert_eq!(loaded.sweep.count().jobs, 3);
    let mut jobs = loaded.sweep.expand().unwrap();
    let lines: Vec<String> = jobs.by_ref().map(|j| j.argv_strings().join(" ")).collect();
    assert_eq!(lines, ["run --x=123", "run --x=13", "run --x=1223"]);
    assert_eq!(jobs.duplicates(), 1);
    assert_eq!(
        jobs.duplicate_examples(),
        [vec!["run".to_owned(), "--x=123".to_owned()]]
    );
}

#[test]
fn repeat_gives_each_repetition_its_own_id() {
    let base = "command: run\nparameters:\n  a: [1, 2]\n";
    let plain: Vec<_> = load(base).sweep.expand().unwrap().collect();
    let loaded = load(&format!("repeat: 3\n{base}"));
    let sweep = &loaded.sweep;
    let jobs: Vec<_> = sweep.expand().unwrap().collect();
    assert_eq!(sweep.count().jobs, 6);
    assert_eq!(jobs.len(), 6);
    let reps: Vec<u32> = jobs.iter().map(|j| j.repeat).collect();
    assert_eq!(reps, [0, 1, 2, 0, 1, 2]);
    let mut ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6);
    // Repetition 0 keeps the id the job has without `repeat`, so raising `repeat` later only
    // adds jobs.
    assert_eq!(jobs[0].id, plain[0].id);
    assert_eq!(jobs[3].id, plain[1].id);
    assert_eq!(
        jobs[2].env(sweep),
        [("GRIDQ_REPEAT".to_owned(), "2".to_owned())]
    );
    assert_eq!(
        jobs.iter().map(|j| j.index).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5]
    );
}

// ---------------------------------------------------------------------------------------------
// Options

#[test]
fn per_job_options_are_parsed() {
    let yaml = "name: big-run\ncommand: run\nretries: 2\ntimeout: 2h 30m\ngpus: 1\nqueue: gpu\nworkdir: sub/dir\nenv: {B: 2, A: x}\nparameters:\n  a: 1\n";
    let loaded = load(yaml);
    let o = loaded.sweep.options();
    assert_eq!(loaded.sweep.name(), "big-run");
    assert_eq!(o.retries, 2);
    assert_eq!(o.timeout, Some(std::time::Duration::from_secs(9000)));
    assert_eq!(o.gpus, 1);
    assert_eq!(o.queue.as_deref(), Some("gpu"));
    assert_eq!(o.workdir.as_deref(), Some("sub/dir"));
    assert_eq!(
        o.env,
        [
            ("A".to_owned(), "x".to_owned()),
            ("B".to_owned(), "2".to_owned())
        ]
    );
    let seconds = load("command: run\ntimeout: 90\nparameters:\n  a: 1\n");
    assert_eq!(
        seconds.sweep.options().timeout,
        Some(std::time::Duration::from_secs(90))
    );
}

#[test]
fn count_is_arithmetic_for_huge_products() {
    let yaml = "command: run\nparameters:\n  a: {range: [0, 1000000]}\n  b: {range: [0, 1000000]}\n  c: {range: [0, 1000000]}\n";
    let loaded = load(yaml);
    assert_eq!(loaded.sweep.count().jobs, 1_000_000_000_000_000_000);
    assert_eq!(
        error(yaml),
        "sweep.yaml:3:3: this sweep would produce 1000000000000000000 jobs, more than max_jobs (100000); add `max_jobs: 1000000000000000000` to the sweep file or pass `--max-jobs 1000000000000000000` to allow it, or narrow the parameters"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors: every one names file:line:column, the parameter where there is one, and what was
// expected.

#[test]
fn errors_name_the_place_and_the_expectation() {
    let p = "command: run\nparameters:\n";
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{p}  a: [1, 2\n"),
            "sweep.yaml:4:1: YAML syntax error: ",
        ),
        (
            format!("{p}  lr: 1\n  lr: 2\n"),
            "sweep.yaml:4:3: duplicate key `lr` (first defined at line 3, column 3)",
        ),
        (
            "".into(),
            "sweep.yaml:1:1: the file is empty: expected a mapping of sweep options (with `parameters:`) or of parameters",
        ),
        (
            "- a\n- b\n".into(),
            "sweep.yaml:1:1: the top level must be a mapping, found a list",
        ),
        (
            "just text\n".into(),
            "sweep.yaml:1:1: the top level must be a mapping, found a scalar",
        ),
        (
            format!("{p}  a:\n"),
            "sweep.yaml:3:4: parameter `a`: null value: expected a value (write \"\" for an empty string, or remove the parameter)",
        ),
        (
            format!("{p}  a: ~\n"),
            "sweep.yaml:3:6: parameter `a`: null value: expected a value",
        ),
        (
            format!("{p}  a: {{min: 1, max: 2}}\n"),
            "sweep.yaml:3:6: parameter `a`: expected a scalar, a list, `!!python/tuple [start, end, step]` or a mapping with one of `range`, `linspace`, `geomspace`, found a mapping with keys min, max",
        ),
        (
            format!("{p}  a: {{uniform: [1, 2]}}\n"),
            "sweep.yaml:3:7: parameter `a`: expected a scalar, a list, `!!python/tuple [start, end, step]` or a mapping with one of `range`, `linspace`, `geomspace`, found a mapping with key `uniform`",
        ),
        (
            format!("{p}  a: !!python/object:os.system [ls]\n"),
            "sweep.yaml:3:6: unsupported tag `!!python/object:os.system`: the only tag gridq accepts is `!!python/tuple` (tags are never executed)",
        ),
        (
            format!("{p}  a: !!str 5\n"),
            "sweep.yaml:3:6: unsupported tag `!!str`",
        ),
        (
            format!("{p}  a: []\n"),
            "sweep.yaml:3:6: parameter `a`: empty list: expected at least one value",
        ),
        (
            format!("{p}  a: [1, [2]]\n"),
            "sweep.yaml:3:10: parameter `a`: list elements must be scalars, found a list",
        ),
        (
            format!("{p}  a: !!python/tuple [5]\n"),
            "sweep.yaml:3:6: parameter `a`: `!!python/tuple` expects [start, end] or [start, end, step], found 1 element",
        ),
        (
            format!("{p}  a: !!python/tuple [1, 2, 3, 4]\n"),
            "sweep.yaml:3:6: parameter `a`: `!!python/tuple` expects [start, end] or [start, end, step], found 4 elements",
        ),
        (
            format!("{p}  a: !!python/tuple [1, 5, 0]\n"),
            "sweep.yaml:3:28: parameter `a`: `!!python/tuple`: step must not be 0",
        ),
        (
            format!("{p}  a: {{range: [1, 5, 0]}}\n"),
            "sweep.yaml:3:21: parameter `a`: `range`: step must not be 0",
        ),
        (
            format!("{p}  a: !!python/tuple [a, 5]\n"),
            "sweep.yaml:3:22: parameter `a`: `!!python/tuple`: start must be a number, found `a`",
        ),
        (
            format!("{p}  a: !!python/tuple [1, '5']\n"),
            "sweep.yaml:3:25: parameter `a`: `!!python/tuple`: end must be a number, found `5`",
        ),
        (
            format!("{p}  a: !!python/tuple [5, 1]\n"),
            "sweep.yaml:3:6: parameter `a`: `!!python/tuple`: interval [5, 1) with step 1 yields no values",
        ),
        (
            format!("{p}  a: !!python/tuple [.inf, 1]\n"),
            "sweep.yaml:3:22: parameter `a`: `!!python/tuple`: start `.inf` is not a finite number gridq can compute with exactly",
        ),
        (
            format!("{p}  a: {{linspace: [0, 1]}}\n"),
            "sweep.yaml:3:17: parameter `a`: `linspace` expects a list [start, stop, num], found a list",
        ),
        (
            format!("{p}  a: {{linspace: [0, 1, 0]}}\n"),
            "sweep.yaml:3:17: parameter `a`: `linspace`: linspace with num 0 yields no values",
        ),
        (
            format!("{p}  a: {{geomspace: [0, 1, 3]}}\n"),
            "sweep.yaml:3:18: parameter `a`: `geomspace`: geomspace bounds must not be 0",
        ),
        (
            format!("{p}  a: {{linspace: [0, 1, 2.5]}}\n"),
            "sweep.yaml:3:24: parameter `a`: `linspace`: num must be a non-negative integer, found `2.5`",
        ),
        (
            format!("{p}  my lr: 1\n"),
            "sweep.yaml:3:3: parameter `my lr`: invalid parameter name: it contains whitespace; expected a name such as `lr` or `model.depth`",
        ),
        (
            format!("{p}  a=b: 1\n"),
            "sweep.yaml:3:3: parameter `a=b`: invalid parameter name: it contains `=`",
        ),
        (
            format!("{p}  --lr: 1\n"),
            "sweep.yaml:3:3: parameter `--lr`: invalid parameter name: it starts with `-` (gridq adds the dashes itself)",
        ),
        (
            "command: run --x={lrr}\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:1:10: placeholder `{lrr}` names no parameter; expected one of: lr (or `{args}`; write `{{` for a literal brace)",
        ),
        (
            "command: run --x={args}\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:1:10: `{args}` must be a whole command element, not part of one",
        ),
        (
            "command: run {args} {args}\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:1:10: `{args}` appears more than once in the command",
        ),
        (
            "command: run 'unclosed\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:1:10: `command`: cannot split it: missing closing quote",
        ),
        (
            "command: []\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:1:10: `command` is empty",
        ),
        (
            "parameters:\n  lr: 1\n".into(),
            "sweep.yaml:1:1: no command: add `command:` to the file, or pass --command \"python train.py\"",
        ),
        (
            "command: run\nparametrs: 1\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:2:1: unknown field `parametrs`, expected one of ",
        ),
        (
            "command: run\nretries: -1\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:2:10: retries: invalid type: integer `-1`, expected u32",
        ),
        (
            "command: run\narg_style: colon\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:2:12: arg_style: unknown variant `colon`, expected one of `equals`, `space`, `hydra`",
        ),
        (
            "command: run\nparameters: [1, 2]\n".into(),
            "sweep.yaml:2:13: `parameters` must be a mapping of parameter names to values, found a list",
        ),
        (
            "command: run\nparameters: {}\n".into(),
            "sweep.yaml:1:1: no parameters: the sweep needs at least one",
        ),
        (
            "command: run\ntimeout: soon\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:2:10: `timeout` must be a duration such as `90s`, `30m` or `2h 30m`, or a number of seconds, found `soon`",
        ),
        (
            "command: run\ntimeout: 0\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:2:10: `timeout` must be greater than 0",
        ),
        (
            "command: run\nenv: {GRIDQ_JOB_ID: x}\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:2:7: `env`: `GRIDQ_JOB_ID` is reserved: gridq sets the GRIDQ_* variables itself",
        ),
        (
            "command: run\nenv: {1A: x}\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:2:7: `env`: `1A` is not a valid variable name (letters, digits and `_`, not starting with a digit)",
        ),
        (
            "command: run\nqueue: 'a b'\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:2:8: `queue` must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`, found `a b`",
        ),
        (
            "command: run\nname: 'my sweep'\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:2:7: `name` must be 1 to 128 letters, digits, `-`, `_` or `.`, starting with a letter or digit, found `my sweep`",
        ),
        (
            "command: run\nmax_jobs: 0\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:2:11: `max_jobs` must be at least 1",
        ),
        (
            "command: run\nrepeat: 0\nparameters:\n  lr: 1\n".into(),
            "sweep.yaml:2:9: `repeat` must be at least 1",
        ),
        (
            "command: run\nzip: [[a, b]]\nparameters:\n  a: [1, 2]\n  b: [1]\n".into(),
            "sweep.yaml:2:6: parameter `b`: `zip` group 1 needs lists of equal length: `a` has 2 values, `b` has 1",
        ),
        (
            "command: run\nzip: [[a, c]]\nparameters:\n  a: [1, 2]\n  b: [1]\n".into(),
            "sweep.yaml:2:6: parameter `c`: `zip` group 1 names an unknown parameter",
        ),
        (
            "command: run\nzip: [[a]]\nparameters:\n  a: [1, 2]\n".into(),
            "sweep.yaml:2:6: `zip` group 1 must name at least two parameters",
        ),
        (
            "command: run\nparameters:\n  a: [1, 2]\nexclude:\n  - {b: 1}\n".into(),
            "sweep.yaml:5:6: parameter `b`: `exclude` entry 1 names an unknown parameter",
        ),
        (
            "command: run\nparameters:\n  a: [1, 2]\nexclude: {a: 1}\n".into(),
            "sweep.yaml:4:10: `exclude` must be a list of partial assignments such as `- {lr: 0.1, epochs: 5}`, found a mapping",
        ),
        (
            "command: run\nparameters:\n  a: [1, 2]\n---\nb: 1\n".into(),
            "sweep.yaml:4:1: expected a single YAML document, found a second one (`---`)",
        ),
    ];
    let mismatches: Vec<String> = cases
        .iter()
        .filter_map(|(yaml, expected)| {
            let got = error(yaml);
            (!got.starts_with(expected))
                .then(|| format!("for:\n{yaml}expected: {expected}\n     got: {got}\n"))
        })
        .collect();
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn command_flag_errors_name_the_flag() {
    assert_eq!(
        error_with("lr: 1\n", Some("python 'x")),
        "--command: cannot split the command: missing closing quote"
    );
    assert_eq!(
        error_with("lr: 1\n", Some("python --x={nope}")),
        "--command: placeholder `{nope}` names no parameter; expected one of: lr (or `{args}`; write `{{` for a literal brace)"
    );
}

#[test]
fn bare_file_counts_without_a_command() {
    let loaded = load("lr: [1, 2]\nbs: !!python/tuple [1, 4]\n");
    assert_eq!(loaded.sweep.count().jobs, 6);
    assert_eq!(
        loaded.sweep.expand().err().map(|e| e.to_string()),
        Some("sweep.yaml:1:1: no command: add `command:` to the file, or pass --command \"python train.py\"".into())
    );
}

// ---------------------------------------------------------------------------------------------
// Bounds and hostile input

fn load_named(yaml: &str, default_name: &str) -> Result<Loaded, String> {
    load_str(yaml, "sweep.yaml", default_name, &LoadOptions::default()).map_err(|e| e.to_string())
}

#[test]
fn a_text_larger_than_8_mib_is_refused_before_parsing() {
    assert_eq!(MAX_SWEEP_BYTES, 8 * 1024 * 1024);
    let head = "command: run\nparameters:\n  lr: [1, 2]\n";
    // Exactly at the cap: a comment pads the file, and it loads.
    let mut at_cap = String::from(head);
    at_cap.push('#');
    at_cap.push_str(&"x".repeat(MAX_SWEEP_BYTES - head.len() - 2));
    at_cap.push('\n');
    assert_eq!(at_cap.len(), MAX_SWEEP_BYTES);
    assert_eq!(load(&at_cap).sweep.count().jobs, 2);
    // One byte more is refused, before any parsing: even a syntax error is not reached.
    let mut over = at_cap.clone();
    over.insert(0, '[');
    assert_eq!(
        error(&over),
        "sweep.yaml: 8388609 bytes, more than the 8 MiB a sweep file may hold"
    );
}

#[test]
fn warnings_are_capped_with_a_count_of_the_rest() {
    // 1,000 values that all render as `--a=1`: 999 duplicate warnings, of which 100 are kept.
    let yaml = format!(
        "command: run\nparameters:\n  a: [{}]\n",
        vec!["1"; 1000].join(", ")
    );
    let loaded = load(&yaml);
    assert_eq!(loaded.sweep.count().jobs, 1);
    let shown = warnings(&loaded);
    assert_eq!(shown.len(), 101);
    assert_eq!(
        shown[0],
        "sweep.yaml:3:10: parameter `a`: value `1` renders the same as the value at line 3, column 7; it is expanded once"
    );
    assert_eq!(
        shown[100],
        "sweep.yaml: and 899 more warnings like these (only the first 100 are listed)"
    );
    // At the cap exactly, nothing is summarised.
    let yaml = format!(
        "command: run\nparameters:\n  a: [{}]\n",
        vec!["1"; 101].join(", ")
    );
    let shown = warnings(&load(&yaml));
    assert_eq!(shown.len(), 100);
    assert!(
        shown.iter().all(|w| w.contains("renders the same")),
        "{shown:?}"
    );
}

#[test]
fn numbers_without_a_finite_value_are_errors() {
    let p = "command: run\nparameters:\n";
    let cases = [
        (
            format!("{p}  a: 1e400\n"),
            "sweep.yaml:3:6: parameter `a`: `1e400` is out of range for a number; quote it to pass the text as a string",
        ),
        (
            format!("{p}  lr: [0.1, -1e400]\n"),
            "sweep.yaml:3:13: parameter `lr`: `-1e400` is out of range for a number; quote it to pass the text as a string",
        ),
        (
            format!("{p}  a: [1, {}]\n", "9".repeat(400)),
            "sweep.yaml:3:10: parameter `a`: `9999999999999999999999999999999999999999999999999999999999999999…` is out of range for a number; quote it to pass the text as a string",
        ),
        (
            format!("{p}  a: .inf\n"),
            "sweep.yaml:3:6: parameter `a`: `.inf` is not a finite number; quote it to pass the text as a string",
        ),
        (
            format!("{p}  a: [1, -.Inf]\n"),
            "sweep.yaml:3:10: parameter `a`: `-.Inf` is not a finite number; quote it to pass the text as a string",
        ),
        (
            format!("{p}  a: .nan\n"),
            "sweep.yaml:3:6: parameter `a`: `.nan` is not a finite number; quote it to pass the text as a string",
        ),
        (
            format!("{p}  a: [1, 2]\nexclude:\n  - {{a: 1e400}}\n"),
            "sweep.yaml:5:9: parameter `a`: `1e400` is out of range for a number; quote it to pass the text as a string",
        ),
    ];
    for (yaml, expected) in &cases {
        assert_eq!(&error(yaml), expected, "for:\n{yaml}");
    }
    // Quoted, the same text is a string, rendered and stored as written.
    let loaded = load(&format!("{p}  a: ['1e400', '.inf', 1e308, 1e-400]\n"));
    let jobs: Vec<_> = loaded.sweep.expand().expect("expands").collect();
    let params: Vec<String> = jobs
        .iter()
        .map(|j| j.params[0].json().get().to_owned())
        .collect();
    assert_eq!(params, ["\"1e400\"", "\".inf\"", "1e308", "1e-400"]);
    for job in &jobs {
        let v: serde_json::Value =
            serde_json::from_str(job.params[0].json().get()).expect("valid JSON");
        assert!(!v.is_null(), "{v}");
    }
}

#[test]
fn parameters_with_the_same_environment_variable_are_an_error() {
    assert_eq!(
        error("command: run\nparameters:\n  a.b: 1\n  c: 2\n  a_b: 3\n"),
        "sweep.yaml:5:3: parameter `a_b`: its environment variable `GRIDQ_PARAM_A_B` is also that of parameter `a.b` (line 3); rename one of them"
    );
    assert_eq!(
        error("command: run\nparameters:\n  a_b: 1\n  A/B: [2, 3]\n"),
        "sweep.yaml:4:3: parameter `A/B`: its environment variable `GRIDQ_PARAM_A_B` is also that of parameter `a_b` (line 3); rename one of them"
    );
    assert_eq!(
        error_with("lr: 1\nLR: 2\n", Some("run")),
        "sweep.yaml:2:1: parameter `LR`: its environment variable `GRIDQ_PARAM_LR` is also that of parameter `lr` (line 1); rename one of them"
    );
    // Names that differ after the mapping load.
    let loaded = load("command: run\nparameters:\n  a.b: 1\n  a.c: 2\n  ab: 3\n");
    assert_eq!(
        loaded.sweep.param_names().collect::<Vec<_>>(),
        ["a.b", "a.c", "ab"]
    );
}

#[test]
fn sweep_names_that_are_not_plain_file_names_are_refused() {
    let rule = "must be 1 to 128 letters, digits, `-`, `_` or `.`, starting with a letter or digit";
    for (name, shown) in [
        ("'.'", "."),
        ("'..'", ".."),
        ("'...'", "..."),
        ("''", ""),
        ("a/b", "a/b"),
        ("'../x'", "../x"),
        ("\"a\\0b\"", "a\0b"),
        ("-rf", "-rf"),
        (".hidden", ".hidden"),
    ] {
        assert_eq!(
            error(&format!(
                "command: run\nname: {name}\nparameters:\n  lr: 1\n"
            )),
            format!("sweep.yaml:2:7: `name` {rule}, found `{shown}`"),
            "name: {name}"
        );
    }
    let long = "a".repeat(129);
    assert_eq!(
        error(&format!(
            "command: run\nname: {long}\nparameters:\n  lr: 1\n"
        )),
        format!("sweep.yaml:2:7: `name` {rule}, found `{}…`", "a".repeat(64)),
    );
    for name in ["a", "7", "train-1.a_b", "x..y", &"a".repeat(128)] {
        let loaded = load(&format!(
            "command: run\nname: {name}\nparameters:\n  lr: 1\n"
        ));
        assert_eq!(loaded.sweep.name(), name);
    }
}

#[test]
fn a_name_taken_from_the_file_must_be_valid_too() {
    assert_eq!(
        load_named("command: run\nparameters:\n  lr: 1\n", "..").err(),
        Some("sweep.yaml: the sweep is named after its file, and `..` is not a valid name: a name must be 1 to 128 letters, digits, `-`, `_` or `.`, starting with a letter or digit; add `name:` to the file, or rename it".into())
    );
    assert_eq!(
        load_named("lr: 1\n", "my params").err(),
        Some("sweep.yaml: the sweep is named after its file, and `my params` is not a valid name: a name must be 1 to 128 letters, digits, `-`, `_` or `.`, starting with a letter or digit; rename the file".into())
    );
    // `name:` overrides the file's name, so the file may be called anything.
    let loaded = load_named("command: run\nname: ok\nparameters:\n  lr: 1\n", "..").expect("loads");
    assert_eq!(loaded.sweep.name(), "ok");
}

#[test]
fn a_byte_order_mark_is_ignored() {
    let sweep = "command: run\nname: bom\nparameters:\n  lr: [0.1, 1e-5]\n  b: 2\n";
    let bare = "lr: [0.1, 1e-5]\nb: 2\n";
    for text in [sweep, bare] {
        let plain = load_with(text, Some("run"));
        let marked = load_with(&format!("\u{feff}{text}"), Some("run"));
        assert_eq!(argvs(&marked.sweep), argvs(&plain.sweep));
        assert_eq!(marked.sweep.param_names().collect::<Vec<_>>(), ["lr", "b"]);
        assert_eq!(marked.sweep.name(), plain.sweep.name());
    }
    // Positions in errors are those of the file without the mark, first line included.
    for (text, expected) in [
        (
            "command: run\nparameters:\n  lr: []\n",
            "sweep.yaml:3:7: parameter `lr`: empty list: expected at least one value",
        ),
        (
            "parametrs: 1\ncommand: run\nparameters:\n  lr: 1\n",
            "sweep.yaml:1:1: unknown field `parametrs`, expected one of `name`, `command`, `parameters`, `zip`, `exclude`, `max_jobs`, `repeat`, `arg_style`, `retries`, `timeout`, `gpus`, `queue`, `env`, `workdir`, `same_code`",
        ),
        (
            "lr: ~\n",
            "sweep.yaml:1:5: parameter `lr`: null value: expected a value (write \"\" for an empty string, or remove the parameter)",
        ),
        (
            "name: x\ncommand: run {nope}\nparameters:\n  lr: 1\n",
            "sweep.yaml:2:10: placeholder `{nope}` names no parameter; expected one of: lr (or `{args}`; write `{{` for a literal brace)",
        ),
    ] {
        let got = error(&format!("\u{feff}{text}"));
        assert_eq!(got, error(text), "with and without the mark");
        assert_eq!(got, expected);
    }
}
