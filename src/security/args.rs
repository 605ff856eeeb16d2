//! The TLS flags every binary shares, with the same environment variables everywhere.

use super::{Security, SecurityError};
use clap::Args;
use std::path::PathBuf;

/// `--tls-ca`, `--tls-cert`, `--tls-key`, `--insecure`.
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// The cluster CA certificate (PEM): peers and clients must present a certificate it signed.
    #[arg(long, env = "DS824_TLS_CA", value_name = "FILE", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), issued by `kvctl certs issue`; its ds824:// identity says
    /// what this process may do. `kvd` replaces `{id}` in this path and --tls-key's with its node id
    /// (one set of flags for every replica, e.g. a StatefulSet with `--id auto`).
    #[arg(long, env = "DS824_TLS_CERT", value_name = "FILE", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "DS824_TLS_KEY", value_name = "FILE", global = true)]
    pub tls_key: Option<PathBuf>,
    /// Plaintext without authentication, for local development only: anyone who reaches a port may
    /// do anything. Without it, the three --tls-* files are required.
    #[arg(
        long,
        env = "DS824_INSECURE",
        global = true,
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue,
    )]
    pub insecure: bool,
}

/// The placeholder in `--tls-cert`/`--tls-key` paths that a replica replaces with its node id.
pub const NODE_ID_PLACEHOLDER: &str = "{id}";

impl TlsArgs {
    /// The same flags with [`NODE_ID_PLACEHOLDER`] in the certificate and key paths replaced by `id`:
    /// every replica of a Kubernetes StatefulSet runs with the same arguments (its id comes from the
    /// host name, `--id auto`), yet each must present its own certificate out of one shared secret.
    pub fn for_node(&self, id: u64) -> TlsArgs {
        let substitute = |path: &Option<PathBuf>| {
            path.as_ref().map(|p| {
                PathBuf::from(
                    p.to_string_lossy()
                        .replace(NODE_ID_PLACEHOLDER, &id.to_string()),
                )
            })
        };
        TlsArgs {
            tls_ca: self.tls_ca.clone(),
            tls_cert: substitute(&self.tls_cert),
            tls_key: substitute(&self.tls_key),
            insecure: self.insecure,
        }
    }

    /// The security these flags ask for: TLS from the three files, or plaintext with `--insecure`.
    pub fn security(&self) -> Result<Security, SecurityError> {
        let files = (&self.tls_ca, &self.tls_cert, &self.tls_key);
        match (self.insecure, files) {
            (true, (None, None, None)) => Ok(Security::Insecure),
            (true, _) => Err(SecurityError::Usage(
                "--insecure and --tls-* exclude each other".into(),
            )),
            (false, (Some(ca), Some(cert), Some(key))) => Security::load_tls(ca, cert, key),
            (false, (None, None, None)) => Err(SecurityError::Usage(
                "TLS is required: pass --tls-ca, --tls-cert and --tls-key (or DS824_TLS_CA, \
                 DS824_TLS_CERT, DS824_TLS_KEY; `kvctl certs` makes them), or --insecure for \
                 plaintext local development"
                    .into(),
            )),
            (false, _) => Err(SecurityError::Usage(
                "--tls-ca, --tls-cert and --tls-key go together: give all three".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_picks_its_own_certificate_out_of_a_shared_directory() {
        let args = TlsArgs {
            tls_ca: Some("/certs/ca.pem".into()),
            tls_cert: Some("/certs/shard-2-{id}.pem".into()),
            tls_key: Some("/certs/shard-2-{id}-key.pem".into()),
            insecure: false,
        };
        let node = args.for_node(3);
        assert_eq!(node.tls_ca, args.tls_ca);
        assert_eq!(node.tls_cert, Some("/certs/shard-2-3.pem".into()));
        assert_eq!(node.tls_key, Some("/certs/shard-2-3-key.pem".into()));
    }
}
