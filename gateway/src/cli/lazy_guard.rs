//! `ferry lazy-guard` (hidden): the guard of a post-copy restore's userfaultfds, which the
//! gateway starts with its end of the guard's socket as stdin (see `criu::lazy::guard`);
//! not a command for people.

use std::path::PathBuf;

use clap::Args as ClapArgs;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Where to write the verdict (0: the restored tree has every page).
    #[arg(long)]
    exit_file: PathBuf,
    /// `cgroup.kill` of the restored tree, written if the gateway goes before it is done.
    #[arg(long)]
    kill: Option<PathBuf>,
}

/// Runs the guard on stdin; its verdict is the exit code.
pub fn run(args: &Args) -> std::process::ExitCode {
    let sock = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: no guard socket on stdin: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = crate::criu::lazy::guard(&sock, args.kill.as_deref(), &args.exit_file);
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}

use std::os::fd::AsFd;
