//! The data partition's format. Both root slots share one data partition
//! (`/var/lib/tessera`: the store's volumes, `tesserad`'s replicated state and keys), so
//! after an upgrade falls back, or an administrator boots the other slot, an older release
//! can find data a newer one wrote. `data-format.json` on the partition records the
//! format the data is in and the release that wrote it; before `tessera-store` and
//! `tesserad` start, each boot checks it (`tessera-firstboot data-format`,
//! `tessera-data-format.service`): a release that finds a newer format than it reads
//! refuses, and neither daemon starts, so it never serves or changes data it cannot read.
//! Pure: the command in `main.rs` reads and writes the file.

use serde::{Deserialize, Serialize};

/// The record's file name, in the data partition's root.
pub const FILE: &str = "data-format.json";

/// The data format this release writes and reads. Raise it (and add the migration from
/// the one before) when a release changes what it keeps on the data partition in a way
/// older releases cannot read; docs/image.md says when a release may migrate.
pub const KNOWN: u32 = 1;

/// What `data-format.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatRecord {
    /// The format the data is in.
    pub format: u32,
    /// The release that wrote the record (`/etc/tessera-release`).
    pub release: String,
}

/// What the check decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The data is in this release's format: start.
    Keep,
    /// No record yet: write this one, then start.
    Write(FormatRecord),
}

/// Why the daemons must not start on this data partition.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error(
        "{file}: not a data format record ({why}); it is left as it is, and tessera-store \
         and tesserad do not start until it is fixed (docs/image.md, \"The data partition's format\")"
    )]
    Unreadable { file: String, why: String },
    #[error(
        "the data partition is in format {found} (written by release {by}); this release \
         ({release}) reads format {known} at most, so tessera-store and tesserad do not start: \
         a release must not serve or change data it cannot read. Boot release {by} or a newer \
         one again (docs/image.md, \"The data partition's format\")"
    )]
    Newer {
        found: u32,
        by: String,
        known: u32,
        release: String,
    },
    #[error(
        "the data partition is in format {found} (written by release {by}), older than this \
         release's {known}, and this release has no migration from it: tessera-store and \
         tesserad do not start"
    )]
    Older { found: u32, by: String, known: u32 },
}

/// Decides from the record's text (`None`: no record) whether a release that reads
/// formats up to `known` may start on the partition. `has_data`: the partition holds data
/// besides the record, which without a record was written before records existed, in
/// format 1.
pub fn decide(
    existing: Option<&str>,
    has_data: bool,
    known: u32,
    release: &str,
    file: &str,
) -> Result<Decision, FormatError> {
    let found = match existing {
        None if !has_data => {
            return Ok(Decision::Write(FormatRecord {
                format: known,
                release: release.to_string(),
            }))
        }
        None => FormatRecord {
            format: 1,
            release: "a release from before format records".into(),
        },
        Some(text) => {
            serde_json::from_str::<FormatRecord>(text).map_err(|e| FormatError::Unreadable {
                file: file.to_string(),
                why: e.to_string(),
            })?
        }
    };
    if found.format == 0 {
        return Err(FormatError::Unreadable {
            file: file.to_string(),
            why: "format 0 does not exist; formats start at 1".into(),
        });
    }
    match found.format.cmp(&known) {
        // Without a record the data is format 1: recorded as this release's from now on.
        std::cmp::Ordering::Equal if existing.is_none() => Ok(Decision::Write(FormatRecord {
            format: found.format,
            release: release.to_string(),
        })),
        std::cmp::Ordering::Equal => Ok(Decision::Keep),
        std::cmp::Ordering::Greater => Err(FormatError::Newer {
            found: found.format,
            by: found.release,
            known,
            release: release.to_string(),
        }),
        std::cmp::Ordering::Less => Err(FormatError::Older {
            found: found.format,
            by: found.release,
            known,
        }),
    }
}

/// The record's text as written (a line of JSON).
pub fn render(rec: &FormatRecord) -> String {
    let mut text = serde_json::to_string(rec).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: &str = "/var/lib/tessera/data-format.json";

    #[test]
    fn a_new_partition_gets_this_releases_format() {
        let d = decide(None, false, 1, "r1", F).unwrap();
        let rec = FormatRecord {
            format: 1,
            release: "r1".into(),
        };
        assert_eq!(d, Decision::Write(rec.clone()));
        // What is written reads back as the same format: kept at the next boot.
        assert_eq!(
            decide(Some(&render(&rec)), true, 1, "r1", F),
            Ok(Decision::Keep)
        );
    }

    #[test]
    fn data_from_before_records_is_format_one() {
        let want = FormatRecord {
            format: 1,
            release: "r1".into(),
        };
        assert_eq!(decide(None, true, 1, "r1", F), Ok(Decision::Write(want)));
        // A later release that reads only format 2 has no migration from 1 yet.
        assert!(matches!(
            decide(None, true, 2, "r2", F),
            Err(FormatError::Older { found: 1, .. })
        ));
        // On an empty partition it writes its own.
        assert!(matches!(decide(None, false, 2, "r2", F), Ok(Decision::Write(r)) if r.format == 2));
    }

    #[test]
    fn a_newer_format_is_refused_naming_both_releases() {
        let text = r#"{"format": 2, "release": "2027.01.10-abc"}"#;
        let e = decide(Some(text), true, 1, "2026.12.03-def", F).unwrap_err();
        assert!(matches!(
            e,
            FormatError::Newer {
                found: 2,
                known: 1,
                ..
            }
        ));
        let msg = e.to_string();
        for part in [
            "format 2",
            "2027.01.10-abc",
            "2026.12.03-def",
            "format 1 at most",
            "do not start",
        ] {
            assert!(msg.contains(part), "{part:?} not in {msg}");
        }
    }

    #[test]
    fn a_damaged_record_is_refused_and_named() {
        for text in [
            "",
            "{",
            r#"{"format": "1", "release": "r"}"#,
            r#"{"format": 1}"#,
            r#"{"format": 1, "release": "r", "extra": 1}"#,
            r#"{"format": 0, "release": "r"}"#,
        ] {
            let e = decide(Some(text), true, 1, "r1", F).unwrap_err();
            assert!(
                matches!(e, FormatError::Unreadable { .. }),
                "{text:?}: {e:?}"
            );
            assert!(e.to_string().contains(F), "{e}");
        }
    }
}
