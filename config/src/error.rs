//! Validation errors that name the field path and the reason.

use std::fmt;

/// One problem with one field of a resource, e.g.
/// `spec.rules[0].from[0].source.ipBlocks[1]: "10.0.0.0/33" is not a CIDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted field path with `[i]` indices; empty for the whole object.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Why an object was rejected: which object (as far as it could be identified) and every field
/// problem found. Validation does not stop at the first error, so a user fixes a file in one pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Invalid {
    /// `Kind namespace/name`, or whatever part of it could be read.
    pub object: String,
    pub errors: Vec<FieldError>,
}

impl Invalid {
    pub fn single(object: impl Into<String>, path: impl Into<String>, reason: impl Into<String>) -> Self {
        Invalid { object: object.into(), errors: vec![FieldError { path: path.into(), reason: reason.into() }] }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            if self.object.is_empty() {
                write!(f, "{e}")?;
            } else {
                write!(f, "{}: {e}", self.object)?;
            }
        }
        Ok(())
    }
}

/// Collects field errors under a growing path. Keeps the validators short and uniform.
#[derive(Default)]
pub(crate) struct Errors {
    pub(crate) list: Vec<FieldError>,
}

impl Errors {
    pub(crate) fn add(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.list.push(FieldError { path: path.into(), reason: reason.into() });
    }
}
