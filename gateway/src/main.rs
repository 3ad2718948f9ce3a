//! The `ferry` binary: the gateway daemon and the CLI that talks to it.

fn main() -> std::process::ExitCode {
    ferry::cli::main()
}
