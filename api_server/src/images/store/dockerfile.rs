//! The Dockerfile parser: splitting a Dockerfile into steps, and the
//! shell-like word splitting and `$VAR` expansion of arguments.

use std::collections::BTreeMap;

use super::{ImageStoreError, Result};

/// One instruction (continuations joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Step {
    /// Line where it starts (1-based).
    pub(super) line: usize,
    /// Upper-case keyword.
    pub(super) keyword: String,
    /// Everything after the keyword, trimmed.
    pub(super) args: String,
    /// `KEYWORD args`, for progress.
    pub(super) text: String,
}

const SUPPORTED: &[&str] = &[
    "FROM",
    "COPY",
    "ADD",
    "ENV",
    "CMD",
    "ENTRYPOINT",
    "WORKDIR",
    "LABEL",
    "EXPOSE",
    "USER",
    "VOLUME",
    "STOPSIGNAL",
    "ARG",
    "MAINTAINER",
];

/// Splits a Dockerfile into steps and checks every instruction is one the
/// builder supports (so nothing is done for a file that would fail).
pub(super) fn parse_dockerfile(text: &str) -> Result<Vec<Step>> {
    let mut raw: Vec<(usize, String)> = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_none()) {
            continue;
        }
        if t.is_empty() {
            continue; // a blank line inside a continuation
        }
        let line = line.trim_end();
        let (piece, cont) = match line.strip_suffix('\\') {
            Some(p) => (p, true),
            None => (line, false),
        };
        match &mut cur {
            None => cur = Some((n + 1, piece.trim_start().to_string())),
            Some((_, s)) => s.push_str(piece),
        }
        if !cont {
            raw.extend(cur.take());
        }
    }
    raw.extend(cur.take());

    let mut steps = Vec::new();
    let mut froms = 0;
    for (line, s) in raw {
        let (kw, args) = match s.find(char::is_whitespace) {
            Some(i) => (&s[..i], s[i..].trim()),
            None => (s.as_str(), ""),
        };
        let keyword = kw.to_ascii_uppercase();
        let at = |m: String| ImageStoreError::Unsupported(format!("Dockerfile line {line}: {m}"));
        match keyword.as_str() {
            "RUN" => {
                return Err(at(
                    "RUN is not supported: ember builds without running containers".into(),
                ))
            }
            "HEALTHCHECK" | "SHELL" | "ONBUILD" => {
                return Err(at(format!(
                "{keyword} is not supported by ember's builder (no containers run during builds)"
            )))
            }
            k if SUPPORTED.contains(&k) => {}
            _ => {
                return Err(ImageStoreError::Invalid(format!(
                    "Dockerfile line {line}: unknown instruction {kw:?}"
                )))
            }
        }
        if keyword == "FROM" {
            froms += 1;
            if froms > 1 {
                return Err(at(
                    "multi-stage builds (a second FROM) are not supported".into()
                ));
            }
        } else if froms == 0 && keyword != "ARG" {
            return Err(ImageStoreError::Invalid(format!(
                "Dockerfile line {line}: {keyword} before FROM (a Dockerfile starts with FROM)"
            )));
        }
        steps.push(Step {
            line,
            text: if args.is_empty() {
                keyword.clone()
            } else {
                format!("{keyword} {args}")
            },
            keyword,
            args: args.to_string(),
        });
    }
    if froms == 0 {
        return Err(ImageStoreError::Invalid(
            "the Dockerfile has no FROM".into(),
        ));
    }
    Ok(steps)
}

/// The JSON (exec) form, if `args` is one: a JSON array of strings.
pub(super) fn json_form(args: &str) -> Option<Vec<String>> {
    if !args.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(args).ok()
}

