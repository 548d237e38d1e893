//! filter-agent: loads the stateless XDP filter onto an interface and keeps
//! it there until told to stop. This file only parses the command line and
//! dispatches: everything else is in the library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;

use filter_agent::{
    agent,
    cli::{self, Chosen, Cli, Command, DirectionArg},
    commands,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version.
        Err(err) if !err.use_stderr() => return ExitCode::from(u8::from(err.print().is_err())),
        Err(err) => {
            eprintln!("error: {}", cli::one_line_error(&err));
            return ExitCode::from(2);
        }
    };
    cli::init_logging(cli.run.log_format);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let Some(command) = cli.command else {
        return agent::run(cli.run.settings()?);
    };
    match command {
        Command::Check { rules, live } => commands::check(&rules, live),
        Command::Test {
            source,
            direction,
            packet,
        } => match source.chosen(direction) {
            Chosen::Upstream(acl) => commands::test_upstream(&acl, &packet),
            Chosen::Rules(rules) => commands::test_packets(rules.context("no --rules")?, &packet),
        },
        Command::Replay { rules, pcap, json } => commands::replay(&rules, &pcap, json),
        Command::Guard { iface, top, json } => commands::guard(iface.as_deref(), top, json),
        Command::Audit { source, json } => match source.chosen(DirectionArg::Ingress) {
            Chosen::Upstream(acl) => commands::audit_upstream(&acl, json),
            Chosen::Rules(rules) => commands::audit(rules, json),
        },
        Command::Import { acl, output } => commands::import(&acl.upstream(), output.as_deref()),
        Command::Try {
            rules,
            timeout,
            force,
            control_socket,
        } => commands::try_rules(&rules, timeout, force, &control_socket),
        Command::Confirm { control_socket } => commands::confirm(&control_socket),
        Command::Detach { iface } => commands::detach(&iface),
        Command::Watch { iface } => commands::watch(&iface),
        Command::Stats { iface, json, watch } => commands::stats(&iface, json, watch),
    }
}
