//! Instant starts: instances restored from a snapshot of their image's
//! booted guest instead of booting cold (emberd `--snapshot-starts`).
//!
//! The supervisor keeps, per image and machine size (memory, vCPUs,
//! number of volumes), a template snapshot under `<state>/snapshots/`, and
//! a pool of idle jailed VMMs (`--snapshot-pool`). A start that qualifies
//! ([`Supervisor::warm_plan`]) takes a pooled VMM, moves its jail to the
//! instance, links the volumes and the template in, and loads the snapshot
//! on a worker thread ([`warm::Restore`]); the instance is on record as
//! running from the moment it owns the VMM. Whatever fails (no template
//! yet, no idle VMM, a template the VMM refuses, no config channel) falls
//! back to a cold boot, with a line in the instance's log: an instance is
//! never lost to an instant start. Templates and pooled VMMs are made in
//! the background, never on the loop thread.

use std::collections::{HashMap, HashSet};

use super::*;
use crate::model::jobs::Jobs;
use crate::runtime::restore_config::RestoreConfig;
use crate::runtime::warm::{self, IdleVmm, Restore, TemplateBuild, WarmError};

/// emberd's instant-start settings.
#[derive(Clone, Debug, Default)]
pub struct WarmConfig {
    /// `--snapshot-starts`: images whose runtime can be restored start from
    /// snapshots unless their own switch is off.
    pub enabled: bool,
    /// `--snapshot-pool`: idle VMMs kept ready.
    pub pool: usize,
}

/// The supervisor's instant-start state (on the loop thread).
#[derive(Default)]
pub(super) struct Warm {
    cfg: WarmConfig,
    jobs: Option<Jobs>,
    idle: Vec<IdleVmm>,
    spawning: usize,
    /// Template keys being built.
    building: HashSet<String>,
    /// Template keys that failed (not retried until the image changes or
    /// emberd restarts), with the reason.
    failed: HashMap<String, String>,
    /// Identities held by idle and template VMMs.
    reserved: HashSet<(u32, u32)>,
}

impl Warm {
    /// Identities no instance may take now.
    pub(super) fn reserved(&self) -> impl Iterator<Item = &(u32, u32)> {
        self.reserved.iter()
    }
}

/// Why an instance starts cold (for the log at debug level).
type Plan = std::result::Result<(Image, String), &'static str>;

