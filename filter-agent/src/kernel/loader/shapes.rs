//! The shapes of the maps this program shares across instances, read from
//! its object before it is loaded: what pins of another release must match
//! to be reused.

use super::{LoadError, PROGRAM_OBJECT, ProgramObject, missing_map};
use crate::kernel::{layout::Shape, pins};

/// Each of [`pins::SHARED_MAPS`] as the object declares it.
pub fn shared_map_shapes() -> Result<Vec<(&'static str, Shape)>, LoadError> {
    let custom = ProgramObject::get()?;
    let object =
        aya_obj::Object::parse(custom.as_ref().map_or(PROGRAM_OBJECT, ProgramObject::bytes))
            .map_err(LoadError::Parse)?;
    pins::SHARED_MAPS
        .iter()
        .map(|&name| {
            let map = object.maps.get(name).ok_or_else(|| missing_map(name))?;
            let shape = Shape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: Some(map.max_entries()),
            };
            Ok((name, shape))
        })
        .collect()
}
