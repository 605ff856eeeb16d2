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
    /// what this process may do.
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

impl TlsArgs {
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
