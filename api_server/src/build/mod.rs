//! Image compilers, named `base-lang-provider` as UniK names them. The
//! provider is always `ember`. Each compiler turns an extracted source tree
//! into a bootable kernel (and maybe an initrd).
//!
//! Run-time conventions shared by every base (see [`render_cmdline`]): the
//! kernel command line is `<image boot args> ember.mount=<mount point>:<n>...
//! KEY=VALUE... -- <args>`, where `<n>` is the index of the virtio block
//! device (in the order the devices are announced) that holds the volume for
//! that mount point.

pub mod ember;
pub mod kmod;
pub mod linux;
pub mod pod_initramfs;

use std::path::Path;
use std::sync::Arc;

use crate::sandbox::SandboxError;

/// The one provider ember offers.
pub const PROVIDER: &str = "ember";

/// Errors compiling an image.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("no source files found: {0}")]
    NoSources(String),
    #[error("{0}")]
    BadInput(String),
    #[error("compilation failed:\n{output}")]
    Failed { output: String },
    #[error("{tool} is not usable on this host: {msg}")]
    Tool { tool: String, msg: String },
    #[error("I/O error while compiling: {0}")]
    Io(#[from] std::io::Error),
}

/// Errors finding a compiler.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("unknown provider {given:?}; available providers: {available}")]
    Provider { given: String, available: String },
    #[error("unknown base {given:?} for provider ember; available bases: {available}")]
    Base { given: String, available: String },
    #[error("unknown lang {given:?} for base {base}; available langs: {available}")]
    Lang {
        given: String,
        base: String,
        available: String,
    },
}

/// What a compiler was given.
pub struct CompileInput<'a> {
    /// Extracted user sources.
    pub src_dir: &'a Path,
    /// Where the image files go.
    pub out_dir: &'a Path,
}

/// What a compiler produced (file names relative to `out_dir`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOutput {
    pub kernel: String,
    pub initrd: Option<String>,
    /// Kernel command line every instance of the image gets.
    pub boot_args: String,
    /// e.g. "elf-pvh" or "bzimage+initramfs".
    pub format: String,
    pub default_memory_mb: u32,
    /// Compiler diagnostics worth keeping.
    pub log: String,
}

/// One `base-lang-ember` compiler.
pub trait Compiler: Send + Sync {
    fn base(&self) -> &str;
    fn lang(&self) -> &str;
    /// Human text for `/describe_compiler`.
    fn description(&self) -> String;
    /// Builds the image. Runs on a worker thread; may take seconds.
    fn compile(&self, input: &CompileInput) -> Result<CompileOutput, CompileError>;
    /// `base-lang-provider`.
    fn name(&self) -> String {
        format!("{}-{}-{}", self.base(), self.lang(), PROVIDER)
    }
}

/// A set of compilers.
#[derive(Clone, Default)]
pub struct Registry {
    compilers: Vec<Arc<dyn Compiler>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a compiler.
    pub fn add(&mut self, c: Arc<dyn Compiler>) {
        self.compilers.push(c);
    }

    /// Sorted `base-lang-provider` names.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.compilers.iter().map(|c| c.name()).collect();
        v.sort();
        v
    }

    /// The compiler for (provider, base, lang), or why there is none.
    pub fn find(
        &self,
        provider: &str,
        base: &str,
        lang: &str,
    ) -> Result<Arc<dyn Compiler>, LookupError> {
        if provider != PROVIDER {
            return Err(LookupError::Provider {
                given: provider.into(),
                available: PROVIDER.into(),
            });
        }
        let mut bases: Vec<&str> = self.compilers.iter().map(|c| c.base()).collect();
        bases.sort();
        bases.dedup();
        if !bases.contains(&base) {
            return Err(LookupError::Base {
                given: base.into(),
                available: bases.join(", "),
            });
        }
        let mut langs: Vec<&str> = self
            .compilers
            .iter()
            .filter(|c| c.base() == base)
            .map(|c| c.lang())
            .collect();
        langs.sort();
        self.compilers
            .iter()
            .find(|c| c.base() == base && c.lang() == lang)
            .cloned()
            .ok_or_else(|| LookupError::Lang {
                given: lang.into(),
                base: base.into(),
                available: langs.join(", "),
            })
    }
}

