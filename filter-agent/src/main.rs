//! filter-agent: loads the stateless XDP filter onto an interface and keeps
//! it there until told to stop. This file only parses the command line and
//! dispatches: everything else is in the library.

use std::process::ExitCode;

use clap::Parser as _;

use filter_agent::{
    agent,
    cli::{self, Cli, Command},
    commands,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help and --version.
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("error: {}", cli::one_line_error(&err));
            return ExitCode::from(2);
        }
    };
    cli::init_logging();
    let result = match cli.command {
        Some(Command::Check { rules }) => commands::check(&rules),
        Some(Command::Test { rules, packet }) => commands::test_packets(&rules, &packet),
        Some(Command::Replay { rules, pcap, json }) => commands::replay(&rules, &pcap, json),
        Some(Command::Guard { iface, top, json }) => commands::guard(iface.as_deref(), top, json),
        Some(Command::Audit { rules, json }) => commands::audit(rules.as_deref(), json),
        Some(Command::Import {
            format,
            acl,
            direction,
            output,
            file,
        }) => commands::import(format, acl.as_deref(), direction, output.as_deref(), &file),
        Some(Command::Detach { iface }) => commands::detach(&iface),
        Some(Command::Watch { iface }) => commands::watch(&iface),
        Some(Command::Stats { iface, json, watch }) => commands::stats(&iface, json, watch),
        None => agent::run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
