//! The MMDS data store behind `PUT`/`PATCH`/`GET /mmds`: one JSON value,
//! bounded in size, replaced by PUT and merged by PATCH (JSON merge patch,
//! RFC 7396), as Firecracker's.
//!
//! The guest reaches the contents through `devices::mmds`: the controller
//! hands them to the shared service after every change, and the
//! interfaces named in `/mmds/config` answer ARP, TCP and HTTP for the MMDS
//! address inside the VMM (V2 session tokens included).

use serde_json::{Map, Value};

/// Firecracker's default store limit (its default API payload limit).
pub const DEFAULT_MMDS_SIZE_LIMIT: usize = 51_200;

/// Errors of the MMDS store.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmdsError {
    /// The store would exceed its limit (answered 413).
    #[error("The MMDS patch request doesn't fit.")]
    TooLarge {
        /// The serialized size it would have.
        size: usize,
    },
    /// PATCH before any PUT.
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
}

/// The store.
#[derive(Debug, Clone, PartialEq)]
pub struct MmdsStore {
    data: Option<Value>,
    limit: usize,
}

impl Default for MmdsStore {
    fn default() -> Self {
        MmdsStore::new(DEFAULT_MMDS_SIZE_LIMIT)
    }
}

fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl MmdsStore {
    /// An empty store of at most `limit` serialized bytes.
    pub fn new(limit: usize) -> Self {
        MmdsStore { data: None, limit }
    }

    fn check(&self, v: &Value) -> Result<(), MmdsError> {
        let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
        if size > self.limit {
            return Err(MmdsError::TooLarge { size });
        }
        Ok(())
    }

    /// `PUT /mmds`: replaces the contents.
    pub fn put(&mut self, v: Value) -> Result<(), MmdsError> {
        self.check(&v)?;
        self.data = Some(v);
        Ok(())
    }

    /// `PATCH /mmds`: merges `patch` into the contents.
    pub fn patch(&mut self, patch: &Value) -> Result<(), MmdsError> {
        let mut next = self.data.clone().ok_or(MmdsError::NotInitialized)?;
        merge(&mut next, patch);
        self.check(&next)?;
        self.data = Some(next);
        Ok(())
    }

    /// `GET /mmds`: the contents (`null` before the first PUT).
    pub fn get(&self) -> Value {
        self.data.clone().unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn put_patch_get() {
        let mut s = MmdsStore::new(1000);
        assert_eq!(s.get(), Value::Null);
        assert_eq!(s.patch(&json!({"a": 1})), Err(MmdsError::NotInitialized));
        s.put(json!({"latest": {"meta-data": {"id": "i-1", "x": 1}}}))
            .unwrap();
        s.patch(&json!({"latest": {"meta-data": {"x": null, "y": [1]}}}))
            .unwrap();
        assert_eq!(
            s.get(),
            json!({"latest": {"meta-data": {"id": "i-1", "y": [1]}}})
        );
    }

    #[test]
    fn limit_holds_for_put_and_patch() {
        let mut s = MmdsStore::new(20);
        assert!(matches!(
            s.put(json!({"k": "x".repeat(30)})),
            Err(MmdsError::TooLarge { .. })
        ));
        s.put(json!({"k": 1})).unwrap();
        assert!(matches!(
            s.patch(&json!({"j": "x".repeat(30)})),
            Err(MmdsError::TooLarge { .. })
        ));
        assert_eq!(s.get(), json!({"k": 1}));
    }
}
