//! filter-agent's entry point: parses the command line and dispatches to
//! the library (`cli`, `commands`, `agent`), where everything else is.

use std::process::ExitCode;

use clap::Parser as _;
use filter_agent::{
    agent,
    cli::{self, Cli, Command, DirectionArg},
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
    if let Err(err) = dispatch(cli) {
        eprintln!("error: {}", cli::one_line_failure(&err));
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
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
        } => commands::test(source.decider(direction), &packet),
        Command::Replay { rules, pcap, json } => commands::replay(&rules, &pcap, json),
        Command::Guard { iface, top, json } => commands::guard(iface.as_deref(), top, json),
        Command::Audit { source, json } => {
            commands::audit(source.decider(DirectionArg::Ingress), json)
        }
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
