//! The bench's command line (clap; `cargo xtask bench` is its interface).

use std::path::PathBuf;

/// ns/packet of the real program next to xdp-filter (default), or with
/// `--live` the whole path with live traffic next to nftables, iptables
/// and ipset.
#[derive(clap::Parser)]
#[command(name = "bench")]
pub(crate) struct Options {
    /// The live-traffic benchmark instead.
    #[arg(long)]
    pub(crate) live: bool,
    /// Length of one live run, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) seconds: f64,
    /// Measurement rounds (the median and quartiles are reported).
    #[arg(long, default_value_t = 7)]
    pub(crate) runs: usize,
    /// BPF_PROG_TEST_RUN repetitions per frame and round.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) repeat: u32,
    /// Rule-set sizes (default 10,100,1000,10000; families and
    /// --classbench: 10,1000,10000,16384; live: 1,100,1000,10000).
    #[arg(long, value_delimiter = ',')]
    pub(crate) sizes: Option<Vec<usize>>,
    /// IPv4 address-set sizes.
    #[arg(long, value_delimiter = ',', default_values_t = [100_000, 1_000_000])]
    pub(crate) set_sizes: Vec<usize>,
    /// IPv6 address-set sizes.
    #[arg(long, value_delimiter = ',', default_values_t = [200_000])]
    pub(crate) v6_set_sizes: Vec<usize>,
    /// A ClassBench filter set: time its first 10, 1,000, 10,000 and 16,384
    /// rules on its trace's early, late and unmatched frames instead.
    #[arg(long, requires = "trace")]
    pub(crate) classbench: Option<PathBuf>,
    /// The ClassBench trace of `--classbench`'s set.
    #[arg(long, requires = "classbench")]
    pub(crate) trace: Option<PathBuf>,
    /// Measure only these parts (default: all of them).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(crate) only: Option<Vec<Part>>,
    /// Write the results here as JSON.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Fail, rather than leave its column empty, when xdp-filter cannot
    /// be measured (the smoke test in `cargo xtask test`).
    #[arg(long)]
    pub(crate) require_peer: bool,
    /// Added by `cargo bench`-style runners; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The parts of the default bench.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Part {
    /// Rule sets of growing size beside xdp-filter.
    RuleSets,
    /// Rate limits under a flood.
    Limits,
    /// Address sets beside the kernel's LPM trie.
    Sets,
    /// Early, late and unmatched frames at up to 16,384 rules, on sets of
    /// each ClassBench family's shape.
    Families,
}

impl Options {
    /// Whether `part` is measured in this run.
    pub(crate) fn measures(&self, part: Part) -> bool {
        self.only.as_ref().is_none_or(|only| only.contains(&part))
    }
}
