//! Upgrading a node booted from the node image: its root file system goes to the root slot
//! that is not running, the node boots it on trial and keeps it only if it comes back
//! healthy (docs/image.md). The same records are the files `tesserad` and
//! `tessera-firstboot` hand to each other on the node (`/var/lib/tessera/upgrade/`).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Boots a new slot may take to come back healthy before the node goes back to the slot it
/// ran (systemd-boot's boot counting), by default.
pub const DEFAULT_UPGRADE_TRIES: u32 = 3;

/// The largest root file system image an upgrade takes (the slots are smaller still; the
/// node checks against its own).
pub const MAX_ROOT_IMAGE_BYTES: u64 = 16 << 30;

/// The query of `PUT /nodes/{id}/upgrade`; the body is the new image's root file system
/// (`tessera-root.img`, which `image/build` writes beside the disk image with its blake3
/// in `tessera-root.img.b3`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UpgradeQuery {
    /// Boots the new slot may take to come back healthy, 1-10 (default 3); after that
    /// many failed boots the node boots its old slot again by itself.
    #[serde(default)]
    #[param(minimum = 1, maximum = 10)]
    pub tries: Option<u32>,
    /// The image's blake3 (64 hex digits, as `b3sum` prints it; `image/build` writes it
    /// to `tessera-root.img.b3`). The node hashes the body as it arrives and keeps
    /// nothing unless they match: a corrupt or truncated image is refused (400).
    #[serde(default)]
    #[param(required = true, pattern = "^[0-9a-f]{64}$")]
    pub blake3: Option<String>,
}

/// Checks a blake3 given as text: 64 lowercase hex digits (`b3sum`'s form).
pub fn parse_blake3(text: &str) -> Result<[u8; 32], String> {
    let t = text.trim();
    if t.len() != 64 || !t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!(
            "{t:?} is not a blake3: 64 lowercase hex digits (as b3sum prints it)"
        ));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Where an upgrade is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeState {
    /// The image was received; the node is writing it to the other slot.
    Applying,
    /// Written; the node is rebooting into the new slot.
    Rebooting,
    /// Running the new slot on trial: not healthy yet.
    Trial,
    /// The new slot came back healthy and was marked good: the node keeps it.
    Good,
    /// The new slot never came back healthy; the node went back to the old one by itself.
    FellBack,
    /// The upgrade stopped before the reboot (`message` says why); the node runs as before.
    Failed,
}

/// The last upgrade of a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UpgradeRecord {
    pub state: UpgradeState,
    /// The slot (`a` or `b`) and release the node ran when the upgrade was asked for.
    pub from_slot: String,
    pub from_release: String,
    /// The slot written, and the new image's release once read from it.
    pub to_slot: String,
    #[serde(default)]
    pub to_release: Option<String>,
    /// Boots the new slot was given.
    pub tries: u32,
    /// Who asked for it.
    pub by: String,
    /// What happened last, for people.
    pub message: String,
    /// When the record last changed (ms since the epoch).
    pub updated_ms: u64,
}

/// A node's slots and its last upgrade (`GET /nodes/{id}/upgrade`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeUpgradeStatus {
    /// The node's id.
    pub node: String,
    /// The release running (`/etc/tessera-release` of the booted slot).
    pub release: String,
    /// The slot running, `a` or `b`.
    pub slot: String,
    /// The running slot is on trial (booted with a boot counter, not yet marked good).
    pub on_trial: bool,
    /// The last upgrade, if any.
    #[serde(default)]
    pub last: Option<UpgradeRecord>,
}

/// What `tesserad` hands to the node's upgrade service with the image
/// (`/var/lib/tessera/upgrade/request.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpgradeRequest {
    pub tries: u32,
    pub by: String,
    /// The image's size as received.
    pub bytes: u64,
    /// The image's blake3 (hex) as received and checked; the upgrade service checks it
    /// again before it writes anything.
    pub blake3: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_as_written() {
        let r = UpgradeRecord {
            state: UpgradeState::FellBack,
            from_slot: "b".into(),
            from_release: "n1".into(),
            to_slot: "a".into(),
            to_release: Some("n2".into()),
            tries: 3,
            by: "admin".into(),
            message: "slot a never came back healthy".into(),
            updated_ms: 1,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"state\":\"fell_back\""), "{text}");
        assert_eq!(serde_json::from_str::<UpgradeRecord>(&text).unwrap(), r);
    }

    #[test]
    fn tries_is_optional_and_nothing_else_is_taken() {
        let q: UpgradeQuery = serde_json::from_str("{\"tries\": 2}").unwrap();
        assert_eq!(q.tries, Some(2));
        let q: UpgradeQuery = serde_json::from_str("{}").unwrap();
        assert_eq!(q.tries, None);
        assert!(serde_json::from_str::<UpgradeQuery>("{\"trys\": 2}").is_err());
        let q: UpgradeQuery =
            serde_json::from_str(&format!("{{\"blake3\": \"{}\"}}", "ab".repeat(32))).unwrap();
        assert_eq!(q.blake3.as_deref(), Some("ab".repeat(32).as_str()));
    }

    #[test]
    fn a_blake3_is_64_lowercase_hex_digits() {
        let h = parse_blake3(&"0f".repeat(32)).unwrap();
        assert_eq!(h, [0x0f; 32]);
        for bad in [
            "",
            "0f",
            &"0F".repeat(32),
            &"0g".repeat(32),
            &"0f".repeat(33),
            "ä".repeat(64).as_str(),
        ] {
            assert!(parse_blake3(bad).is_err(), "{bad:?} taken");
        }
    }
}
