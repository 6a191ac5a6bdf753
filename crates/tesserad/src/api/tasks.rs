//! Tasks: every long operation is one, with state, progress and a log. A create may carry
//! an `Idempotency-Key`: its answer (a task, or the created record for creates that are
//! not tasks) is kept in the create's own transaction, so a retry with the same key gets
//! the same answer instead of a second task or a 409.

use axum::Json;
use tessera_api::{TaskQuery, VmAction, VmTask};
use tessera_state::Require;

use super::auth::{random_id, Principal};
use super::extract::{Auditor, Auth, Param, Synced, Q};
use super::{now_ms, put, read_all, ApiError, ApiState, ErrorBody};
use crate::records::table::TASKS;
use crate::records::{Task, TaskLog, TaskOp, TaskState};

/// Tasks, oldest first.
#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", operation_id = "list_tasks",
    params(TaskQuery),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [Task]), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn list(
    _: Auth<Auditor>,
    Q(q): Q<TaskQuery>,
    n: Synced,
) -> Result<Json<Vec<Task>>, ApiError> {
    let mut out: Vec<Task> = read_all::<Task>(&n, TASKS)?
        .into_iter()
        .map(|(_, t)| t)
        .filter(|t| q.state.is_none_or(|s| t.state == s))
        .collect();
    out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    Ok(Json(out))
}

/// One task.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks", operation_id = "get_task",
    params(("id" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = Task), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn show(
    _: Auth<Auditor>,
    Param(id): Param<String>,
    n: Synced,
) -> Result<Json<Task>, ApiError> {
    super::show_one(&n, TASKS, &id, "task")
}

/// A new queued task for `node` (not yet committed: the caller commits it together with
/// the records it reserves).
pub fn queued(p: &Principal, node: &str, op: TaskOp) -> Task {
    queued_by(&p.user, node, op)
}

/// [`queued`] for `user`, which may be the cluster itself (the HA manager).
pub fn queued_by(user: &str, node: &str, op: TaskOp) -> Task {
    let now = now_ms();
    Task {
        id: format!("{now:013}-{}", random_id()),
        op,
        vm: None,
        copy: None,
        node: node.into(),
        user: user.into(),
        state: TaskState::Queued,
        progress: 0,
        log: vec![TaskLog {
            time_ms: now,
            message: format!("queued for node {node} by {user}"),
        }],
        error: None,
        created_ms: now,
        finished_ms: None,
    }
}

/// A new queued task following VM lifecycle request `vm` on `node` (not yet committed:
/// the caller commits it with the VM record's change).
pub fn queued_vm(p: &Principal, node: &str, vm: VmTask) -> Task {
    queued_vm_by(&p.user, node, vm)
}

/// [`queued_vm`] for `user`, which may be the cluster itself (the HA manager).
pub fn queued_vm_by(user: &str, node: &str, vm: VmTask) -> Task {
    let mut t = queued_by(user, node, TaskOp::Status {});
    t.log[0].message = format!(
        "{} of VM {} queued for node {node} by {user}",
        word(vm.action),
        vm.vm,
    );
    t.vm = Some(vm);
    t
}

/// A VM action in one word.
pub fn word(a: VmAction) -> &'static str {
    match a {
        VmAction::Start => "start",
        VmAction::Stop => "stop",
        VmAction::Kill => "kill",
        VmAction::Reboot => "reboot",
        VmAction::Pause => "pause",
        VmAction::Resume => "resume",
        VmAction::Migrate => "migrate",
    }
}

/// Commits a task with the records it reserves; the task's own id must be free.
pub async fn submit(
    st: &ApiState,
    task: &Task,
    mut require: Vec<Require>,
    mut ops: Vec<tessera_state::Command>,
    conflict: impl FnOnce(&Require) -> String,
) -> Result<(), ApiError> {
    require.push(Require::absent(TASKS, &task.id));
    ops.push(put(TASKS, &task.id, task));
    super::commit(st, require, ops, conflict).await
}

/// Where answers kept for an `Idempotency-Key` live: `<user>/<key>`.
pub const IDEMPOTENCY: &str = "idempotency";
/// How long an answer is kept for its key.
const IDEMPOTENCY_MS: u64 = 24 * 3600 * 1000;
/// Expired kept answers dropped along with each new one (so they do not pile up).
const IDEMPOTENCY_PURGE: usize = 8;
/// Unexpired kept answers per user at most: one more drops that user's oldest, so a
/// client sending a new key with every request cannot grow the state without bound
/// within the 24 h (a retry comes within minutes; a key 1,000 creates old is not retried).
pub const IDEMPOTENCY_PER_USER: usize = 1000;

/// A request's `Idempotency-Key`, bound to its user and to what it asked.
pub struct Idempotent {
    key: String,
    request: String,
}

