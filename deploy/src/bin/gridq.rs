//! The `gridq` binary: every subcommand, including the services, lives behind this one entry.

fn main() -> std::process::ExitCode {
    gridq_deploy::cli::main()
}
