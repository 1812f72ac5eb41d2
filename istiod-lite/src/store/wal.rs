//! Write-ahead log framing. Each record is `len: u32 LE | checksum: u64 LE | payload`, where the
//! payload is one JSON [`Record`]. A torn tail (crash mid-append) fails the length or checksum
//! check and is truncated away on open; everything before it was acknowledged and is kept.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write as _};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_config::ObjectKey;

/// A record larger than this is treated as corruption rather than allocated.
const MAX_RECORD: u32 = 16 << 20;

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum Record {
    Put { revision: u64, object: Value },
    Delete { revision: u64, key: ObjectKey },
}

impl Record {
    pub(crate) fn revision(&self) -> u64 {
        match self {
            Record::Put { revision, .. } | Record::Delete { revision, .. } => *revision,
        }
    }
}

/// FNV-1a 64: enough to detect a torn or garbled record; this is not an adversarial setting.
pub(crate) fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

pub(crate) fn encode(record: &Record, out: &mut Vec<u8>) {
    // Serializing a Record of plain data into JSON cannot fail.
    let payload = serde_json::to_vec(record).unwrap_or_default();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Reads every intact record and truncates the file after the last one.
pub(crate) fn replay(file: &mut File) -> io::Result<Vec<Record>> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut bytes)?;
    let mut records = Vec::new();
    let mut pos = 0usize;
    while bytes.len() - pos >= 12 {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4-byte slice"));
        let sum = u64::from_le_bytes(bytes[pos + 4..pos + 12].try_into().expect("8-byte slice"));
        let start = pos + 12;
        if len > MAX_RECORD || bytes.len() - start < len as usize {
            break;
        }
        let payload = &bytes[start..start + len as usize];
        if checksum(payload) != sum {
            break;
        }
        match serde_json::from_slice::<Record>(payload) {
            Ok(r) => records.push(r),
            Err(_) => break,
        }
        pos = start + len as usize;
    }
    if pos != bytes.len() {
        tracing::warn!(kept = pos, dropped = bytes.len() - pos, "truncating torn write-ahead log tail");
        file.set_len(pos as u64)?;
        file.sync_all()?;
    }
    file.seek(SeekFrom::End(0))?;
    Ok(records)
}

pub(crate) fn append(file: &mut File, bytes: &[u8]) -> io::Result<()> {
    file.write_all(bytes)?;
    file.sync_data()
}