/// An answer kept for an `Idempotency-Key`: a task, or (creates that are not tasks) the
/// created record's answer.
#[derive(serde::Serialize, serde::Deserialize)]
struct Kept {
    request: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task: Option<Task>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    answer: Option<serde_json::Value>,
    expires_ms: u64,
}

impl Idempotent {
    /// `key` (the header's value, checked) for `user`'s request `what` (its body, as sent
    /// to the handler: the same key with another request is refused).
    pub fn new(user: &str, key: &str, what: &impl serde::Serialize) -> Idempotent {
        let request = blake3::hash(serde_json::to_string(what).unwrap_or_default().as_bytes())
            .to_hex()
            .to_string();
        Idempotent {
            key: format!("{user}/{key}"),
            request,
        }
    }

    /// The task answered before under this key, if it is still kept; 409 if the key was
    /// used for another request.
    pub fn replay(&self, n: &tessera_state::Node) -> Result<Option<Task>, ApiError> {
        self.kept(n)?
            .map(|k| k.task.ok_or_else(used_otherwise))
            .transpose()
    }

    /// The answer (not a task) given before under this key, if it is still kept; 409 if
    /// the key was used for another request.
    pub fn replay_answer<T: serde::de::DeserializeOwned>(
        &self,
        n: &tessera_state::Node,
    ) -> Result<Option<T>, ApiError> {
        let Some(k) = self.kept(n)? else {
            return Ok(None);
        };
        let v = k.answer.ok_or_else(used_otherwise)?;
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| super::unreadable(IDEMPOTENCY, &self.key, e))
    }

    /// The unexpired answer kept under this key for this same request; 409 for another.
    fn kept(&self, n: &tessera_state::Node) -> Result<Option<Kept>, ApiError> {
        let kept: Option<Kept> = super::read(n, IDEMPOTENCY, &self.key)?;
        match kept.filter(|k| k.expires_ms > now_ms()) {
            Some(k) if k.request != self.request => Err(used_otherwise()),
            k => Ok(k),
        }
    }

    /// Adds to a create's transaction: the answer kept under this key (which must be
    /// free), and a few expired kept answers dropped.
    fn keep(
        &self,
        n: &tessera_state::Node,
        task: Option<&Task>,
        answer: Option<serde_json::Value>,
        require: &mut Vec<Require>,
        ops: &mut Vec<tessera_state::Command>,
    ) {
        let now = now_ms();
        let (dropped, own) = n.state.read(|t| {
            t.get(IDEMPOTENCY)
                .map(|t| {
                    let own = t.get(&self.key).cloned();
                    (to_drop(t.iter(), &self.key, now), own)
                })
                .unwrap_or_default()
        });
        for k in &dropped {
            ops.push(super::del(IDEMPOTENCY, k));
        }
        // An expired answer still under this key is replaced (`kept` ignored it).
        require.push(match own {
            Some(v) => Require::equals(IDEMPOTENCY, &self.key, v),
            None => Require::absent(IDEMPOTENCY, &self.key),
        });
        ops.push(put(
            IDEMPOTENCY,
            &self.key,
            Kept {
                request: self.request.clone(),
                task: task.cloned(),
                answer,
                expires_ms: now + IDEMPOTENCY_MS,
            },
        ));
    }
}

/// The kept answers a new one under `key` drops (never `key` itself): up to
/// [`IDEMPOTENCY_PURGE`] expired ones of anyone, and the same user's oldest unexpired ones
/// beyond [`IDEMPOTENCY_PER_USER`] - 1, so that with the new one it keeps at most that many.
fn to_drop<'a>(
    kept: impl Iterator<Item = (&'a String, &'a serde_json::Value)>,
    key: &str,
    now: u64,
) -> Vec<String> {
    let user = key.split_once('/').map_or(key, |(u, _)| u);
    let mut expired = Vec::new();
    let mut mine: Vec<(u64, &String)> = Vec::new();
    for (k, v) in kept.filter(|(k, _)| k.as_str() != key) {
        // Unreadable ones count as expired: nothing can replay them.
        let expires = v["expires_ms"].as_u64().unwrap_or(0);
        if expires <= now {
            if expired.len() < IDEMPOTENCY_PURGE {
                expired.push(k.clone());
            }
        } else if k.split_once('/').is_some_and(|(u, _)| u == user) {
            mine.push((expires, k));
        }
    }
    let over = (mine.len() + 1).saturating_sub(IDEMPOTENCY_PER_USER);
    if over > 0 {
        mine.sort();
        expired.extend(mine.into_iter().take(over).map(|(_, k)| k.clone()));
    }
    expired
}

fn used_otherwise() -> ApiError {
    ApiError::conflict("Idempotency-Key: already used for a different request")
}

