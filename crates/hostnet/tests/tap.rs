//! VM NIC taps against a real kernel, in a network namespace of the test's own, checked
//! with `ip -j -d link` and `bridge -j link`. Needs root; prints SKIP without it.

mod common;

use common::*;
use tessera_hostnet::{create_tap, TapError, TapSpec};

fn spec(vm: &str, nic: u16, mac: [u8; 6], bridge: &str) -> TapSpec {
    TapSpec {
        vm: vm.into(),
        nic,
        mac,
        bridge: bridge.into(),
    }
}

#[test]
fn a_vm_nic_tap_joins_its_bridge_up_with_a_mac_from_the_vms_and_goes_with_its_fd() {
    let test = "a_vm_nic_tap_joins_its_bridge_up_with_a_mac_from_the_vms_and_goes_with_its_fd";
    in_fresh_netns(test, |rt| {
        let defs = [net("lan", None, None)];
        run(rt, &defs);
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let tap = rt
            .block_on(create_tap(&spec("web", 0, mac, "tsb-lan")))
            .unwrap();
        assert_eq!(tap.name(), "tsn-web-0");

        let l = ip_link("tsn-web-0").expect("tap exists");
        assert_eq!(l["linkinfo"]["info_kind"], "tun");
        let info = &l["linkinfo"]["info_data"];
        assert_eq!(info["type"], "tap");
        assert_eq!(info["pi"], false);
        assert_eq!(info["vnet_hdr"], true);
        assert_eq!(info["persist"], false);
        // The tap's own address is the VM's with `fe` first (never the VM's own: the
        // bridge would keep frames for the guest to itself).
        assert_eq!(l["address"], "fe:54:00:12:34:56");
        assert_eq!(l["master"], "tsb-lan");
        assert!(is_up(&l), "{l}");
        assert_eq!(l["ifalias"], "tessera-tap:web/0");
        assert_eq!(bridge_master_of("tsn-web-0").as_deref(), Some("tsb-lan"));

        // Network reconciliation leaves a VM's tap alone: the bridge is settled as before.
        let r = run(rt, &defs);
        assert!(r.unchanged(), "{r:?}");
        assert!(r.foreign.is_empty(), "{r:?}");
        assert_eq!(ip_link("tsn-web-0").unwrap()["master"], "tsb-lan");

        // The tap lives as long as its fd. The kernel unregisters it after the last close
        // (a CI run once still listed it right after the drop): wait for that, bounded.
        drop(tap);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while ip_link("tsn-web-0").is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the tap outlived its fd by 5 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
}

#[test]
fn a_tap_refuses_a_taken_name_a_missing_bridge_and_a_multicast_mac() {
    let test = "a_tap_refuses_a_taken_name_a_missing_bridge_and_a_multicast_mac";
    in_fresh_netns(test, |rt| {
        run(rt, &[net("lan", None, None)]);
        let mac = [0x52, 0x54, 0x00, 0, 0, 1];
        // Someone else's interface with the tap's name: refused, left as it was.
        sh(&[
            "ip",
            "link",
            "add",
            "tsn-web-0",
            "type",
            "veth",
            "peer",
            "name",
            "otherp",
        ]);
        let before = ip_link("tsn-web-0").unwrap();
        let e = rt
            .block_on(create_tap(&spec("web", 0, mac, "tsb-lan")))
            .unwrap_err();
        assert!(matches!(&e, TapError::Exists(n) if n == "tsn-web-0"), "{e}");
        assert_eq!(ip_link("tsn-web-0").unwrap(), before);

        let e = rt
            .block_on(create_tap(&spec("web", 1, mac, "tsb-nope")))
            .unwrap_err();
        assert!(
            matches!(&e, TapError::NoBridge(b) if b == "tsb-nope"),
            "{e}"
        );
        assert!(ip_link("tsn-web-1").is_none());

        let e = rt
            .block_on(create_tap(&spec(
                "web",
                2,
                [0x01, 0, 0x5e, 0, 0, 1],
                "tsb-lan",
            )))
            .unwrap_err();
        assert!(matches!(e, TapError::BadMac(_)), "{e}");
        assert!(ip_link("tsn-web-2").is_none());

        // And the good one after all that.
        let tap = rt
            .block_on(create_tap(&spec("web", 3, mac, "tsb-lan")))
            .unwrap();
        assert!(is_up(&ip_link(tap.name()).unwrap()));
    });
}
