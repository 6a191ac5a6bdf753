//! VM NICs and their MACs. A NIC is a network and a MAC; the MAC is the caller's or
//! assigned from the cluster's own locally administered prefix (derived from the cluster
//! id, so two clusters on one LAN draw from different prefixes), and it is unique in the
//! cluster: a VM claims each MAC (`mac_claims/<mac>` = `<vm>/<nic index>`) in the same
//! compare-and-swap that creates or changes it, as it claims its volumes. The MAC is part
//! of the VM's record, so it stays the same across restarts and moves to other nodes.

use std::collections::BTreeSet;

use rand::Rng;
use tessera_api::{NewNic, Nic, Vm};
use tessera_state::Require;

use super::{del, put, ApiError};

/// `mac_claims/<mac>`: `"<vm>/<nic index>"`, the NIC that holds the MAC.
pub const MAC_CLAIMS: &str = "mac_claims";

/// The cluster's 3-byte MAC prefix: locally administered, unicast (the low two bits of the
/// first byte are `10`), the rest from a hash of the cluster id.
pub fn prefix(cluster_id: &str) -> [u8; 3] {
    let h = blake3::hash(cluster_id.as_bytes());
    let b = h.as_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2]]
}

/// `xx:xx:xx:xx:xx:xx`, lower case.
pub fn format(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `xx:xx:xx:xx:xx:xx` (either case); `None` if it is not one.
pub fn parse(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The NICs a request asks for: `nics`, or `networks` as NICs without MACs; both is 400.
pub fn requested(networks: &[String], nics: &[NewNic]) -> Result<Vec<NewNic>, ApiError> {
    if !networks.is_empty() && !nics.is_empty() {
        return Err(ApiError::bad(
            "nics: give nics or networks (its shorthand), not both",
        ));
    }
    if !nics.is_empty() {
        return Ok(nics.to_vec());
    }
    Ok(networks
        .iter()
        .map(|n| NewNic {
            network: n.clone(),
            mac: None,
        })
        .collect())
}

/// The NICs of a VM from `wanted`: a given MAC as given (checked), a NIC without one
/// keeps the MAC `old` had at the same place on the same network, else gets a fresh one
/// from `prefix` that no NIC in `taken` (every MAC of the cluster) nor this VM has.
pub fn assign(
    wanted: &[NewNic],
    old: &[Nic],
    prefix: [u8; 3],
    taken: &BTreeSet<String>,
    rng: &mut impl Rng,
) -> Result<Vec<Nic>, ApiError> {
    let mut mine = BTreeSet::new();
    let mut out = Vec::with_capacity(wanted.len());
    // Given MACs first, so a fresh one never takes a MAC the request names later.
    for w in wanted {
        if let Some(m) = &w.mac {
            let mac = parse(m).ok_or_else(|| {
                ApiError::bad(format!("nics: MAC {m:?}: expected xx:xx:xx:xx:xx:xx"))
            })?;
            if mac[0] & 1 != 0 || mac == [0; 6] {
                return Err(ApiError::bad(format!(
                    "nics: MAC {m}: must be a unicast, non-zero address"
                )));
            }
            if !mine.insert(format(&mac)) {
                return Err(ApiError::bad(format!("nics: MAC {m} is given twice")));
            }
        }
    }
    for (i, w) in wanted.iter().enumerate() {
        let mac = match (&w.mac, old.get(i)) {
            (Some(m), _) => parse(m).map(|m| format(&m)).unwrap_or_default(),
            (None, Some(o)) if o.network == w.network && !mine.contains(&o.mac) => {
                mine.insert(o.mac.clone());
                o.mac.clone()
            }
            (None, _) => loop {
                let tail: [u8; 3] = rng.gen();
                let m = format(&[prefix[0], prefix[1], prefix[2], tail[0], tail[1], tail[2]]);
                // An old MAC of this VM that it gives up counts as free: the same
                // transaction releases it.
                if !mine.contains(&m) && (!taken.contains(&m) || old.iter().any(|o| o.mac == m)) {
                    mine.insert(m.clone());
                    break m;
                }
            },
        };
        out.push(Nic {
            network: w.network.clone(),
            mac,
        });
    }
    Ok(out)
}

/// MACs for a record saved before NICs had them (`networks` without `nics`, by an older
/// release): a NIC per network, in order, each keeping a MAC it already has at that place
/// on that network, the others fresh (as [`assign`]); `None` for a record that has them.
/// The start that calls it claims them in its own commit ([`claims`]).
pub fn migrate(
    networks: &[String],
    nics: &[Nic],
    prefix: [u8; 3],
    taken: &BTreeSet<String>,
    rng: &mut impl Rng,
) -> Result<Option<Vec<Nic>>, ApiError> {
    if nics.len() == networks.len() {
        return Ok(None);
    }
    assign(&requested(networks, &[])?, nics, prefix, taken, rng).map(Some)
}

/// The requirements and operations that move the MAC claims of VM `name` from `old` to
/// `new` NICs: a MAC new to the VM must be unclaimed at commit time.
pub fn claims(name: &str, old: &[Nic], new: &[Nic]) -> (Vec<Require>, Vec<tessera_state::Command>) {
    let (mut require, mut ops) = (Vec::new(), Vec::new());
    for (i, nic) in new.iter().enumerate() {
        if !old.iter().any(|o| o.mac == nic.mac) {
            require.push(Require::absent(MAC_CLAIMS, &nic.mac));
        }
        ops.push(put(MAC_CLAIMS, &nic.mac, format!("{name}/{i}")));
    }
    for o in old.iter().filter(|o| !new.iter().any(|n| n.mac == o.mac)) {
        ops.push(del(MAC_CLAIMS, &o.mac));
    }
    (require, ops)
}

/// Every MAC claimed in the cluster.
pub fn taken(n: &tessera_state::Node) -> BTreeSet<String> {
    n.state.read(|t| {
        t.get(MAC_CLAIMS)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    })
}

/// Sets `vm.nics` (and `vm.networks`, its names) from `wanted`.
pub fn set(
    vm: &mut Vm,
    wanted: &[NewNic],
    old: &[Nic],
    cluster_id: &str,
    taken: &BTreeSet<String>,
) -> Result<(), ApiError> {
    if wanted.len() > tessera_api::limits::MAX_NETWORKS {
        return Err(ApiError::bad("nics: at most 8"));
    }
    vm.nics = assign(
        wanted,
        old,
        prefix(cluster_id),
        taken,
        &mut rand::thread_rng(),
    )?;
    vm.networks = vm.nics.iter().map(|n| n.network.clone()).collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(net: &str, mac: Option<&str>) -> NewNic {
        NewNic {
            network: net.into(),
            mac: mac.map(String::from),
        }
    }

    #[test]
    fn the_prefix_is_locally_administered_unicast_and_per_cluster() {
        for id in ["a", "b", "cluster-1234"] {
            let p = prefix(id);
            assert_eq!(p[0] & 3, 2, "{id}: {p:?}");
            assert_eq!(p, prefix(id));
        }
        assert_ne!(prefix("a"), prefix("b"));
        assert_eq!(
            parse("52:54:00:AB:cd:01"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 1])
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "5254:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn macs_are_unique_kept_in_place_and_checked() {
        let mut rng = rand::thread_rng();
        let p = prefix("c");
        let taken = BTreeSet::new();
        let wanted = vec![
            nic("lan", None),
            nic("lan", None),
            nic("dmz", Some("02:00:00:00:00:07")),
        ];
        let first = assign(&wanted, &[], p, &taken, &mut rng).unwrap();
        assert_eq!(first.len(), 3);
        assert_ne!(first[0].mac, first[1].mac);
        assert!(first[0]
            .mac
            .starts_with(&format(&[p[0], p[1], p[2], 0, 0, 0])[..8]));
        assert_eq!(first[2].mac, "02:00:00:00:00:07");
        // Same place, same network: same MAC; a NIC moved to another network: a new one.
        let again = assign(
            &[nic("lan", None), nic("dmz", None)],
            &first,
            p,
            &taken,
            &mut rng,
        )
        .unwrap();
        assert_eq!(again[0].mac, first[0].mac);
        assert_ne!(again[1].mac, first[1].mac);
        // Refused: a multicast, zero, malformed or repeated MAC.
        for bad in [
            vec![nic("lan", Some("01:00:00:00:00:01"))],
            vec![nic("lan", Some("00:00:00:00:00:00"))],
            vec![nic("lan", Some("nope"))],
            vec![
                nic("lan", Some("02:00:00:00:00:01")),
                nic("lan", Some("02:00:00:00:00:01")),
            ],
        ] {
            assert!(assign(&bad, &[], p, &taken, &mut rng).is_err(), "{bad:?}");
        }
        // A fresh MAC avoids every claimed one: with all but one tail taken in a tiny
        // space this would loop forever, so check the rule on a sample instead.
        let taken: BTreeSet<String> = first.iter().map(|n| n.mac.clone()).collect();
        for _ in 0..200 {
            let n = assign(&[nic("lan", None)], &[], p, &taken, &mut rng).unwrap();
            assert!(!taken.contains(&n[0].mac));
        }
        // An old record's networks get MACs (a free one each), a current record none.
        let nets = vec!["lan".to_string(), "dmz".to_string()];
        let given = migrate(&nets, &[], p, &taken, &mut rng).unwrap().unwrap();
        assert_eq!(given.len(), 2);
        assert_eq!(
            (given[0].network.as_str(), given[1].network.as_str()),
            ("lan", "dmz")
        );
        assert!(given
            .iter()
            .all(|n| !taken.contains(&n.mac) && parse(&n.mac).is_some()));
        assert_ne!(given[0].mac, given[1].mac);
        assert_eq!(migrate(&nets, &given, p, &taken, &mut rng).unwrap(), None);
        // One NIC already there: kept in place, the missing one added.
        let half = migrate(&nets, &given[..1], p, &taken, &mut rng)
            .unwrap()
            .unwrap();
        assert_eq!(half[0], given[0]);
        assert_eq!(half[1].network, "dmz");
        // Claims: new MACs must be free; dropped ones are released.
        let (req, ops) = claims("web", &first, &again);
        assert_eq!(req.len(), 1, "only the new MAC is required absent");
        assert_eq!(
            ops.len(),
            4,
            "two claims put, the two dropped MACs released"
        );
    }
}
