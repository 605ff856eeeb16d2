//! Who a certificate says its holder is: `ds824://<cluster>/<role>/<name>`, a URI in the certificate's
//! subject alternative names (the SPIFFE idea, without SPIFFE). The CA vouches for the whole identity,
//! so a service never has to trust what a request says about its sender.

use std::fmt;
use thiserror::Error;

/// The URI scheme of ds824 identities.
pub const SCHEME: &str = "ds824://";

/// What a certificate's holder may do. A replica's role is its Raft group, so a certificate issued to
/// node 2 of the controllers cannot speak for node 2 of a shard group.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A replica of the plain key/value store.
    Kv,
    /// A replica of the shard controller.
    Ctrler,
    /// A replica of shard group `gid`.
    Shard(u64),
    /// An ordinary client: reads, writes, status, controller queries.
    Client,
    /// An operator: what a client may do, plus `Join`/`Leave`/`Move` and MapReduce `Submit`.
    Admin,
    /// A MapReduce worker.
    Worker,
    /// The MapReduce coordinator.
    Coordinator,
}

impl Role {
    /// Whether this role runs a server that clients connect to (its certificate then names
    /// [`super::SERVER_NAME`], which clients verify).
    pub fn is_server(&self) -> bool {
        !matches!(self, Role::Client | Role::Admin)
    }

    /// The DNS name this role's servers carry in their certificate and clients that want exactly this
    /// role verify (`ctrler.server.ds824`, `shard-3.server.ds824`, `coordinator.server.ds824`, ...): so a
    /// certificate of another role — a worker's, another group's — cannot pass for one of these servers,
    /// even to a client whose traffic it intercepts.
    pub fn server_name(&self) -> String {
        format!("{self}.{}", super::SERVER_NAME)
    }

    /// The DNS name only replica `node` of this role carries (`2.kv.server.ds824`): what a Raft peer
    /// verifies when it connects to that node, so even a replica of the same group cannot pass for
    /// another one.
    pub fn replica_server_name(&self, node: u64) -> String {
        format!("{node}.{}", self.server_name())
    }

    /// The Raft group a replica role belongs to (the name its storage records), if it is one.
    pub fn raft_group(&self) -> Option<String> {
        match self {
            Role::Kv => Some("kv".into()),
            Role::Ctrler => Some("ctrler".into()),
            Role::Shard(gid) => Some(format!("shard-{gid}")),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Kv => f.write_str("kv"),
            Role::Ctrler => f.write_str("ctrler"),
            Role::Shard(gid) => write!(f, "shard-{gid}"),
            Role::Client => f.write_str("client"),
            Role::Admin => f.write_str("admin"),
            Role::Worker => f.write_str("worker"),
            Role::Coordinator => f.write_str("coordinator"),
        }
    }
}

impl std::str::FromStr for Role {
    type Err = PrincipalError;

    fn from_str(s: &str) -> Result<Role, PrincipalError> {
        Ok(match s {
            "kv" => Role::Kv,
            "ctrler" => Role::Ctrler,
            "client" => Role::Client,
            "admin" => Role::Admin,
            "worker" => Role::Worker,
            "coordinator" => Role::Coordinator,
            other => match other.strip_prefix("shard-").map(str::parse::<u64>) {
                Some(Ok(gid)) if gid > 0 => Role::Shard(gid),
                _ => return Err(PrincipalError::Role(other.to_string())),
            },
        })
    }
}

/// An authenticated identity: the cluster that issued it, its role and its name (a node id for
/// replicas).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Principal {
    /// The cluster name the CA was created for.
    pub cluster: String,
    /// What the holder may do.
    pub role: Role,
    /// Which one of its role it is (a replica's node id).
    pub name: String,
}

