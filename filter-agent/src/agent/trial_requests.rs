//! The running agent's answers to `filter-agent try` and `confirm`, and the
//! trial's end: confirmed, reverted at its deadline, or replaced by a reload
//! of the rules file (the file is the operator's word).

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use sd_notify::NotifyState;
use tracing::{error, info, warn};

use super::{
    lock, notify, reload,
    serve::Agent,
    trial::{Pending, Previous, REVERT_RETRY, Trial, refused},
};
use crate::{
    control::{self, Answer, Request},
    rules::compile,
    rules::config::{self, Config},
};

impl Agent {
    /// Answers a client of the control socket.
    pub(super) async fn on_control(&mut self, pending: Pending) {
        let answer = match &pending.request {
            Request::Try {
                path,
                text,
                timeout_seconds,
                force,
            } => {
                let (path, text) = (path.clone(), text.clone());
                self.on_try(path, text, *timeout_seconds, *force).await
            }
            Request::Confirm => self.on_confirm(),
        };
        pending.answer(answer);
    }

    async fn on_try(
        &mut self,
        path: PathBuf,
        text: String,
        timeout_seconds: u64,
        force: bool,
    ) -> Answer {
        if let Some(trial) = &self.trial {
            return refused(format!(
                "rules from {} are already on trial until {}: `filter-agent confirm` keeps them, \
                 or wait for the previous rules to come back",
                trial.path.display(),
                control::clock(trial.deadline_unix)
            ));
        }
        if timeout_seconds == 0 {
            return refused("a trial needs a timeout of at least 1 second".into());
        }
        let (checked_path, checked_text) = (path.clone(), text.clone());
        let prepared = tokio::task::spawn_blocking(move || -> anyhow::Result<(Config, _, _)> {
            let config = config::parse(&checked_path, &checked_text)?;
            let rule_set = compile::compile(&config)?;
            let cut = if force {
                Vec::new()
            } else {
                reload::cuts(&rule_set)?
            };
            Ok((config, rule_set, cut))
        })
        .await
        .context("compiling the rules on trial");
        let (config, rule_set, cut) = match prepared.and_then(|prepared| prepared) {
            Ok(prepared) => prepared,
            Err(err) => return refused(format!("{err:#}; nothing was applied")),
        };
        if !cut.is_empty() {
            return Answer::WouldCut {
                sessions: cut.iter().map(ToString::to_string).collect(),
            };
        }
        let previous = Previous {
            rule_set: Arc::clone(&self.rule_set),
            guard: self.watch.settings.clone(),
            count: lock(&self.status).rules_loaded as usize,
        };
        notify(&[NotifyState::Reloading]);
        let count = config.rules.len();
        let swapped = self.swap_in(Arc::new(rule_set), config.guard, count).await;
        notify(&[NotifyState::Ready]);
        if let Err(err) = swapped {
            return refused(format!("{err:#}; the previous rules stay in force"));
        }
        let timeout = Duration::from_secs(timeout_seconds);
        let trial = Trial::new(previous, timeout, path, text);
        let deadline_unix = trial.deadline_unix;
        warn!(
            rules = %trial.path.display(),
            count,
            deadline = %control::clock(deadline_unix),
            "rules on trial: the previous rules come back at the deadline unless `filter-agent confirm`"
        );
        self.trial = Some(trial);
        self.trial_changed(Some(count));
        Answer::Trying {
            interfaces: self.interfaces.iter().map(|i| i.name.clone()).collect(),
            deadline_unix,
        }
    }

    fn on_confirm(&mut self) -> Answer {
        let Some(trial) = self.trial.take() else {
            return refused("nothing to confirm: no rules are on trial".into());
        };
        info!(
            rules = %trial.path.display(),
            file = %self.rules.display(),
            "trial confirmed: the rules on trial stay, and `filter-agent confirm` writes them to the rules file"
        );
        self.trial_changed(None);
        Answer::Confirmed {
            rules: self.rules.clone(),
            text: trial.text,
        }
    }

    /// The deadline passed without a confirm: the previous rules again.
    pub(super) async fn revert(&mut self) {
        let Some(trial) = self.trial.take() else {
            return;
        };
        let previous = &trial.previous;
        let (rule_set, guard, count) = (
            Arc::clone(&previous.rule_set),
            previous.guard.clone(),
            previous.count,
        );
        notify(&[NotifyState::Reloading]);
        let reverted = self.swap_in(rule_set, guard, count).await;
        notify(&[NotifyState::Ready]);
        match reverted {
            Ok(count) => {
                lock(&self.status).trial_reverts += 1;
                warn!(
                    rules = %trial.path.display(),
                    "trial not confirmed before its deadline: the previous rules are back"
                );
                self.trial_changed(Some(count));
            }
            Err(err) => {
                error!(
                    "the trial's deadline passed, but the previous rules could not be put back \
                     (trying again in {REVERT_RETRY:?}): {err:#}"
                );
                // Its timer fires again after REVERT_RETRY.
                self.trial = Some(trial);
            }
        }
    }

    /// A reload of the rules file replaced the rules on trial: the trial
    /// is over (nothing to revert to any more).
    pub(super) fn end_trial(&mut self, why: &str) {
        if let Some(trial) = self.trial.take() {
            warn!(rules = %trial.path.display(), "trial ended: {why}");
            self.trial_changed(None);
        }
    }

    /// The status and `systemctl status` after a trial started or ended
    /// (with the rules now in force, when they changed).
    fn trial_changed(&mut self, count: Option<usize>) {
        {
            let mut status = lock(&self.status);
            status.trial_deadline_unix = self.trial.as_ref().map(|trial| trial.deadline_unix);
            if let Some(count) = count {
                status.rules_loaded = count as u64;
            }
        }
        notify(&[NotifyState::Status(&self.filtering())]);
    }
}
