//! Editing a VM from its page, in the console test's cluster and browser session: a
//! stopped VM's vCPUs, memory, stop timeout, restart policy and HA flag and priority are
//! changed through the form and read back from the API; a running VM's page offers no
//! vCPU or memory fields; an edit made from a page that someone else's change overtook is
//! refused (409 on the generation) and changes nothing.

use fantoccini::Client;
use serde_json::json;

use super::{click, el, fetch, fill, go, select, shot, submit, wait_js};

/// On the page of a running VM (shown): the form is there, without vCPUs and memory.
pub async fn running_vm_keeps_its_size(c: &Client) {
    el(c, "#vm-edit").await;
    el(c, "#edit-size-note").await;
    let sized = c
        .execute(
            "return !!document.querySelector('#vm-edit [name=vcpus], #vm-edit [name=memory_mib]')",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        sized,
        json!(false),
        "vCPU or memory fields for a running VM"
    );
}

/// The stopped VM `name` edited from its page on `origin`.
pub async fn check(c: &Client, origin: &str, name: &str) {
    let (_, before) = fetch(c, "GET", &format!("vms/{name}"), None).await;
    assert_eq!(before["actual_state"], "stopped", "{before}");
    go(c, origin, &format!("vm/{name}")).await;
    el(c, "#vm-edit [name=vcpus]").await;
    fill(c, "#vm-edit", "vcpus", "2").await;
    fill(c, "#vm-edit", "memory_mib", "96").await;
    fill(c, "#vm-edit", "stop_timeout_s", "45").await;
    select(c, "#vm-edit", "restart_policy", "always").await;
    if before["ha"] != true {
        click(c, "#vm-edit [name=ha]").await;
    }
    fill(c, "#vm-edit", "priority", "7").await;
    submit(c, "#vm-edit").await;
    wait_js(
        c,
        "const i = document.getElementById('vm-config'); return i && i.innerText.includes('96 MiB') && i.innerText.includes('priority 7')",
        "the page showing the edit",
    )
    .await;
    // The form is made afresh from the changed VM (not the one it was filled from).
    wait_js(
        c,
        "const f = document.querySelector('#vm-edit [name=memory_mib]'); return f && f.value === '96' \
         && document.querySelector('#vm-edit [name=priority]').value === '7'",
        "the edit form showing the changed VM",
    )
    .await;
    shot(c, "vm-edit").await;
    let (_, after) = fetch(c, "GET", &format!("vms/{name}"), None).await;
    assert_eq!(after["vcpus"], 2, "{after}");
    assert_eq!(after["memory_mib"], 96, "{after}");
    assert_eq!(after["stop_timeout_s"], 45, "{after}");
    assert_eq!(after["restart_policy"], "always", "{after}");
    assert_eq!(after["ha"], true, "{after}");
    assert_eq!(after["priority"], 7, "{after}");
    assert_eq!(
        after["generation"].as_u64().unwrap(),
        before["generation"].as_u64().unwrap() + 1,
        "{after}"
    );

    // Someone else changes the VM while this page's form is open and typed in: the
    // form's edit names the generation it showed, and is refused.
    el(c, "#vm-edit [name=stop_timeout_s]").await;
    fill(c, "#vm-edit", "stop_timeout_s", "50").await;
    let (code, v) = fetch(
        c,
        "PATCH",
        &format!("vms/{name}"),
        Some(json!({"stop_timeout_s": 60})),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    submit(c, "#vm-edit").await;
    let msg = wait_js(
        c,
        "const a = document.querySelector('#vm-edit .form-error'); return a && !a.hidden && a.textContent",
        "the refusal of a stale edit",
    )
    .await;
    assert!(msg.as_str().unwrap().contains("generation"), "{msg}");
    let (_, now) = fetch(c, "GET", &format!("vms/{name}"), None).await;
    assert_eq!(now["stop_timeout_s"], 60, "{now}");
}
