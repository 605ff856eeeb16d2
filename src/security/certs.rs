//! The cluster's certificate authority on disk (`kvctl certs init` / `kvctl certs issue`).
//!
//! A directory holds `ca.pem` (the CA certificate every node and client trusts), `ca-key.pem` (its
//! key: keep it off the nodes), `cluster` (the cluster name every identity is issued for) and one
//! `<role>-<name>.pem` / `<role>-<name>-key.pem` pair per issued certificate. Keys are ECDSA P-256;
//! every leaf certificate may be used as both TLS server and TLS client, since replicas are both.

use super::principal::{valid_label, Principal, PrincipalError, Role};
use super::SERVER_NAME;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

/// Why a CA operation failed.
#[derive(Debug, Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Refused input (an existing CA, a bad name, a role that does not exist).
    #[error("{0}")]
    Invalid(String),
    /// An identity that does not parse.
    #[error(transparent)]
    Principal(#[from] PrincipalError),
    /// The certificate library failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What one issued certificate is and where it was written.
#[derive(Debug)]
pub struct Issued {
    /// The identity in it.
    pub principal: Principal,
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, readable by the owner only).
    pub key: PathBuf,
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    use std::io::Write;
    let mut file = options.open(path).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks that are a little behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days.max(1)));
}

/// Create a CA for cluster `cluster` in `dir` (created if missing). Refuses to overwrite an existing CA:
/// every certificate it issued would stop working.
pub fn init(dir: &Path, cluster: &str, days: u32) -> Result<PathBuf, CertError> {
    if !valid_label(cluster) {
        return Err(CertError::Invalid(format!(
            "cluster name {cluster:?}: use 1-64 letters, digits, '-', '_' or '.'"
        )));
    }
    let ca_path = dir.join("ca.pem");
    if ca_path.exists() {
        return Err(CertError::Invalid(format!(
            "{} already exists: a new CA would invalidate every certificate the old one issued",
            ca_path.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let params = ca_params(cluster, days);
    let cert = params.self_signed(&key)?;
    write(&dir.join("ca-key.pem"), &key.serialize_pem(), true)?;
    write(&dir.join("cluster"), &format!("{cluster}\n"), false)?;
    write(&ca_path, &cert.pem(), false)?;
    Ok(ca_path)
}

fn ca_params(cluster: &str, days: u32) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("ds824 CA for {cluster}"));
    name.push(DnType::OrganizationName, "ds824");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, days);
    params
}

/// The cluster name a CA directory was created for.
pub fn cluster_of(dir: &Path) -> Result<String, CertError> {
    Ok(read(&dir.join("cluster"))?.trim().to_string())
}

/// Issue a certificate for `role`/`name` with the CA in `dir`, valid for `days`. `hosts` are extra DNS
/// names or IP addresses to put in it (servers are verified under their role's name,
/// [`Role::server_name`], and replicas also under [`SERVER_NAME`], so these are only for other tools
/// such as curl).
pub fn issue(
    dir: &Path,
    role: &str,
    name: &str,
    hosts: &[String],
    days: u32,
) -> Result<Issued, CertError> {
    issue_into(dir, dir, role, name, hosts, days)
}

/// Whether `host` is, or is under, the names servers are verified by ([`SERVER_NAME`]): DNS names
/// compare case-insensitively, and a trailing dot or a wildcard changes nothing.
fn is_reserved_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let host = host.strip_prefix("*.").unwrap_or(&host);
    host == SERVER_NAME || host.ends_with(&format!(".{SERVER_NAME}")) || host == "*"
}

