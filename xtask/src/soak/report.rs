//! The soak's figures, and its verdict on what the agent promises.

use anyhow::bail;

use super::{Outcome, RSS_GROWTH_LIMIT, Soak};

/// One line per figure.
pub(super) fn print(soak: &Soak, outcome: &Outcome) {
    let tally = &outcome.tally;
    println!(
        "soak: {} rule sets written, each seen in force (its marker rule in stats, a new generation; the last {})",
        soak.step, soak.generation
    );
    println!(
        "soak: {} relinks, {} SIGKILL restarts, {} /metrics and stats scrapes",
        soak.relinks, soak.restarts, soak.scrapes
    );
    println!(
        "soak: allowed {} sent, {} received, {} lost; denied {} sent, {} delivered",
        tally.allowed_sent,
        tally.allowed_received,
        tally.allowed_lost(),
        tally.denied_sent,
        tally.denied_delivered
    );
    println!(
        "soak: out-of-range returns {} sent, {} counted by the guard",
        soak.out_of_range_sent, outcome.guard_counted
    );
    for (index, life) in soak.lives.iter().enumerate() {
        let usage = |usage: &Option<super::observe::Usage>| {
            usage.as_ref().map_or("-".to_owned(), |u| {
                format!("{} fds, {} KiB", u.fd_count(), u.rss_kib)
            })
        };
        println!(
            "soak: agent {}: warm {}, last {}, RSS growth {}, {} watch lines",
            index + 1,
            usage(&life.warm),
            usage(&life.last),
            life.rss_growth()
                .map_or("-".to_owned(), |growth| format!("{:+.1}%", growth * 100.0)),
            life.watch_lines
        );
    }
    let at_end = match &outcome.at_end {
        Ok(objects) => objects.to_string(),
        Err(err) => format!("{err:#}"),
    };
    println!(
        "soak: BPF objects at the start {}; after detach {at_end}; no pins left",
        outcome.at_start
    );
}

/// Fails naming every promise broken.
pub(super) fn verdict(soak: &Soak, outcome: &Outcome) -> anyhow::Result<()> {
    let tally = &outcome.tally;
    let mut broken = Vec::new();
    if tally.denied_delivered != 0 {
        broken.push(format!(
            "{} denied datagrams delivered",
            tally.denied_delivered
        ));
    }
    if tally.allowed_lost() != 0 {
        broken.push(format!("{} allowed datagrams lost", tally.allowed_lost()));
    }
    if outcome.guard_counted != soak.out_of_range_sent {
        broken.push(format!(
            "the guard counted {} of {} out-of-range returns",
            outcome.guard_counted, soak.out_of_range_sent
        ));
    }
    // A life too short to have warmed up (the last, when the run ends
    // right after a restart) has no samples and is not judged.
    let judged = soak
        .lives
        .iter()
        .enumerate()
        .filter(|(_, life)| life.warm.is_some());
    for (index, life) in judged {
        if let (Some(warm), Some(last)) = (&life.warm, &life.last) {
            let grown = warm.fds_grown(last);
            if !grown.is_empty() {
                broken.push(format!(
                    "agent {}: more fds: {}",
                    index + 1,
                    grown.join(", ")
                ));
            }
        }
        if life
            .rss_growth()
            .is_some_and(|growth| growth > RSS_GROWTH_LIMIT)
        {
            broken.push(format!(
                "agent {}: RSS grew {:.1}%",
                index + 1,
                life.rss_growth().unwrap_or_default() * 100.0
            ));
        }
        if life.watch_lines == 0 {
            broken.push(format!("agent {}: watch printed nothing", index + 1));
        }
    }
    if let Err(err) = &outcome.at_end {
        broken.push(format!("{err:#}"));
    }
    if !broken.is_empty() {
        bail!("soak: {}", broken.join("; "));
    }
    println!("soak: every promise held");
    Ok(())
}
