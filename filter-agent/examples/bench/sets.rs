//! Address sets against the kernel's LPM trie: lookup, memory, file to
//! kernel.

use std::{net::IpAddr, time::Instant};

use anyhow::{Context as _, bail};
use aya::programs::Xdp;
use filter_agent::{
    kernel::loader::{fill_trie, program_verdict, time_program, xdp_action},
    oracle::reference,
    rules::compile::compile,
};
use ipnet::IpNet;
use rand::rngs::StdRng;

use crate::{
    BASELINE_OBJECT, load,
    options::Options,
    timing::{Measured, Subject, Timer, measure},
    workload,
};

/// One line of the address-set table: filter-agent's trie beside the
/// kernel's LPM trie holding the same prefixes.
#[derive(serde::Serialize)]
pub(crate) struct SetRow {
    pub(crate) set: String,
    pub(crate) prefixes: usize,
    /// The whole filter program on the set's frames.
    pub(crate) filter: Measured,
    /// One lookup: the reference programs over the empty program.
    pub(crate) trie_lookup_ns: f64,
    pub(crate) kernel_lpm_lookup_ns: f64,
    /// Map values of the trie, and the kernel's charge (memlock) for each.
    pub(crate) map_bytes: usize,
    pub(crate) trie_memlock_bytes: u64,
    pub(crate) kernel_lpm_memlock_bytes: u64,
    /// Set file to attached-ready program: read + parse, compile, load.
    pub(crate) parse_s: f64,
    pub(crate) compile_s: f64,
    pub(crate) load_s: f64,
    pub(crate) kernel_lpm_load_s: f64,
}

/// A set of prefixes behind one deny rule, read from a set file, against
/// the same prefixes in a kernel LPM trie; each also with a program that
/// only looks the source up, for the cost of the lookup itself.
pub(crate) fn measure_set(
    options: &Options,
    rng: &mut StdRng,
    name: &str,
    nets: &[IpNet],
) -> anyhow::Result<SetRow> {
    let v6 = matches!(nets.first(), Some(IpNet::V6(_)));
    let frames = workload::set_frames(rng, nets, 60);
    let dir = tempfile::tempdir()?;
    let path = workload::set_file(dir.path(), nets)?;
    let started = Instant::now();
    let config = filter_agent::rules::config::load(&path)?;
    let parse_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let rule_set = compile(&config)?;
    let compile_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let filter = load(&rule_set)?;
    let load_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let (lpm_map, lpm_program, trie_program) = if v6 {
        ("PREFIXES6", "lpm6", "trie6")
    } else {
        ("PREFIXES", "lpm", "trie4")
    };
    let trie = &rule_set.src.trie;
    let listed_class = trie.lookup(nets[0].network());
    let mut baseline = aya::EbpfLoader::new()
        .override_global("LISTED_CLASS", &listed_class, true)
        .map_max_entries(lpm_map, nets.len() as u32)
        .map_max_entries("TRIE_ENTRIES", trie.entry_blocks())
        .map_max_entries("TRIE_NODES", trie.node_blocks())
        .load(BASELINE_OBJECT)?;
    let map = baseline.map_mut(lpm_map).context("LPM map")?;
    if v6 {
        fill_lpm::<16>(map, nets)?;
    } else {
        fill_lpm::<4>(map, nets)?;
    }
    let lpm = load_program(&mut baseline, lpm_program)?;
    let kernel_lpm_load_s = started.elapsed().as_secs_f64();
    let kernel_lpm_memlock_bytes = memlock(baseline.map(lpm_map).context("LPM map")?)?;
    fill_trie(&mut baseline, ["TRIE_ENTRIES", "TRIE_NODES"], trie)?;
    let trie_memlock_bytes = ["TRIE_ENTRIES", "TRIE_NODES"]
        .iter()
        .map(|name| memlock(baseline.map(name).context("trie map")?))
        .sum::<anyhow::Result<u64>>()?;
    let lookup = load_program(&mut baseline, trie_program)?;
    let empty = load_program(&mut baseline, "empty")?;
    let [lpm, lookup, empty] = [lpm, lookup, empty].map(|name| {
        let program: &Xdp = baseline.program(name).unwrap().try_into().unwrap();
        program
    });
    // The numbers mean something only if all three agree.
    for frame in &frames {
        let (_, outcome) = filter.classify_frame(frame)?;
        let listed = matches!(outcome, reference::Outcome::Rule(_));
        for program in [lpm, lookup] {
            let dropped = program_verdict(program, frame)? == xdp_action::DROP;
            if dropped != listed {
                bail!("{name}: the LPM trie, filter-agent's trie and the filter disagree");
            }
        }
    }

    let repeat = options.repeat;
    let timers: [Timer<'_>; 4] = [
        Box::new(|frame| Ok(filter.time_packet(frame, repeat)?)),
        Box::new(|frame| Ok(time_program(lookup, frame, repeat)?)),
        Box::new(|frame| Ok(time_program(lpm, frame, repeat)?)),
        Box::new(|frame| Ok(time_program(empty, frame, repeat)?)),
    ];
    let subjects = timers.map(|time| Subject {
        frames: &frames,
        time,
    });
    let measured = measure(options.runs, &subjects)?;
    Ok(SetRow {
        set: name.to_owned(),
        prefixes: nets.len(),
        filter: measured[0].summary(),
        trie_lookup_ns: measured[1].paired(&measured[3], |a, b| a - b).median,
        kernel_lpm_lookup_ns: measured[2].paired(&measured[3], |a, b| a - b).median,
        map_bytes: trie.bytes(),
        trie_memlock_bytes,
        kernel_lpm_memlock_bytes,
        parse_s,
        compile_s,
        load_s,
        kernel_lpm_load_s,
    })
}

/// Loads one of the reference programs; returns its name.
pub(crate) fn load_program<'a>(ebpf: &mut aya::Ebpf, name: &'a str) -> anyhow::Result<&'a str> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .context(name.to_owned())?
        .try_into()?;
    program.load()?;
    Ok(name)
}

/// `nets` (all of one family, `LEN` address bytes) into an LPM trie map.
pub(crate) fn fill_lpm<const LEN: usize>(
    map: &mut aya::maps::Map,
    nets: &[IpNet],
) -> anyhow::Result<()> {
    let mut trie = aya::maps::LpmTrie::<_, [u8; LEN], u32>::try_from(map)?;
    for net in nets {
        let bytes = match net.network() {
            IpAddr::V4(addr) => addr.octets().to_vec(),
            IpAddr::V6(addr) => addr.octets().to_vec(),
        };
        let key =
            aya::maps::lpm_trie::Key::new(u32::from(net.prefix_len()), bytes.try_into().unwrap());
        trie.insert(&key, 1, 0)?;
    }
    Ok(())
}

/// What the kernel charges for a map (`memlock` in its fdinfo).
pub(crate) fn memlock(map: &aya::maps::Map) -> anyhow::Result<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let data = match map {
        aya::maps::Map::Array(data) | aya::maps::Map::LpmTrie(data) => data,
        _ => bail!("not an array or LPM trie"),
    };
    let fd = data.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .context("no memlock in fdinfo")?
        .trim()
        .parse()
        .context("memlock")
}