/// [`issue`] with the CA in `dir` and the certificate, its key and a copy of `ca.pem` written to `out`:
/// the CA key then never has to be where the certificates are handed out (a volume every container
/// mounts, a Kubernetes Secret).
pub fn issue_into(
    dir: &Path,
    out: &Path,
    role: &str,
    name: &str,
    hosts: &[String],
    days: u32,
) -> Result<Issued, CertError> {
    let cluster = cluster_of(dir)?;
    let role: Role = role.parse()?;
    if !valid_label(name) {
        return Err(CertError::Invalid(format!(
            "name {name:?}: use 1-64 letters, digits, '-', '_' or '.'"
        )));
    }
    if role.raft_group().is_some() && super::principal::canonical_node_id(name).is_none() {
        return Err(CertError::Invalid(format!(
            "a {role} replica's name is its node id (1, 2, ...; no leading zeros), not {name:?}"
        )));
    }
    if let Some(reserved) = hosts.iter().find(|host| is_reserved_name(host)) {
        return Err(CertError::Invalid(format!(
            "--host {reserved}: names under {SERVER_NAME} are the identities servers are checked by, \
             given by role (a {role} certificate gets its own); another certificate carrying one \
             could answer as that server"
        )));
    }
    let principal = Principal {
        cluster,
        role,
        name: name.to_string(),
    };
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca-key.pem"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&dir.join("ca.pem"))?, ca_key)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, principal.uri());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(principal.uri().try_into()?)];
    if principal.role.is_server() {
        let name = principal.role.server_name();
        params
            .subject_alt_names
            .push(SanType::DnsName(name.as_str().try_into()?));
    }
    if principal.role.raft_group().is_some() {
        params
            .subject_alt_names
            .push(SanType::DnsName(SERVER_NAME.try_into()?));
        // Checked above: a replica's name is its node id.
        if let Some(node) = super::principal::canonical_node_id(&principal.name) {
            let name = principal.role.replica_server_name(node);
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
    }
    for host in hosts {
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.as_str().try_into()?),
        };
        params.subject_alt_names.push(san);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let stem = format!("{}-{}", principal.role, principal.name);
    if out != dir {
        std::fs::create_dir_all(out).map_err(|source| CertError::Io {
            path: out.to_path_buf(),
            source,
        })?;
        let ca = read(&dir.join("ca.pem"))?;
        write(&out.join("ca.pem"), &ca, false)?;
    }
    let cert_path = out.join(format!("{stem}.pem"));
    let key_path = out.join(format!("{stem}-key.pem"));
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok(Issued {
        principal,
        cert: cert_path,
        key: key_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DNS names a certificate answers to.
    fn dns_names(pem_path: &Path) -> Vec<String> {
        use x509_parser::extensions::GeneralName;
        let pem = std::fs::read(pem_path).expect("read");
        let der = super::super::pem_certificates(&pem).expect("pem").remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let names = cert.subject_alternative_name().expect("san").expect("some");
        names
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some(dns.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_server_answers_only_to_its_role_and_a_replica_to_its_node_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), "prod", 30).expect("init");
        let names = |role: &str, name: &str| {
            let issued = issue(dir.path(), role, name, &[], 30).expect("issue");
            let mut names = dns_names(&issued.cert);
            names.sort();
            names
        };
        assert_eq!(
            names("kv", "2"),
            ["2.kv.server.ds824", "kv.server.ds824", "server.ds824"]
        );
        assert_eq!(names("worker", "pool"), ["worker.server.ds824"]);
        assert_eq!(names("coordinator", "1"), ["coordinator.server.ds824"]);
        assert!(names("client", "user").is_empty());
        assert!(names("admin", "ops").is_empty());
        // A second spelling of node 2 would be a second identity passing for it.
        for alias in ["02", "002", "0"] {
            let refused = issue(dir.path(), "kv", alias, &[], 30).expect_err(alias);
            assert!(
                refused.to_string().contains("node id"),
                "{alias}: {refused}"
            );
        }
    }

    /// Clients check a server by the DNS name its role gives it: a client's (or another role's)
    /// certificate carrying such a name, by `--host`, could answer as that server.
    #[test]
    fn extra_hosts_cannot_take_a_name_servers_are_checked_by() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), "prod", 30).expect("init");
        for host in [
            "shard-1.server.ds824",
            "server.ds824",
            "KV.Server.DS824.",
            "*.server.ds824",
            "*",
        ] {
            let refused = issue(dir.path(), "client", "x", &[host.to_string()], 30);
            assert!(
                matches!(&refused, Err(CertError::Invalid(why)) if why.contains(host)),
                "{host}: {refused:?}"
            );
        }
        let hosts = ["kv-1.example.com".to_string(), "10.0.0.7".to_string()];
        let issued = issue(dir.path(), "kv", "1", &hosts, 30).expect("ordinary hosts");
        assert!(dns_names(&issued.cert).contains(&hosts[0]));
    }

    #[test]
    fn certificates_can_be_handed_out_without_the_ca_key() {
        let ca = tempfile::tempdir().expect("tempdir");
        let out = tempfile::tempdir().expect("tempdir");
        init(ca.path(), "prod", 30).expect("init");
        let issued = issue_into(ca.path(), out.path(), "kv", "1", &[], 30).expect("issue");
        assert!(issued.cert.starts_with(out.path()) && issued.key.starts_with(out.path()));
        let mut files: Vec<_> = std::fs::read_dir(out.path())
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, ["ca.pem", "kv-1-key.pem", "kv-1.pem"]);
        let tls = crate::security::Security::load_tls(
            &out.path().join("ca.pem"),
            &issued.cert,
            &issued.key,
        );
        assert!(
            tls.is_ok(),
            "the handed-out files are not a usable identity"
        );
    }

    #[test]
    fn issued_certificates_carry_their_identity_and_a_ca_is_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), "prod", 30).expect("init");
        assert!(init(dir.path(), "prod", 30).is_err(), "CA overwritten");
        let issued = issue(dir.path(), "shard-3", "2", &["10.0.0.7".into()], 30).expect("issue");
        let pem = std::fs::read(&issued.cert).expect("read");
        let der = super::super::pem_certificates(&pem).expect("pem").remove(0);
        let principal = Principal::from_certificate(&der).expect("identity");
        assert_eq!(principal, Principal::node("prod", Role::Shard(3), 2));
        assert!(
            issue(dir.path(), "kv", "one", &[], 30).is_err(),
            "non-numeric node id"
        );
        assert!(
            issue(dir.path(), "root", "x", &[], 30).is_err(),
            "unknown role"
        );
    }
}
