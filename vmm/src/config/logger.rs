//! `PUT /logger`: where ember-vmm's log goes and what it shows, in
//! Firecracker's shape. The logger itself is [`crate::logger`].

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Errors in a `/logger` request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoggerConfigError {
    /// The log file or FIFO cannot be opened.
    #[error("Failed to open the log file {path}: {msg}")]
    Open {
        /// The path given.
        path: String,
        /// Why it failed.
        msg: String,
    },
    /// `module` is empty or not a Rust module path.
    #[error("Invalid module filter {0:?}: expected a module path such as \"vmm::api\".")]
    Module(String),
}

/// A log level; parsed case-insensitively as Firecracker does
/// (`Error`, `Warning` or `Warn`, `Info`, `Debug`, `Trace`, `Off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoggerLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warning,
    /// The default.
    #[default]
    Info,
    /// More.
    Debug,
    /// Everything.
    Trace,
}

impl LoggerLevel {
    /// Parses a level name, case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "off" => LoggerLevel::Off,
            "error" => LoggerLevel::Error,
            "warning" | "warn" => LoggerLevel::Warning,
            "info" => LoggerLevel::Info,
            "debug" => LoggerLevel::Debug,
            "trace" => LoggerLevel::Trace,
            _ => return None,
        })
    }

    /// The `log` crate's filter for this level.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LoggerLevel::Off => log::LevelFilter::Off,
            LoggerLevel::Error => log::LevelFilter::Error,
            LoggerLevel::Warning => log::LevelFilter::Warn,
            LoggerLevel::Info => log::LevelFilter::Info,
            LoggerLevel::Debug => log::LevelFilter::Debug,
            LoggerLevel::Trace => log::LevelFilter::Trace,
        }
    }

    fn name(self) -> &'static str {
        match self {
            LoggerLevel::Off => "Off",
            LoggerLevel::Error => "Error",
            LoggerLevel::Warning => "Warning",
            LoggerLevel::Info => "Info",
            LoggerLevel::Debug => "Debug",
            LoggerLevel::Trace => "Trace",
        }
    }
}

impl Serialize for LoggerLevel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for LoggerLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        LoggerLevel::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown log level {s:?}: expected one of Error, Warning, Info, Debug, Trace, Off"
            ))
        })
    }
}

/// `PUT /logger`. Absent fields keep their current value.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// A file or named pipe; opened for appending, without blocking on a
    /// FIFO that has no reader yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Level filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LoggerLevel>,
    /// Prefix each line with its level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix each line with its source file and line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only lines from this module path (and below) are written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl LoggerConfig {
    /// Checks the module filter (the file is opened when applied).
    pub fn validate(&self) -> Result<(), LoggerConfigError> {
        if let Some(m) = &self.module {
            let ok = !m.is_empty()
                && m.len() <= 256
                && m.split("::").all(|p| {
                    !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
            if !ok {
                return Err(LoggerConfigError::Module(m.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_case_insensitive() {
        let c: LoggerConfig =
            serde_json::from_str(r#"{"level":"debug","log_path":"/x","show_level":true}"#).unwrap();
        assert_eq!(c.level, Some(LoggerLevel::Debug));
        let c: LoggerConfig = serde_json::from_str(r#"{"level":"WARN"}"#).unwrap();
        assert_eq!(c.level, Some(LoggerLevel::Warning));
        assert!(serde_json::from_str::<LoggerConfig>(r#"{"level":"loud"}"#).is_err());
        assert!(serde_json::from_str::<LoggerConfig>(r#"{"colour":true}"#).is_err());
        assert_eq!(
            serde_json::to_value(LoggerLevel::Warning).unwrap(),
            "Warning"
        );
    }

    #[test]
    fn module_filter_is_checked() {
        let m = |s: &str| LoggerConfig {
            module: Some(s.into()),
            ..Default::default()
        };
        m("vmm::api").validate().unwrap();
        assert!(m("").validate().is_err());
        assert!(m("a::").validate().is_err());
        assert!(m("a b").validate().is_err());
    }
}
