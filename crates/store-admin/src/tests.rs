//! Round trips of every message, and what malformed lines get back.

use super::*;
use tessera_blockstore::{ScrubReport, SnapshotInfo, StoreError, VolumeInfo};

fn every_op() -> Vec<AdminOp> {
    vec![
        AdminOp::CreateVolume {
            name: "v".into(),
            size: 1 << 30,
        },
        AdminOp::ListVolumes {},
        AdminOp::VolumeInfo { name: "v".into() },
        AdminOp::ResizeVolume {
            name: "v".into(),
            size: 2 << 30,
        },
        AdminOp::DeleteVolume { name: "v".into() },
        AdminOp::CreateSnapshot {
            volume: "v".into(),
            snapshot: "s".into(),
        },
        AdminOp::DeleteSnapshot {
            volume: "v".into(),
            snapshot: "s".into(),
        },
        AdminOp::CloneSnapshot {
            volume: "a".into(),
            snapshot: "s".into(),
            name: "b".into(),
        },
        AdminOp::Scrub {},
        AdminOp::Status {},
        AdminOp::SetReplication {
            volume: "v".into(),
            generation: 2,
            role: ReplicationRole::Primary {
                replicas: vec![ReplicaPeer {
                    node: "node2".into(),
                    addr: "10.0.0.2:7410".into(),
                }],
                timeout_ms: Some(3000),
                cluster_wait_ms: Some(20_000),
                catching_up: vec![ReplicaPeer {
                    node: "node3".into(),
                    addr: "10.0.0.3:7410".into(),
                }],
                catch_up_bytes_per_sec: Some(100 << 20),
                operator_override: true,
                rebuilding: vec!["node3".into()],
                out_of_sync: Some(vec![ReplicaPeer {
                    node: "node4".into(),
                    addr: "10.0.0.4:7410".into(),
                }]),
            },
        },
        AdminOp::SetReplication {
            volume: "v".into(),
            generation: 3,
            role: ReplicationRole::Replica { catching_up: true },
        },
        AdminOp::ReplicationStatus {},
    ]
}

