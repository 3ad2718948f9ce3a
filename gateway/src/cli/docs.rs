//! Shell completions and manual pages, generated from the command-line definition itself
//! (clap_complete, clap_mangen), so they always match the verbs and flags.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Directory the pages go into (created if missing): ferry.1 and one page per verb
    /// (ferry-migrate.1, ferry-workload-run.1, …).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

/// `ferry completions SHELL`: the completion script on stdout (a reader that stops early,
/// like `head`, is not an error).
pub fn completions(args: &CompletionsArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let mut cmd = super::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "ferry", &mut script);
    match std::io::stdout().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write the completion script")
        }
        _ => Ok(()),
    }
}

/// `ferry man --dir DIR`: writes every page; prints their paths.
pub fn man(args: &ManArgs) -> anyhow::Result<()> {
    let written = write_pages(&args.dir)?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes the page of `ferry` and of every visible verb (nested ones too) into `dir`.
fn write_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    let mut cmd = super::Cli::command();
    cmd.build();
    let mut written = Vec::new();
    write_page(&cmd, "ferry", dir, &mut written)?;
    Ok(written)
}

fn write_page(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name)
        .render(&mut bytes)
        .with_context(|| format!("cannot render the page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    written.push(path);
    // Not the `help` verbs clap adds to every command with verbs: they have no page.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_page(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_name_every_verb() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh] {
            let mut cmd = crate::cli::Cli::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "ferry", &mut out);
            let text = String::from_utf8_lossy(&out);
            for verb in ["migrate", "workload", "migration", "checkpoint", "peer"] {
                assert!(text.contains(verb), "{shell:?} completion lacks {verb}");
            }
        }
    }

    #[test]
    fn a_page_for_ferry_and_each_verb_with_its_flags() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("ferry-man-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let written = write_pages(&dir)?;
        let page = |name: &str| std::fs::read_to_string(dir.join(format!("{name}.1")));
        assert!(page("ferry")?.starts_with(".ie"), "not a roff page");
        let migrate = page("ferry-migrate")?;
        assert!(migrate.contains(".TH ferry-migrate"), "{migrate}");
        assert!(migrate.contains("mode"), "the page lacks --mode");
        assert!(page("ferry-workload-run")?.contains("volume"));
        assert!(
            !dir.join("ferry-lazy-guard.1").exists(),
            "a hidden verb has a page"
        );
        assert!(
            written.iter().all(|p| !p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains("-help"))),
            "clap's help verbs have pages: {written:?}"
        );
        assert!(written.len() > 10, "{} pages", written.len());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
