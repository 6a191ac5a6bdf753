//! An untagged network's uplink against a real kernel, in a network namespace of each
//! test's own, checked with `ip -j` and `bridge -j`: the interface the operator named
//! becomes an up port of the network's bridge and nothing else about it changes; a
//! second pass changes nothing; deleting the network releases it (it stays, as it was
//! made); an uplink that is missing, carries addresses or is another bridge's port is
//! refused with the reason and left exactly as it was, while a good network next to it is
//! set up. Needs root; prints SKIP without it.
// Helpers outside `#[test]`s unwrap too: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use tessera_hostnet::NetworkError;

#[test]
fn an_untagged_uplink_becomes_a_port_of_the_bridge_and_is_released_with_it() {
    let test = "an_untagged_uplink_becomes_a_port_of_the_bridge_and_is_released_with_it";
    in_fresh_netns(test, |rt| {
        uplink("wire0");
        let before = ip_link("wire0").unwrap();
        assert!(!is_up(&before), "{before}");
        let want = [net("lan", None, Some("wire0"))];
        let r = run(rt, &want);
        let lan = r.network("lan").unwrap();
        assert_eq!(lan.result, Ok(()), "{r:?}");
        assert!(
            lan.changes.iter().any(|c| c == "attach wire0 to tsb-lan"),
            "{lan:?}"
        );
        let w = ip_link("wire0").unwrap();
        assert_eq!(w["master"], "tsb-lan", "{w}");
        assert!(is_up(&w), "{w}");
        assert_eq!(bridge_master_of("wire0").as_deref(), Some("tsb-lan"));
        // Attached and up, nothing else: its name, address and (absent) alias stay.
        assert_eq!(w["address"], before["address"], "{w}");
        assert!(w.get("ifalias").is_none(), "{w}");

        let settled = snapshot();
        let again = run(rt, &want);
        assert!(again.unchanged(), "{again:?}");
        assert_eq!(snapshot(), settled);

        // Someone detaches it: the next pass attaches it again.
        sh(&["ip", "link", "set", "wire0", "nomaster"]);
        let r = run(rt, &want);
        assert_eq!(r.network("lan").unwrap().result, Ok(()));
        assert_eq!(ip_link("wire0").unwrap()["master"], "tsb-lan");

        // The network goes: its bridge goes, the uplink is released and stays.
        let r = run(rt, &[]);
        assert!(r.removed.iter().all(|(_, res)| res.is_ok()), "{r:?}");
        assert!(ip_link("tsb-lan").is_none());
        let w = ip_link("wire0").expect("the uplink is never deleted");
        assert!(w.get("master").is_none(), "{w}");
        assert_eq!(bridge_master_of("wire0"), None);
    });
}

#[test]
fn an_uplink_that_would_break_something_is_refused_and_left_as_it_was() {
    let test = "an_uplink_that_would_break_something_is_refused_and_left_as_it_was";
    in_fresh_netns(test, |rt| {
        // The management interface: an address that would stop working on a bridge port.
        uplink("mgmt0");
        sh(&["ip", "addr", "add", "10.9.9.1/24", "dev", "mgmt0"]);
        sh(&["ip", "link", "set", "mgmt0", "up"]);
        // A port of someone else's bridge.
        uplink("taken0");
        sh(&["ip", "link", "add", "br-admin", "type", "bridge"]);
        sh(&["ip", "link", "set", "taken0", "master", "br-admin"]);
        uplink("wire0");
        let before = snapshot();

        let r = run(
            rt,
            &[
                net("mgmt", None, Some("mgmt0")),
                net("stolen", None, Some("taken0")),
                net("typo", None, Some("wire9")),
                net("good", None, Some("wire0")),
            ],
        );
        let err = |n: &str| r.network(n).unwrap().result.clone().unwrap_err();
        match err("mgmt") {
            NetworkError::UplinkUnusable { uplink, why } => {
                assert_eq!(uplink, "mgmt0");
                assert!(why.contains("10.9.9.1/24"), "{why}");
            }
            e => panic!("{e:?}"),
        }
        assert!(
            err("stolen").to_string().contains("port of br-admin"),
            "{}",
            err("stolen")
        );
        assert_eq!(
            err("typo").to_string(),
            "uplink wire9: no such interface on this node"
        );
        assert_eq!(r.network("good").unwrap().result, Ok(()));

        // The refused networks made nothing, and their uplinks are as they were.
        for bridge in ["tsb-mgmt", "tsb-stolen", "tsb-typo"] {
            assert!(ip_link(bridge).is_none(), "{bridge}");
        }
        let m = ip_link("mgmt0").unwrap();
        assert!(m.get("master").is_none(), "{m}");
        let addrs = std::process::Command::new("ip")
            .args(["-j", "addr", "show", "mgmt0"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&addrs.stdout).contains("\"local\":\"10.9.9.1\""),
            "{}",
            String::from_utf8_lossy(&addrs.stdout)
        );
        assert_eq!(bridge_master_of("taken0").as_deref(), Some("br-admin"));
        let unchanged = |name: &str| {
            let find = |snap: &[String]| {
                snap.iter()
                    .find(|l| l.starts_with(&format!("\"{name}\" ")))
                    .cloned()
            };
            assert_eq!(find(&snapshot()), find(&before), "{name}");
        };
        unchanged("mgmt0");
        unchanged("taken0");
        unchanged("br-admin");
        assert_eq!(ip_link("wire0").unwrap()["master"], "tsb-good");
    });
}
