//! `vmsnap setup`: the edge of `vmsnap::setup`, adding the completions and the man pages clap makes.

use crate::Cli;
use anyhow::{Context, Result};
use clap::CommandFactory;

pub fn run(config: &std::path::Path, root: &std::path::Path, exe: Option<std::path::PathBuf>, dry_run: bool) -> Result<()> {
    use vmsnap::setup::{self, Item};
    let exe = match exe {
        Some(e) if e.is_absolute() => e,
        Some(e) => anyhow::bail!("--exe {}: give the absolute path the binary is installed at", e.display()),
        None => std::env::current_exe().context("finding this binary")?,
    };
    let mut extra = Vec::new();
    for (shell, path) in [
        (clap_complete::Shell::Bash, "usr/share/bash-completion/completions/vmsnap"),
        (clap_complete::Shell::Zsh, "usr/share/zsh/vendor-completions/_vmsnap"),
        (clap_complete::Shell::Fish, "usr/share/fish/vendor_completions.d/vmsnap.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "vmsnap", &mut buf);
        extra.push(Item { path: path.into(), content: buf, mode: 0o644, keep_existing: false });
    }
    for (file, page) in super::man::pages()? {
        let section = file.rsplit('.').next().unwrap_or("8");
        extra.push(Item {
            path: format!("usr/local/share/man/man{section}/{file}").into(),
            content: page,
            mode: 0o644,
            keep_existing: false,
        });
    }
    // The RAM key sealed dumps use: the config's `ram_key`, or where it is by default.
    let ram_key = vmsnap::config::Config::load(config)
        .map(|c| c.ram_key)
        .unwrap_or_else(|_| std::path::PathBuf::from(vmsnap::config::DEFAULT_RAM_KEY));
    extra.push(setup::ram_key_item(&ram_key).context("drawing a RAM key from /dev/urandom")?);
    let done = setup::apply(root, &setup::items(&exe, config, extra), dry_run)?;
    for d in &done {
        let what = serde_json::to_value(d.outcome).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        println!("{}{what:<10} {}", if dry_run { "would be " } else { "" }, d.path.display());
    }
    println!("\nnext:");
    for s in setup::next_steps(&done, &ram_key) {
        println!("  - {s}");
    }
    Ok(())
}
