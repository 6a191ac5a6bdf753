//! Catch-up and rebuild as tasks with a progress figure (issue #8). The transaction that
//! starts a copy's catch-up (a copy back after being away) or its rebuild (a new copy on
//! another node) also writes a task, `running`, that follows that copy; no store is asked
//! for it and no task runner picks it up. The leader moves it along from the volume's
//! record ([`follow`]): its progress is the catch-up's (bytes done of the current pass),
//! it succeeds when the copy is back in the in-sync set and its store confirmed it holds
//! every write, and it fails when the copy goes out of sync again, leaves the volume, or
//! the volume is deleted.

use std::collections::HashMap;

use serde_json::json;
use tessera_api::{CopyState, CopyTask, CopyWork};
use tessera_state::{Command, Node, Require};

use crate::records::table::{TASKS, VOLUMES};
use crate::records::{Task, TaskLog, TaskState, Volume};
use crate::tables::{event, get, put, random_id};

/// The tasks for the copies of `new` that start catching up in this change from `old`
/// (a catch-up, or a rebuild for a copy marked `rebuild`).
pub fn for_change(old: &Volume, new: &Volume) -> Vec<Command> {
    let replaced: Vec<&str> = old
        .copies
        .iter()
        .filter(|o| !new.copies.iter().any(|c| c.node == o.node))
        .map(|o| o.node.as_str())
        .collect();
    new.copies
        .iter()
        .filter(|c| c.state == CopyState::CatchingUp)
        .filter(|c| {
            !old.copies
                .iter()
                .any(|o| o.node == c.node && o.state == CopyState::CatchingUp)
        })
        .map(|c| {
            let (work, replaces) = if c.rebuild {
                (CopyWork::Rebuild, replaced.first().map(|s| s.to_string()))
            } else {
                (CopyWork::CatchUp, None)
            };
            let t = started(new, &c.node, work, replaces);
            put(TASKS, &t.id, &t)
        })
        .collect()
}

/// A running task following `node`'s copy of `v` (its generation: the one the copy starts
/// catching up in).
fn started(v: &Volume, node: &str, work: CopyWork, replaces: Option<String>) -> Task {
    let now = crate::now_ms();
    let what = match (&work, &replaces) {
        (CopyWork::Rebuild, Some(old)) => format!(
            "rebuild of volume {} on node {node} (a full copy, replacing the copy on {old})",
            v.name
        ),
        (CopyWork::Rebuild, None) => {
            format!("rebuild of volume {} on node {node} (a full copy)", v.name)
        }
        (CopyWork::CatchUp, _) => format!(
            "catch-up of volume {}'s copy on node {node} (what it missed)",
            v.name
        ),
    };
    // What the copy's store is told while it catches up.
    let op = tessera_store_admin::AdminOp::SetReplication {
        volume: v.name.clone(),
        generation: v.generation,
        role: tessera_store_admin::ReplicationRole::Replica { catching_up: true },
    };
    Task {
        id: format!("{now:013}-{}", random_id()),
        op,
        vm: None,
        copy: Some(CopyTask {
            volume: v.name.clone(),
            node: node.to_string(),
            work,
            replaces,
        }),
        node: node.to_string(),
        user: "tesserad".into(),
        state: TaskState::Running,
        progress: 0,
        log: vec![TaskLog {
            time_ms: now,
            message: format!(
                "{what}: the primary on {} sends it, generation {}",
                v.node, v.generation
            ),
        }],
        error: None,
        created_ms: now,
        finished_ms: None,
    }
}

/// Where a copy task stands, from its copy's record.
#[derive(Debug, PartialEq)]
pub enum Standing {
    /// Still going: this progress (0-99) and, when it changed, a line for the log.
    Going(u8, Option<String>),
    /// The copy is in sync and confirmed.
    Done,
    /// The copy will not get there in this task: why.
    Failed(String),
}

/// Where the task following `c` stands given the volume's record (`None`: deleted).
pub fn standing(c: &CopyTask, v: Option<&Volume>, progress: u8) -> Standing {
    let Some(v) = v else {
        return Standing::Failed("the volume was deleted".into());
    };
    let Some(copy) = v.copies.iter().find(|x| x.node == c.node) else {
        return Standing::Failed(format!(
            "the copy on {} is no longer one of the volume's (replaced)",
            c.node
        ));
    };
    match copy.state {
        CopyState::OutOfSync => Standing::Failed(format!(
            "the copy on {} went out of sync again (its node or store failed, or its primary \
             changed); a new catch-up starts when it is back",
            c.node
        )),
        CopyState::InSync if copy.joining => Standing::Going(
            99,
            (progress < 99)
                .then(|| "back in the in-sync set; waiting for its store to confirm".into()),
        ),
        CopyState::InSync => Standing::Done,
        CopyState::CatchingUp => {
            let p = copy
                .catch_up
                .filter(|p| p.total > 0)
                .map(|p| (5 + p.done.min(p.total) * 90 / p.total) as u8)
                .unwrap_or(progress.max(5));
            Standing::Going(p, None)
        }
    }
}

