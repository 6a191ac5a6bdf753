//! The argument parsers' unit tests.

#[test]
fn durations_parse() {
    assert_eq!(super::parse_duration("90m"), Ok(5400));
    assert_eq!(super::parse_duration("3600"), Ok(3600));
    assert_eq!(super::parse_duration("30d"), Ok(2_592_000));
    assert!(super::parse_duration("soon").is_err());
}

#[test]
fn roles_and_states_are_the_api_words() {
    use tessera_api::{DesiredState, Role};
    assert_eq!(super::parse_role("operator"), Ok(Role::Operator));
    assert!(super::parse_role("root")
        .unwrap_err()
        .contains("not a role"));
    assert_eq!(
        super::parse_desired_state("running"),
        Ok(DesiredState::Running)
    );
    assert!(super::parse_desired_state("halted").is_err());
}

#[test]
fn a_nic_is_a_network_and_maybe_a_mac() {
    let n = super::parse_nic("lan").unwrap();
    assert_eq!((n.network.as_str(), n.mac), ("lan", None));
    let n = super::parse_nic("dmz,mac=02:00:5e:00:00:07").unwrap();
    assert_eq!(n.mac.as_deref(), Some("02:00:5e:00:00:07"));
    for bad in [
        "",
        ",mac=02:00:5e:00:00:07",
        "lan,mac=",
        "lan,ip=1",
        "mac=x",
        "a,mac=1,mac=2",
    ] {
        assert!(super::parse_nic(bad).is_err(), "{bad}");
    }
}

#[test]
fn the_command_line_is_consistent() {
    use clap::CommandFactory;
    super::Cli::command().debug_assert();
}
