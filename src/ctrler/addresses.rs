//! Where a group's servers are reached: by the other groups (inside the cluster's network) and by
//! clients (possibly outside it).
//!
//! Why two addresses: in a container network a server is `g1a:7201` to its peers, a name nothing
//! outside resolves, while a client on the host reaches it through a published port
//! (`127.0.0.1:17201`). etcd keeps peer URLs and advertised client URLs apart for the same reason. A
//! group's entry in a configuration is `PEER` or `PEER@CLIENT` (`g1a:7201@127.0.0.1:17201`); the
//! controllers store it as it was joined and never look inside (their state, log and wire format are
//! unchanged; `kvctl ctrler join` checks the form). Groups pull shards from each other's `PEER` addresses; clerks use the `CLIENT` ones
//! where a group advertises them ([`AddressView::Advertised`], the default), or the peer addresses
//! when they run inside the network themselves ([`AddressView::Internal`]).

/// Which address of each server a clerk uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AddressView {
    /// The client address a server advertises (after `@`), or its peer address if it advertises
    /// none: what a client outside the cluster's network needs.
    #[default]
    Advertised,
    /// Always the peer address (before `@`): for clients inside the cluster's network.
    Internal,
}

/// Separates a server's peer address from the client address it advertises.
pub const ADVERTISE_SEPARATOR: char = '@';

/// The address other groups reach `entry` at.
pub fn peer_address(entry: &str) -> &str {
    entry
        .split_once(ADVERTISE_SEPARATOR)
        .map_or(entry, |(peer, _)| peer)
}

/// The address a client sees `entry` at, as `view` says.
pub fn client_address(entry: &str, view: AddressView) -> &str {
    match (view, entry.split_once(ADVERTISE_SEPARATOR)) {
        (AddressView::Advertised, Some((_, client))) => client,
        _ => peer_address(entry),
    }
}

/// The peer addresses of a group's entries, in order.
pub fn peer_addresses(entries: &[String]) -> Vec<String> {
    entries
        .iter()
        .map(|e| peer_address(e).to_string())
        .collect()
}

/// The client addresses of a group's entries, in order, as `view` says.
pub fn client_addresses(entries: &[String], view: AddressView) -> Vec<String> {
    entries
        .iter()
        .map(|e| client_address(e, view).to_string())
        .collect()
}

/// Check one entry as a user typed it: `PEER` or `PEER@CLIENT`, each part non-empty and without
/// spaces, at most one `@`.
pub fn validate_entry(entry: &str) -> Result<(), String> {
    let mut parts = entry.split(ADVERTISE_SEPARATOR);
    let peer = parts.next().unwrap_or_default();
    let client = parts.next();
    if parts.next().is_some() {
        return Err(format!(
            "{entry:?}: one {ADVERTISE_SEPARATOR} at most (PEER@CLIENT)"
        ));
    }
    for (what, part) in [("peer", Some(peer)), ("client", client)] {
        if let Some(part) = part {
            if part.is_empty() || part.contains(char::is_whitespace) {
                return Err(format!(
                    "{entry:?}: the {what} address is empty or has spaces (PEER or PEER@CLIENT, \
                     e.g. g1a:7201@127.0.0.1:17201)"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_use_the_peer_address_and_clients_the_advertised_one() {
        let entries = vec![
            "g1a:7201@127.0.0.1:17201".to_string(),
            "g1b:7201".to_string(),
        ];
        assert_eq!(peer_addresses(&entries), ["g1a:7201", "g1b:7201"]);
        assert_eq!(
            client_addresses(&entries, AddressView::Advertised),
            ["127.0.0.1:17201", "g1b:7201"]
        );
        assert_eq!(
            client_addresses(&entries, AddressView::Internal),
            ["g1a:7201", "g1b:7201"]
        );
    }

    #[test]
    fn malformed_entries_are_refused_with_the_form_expected() {
        assert!(validate_entry("g1a:7201").is_ok());
        assert!(validate_entry("g1a:7201@127.0.0.1:17201").is_ok());
        for bad in ["@127.0.0.1:1", "g1a:7201@", "a@b@c", "g1a 7201"] {
            let error = validate_entry(bad).expect_err(bad);
            assert!(error.contains("PEER"), "{error}");
        }
    }
}
