use which::which;

/// Rebuild the program when bpf-linker changes: the object depends on it.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
