//! The version of what an interface's pin directory holds: the contract
//! between the agent that pinned it and the next one, which may be a newer
//! or an older release.
//!
//! - Layout 1: the pins of releases before 0.2, which record no version.
//! - Layout 2: adds the `LAYOUT` record (this version, the generation of
//!   the rules in force, the program that wrote it).
//!
//! An agent meeting an older layout takes it over: each shared map whose
//! shape is what this program declares keeps counting, any other is
//! replaced by a fresh one (reset), and the new program goes in with one
//! link update as on every start. One meeting a newer layout refuses.

use std::path::{Path, PathBuf};

use aya::{
    Pod,
    maps::{Array, MapData, MapError, MapInfo},
};
use thiserror::Error;

use crate::kernel::pins::{self, PinError};

/// The layout this agent writes.
pub const CURRENT: u32 = 2;
/// The pinned record's name.
pub const PIN: &str = "LAYOUT";

/// The pinned record: one entry of an array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Record {
    version: u32,
    /// The XDP program the writer attached: when another program runs
    /// there now, a release that keeps no record has taken over since.
    program: u32,
    generation: u64,
}

const _: () = assert!(size_of::<Record>() == 16);
// SAFETY: `repr(C)`, integers only, no padding (size asserted).
unsafe impl Pod for Record {}

/// What an interface's pins say about themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub version: u32,
    /// Rule sets put in force there since layout 2 took over (0 for
    /// layout 1, which does not count them).
    pub generation: u64,
}

/// A map's kind and sizes, as the kernel reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// `None` where the entries follow the rule set.
    pub max_entries: Option<u32>,
}

impl Shape {
    /// How `pinned` differs from this one, if it does.
    pub fn difference(&self, pinned: &Shape) -> Option<String> {
        let mut changes = Vec::new();
        let mut compare = |what: &str, wanted: u32, found: u32| {
            if wanted != found {
                changes.push(format!("{what} {found} -> {wanted}"));
            }
        };
        compare("type", self.map_type, pinned.map_type);
        compare("key bytes", self.key_size, pinned.key_size);
        compare("value bytes", self.value_size, pinned.value_size);
        if let (Some(wanted), Some(found)) = (self.max_entries, pinned.max_entries) {
            compare("entries", wanted, found);
        }
        (!changes.is_empty()).then(|| changes.join(", "))
    }
}

#[derive(Debug, Error)]
pub enum LayoutError {
    #[error(
        "{} holds the pins of a newer filter-agent (layout {found}; this one knows layouts up to {CURRENT}): run that release, or `filter-agent detach {iface}` first",
        dir.display()
    )]
    Newer {
        dir: PathBuf,
        iface: String,
        found: u32,
    },
    #[error("cannot read the pinned map {}", path.display())]
    Shape { path: PathBuf, source: MapError },
    #[error(transparent)]
    Pins(#[from] PinError),
}

/// What taking over an interface's pins kept and what it started afresh.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Takeover {
    /// The layout found.
    pub from: u32,
    /// Maps that keep counting.
    pub carried: Vec<String>,
    /// Maps replaced by fresh ones, each with why.
    pub reset: Vec<String>,
}

/// The layout pinned in `dir`: `None` when nothing is pinned there.
pub fn read(dir: &Path) -> Result<Option<Pinned>, PinError> {
    let path = dir.join(PIN);
    if !path.exists() {
        let any = [pins::XDP_LINK, pins::RULES]
            .iter()
            .chain(&pins::SHARED_MAPS)
            .any(|name| dir.join(name).exists());
        return Ok(any.then_some(Pinned {
            version: 1,
            generation: 0,
        }));
    }
    let record = read_record(dir)?;
    // A record that names a program no longer attached was left behind by
    // this layout's agent before a release without records took over.
    let current = pins::xdp_link_program(dir).ok();
    let version = if current.is_some_and(|id| id != record.program) {
        1
    } else {
        record.version
    };
    Ok(Some(Pinned {
        version,
        generation: record.generation,
    }))
}

fn read_record(dir: &Path) -> Result<Record, PinError> {
    let read = |source| PinError::Read {
        path: dir.join(PIN),
        source,
    };
    let map = pins::open_map(dir, PIN)?;
    Array::<_, Record>::try_from(&map)
        .and_then(|array| array.get(&0, 0))
        .map_err(read)
}

/// Prepares `dir` for this agent's program, whose shared maps have the
/// shapes in `wanted`: refuses a newer layout; from any other, unpins each
/// map whose shape differs, so that loading creates it afresh. `None` when
/// nothing was pinned.
pub fn take_over(
    dir: &Path,
    iface: &str,
    wanted: &[(&str, Shape)],
) -> Result<Option<Takeover>, LayoutError> {
    let Some(pinned) = read(dir)? else {
        return Ok(None);
    };
    if pinned.version > CURRENT {
        return Err(LayoutError::Newer {
            dir: dir.to_owned(),
            iface: iface.to_owned(),
            found: pinned.version,
        });
    }
    let mut takeover = Takeover {
        from: pinned.version,
        ..Takeover::default()
    };
    for (name, shape) in wanted {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        match shape.difference(&pinned_shape(&path)?) {
            None => takeover.carried.push((*name).to_owned()),
            Some(why) => {
                pins::unpin(dir, name)?;
                takeover.reset.push(format!("{name} ({why})"));
            }
        }
    }
    Ok(Some(takeover))
}

fn pinned_shape(path: &Path) -> Result<Shape, LayoutError> {
    let shape = |source| LayoutError::Shape {
        path: path.to_owned(),
        source,
    };
    let info = MapInfo::from_pin(path).map_err(shape)?;
    Ok(Shape {
        map_type: info.map_type().map_err(shape)? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: Some(info.max_entries()),
    })
}

/// Records in `dir` that this layout's rules are in force, one generation
/// after the last recorded, written by the program now attached there.
/// Returns the generation.
pub fn stamp(dir: &Path) -> Result<u64, PinError> {
    let write = |source| PinError::Read {
        path: dir.join(PIN),
        source,
    };
    let previous = read_record(dir).map(|record| record.generation);
    let record = Record {
        version: CURRENT,
        program: pins::xdp_link_program(dir).unwrap_or_default(),
        generation: previous.unwrap_or_default() + 1,
    };
    let mut array = Array::<MapData, Record>::create(1, 0).map_err(write)?;
    array.set(0, record, 0).map_err(write)?;
    pins::replace(&dir.join(PIN), |staged| array.pin(staged))?;
    Ok(record.generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARRAY: Shape = Shape {
        map_type: 2,
        key_size: 4,
        value_size: 16,
        max_entries: Some(7),
    };

    #[test]
    fn the_same_shape_is_carried() {
        assert_eq!(ARRAY.difference(&ARRAY), None);
    }

    #[test]
    fn a_difference_names_what_changed_from_what_to_what() {
        let older = Shape {
            value_size: 8,
            max_entries: Some(6),
            ..ARRAY
        };
        assert_eq!(
            ARRAY.difference(&older).as_deref(),
            Some("value bytes 8 -> 16, entries 6 -> 7")
        );
    }

    #[test]
    fn entries_that_follow_the_rules_are_not_compared() {
        let wanted = Shape {
            max_entries: None,
            ..ARRAY
        };
        let pinned = Shape {
            max_entries: Some(4096),
            ..ARRAY
        };
        assert_eq!(wanted.difference(&pinned), None);
    }
}
