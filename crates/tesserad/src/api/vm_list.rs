//! `GET /api/v1/vms`: the VMs, filtered and paged by the server, so a console page with
//! 1,000 VMs carries the 50 it shows. Without `limit` the answer is every matching VM, as
//! before paging existed (the CLI and scripts read the whole list); the `X-Total-Count`
//! header says how many match in every case.

use std::collections::HashMap;

use axum::http::header::HeaderName;
use axum::Json;
use tessera_api::{Vm, VmQuery, MAX_VM_PAGE};

use super::extract::{Auditor, Auth, Synced, Q};
use super::{read_all, ApiError, ErrorBody};
use crate::records::table::{NODES, VMS};

/// The header with the number of matching VMs (all pages).
pub const TOTAL_COUNT: HeaderName = HeaderName::from_static("x-total-count");

/// List VMs, sorted by name: every VM, or those matching the filters, one page of them
/// with `limit` (and `offset`). `X-Total-Count` is the number matching, all pages.
#[utoipa::path(get, path = "/api/v1/vms", tag = "vms", operation_id = "list_vms",
    params(VmQuery),
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = [Vm], headers(("x-total-count" = u64,
            description = "How many VMs match the filters, on all pages"))),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list(
    _: Auth<Auditor>,
    Q(q): Q<VmQuery>,
    n: Synced,
) -> Result<([(HeaderName, String); 1], Json<Vec<Vm>>), ApiError> {
    check(&q)?;
    let names: HashMap<String, String> = read_all::<serde_json::Value>(&n, NODES)?
        .into_iter()
        .filter_map(|(id, rec)| Some((id, rec["name"].as_str()?.to_string())))
        .collect();
    let mut vms = Vec::new();
    for (_, vm) in read_all::<Vm>(&n, VMS)? {
        let vm = super::vms::with_status(&n, vm)?;
        if matches(&vm, &q, &names) {
            vms.push(vm);
        }
    }
    let (total, page) = page(vms, &q);
    Ok(([(TOTAL_COUNT, total.to_string())], Json(page)))
}

/// Refuses what the document's bounds refuse.
fn check(q: &VmQuery) -> Result<(), ApiError> {
    if q.limit.is_some_and(|l| !(1..=MAX_VM_PAGE).contains(&l)) {
        return Err(ApiError::bad(format!("limit: must be 1 to {MAX_VM_PAGE}")));
    }
    if q.offset.is_some_and(|o| o < 0) {
        return Err(ApiError::bad("offset: must be 0 or more"));
    }
    Ok(())
}

/// The node a VM is on, as the lists show it: where it runs, else where it was placed,
/// else where it is pinned.
fn node_of(vm: &Vm) -> Option<&str> {
    vm.running_on
        .as_deref()
        .or(vm.placed_on.as_deref())
        .or(vm.node.as_deref())
}

/// Whether `vm` (with its reported state) passes every filter of `q`; `names` maps node
/// ids to node names.
fn matches(vm: &Vm, q: &VmQuery, names: &HashMap<String, String>) -> bool {
    let node = node_of(vm);
    let node_name = node.and_then(|id| names.get(id)).map(String::as_str);
    if q.state.is_some_and(|s| s != vm.actual_state) {
        return false;
    }
    if q.template.is_some_and(|t| t != vm.template) {
        return false;
    }
    if let Some(want) = &q.node {
        if node != Some(want.as_str()) && node_name != Some(want.as_str()) {
            return false;
        }
    }
    if let Some(net) = &q.network {
        if !vm.networks.contains(net) && !vm.nics.iter().any(|n| n.network == *net) {
            return false;
        }
    }
    if let Some(text) = q.q.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        let text = text.to_lowercase();
        let hit = |s: &str| s.to_lowercase().contains(&text);
        let found = hit(&vm.name)
            || node.is_some_and(hit)
            || node_name.is_some_and(hit)
            || vm.disks.iter().any(|d| hit(d));
        if !found {
            return false;
        }
    }
    true
}