/// On the leader: every running copy task moved along (see the module's documentation);
/// of two for one copy, the older fails as superseded.
pub async fn follow(node: &Node) {
    let running: Vec<Task> = node.state.read(|t| {
        t.get(TASKS)
            .map(|tasks| {
                tasks
                    .values()
                    .filter(|v| v["state"] == "running" && !v["copy"].is_null())
                    .filter_map(|v| serde_json::from_value::<Task>(v.clone()).ok())
                    .collect()
            })
            .unwrap_or_default()
    });
    let mut newest: HashMap<(String, String), u64> = HashMap::new();
    for t in &running {
        if let Some(c) = &t.copy {
            let e = newest
                .entry((c.volume.clone(), c.node.clone()))
                .or_default();
            *e = (*e).max(t.created_ms);
        }
    }
    for old in running {
        let Some(c) = old.copy.clone() else { continue };
        let superseded = newest.get(&(c.volume.clone(), c.node.clone())) != Some(&old.created_ms);
        let v: Option<Volume> = get(node, VOLUMES, &c.volume);
        let s = if superseded {
            Standing::Failed("superseded by a newer catch-up of the same copy".into())
        } else {
            standing(&c, v.as_ref(), old.progress)
        };
        let mut t = old.clone();
        let now = crate::now_ms();
        let mut ops = Vec::new();
        match s {
            Standing::Going(p, line) => {
                if p == t.progress && line.is_none() {
                    continue;
                }
                t.progress = p;
                if let Some(l) = line {
                    t.log.push(TaskLog {
                        time_ms: now,
                        message: l,
                    });
                }
            }
            Standing::Done => {
                t.state = TaskState::Succeeded;
                t.progress = 100;
                t.finished_ms = Some(now);
                let msg = format!("the copy of {} on {} is in sync", c.volume, c.node);
                t.log.push(TaskLog {
                    time_ms: now,
                    message: format!("done: {msg}"),
                });
                ops.push(event("task.succeeded", &t.id, &t.user, &msg));
            }
            Standing::Failed(why) => {
                t.state = TaskState::Failed;
                t.progress = 100;
                t.finished_ms = Some(now);
                t.error = Some(why.clone());
                t.log.push(TaskLog {
                    time_ms: now,
                    message: format!("failed: {why}"),
                });
                ops.push(event("task.failed", &t.id, &t.user, &why));
            }
        }
        ops.insert(0, put(TASKS, &t.id, &t));
        let txn = Command::Txn {
            require: vec![Require::equals(TASKS, &t.id, json!(old))],
            ops,
        };
        if let Err(e) = node.write(txn).await {
            tracing::debug!(task = %t.id, error = %e, "copy task not updated yet");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_volume::vol;
    use super::*;
    use tessera_api::CatchUpProgress;
    use CopyState::{CatchingUp, InSync, OutOfSync};

    fn task(node: &str) -> CopyTask {
        CopyTask {
            volume: "v".into(),
            node: node.into(),
            work: CopyWork::Rebuild,
            replaces: Some("c".into()),
        }
    }

    #[test]
    fn a_copy_that_starts_catching_up_gets_a_task_and_a_rebuild_names_what_it_replaces() {
        let old = vol(&[("a", InSync), ("b", InSync), ("c", OutOfSync)]);
        let mut new = old.clone();
        new.generation += 1;
        new.copies[2].node = "d".into();
        new.copies[2].state = CatchingUp;
        new.copies[2].rebuild = true;
        let ops = for_change(&old, &new);
        assert_eq!(ops.len(), 1);
        let Command::Put { value, .. } = &ops[0] else {
            panic!("not a put: {ops:?}");
        };
        let t: Task = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(t.state, TaskState::Running);
        assert_eq!(t.node, "d");
        assert_eq!(t.copy, Some(task("d")));
        // Already catching up: no second task.
        assert!(for_change(&new, &new).is_empty());
        // A catch-up (the copy came back) is not a rebuild.
        let mut back = old.clone();
        back.copies[2].state = CatchingUp;
        let ops = for_change(&old, &back);
        let Command::Put { value, .. } = &ops[0] else {
            panic!("not a put");
        };
        let t: Task = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(t.copy.unwrap().work, CopyWork::CatchUp);
    }

    #[test]
    fn a_copy_task_follows_its_copy_to_the_end() {
        let mut v = vol(&[("a", InSync), ("b", InSync), ("d", CatchingUp)]);
        let t = task("d");
        assert_eq!(standing(&t, Some(&v), 0), Standing::Going(5, None));
        v.copies[2].catch_up = Some(CatchUpProgress {
            done: 50,
            total: 100,
        });
        assert_eq!(standing(&t, Some(&v), 5), Standing::Going(50, None));
        v.copies[2].state = InSync;
        v.copies[2].joining = true;
        assert!(matches!(
            standing(&t, Some(&v), 50),
            Standing::Going(99, Some(_))
        ));
        assert_eq!(standing(&t, Some(&v), 99), Standing::Going(99, None));
        v.copies[2].joining = false;
        assert_eq!(standing(&t, Some(&v), 99), Standing::Done);
        v.copies[2].state = OutOfSync;
        assert!(matches!(standing(&t, Some(&v), 50), Standing::Failed(_)));
        v.copies.remove(2);
        assert!(
            matches!(standing(&t, Some(&v), 50), Standing::Failed(w) if w.contains("replaced"))
        );
        assert!(matches!(standing(&t, None, 50), Standing::Failed(w) if w.contains("deleted")));
    }
}
