//! An eBPF object that every kernel's verifier refuses: the XDP program's
//! first instruction made an invalid opcode. It lets tests prove that a
//! start on a refused program fails cleanly and leaves nothing behind.

use object::{Object as _, ObjectSection as _};

use crate::TestbedError;

/// BPF_JMP32 with operation 0xf0: no such instruction on any kernel.
const INVALID_OPCODE: u8 = 0xf6;

/// `object` (the agent's eBPF ELF) with its `xdp` section's first
/// instruction replaced by an invalid opcode.
pub fn refused_object(object: &[u8]) -> Result<Vec<u8>, TestbedError> {
    let file = object::File::parse(object).map_err(|err| TestbedError::Object(err.to_string()))?;
    let (offset, _) = file
        .section_by_name("xdp")
        .and_then(|section| section.file_range())
        .ok_or_else(|| TestbedError::Object("no xdp section with data".into()))?;
    let mut bytes = object.to_vec();
    bytes[offset as usize] = INVALID_OPCODE;
    Ok(bytes)
}
