//! [`ImageStore::build`]: the Dockerfile builder, which assembles an
//! image's root filesystem from a base image and the build context
//! without running anything.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use serde_json::json;

use super::dockerfile::{command_form, json_form, parse_dockerfile, words, Step};
use super::names::parse_name;
use super::paths::{
    context_path, context_sources, copy_entry, ensure_dir, resolve_in_rootfs, sniff_archive,
    ArchiveKind, CopyOpts,
};
use super::records::set_env;
use super::{
    from_oci, internal, ImageRecord, ImageStore, ImageStoreError, Result, LAYOUT_REF, NONE,
};
use crate::images::archive::{self, ExtractLimits};
use crate::images::oci::{self, ImageConfig};
use crate::images::registry;

/// Largest Dockerfile read, in bytes.
const MAX_DOCKERFILE: u64 = 1 << 20;

impl ImageStore {
    /// Builds an image from a Dockerfile subset and stores it as `tag`
    /// (`repo[:tag]`; empty: no name).
    ///
    /// `context_tar` is a tar or tar.gz (bzip2/xz are not supported), the
    /// build context, extracted (in a sandbox job) with
    /// [`archive::extract_tar_gz`]'s safety rules; `dockerfile` is the
    /// Dockerfile's path in it (empty: `Dockerfile`). Nothing runs: the root filesystem is assembled in a
    /// scratch directory (the base image unpacked with whiteouts, then the
    /// copies) and stored as a single-layer image.
    ///
    /// Instructions: `FROM scratch` or `FROM <stored image> [AS name]`
    /// (one stage); `COPY`/`ADD [--chown=uid[:gid]] [--chmod=octal] src...
    /// dest` from the context only (JSON form too; `*`/`?` wildcards in the
    /// last component of a source; `ADD` of a local tar or tar.gz extracts
    /// it; URLs are refused); `ENV k=v ...` / `ENV k v`; `CMD`, `ENTRYPOINT`
    /// (JSON or shell form); `WORKDIR`; `LABEL`, `EXPOSE`, `USER`, `VOLUME`,
    /// `STOPSIGNAL`, `ARG name[=default]` (build args cannot be passed:
    /// defaults only), `MAINTAINER` (ignored). `$VAR` / `${VAR}` are
    /// substituted from ENV and ARG in those that take words. Comments,
    /// blank lines and `\` continuations are understood. Anything else
    /// (`RUN`, `HEALTHCHECK`, `SHELL`, `ONBUILD`, ...) fails before any
    /// work, naming the instruction and line.
    ///
    /// `progress` gets one JSON object per call (no trailing newline),
    /// hyperd/Docker style: `{"stream": "Step 1/4 : FROM scratch\n"}`, ...,
    /// `{"stream": "Successfully built <id>\n"}`.
    pub fn build(
        &self,
        context_tar: &[u8],
        dockerfile: &str,
        tag: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<ImageRecord> {
        let (repo, tagname) = if tag.trim().is_empty() {
            (NONE.to_string(), NONE.to_string())
        } else {
            parse_name(tag)?
        };
        let tmp = self.temp_dir("build")?;
        let ctx = tmp.path().join("context");
        archive::extract_sandboxed(
            archive::ArchiveSource::Bytes(context_tar),
            &ctx,
            &ExtractLimits::default(),
        )
        .map_err(|e| match e {
            archive::ArchiveError::Sandbox(_) => {
                ImageStoreError::Internal(format!("build context: {e}"))
            }
            other => ImageStoreError::Invalid(format!("build context: {other}")),
        })?;
        let dockerfile = if dockerfile.trim().is_empty() {
            "Dockerfile"
        } else {
            dockerfile
        };
        let df = context_path(&ctx, dockerfile).map_err(|_| {
            ImageStoreError::Invalid(format!(
                "Dockerfile {dockerfile:?} is not in the build context"
            ))
        })?;
        let mut text = String::new();
        File::open(&df)
            .and_then(|f| f.take(MAX_DOCKERFILE + 1).read_to_string(&mut text))
            .map_err(|e| ImageStoreError::Invalid(format!("Dockerfile {dockerfile:?}: {e}")))?;
        if text.len() as u64 > MAX_DOCKERFILE {
            return Err(ImageStoreError::Invalid(
                "the Dockerfile is larger than 1 MiB".into(),
            ));
        }
        let steps = parse_dockerfile(&text)?;

        let rootfs = tmp.path().join("rootfs");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&rootfs)
            .map_err(internal(rootfs.display()))?;
        let mut b = Builder {
            store: self,
            ctx: &ctx,
            rootfs: &rootfs,
            tmp: tmp.path(),
            config: ImageConfig::default(),
            args: BTreeMap::new(),
            n_tmp: 0,
            pull_progress: Vec::new(),
        };
        let total = steps.len();
        for (i, st) in steps.iter().enumerate() {
            progress(
                &json!({"stream": format!("Step {}/{} : {}\n", i + 1, total, st.text)}).to_string(),
            );
            let stepped = b.step(st);
            for line in b.pull_progress.drain(..) {
                progress(&line);
            }
            stepped.map_err(|e| match e {
                ImageStoreError::Invalid(m) => {
                    ImageStoreError::Invalid(format!("Dockerfile line {}: {m}", st.line))
                }
                ImageStoreError::NotFound(m) => {
                    ImageStoreError::NotFound(format!("{m} (Dockerfile line {})", st.line))
                }
                ImageStoreError::Unsupported(m) if !m.starts_with("Dockerfile line") => {
                    ImageStoreError::Unsupported(format!("Dockerfile line {}: {m}", st.line))
                }
                other => other,
            })?;
        }
        let config = b.config;
        let layout = tmp.path().join("layout");
        let digest = oci::write_layout(&layout, &rootfs, &config, LAYOUT_REF).map_err(from_oci)?;
        let rec = self.add_image(&layout, &digest, &repo, &tagname, &config)?;
        progress(&json!({"stream": format!(" ---> {}\n", rec.short_id())}).to_string());
        progress(
            &json!({"stream": format!("Successfully built {}\n", rec.short_id())}).to_string(),
        );
        if rec.is_named() {
            progress(
                &json!({"stream": format!("Successfully tagged {}\n", rec.name())}).to_string(),
            );
        }
        Ok(rec)
    }
}