/// How many there are, and the page `q` asks for (sorted by name).
fn page(mut vms: Vec<Vm>, q: &VmQuery) -> (usize, Vec<Vm>) {
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    let total = vms.len();
    // Past the end (however far) is an empty page.
    let from = usize::try_from(q.offset.unwrap_or(0))
        .unwrap_or(usize::MAX)
        .min(total);
    let to = q.limit.map_or(total, |l| from.saturating_add(l).min(total));
    vms.truncate(to);
    vms.drain(..from);
    (total, vms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_api::VmState;

    fn vm(name: &str, state: VmState, node: Option<&str>, disks: &[&str]) -> Vm {
        serde_json::from_value(serde_json::json!({
            "name": name, "vcpus": 1, "memory_mib": 64,
            "disks": disks, "kernel": null, "cmdline": null, "node": null,
            "desired_state": "stopped", "actual_state": state,
            "running_on": node, "generation": 1, "created_ms": 0, "updated_ms": 0,
        }))
        .unwrap()
    }

    fn names() -> HashMap<String, String> {
        HashMap::from([("id-1".to_string(), "alpha".to_string())])
    }

    fn pick(vms: &[Vm], q: &VmQuery) -> Vec<String> {
        vms.iter()
            .filter(|v| matches(v, q, &names()))
            .map(|v| v.name.clone())
            .collect()
    }

    #[test]
    fn filters_by_text_in_name_node_and_disks_ignoring_case() {
        let vms = [
            vm("web-1", VmState::Running, Some("id-1"), &["web-1-disk"]),
            vm("db", VmState::Stopped, None, &["Data-Vol"]),
        ];
        let q = |t: &str| VmQuery {
            q: Some(t.into()),
            ..Default::default()
        };
        assert_eq!(pick(&vms, &q("WEB")), ["web-1"]);
        assert_eq!(pick(&vms, &q("alph")), ["web-1"], "the node's name");
        assert_eq!(pick(&vms, &q("id-1")), ["web-1"], "the node's id");
        assert_eq!(pick(&vms, &q("data-vol")), ["db"]);
        assert_eq!(pick(&vms, &q("  ")), ["web-1", "db"], "blank: no filter");
        assert!(pick(&vms, &q("nothing")).is_empty());
    }

    #[test]
    fn filters_by_state_node_and_template() {
        let mut t = vm("tmpl", VmState::Stopped, None, &[]);
        t.template = true;
        let mut placed = vm("placed", VmState::Stopped, None, &[]);
        placed.placed_on = Some("id-1".into());
        let vms = [vm("run", VmState::Running, Some("id-1"), &[]), t, placed];
        let state = VmQuery {
            state: Some(VmState::Stopped),
            ..Default::default()
        };
        assert_eq!(pick(&vms, &state), ["tmpl", "placed"]);
        for who in ["id-1", "alpha"] {
            let on = VmQuery {
                node: Some(who.into()),
                ..Default::default()
            };
            assert_eq!(pick(&vms, &on), ["run", "placed"], "{who}");
        }
        let templates = VmQuery {
            template: Some(true),
            ..Default::default()
        };
        assert_eq!(pick(&vms, &templates), ["tmpl"]);
    }

    #[test]
    fn pages_are_slices_of_the_sorted_list_with_the_total() {
        let vms: Vec<Vm> = (0..7)
            .rev()
            .map(|i| vm(&format!("vm-{i}"), VmState::Stopped, None, &[]))
            .collect();
        let q = |offset, limit| VmQuery {
            offset,
            limit,
            ..Default::default()
        };
        let names = |p: Vec<Vm>| p.into_iter().map(|v| v.name).collect::<Vec<_>>();
        let (total, all) = page(vms.clone(), &q(None, None));
        assert_eq!(total, 7);
        assert_eq!(names(all)[0], "vm-0", "sorted by name");
        let (_, p) = page(vms.clone(), &q(Some(5), Some(3)));
        assert_eq!(names(p), ["vm-5", "vm-6"]);
        let (total, p) = page(vms.clone(), &q(Some(99), Some(3)));
        assert_eq!((total, p.len()), (7, 0), "past the end: empty");
        let (_, p) = page(vms, &q(Some(i64::MAX), Some(usize::MAX)));
        assert!(p.is_empty());
        assert!(check(&q(Some(-1), None)).is_err());
        assert!(check(&q(Some(i64::MAX), None)).is_ok());
        assert!(check(&q(None, Some(0))).is_err());
        assert!(check(&q(None, Some(MAX_VM_PAGE + 1))).is_err());
        assert!(check(&q(Some(3), Some(MAX_VM_PAGE))).is_ok());
    }
}
