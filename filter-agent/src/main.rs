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
        Some(Command::Check { rules, live }) => commands::check(&rules, live),
        Some(Command::Test {
            rules,
            upstream,
            upstream_format,
            acl,
            direction,
            packet,
        }) => match (rules, upstream, upstream_format) {
            (_, Some(file), Some(format)) => {
                let upstream = commands::Upstream {
                    file: &file,
                    format,
                    acl: acl.as_deref(),
                    direction,
                };
                commands::test_upstream(&upstream, &packet)
            }
            (Some(rules), ..) => commands::test_packets(&rules, &packet),
            // clap requires one of the two.
            _ => unreachable!("neither --rules nor --upstream"),
        },
        Some(Command::Replay { rules, pcap, json }) => commands::replay(&rules, &pcap, json),
        Some(Command::Guard { iface, top, json }) => commands::guard(iface.as_deref(), top, json),
        Some(Command::Audit {
            rules,
            upstream,
            upstream_format,
            acl,
            json,
        }) => match (upstream, upstream_format) {
            (Some(file), Some(format)) => {
                let upstream = commands::Upstream {
                    file: &file,
                    format,
                    acl: acl.as_deref(),
                    direction: filter_agent::rules::upstream::Direction::Ingress,
                };
                commands::audit_upstream(&upstream, json)
            }
            _ => commands::audit(rules.as_deref(), json),
        },
        Some(Command::Import {
            format,
            acl,
            direction,
            output,
            file,
        }) => {
            let upstream = commands::Upstream {
                file: &file,
                format,
                acl: acl.as_deref(),
                direction,
            };
            commands::import(&upstream, output.as_deref())
        }
        Some(Command::Try {
            rules,
            timeout,
            force,
            control_socket,
        }) => commands::try_rules(&rules, timeout, force, &control_socket),
        Some(Command::Confirm { control_socket }) => commands::confirm(&control_socket),
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
