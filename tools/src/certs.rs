//! Certificates per host (`strait certs ca | request | sign`): the CA key stays on the
//! CA's host, each node's key on the node's host; only a certificate request and the
//! signed certificate travel. Renewal: sign a new request (or the same one again) and
//! replace the node's certificate and key files; the daemon loads them on SIGHUP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use strait::transport::{CertAuthority, PeerRole, certificate_request, write_pem};

fn write(path: &Path, text: &str, secret: bool) -> Result<PathBuf, String> {
    write_pem(path, text, secret).map_err(|e| e.to_string())
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A new CA in `dir`: `ca.pem` (hand it to every node) and `ca.key` (keep it here).
pub fn ca(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let key = dir.join("ca.key");
    if key.exists() {
        return Err(format!(
            "{} exists: a second CA would not be trusted by nodes of the first",
            key.display()
        ));
    }
    let ca = CertAuthority::generate("strait cluster CA").map_err(|e| e.to_string())?;
    Ok(vec![
        write(&dir.join("ca.pem"), ca.cert_pem(), false)?,
        write(&key, ca.key_pem(), true)?,
    ])
}

/// On a node's host: `<node>.key` (stays here) and `<node>.csr` (goes to the CA) in `dir`.
pub fn request(node: &str, dir: &Path) -> Result<Vec<PathBuf>, String> {
    let (csr, key) = certificate_request(node).map_err(|e| e.to_string())?;
    Ok(vec![
        write(&dir.join(format!("{node}.key")), &key, true)?,
        write(&dir.join(format!("{node}.csr")), &csr, false)?,
    ])
}

/// On the CA's host: the certificate for `csr` with `role`, valid for `validity`,
/// written to `out`.
pub fn sign(
    ca_dir: &Path,
    csr: &Path,
    role: PeerRole,
    validity: Duration,
    out: &Path,
) -> Result<PathBuf, String> {
    let ca = CertAuthority::load(
        &read(&ca_dir.join("ca.pem"))?,
        &read(&ca_dir.join("ca.key"))?,
    )
    .map_err(|e| e.to_string())?;
    let cert = ca
        .sign_request(&read(csr)?, role, validity)
        .map_err(|e| format!("{}: {e}", csr.display()))?;
    write(out, &cert, false)
}
