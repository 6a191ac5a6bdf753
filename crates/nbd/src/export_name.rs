//! An export name may carry a credential after a `#`: `vol#CREDENTIAL`. NBD has no other
//! field a client fills in at negotiation, so a client that must prove something to the
//! exports (Tessera's VMM: that it is the VM's own VMM, issue #8) says it there. The
//! server never shows that part: its logs and its messages name the export without it.
//! What the credential means is the exports' business; this crate only splits it off.

/// Where the credential starts.
pub const CREDENTIAL_MARK: char = '#';

/// The export's own name and the credential after [`CREDENTIAL_MARK`], if any (an empty
/// one is none).
pub fn split(name: &str) -> (&str, Option<&str>) {
    match name.split_once(CREDENTIAL_MARK) {
        Some((export, credential)) if !credential.is_empty() => (export, Some(credential)),
        Some((export, _)) => (export, None),
        None => (name, None),
    }
}

/// The name to show in logs and messages: without its credential.
pub fn shown(name: &str) -> &str {
    split(name).0
}

/// `export` with `credential` after the mark, as a client sends it.
pub fn with_credential(export: &str, credential: &str) -> String {
    format!("{export}{CREDENTIAL_MARK}{credential}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credential_is_split_off_and_never_shown() {
        let sent = with_credential("vol-1", "c0ffee");
        assert_eq!(sent, "vol-1#c0ffee");
        assert_eq!(split(&sent), ("vol-1", Some("c0ffee")));
        assert_eq!(shown(&sent), "vol-1");
        assert_eq!(split("vol-1"), ("vol-1", None));
        assert_eq!(split("vol-1@snap"), ("vol-1@snap", None));
        assert_eq!(split("vol-1#"), ("vol-1", None));
        // Only the first mark splits: the credential is the rest, whatever it holds.
        assert_eq!(split("v#a#b"), ("v", Some("a#b")));
    }
}