/// [`super::commit`] of a create whose answer is `answer` (not a task), keeping it under
/// `idem` in the same transaction; a concurrent request with the same key that won gets
/// its answer back.
pub async fn commit_idempotent<T: serde::Serialize + serde::de::DeserializeOwned>(
    st: &ApiState,
    answer: T,
    idem: Option<&Idempotent>,
    mut require: Vec<Require>,
    mut ops: Vec<tessera_state::Command>,
    conflict: impl FnOnce(&Require) -> String,
) -> Result<T, ApiError> {
    let Some(idem) = idem else {
        super::commit(st, require, ops, conflict).await?;
        return Ok(answer);
    };
    let n = super::node(st)?;
    let kept = serde_json::to_value(&answer)
        .map_err(|e| ApiError::internal(format!("encoding the answer: {e}")))?;
    idem.keep(&n, None, Some(kept), &mut require, &mut ops);
    let mut lost_race = false;
    let r = super::commit(st, require, ops, |r| {
        lost_race = r.table == IDEMPOTENCY;
        conflict(r)
    })
    .await;
    match r {
        Ok(_) => Ok(answer),
        Err(_) if lost_race => {
            let n = super::synced(st).await?;
            idem.replay_answer(&n)?
                .ok_or_else(|| ApiError::conflict("Idempotency-Key: in use; try again"))
        }
        Err(e) => Err(e),
    }
}

/// [`submit`], keeping the answer (`task`) under `idem` in the same transaction; a
/// concurrent request with the same key that won gets its task back.
pub async fn submit_idempotent(
    st: &ApiState,
    task: &Task,
    idem: Option<&Idempotent>,
    mut require: Vec<Require>,
    mut ops: Vec<tessera_state::Command>,
    conflict: impl FnOnce(&Require) -> String,
) -> Result<Task, ApiError> {
    let Some(idem) = idem else {
        submit(st, task, require, ops, conflict).await?;
        return Ok(task.clone());
    };
    let n = super::node(st)?;
    idem.keep(&n, Some(task), None, &mut require, &mut ops);
    let mut lost_race = false;
    let r = submit(st, task, require, ops, |r| {
        lost_race = r.table == IDEMPOTENCY;
        conflict(r)
    })
    .await;
    match r {
        Ok(()) => Ok(task.clone()),
        Err(_) if lost_race => {
            let n = super::synced(st).await?;
            idem.replay(&n)?
                .ok_or_else(|| ApiError::conflict("Idempotency-Key: in use; try again"))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::{to_drop, IDEMPOTENCY_PER_USER, IDEMPOTENCY_PURGE};
    use serde_json::{json, Value};

    fn kept(entries: &[(String, u64)]) -> Vec<(String, Value)> {
        entries
            .iter()
            .map(|(k, e)| (k.clone(), json!({"request": "r", "expires_ms": e})))
            .collect()
    }

    fn drop_for(entries: &[(String, Value)], key: &str, now: u64) -> Vec<String> {
        to_drop(entries.iter().map(|(k, v)| (k, v)), key, now)
    }

    #[test]
    fn a_user_keeps_at_most_the_cap_and_loses_its_oldest() {
        let now = 1_000_000;
        // A full user (oldest first by expiry, listed out of order) and another user.
        let mut e: Vec<(String, u64)> = (0..IDEMPOTENCY_PER_USER as u64)
            .rev()
            .map(|i| (format!("alice/k{i}"), now + 10 + i))
            .collect();
        e.push(("bob/k".into(), now + 1));
        let t = kept(&e);
        // Alice's new key drops her oldest only, not bob's older one.
        assert_eq!(drop_for(&t, "alice/new", now), vec!["alice/k0".to_string()]);
        // Bob is under the cap: nothing dropped.
        assert!(drop_for(&t, "bob/new", now).is_empty());
        // Re-keeping an existing key does not count it against itself.
        assert!(drop_for(&t[1..], "alice/k0", now).is_empty());
        // Over the cap by more (the cap lowered by an upgrade): back down to it.
        let mut e2 = e.clone();
        e2.push(("alice/extra".into(), now + 5));
        assert_eq!(
            drop_for(&kept(&e2), "alice/new", now),
            vec!["alice/extra".to_string(), "alice/k0".to_string()]
        );
    }

    #[test]
    fn expired_ones_go_a_few_at_a_time_whoever_kept_them() {
        let now = 1_000_000;
        let e: Vec<(String, u64)> = (0..20).map(|i| (format!("carol/k{i}"), now - i)).collect();
        let t = kept(&e);
        let d = drop_for(&t, "dave/new", now);
        assert_eq!(d.len(), IDEMPOTENCY_PURGE);
        // Never the key being kept, even when expired (it is replaced, not dropped).
        assert!(!drop_for(&t, "carol/k3", now).contains(&"carol/k3".to_string()));
        // Unreadable answers are expired.
        let bad = vec![("x/y".to_string(), json!("garbage"))];
        assert_eq!(drop_for(&bad, "x/z", now), vec!["x/y".to_string()]);
    }
}
