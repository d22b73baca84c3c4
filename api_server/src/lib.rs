//! emberd: ember's supervisor daemon.
//!
//! The source tree is the architecture; imports point down only:
//!
//! - [`faces`]: the three REST APIs (UniK, hyperd, Flintlock), and
//!   Flintlock's gRPC API on its own threads. Each decodes its wire format,
//!   makes one call into [`model`] (the gRPC face through the loop's
//!   [`model::jobs::Jobs::call`]), and encodes its own reply. No face
//!   imports another, and none reaches below [`model`].
//! - [`model`]: one domain model of images, instances, volumes and pods;
//!   the [`model::supervisor::Supervisor`] that owns it, the [`model::store`]
//!   that persists it, the loop's work queue ([`model::jobs`]), the Flintlock
//!   reconciler ([`model::microvms`]) and the pod service ([`model::pods`]).
//! - [`images`]: work on image and volume bytes: archives, OCI layouts, the
//!   container image store, ext4, volumes, cidata disks, the UniK hub.
//! - [`runtime`]: running VMMs (jailer launch, pidfds), TAPs and the pod
//!   VMs' agent sessions.
//! - [`build`]: the compilers that turn sources into bootable images, and
//!   the pod VMs' initramfs.
//! - [`server`]: the HTTP event loop that routes requests to the faces.
//! - [`sandbox`]: the lowest layer: runs host tools (gcc, ld, mkfs.ext4,
//!   debugfs) on untrusted bytes in a throw-away jail with its own uid,
//!   namespaces, limits and timeout. [`build`] and [`images`] use it; it
//!   imports nothing of emberd.
//! - [`fsutil`]: writing files safely whatever the umask (atomic writes,
//!   private modes, trees handed to root); also at the bottom.

pub mod build;
pub mod faces;
pub mod fsutil;
pub mod images;
pub mod model;
pub mod runtime;
pub mod sandbox;
pub mod server;
#[cfg(test)]
mod test_util;
