//! The supervisor's pod records (hyperd pods; their VMs are instances).

use super::*;

impl Supervisor {
    /// Pod by id or name.
    pub fn pod(&self, key: &str) -> Result<&Pod> {
        find(&self.state.pods, key, |p| &p.name).ok_or_else(|| not_found("pod", key))
    }

    /// Records a new pod (pending).
    pub fn create_pod(
        &mut self,
        name: &str,
        spec: &str,
        containers: Vec<PodContainer>,
    ) -> Result<Pod> {
        validate_name("pod", name)?;
        if find(&self.state.pods, name, |p| &p.name).is_some() {
            return Err(SupervisorError::Exists {
                what: "pod",
                name: name.into(),
                hint: "",
            });
        }
        let pod = Pod {
            id: hyper_id("pod"),
            name: name.into(),
            spec: spec.into(),
            created: now_rfc3339(),
            containers,
            ..Default::default()
        };
        self.state.pods.insert(pod.id.clone(), pod.clone());
        self.save()?;
        Ok(pod)
    }

    /// Updates a pod.
    pub fn update_pod(&mut self, key: &str, f: impl FnOnce(&mut Pod)) -> Result<Pod> {
        let id = self.pod(key)?.id.clone();
        let p = self
            .state
            .pods
            .get_mut(&id)
            .ok_or_else(|| not_found("pod", key))?;
        f(p);
        let out = p.clone();
        self.save()?;
        Ok(out)
    }

    /// Removes a pod record (its VM is the caller's business).
    pub fn remove_pod(&mut self, key: &str) -> Result<Pod> {
        let id = self.pod(key)?.id.clone();
        let p = self
            .state
            .pods
            .remove(&id)
            .ok_or_else(|| not_found("pod", key))?;
        self.save()?;
        Ok(p)
    }
}
