//! The supervisor's volumes: lookup, the prepare/finish of a volume build, installing volume files, deletion, attaching and detaching.

use super::*;

impl Supervisor {
    /// Volume by id or name.
    pub fn volume(&self, key: &str) -> Result<&Volume> {
        self.state
            .volume(key)
            .ok_or_else(|| not_found("volume", key))
    }

    /// Validates a volume creation and reserves scratch space.
    pub fn prepare_volume(
        &self,
        name: &str,
        size_mb: Option<u64>,
        format: VolumeFormat,
        has_data: bool,
    ) -> Result<VolumeJob> {
        validate_name("volume", name)?;
        if self.state.volume(name).is_some() {
            return Err(SupervisorError::Exists {
                what: "volume",
                name: name.into(),
                hint: "",
            });
        }
        if !has_data && size_mb.is_none() {
            return Err(SupervisorError::Invalid(
                "an empty volume needs size (MB) in the query".into(),
            ));
        }
        if let Some(s) = size_mb {
            if s == 0 || s > 1 << 20 {
                return Err(SupervisorError::Invalid(format!(
                    "size {s} MB is out of range (1 to 1048576)"
                )));
            }
        }
        let id = new_id("vol");
        let staging = self.staging(&id)?;
        Ok(VolumeJob {
            staging_file: staging.join("volume.img"),
            id,
            name: name.into(),
            size_mb,
            format,
            staging,
        })
    }

    /// Installs a built volume (the job's staging directory goes either way).
    pub fn finish_volume(
        &mut self,
        job: VolumeJob,
        built: std::result::Result<u64, SupervisorError>,
    ) -> Result<Volume> {
        let size_mb = built?;
        self.install_volume(
            job.id.clone(),
            &job.name,
            &job.staging_file,
            job.format,
            size_mb,
        )
    }

    /// Installs a volume image file built elsewhere (moved into place).
    pub fn install_volume_file(
        &mut self,
        name: &str,
        file: &Path,
        format: VolumeFormat,
    ) -> Result<Volume> {
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        self.install_volume(
            new_id("vol"),
            name,
            file,
            format,
            size.div_ceil(1 << 20).max(1),
        )
    }

    /// Moves `file` into place as volume `id` named `name` and records it.
    fn install_volume(
        &mut self,
        id: String,
        name: &str,
        file: &Path,
        format: VolumeFormat,
        size_mb: u64,
    ) -> Result<Volume> {
        validate_name("volume", name)?;
        if self.state.volume(name).is_some() {
            return Err(SupervisorError::Exists {
                what: "volume",
                name: name.into(),
                hint: "",
            });
        }
        let dest = self.store.volume_path(&id);
        std::fs::rename(file, &dest)
            .and_then(|()| super::store::private_file(&dest))
            .map_err(|e| SupervisorError::Internal(format!("cannot install volume {name}: {e}")))?;
        let v = Volume {
            id: id.clone(),
            name: name.into(),
            size_mb,
            created: now_rfc3339(),
            format,
            attachment: None,
            mount_point: None,
        };
        self.state.volumes.insert(id, v.clone());
        self.save()?;
        Ok(v)
    }

    /// Deletes a volume; an attached one needs `force` and a stopped instance.
    pub fn delete_volume(&mut self, key: &str, force: bool) -> Result<()> {
        let v = self.volume(key)?.clone();
        if let Some(inst) = &v.attachment {
            if !force {
                return Err(SupervisorError::Conflict(format!(
                    "volume {} is attached to instance {inst}; detach it or use force=true",
                    v.name
                )));
            }
            self.detach_volume(&v.id)?;
        }
        self.state.volumes.remove(&v.id);
        self.save()?;
        let _ = std::fs::remove_file(self.store.volume_path(&v.id));
        Ok(())
    }

    fn running(&self, inst: &Instance) -> bool {
        inst.process.as_ref().is_some_and(process::is_alive)
    }

    /// Attaches a volume to a stopped instance at `mount`.
    pub fn attach_volume(&mut self, vol: &str, inst: &str, mount: &str) -> Result<Volume> {
        validate_mount_point(mount)?;
        let v = self.volume(vol)?.clone();
        let i = self.instance(inst)?.clone();
        if let Some(a) = &v.attachment {
            return Err(SupervisorError::Conflict(format!(
                "volume {} is already attached to instance {a}",
                v.name
            )));
        }
        if self.running(&i) {
            return Err(SupervisorError::Conflict(format!(
                "instance {} is running; ember attaches volumes to stopped instances (stop it first)",
                i.name
            )));
        }
        if i.mounts.contains_key(mount) {
            return Err(SupervisorError::Conflict(format!(
                "instance {} already has a volume at {mount}",
                i.name
            )));
        }
        if let Some(e) = self.state.instances.get_mut(&i.id) {
            e.mounts.insert(mount.to_string(), v.name.clone());
        }
        let e = self
            .state
            .volumes
            .get_mut(&v.id)
            .ok_or_else(|| not_found("volume", vol))?;
        e.attachment = Some(i.id.clone());
        e.mount_point = Some(mount.to_string());
        let out = e.clone();
        self.save()?;
        Ok(out)
    }

    /// Detaches a volume from its (stopped) instance.
    pub fn detach_volume(&mut self, vol: &str) -> Result<Volume> {
        let v = self.volume(vol)?.clone();
        let Some(inst_id) = v.attachment.clone() else {
            return Err(SupervisorError::Conflict(format!(
                "volume {} is not attached",
                v.name
            )));
        };
        if let Some(i) = self.state.instances.get(&inst_id) {
            if self.running(i) {
                return Err(SupervisorError::Conflict(format!(
                    "instance {} is running; stop it before detaching {}",
                    i.name, v.name
                )));
            }
        }
        if let Some(i) = self.state.instances.get_mut(&inst_id) {
            i.mounts.retain(|_, name| name != &v.name);
        }
        let e = self
            .state
            .volumes
            .get_mut(&v.id)
            .ok_or_else(|| not_found("volume", vol))?;
        e.attachment = None;
        e.mount_point = None;
        let out = e.clone();
        self.save()?;
        Ok(out)
    }
}
