use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_owned()
}

/// The cargo that runs the xtask (another may come first on PATH).
pub fn cargo_program() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs `cargo ARGS` in the workspace root, streaming its output.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(cargo_program())
        .args(args)
        .current_dir(workspace_root()))
}

/// The debug build `cargo xtask test`'s steps share: every example of the
/// workspace (the agent's library and build script, so the eBPF object
/// too). One command, so that its dependencies resolve one set of features
/// and no step builds the tree again (`-p filter-agent` resolves others,
/// and `cargo test`'s own build is its `test` profile, which `cargo build`
/// does not reuse).
pub fn dev_build() -> anyhow::Result<()> {
    cargo(&["build", "--quiet", "--examples"])
}

/// [`dev_build`], and the path of the example `name`'s binary.
pub fn dev_example(name: &str) -> anyhow::Result<PathBuf> {
    dev_build()?;
    Ok(workspace_root().join("target/debug/examples").join(name))
}

/// Runs `cargo ARGS` (a test run), echoing its output, and returns the
/// passed and failed counts summed over its "test result:" lines.
pub fn cargo_test(args: &[&str]) -> anyhow::Result<(u64, u64)> {
    let mut child = Command::new(cargo_program())
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            passed += count_before(summary, " passed");
            failed += count_before(summary, " failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() && failed == 0 {
        bail!("cargo test failed ({status})");
    }
    Ok((passed, failed))
}

/// The number just before `label` in "ok. 3 passed; 0 failed; ...".
fn count_before(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| part.trim().strip_suffix(label))
        .and_then(|part| part.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `command` to completion, streaming its output; fails on non-zero exit.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let status = command
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Runs `command` and returns its stdout, or `None` if it could not run or failed.
pub fn output(command: &mut Command) -> Option<String> {
    let output = command.stderr(Stdio::null()).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}
