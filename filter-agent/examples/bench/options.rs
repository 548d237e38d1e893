//! The bench's command line (read by hand: the bench is an example, and
//! `cargo xtask bench` is its interface).

use std::path::PathBuf;

use anyhow::{Context as _, bail};

pub(crate) struct Options {
    /// `--live`: the live-traffic benchmark instead.
    pub(crate) live: bool,
    /// Length of one live run.
    pub(crate) seconds: f64,
    pub(crate) runs: usize,
    pub(crate) repeat: u32,
    /// Rule-set sizes (defaults differ between the two benchmarks).
    pub(crate) sizes: Option<Vec<usize>>,
    pub(crate) set_sizes: Vec<usize>,
    pub(crate) v6_set_sizes: Vec<usize>,
    pub(crate) json: Option<PathBuf>,
    /// `--require-peer`: fail, rather than leave its column empty, when
    /// xdp-filter cannot be measured (the smoke test in `cargo xtask test`).
    pub(crate) require_peer: bool,
}

/// "10,100,1000" -> [10, 100, 1000]
pub(crate) fn numbers(list: &str) -> anyhow::Result<Vec<usize>> {
    Ok(list.split(',').map(str::parse).collect::<Result<_, _>>()?)
}

pub(crate) fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        live: false,
        seconds: 1.0,
        runs: 7,
        repeat: 20_000,
        sizes: None,
        set_sizes: vec![100_000, 1_000_000],
        v6_set_sizes: vec![200_000],
        json: None,
        require_peer: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--live" => options.live = true,
            "--seconds" => options.seconds = value()?.parse()?,
            "--runs" => options.runs = value()?.parse()?,
            "--repeat" => options.repeat = value()?.parse()?,
            "--json" => options.json = Some(value()?.into()),
            "--sizes" => options.sizes = Some(numbers(&value()?)?),
            "--set-sizes" => options.set_sizes = numbers(&value()?)?,
            "--v6-set-sizes" => options.v6_set_sizes = numbers(&value()?)?,
            "--require-peer" => options.require_peer = true,
            "--bench" => {} // added by `cargo bench`-style runners
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(options)
}
