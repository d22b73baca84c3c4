//! emberd: ember's supervisor daemon.
//!
//! One domain model ([`model`]) of images, instances and volumes, owned by
//! the [`supervisor`] and persisted by the [`store`]. The REST faces (UniK in
//! [`unik`], Flintlock in [`flintlock`], hyperd in [`hyperd`]) are thin
//! translators from HTTP to supervisor calls and back; hyperd's pods run in
//! pod VMs managed by [`pods`].

pub mod compilers;
pub mod hub;
pub mod model;
pub mod multipart;
pub mod process;
pub mod server;
pub mod store;
pub mod supervisor;
pub mod archive;
pub mod oci;
pub mod volumes;
pub mod unik;
pub mod netdev;
pub mod cidata;
pub mod flintlock;
pub mod hyperd;
pub mod images_store;
pub mod ext4;
pub mod pods;
pub mod pod_initramfs;
#[cfg(test)]
mod test_util;
