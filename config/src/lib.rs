//! The Trellis resource model.
//!
//! Resources are Kubernetes-shaped (`apiVersion`, `kind`, `metadata`, `spec`, `status`). This crate
//! owns the typed kinds, the parsing of YAML/JSON documents with their source positions, and the
//! validation that decides what may enter the store. It does no I/O beyond reading the files it is
//! asked to load, so `meshctl` and `istiod-lite` share one definition of "valid".

pub mod duration;
pub mod error;
pub mod kind;
pub mod load;
pub mod mesh;
pub mod meta;
pub mod object;
pub mod selector;
pub mod types;
mod validate;

pub use error::{FieldError, Invalid};
pub use kind::Kind;
pub use meta::{ObjectKey, ObjectMeta, OwnerReference};
pub use object::Object;
