//! Writes what `cargo xtask package` ships besides the binary and derives
//! from the command line's definition: man pages (`man/*.8`) and shell
//! completions (`completions/`), into the directory given.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;
use filter_agent::cli::Cli;

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(
        std::env::args_os()
            .nth(1)
            .context("usage: package_docs OUTDIR")?,
    );
    let mut command = Cli::command();
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    let page = |command: clap::Command, name: &str| -> anyhow::Result<()> {
        let mut file = std::fs::File::create(man.join(format!("{name}.8")))?;
        clap_mangen::Man::new(command)
            .section("8")
            .render(&mut file)?;
        Ok(())
    };
    page(command.clone(), "filter-agent")?;
    for sub in command.get_subcommands() {
        // clap takes names as &'static str (without its `string` feature):
        // this program ends right after.
        let name: &'static str = format!("filter-agent-{}", sub.get_name()).leak();
        page(sub.clone().name(name), name)?;
    }
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command, "filter-agent", &completions)?;
    }
    Ok(())
}