/// A sandbox error as a compile error: what the user's build made (an
/// output that is too large, a result that is not a regular file) is the
/// user's error; everything else is the host's.
pub(crate) fn sandbox_error(tool: &str, e: SandboxError) -> CompileError {
    match e {
        SandboxError::OutputTooLarge { .. } | SandboxError::Result { .. } => CompileError::Failed {
            output: e.to_string(),
        },
        other => CompileError::Tool {
            tool: tool.into(),
            msg: other.to_string(),
        },
    }
}

/// The `linux` base: the user's program becomes `/init` of an initramfs for
/// a stock Linux kernel (found on the host, see [`linux::find_kernel`]).
pub struct LinuxCompiler {
    pub lang: linux::LinuxLang,
}

/// Kernel command line of `linux` images.
pub const LINUX_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd";

impl Compiler for LinuxCompiler {
    fn base(&self) -> &str {
        "linux"
    }
    fn lang(&self) -> &str {
        match self.lang {
            linux::LinuxLang::C => "c",
            linux::LinuxLang::Binary => "binary",
        }
    }
    fn description(&self) -> String {
        match self.lang {
            linux::LinuxLang::C => linux::DESCRIPTION_C.to_string(),
            linux::LinuxLang::Binary => linux::DESCRIPTION_BINARY.to_string(),
        }
    }
    fn compile(&self, input: &CompileInput) -> Result<CompileOutput, CompileError> {
        use linux::LinuxBuildError as E;
        // The kernel is the host's: found first, so the initramfs can carry
        // the modules it needs for ember's devices.
        let found = linux::find_kernel();
        let mut kmod_log = String::new();
        let modules = match &found {
            None => None,
            Some(k) => match kmod::closure(k, &kmod::modules_root()) {
                Ok(c) => {
                    kmod_log = format!(
                        "\nkernel modules ({}): {}",
                        c.version,
                        c.modules
                            .iter()
                            .map(|m| m.name.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                    Some(c)
                }
                // Not a Linux image (no version string): nothing to load.
                // A Linux kernel without its modules or a configuration
                // showing them built in is refused below (kmod's docs).
                Err(e @ kmod::KmodError::NoVersion(_)) => {
                    kmod_log = format!("\nno kernel modules packed: {e}");
                    None
                }
                Err(e) => {
                    return Err(CompileError::Tool {
                        tool: format!("the Linux kernel {}", k.display()),
                        msg: e.to_string(),
                    })
                }
            },
        };
        let info = linux::build_initramfs_with_modules(
            input.src_dir,
            self.lang,
            &input.out_dir.join("initrd.img"),
            modules.as_ref(),
        )
        .map_err(|e| match e {
            E::CompileFailed { output, .. } => CompileError::Failed { output },
            E::NoSources => CompileError::NoSources("no *.c files in the tarfile".into()),
            E::Gcc(err) => CompileError::Tool {
                tool: "gcc".into(),
                msg: err.to_string(),
            },
            E::Sandbox(err) => sandbox_error("gcc", err),
            E::Modules(err) => CompileError::Tool {
                tool: "the Linux kernel's modules".into(),
                msg: err.to_string(),
            },
            E::Io { .. } => CompileError::Io(std::io::Error::other(e.to_string())),
            other => CompileError::BadInput(other.to_string()),
        })?;
        // Copied in now so the image is complete.
        let mut log = info.log;
        log.push_str(&kmod_log);
        let kernel = match found {
            Some(k) => {
                std::fs::copy(&k, input.out_dir.join("vmlinuz"))?;
                log.push_str(&format!("\nkernel: {}", k.display()));
                "vmlinuz".to_string()
            }
            None => {
                log.push_str(&format!(
                    "\nno Linux kernel found (set {} or install one at {}); instances of this image cannot start until the image is rebuilt with one",
                    linux::KERNEL_ENV,
                    linux::KERNEL_PATH
                ));
                String::new()
            }
        };
        Ok(CompileOutput {
            kernel,
            initrd: Some("initrd.img".into()),
            boot_args: LINUX_BOOT_ARGS.into(),
            format: "bzimage+initramfs".into(),
            default_memory_mb: 128,
            log,
        })
    }
}

/// Every compiler this build of emberd offers.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.add(Arc::new(ember::EmberC::new()));
    r.add(Arc::new(LinuxCompiler {
        lang: linux::LinuxLang::C,
    }));
    r.add(Arc::new(LinuxCompiler {
        lang: linux::LinuxLang::Binary,
    }));
    r
}

/// Errors rendering a command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("{what} may not contain double quotes or control characters: {value:?}")]
    BadChar { what: &'static str, value: String },
}

fn quoted(what: &'static str, v: &str) -> Result<String, CmdlineError> {
    if v.contains('"') || v.chars().any(|c| c.is_control()) {
        return Err(CmdlineError::BadChar {
            what,
            value: v.into(),
        });
    }
    Ok(if v.is_empty() || v.contains(char::is_whitespace) {
        format!("\"{v}\"")
    } else {
        v.to_string()
    })
}

/// The instance's kernel command line (see the module docs). Env names must
/// already be validated.
pub fn render_cmdline(
    boot_args: &str,
    mounts: &[(String, usize)],
    env: &std::collections::BTreeMap<String, String>,
    args: &str,
) -> Result<String, CmdlineError> {
    let mut parts: Vec<String> = Vec::new();
    if !boot_args.trim().is_empty() {
        parts.push(boot_args.trim().to_string());
    }
    for (m, idx) in mounts {
        parts.push(format!("ember.mount={}:{idx}", quoted("mount point", m)?));
    }
    for (k, v) in env {
        parts.push(format!("{k}={}", quoted("environment value", v)?));
    }
    if !args.trim().is_empty() {
        if args.contains('"') || args.chars().any(|c| c.is_control()) {
            return Err(CmdlineError::BadChar {
                what: "args",
                value: args.into(),
            });
        }
        parts.push("--".into());
        parts.push(args.trim().to_string());
    }
    Ok(parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(&'static str, &'static str);
    impl Compiler for Fake {
        fn base(&self) -> &str {
            self.0
        }
        fn lang(&self) -> &str {
            self.1
        }
        fn description(&self) -> String {
            "fake".into()
        }
        fn compile(&self, _: &CompileInput) -> Result<CompileOutput, CompileError> {
            Err(CompileError::BadInput("fake".into()))
        }
    }

    #[test]
    fn lookup_lists_what_exists() {
        let mut r = Registry::new();
        r.add(Arc::new(Fake("ember", "c")));
        r.add(Arc::new(Fake("linux", "c")));
        r.add(Arc::new(Fake("linux", "binary")));
        assert_eq!(
            r.names(),
            vec!["ember-c-ember", "linux-binary-ember", "linux-c-ember"]
        );
        assert!(r.find("ember", "linux", "binary").is_ok());
        let e = r.find("qemu", "ember", "c").err().unwrap().to_string();
        assert!(e.contains("available providers: ember"), "{e}");
        let e = r.find("ember", "rump", "go").err().unwrap().to_string();
        assert!(e.contains("available bases: ember, linux"), "{e}");
        let e = r.find("ember", "linux", "go").err().unwrap().to_string();
        assert!(e.contains("available langs: binary, c"), "{e}");
    }

    #[test]
    fn cmdline_rendering() {
        let mut env = std::collections::BTreeMap::new();
        env.insert("GREETING".to_string(), "hello world".to_string());
        env.insert("N".to_string(), "3".to_string());
        let c = render_cmdline(
            "console=ttyS0",
            &[("/data".into(), 0), ("/logs".into(), 1)],
            &env,
            "a b",
        )
        .unwrap();
        assert_eq!(
            c,
            "console=ttyS0 ember.mount=/data:0 ember.mount=/logs:1 GREETING=\"hello world\" N=3 -- a b"
        );
        env.insert("BAD".into(), "x\"y".into());
        assert!(render_cmdline("", &[], &env, "").is_err());
    }
}
