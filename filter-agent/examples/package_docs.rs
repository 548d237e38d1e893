//! Writes what `cargo xtask package` ships besides the binary and derives
//! from the command line's definition: man pages (`man/*.8`, each with the
//! sections of `packaging/man/common.roff`; and the rules file's page,
//! `filter-agent-rules.5`) and shell completions (`completions/`), into the
//! directory given.

use std::{io::Write as _, path::PathBuf};

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;
use filter_agent::cli::Cli;

/// EXIT STATUS, SIGNALS, ENVIRONMENT, FILES and SEE ALSO, on every page.
const COMMON_SECTIONS: &str = include_str!("../../packaging/man/common.roff");
/// The rules file's page, section 5.
const RULES_PAGE: &str = include_str!("../../packaging/man/filter-agent-rules.5");

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
        let (subcommands, version) = (command.has_subcommands(), command.get_version().is_some());
        let man = clap_mangen::Man::new(command).section("8");
        man.render_title(&mut file)?;
        man.render_name_section(&mut file)?;
        man.render_synopsis_section(&mut file)?;
        man.render_description_section(&mut file)?;
        man.render_options_section(&mut file)?;
        if subcommands {
            man.render_subcommands_section(&mut file)?;
        }
        file.write_all(COMMON_SECTIONS.as_bytes())?;
        if version {
            man.render_version_section(&mut file)?;
        }
        Ok(())
    };
    std::fs::write(man.join("filter-agent-rules.5"), RULES_PAGE)?;
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
