//! Events: what happened in the cluster, who did it, when.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Something that happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Sortable id: time, then a random part.
    pub id: String,
    /// When (ms since the epoch).
    pub time_ms: u64,
    /// What kind, e.g. `volume.create`, `vm.update`, `task.failed`.
    pub kind: String,
    /// What it is about (a volume, VM, user... name).
    pub target: String,
    /// Who did it (a user, or `tesserad` for the system).
    pub user: String,
    /// In words.
    pub message: String,
    /// The address the request that made it came from (absent for what the cluster did
    /// by itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The ids of the nodes the event is about, in the order its message names them (the
    /// message uses their names); absent for an event about no node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
}

/// Which events.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only events after this id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// At most this many, the newest (default 100, at most 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
    /// Only events by this user (who did it, or whose login it was; refused requests
    /// name who made them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Where an event stream starts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Start after this event id (default: now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// One Server-Sent Event of `GET /api/v1/events/stream`: `event: event`, `id:` the
/// event's id, `data:` the [`Event`] as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StreamedEvent {
    /// Always `event`.
    #[schema(pattern = "^event$")]
    pub event: String,
    /// The event's id (resume with `since=<id>`).
    pub id: String,
    /// The [`Event`], as JSON.
    #[schema(schema_with = event_json)]
    pub data: String,
}

fn event_json() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    use utoipa::openapi::Ref;
    ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/json")
        .content_schema(Some(Ref::from_schema_name("Event")))
        .build()
}
