//! One scenario outside cargo: `fa-scenario NAME FILTER-AGENT`. `cargo
//! xtask vm-test` runs it inside its Debian 12 guest, whose kernel has
//! what this machine's may not (IPVS for `lvs-dr`).

use std::{path::Path, process::ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, agent] = args.as_slice() else {
        eprintln!("usage: fa-scenario NAME FILTER-AGENT");
        return ExitCode::from(2);
    };
    match scenarios::run(name, Path::new(agent)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
