//! Every API operation the CLI uses, as method and OpenAPI path template; the test suite
//! checks [`ENDPOINTS`] against the document a running cluster serves.

/// An API operation: method and the path template of the OpenAPI document.
#[derive(Clone, Copy)]
pub struct Ep(pub &'static str, pub &'static str);

pub const LOGIN: Ep = Ep("POST", "/api/v1/login");
pub const LOGOUT: Ep = Ep("POST", "/api/v1/logout");
pub const PASSWORD: Ep = Ep("POST", "/api/v1/password");
pub const CLUSTER: Ep = Ep("GET", "/api/v1/cluster");
pub const NODES: Ep = Ep("GET", "/api/v1/nodes");
pub const NODE_RM: Ep = Ep("DELETE", "/api/v1/nodes/{id}");
pub const NODE_MAINTENANCE: Ep = Ep("POST", "/api/v1/nodes/{id}/maintenance");
pub const NODE_UPGRADE: Ep = Ep("PUT", "/api/v1/nodes/{id}/upgrade");
pub const NODE_UPGRADE_STATUS: Ep = Ep("GET", "/api/v1/nodes/{id}/upgrade");
pub const SETTINGS: Ep = Ep("GET", "/api/v1/settings");
pub const SETTINGS_SET: Ep = Ep("PATCH", "/api/v1/settings");
pub const TOKEN_CREATE: Ep = Ep("POST", "/api/v1/tokens");
pub const TOKEN_RM: Ep = Ep("DELETE", "/api/v1/tokens/{id}");
pub const CERTIFICATE: Ep = Ep("GET", "/api/v1/certificate");
pub const CERTIFICATE_INSTALL: Ep = Ep("POST", "/api/v1/certificate");
pub const CERTIFICATE_RM: Ep = Ep("DELETE", "/api/v1/certificate");
pub const VOLUMES: Ep = Ep("GET", "/api/v1/volumes");
pub const VOLUME_CREATE: Ep = Ep("POST", "/api/v1/volumes");
pub const VOLUME: Ep = Ep("GET", "/api/v1/volumes/{name}");
pub const VOLUME_RM: Ep = Ep("DELETE", "/api/v1/volumes/{name}");
pub const SNAPSHOT_CREATE: Ep = Ep("POST", "/api/v1/volumes/{name}/snapshots");
pub const SNAPSHOT_RM: Ep = Ep("DELETE", "/api/v1/volumes/{name}/snapshots/{snapshot}");
pub const CLONE: Ep = Ep("POST", "/api/v1/volumes/{name}/clone");
pub const VOLUME_RESIZE: Ep = Ep("POST", "/api/v1/volumes/{name}/resize");
pub const VOLUME_OVERRIDE: Ep = Ep("POST", "/api/v1/volumes/{name}/override");
pub const NBD_CREDS: Ep = Ep("POST", "/api/v1/nbd/credentials");
pub const VMS: Ep = Ep("GET", "/api/v1/vms");
pub const VM_CREATE: Ep = Ep("POST", "/api/v1/vms");
pub const VM: Ep = Ep("GET", "/api/v1/vms/{name}");
pub const VM_SET: Ep = Ep("PATCH", "/api/v1/vms/{name}");
pub const VM_RM: Ep = Ep("DELETE", "/api/v1/vms/{name}");
pub const VM_START: Ep = Ep("POST", "/api/v1/vms/{name}/start");
pub const VM_STOP: Ep = Ep("POST", "/api/v1/vms/{name}/stop");
pub const VM_KILL: Ep = Ep("POST", "/api/v1/vms/{name}/kill");
pub const VM_REBOOT: Ep = Ep("POST", "/api/v1/vms/{name}/reboot");
pub const VM_PAUSE: Ep = Ep("POST", "/api/v1/vms/{name}/pause");
pub const VM_RESUME: Ep = Ep("POST", "/api/v1/vms/{name}/resume");
pub const VM_CONSOLE: Ep = Ep("GET", "/api/v1/vms/{name}/console");
pub const VM_MIGRATE: Ep = Ep("POST", "/api/v1/vms/{name}/migrate");
pub const VM_MIGRATE_CANCEL: Ep = Ep("DELETE", "/api/v1/vms/{name}/migrate");
pub const VM_TEMPLATE: Ep = Ep("POST", "/api/v1/vms/{name}/template");
pub const IMAGES: Ep = Ep("GET", "/api/v1/images");
pub const IMAGE_UPLOAD: Ep = Ep("POST", "/api/v1/images");
pub const IMAGE_RM: Ep = Ep("DELETE", "/api/v1/images/{name}");
pub const NETWORKS: Ep = Ep("GET", "/api/v1/networks");
pub const NETWORK_CREATE: Ep = Ep("POST", "/api/v1/networks");
pub const NETWORK_RM: Ep = Ep("DELETE", "/api/v1/networks/{name}");
pub const TASKS: Ep = Ep("GET", "/api/v1/tasks");
pub const TASK: Ep = Ep("GET", "/api/v1/tasks/{id}");
pub const USERS: Ep = Ep("GET", "/api/v1/users");
pub const USER_CREATE: Ep = Ep("POST", "/api/v1/users");
pub const USER_SET: Ep = Ep("PATCH", "/api/v1/users/{username}");
pub const USER_RM: Ep = Ep("DELETE", "/api/v1/users/{username}");
pub const EVENTS: Ep = Ep("GET", "/api/v1/events");
pub const REALMS: Ep = Ep("GET", "/api/v1/realms");
pub const REALM_CREATE: Ep = Ep("POST", "/api/v1/realms");
pub const REALM: Ep = Ep("GET", "/api/v1/realms/{name}");
pub const REALM_SET: Ep = Ep("PUT", "/api/v1/realms/{name}");
pub const REALM_RM: Ep = Ep("DELETE", "/api/v1/realms/{name}");
pub const REALM_TEST: Ep = Ep("POST", "/api/v1/realms/{name}/test");
pub const REALM_SYNC: Ep = Ep("POST", "/api/v1/realms/{name}/sync");
pub const LOGIN_POLICY: Ep = Ep("GET", "/api/v1/login-policy");
pub const LOGIN_POLICY_SET: Ep = Ep("PUT", "/api/v1/login-policy");
pub const USER_TOTP_RM: Ep = Ep("DELETE", "/api/v1/users/{username}/totp");
pub const EVENT_STREAM: Ep = Ep("GET", "/api/v1/events/stream");