#[test]
fn every_request_round_trips() {
    for op in every_op() {
        let r = AdminRequest {
            v: ADMIN_VERSION,
            op: op.clone(),
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'), "one request per line: {line}");
        assert_eq!(parse_request(&line).unwrap(), op, "{line}");
        assert!(!op.describe().is_empty());
    }
}

#[test]
fn the_wire_format_is_the_documented_one() {
    // docs/admin-protocol.md shows these lines; clients in other languages rely on them.
    let r = AdminRequest {
        v: 1,
        op: AdminOp::CreateVolume {
            name: "vm-100-disk-0".into(),
            size: 34359738368,
        },
    };
    assert_eq!(
        serde_json::to_string(&r).unwrap(),
        r#"{"v":1,"op":{"type":"create_volume","name":"vm-100-disk-0","size":34359738368}}"#
    );
    let e = AdminResponse {
        v: 1,
        outcome: Outcome::Error(AdminError {
            kind: ErrorKind::NotFound,
            message: "volume vm-9 not found".into(),
        }),
    };
    assert_eq!(
        serde_json::to_string(&e).unwrap(),
        r#"{"v":1,"error":{"kind":"not_found","message":"volume vm-9 not found"}}"#
    );
    let done = AdminResponse {
        v: 1,
        outcome: Outcome::Ok(AdminReply::Done),
    };
    assert_eq!(
        serde_json::to_string(&done).unwrap(),
        r#"{"v":1,"ok":{"kind":"done"}}"#
    );
    let status = AdminRequest {
        v: 1,
        op: AdminOp::Status {},
    };
    assert_eq!(
        serde_json::to_string(&status).unwrap(),
        r#"{"v":1,"op":{"type":"status"}}"#
    );
    let degraded = AdminResponse {
        v: 1,
        outcome: Outcome::Ok(AdminReply::Status(StoreStatus {
            degraded: Some("syncing WAL segment 3: Input/output error (os error 5)".into()),
            data_dir: "/var/lib/tessera/store".into(),
            version: "0.1.0".into(),
            volumes: 2,
            snapshots: 1,
        })),
    };
    assert_eq!(
        serde_json::to_string(&degraded).unwrap(),
        r#"{"v":1,"ok":{"kind":"status","value":{"degraded":"syncing WAL segment 3: Input/output error (os error 5)","data_dir":"/var/lib/tessera/store","version":"0.1.0","volumes":2,"snapshots":1}}}"#
    );
}

#[test]
fn the_documented_lines_are_in_the_document() {
    // The test above pins the lines; this keeps docs/admin-protocol.md showing them.
    let doc = include_str!("../../../docs/admin-protocol.md");
    for line in [
        r#"{"v":1,"op":{"type":"create_volume","name":"vm-100-disk-0","size":34359738368}}"#,
        r#"{"v":1,"error":{"kind":"not_found","message":"volume vm-9 not found"}}"#,
        r#"{"v":1,"op":{"type":"status"}}"#,
        r#"{"v":1,"ok":{"kind":"status","value":{"degraded":"syncing WAL segment 3: Input/output error (os error 5)","data_dir":"/var/lib/tessera/store","version":"0.1.0","volumes":2,"snapshots":1}}}"#,
    ] {
        assert!(
            doc.lines().any(|l| l == line),
            "docs/admin-protocol.md lacks {line}"
        );
    }
    for kind in ["status", "done", "scrub"] {
        assert!(doc.contains(&format!("`{kind}`")), "{kind} undocumented");
    }
}

#[test]
fn status_takes_no_fields() {
    assert_eq!(
        parse_request(r#"{"v":1,"op":{"type":"status"}}"#),
        Ok(AdminOp::Status {})
    );
    for line in [
        r#"{"v":1,"op":{"type":"status","verbose":true}}"#,
        r#"{"v":1,"op":{"type":"status","name":"x"}}"#,
        r#"{"v":1,"op":{"type":"status"},"extra":1}"#,
        // The other operations without fields refuse them alike.
        r#"{"v":1,"op":{"type":"scrub","force":true}}"#,
        r#"{"v":1,"op":{"type":"list_volumes","name":"x"}}"#,
    ] {
        let e = parse_request(line).expect_err(line);
        assert_eq!(e.kind, ErrorKind::BadRequest, "{line}");
        assert!(e.message.contains("unknown field"), "{line}: {}", e.message);
    }
}

#[test]
fn a_status_reply_with_fields_this_client_does_not_know_still_reads() {
    // A newer store may say more; a polling tesserad must not call it unreachable.
    let line = r#"{"v":1,"ok":{"kind":"status","value":{"degraded":null,"data_dir":"/d","version":"9.0.0","volumes":0,"snapshots":0,"wal_bytes":4096}}}"#;
    let r: AdminResponse = serde_json::from_str(line).unwrap();
    assert_eq!(
        r.outcome,
        Outcome::Ok(AdminReply::Status(StoreStatus {
            degraded: None,
            data_dir: "/d".into(),
            version: "9.0.0".into(),
            volumes: 0,
            snapshots: 0,
        }))
    );
    // What it must say is still required.
    let missing = r#"{"v":1,"ok":{"kind":"status","value":{"degraded":null}}}"#;
    assert!(serde_json::from_str::<AdminResponse>(missing).is_err());
}

#[test]
fn tasks_recorded_with_size_bytes_still_read() {
    let op: AdminOp =
        serde_json::from_str(r#"{"type":"create_volume","name":"x","size_bytes":4096}"#).unwrap();
    assert_eq!(
        op,
        AdminOp::CreateVolume {
            name: "x".into(),
            size: 4096
        }
    );
}

#[test]
fn malformed_requests_name_the_problem() {
    let cases = [
        (
            r#"{"v":1,"op":{"type":"create_volume","name":"x"}}"#,
            "size",
        ),
        (
            r#"{"v":1,"op":{"type":"create_volume","name":"x","size":-1}}"#,
            "invalid value",
        ),
        (
            r#"{"v":1,"op":{"type":"create_volume","name":"x","size":"big"}}"#,
            "invalid type",
        ),
        (r#"{"v":1,"op":{"type":"explode"}}"#, "unknown variant"),
        (r#"{"v":1,"op":{"name":"x"}}"#, "type"),
        (
            r#"{"v":1,"op":{"type":"scrub"},"extra":1}"#,
            "unknown field",
        ),
        (
            r#"{"v":1,"op":{"type":"delete_volume","name":"x","force":true}}"#,
            "unknown field",
        ),
        (r#"{"op":{"type":"scrub"}}"#, "missing field `v`"),
        (r#"{"v":1}"#, "missing field `op`"),
        (r#"{"v":1,"op":{"type":"scrub"}"#, "EOF"),
        (r#"not json"#, "expected"),
        (r#"[1,{"type":"scrub"}]"#, "JSON object"),
        (r#"{"v":1,"op":["scrub"]}"#, "JSON object"),
        (r#"{"v":1,"op":"scrub"}"#, "JSON object"),
        ("", "EOF"),
    ];
    for (line, needle) in cases {
        let e = parse_request(line).expect_err(line);
        assert_eq!(e.kind, ErrorKind::BadRequest, "{line}");
        assert!(e.message.contains(needle), "{line}: {}", e.message);
    }
}

#[test]
fn another_version_is_refused_before_its_fields_are_read() {
    for line in [
        r#"{"v":2,"op":{"type":"scrub"}}"#,
        r#"{"v":0,"op":{"type":"scrub"}}"#,
        // A newer client's new operation: the version is what is wrong, not the op.
        r#"{"v":2,"op":{"type":"replicate","to":"n2"}}"#,
    ] {
        let e = parse_request(line).expect_err(line);
        assert_eq!(e.kind, ErrorKind::UnsupportedVersion, "{line}");
        assert!(e.message.contains("version"), "{}", e.message);
    }
}

#[test]
fn every_reply_round_trips() {
    let volume = VolumeInfo {
        name: "v".into(),
        size: 1 << 30,
        allocated: 4096,
        generation: 3,
        created: 1_764_096_000,
        origin: Some("a@s".into()),
        snapshots: vec![SnapshotInfo {
            name: "s".into(),
            export: "v@s".into(),
            size: 1 << 30,
            created: 1_764_096_001,
        }],
    };
    let replies = [
        AdminReply::Volume(volume.clone()),
        AdminReply::Volumes(vec![volume.clone(), volume]),
        AdminReply::Snapshot(SnapshotInfo {
            name: "s".into(),
            export: "v@s".into(),
            size: 4096,
            created: 1,
        }),
        AdminReply::Scrub(ScrubReport::default()),
        AdminReply::Status(StoreStatus {
            degraded: Some("syncing WAL segment 1: Input/output error".into()),
            data_dir: "/var/lib/tessera/store".into(),
            version: "0.1.0".into(),
            volumes: 1,
            snapshots: 0,
        }),
        AdminReply::Status(StoreStatus {
            degraded: None,
            data_dir: "/d".into(),
            version: "0.1.0".into(),
            volumes: 0,
            snapshots: 0,
        }),
        AdminReply::Replication(vec![
            VolumeReplication {
                volume: "v".into(),
                generation: 4,
                role: "primary".into(),
                configured: true,
                fenced_by: None,
                replicas: vec![
                    ReplicaStatus {
                        node: "node2".into(),
                        addr: "10.0.0.2:7410".into(),
                        state: ReplicaState::InSync {},
                        missed_bytes: 0,
                        catch_up_sent_bytes: 0,
                        catch_up_wire_bytes: 0,
                    },
                    ReplicaStatus {
                        node: "node3".into(),
                        addr: "10.0.0.3:7410".into(),
                        state: ReplicaState::CatchingUp {
                            done_bytes: 4096,
                            total_bytes: 8192,
                        },
                        missed_bytes: 8000,
                        catch_up_sent_bytes: 4096,
                        catch_up_wire_bytes: 5000,
                    },
                ],
                last_applied: None,
                must_catch_up: false,
                repaired_blocks: 1,
                repairs: vec![BlockRepaired {
                    offset: 65536,
                    len: 4096,
                    from: "node2".into(),
                    time_ms: 1_700_000_000_000,
                    on: None,
                    snapshot: None,
                }],
            },
            VolumeReplication {
                volume: "w".into(),
                generation: 2,
                role: "replica".into(),
                configured: false,
                fenced_by: None,
                replicas: vec![],
                last_applied: Some(AppliedPosition {
                    generation: 2,
                    seq: 17,
                }),
                must_catch_up: true,
                repaired_blocks: 0,
                repairs: vec![],
            },
        ]),
        AdminReply::Done,
    ];
    let kinds = [
        ErrorKind::BadRequest,
        ErrorKind::UnsupportedVersion,
        ErrorKind::Invalid,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Busy,
        ErrorKind::NoSpace,
        ErrorKind::Io,
    ];
    let outcomes = replies
        .into_iter()
        .map(Outcome::Ok)
        .chain(kinds.map(|kind| {
            Outcome::Error(AdminError {
                kind,
                message: "why".into(),
            })
        }));
    for outcome in outcomes {
        let r = AdminResponse {
            v: ADMIN_VERSION,
            outcome,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            serde_json::from_str::<AdminResponse>(&line).unwrap(),
            r,
            "{line}"
        );
    }
}

#[test]
fn malformed_replies_are_errors_not_panics() {
    for line in [
        r#"{"v":1}"#,
        r#"{"v":1,"ok":{"kind":"teapot"}}"#,
        r#"{"v":1,"error":{"kind":"on_fire","message":"x"}}"#,
        r#"{"v":1,"ok":{"kind":"volume","value":{"name":"v"}}}"#,
        r#"{"v":1,"ok":{"kind":"done"},"extra":true}"#,
        r#"{"ok":{"kind":"done"}}"#,
        "",
    ] {
        assert!(
            serde_json::from_str::<AdminResponse>(line).is_err(),
            "{line}"
        );
    }
}

#[test]
fn store_errors_map_to_the_kinds_a_client_branches_on() {
    let cases = [
        (StoreError::NotFound("volume x".into()), ErrorKind::NotFound),
        (
            StoreError::AlreadyExists("volume x".into()),
            ErrorKind::AlreadyExists,
        ),
        (StoreError::ReadOnly, ErrorKind::Invalid),
    ];
    for (e, kind) in cases {
        let a = AdminError::from(&e);
        assert_eq!(a.kind, kind, "{e}");
        assert_eq!(a.message, e.to_string());
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = AdminOp> {
        let name = "\\PC{0,40}";
        prop_oneof![
            (name, any::<u64>()).prop_map(|(name, size)| AdminOp::CreateVolume { name, size }),
            Just(AdminOp::ListVolumes {}),
            name.prop_map(|name| AdminOp::VolumeInfo { name }),
            (name, any::<u64>()).prop_map(|(name, size)| AdminOp::ResizeVolume { name, size }),
            name.prop_map(|name| AdminOp::DeleteVolume { name }),
            (name, name)
                .prop_map(|(volume, snapshot)| AdminOp::CreateSnapshot { volume, snapshot }),
            (name, name)
                .prop_map(|(volume, snapshot)| AdminOp::DeleteSnapshot { volume, snapshot }),
            (name, name, name).prop_map(|(volume, snapshot, name)| AdminOp::CloneSnapshot {
                volume,
                snapshot,
                name
            }),
            Just(AdminOp::Scrub {}),
            Just(AdminOp::Status {}),
            Just(AdminOp::ReplicationStatus {}),
        ]
    }

    proptest! {
        #[test]
        fn any_request_is_one_line_and_reads_back(op in op()) {
            let line = serde_json::to_string(&AdminRequest { v: ADMIN_VERSION, op: op.clone() }).unwrap();
            prop_assert!(!line.contains('\n'));
            prop_assert_eq!(parse_request(&line), Ok(op));
        }

        #[test]
        fn any_line_gets_an_answer_not_a_panic(line in "\\PC{0,200}") {
            let _ = parse_request(&line);
        }

        #[test]
        fn a_cut_request_is_refused_as_bad(
            op in op(),
            cut in any::<prop::sample::Index>(),
        ) {
            let line = serde_json::to_string(&AdminRequest { v: ADMIN_VERSION, op }).unwrap();
            let mut end = cut.index(line.len());
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            match parse_request(&line[..end]) {
                Ok(_) => prop_assert_eq!(end, line.len(), "a cut line was read"),
                Err(e) => prop_assert_eq!(e.kind, ErrorKind::BadRequest),
            }
        }
    }
}
