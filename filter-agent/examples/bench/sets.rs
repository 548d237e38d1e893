//! Address sets against the kernel's LPM trie: lookup, memory, file to
//! kernel.

use std::{net::IpAddr, path::Path, time::Instant};

use anyhow::{Context as _, bail};
use aya::programs::Xdp;
use filter_agent::{
    kernel::loader::{fill_trie, program_verdict, time_program, xdp_action},
    oracle::reference,
    rules::compile::{AddressTrie, compile},
    rules::config::geoip,
};
use ipnet::IpNet;
use rand::rngs::StdRng;

use crate::{
    BASELINE_OBJECT, load,
    options::Options,
    stall,
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
    let kernel = KernelLpm::load(nets, &rule_set.src.trie)?;
    let kernel_lpm_load_s = started.elapsed().as_secs_f64();
    let [lpm, lookup, empty] = kernel.programs.map(|name| {
        let program: &Xdp = kernel.baseline.program(name).unwrap().try_into().unwrap();
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
        map_bytes: rule_set.src.trie.bytes(),
        trie_memlock_bytes: kernel.trie_memlock_bytes,
        kernel_lpm_memlock_bytes: kernel.lpm_memlock_bytes,
        parse_s,
        compile_s,
        load_s,
        kernel_lpm_load_s,
    })
}

/// The reference programs (filter-ebpf/src/baseline.rs) with `nets` in a
/// kernel LPM trie and in filter-agent's trie, loaded; what the kernel
/// charges for each.
struct KernelLpm {
    baseline: aya::Ebpf,
    /// The LPM lookup, the trie lookup and the empty program.
    programs: [&'static str; 3],
    lpm_memlock_bytes: u64,
    trie_memlock_bytes: u64,
}

impl KernelLpm {
    fn load(nets: &[IpNet], trie: &AddressTrie) -> anyhow::Result<Self> {
        let v6 = matches!(nets.first(), Some(IpNet::V6(_)));
        let (lpm_map, lpm_program, trie_program) = if v6 {
            ("PREFIXES6", "lpm6", "trie6")
        } else {
            ("PREFIXES", "lpm", "trie4")
        };
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
        let lpm_memlock_bytes = memlock(baseline.map(lpm_map).context("LPM map")?)?;
        fill_trie(&mut baseline, ["TRIE_ENTRIES", "TRIE_NODES"], trie)?;
        let trie_memlock_bytes = ["TRIE_ENTRIES", "TRIE_NODES"]
            .iter()
            .map(|name| memlock(baseline.map(name).context("trie map")?))
            .sum::<anyhow::Result<u64>>()?;
        let lookup = load_program(&mut baseline, trie_program)?;
        let empty = load_program(&mut baseline, "empty")?;
        Ok(Self {
            baseline,
            programs: [lpm, lookup, empty],
            lpm_memlock_bytes,
            trie_memlock_bytes,
        })
    }
}

/// Loads one of the reference programs; returns its name.
pub(crate) fn load_program(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
) -> anyhow::Result<&'static str> {
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

/// Measures every address set, prints the table, and the swap of the
/// largest IPv4 set under live traffic.
pub(crate) fn run(
    options: &Options,
    rng: &mut StdRng,
) -> anyhow::Result<(Vec<SetRow>, Option<stall::StallRow>)> {
    let cases = cases(options, rng)?;
    println!(
        "\n{:<14} {:>9} | {:>7} {:>7} | {:>7} {:>7} | {:>8} {:>8} {:>8} | {:>7} {:>7} | {:>7}",
        "set",
        "prefixes",
        "trie ns",
        "LPM ns",
        "trie MiB",
        "LPM MiB",
        "parse s",
        "compile",
        "load s",
        "total s",
        "LPM s",
        "filter"
    );
    let mut sets = Vec::new();
    for (name, nets) in &cases {
        let row = measure_set(options, rng, name, nets)?;
        let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
        println!(
            "{:<14} {:>9} | {:>7.1} {:>7.1} | {:>8.1} {:>7.1} | {:>8.2} {:>8.2} {:>8.2} | {:>7.2} {:>7.2} | {:>7.1}",
            row.set,
            row.prefixes,
            row.trie_lookup_ns,
            row.kernel_lpm_lookup_ns,
            mib(row.trie_memlock_bytes),
            mib(row.kernel_lpm_memlock_bytes),
            row.parse_s,
            row.compile_s,
            row.load_s,
            row.parse_s + row.compile_s + row.load_s,
            row.kernel_lpm_load_s,
            row.filter.ns,
        );
        sets.push(row);
    }
    // The largest IPv4 set replaced by itself with one prefix changed.
    let largest = cases
        .iter()
        .filter(|(name, _)| name.starts_with("IPv4"))
        .max_by_key(|(_, nets)| nets.len());
    let stall = largest
        .map(|(_, nets)| swap_under_traffic(nets))
        .transpose()?;
    Ok((sets, stall))
}

/// The sets measured: random IPv4 and IPv6 ones of the sizes asked, and
/// Debian's GeoIP country table (whole, and its largest country), IPv4.
fn cases(options: &Options, rng: &mut StdRng) -> anyhow::Result<Vec<(String, Vec<IpNet>)>> {
    let mut cases: Vec<(String, Vec<IpNet>)> = options
        .set_sizes
        .iter()
        .map(|&count| (format!("IPv4 {count}"), workload::prefixes(rng, count)))
        .collect();
    for &count in &options.v6_set_sizes {
        cases.push((format!("IPv6 {count}"), workload::ipv6_prefixes(rng, count)));
    }
    match geoip::Countries::read(Path::new(geoip::DEFAULT_DIR)) {
        Ok(countries) => {
            let v4 = |nets: &[IpNet]| -> Vec<IpNet> {
                let v4 = nets.iter().filter(|net| matches!(net, IpNet::V4(_)));
                v4.copied().collect()
            };
            let all: Vec<IpNet> = countries.iter().flat_map(|(_, nets)| v4(nets)).collect();
            cases.push(("GeoIP, all".to_owned(), all));
            let (code, nets) = countries
                .iter()
                .max_by_key(|(_, nets)| v4(nets).len())
                .context("an empty GeoIP table")?;
            cases.push((format!("GeoIP, {code}"), v4(nets)));
        }
        Err(err) => eprintln!("country sets not measured: {err}"),
    }
    Ok(cases)
}

/// `nets` replaced by themselves with one prefix changed, under live
/// traffic.
fn swap_under_traffic(nets: &[IpNet]) -> anyhow::Result<stall::StallRow> {
    let mut changed = nets.to_vec();
    changed[0] = "192.0.2.0/24".parse()?;
    let row = stall::measure(nets, &changed)?;
    println!(
        "\nreplacing {} prefixes under live traffic ({} echoes of {} datagrams): longest gap \
         {:.1} ms steady, {:.1} ms during the swap ({:.2} s: compile, load, link update), \
         {:.1} ms while the old set is freed; freeing a kernel LPM trie of the same \
         prefixes: {:.1} ms",
        row.prefixes,
        row.received,
        row.sent,
        row.steady_ms,
        row.swap_ms,
        row.swap_s,
        row.teardown_ms,
        row.kernel_lpm_teardown_ms
    );
    Ok(row)
}