impl Supervisor {
    /// Turns instant starts on (before [`Supervisor::start_background`]).
    pub fn set_snapshot_starts(&mut self, cfg: WarmConfig) -> Result<()> {
        if cfg.enabled {
            let dir = self.snapshots_dir();
            std::fs::create_dir_all(&dir)
                .and_then(|()| super::super::store::root_only(&dir))
                .map_err(|e| {
                    SupervisorError::Internal(format!("cannot create {}: {e}", dir.display()))
                })?;
            // Half-built templates of an earlier run.
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with(".building-") {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        self.warm.cfg = cfg;
        Ok(())
    }

    /// Gives the supervisor the loop's work queue and fills the pool.
    pub fn start_background(&mut self, jobs: Jobs) {
        self.warm.jobs = Some(jobs);
        self.refill_pool();
    }

    /// Kills the idle pooled VMMs (emberd is stopping).
    pub fn shutdown(&mut self) {
        self.warm.cfg.enabled = false;
        for idle in std::mem::take(&mut self.warm.idle) {
            warm::discard(&self.launcher, &idle);
        }
        self.warm.reserved.clear();
    }

    /// Whether instances of `img` start from snapshots.
    pub fn snapshot_starts(&self, img: &Image) -> bool {
        self.warm.cfg.enabled && img.restorable() && img.snapshot_starts != Some(false)
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.store.root().join("snapshots")
    }

    /// `<snapshots>/<key>.error`: why the template `key` could not be made.
    fn template_error_path(&self, key: &str) -> PathBuf {
        self.snapshots_dir().join(format!("{key}.error"))
    }

    /// Idle VMMs left by an earlier emberd (not taken by an instance on
    /// record) are killed and their jails removed.
    pub(super) fn reap_idle_vmms(&mut self) {
        for (id, p) in self.launcher.find_idle_vmms() {
            if self
                .state
                .instances
                .values()
                .any(|i| i.process.as_ref() == Some(&p))
            {
                continue;
            }
            log::warn!(
                "killing an idle pooled VMM (pid {}) of an earlier run",
                p.pid
            );
            process::kill_and_wait(&p, Duration::from_secs(10));
            self.launcher.cleanup(&id);
            let _ = std::fs::remove_file(self.store.log_path(&id));
        }
    }

    /// Removes the templates of image `image_id` (it changed or is gone).
    pub(super) fn drop_templates(&mut self, image_id: &str) {
        let prefix = format!("{image_id}-");
        self.warm.failed.retain(|k, _| !k.starts_with(&prefix));
        if let Ok(rd) = std::fs::read_dir(self.snapshots_dir()) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// A free identity of the range (no instance, idle or template VMM
    /// holds it), reserved.
    fn reserve_identity(&mut self) -> Option<(u32, u32)> {
        let taken: HashSet<(u32, u32)> = self
            .state
            .instances
            .values()
            .filter_map(|i| i.vmm_uid)
            .chain(self.warm.reserved.iter().copied())
            .collect();
        let free = (0..self.launcher.ids)
            .filter_map(|n| self.launcher.identity(n))
            .find(|u| !taken.contains(u))?;
        self.warm.reserved.insert(free);
        Some(free)
    }

    /// An identity taken from the pool is no longer reserved (an instance
    /// holds it, or nobody does); the pool is refilled.
    fn release_identity(&mut self, owner: (u32, u32)) {
        self.warm.reserved.remove(&owner);
        self.refill_pool();
    }

    /// Starts idle VMMs in the background up to the pool size.
    fn refill_pool(&mut self) {
        if !self.warm.cfg.enabled {
            return;
        }
        let Some(jobs) = self.warm.jobs.clone() else {
            return;
        };
        while self.warm.idle.len() + self.warm.spawning < self.warm.cfg.pool {
            let Some(owner) = self.reserve_identity() else {
                log::warn!("snapshot pool: no VMM identity is free");
                return;
            };
            let id = new_id(warm::POOL_PREFIX.trim_end_matches('-'));
            let log = self.store.log_path(&id);
            let launcher = self.launcher.clone();
            self.warm.spawning += 1;
            jobs.spawn_background("snapshot-pool", Duration::ZERO, move || {
                let r = warm::spawn_idle(&launcher, &id, owner, &log);
                Box::new(move |sup: &mut Supervisor, _: &Jobs| sup.idle_ready(owner, r))
            });
        }
    }

    fn idle_ready(&mut self, owner: (u32, u32), r: std::result::Result<IdleVmm, WarmError>) {
        self.warm.spawning -= 1;
        match r {
            Ok(idle) if self.warm.cfg.enabled => self.warm.idle.push(idle),
            Ok(idle) => {
                warm::discard(&self.launcher, &idle);
                self.warm.reserved.remove(&owner);
            }
            Err(e) => {
                // Not retried at once: the next start refills.
                log::warn!("snapshot pool: cannot start an idle VMM: {e}");
                self.warm.reserved.remove(&owner);
            }
        }
    }

    /// Whether `inst` can start from a snapshot: the image and emberd allow
    /// it, and the instance has only what a restore can give it (volumes
    /// at mount points; no NICs, extra disks or kernel arguments of its
    /// own; a first start, whose VMM identity comes from the pool).
    /// Returns the image and the template key.
    fn warm_plan(&self, inst: &Instance) -> Plan {
        let img = self.state.images.get(&inst.image_id).ok_or("no image")?;
        if !self.snapshot_starts(img) {
            return Err("snapshot starts are off for its image");
        }
        if !inst.interfaces.is_empty()
            || inst.root_volume.is_some()
            || !inst.disks.is_empty()
            || !inst.boot_args.trim().is_empty()
        {
            return Err("it has NICs, disks or kernel arguments of its own");
        }
        if inst.vmm_uid.is_some()
            || std::fs::metadata(self.store.log_path(&inst.id)).is_ok_and(|m| m.len() > 0)
        {
            return Err("it started before");
        }
        let key = format!(
            "{}-{}m-{}c-{}d",
            img.id,
            inst.memory_mb,
            inst.vcpus.max(1),
            inst.volumes_in_order().len()
        );
        Ok((img.clone(), key))
    }

    /// Starts `inst` from its image's template if it can, now; otherwise
    /// (None) it boots cold, and the missing template or idle VMM is made
    /// in the background for the next start.
    pub(super) fn try_warm_start(&mut self, inst: &Instance) -> Result<Option<Instance>> {
        let (img, key) = match self.warm_plan(inst) {
            Ok(p) => p,
            Err(why) => {
                if self.warm.cfg.enabled {
                    log::debug!("instance {}: cold start: {why}", inst.name);
                }
                return Ok(None);
            }
        };
        let template = self.snapshots_dir().join(&key);
        if !warm::template_ready(&template) {
            self.schedule_template(&img, &key, inst);
            return Ok(None);
        }
        if self.warm.failed.contains_key(&key) {
            return Ok(None);
        }
        let mut files = Vec::new();
        let mut drives = Vec::new();
        let mut mounts = Vec::new();
        for (i, (mount, vname, _)) in inst.volumes_in_order().into_iter().enumerate() {
            let vol = self
                .state
                .volume(vname)
                .ok_or_else(|| not_found("volume", vname))?;
            let file = format!("{}.img", vol.id);
            files.push((self.store.volume_path(&vol.id), file.clone()));
            drives.push((format!("drive{i}"), file));
            if let Some(m) = mount {
                mounts.push((m.to_string(), i));
            }
        }
        // What the cold command line would carry, checked the same way.
        let config = match RestoreConfig::from_instance(&mounts, &inst.env, &img.args) {
            Ok(c) => c,
            Err(e) => {
                log::info!("instance {}: cold start: {e}", inst.name);
                return Ok(None);
            }
        };
        let idle = loop {
            match self.warm.idle.pop() {
                Some(i) if process::is_alive(&i.process) => break i,
                Some(i) => {
                    warm::discard(&self.launcher, &i);
                    self.warm.reserved.remove(&(i.uid, i.gid));
                }
                None => {
                    self.refill_pool();
                    log::info!(
                        "instance {}: cold start: no idle VMM in the pool",
                        inst.name
                    );
                    return Ok(None);
                }
            }
        };
        // The identity stays reserved until the instance holds it; the pool
        // is refilled after that (or after a failure here).
        let owner = (idle.uid, idle.gid);
        // The pooled VMM's jail and log become the instance's.
        self.launcher.cleanup(&inst.id);
        let log_path = self.store.log_path(&inst.id);
        let moved = std::fs::rename(
            self.launcher.jail_dir(&idle.id),
            self.launcher.jail_dir(&inst.id),
        )
        .and_then(|()| std::fs::rename(&idle.log, &log_path));
        if let Err(e) = moved {
            log::warn!(
                "instance {}: cold start: cannot take a pooled VMM: {e}",
                inst.name
            );
            warm::discard(&self.launcher, &idle);
            self.launcher.cleanup(&inst.id);
            self.release_identity(owner);
            return Ok(None);
        }
        if let Err(e) = self
            .launcher
            .place_files(&inst.id, &warm::volume_files(&files), owner)
        {
            process::log_note(
                &log_path,
                &format!("snapshot start failed ({e}); booting cold"),
            );
            process::kill_and_wait(&idle.process, Duration::from_secs(10));
            self.launcher.cleanup(&inst.id);
            self.release_identity(owner);
            return Ok(None);
        }
        // A CID of its own, from its identity (unique among live VMMs).
        let guest_cid = 1000 + owner.0.wrapping_sub(self.launcher.uid);
        let restore = Restore {
            api_sock: self.launcher.api_sock(&inst.id),
            jail_root: self.launcher.jail_root(&inst.id),
            owner,
            template,
            drives,
            vsock_uds: VSOCK_UDS.to_string(),
            guest_cid,
            config,
        };
        process::log_note(
            &log_path,
            &format!("starting instance {} from its image's snapshot", inst.name),
        );
        let entry = self
            .state
            .instances
            .get_mut(&inst.id)
            .ok_or_else(|| not_found("instance", &inst.id))?;
        entry.vmm_uid = Some(owner);
        entry.state = InstanceState::Running;
        entry.process = Some(idle.process.clone());
        entry.started_from = Some(StartMode::Snapshot);
        entry.last_error = None;
        entry.last_exit = None;
        let out = entry.clone();
        if let Some(w) = &self.watch {
            w.send(inst.id.clone(), idle.process.clone());
        }
        // The instance holds the identity now. The pool is refilled once
        // the restore is done: a VMM starting meanwhile would compete with
        // it for the CPU.
        self.warm.reserved.remove(&owner);
        self.save()?;
        let id = inst.id.clone();
        let p = idle.process.clone();
        let spawned = self.warm.jobs.as_ref().map(|j| {
            j.spawn("snapshot-restore", Duration::ZERO, move || {
                let r = restore.run();
                Box::new(move |sup: &mut Supervisor, _: &Jobs| sup.restore_done(&id, &p, &key, r))
            })
        });
        if !matches!(spawned, Some(Ok(()))) {
            self.restore_done(
                &inst.id,
                &idle.process,
                "",
                Err(WarmError::Channel(
                    "no worker thread for the restore".into(),
                )),
            );
            return Ok(Some(self.instance(&inst.id)?.clone()));
        }
        Ok(Some(out))
    }

    /// A restore ended: noted in the log, or the instance boots cold.
    fn restore_done(
        &mut self,
        id: &str,
        p: &VmmProcess,
        key: &str,
        r: std::result::Result<Duration, WarmError>,
    ) {
        self.refill_pool();
        let Some(inst) = self.state.instances.get(id) else {
            return;
        };
        let log_path = self.store.log_path(id);
        let name = inst.name.clone();
        // A short program may have ended (its exit handled) before this
        // runs: the note is still its own. A failure is acted on only while
        // the VMM is the instance's.
        if inst.process.as_ref() != Some(p) && (r.is_err() || inst.process.is_some()) {
            return; // stopped, restarted or deleted meanwhile
        }
        match r {
            Ok(d) => {
                process::log_note(
                    &log_path,
                    &format!(
                        "restored from snapshot (snapshot load: {} us)",
                        d.as_micros()
                    ),
                );
            }
            Err(e) => {
                log::warn!("instance {name}: snapshot start failed ({e}); booting cold");
                process::log_note(
                    &log_path,
                    &format!("snapshot start failed ({e}); booting cold"),
                );
                if matches!(e, WarmError::Api(_) | WarmError::Files { .. }) && !key.is_empty() {
                    // The VMM refused this template: later starts go cold.
                    self.warm.failed.insert(key.to_string(), e.to_string());
                }
                process::kill_and_wait(p, Duration::from_secs(10));
                self.launcher.cleanup(id);
                if let Some(e) = self.state.instances.get_mut(id) {
                    e.process = None;
                    e.started_from = None;
                    e.state = InstanceState::Pending;
                }
                if let Err(e) = self.start_instance(id) {
                    log::error!("instance {name}: cold start after a failed restore: {e}");
                }
            }
        }
    }

    /// Builds the template `key` of `img` in the background (once).
    fn schedule_template(&mut self, img: &Image, key: &str, inst: &Instance) {
        if self.warm.building.contains(key) || self.warm.failed.contains_key(key) {
            return;
        }
        let Some(jobs) = self.warm.jobs.clone() else {
            return;
        };
        let built = (|| {
            let owner = self
                .reserve_identity()
                .ok_or_else(|| "no VMM identity is free".to_string())?;
            let id = new_id(warm::TEMPLATE_PREFIX.trim_end_matches('-'));
            let staging = self.staging(&id).map_err(|e| e.to_string())?;
            let dir = self.store.image_dir(&img.id);
            let mut files = vec![process::JailFile {
                host: dir.join(&img.kernel),
                name: "kernel".into(),
                writable: false,
            }];
            let mut drives = Vec::new();
            for i in 0..inst.volumes_in_order().len() {
                // Placeholders the load replaces with the instance's volumes.
                let name = format!("drive{i}.img");
                let f = std::fs::File::create(staging.join(&name)).map_err(|e| e.to_string())?;
                f.set_len(1 << 20).map_err(|e| e.to_string())?;
                files.push(process::JailFile {
                    host: staging.join(&name),
                    name: name.clone(),
                    writable: true,
                });
                drives.push(serde_json::json!({
                    "drive_id": format!("drive{i}"), "path_on_host": name,
                    "is_root_device": false, "is_read_only": false
                }));
            }
            let cfg = serde_json::json!({
                "boot-source": {
                    "kernel_image_path": "kernel",
                    "boot_args": format!("{} {}", img.boot_args, warm::WARM_ARG).trim(),
                },
                "machine-config": {"vcpu_count": inst.vcpus.max(1), "mem_size_mib": inst.memory_mb},
                "drives": drives,
                "vsock": {"guest_cid": VSOCK_GUEST_CID, "uds_path": VSOCK_UDS},
            });
            let spec = LaunchSpec {
                id: id.clone(),
                uid: owner.0,
                gid: owner.1,
                files,
                vm_config: cfg,
                log_path: staging.join("console.log"),
                macvtaps: Vec::new(),
            };
            Ok::<_, String>((owner, staging, spec))
        })();
        let (owner, staging, spec) = match built {
            Ok(b) => b,
            Err(e) => {
                log::warn!("snapshot template {key}: {e}");
                self.warm.failed.insert(key.to_string(), e);
                return;
            }
        };
        let build = TemplateBuild {
            launcher: self.launcher.clone(),
            spec,
            dest: self.snapshots_dir().join(key),
        };
        self.warm.building.insert(key.to_string());
        let _ = std::fs::remove_file(self.template_error_path(key));
        log::info!("snapshot template {key}: building");
        let key = key.to_string();
        let image_id = img.id.clone();
        jobs.spawn_background("snapshot-template", Duration::ZERO, move || {
            let r = build.run();
            drop(staging);
            Box::new(move |sup: &mut Supervisor, _: &Jobs| {
                sup.template_done(&key, &image_id, owner, r)
            })
        });
    }

    fn template_done(
        &mut self,
        key: &str,
        image_id: &str,
        owner: (u32, u32),
        r: std::result::Result<u64, WarmError>,
    ) {
        self.warm.building.remove(key);
        self.warm.reserved.remove(&owner);
        let dest = self.snapshots_dir().join(key);
        if !self.state.images.contains_key(image_id) {
            let _ = std::fs::remove_dir_all(&dest);
            return;
        }
        match r {
            Ok(size) => log::info!(
                "snapshot template {key}: ready ({} KiB of memory)",
                size / 1024
            ),
            Err(e) => {
                log::warn!("snapshot template {key}: {e}; its instances boot cold");
                // For the administrator: why this image and size boot cold.
                let note = format!("{}: {e}\n", now_rfc3339());
                let _ =
                    crate::fsutil::write_atomic(&self.template_error_path(key), note.as_bytes());
                self.warm.failed.insert(key.to_string(), e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sup(tag: &str) -> (Supervisor, PathBuf) {
        super::super::tests::test_supervisor(&format!("warm-{tag}"))
    }

    fn image(base: &str, switch: Option<bool>) -> Image {
        Image {
            id: format!("img-{base}"),
            name: base.into(),
            provider: "ember".into(),
            base: base.into(),
            lang: "c".into(),
            created: now_rfc3339(),
            size_mb: 1,
            kernel: "kernel.elf".into(),
            initrd: None,
            boot_args: String::new(),
            args: String::new(),
            mounts: vec![],
            default_memory_mb: 32,
            format: "elf-pvh".into(),
            snapshot_starts: switch,
        }
    }

    #[test]
    fn only_restorable_images_under_the_flag_start_from_snapshots() {
        let (mut s, root) = sup("gate");
        let ember = image("ember", None);
        assert!(!s.snapshot_starts(&ember), "off without --snapshot-starts");
        s.set_snapshot_starts(WarmConfig {
            enabled: true,
            pool: 0,
        })
        .unwrap();
        assert!(s.snapshot_starts(&ember));
        assert!(!s.snapshot_starts(&image("ember", Some(false))));
        assert!(!s.snapshot_starts(&image("linux", Some(true))));
        // The snapshots directory is root's alone.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.snapshots_dir())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn instances_with_what_a_restore_cannot_give_boot_cold() {
        let (mut s, root) = sup("plan");
        s.set_snapshot_starts(WarmConfig {
            enabled: true,
            pool: 0,
        })
        .unwrap();
        let img = image("ember", None);
        s.state.images.insert(img.id.clone(), img.clone());
        let inst = Instance {
            id: "inst-1".into(),
            name: "i1".into(),
            image_id: img.id.clone(),
            memory_mb: 32,
            vcpus: 2,
            ..Default::default()
        };
        let (_, key) = s.warm_plan(&inst).unwrap();
        assert_eq!(key, "img-ember-32m-2c-0d");
        for bad in [
            Instance {
                boot_args: "quiet".into(),
                ..inst.clone()
            },
            Instance {
                interfaces: vec![NetInterface::default()],
                ..inst.clone()
            },
            Instance {
                vmm_uid: Some((1, 1)),
                ..inst.clone()
            },
        ] {
            assert!(s.warm_plan(&bad).is_err(), "{bad:?}");
        }
        // Without a template nothing is restored (and with no work queue
        // nothing is built): a cold start.
        assert!(s.try_warm_start(&inst).unwrap().is_none());
        let _ = std::fs::remove_dir_all(root);
    }
}