/// Why a certificate or identity string is not a ds824 identity.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PrincipalError {
    /// Not of the form `ds824://cluster/role/name`.
    #[error("{0:?} is not a ds824 identity (ds824://<cluster>/<role>/<name>)")]
    Malformed(String),
    /// An unknown role.
    #[error("unknown role {0:?} (kv, ctrler, shard-<gid>, client, admin, worker, coordinator)")]
    Role(String),
    /// A certificate that cannot be parsed.
    #[error("unreadable certificate: {0}")]
    Certificate(String),
    /// A certificate with no ds824 identity.
    #[error("the certificate carries no ds824:// identity")]
    Missing,
}

/// Cluster names and names: letters, digits, `-`, `_` and `.`; so they fit in a URI path and a file name.
pub fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 64
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Principal {
    /// A replica's principal.
    pub fn node(cluster: &str, role: Role, id: u64) -> Principal {
        Principal {
            cluster: cluster.to_string(),
            role,
            name: id.to_string(),
        }
    }

    /// The identity as the URI written into certificates.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}/{}", self.cluster, self.role, self.name)
    }

    /// Parse `ds824://cluster/role/name`.
    pub fn parse_uri(uri: &str) -> Result<Principal, PrincipalError> {
        let malformed = || PrincipalError::Malformed(uri.to_string());
        let rest = uri.strip_prefix(SCHEME).ok_or_else(malformed)?;
        let mut parts = rest.split('/');
        let (Some(cluster), Some(role), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        if !valid_label(cluster) || !valid_label(name) {
            return Err(malformed());
        }
        Ok(Principal {
            cluster: cluster.to_string(),
            role: role.parse()?,
            name: name.to_string(),
        })
    }

    /// The identity in a DER certificate (the first `ds824://` URI among its alternative names).
    pub fn from_certificate(der: &[u8]) -> Result<Principal, PrincipalError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PrincipalError::Certificate(e.to_string()))?;
        let names = cert
            .subject_alternative_name()
            .map_err(|e| PrincipalError::Certificate(e.to_string()))?
            .ok_or(PrincipalError::Missing)?;
        let uri = names
            .value
            .general_names
            .iter()
            .find_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with(SCHEME) => Some(*uri),
                _ => None,
            })
            .ok_or(PrincipalError::Missing)?;
        Principal::parse_uri(uri)
    }

    /// The node id, for a replica's principal. Only the canonical spelling names one: "01" or "+1"
    /// would otherwise be a second certificate passing for node 1.
    pub fn node_id(&self) -> Option<u64> {
        canonical_node_id(&self.name)
    }
}

/// `name` as a node id if it is one written the one way ids are printed (no sign, no leading zero,
/// not 0).
pub fn canonical_node_id(name: &str) -> Option<u64> {
    name.parse::<u64>()
        .ok()
        .filter(|id| *id != 0 && id.to_string() == name)
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_malformed_ones_are_refused() {
        for role in [
            Role::Kv,
            Role::Ctrler,
            Role::Shard(7),
            Role::Admin,
            Role::Worker,
        ] {
            let p = Principal::node("prod", role, 3);
            assert_eq!(Principal::parse_uri(&p.uri()), Ok(p));
        }
        for bad in [
            "http://prod/kv/1",
            "ds824://prod/kv",
            "ds824://prod/kv/1/x",
            "ds824:///kv/1",
            "ds824://prod/shard-0/1",
            "ds824://prod/root/1",
            "ds824://pr od/kv/1",
        ] {
            assert!(Principal::parse_uri(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_replica_is_named_by_its_node_id_one_way_only() {
        let named = |name: &str| Principal::parse_uri(&format!("ds824://prod/kv/{name}"));
        assert_eq!(named("1").expect("node 1").node_id(), Some(1));
        assert_eq!(named("12").expect("node 12").node_id(), Some(12));
        // Each of these parses as a number, and would have passed for node 1 (or 0).
        for alias in ["01", "001", "+1", "0"] {
            if let Ok(principal) = named(alias) {
                assert_eq!(principal.node_id(), None, "{alias} names a node");
            }
        }
    }
}
