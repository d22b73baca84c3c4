//! Image names: parsing `repo[:tag]`, id prefixes, and resolving a name
//! or id prefix to the index's records.

use super::{ImageRecord, ImageStoreError, Result};

/// Parses `repo[:tag]` into a normalized (repo, tag).
pub fn parse_name(s: &str) -> Result<(String, String)> {
    let bad = |why: &str| ImageStoreError::Invalid(format!("invalid image name {s:?}: {why}"));
    let s = s.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.contains('@') {
        return Err(bad("digest references cannot name an image"));
    }
    let (repo, tag) = match s.rfind(':') {
        Some(i) if !s[i + 1..].contains('/') => (&s[..i], &s[i + 1..]),
        _ => (s, "latest"),
    };
    let repo_ok = !repo.is_empty()
        && repo.len() <= 255
        && repo
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:".contains(&b))
        && repo
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_alphanumeric)
        && !repo.ends_with('/')
        && !repo.contains("//");
    if !repo_ok {
        return Err(bad(
            "the repository must be lowercase letters, digits and . _ - / separators",
        ));
    }
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !tag.starts_with(['.', '-']);
    if !tag_ok {
        return Err(bad("the tag must be 1-128 letters, digits, _ . -"));
    }
    let repo = repo
        .strip_prefix("docker.io/library/")
        .or_else(|| repo.strip_prefix("index.docker.io/library/"))
        .or_else(|| repo.strip_prefix("docker.io/"))
        .unwrap_or(repo);
    Ok((repo.to_string(), tag.to_string()))
}

/// The (repo, tag) of a commit: `repo` alone may carry the tag, else `tag`
/// names it.
pub(super) fn commit_name(repo: &str, tag: &str) -> Result<(String, String)> {
    if tag.is_empty() {
        parse_name(repo)
    } else {
        parse_name(&format!("{repo}:{tag}"))
    }
}

/// `sha256:`-stripped id prefix if `s` looks like one (≥ 4 hex digits).
fn id_prefix(s: &str) -> Option<String> {
    let h = s.strip_prefix("sha256:").unwrap_or(s).to_ascii_lowercase();
    (h.len() >= 4 && h.len() <= 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then_some(h)
}

/// Indexes of the records `name_or_id` names: one record for a name, all
/// records of the image for an id prefix.
pub(super) fn resolve(records: &[ImageRecord], name_or_id: &str) -> Result<Vec<usize>> {
    if let Ok((repo, tag)) = parse_name(name_or_id) {
        if let Some(i) = records
            .iter()
            .position(|r| r.is_named() && r.repo == repo && r.tag == tag)
        {
            return Ok(vec![i]);
        }
    }
    if let Some(p) = id_prefix(name_or_id) {
        let hits: Vec<usize> = (0..records.len())
            .filter(|&i| records[i].id.starts_with(&p))
            .collect();
        let first = hits.first().map(|&i| records[i].id.clone());
        if hits.iter().any(|&i| Some(&records[i].id) != first.as_ref()) {
            return Err(ImageStoreError::Invalid(format!(
                "image id prefix {name_or_id:?} is ambiguous"
            )));
        }
        if !hits.is_empty() {
            return Ok(hits);
        }
    }
    Err(ImageStoreError::NotFound(name_or_id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            parse_name("busybox").unwrap(),
            ("busybox".into(), "latest".into())
        );
        assert_eq!(
            parse_name("docker.io/library/busybox:1.36").unwrap(),
            ("busybox".into(), "1.36".into())
        );
        assert_eq!(
            parse_name("localhost:5000/a/b").unwrap(),
            ("localhost:5000/a/b".into(), "latest".into())
        );
        for bad in ["", "Upper", "a@sha256:00", "a:", "a:-x", "/a", "a//b"] {
            assert!(
                matches!(parse_name(bad), Err(ImageStoreError::Invalid(_))),
                "{bad}"
            );
        }
        assert_eq!(id_prefix("sha256:ABCD"), Some("abcd".into()));
        assert_eq!(id_prefix("abc"), None);
    }
}
