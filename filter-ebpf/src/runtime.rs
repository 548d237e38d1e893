//! What every eBPF binary of this crate needs: a panic handler (panics are
//! unreachable: the verifier rejects programs with a path into one) and the
//! license section the kernel reads.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
