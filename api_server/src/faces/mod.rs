//! The REST faces: thin translators from HTTP to [`crate::model`] calls and
//! back. Each face owns its wire format and error envelope; the work is
//! done below, so the faces never import one another or the image, runtime
//! and build layers.

pub mod flintlock;
pub mod hyperd;
pub mod multipart;
pub mod unik;