/// Every operation the CLI uses.
pub const ENDPOINTS: &[Ep] = &[
    LOGIN,
    LOGOUT,
    PASSWORD,
    CLUSTER,
    NODES,
    NODE_RM,
    NODE_MAINTENANCE,
    NODE_UPGRADE,
    NODE_UPGRADE_STATUS,
    SETTINGS,
    SETTINGS_SET,
    TOKEN_CREATE,
    TOKEN_RM,
    CERTIFICATE,
    CERTIFICATE_INSTALL,
    CERTIFICATE_RM,
    VOLUMES,
    VOLUME_CREATE,
    VOLUME,
    VOLUME_RM,
    SNAPSHOT_CREATE,
    SNAPSHOT_RM,
    CLONE,
    VOLUME_RESIZE,
    VOLUME_OVERRIDE,
    NBD_CREDS,
    VMS,
    VM_CREATE,
    VM,
    VM_SET,
    VM_RM,
    VM_START,
    VM_STOP,
    VM_KILL,
    VM_REBOOT,
    VM_PAUSE,
    VM_RESUME,
    VM_CONSOLE,
    VM_MIGRATE,
    VM_MIGRATE_CANCEL,
    VM_TEMPLATE,
    IMAGES,
    IMAGE_UPLOAD,
    IMAGE_RM,
    NETWORKS,
    NETWORK_CREATE,
    NETWORK_RM,
    TASKS,
    TASK,
    USERS,
    USER_CREATE,
    USER_SET,
    USER_RM,
    EVENTS,
    EVENT_STREAM,
    REALMS,
    REALM_CREATE,
    REALM,
    REALM_SET,
    REALM_RM,
    REALM_TEST,
    REALM_SYNC,
    LOGIN_POLICY,
    LOGIN_POLICY_SET,
    USER_TOTP_RM,
];

/// Fills the `{...}` parameters of a path template in order, percent-encoding them.
pub fn fill(template: &str, params: &[&str]) -> String {
    let mut out = String::new();
    let mut rest = template;
    let mut params = params.iter();
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .map(|e| start + e + 1)
            .unwrap_or(rest.len());
        let p = params.next().copied().unwrap_or_default();
        for b in p.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_parameters_are_filled_and_encoded() {
        assert_eq!(
            super::fill(
                "/api/v1/volumes/{name}/snapshots/{snapshot}",
                &["a b", "s/1"]
            ),
            "/api/v1/volumes/a%20b/snapshots/s%2F1"
        );
    }
}
