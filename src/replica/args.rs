//! Values of the daemons' command lines that need more than a type: node ids (`auto` from the host
//! name, as StatefulSet pods have no shell to compute theirs) and peer lists. Each error names the item
//! that is wrong, so `kvd` can print it as a usage error.

use crate::raft::NodeId;
use std::collections::HashMap;

/// Parse a node id: a number, or `auto` for the host name's trailing ordinal plus one (`kv-0` → 1), which
/// is how a StatefulSet's pods learn their id without a shell in the image.
pub fn parse_node_id(spec: &str) -> Result<NodeId, String> {
    if spec != "auto" {
        return spec
            .parse()
            .map_err(|_| format!("{spec:?} is not a node id (a number, or auto)"));
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .ok_or("--id auto: cannot read the host name (HOSTNAME or /etc/hostname)")?;
    id_from_hostname(&host)
}

/// `name-N` → N + 1.
pub fn id_from_hostname(host: &str) -> Result<NodeId, String> {
    let short = host.split('.').next().unwrap_or(host);
    short
        .rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse::<NodeId>().ok())
        .and_then(|ordinal| ordinal.checked_add(1))
        .ok_or_else(|| format!("--id auto: host name {host:?} does not end in -<ordinal>"))
}

/// Parse `1=host:port,2=host:port` into a map; the error says which item is wrong.
pub fn parse_peers(spec: &str) -> Result<HashMap<NodeId, String>, String> {
    let peers = parse_addresses(spec)?;
    if peers.is_empty() {
        return Err("no peers given".into());
    }
    Ok(peers)
}

/// [`parse_peers`] for an optional list (`--clients`): empty is allowed.
pub fn parse_addresses(spec: &str) -> Result<HashMap<NodeId, String>, String> {
    let mut peers = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, address) = item
            .split_once('=')
            .ok_or_else(|| format!("peer {item:?} is not ID=HOST:PORT"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| format!("peer {item:?}: {id:?} is not a node id"))?;
        if id == 0 {
            return Err(format!("peer {item:?}: node ids start at 1"));
        }
        let address = address.trim();
        if !crate::address::is_dialable(address) {
            return Err(format!(
                "peer {item:?}: {address:?} is not HOST:PORT that others can dial (a host name or \
                 a specific IP, IPv6 in brackets, and a non-zero port)"
            ));
        }
        if peers.insert(id, address.to_string()).is_some() {
            return Err(format!("node {id} is listed twice"));
        }
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::{id_from_hostname, parse_node_id, parse_peers};

    #[test]
    fn ids_come_from_statefulset_host_names() {
        assert_eq!(id_from_hostname("kv-0"), Ok(1));
        assert_eq!(
            id_from_hostname("ctrler-2.ctrler.default.svc.cluster.local"),
            Ok(3)
        );
        assert!(id_from_hostname("kv").is_err());
        assert!(id_from_hostname("kv-x").is_err());
        assert_eq!(parse_node_id("7"), Ok(7));
        assert!(parse_node_id("seven").is_err());
    }

    #[test]
    fn peers() {
        let peers = parse_peers("1=127.0.0.1:1, 2=localhost:2").expect("valid");
        assert_eq!(peers.get(&2).map(String::as_str), Some("localhost:2"));
        assert!(parse_peers("1=a:1,1=b:2").is_err());
        assert!(parse_peers("x=a:1").is_err());
        assert!(parse_peers("1=a").is_err());
        assert!(parse_peers("0=a:1").is_err());
        assert!(parse_peers("").is_err());
    }
}
