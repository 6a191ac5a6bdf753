//! The manager's own unit stories (the simulator in `sim` replays the scripted scenarios).

use super::Manager;
use crate::model::{Input, NodeId, NodeState, Resources, RestartPolicy, VmId, VmSpec, VolumeId};
use crate::output::Action;

fn spec(placed: &str) -> VmSpec {
    VmSpec {
        id: VmId::from("web"),
        ha: true,
        priority: 0,
        resources: Resources {
            vcpus: 1,
            memory_mib: 64,
        },
        disks: vec![VolumeId::from("root")],
        preferred: None,
        restart: RestartPolicy::OnCrash,
        desired_running: true,
        placed_on: Some(NodeId::from(placed)),
    }
}

fn raises(out: &[Action]) -> usize {
    out.iter()
        .filter(|a| matches!(a, Action::RaiseGeneration { .. }))
        .count()
}

#[test]
fn a_vm_a_user_moved_is_not_recovered_from_its_old_node() {
    let mut m = Manager::new();
    for n in ["n1", "n2", "n3"] {
        m.handle(
            0,
            Input::Membership {
                node: NodeId::from(n),
                state: NodeState::Up,
            },
        );
    }
    m.handle(0, Input::Spec(spec("n1")));
    m.handle(0, Input::Quorum(true));
    // Stopped and started on n2 by a user; the manager missed the facts between.
    m.handle(100, Input::Spec(spec("n2")));
    let out = m.handle(
        200,
        Input::Membership {
            node: NodeId::from("n1"),
            state: NodeState::Down,
        },
    );
    assert_eq!(raises(&out), 0, "{out:?}");
    // Its real node failing recovers it.
    let out = m.handle(
        300,
        Input::Membership {
            node: NodeId::from("n2"),
            state: NodeState::Down,
        },
    );
    assert_eq!(raises(&out), 1, "{out:?}");
}