struct Builder<'a> {
    store: &'a ImageStore,
    ctx: &'a Path,
    rootfs: &'a Path,
    tmp: &'a Path,
    config: ImageConfig,
    args: BTreeMap<String, String>,
    n_tmp: u32,
    /// Progress lines of a `FROM` pull, handed on after the step.
    pull_progress: Vec<String>,
}

impl Builder<'_> {
    fn vars(&self) -> BTreeMap<String, String> {
        let mut v = self.args.clone();
        for e in &self.config.env {
            if let Some((k, val)) = e.split_once('=') {
                v.insert(k.to_string(), val.to_string());
            }
        }
        v
    }

    fn words(&self, s: &str) -> Result<Vec<String>> {
        words(s, &self.vars())
    }

    /// `KEY=value` pairs (or the legacy `KEY value...` form when
    /// `legacy`).
    fn pairs(&self, args: &str, what: &str, legacy: bool) -> Result<Vec<(String, String)>> {
        let w = self.words(args)?;
        let Some(first) = w.first() else {
            return Err(ImageStoreError::Invalid(format!("{what} needs arguments")));
        };
        if !first.contains('=') {
            if !legacy || w.len() < 2 {
                return Err(ImageStoreError::Invalid(format!("{what} needs KEY=value")));
            }
            return Ok(vec![(first.clone(), w[1..].join(" "))]);
        }
        w.iter()
            .map(|kv| {
                kv.split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| {
                        ImageStoreError::Invalid(format!("{what}: {kv:?} is not KEY=value"))
                    })
            })
            .collect()
    }

    /// An absolute image path for `p` (relative to WORKDIR).
    fn image_path(&self, p: &str) -> String {
        if p.starts_with('/') {
            p.to_string()
        } else {
            let wd = if self.config.working_dir.is_empty() {
                "/"
            } else {
                &self.config.working_dir
            };
            format!("{}/{}", wd.trim_end_matches('/'), p)
        }
    }

    fn step(&mut self, st: &Step) -> Result<()> {
        let args = st.args.as_str();
        match st.keyword.as_str() {
            "FROM" => self.from(args),
            "COPY" => self.copy(args, false),
            "ADD" => self.copy(args, true),
            "ENV" => {
                for (k, v) in self.pairs(args, "ENV", true)? {
                    set_env(&mut self.config.env, &format!("{k}={v}"));
                }
                Ok(())
            }
            "ARG" => {
                for w in self.words(args)? {
                    let (k, v) = w.split_once('=').unwrap_or((&w, ""));
                    self.args.insert(k.to_string(), v.to_string());
                }
                Ok(())
            }
            "LABEL" => {
                for (k, v) in self.pairs(args, "LABEL", true)? {
                    self.config.labels.insert(k, v);
                }
                Ok(())
            }
            "CMD" => {
                self.config.cmd = command_form(args);
                Ok(())
            }
            "ENTRYPOINT" => {
                self.config.entrypoint = command_form(args);
                // Docker: a new ENTRYPOINT drops the CMD inherited so far.
                self.config.cmd.clear();
                Ok(())
            }
            "WORKDIR" => {
                let w = self.words(args)?;
                let [p] = w.as_slice() else {
                    return Err(ImageStoreError::Invalid("WORKDIR takes one path".into()));
                };
                let abs = self.image_path(p);
                let dir = resolve_in_rootfs(self.rootfs, &abs)?;
                ensure_dir(&dir, 0o755)?;
                self.config.working_dir = normalize_abs(&abs);
                Ok(())
            }
            "EXPOSE" => {
                for p in self.words(args)? {
                    let p = if p.contains('/') {
                        p
                    } else {
                        format!("{p}/tcp")
                    };
                    if !self.config.exposed_ports.contains(&p) {
                        self.config.exposed_ports.push(p);
                    }
                }
                self.config.exposed_ports.sort();
                Ok(())
            }
            "USER" => {
                self.config.user = self.words(args)?.join(" ");
                Ok(())
            }
            "VOLUME" => {
                let v = match json_form(args) {
                    Some(v) => v,
                    None => self.words(args)?,
                };
                for p in v {
                    if !self.config.volumes.contains(&p) {
                        self.config.volumes.push(p);
                    }
                }
                self.config.volumes.sort();
                Ok(())
            }
            "STOPSIGNAL" => {
                self.config.stop_signal = self.words(args)?.join(" ");
                Ok(())
            }
            "MAINTAINER" => Ok(()),
            other => Err(ImageStoreError::Unsupported(format!(
                "{other} is not supported"
            ))),
        }
    }

    fn from(&mut self, args: &str) -> Result<()> {
        let w = self.words(args)?;
        let w: Vec<&String> = w.iter().filter(|a| !a.starts_with("--platform=")).collect();
        let image = match w.as_slice() {
            [i] => i.as_str(),
            [i, as_, _] if as_.eq_ignore_ascii_case("as") => i.as_str(),
            _ => {
                return Err(ImageStoreError::Invalid(
                    "FROM takes an image [AS name]".into(),
                ))
            }
        };
        if image == "scratch" {
            return Ok(());
        }
        let img = match self.store.open_image(image) {
            Err(ImageStoreError::NotFound(_))
                if self.store.registry.is_some() && registry::is_reference(image) =>
            {
                let lines = &mut self.pull_progress;
                let rec = self
                    .store
                    .pull(image, None, &mut |v| lines.push(v.to_string()))?;
                self.store.open_image(&rec.id)?
            }
            Err(ImageStoreError::NotFound(_)) => {
                return Err(ImageStoreError::NotFound(format!(
                    "{image} (no registry access here: import the base image first)"
                )))
            }
            r => r?,
        };
        img.unpack(self.rootfs, &ExtractLimits::default())
            .map_err(from_oci)?;
        self.config = img.config.clone();
        Ok(())
    }

    fn copy(&mut self, args: &str, add: bool) -> Result<()> {
        let what = if add { "ADD" } else { "COPY" };
        let mut rest = args;
        let mut o = CopyOpts::default();
        while let Some(r) = rest.strip_prefix("--") {
            let (flag, tail) = r.split_once(char::is_whitespace).unwrap_or((r, ""));
            rest = tail.trim_start();
            let (k, v) = flag.split_once('=').unwrap_or((flag, ""));
            match k {
                "chown" => {
                    let (u, g) = v.split_once(':').unwrap_or((v, v));
                    match (u.parse::<u32>(), g.parse::<u32>()) {
                        (Ok(u), Ok(g)) => o.owner = Some((u, g)),
                        _ => {
                            return Err(ImageStoreError::Unsupported(format!(
                                "{what} --chown={v}: only numeric uid[:gid] is supported"
                            )))
                        }
                    }
                }
                "chmod" => {
                    o.chmod = Some(
                        u32::from_str_radix(v, 8).map_err(|_| {
                            ImageStoreError::Invalid(format!(
                                "{what} --chmod={v}: not an octal mode"
                            ))
                        })? & 0o7777,
                    )
                }
                "link" => {}
                "from" => {
                    return Err(ImageStoreError::Unsupported(format!(
                        "{what} --from is not supported (single-stage builds only)"
                    )))
                }
                _ => {
                    return Err(ImageStoreError::Invalid(format!(
                        "{what}: unknown flag --{k}"
                    )))
                }
            }
        }
        let mut list = match json_form(rest) {
            Some(v) => {
                // JSON form: no word splitting; variables are expanded.
                let vars = self.vars();
                v.iter().map(|s| expand_only(s, &vars)).collect::<Vec<_>>()
            }
            None => self.words(rest)?,
        };
        if list.len() < 2 {
            return Err(ImageStoreError::Invalid(format!(
                "{what} needs a source and a destination"
            )));
        }
        let dest = list.pop().unwrap_or_default();
        for s in &list {
            let lower = s.to_ascii_lowercase();
            if lower.starts_with("http://")
                || lower.starts_with("https://")
                || lower.starts_with("git@")
                || lower.contains("://")
            {
                return Err(ImageStoreError::Unsupported(format!(
                    "{what} {s}: sources from URLs are not supported (ember builds offline, from the context only)"
                )));
            }
        }
        let mut sources = Vec::new();
        for s in &list {
            sources.extend(context_sources(self.ctx, s)?);
        }
        let abs = self.image_path(&dest);
        let dest_is_dir = dest.ends_with('/') || dest.ends_with("/.") || dest == ".";
        if sources.len() > 1 && !dest_is_dir {
            return Err(ImageStoreError::Invalid(format!(
                "{what} with several sources needs a destination ending in '/'"
            )));
        }
        // Symlinks of the base (e.g. /bin -> usr/bin) are followed inside
        // the root, like Docker does.
        let target = resolve_in_rootfs(self.rootfs, &abs)?;
        let target_is_dir = dest_is_dir || fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir());
        for src in sources {
            let md = fs::symlink_metadata(&src).map_err(internal(src.display()))?;
            if md.is_dir() {
                copy_entry(&src, &target, o)?;
                continue;
            }
            if add && md.is_file() {
                match sniff_archive(&src) {
                    ArchiveKind::Tar => {
                        self.n_tmp += 1;
                        let x = self.tmp.join(format!("add-{}", self.n_tmp));
                        let f = File::open(&src).map_err(internal(src.display()))?;
                        archive::extract_sandboxed(
                            archive::ArchiveSource::File(f),
                            &x,
                            &ExtractLimits::default(),
                        )
                        .map_err(|e| {
                            let msg = format!("ADD {}: {e}", display_rel(self.ctx, &src));
                            match e {
                                archive::ArchiveError::Sandbox(_) => ImageStoreError::Internal(msg),
                                _ => ImageStoreError::Invalid(msg),
                            }
                        })?;
                        let r = copy_entry(&x, &target, o);
                        let _ = fs::remove_dir_all(&x);
                        r?;
                        continue;
                    }
                    ArchiveKind::Other(kind) => {
                        return Err(ImageStoreError::Unsupported(format!(
                            "ADD {}: {kind} archives are not supported (tar and tar.gz only)",
                            display_rel(self.ctx, &src)
                        )))
                    }
                    ArchiveKind::None => {}
                }
            }
            let dst = if target_is_dir {
                let name = src.file_name().ok_or_else(|| {
                    ImageStoreError::Invalid(format!("{what}: a source has no file name"))
                })?;
                target.join(name)
            } else {
                target.clone()
            };
            if let Some(p) = dst.parent() {
                ensure_dir(p, 0o755)?;
            }
            copy_entry(&src, &dst, o)?;
        }
        Ok(())
    }
}

