//! The guest's page with its serial console in xterm.js, and the Networks page: two
//! checks of the console story (tests/tests/console_browser.rs).

use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::Client;
use serde_json::json;

use super::{click, el, fetch, fill, go, only_own_origin, shot, submit, vm_edit, wait_js};

/// The guest's page (it runs, in echo mode): its configuration, disk, no NIC, its start
/// task, and the serial console in xterm.js: the guest's output arrives, and a line typed
/// on the keyboard reaches the guest, which answers it in upper case.
pub async fn vm_page_and_console(c: &Client, origin: &str) {
    // What the policy refuses on this page, from here on.
    c.execute(
        "window.refused = []; document.addEventListener('securitypolicyviolation', \
         e => window.refused.push(e.effectiveDirective + ' ' + e.blockedURI))",
        vec![],
    )
    .await
    .unwrap();
    // Navigating by the list's link (same page, no reload).
    click(c, "tr[data-vm=\"guest\"] a[href=\"#/vm/guest\"]").await;
    el(c, "#vm-config").await;
    let text = wait_js(
        c,
        "const i = document.getElementById('vm-info'); return i && i.innerText.includes('web-data') && i.innerText",
        "the guest's page with its disk",
    )
    .await;
    let text = text.as_str().unwrap();
    assert!(text.contains("console=ttyS0 tessera.mode=echo"), "{text}");
    assert!(text.contains("No NICs"), "{text}");
    wait_js(
        c,
        "return [...document.querySelectorAll('#vm-info tr[data-state=succeeded]')].some(r => r.innerText.startsWith('start'))",
        "the start task in the VM's history",
    )
    .await;
    // The console: what the guest printed since boot (the scrollback), through xterm.
    // xterm draws only while the terminal is on screen: it is below the VM's facts.
    el(c, "#console-screen").await;
    c.execute(
        "document.getElementById('console-screen').scrollIntoView()",
        vec![],
    )
    .await
    .unwrap();
    wait_js(
        c,
        "const r = document.querySelector('#console-screen .xterm-rows'); return r && r.innerText.includes('echo ready')",
        "the guest's output in the terminal",
    )
    .await;
    wait_js(
        c,
        "return document.getElementById('console-screen').dataset.connected === '1'",
        "the console connected",
    )
    .await;
    // xterm's own rules apply although the policy refused its inline <style>: they were
    // adopted as constructed sheets (a row's font is xterm's monospace one, not the page's).
    let font = c
        .execute(
            "return getComputedStyle(document.querySelector('#console-screen .xterm-rows')).fontFamily",
            vec![],
        )
        .await
        .unwrap();
    assert!(font.as_str().unwrap().contains("monospace"), "{font}");
    // Typing: the keyboard (WebDriver key actions) into xterm's focused input; Enter
    // ends the line.
    c.execute(
        "document.querySelector('#console-screen .xterm-helper-textarea').focus()",
        vec![],
    )
    .await
    .unwrap();
    let mut keys = KeyActions::new("keyboard".into());
    for ch in "hello tessera\u{E007}".chars() {
        keys = keys
            .then(KeyAction::Down { value: ch })
            .then(KeyAction::Up { value: ch });
    }
    c.perform_actions(keys).await.unwrap();
    wait_js(
        c,
        "return document.querySelector('#console-screen .xterm-rows').innerText.includes('echo: HELLO TESSERA')",
        "the guest's answer to the typed line",
    )
    .await;
    shot(c, "vm-detail").await;
    vm_edit::running_vm_keeps_its_size(c).await;
    // The only things refused were xterm's inline <style> elements (their rules were
    // adopted instead): no script, connection or stylesheet from elsewhere.
    let refused = c.execute("return window.refused", vec![]).await.unwrap();
    for r in refused.as_array().unwrap() {
        assert_eq!(r, "style-src-elem inline", "{refused}");
    }
    only_own_origin(c).await;
    // Leaving the page ends the console's connection (no socket left behind).
    go(c, origin, "vms").await;
    el(c, "#vm-list").await;
}

/// Networks: create one, see it listed, delete it (the button asks twice).
pub async fn networks(c: &Client, origin: &str) {
    go(c, origin, "networks").await;
    fill(c, "#network-create", "name", "lan").await;
    fill(c, "#network-create", "bridge", "br-lan").await;
    submit(c, "#network-create").await;
    let row = wait_js(
        c,
        "const r = document.querySelector('tr[data-network=\"lan\"]'); return r && r.innerText",
        "network lan listed",
    )
    .await;
    assert!(row.as_str().unwrap().contains("br-lan"), "{row}");
    shot(c, "networks").await;
    let del = "tr[data-network=\"lan\"] button[data-action=delete]";
    click(c, del).await;
    wait_js(
        c,
        &format!(
            "const b = document.querySelector({}); return b && b.textContent.startsWith('Confirm')",
            json!(del)
        ),
        "the delete button armed",
    )
    .await;
    click(c, del).await;
    wait_js(
        c,
        "return !document.querySelector('tr[data-network=\"lan\"]')",
        "network lan gone",
    )
    .await;
    assert_eq!(fetch(c, "GET", "networks/lan", None).await.0, 404);
}
