//! Command-line interface (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "filter-agent",
    version,
    about = "Stateless XDP packet filter and ephemeral-port guard",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a rules file and exit: 0 if it is valid, 1 if not.
    Check {
        /// The rules file (TOML).
        #[arg(long)]
        rules: PathBuf,
    },
}

/// Running the filter: the default when no subcommand is given.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Network interface to filter.
    #[arg(long, required = true)]
    pub iface: Option<String>,
    /// The rules file (TOML).
    #[arg(long, required = true)]
    pub rules: Option<PathBuf>,
    /// How to attach: `native` runs in the driver (fastest), `skb` is the
    /// generic mode every interface supports, `auto` tries native first.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpModeArg {
    Auto,
    Native,
    Skb,
}

/// Folds clap's multi-line error report into one line.
pub fn one_line_error(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let message = rendered.split("\n\n").next().unwrap_or_default();
    let folded: Vec<&str> = message.lines().map(str::trim).collect();
    let folded = folded.join(" ");
    let folded = folded.strip_prefix("error: ").unwrap_or(&folded);
    format!("{folded} (see --help)")
}
