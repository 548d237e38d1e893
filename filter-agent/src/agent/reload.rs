//! Reloading the rules on every filtered interface, all or nothing.

use std::path::Path;

use crate::{
    host::sessions::{self, Cut},
    kernel::guard::Listeners,
    kernel::loader::LoadError,
    rules::compile::{self, RuleSet},
    rules::config::{self, Config},
};

use super::interface::Interface;

/// Reads, validates and compiles the rules file, and finds the
/// established sessions the new rules would cut (a reload still applies
/// them: the file is the operator's word; the agent warns).
pub(super) fn prepare(rules: &Path) -> anyhow::Result<(Config, RuleSet, Vec<Cut>)> {
    let config = config::load(rules)?;
    let rule_set = compile::compile(&config)?;
    let cut = cuts(&rule_set).unwrap_or_else(|err| {
        tracing::warn!(%err, "cannot check the established sessions against the new rules");
        Vec::new()
    });
    Ok((config, rule_set, cut))
}

/// The established sessions of the agent's own namespace (where the
/// interfaces it filters are) that `rule_set` would cut.
pub(super) fn cuts(rule_set: &RuleSet) -> Result<Vec<Cut>, LoadError> {
    sessions::cut_by(rule_set, &sessions::established())
}

/// Loads `new` for every filtered interface, then swaps each in. Any error
/// before the swaps leaves every interface as it was, and a swap that
/// fails puts the previous rules (`current`) back on the interfaces
/// already swapped: nothing is half-applied. An interface that is gone
/// gets the new rules when it comes back.
pub(super) fn reload(
    interfaces: &mut [Interface],
    new: &RuleSet,
    listeners: &Listeners,
    current: &RuleSet,
) -> anyhow::Result<()> {
    let mut targets: Vec<&mut Interface> = interfaces
        .iter_mut()
        .filter(|interface| interface.filtered)
        .collect();
    let loaded = targets
        .iter()
        .map(|interface| interface.load(new, listeners))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (done, filter) in loaded.into_iter().enumerate() {
        if let Err(err) = targets[done].swap(filter, new) {
            let failed = targets[done].name.clone();
            let restored = restore(&mut targets[..done], current, listeners);
            return Err(err.context(format!("swapping the new rules in on {failed}{restored}")));
        }
    }
    for interface in interfaces.iter_mut().filter(|i| !i.filtered) {
        interface.behind = true;
    }
    Ok(())
}

/// Puts `current` back on `swapped`; says how that went, for the error.
fn restore(swapped: &mut [&mut Interface], current: &RuleSet, listeners: &Listeners) -> String {
    let mut restored = String::new();
    for interface in swapped {
        let back = interface
            .load(current, listeners)
            .and_then(|filter| interface.swap(filter, current));
        restored += &match back {
            Ok(()) => format!("; {} runs the previous rules again", interface.name),
            Err(back) => format!("; {} runs the new rules ({back:#})", interface.name),
        };
    }
    restored
}
