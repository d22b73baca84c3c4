//! Work on image and volume bytes, all of it hostile input: tar and
//! docker-save archives ([`archive`]), OCI layouts ([`oci`]), hyperd's
//! container image store ([`store`]), ext4 images ([`ext4`]), volume files
//! ([`volumes`]), NoCloud seed disks ([`cidata`]), the UniK hub's S3
//! client ([`hub`]) and OCI registries ([`registry`]). Nothing here knows the model or HTTP.

pub mod archive;
pub mod cidata;
pub mod ext4;
pub mod hub;
pub mod oci;
pub mod registry;
pub mod store;
pub mod volumes;
