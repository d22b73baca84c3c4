//! The supervisor: the one owner of ember's model. It validates requests,
//! keeps the state consistent and persisted, and starts/stops VMMs. Heavy
//! work (extracting uploads, compiling, building filesystems, hub transfers)
//! is split into a `prepare_*` step (here, on the event-loop thread), pure
//! work done on a worker thread by the caller, and a `finish_*` step (here
//! again), so the event loop never blocks on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::Duration;

use crate::build::{self as compilers, CompileOutput, Registry as Compilers};
use crate::images::registry::Registry;
use crate::model::host_paths::HostPaths;
use crate::model::store::{Scratch, Store, StoreError};
use crate::model::*;
use crate::runtime::process::{self, JailFile, LaunchSpec, Launcher};

mod pods;
mod volumes;
mod warm;

pub use warm::WarmConfig;

/// How a failed request should be reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Invalid,
    NotFound,
    Conflict,
    Internal,
}

/// Errors from supervisor operations.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("{what} {key} not found")]
    NotFound { what: &'static str, key: String },
    #[error("{what} {name} already exists{hint}")]
    Exists {
        what: &'static str,
        name: String,
        hint: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Lookup(#[from] compilers::LookupError),
    #[error(transparent)]
    Cmdline(#[from] compilers::CmdlineError),
    #[error("cannot save state: {0}")]
    Store(#[from] StoreError),
    #[error("cannot start the instance: {0}")]
    Launch(#[from] process::ProcessError),
    #[error("{0}")]
    Internal(String),
}

impl SupervisorError {
    /// The class of error, for status codes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SupervisorError::NotFound { .. } => ErrorKind::NotFound,
            SupervisorError::Exists { .. } | SupervisorError::Conflict(_) => ErrorKind::Conflict,
            SupervisorError::Invalid(_)
            | SupervisorError::Model(_)
            | SupervisorError::Lookup(_)
            | SupervisorError::Cmdline(_) => ErrorKind::Invalid,
            SupervisorError::Store(_)
            | SupervisorError::Launch(_)
            | SupervisorError::Internal(_) => ErrorKind::Internal,
        }
    }
}

type Result<T> = std::result::Result<T, SupervisorError>;

pub use crate::runtime::process::{VSOCK_GUEST_CID, VSOCK_UDS};

fn not_found(what: &'static str, key: &str) -> SupervisorError {
    SupervisorError::NotFound {
        what,
        key: key.to_string(),
    }
}

/// A request to run an instance.
#[derive(Clone, Debug, Default)]
pub struct RunRequest {
    pub name: String,
    pub image: String,
    /// mount point -> volume (id or name).
    pub mounts: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    /// 0: the image's default.
    pub memory_mb: u32,
    pub no_cleanup: bool,
    pub debug_mode: bool,
    /// 0: one.
    pub vcpus: u8,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub root_volume: Option<Disk>,
    pub disks: Vec<Disk>,
    pub interfaces: Vec<NetInterface>,
    pub boot_args: String,
    /// Create the instance stopped instead of starting it.
    pub create_only: bool,
    /// Give it a vsock device (see [`Instance::vsock`]).
    pub vsock: bool,
}

/// Everything a worker needs to build an image.
pub struct ImageJob {
    pub id: String,
    pub name: String,
    pub provider: String,
    pub base: String,
    pub lang: String,
    pub args: String,
    pub mounts: Vec<String>,
    pub force: bool,
    pub compiler: std::sync::Arc<dyn compilers::Compiler>,
    /// Scratch directory for this job, removed when the job is dropped.
    pub staging: Scratch,
    /// The image's instant-start switch ([`Image::snapshot_starts`]).
    pub snapshot_starts: Option<bool>,
}

impl ImageJob {
    /// Where the worker extracts the sources.
    pub fn src_dir(&self) -> PathBuf {
        self.staging.join("src")
    }
    /// Where the worker writes the image files.
    pub fn out_dir(&self) -> PathBuf {
        self.staging.join("image")
    }
}

/// Everything a worker needs to build a volume.
pub struct VolumeJob {
    pub id: String,
    pub name: String,
    pub size_mb: Option<u64>,
    pub format: VolumeFormat,
    /// The image file to create (already its final path's sibling in staging).
    pub staging_file: PathBuf,
    /// Scratch directory for this job, removed when the job is dropped.
    pub staging: Scratch,
}

/// Tells the exit watcher about a VMM to watch (and wakes it).
pub struct WatchSender {
    tx: Sender<(String, VmmProcess)>,
    wake: vmm_sys_util::eventfd::EventFd,
}

impl WatchSender {
    /// A sender whose messages are announced on `wake`.
    pub fn new(tx: Sender<(String, VmmProcess)>, wake: vmm_sys_util::eventfd::EventFd) -> Self {
        WatchSender { tx, wake }
    }

    /// Hands over one VMM.
    pub fn send(&self, id: String, p: VmmProcess) {
        let _ = self.tx.send((id, p));
        let _ = self.wake.write(1);
    }
}

/// The supervisor.
pub struct Supervisor {
    store: Store,
    state: State,
    launcher: Launcher,
    compilers: Compilers,
    watch: Option<WatchSender>,
    host_paths: HostPaths,
    registry: Option<Registry>,
    parent_iface: Option<String>,
    warm: warm::Warm,
}

impl Supervisor {
    /// Loads the state and re-adopts VMMs that are still alive; marks the
    /// others stopped. A VMM that runs without being on record (emberd died
    /// between spawning it and saving that) is found by its jail and
    /// re-adopted if its instance was being started, killed otherwise, so
    /// no instance ever has two VMMs. Host paths default to `import/` and
    /// `export/` in the state directory ([`Supervisor::set_host_paths`]).
    pub fn new(store: Store, launcher: Launcher, compilers: Compilers) -> Result<Self> {
        let state = store.load()?;
        let host_paths = HostPaths::new(&store.root().join("import"), &store.root().join("export"))
            .map_err(|e| {
                SupervisorError::Internal(format!(
                    "cannot create the import and export directories: {e}"
                ))
            })?;
        let mut s = Supervisor {
            store,
            state,
            launcher,
            compilers,
            watch: None,
            host_paths,
            registry: None,
            parent_iface: None,
            warm: Default::default(),
        };
        let mut changed = false;
        let mut strays = s.launcher.find_vmms();
        for inst in s.state.instances.values_mut() {
            let alive = inst.process.as_ref().is_some_and(process::is_alive);
            if !alive {
                if let Some(p) = strays.remove(&inst.id) {
                    let wanted =
                        matches!(inst.state, InstanceState::Pending | InstanceState::Running);
                    if wanted {
                        log::warn!("instance {}: re-adopting its VMM (pid {}), started before emberd stopped", inst.name, p.pid);
                        inst.process = Some(p);
                        inst.state = InstanceState::Running;
                        inst.last_error = None;
                        changed = true;
                        continue;
                    }
                    log::warn!(
                        "instance {}: killing a VMM (pid {}) that is not on record",
                        inst.name,
                        p.pid
                    );
                    process::kill_and_wait(&p, Duration::from_secs(10));
                }
            }
            match &inst.process {
                Some(p) if process::is_alive(p) => {
                    inst.state = InstanceState::Running;
                }
                Some(_) => {
                    inst.process = None;
                    if inst.state == InstanceState::Running || inst.state == InstanceState::Pending
                    {
                        inst.state = InstanceState::Stopped;
                        inst.last_error = Some("the VMM ended while emberd was not running".into());
                    }
                    s.launcher.cleanup(&inst.id);
                    changed = true;
                }
                None => {
                    if inst.state == InstanceState::Running || inst.state == InstanceState::Pending
                    {
                        inst.state = InstanceState::Stopped;
                        changed = true;
                    }
                }
            }
        }
        // VMMs whose instance is gone.
        for (id, p) in strays {
            if !s
                .state
                .instances
                .values()
                .any(|i| i.process.as_ref() == Some(&p))
            {
                log::warn!("killing a VMM (pid {}) of unknown instance {id}", p.pid);
                process::kill_and_wait(&p, Duration::from_secs(10));
                s.launcher.cleanup(&id);
            }
        }
        // Pooled VMMs of an earlier run that no instance took.
        s.reap_idle_vmms();
        // Leftover scratch space from builds interrupted by a restart.
        if let Ok(rd) = std::fs::read_dir(s.store.staging_dir()) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        if changed {
            s.store.save(&s.state)?;
        }
        Ok(s)
    }

    /// Connects the exit watcher and hands it every live VMM.
    pub fn set_watcher(&mut self, w: WatchSender) {
        for inst in self.state.instances.values() {
            if let Some(p) = &inst.process {
                w.send(inst.id.clone(), p.clone());
            }
        }
        self.watch = Some(w);
    }

    /// Which host paths requests may name.
    pub fn host_paths(&self) -> &HostPaths {
        &self.host_paths
    }

    /// The registry client Flintlock's sources are pulled with (none: image
    /// references are refused).
    pub fn registry(&self) -> Option<&Registry> {
        self.registry.as_ref()
    }

    /// Gives the supervisor a registry client.
    pub fn set_registry(&mut self, r: Registry) {
        self.registry = Some(r);
    }

    /// The host link macvtap interfaces are created on (emberd
    /// `--parent-iface`; none: macvtap interfaces are refused).
    pub fn parent_iface(&self) -> Option<&str> {
        self.parent_iface.as_deref()
    }

    /// Sets the macvtap parent link (checked by [`netdev::validate_ifname`]
    /// here and for existence when a link is made).
    ///
    /// [`netdev::validate_ifname`]: crate::runtime::netdev::validate_ifname
    pub fn set_parent_iface(&mut self, name: &str) -> Result<()> {
        crate::runtime::netdev::validate_ifname(name)
            .map_err(|e| SupervisorError::Invalid(e.to_string()))?;
        if name.starts_with('-') {
            return Err(SupervisorError::Invalid(format!(
                "interface name {name:?} starts with '-'"
            )));
        }
        self.parent_iface = Some(name.to_string());
        Ok(())
    }

    /// Whether VMMs run under the jailer (macvtap interfaces need it).
    pub fn jailed(&self) -> bool {
        self.launcher.jailer_bin.is_some()
    }

    /// Deletes the macvtap links of instance `key` (its VMM must be gone);
    /// failures are logged. Links of other kinds are never touched.
    pub fn release_macvtaps(&self, key: &str) {
        let Ok(inst) = self.instance(key) else {
            return;
        };
        for n in inst
            .interfaces
            .iter()
            .filter(|n| n.macvtap_parent.is_some())
        {
            if crate::runtime::netdev::is_macvtap(&n.host_dev_name) {
                if let Err(e) = crate::runtime::netdev::delete_macvtap(&n.host_dev_name) {
                    log::warn!("cannot delete macvtap {}: {e}", n.host_dev_name);
                }
            }
        }
    }

    /// Uses other import and export directories.
    pub fn set_host_paths(&mut self, p: HostPaths) {
        self.host_paths = p;
    }

    /// Read access to the model.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The compilers.
    pub fn compilers(&self) -> &Compilers {
        &self.compilers
    }

    /// The store (paths).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The launcher (paths).
    pub fn launcher(&self) -> &Launcher {
        &self.launcher
    }

    fn save(&self) -> Result<()> {
        self.store.save(&self.state)?;
        Ok(())
    }

    fn staging(&self, id: &str) -> Result<Scratch> {
        Scratch::create(self.store.staging_dir().join(id))
            .map_err(|e| SupervisorError::Internal(e.to_string()))
    }

    // ----- images -----

    /// Image by id or name.
    pub fn image(&self, key: &str) -> Result<&Image> {
        self.state.image(key).ok_or_else(|| not_found("image", key))
    }

    /// Validates an image build and reserves its scratch space.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_image(
        &self,
        name: &str,
        provider: &str,
        base: &str,
        lang: &str,
        force: bool,
        args: &str,
        mounts: &[String],
    ) -> Result<ImageJob> {
        validate_name("image", name)?;
        let compiler = self.compilers.find(provider, base, lang)?;
        if !force && self.state.image(name).is_some() {
            return Err(SupervisorError::Exists {
                what: "image",
                name: name.into(),
                hint: "; use force=true to replace it",
            });
        }
        for m in mounts {
            validate_mount_point(m)?;
        }
        if args.contains('"') || args.chars().any(|c| c.is_control()) {
            return Err(SupervisorError::Invalid(
                "args may not contain double quotes or control characters".into(),
            ));
        }
        let id = new_id("img");
        let staging = self.staging(&id)?;
        Ok(ImageJob {
            id,
            name: name.into(),
            provider: provider.into(),
            base: base.into(),
            lang: lang.into(),
            args: args.into(),
            mounts: mounts.to_vec(),
            force,
            compiler,
            staging,
            snapshot_starts: None,
        })
    }

    /// Installs a built image (or cleans up after a failed build).
    pub fn finish_image(
        &mut self,
        job: ImageJob,
        built: std::result::Result<CompileOutput, SupervisorError>,
    ) -> Result<Image> {
        // Every return drops `job`, and with it the staging directory.
        let out = built?;
        // Re-check: another build of the same name may have finished first.
        let existing = self.state.image(&job.name).map(|i| i.id.clone());
        if let Some(old) = &existing {
            if !job.force {
                return Err(SupervisorError::Exists {
                    what: "image",
                    name: job.name.clone(),
                    hint: "; use force=true to replace it",
                });
            }
            if self.image_in_use(old) {
                return Err(SupervisorError::Conflict(format!(
                    "image {} is used by instances; delete them first",
                    job.name
                )));
            }
        }
        let dir = self.store.image_dir(&job.id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(job.out_dir(), &dir)
            .and_then(|()| super::store::root_only(&dir))
            .map_err(|e| SupervisorError::Internal(format!("cannot install image files: {e}")))?;
        let size = dir_size(&dir);
        let img = Image {
            id: job.id.clone(),
            name: job.name.clone(),
            provider: job.provider.clone(),
            base: job.base.clone(),
            lang: job.lang.clone(),
            created: now_rfc3339(),
            size_mb: size.div_ceil(1 << 20).max(1),
            kernel: out.kernel,
            initrd: out.initrd,
            boot_args: out.boot_args,
            args: job.args.clone(),
            mounts: job.mounts.clone(),
            default_memory_mb: out.default_memory_mb,
            format: out.format,
            snapshot_starts: job.snapshot_starts,
        };
        if let Some(old) = existing {
            self.state.images.remove(&old);
            let _ = std::fs::remove_dir_all(self.store.image_dir(&old));
            self.drop_templates(&old);
        }
        self.state.images.insert(img.id.clone(), img.clone());
        self.save()?;
        Ok(img)
    }

    /// Installs an image whose files are already in `dir` (hub pull).
    pub fn install_image(&mut self, mut img: Image, dir: &Path, force: bool) -> Result<Image> {
        validate_name("image", &img.name)?;
        // Untrusted (hub) metadata: checked before anything local changes.
        img.check_files(dir)?;
        if let Some(old) = self.state.image(&img.name).map(|i| i.id.clone()) {
            if !force {
                return Err(SupervisorError::Exists {
                    what: "image",
                    name: img.name.clone(),
                    hint: "; use force=true to overwrite it",
                });
            }
            if self.image_in_use(&old) {
                return Err(SupervisorError::Conflict(format!(
                    "image {} is used by instances; delete them first",
                    img.name
                )));
            }
            self.state.images.remove(&old);
            let _ = std::fs::remove_dir_all(self.store.image_dir(&old));
            self.drop_templates(&old);
        }
        img.id = new_id("img");
        let dest = self.store.image_dir(&img.id);
        std::fs::rename(dir, &dest)
            .and_then(|()| super::store::root_only(&dest))
            .map_err(|e| SupervisorError::Internal(format!("cannot install image files: {e}")))?;
        self.state.images.insert(img.id.clone(), img.clone());
        self.save()?;
        Ok(img)
    }

    fn image_in_use(&self, image_id: &str) -> bool {
        self.state
            .instances
            .values()
            .any(|i| i.image_id == image_id)
    }

    /// Deletes an image; with `force`, its instances go too.
    pub fn delete_image(&mut self, key: &str, force: bool) -> Result<()> {
        let img = self.image(key)?.clone();
        let users: Vec<String> = self
            .state
            .instances
            .values()
            .filter(|i| i.image_id == img.id)
            .map(|i| i.id.clone())
            .collect();
        if !users.is_empty() && !force {
            return Err(SupervisorError::Conflict(format!(
                "image {} is used by {} instance(s); use force=true to delete them too",
                img.name,
                users.len()
            )));
        }
        for u in users {
            self.delete_instance(&u, true)?;
        }
        self.state.images.remove(&img.id);
        self.save()?;
        let _ = std::fs::remove_dir_all(self.store.image_dir(&img.id));
        self.drop_templates(&img.id);
        Ok(())
    }

    // ----- instances -----

    /// Instance by id or name.
    pub fn instance(&self, key: &str) -> Result<&Instance> {
        self.state
            .instance(key)
            .ok_or_else(|| not_found("instance", key))
    }

    /// Creates an instance and starts it (unless `req.create_only`).
    pub fn run_instance(&mut self, req: RunRequest) -> Result<Instance> {
        validate_name("instance", &req.name)?;
        if self.state.instance(&req.name).is_some() {
            return Err(SupervisorError::Exists {
                what: "instance",
                name: req.name.clone(),
                hint: "",
            });
        }
        let inst = self.build_instance(&req, new_id("inst"), now_rfc3339(), None)?;
        self.commit_instance(inst, req.create_only)
    }

    /// Records an instance that is not ready to run yet (its image and
    /// volumes are still being built), e.g. a Flintlock microVM in PENDING.
    pub fn reserve_instance(
        &mut self,
        name: &str,
        labels: BTreeMap<String, String>,
        annotations: BTreeMap<String, String>,
    ) -> Result<Instance> {
        validate_name("instance", name)?;
        if self.state.instance(name).is_some() {
            return Err(SupervisorError::Exists {
                what: "instance",
                name: name.into(),
                hint: "",
            });
        }
        let inst = Instance {
            id: new_id("inst"),
            name: name.into(),
            state: InstanceState::Pending,
            created: now_rfc3339(),
            labels,
            annotations,
            vcpus: 1,
            ..Default::default()
        };
        self.state.instances.insert(inst.id.clone(), inst.clone());
        if let Err(e) = self.save() {
            // Not recorded on disk: not reserved at all.
            self.state.instances.remove(&inst.id);
            return Err(e);
        }
        Ok(inst)
    }

    /// Fills a reserved instance from `req` (its name and id are kept) and
    /// starts it unless `req.create_only`.
    pub fn configure_instance(&mut self, key: &str, req: RunRequest) -> Result<Instance> {
        let old = self.instance(key)?.clone();
        if !old.image_id.is_empty() {
            return Err(SupervisorError::Conflict(format!(
                "instance {} is already configured",
                old.name
            )));
        }
        let mut inst =
            self.build_instance(&req, old.id.clone(), old.created.clone(), Some(&old))?;
        inst.name = old.name.clone();
        let mut ann = old.annotations.clone();
        ann.extend(req.annotations.clone());
        inst.annotations = ann;
        self.state.instances.remove(&old.id);
        self.commit_instance(inst, req.create_only)
    }

    /// Updates the face data kept with an instance.
    pub fn set_annotations(
        &mut self,
        key: &str,
        f: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> Result<Instance> {
        let id = self.instance(key)?.id.clone();
        let e = self
            .state
            .instances
            .get_mut(&id)
            .ok_or_else(|| not_found("instance", key))?;
        f(&mut e.annotations);
        let out = e.clone();
        self.save()?;
        Ok(out)
    }

    fn commit_instance(&mut self, inst: Instance, create_only: bool) -> Result<Instance> {
        for (m, v) in &inst.mounts {
            let id = self
                .state
                .volume(v)
                .map(|x| x.id.clone())
                .unwrap_or_default();
            if let Some(vol) = self.state.volumes.get_mut(&id) {
                vol.attachment = Some(inst.id.clone());
                vol.mount_point = Some(m.clone());
            }
        }
        for d in inst.root_volume.iter().chain(inst.disks.iter()) {
            let id = self
                .state
                .volume(&d.volume)
                .map(|x| x.id.clone())
                .unwrap_or_default();
            if let Some(vol) = self.state.volumes.get_mut(&id) {
                vol.attachment = Some(inst.id.clone());
                vol.mount_point = None;
            }
        }
        let id = inst.id.clone();
        self.state.instances.insert(id.clone(), inst);
        self.save()?;
        if !create_only {
            self.start_instance(&id)?;
        }
        Ok(self.instance(&id)?.clone())
    }

    /// Validates `req` and builds the instance record (no state changes).
    fn build_instance(
        &self,
        req: &RunRequest,
        id: String,
        created: String,
        replacing: Option<&Instance>,
    ) -> Result<Instance> {
        let mine = |a: &Option<String>| match (a, replacing) {
            (Some(a), Some(r)) => a == &r.id,
            _ => false,
        };
        let img = self.image(&req.image)?.clone();
        for k in req.env.keys() {
            validate_env_name(k)?;
        }
        // Every mount point of the image needs a volume, and only those.
        for m in &img.mounts {
            if !req.mounts.contains_key(m) {
                return Err(SupervisorError::Invalid(format!(
                    "required mount point missing: {m} (image {} needs volumes for {})",
                    img.name,
                    img.mounts.join(", ")
                )));
            }
        }
        let mut mounts = BTreeMap::new();
        for (m, v) in &req.mounts {
            if !img.mounts.contains(m) {
                return Err(SupervisorError::Invalid(format!(
                    "image {} has no mount point {m} (it has: {})",
                    img.name,
                    if img.mounts.is_empty() {
                        "none".to_string()
                    } else {
                        img.mounts.join(", ")
                    }
                )));
            }
            let vol = self.state.volume(v).ok_or_else(|| not_found("volume", v))?;
            if let Some(a) = vol.attachment.as_ref().filter(|_| !mine(&vol.attachment)) {
                return Err(SupervisorError::Conflict(format!(
                    "volume {} is already attached to instance {a}",
                    vol.name
                )));
            }
            mounts.insert(m.clone(), vol.name.clone());
        }
        let memory_mb = if req.memory_mb == 0 {
            img.default_memory_mb
        } else {
            req.memory_mb
        };
        if !(1..=1 << 20).contains(&memory_mb) {
            return Err(SupervisorError::Invalid(format!(
                "MemoryMb {memory_mb} is out of range (1 to 1048576)"
            )));
        }
        // The command line must render before anything is created.
        compilers::render_cmdline(&img.boot_args, &[], &req.env, &img.args)?;
        if req.vcpus > 32 {
            return Err(SupervisorError::Invalid(format!(
                "{} vCPUs are too many (at most 32)",
                req.vcpus
            )));
        }
        // Root and extra disks: volumes that exist and are free.
        let mut extra: Vec<&Disk> = req.root_volume.iter().collect();
        extra.extend(req.disks.iter());
        let mut seen = std::collections::BTreeSet::new();
        for d in &extra {
            let vol = self
                .state
                .volume(&d.volume)
                .ok_or_else(|| not_found("volume", &d.volume))?;
            if let Some(a) = vol.attachment.as_ref().filter(|_| !mine(&vol.attachment)) {
                return Err(SupervisorError::Conflict(format!(
                    "volume {} is already attached to instance {a}",
                    vol.name
                )));
            }
            if !seen.insert(vol.id.clone()) || mounts.values().any(|m| m == &vol.name) {
                return Err(SupervisorError::Invalid(format!(
                    "volume {} is used twice",
                    vol.name
                )));
            }
        }
        let canonical = |d: &Disk| Disk {
            volume: self
                .state
                .volume(&d.volume)
                .map(|v| v.name.clone())
                .unwrap_or_default(),
            read_only: d.read_only,
        };
        let root_volume = req.root_volume.as_ref().map(canonical);
        let disks: Vec<Disk> = req.disks.iter().map(canonical).collect();
        for n in &req.interfaces {
            if n.host_dev_name.is_empty()
                || n.host_dev_name.len() > 15
                || n.host_dev_name.contains(['/', ' ', ':'])
            {
                return Err(SupervisorError::Invalid(format!(
                    "invalid TAP device name {:?} (1 to 15 characters, no '/', ':' or spaces)",
                    n.host_dev_name
                )));
            }
        }
        if req.boot_args.contains('"') || req.boot_args.chars().any(|c| c.is_control()) {
            return Err(SupervisorError::Invalid(
                "kernel arguments may not contain double quotes or control characters".into(),
            ));
        }
        let inst = Instance {
            id,
            name: req.name.clone(),
            image_id: img.id.clone(),
            image_name: img.name.clone(),
            state: if req.create_only {
                InstanceState::Stopped
            } else {
                InstanceState::Pending
            },
            created,
            memory_mb,
            env: req.env.clone(),
            mounts: mounts.clone(),
            no_cleanup: req.no_cleanup,
            debug_mode: req.debug_mode,
            vcpus: req.vcpus.max(1),
            labels: req.labels.clone(),
            annotations: req.annotations.clone(),
            root_volume,
            disks,
            interfaces: req.interfaces.clone(),
            boot_args: req.boot_args.clone(),
            vsock: req.vsock,
            ..Default::default()
        };
        Ok(inst)
    }

    fn launch_spec(&self, inst: &Instance) -> Result<LaunchSpec> {
        let img = self
            .state
            .images
            .get(&inst.image_id)
            .ok_or_else(|| not_found("image", &inst.image_name))?;
        if img.kernel.is_empty() {
            return Err(SupervisorError::Invalid(format!(
                "image {} has no kernel: emberd found no Linux kernel when it was built (set {} or put one at {}, then rebuild the image)",
                img.name,
                crate::build::linux::KERNEL_ENV,
                crate::build::linux::KERNEL_PATH
            )));
        }
        let dir = self.store.image_dir(&img.id);
        img.check_files(&dir)?;
        let mut files = vec![JailFile {
            host: dir.join(&img.kernel),
            name: "kernel".into(),
            writable: false,
        }];
        let mut boot = serde_json::json!({"kernel_image_path": "kernel"});
        if let Some(i) = &img.initrd {
            files.push(JailFile {
                host: dir.join(i),
                name: "initrd".into(),
                writable: false,
            });
            boot["initrd_path"] = "initrd".into();
        }
        let mut drives = Vec::new();
        let mut mount_idx = Vec::new();
        let root_name = inst.root_volume.as_ref().map(|d| d.volume.clone());
        for (i, (mount, vname, read_only)) in inst.volumes_in_order().into_iter().enumerate() {
            let vol = self
                .state
                .volume(vname)
                .ok_or_else(|| not_found("volume", vname))?;
            let file = format!("{}.img", vol.id);
            files.push(JailFile {
                host: self.store.volume_path(&vol.id),
                name: file.clone(),
                writable: true,
            });
            let is_root = i == 0 && root_name.as_deref() == Some(vname);
            drives.push(serde_json::json!({
                "drive_id": vol.id, "path_on_host": file,
                "is_root_device": is_root, "is_read_only": read_only
            }));
            if let Some(m) = mount {
                mount_idx.push((m.to_string(), i));
            }
        }
        let base_args = format!("{} {}", img.boot_args, inst.boot_args);
        boot["boot_args"] =
            compilers::render_cmdline(base_args.trim(), &mount_idx, &inst.env, &img.args)?.into();
        let nets: Vec<serde_json::Value> = inst
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mut v = serde_json::json!({"iface_id": format!("eth{i}"), "host_dev_name": n.host_dev_name});
                if let Some(m) = &n.guest_mac {
                    v["guest_mac"] = m.clone().into();
                }
                v
            })
            .collect();
        let mut cfg = serde_json::json!({
            "boot-source": boot,
            "machine-config": {"vcpu_count": inst.vcpus.max(1), "mem_size_mib": inst.memory_mb},
            "drives": drives,
            "network-interfaces": nets,
        });
        if inst.vsock {
            cfg["vsock"] = serde_json::json!({"guest_cid": VSOCK_GUEST_CID, "uds_path": VSOCK_UDS});
        }
        let (uid, gid) = inst
            .vmm_uid
            .unwrap_or((self.launcher.uid, self.launcher.gid));
        Ok(LaunchSpec {
            id: inst.id.clone(),
            uid,
            gid,
            files,
            vm_config: cfg,
            log_path: self.store.log_path(&inst.id),
            macvtaps: Vec::new(),
        })
    }

    /// Gives instance `id` its own VMM identity (uid, gid) from the range,
    /// unless it has one: the first that no other instance holds.
    fn assign_identity(&mut self, id: &str) -> Result<Instance> {
        let inst = self.instance(id)?.clone();
        if inst.vmm_uid.is_some() {
            return Ok(inst);
        }
        let taken: std::collections::HashSet<(u32, u32)> = self
            .state
            .instances
            .values()
            .filter_map(|i| i.vmm_uid)
            .chain(self.warm.reserved().copied())
            .collect();
        let free = (0..self.launcher.ids)
            .filter_map(|n| self.launcher.identity(n))
            .find(|u| !taken.contains(u))
            .ok_or_else(|| {
                SupervisorError::Conflict(format!(
                    "no VMM identity is free: all {} uids of emberd's range are given to instances (emberd --uid, --vmm-ids)",
                    self.launcher.ids
                ))
            })?;
        let entry = self
            .state
            .instances
            .get_mut(id)
            .ok_or_else(|| not_found("instance", id))?;
        entry.vmm_uid = Some(free);
        Ok(entry.clone())
    }

    /// Starts a stopped instance (no-op if it is running).
    pub fn start_instance(&mut self, key: &str) -> Result<Instance> {
        let inst = self.instance(key)?.clone();
        if let Some(p) = &inst.process {
            if process::is_alive(p) {
                return Ok(inst);
            }
        }
        if inst.image_id.is_empty() {
            return Err(SupervisorError::Conflict(format!(
                "instance {} is not ready yet (its image and volumes are being built)",
                inst.name
            )));
        }
        if let Some(started) = self.try_warm_start(&inst)? {
            return Ok(started);
        }
        let inst = self.assign_identity(&inst.id)?;
        let mut spec = self.launch_spec(&inst)?;
        // macvtap links stay until the instance is deleted; the jailer gives
        // the VMM their character devices as /dev/macvtap/<name>.
        for n in &inst.interfaces {
            let Some(parent) = &n.macvtap_parent else {
                continue;
            };
            let err = |e: crate::runtime::netdev::NetdevError| {
                SupervisorError::Internal(format!("macvtap {}: {e}", n.host_dev_name))
            };
            if !crate::runtime::netdev::is_macvtap(&n.host_dev_name) {
                let mac = n
                    .guest_mac
                    .clone()
                    .unwrap_or_else(|| crate::runtime::netdev::generated_mac(&n.host_dev_name));
                crate::runtime::netdev::create_macvtap(&n.host_dev_name, parent, &mac)
                    .map_err(err)?;
            }
            let (major, minor) =
                crate::runtime::netdev::macvtap_dev(&n.host_dev_name).map_err(err)?;
            spec.macvtaps.push((n.host_dev_name.clone(), major, minor));
        }
        // TAPs are persistent and owned by the VMMs' user, so the jailed VMM
        // (no capabilities) can attach to them.
        for n in inst
            .interfaces
            .iter()
            .filter(|n| n.macvtap_parent.is_none())
        {
            if !crate::runtime::netdev::tap_exists(&n.host_dev_name, None) {
                crate::runtime::netdev::create_tap(
                    &n.host_dev_name,
                    Some((spec.uid, spec.gid)),
                    None,
                )
                .map_err(|e| SupervisorError::Internal(format!("TAP {}: {e}", n.host_dev_name)))?;
            }
        }
        process::log_note(&spec.log_path, &format!("starting instance {}", inst.name));
        // The intent is on record before the VMM exists: after a crash, a
        // VMM found in this instance's jail is re-adopted, never doubled.
        if let Some(e) = self.state.instances.get_mut(&inst.id) {
            e.state = InstanceState::Pending;
            e.process = None;
        }
        self.save()?;
        let result = self.launcher.launch(&spec);
        if result.is_ok() && fault_injected("kill-after-vmm-spawn") {
            // SAFETY: kill(2) on emberd itself (tests of crash consistency).
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        let entry = self
            .state
            .instances
            .get_mut(&inst.id)
            .ok_or_else(|| not_found("instance", key))?;
        match result {
            Ok(l) => {
                entry.state = InstanceState::Running;
                entry.process = Some(l.process.clone());
                entry.started_from = Some(StartMode::Cold);
                entry.last_error = None;
                entry.last_exit = None;
                if let Some(w) = &self.watch {
                    w.send(inst.id.clone(), l.process);
                }
                let out = entry.clone();
                self.save()?;
                Ok(out)
            }
            Err(e) => {
                entry.state = InstanceState::Error;
                entry.process = None;
                entry.last_error = Some(e.to_string());
                self.save()?;
                self.launcher.cleanup(&inst.id);
                self.release_macvtaps(&inst.id);
                Err(e.into())
            }
        }
    }

    /// Stops an instance: its VMM is killed and its jail removed.
    pub fn stop_instance(&mut self, key: &str) -> Result<Instance> {
        let inst = self.instance(key)?.clone();
        if let Some(p) = &inst.process {
            if !process::kill_and_wait(p, Duration::from_secs(10)) {
                return Err(SupervisorError::Internal(format!(
                    "the VMM of {} (pid {}) did not die",
                    inst.name, p.pid
                )));
            }
            process::log_note(&self.store.log_path(&inst.id), "instance stopped");
        }
        self.launcher.cleanup(&inst.id);
        self.release_volumes(&inst.id);
        let entry = self
            .state
            .instances
            .get_mut(&inst.id)
            .ok_or_else(|| not_found("instance", key))?;
        entry.process = None;
        entry.state = InstanceState::Stopped;
        let out = entry.clone();
        self.save()?;
        Ok(out)
    }

    /// Deletes an instance; a running one needs `force`.
    pub fn delete_instance(&mut self, key: &str, force: bool) -> Result<()> {
        let inst = self.instance(key)?.clone();
        let running = inst.process.as_ref().is_some_and(process::is_alive);
        if running && !force {
            return Err(SupervisorError::Conflict(format!(
                "instance {} is running; stop it first or use force=true",
                inst.name
            )));
        }
        self.stop_instance(&inst.id)?;
        self.release_interfaces(&inst);
        self.detach_all(&inst.id);
        self.state.instances.remove(&inst.id);
        self.save()?;
        let _ = std::fs::remove_file(self.store.log_path(&inst.id));
        Ok(())
    }

    /// Turns a configured instance that failed to start back into a
    /// reserved one (as [`Supervisor::reserve_instance`] made it: same id,
    /// name, labels and annotations), so a later attempt can configure it
    /// again: its VMM is stopped, its TAPs and macvtap links deleted and
    /// its volumes detached. A no-op for an instance not configured yet.
    pub fn unconfigure_instance(&mut self, key: &str) -> Result<Instance> {
        let inst = self.instance(key)?.clone();
        if inst.image_id.is_empty() {
            return Ok(inst);
        }
        self.stop_instance(&inst.id)?;
        self.release_interfaces(&inst);
        self.detach_all(&inst.id);
        let fresh = Instance {
            id: inst.id.clone(),
            name: inst.name.clone(),
            state: InstanceState::Pending,
            created: inst.created.clone(),
            labels: inst.labels.clone(),
            annotations: inst.annotations.clone(),
            vcpus: 1,
            ..Default::default()
        };
        self.state.instances.insert(inst.id.clone(), fresh.clone());
        self.save()?;
        Ok(fresh)
    }

    /// Deletes the TAPs and macvtap links of `inst` (its VMM must be gone).
    fn release_interfaces(&self, inst: &Instance) {
        self.release_macvtaps(&inst.id);
        for n in inst
            .interfaces
            .iter()
            .filter(|n| n.macvtap_parent.is_none())
        {
            // The killed VMM's file descriptors may still be closing: a busy
            // TAP gets a few short retries.
            for attempt in 0..20 {
                if !crate::runtime::netdev::tap_exists(&n.host_dev_name, None) {
                    break;
                }
                match crate::runtime::netdev::delete_tap(&n.host_dev_name, None) {
                    Ok(()) => break,
                    Err(e) if attempt == 19 => {
                        log::warn!("cannot delete TAP {}: {e}", n.host_dev_name)
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }

    /// Detaches every volume attached to instance `id`.
    fn detach_all(&mut self, id: &str) {
        for v in self.state.volumes.values_mut() {
            if v.attachment.as_deref() == Some(id) {
                v.attachment = None;
                v.mount_point = None;
            }
        }
    }

    /// Called by the exit watcher when a VMM process is gone.
    pub fn vmm_exited(&mut self, id: &str, pid: i32, code: Option<i32>) {
        let Some(entry) = self.state.instances.get_mut(id) else {
            return;
        };
        if entry.process.as_ref().map(|p| p.pid) != Some(pid) {
            return; // an older process of a restarted instance
        }
        entry.process = None;
        entry.last_exit = code;
        match code {
            Some(0) | None => {
                entry.state = InstanceState::Stopped;
            }
            Some(c) => {
                entry.state = InstanceState::Error;
                let tail = process::tail(&self.store.log_path(id), 400);
                entry.last_error = Some(format!("the VMM exited with status {c}: {tail}"));
            }
        }
        process::log_note(
            &self.store.log_path(id),
            &format!(
                "VMM exited{}",
                code.map(|c| format!(" with status {c}"))
                    .unwrap_or_default()
            ),
        );
        self.launcher.cleanup(id);
        self.release_volumes(id);
        if let Err(e) = self.save() {
            log::error!("{e}");
        }
    }

    /// Gives the volume files of instance `id`, whose VMM has ended, back to
    /// root: a VMM identity owns its volumes only while it runs.
    fn release_volumes(&self, id: &str) {
        let Some(inst) = self.state.instance(id) else {
            return;
        };
        for (_, vol, _) in inst.volumes_in_order() {
            if let Some(v) = self.state.volume(vol) {
                let path = self.store.volume_path(&v.id);
                if let Err(e) = std::os::unix::fs::lchown(&path, Some(0), Some(0)) {
                    log::warn!("volume {}: cannot give it back to root: {e}", v.name);
                }
            }
        }
    }

    /// The console log of an instance.
    pub fn log_path(&self, key: &str) -> Result<PathBuf> {
        Ok(self.store.log_path(&self.instance(key)?.id))
    }

    // ----- pods -----

    // ----- volumes -----
}

/// Test-only fault injection: `EMBER_FAULT=<point>` makes emberd die hard
/// at that point (see the crash-consistency tests).
fn fault_injected(point: &str) -> bool {
    std::env::var("EMBER_FAULT").is_ok_and(|v| v == point)
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| if m.is_dir() { 0 } else { m.len() })
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sup(tag: &str) -> (Supervisor, PathBuf) {
        test_supervisor(&format!("sup-{tag}"))
    }

    /// A supervisor over a fresh state directory (returned, for cleanup)
    /// whose VMM binary does not exist: for the model's own tests.
    pub(super) fn test_supervisor(tag: &str) -> (Supervisor, PathBuf) {
        let root = std::env::temp_dir().join(format!("emberd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = Store::open(&root.join("state")).unwrap();
        let launcher = Launcher {
            vmm_bin: "/nonexistent/ember-vmm".into(),
            jailer_bin: None,
            chroot_base: root.join("jail"),
            uid: 1,
            gid: 1,
            ids: 8,
            libs: vec![],
        };
        (
            Supervisor::new(store, launcher, Compilers::new()).unwrap(),
            root,
        )
    }

    fn add_volume(s: &mut Supervisor, name: &str) {
        let v = Volume {
            id: new_id("vol"),
            name: name.into(),
            size_mb: 1,
            created: now_rfc3339(),
            format: VolumeFormat::Raw,
            attachment: None,
            mount_point: None,
        };
        std::fs::write(s.store.volume_path(&v.id), [0u8; 512]).unwrap();
        s.state.volumes.insert(v.id.clone(), v);
    }

    #[test]
    fn launch_spec_orders_devices_and_renders_everything() {
        let (mut s, root) = sup("spec");
        let img = Image {
            id: "img-t".into(),
            name: "t".into(),
            provider: "ember".into(),
            base: "ember".into(),
            lang: "c".into(),
            created: now_rfc3339(),
            size_mb: 1,
            kernel: "kernel.elf".into(),
            initrd: None,
            boot_args: "console=ttyS0".into(),
            args: "a1".into(),
            mounts: vec!["/data".into()],
            default_memory_mb: 64,
            format: "elf-pvh".into(),
            snapshot_starts: None,
        };
        let dir = s.store.image_dir(&img.id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kernel.elf"), b"k").unwrap();
        s.state.images.insert(img.id.clone(), img);
        for v in ["rootfs", "data", "seed"] {
            add_volume(&mut s, v);
        }
        let mut mounts = BTreeMap::new();
        mounts.insert("/data".to_string(), "data".to_string());
        let inst = s
            .run_instance(RunRequest {
                name: "vm1".into(),
                image: "t".into(),
                mounts,
                vcpus: 2,
                root_volume: Some(Disk {
                    volume: "rootfs".into(),
                    read_only: false,
                }),
                disks: vec![Disk {
                    volume: "seed".into(),
                    read_only: true,
                }],
                interfaces: vec![NetInterface {
                    host_dev_name: "tap0".into(),
                    guest_mac: Some("06:00:00:00:00:01".into()),
                    macvtap_parent: None,
                }],
                boot_args: "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off".into(),
                create_only: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(inst.state, InstanceState::Stopped);
        let spec = s.launch_spec(&inst).unwrap();
        let c = &spec.vm_config;
        let drives = c["drives"].as_array().unwrap();
        assert_eq!(drives.len(), 3);
        assert_eq!(drives[0]["is_root_device"], true);
        assert_eq!(drives[2]["is_read_only"], true);
        let args = c["boot-source"]["boot_args"].as_str().unwrap();
        assert!(args.starts_with("console=ttyS0 ip=10.0.0.2"), "{args}");
        assert!(args.contains("ember.mount=/data:1"), "{args}");
        assert!(args.ends_with("-- a1"), "{args}");
        assert_eq!(c["machine-config"]["vcpu_count"], 2);
        assert_eq!(c["network-interfaces"][0]["host_dev_name"], "tap0");
        assert_eq!(c["network-interfaces"][0]["iface_id"], "eth0");
        // Every volume is now attached; reuse is refused.
        assert!(s.state.volumes.values().all(|v| v.attachment.is_some()));
        let again = s.run_instance(RunRequest {
            name: "vm2".into(),
            image: "t".into(),
            root_volume: Some(Disk {
                volume: "rootfs".into(),
                read_only: false,
            }),
            create_only: true,
            ..Default::default()
        });
        assert!(matches!(
            again,
            Err(SupervisorError::Invalid(_)) | Err(SupervisorError::Conflict(_))
        ));
        // Deleting frees them.
        s.delete_instance("vm1", false).unwrap();
        assert!(s.state.volumes.values().all(|v| v.attachment.is_none()));

        // A reserved instance, configured, then unconfigured (a failed
        // start): reserved again with its annotations, volumes free, and
        // it can be configured anew.
        let mut ann = BTreeMap::new();
        ann.insert("k".to_string(), "v".to_string());
        let r = s.reserve_instance("vm3", BTreeMap::new(), ann).unwrap();
        let req = || RunRequest {
            name: "vm3".into(),
            image: "t".into(),
            mounts: [("/data".to_string(), "data".to_string())].into(),
            root_volume: Some(Disk {
                volume: "rootfs".into(),
                read_only: false,
            }),
            create_only: true,
            ..Default::default()
        };
        s.configure_instance("vm3", req()).unwrap();
        assert!(s.state.volumes.values().any(|v| v.attachment.is_some()));
        let back = s.unconfigure_instance("vm3").unwrap();
        assert_eq!(
            (back.id.as_str(), back.name.as_str()),
            (r.id.as_str(), "vm3")
        );
        assert!(back.image_id.is_empty() && back.root_volume.is_none());
        assert_eq!(back.annotations.get("k").map(String::as_str), Some("v"));
        assert!(s.state.volumes.values().all(|v| v.attachment.is_none()));
        assert_eq!(s.unconfigure_instance("vm3").unwrap(), back);
        s.configure_instance("vm3", req()).unwrap();
        s.delete_instance("vm3", false).unwrap();
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn old_state_without_new_fields_loads() {
        let j = r#"{"id":"inst-1","name":"a","image_id":"i","image_name":"n","state":"running",
            "created":"x","memory_mb":64,"env":{},"mounts":{},"no_cleanup":false,"debug_mode":false,
            "process":null,"last_error":null,"last_exit":null}"#;
        let i: Instance = serde_json::from_str(j).unwrap();
        assert_eq!(i.vcpus, 0);
        assert!(i.interfaces.is_empty() && i.root_volume.is_none());
    }
}
