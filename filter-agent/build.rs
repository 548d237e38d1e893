//! Builds the XDP program (filter-ebpf) for the BPF target so that the agent
//! can embed it: one binary, nothing else to ship.

use std::{env, fs, path::Path, process::Command};

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

const EBPF_PACKAGE: &str = "filter-ebpf";
/// An object built before, embedded instead of building one: `cargo xtask
/// package` builds it once, so that every architecture's binary carries
/// the very same bytes (a build for another target would differ in the
/// build paths its debug information names).
const PREBUILT_OBJECT: &str = "FILTER_AGENT_EBPF_OBJECT";

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed={PREBUILT_OBJECT}");
    if let Some(object) = env::var_os(PREBUILT_OBJECT) {
        println!("cargo::rerun-if-changed={}", Path::new(&object).display());
        let out = Path::new(&env::var_os("OUT_DIR").context("OUT_DIR is not set")?).join("filter");
        fs::copy(&object, &out).with_context(|| {
            format!("copying {PREBUILT_OBJECT}={}", Path::new(&object).display())
        })?;
        return Ok(());
    }
    if let Some(missing) = missing_toolchain_part() {
        // One clear line instead of a wall of linker errors.
        println!("cargo::error={missing}: run `cargo xtask setup` first");
        return Ok(());
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("filter-agent has no parent directory")?;
    // The program also depends on the shared types.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("filter-common").display()
    );
    let root = workspace.join(EBPF_PACKAGE);
    let root = root.to_str().context("non-UTF-8 path to filter-ebpf")?;
    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}

/// Names what the eBPF build needs but does not find, if anything.
fn missing_toolchain_part() -> Option<&'static str> {
    if which::which("bpf-linker").is_err() {
        return Some("bpf-linker is not installed");
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|out| out.status.success());
    let Some(sysroot) = sysroot else {
        return Some("the nightly Rust toolchain is not installed");
    };
    let sysroot = String::from_utf8_lossy(&sysroot.stdout);
    let rust_src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if !rust_src.is_dir() {
        return Some("rust-src for the nightly toolchain is not installed");
    }
    None
}