/// `$VAR` / `${VAR}` expansion without word splitting (JSON forms).
fn expand_only(s: &str, vars: &BTreeMap<String, String>) -> String {
    let escaped = s.replace('\\', "\\\\").replace('"', "\\\"");
    words(&format!("\"{escaped}\""), vars)
        .ok()
        .and_then(|w| w.into_iter().next())
        .unwrap_or_else(|| s.to_string())
}

fn display_rel(ctx: &Path, p: &Path) -> String {
    let root = fs::canonicalize(ctx).unwrap_or_else(|_| ctx.to_path_buf());
    p.strip_prefix(&root).unwrap_or(p).display().to_string()
}

/// `/a/./b/../c/` → `/a/c`.
fn normalize_abs(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    use crate::images::store::test_util::{cat, context, debugfs, exists, store, tar_of, Tmp};

    #[test]
    fn build_from_scratch_then_from_it() {
        let t = Tmp::new("build");
        let s = store(&t);
        let df = "# a test image\n\
                  FROM scratch\n\
                  ENV A=1 \\\n    B=\"two words\"\n\
                  WORKDIR /app\n\
                  COPY hello.txt .\n\
                  COPY dir /opt/dir/\n\
                  COPY [\"hello.txt\", \"/etc/greeting\"]\n\
                  COPY *.md /docs/\n\
                  ENV C $A-x\n\
                  EXPOSE 80\n\
                  CMD [\"/app/run\", \"--flag\"]\n";
        let ctx = context(
            &[
                ("Dockerfile", df),
                ("hello.txt", "hello\n"),
                ("dir/a", "A\n"),
                ("dir/sub/b", "B\n"),
                ("x.md", "X\n"),
                ("y.md", "Y\n"),
            ],
            &[],
        );
        let mut lines = Vec::new();
        let rec = s
            .build(&ctx, "", "first:v1", &mut |l| lines.push(l.to_string()))
            .unwrap();
        assert_eq!(rec.name(), "first:v1");
        assert_eq!(rec.config.env, vec!["A=1", "B=two words", "C=1-x"]);
        assert_eq!(rec.config.cmd, vec!["/app/run", "--flag"]);
        assert_eq!(rec.config.workdir, "/app");
        let streams: Vec<String> = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["stream"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(streams[0], "Step 1/10 : FROM scratch\n");
        assert_eq!(streams[1], "Step 2/10 : ENV A=1     B=\"two words\"\n");
        assert!(streams.contains(&format!("Successfully built {}\n", rec.short_id())));
        assert_eq!(streams.last().unwrap(), "Successfully tagged first:v1\n");
        let img = s.open_image("first:v1").unwrap();
        assert_eq!(img.layers().len(), 1);
        assert_eq!(img.config.exposed_ports, vec!["80/tcp"]);

        let ext4 = t.0.join("first.ext4");
        assert!(s.rootfs_ext4("first:v1", &ext4, None).unwrap() > 0);
        assert_eq!(cat(&ext4, "/app/hello.txt"), "hello");
        assert_eq!(cat(&ext4, "/opt/dir/a"), "A");
        assert_eq!(cat(&ext4, "/opt/dir/sub/b"), "B");
        assert_eq!(cat(&ext4, "/etc/greeting"), "hello");
        assert_eq!(cat(&ext4, "/docs/x.md"), "X");
        assert_eq!(cat(&ext4, "/docs/y.md"), "Y");
        assert!(!exists(&ext4, "/Dockerfile"));

        // FROM the first image, with a Dockerfile elsewhere in the context.
        let df2 =
            "FROM first:v1\nCOPY new.txt ./\nCOPY hello.txt /app/hello.txt\nENTRYPOINT echo $A\n";
        let ctx2 = context(
            &[
                ("build/Custom", df2),
                ("new.txt", "new\n"),
                ("hello.txt", "changed\n"),
            ],
            &[],
        );
        let rec2 = s
            .build(&ctx2, "build/Custom", "second", &mut |_| {})
            .unwrap();
        assert_eq!(rec2.name(), "second:latest");
        assert_eq!(rec2.config.env, rec.config.env);
        assert_eq!(rec2.config.workdir, "/app");
        assert_eq!(rec2.config.entrypoint, vec!["/bin/sh", "-c", "echo $A"]);
        assert!(
            rec2.config.cmd.is_empty(),
            "ENTRYPOINT drops the inherited CMD"
        );
        let ext4b = t.0.join("second.ext4");
        s.rootfs_ext4("second", &ext4b, Some(8)).unwrap();
        assert_eq!(cat(&ext4b, "/app/new.txt"), "new");
        assert_eq!(cat(&ext4b, "/app/hello.txt"), "changed");
        assert_eq!(cat(&ext4b, "/opt/dir/sub/b"), "B");
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn build_refusals() {
        let t = Tmp::new("refuse");
        let s = store(&t);
        let build = |df: &str| {
            let ctx = context(&[("Dockerfile", df), ("f", "f\n")], &[]);
            s.build(&ctx, "Dockerfile", "x", &mut |_| {}).unwrap_err()
        };
        let e = build("FROM scratch\nCOPY f /f\nRUN make\n");
        assert!(matches!(e, ImageStoreError::Unsupported(_)));
        assert!(
            e.to_string().contains("line 3") && e.to_string().contains("RUN is not supported"),
            "{e}"
        );
        let e = build("FROM scratch\nADD https://example.com/x.tar /x\n");
        assert!(matches!(e, ImageStoreError::Unsupported(_)));
        assert!(
            e.to_string().contains("URL") && e.to_string().contains("line 2"),
            "{e}"
        );
        let e = build("FROM scratch\nCOPY ../x /x\n");
        assert!(matches!(e, ImageStoreError::Invalid(_)), "{e}");
        assert!(
            e.to_string().contains("outside the build context") && e.to_string().contains("line 2"),
            "{e}"
        );
        let e = build("FROM scratch\nCOPY missing /x\n");
        assert!(matches!(e, ImageStoreError::NotFound(_)), "{e}");
        let e = build("FROM nothere:1\n");
        assert!(matches!(e, ImageStoreError::NotFound(_)), "{e}");
        assert!(e.to_string().contains("no registry access"), "{e}");
        let e = build("FROM scratch\nCOPY --from=builder /a /b\n");
        assert!(matches!(e, ImageStoreError::Unsupported(_)), "{e}");
        let ctx = context(&[("f", "f\n")], &[]);
        assert!(matches!(
            s.build(&ctx, "", "x", &mut |_| {}),
            Err(ImageStoreError::Invalid(_))
        ));
        assert!(matches!(
            s.build(&ctx, "../Dockerfile", "x", &mut |_| {}),
            Err(ImageStoreError::Invalid(_))
        ));
        assert!(s.list().is_empty());
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn build_follows_base_symlinks_inside_the_root() {
        let t = Tmp::new("links");
        let s = store(&t);
        let root = t.0.join("base-rootfs");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).unwrap();
        // A link that tries to climb out of the root stays inside it.
        std::os::unix::fs::symlink("../../../../../../tmp/escape", root.join("esc")).unwrap();
        let dir = t.0.join("layout");
        oci::write_layout(&dir, &root, &ImageConfig::default(), "links:1").unwrap();
        s.import(&dir, None, None).unwrap();
        let df = "FROM links:1\nCOPY f /bin/\nCOPY f /lib/g\nCOPY f /esc/h\nWORKDIR /lib/w\n";
        let ctx = context(&[("Dockerfile", df), ("f", "F\n")], &[]);
        let rec = s.build(&ctx, "", "linked", &mut |_| {}).unwrap();
        assert_eq!(rec.config.workdir, "/lib/w");
        let ext4 = t.0.join("l.ext4");
        s.rootfs_ext4("linked", &ext4, None).unwrap();
        assert_eq!(cat(&ext4, "/usr/bin/f"), "F");
        assert_eq!(cat(&ext4, "/usr/lib/g"), "F");
        assert_eq!(cat(&ext4, "/tmp/escape/h"), "F");
        assert!(exists(&ext4, "/usr/lib/w"));
        assert!(debugfs(&ext4, "stat /bin").contains("Type: symlink"));
        assert!(debugfs(&ext4, "stat /lib").contains("Type: symlink"));
        assert!(!Path::new("/tmp/escape/h").exists());
    }

    #[test]
    fn build_add_extracts_tars() {
        let t = Tmp::new("add");
        let s = store(&t);
        let df = "FROM scratch\nADD files.tar.gz /srv/\nADD plain.tar /plain\nADD --chmod=755 note.txt /bin/note\n";
        let ctx = context(
            &[("Dockerfile", df), ("note.txt", "just a file\n")],
            &[
                (
                    "files.tar.gz",
                    tar_of(&[("inner/x", "X\n"), ("y", "Y\n")], true),
                ),
                ("plain.tar", tar_of(&[("p", "P\n")], false)),
            ],
        );
        s.build(&ctx, "", "added", &mut |_| {}).unwrap();
        let ext4 = t.0.join("add.ext4");
        s.rootfs_ext4("added", &ext4, None).unwrap();
        assert_eq!(cat(&ext4, "/srv/inner/x"), "X");
        assert_eq!(cat(&ext4, "/srv/y"), "Y");
        assert_eq!(cat(&ext4, "/plain/p"), "P");
        assert!(!exists(&ext4, "/srv/files.tar.gz"));
        assert_eq!(cat(&ext4, "/bin/note"), "just a file");
        assert!(debugfs(&ext4, "stat /bin/note").contains("Mode:  0755"));
    }
}
