//! A throwaway certificate authority for process tests: `kvctl certs` as a library.
#![allow(dead_code)]

use ds824::security::{certs, Security};
use std::path::{Path, PathBuf};

/// A CA for `cluster` in a fresh directory under `root`.
pub fn ca(root: &Path, name: &str, cluster: &str) -> PathBuf {
    let dir = root.join(name);
    certs::init(&dir, cluster, 1).expect("init CA");
    dir
}

/// The certificate and key of `role`/`name` (issued once, reused afterwards).
pub fn issue(ca: &Path, role: &str, name: &str) -> (PathBuf, PathBuf) {
    let cert = ca.join(format!("{role}-{name}.pem"));
    let key = ca.join(format!("{role}-{name}-key.pem"));
    if !cert.exists() {
        certs::issue(ca, role, name, &[], 1).expect("issue certificate");
    }
    (cert, key)
}

/// A client's security with a certificate of `role` from `ca`.
pub fn security(ca: &Path, role: &str, name: &str) -> Security {
    let (cert, key) = issue(ca, role, name);
    Security::load_tls(&ca.join("ca.pem"), &cert, &key).expect("load TLS")
}

/// Give a child process (`kvd`, `kvctl`, `mrd`) the TLS flags of `role`/`name` from the CA in `ca`, or
/// `--insecure` without one.
pub fn flags(command: &mut std::process::Command, identity: Option<(&Path, &str, &str)>) {
    match identity {
        Some((ca, role, name)) => {
            let (cert, key) = issue(ca, role, name);
            command
                .arg("--tls-ca")
                .arg(ca.join("ca.pem"))
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        None => {
            command.arg("--insecure");
        }
    }
}
