//! Reading manifests: YAML or JSON, multi-document files, directories of them, or stdin.
//! Every object keeps its [`Source`] so errors can say exactly where the problem is.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::Invalid;
use crate::kind::Kind;
use crate::object::{describe, Object};

/// Largest manifest file accepted, so a stray binary or log file cannot exhaust memory.
pub const MAX_FILE_BYTES: u64 = 8 << 20;

/// Where an object came from: file (or `-` for stdin) and 1-based document number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub file: String,
    pub document: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file, self.document)
    }
}

#[derive(Clone, Debug)]
pub struct Loaded {
    pub source: Source,
    pub object: Object,
}

/// One rejected document or unreadable file.
#[derive(Clone, Debug)]
pub enum LoadError {
    Invalid { at: Source, invalid: Invalid },
    File { file: String, reason: String },
}

impl fmt::Display for LoadError {
    /// One line per field error, each prefixed with its source, so output greps well.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::File { file, reason } => write!(f, "{file}: {reason}"),
            LoadError::Invalid { at, invalid } => {
                for (i, line) in invalid.to_string().lines().enumerate() {
                    if i > 0 {
                        f.write_str("\n")?;
                    }
                    write!(f, "{at}: {line}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for LoadError {}

impl LoadError {
    fn invalid(source: &Source, invalid: Invalid) -> Self {
        LoadError::Invalid { at: source.clone(), invalid }
    }
}

/// Loads every manifest under `path` (a file, a directory walked recursively for
/// `.yaml`/`.yml`/`.json`, or `-` for stdin). Returns all objects or all errors: a caller that
/// writes nothing unless everything is valid needs the complete list.
pub fn load_path(path: &str, default_namespace: &str) -> Result<Vec<Loaded>, Vec<LoadError>> {
    let mut files = Vec::new();
    if path == "-" {
        let mut text = String::new();
        use std::io::Read;
        if let Err(e) = std::io::stdin().take(MAX_FILE_BYTES + 1).read_to_string(&mut text) {
            return Err(vec![LoadError::File { file: "-".into(), reason: format!("cannot read stdin: {e}") }]);
        }
        return load_text("-", &text, default_namespace);
    }
    if let Err(e) = collect_files(Path::new(path), &mut files) {
        return Err(vec![LoadError::File { file: path.into(), reason: e }]);
    }
    if files.is_empty() {
        return Err(vec![LoadError::File { file: path.into(), reason: "no .yaml, .yml or .json files found".into() }]);
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        let name = f.display().to_string();
        match std::fs::metadata(&f) {
            Ok(m) if m.len() > MAX_FILE_BYTES => {
                errors.push(LoadError::File {
                    file: name,
                    reason: format!("is larger than {} MiB", MAX_FILE_BYTES >> 20),
                });
                continue;
            }
            Err(e) => {
                errors.push(LoadError::File { file: name, reason: e.to_string() });
                continue;
            }
            _ => {}
        }
        match std::fs::read_to_string(&f) {
            Ok(text) => match load_text(&name, &text, default_namespace) {
                Ok(objs) => out.extend(objs),
                Err(errs) => errors.extend(errs),
            },
            Err(e) => errors.push(LoadError::File { file: name, reason: e.to_string() }),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<_> =
        std::fs::read_dir(path).map_err(|e| e.to_string())?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_files(&p, out)?;
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(p);
        }
    }
    Ok(())
}

/// The first key repeated within one map of `text` (YAML or JSON), as `(document, message)`.
/// The JSON value documents are read into keeps only the last of repeated keys, so a second
/// `rules:` would silently replace the first; serde_yaml's own value refuses them. Other parse
/// errors are left to the parse that follows, which reports them.
pub fn repeated_key(text: &str) -> Option<(usize, String)> {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match serde_yaml::Value::deserialize(doc) {
            Ok(_) => {}
            Err(e) if e.to_string().contains("duplicate entry") => return Some((i + 1, e.to_string())),
            Err(_) => return None,
        }
    }
    None
}

/// Parses a multi-document YAML (or JSON) text. Empty documents are skipped; `kind: List` is
/// expanded into its items.
pub fn load_text(file: &str, text: &str, default_namespace: &str) -> Result<Vec<Loaded>, Vec<LoadError>> {
    if let Some((document, why)) = repeated_key(text) {
        let source = Source { file: file.to_string(), document };
        return Err(vec![LoadError::invalid(&source, Invalid::single("", "", format!("malformed YAML: {why}")))]);
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let source = Source { file: file.to_string(), document: i + 1 };
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(LoadError::invalid(&source, Invalid::single("", "", format!("malformed YAML: {e}"))));
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        let items = match value.get("kind").and_then(Value::as_str) {
            Some("List") => match value.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => {
                    errors.push(LoadError::invalid(
                        &source,
                        Invalid::single("List", "items", "must be a list of objects"),
                    ));
                    continue;
                }
            },
            _ => vec![value],
        };
        for item in items {
            match parse_object(item, default_namespace) {
                Ok(object) => out.push(Loaded { source: source.clone(), object }),
                Err(invalid) => errors.push(LoadError::invalid(&source, invalid)),
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Parses one untyped object, defaulting the namespace of namespaced kinds.
pub fn parse_object(mut value: Value, default_namespace: &str) -> Result<Object, Invalid> {
    if !value.is_object() {
        return Err(Invalid::single("", "", format!("expected an object, found {}", type_name(&value))));
    }
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default();
    if let Ok(k) = Kind::from_api(api_version, kind) {
        if k.namespaced() {
            if let Some(Value::Object(meta)) = value.get_mut("metadata") {
                meta.entry("namespace").or_insert_with(|| Value::String(default_namespace.to_string()));
            }
        }
    }
    let label = describe(&value);
    Object::from_value(value).map_err(|mut e| {
        e.object = label;
        e
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