/// Splits `s` into words like Docker's shell lexer: whitespace separates,
/// `'...'` is literal, `"..."` and bare words expand `$VAR` / `${VAR}`
/// (unset: empty) and take `\` escapes.
pub(super) fn words(s: &str, vars: &BTreeMap<String, String>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars().peekable();
    let expand = |chars: &mut std::iter::Peekable<std::str::Chars>,
                  cur: &mut String|
     -> Result<()> {
        let name: String = if chars.peek() == Some(&'{') {
            chars.next();
            let mut n = String::new();
            loop {
                match chars.next() {
                    Some('}') => break,
                    Some(c) => n.push(c),
                    None => return Err(ImageStoreError::Invalid(format!("missing '}}' in {s:?}"))),
                }
            }
            n
        } else {
            let mut n = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    n.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            if n.is_empty() {
                cur.push('$');
                return Ok(());
            }
            n
        };
        // ${VAR:-default} and ${VAR:+alt}
        let value = if let Some((n, d)) = name.split_once(":-") {
            vars.get(n)
                .filter(|v| !v.is_empty())
                .cloned()
                .unwrap_or_else(|| d.to_string())
        } else if let Some((n, a)) = name.split_once(":+") {
            if vars.get(n).is_some_and(|v| !v.is_empty()) {
                a.to_string()
            } else {
                String::new()
            }
        } else {
            vars.get(&name).cloned().unwrap_or_default()
        };
        cur.push_str(&value);
        Ok(())
    };
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => {
                            return Err(ImageStoreError::Invalid(format!(
                                "unterminated quote in {s:?}"
                            )))
                        }
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => {
                            if let Some(n) = chars.next() {
                                cur.push(n);
                            }
                        }
                        Some('$') => expand(&mut chars, &mut cur)?,
                        Some(c) => cur.push(c),
                        None => {
                            return Err(ImageStoreError::Invalid(format!(
                                "unterminated quote in {s:?}"
                            )))
                        }
                    }
                }
            }
            '$' => {
                in_word = true;
                expand(&mut chars, &mut cur)?;
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// Exec form as is, shell form as `/bin/sh -c <args>`.
pub(super) fn command_form(args: &str) -> Vec<String> {
    match json_form(args) {
        Some(v) => v,
        None if args.is_empty() => Vec::new(),
        None => vec!["/bin/sh".into(), "-c".into(), args.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::store::paths::wildcard;

    #[test]
    fn dockerfile_parsing() {
        let df = "# c\n\nFROM scratch\nENV A=1 \\\n  # inner comment\n  B=2\nCMD echo hi\n";
        let s = parse_dockerfile(df).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!((s[1].line, s[1].keyword.as_str()), (4, "ENV"));
        assert_eq!(s[1].args, "A=1   B=2");
        assert_eq!(s[2].line, 7);
        let e = parse_dockerfile("FROM scratch\n\nrun make\n").unwrap_err();
        assert!(matches!(e, ImageStoreError::Unsupported(_)));
        assert_eq!(
            e.to_string(),
            "Dockerfile line 3: RUN is not supported: ember builds without running containers"
        );
        assert!(parse_dockerfile("COPY a b\n").is_err());
        assert!(parse_dockerfile("FROM scratch\nFROM scratch\n").is_err());
        assert!(matches!(
            parse_dockerfile("FROM scratch\nFOO x\n"),
            Err(ImageStoreError::Invalid(_))
        ));
        let mut v = BTreeMap::new();
        v.insert("A".to_string(), "1".to_string());
        assert_eq!(
            words(r#"x=$A "y ${A}" 'z $A' \$A ${B:-d}"#, &v).unwrap(),
            vec!["x=1", "y 1", "z $A", "$A", "d"]
        );
        assert_eq!(command_form(r#"["a", "b"]"#), vec!["a", "b"]);
        assert_eq!(command_form("echo hi"), vec!["/bin/sh", "-c", "echo hi"]);
        assert!(wildcard(b"*.txt", b"a.txt") && !wildcard(b"*.txt", b"a.txz"));
    }
}
