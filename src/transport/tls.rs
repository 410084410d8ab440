//! Mutual TLS for node links: a cluster CA, one certificate per node naming the node (as
//! a DNS subject alternative name), ALPN `strait/1`, TLS 1.3 only, ring as the provider.
//!
//! A server requires a client certificate from the cluster CA; a client checks that the
//! server's certificate names the node it meant to reach. Which node a client is, is read
//! from its certificate ([`peer_name`]) and then looked up in the topology by the caller.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::TransportError;

/// The ALPN protocol id of strait links.
pub const ALPN: &[u8] = b"strait/1";

/// A node's TLS identity: the cluster CA it trusts, its certificate chain and key.
pub struct TlsIdentity {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TlsIdentity")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn tls_err(what: impl Into<String>) -> TransportError {
    TransportError::Tls(what.into())
}

impl TlsIdentity {
    /// Loads PEM files: the CA certificate, the node's certificate (chain), its key. A key
    /// file that its group or other users may read is refused.
    pub fn from_pem_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TransportError> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key)
            .map_err(|e| tls_err(format!("{}: {e}", key.display())))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(tls_err(format!(
                "{}: private key is readable by others (mode {:o}); chmod 600 it",
                key.display(),
                mode & 0o777
            )));
        }
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| tls_err(format!("{}: {e}", p.display())));
        Self::from_pem(&read(ca)?, &read(cert)?, &read(key)?).map_err(|e| {
            tls_err(format!(
                "{} / {} / {}: {e}",
                ca.display(),
                cert.display(),
                key.display()
            ))
        })
    }

    /// Parses PEM text: the CA certificate, the node's certificate (chain), its key.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TransportError> {
        let ca = CertificateDer::from_pem_slice(ca)
            .map_err(|e| tls_err(format!("CA certificate: {e}")))?;
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_err(format!("node certificate: {e}")))?;
        if chain.is_empty() {
            return Err(tls_err("node certificate: no certificate in PEM"));
        }
        let key =
            PrivateKeyDer::from_pem_slice(key).map_err(|e| tls_err(format!("node key: {e}")))?;
        Ok(TlsIdentity { ca, chain, key })
    }

    fn roots(&self) -> Result<RootCertStore, TransportError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| tls_err(format!("CA certificate: {e}")))?;
        Ok(roots)
    }

    /// Server side: requires a client certificate from the CA.
    pub fn server_config(&self) -> Result<ServerConfig, TransportError> {
        self.server_config_with(Arc::new(CertSlot::new(self)?))
    }

    /// Client side: trusts only the CA, presents the node's certificate.
    pub fn client_config(&self) -> Result<ClientConfig, TransportError> {
        self.client_config_with(Arc::new(CertSlot::new(self)?))
    }

    /// Like [`server_config`](Self::server_config), presenting what `slot` holds at each
    /// handshake.
    pub(crate) fn server_config_with(
        &self,
        slot: Arc<CertSlot>,
    ) -> Result<ServerConfig, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider.clone())
                .build()
                .map_err(|e| tls_err(format!("client verifier: {e}")))?;
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(slot);
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// Like [`client_config`](Self::client_config), presenting what `slot` holds.
    pub(crate) fn client_config_with(
        &self,
        slot: Arc<CertSlot>,
    ) -> Result<ClientConfig, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_cert_resolver(slot);
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// The CA certificate this identity trusts.
    pub(crate) fn ca(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// The node name of this identity's own certificate.
    pub fn name(&self) -> Result<String, TransportError> {
        peer_name(&self.chain[0])
    }

    /// Checks its own certificate as a peer would: chains to its CA, valid now, for its
    /// name.
    pub(crate) fn verify_own(&self) -> Result<(), TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider,
        )
        .build()
        .map_err(|e| tls_err(format!("verifier: {e}")))?;
        let name = rustls::pki_types::ServerName::try_from(self.name()?)
            .map_err(|e| tls_err(format!("certificate name: {e}")))?;
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            verifier.as_ref(),
            &self.chain[0],
            &self.chain[1..],
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map_err(|e| tls_err(format!("certificate: {e}")))?;
        Ok(())
    }
}

/// The certificate and key a node presents, swappable while it runs (renewal): both
/// sides of every new handshake, TCP and QUIC, read it.
#[derive(Debug)]
pub(crate) struct CertSlot(std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>);

impl CertSlot {
    pub(crate) fn new(id: &TlsIdentity) -> Result<Self, TransportError> {
        Ok(CertSlot(std::sync::RwLock::new(certified(id)?)))
    }

    /// Presents `id`'s certificate from the next handshake on.
    pub(crate) fn replace(&self, id: &TlsIdentity) -> Result<(), TransportError> {
        let new = certified(id)?;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = new;
        Ok(())
    }

    fn get(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// When the certificate presented now expires.
    pub(crate) fn expiry(&self) -> Option<std::time::SystemTime> {
        let ck = self.get();
        let (_, cert) = x509_parser::parse_x509_certificate(ck.end_entity_cert().ok()?).ok()?;
        let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
    }
}

/// The certified key of `id`, checked: the key matches the certificate.
fn certified(id: &TlsIdentity) -> Result<Arc<rustls::sign::CertifiedKey>, TransportError> {
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(id.key.clone_key())
        .map_err(|e| tls_err(format!("node key: {e}")))?;
    let ck = rustls::sign::CertifiedKey::new(id.chain.clone(), key);
    ck.keys_match()
        .map_err(|e| tls_err(format!("node certificate/key: {e}")))?;
    Ok(Arc::new(ck))
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }
}

impl rustls::client::ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The node name a verified peer certificate carries (its first DNS subject alternative
/// name).
pub fn peer_name(cert: &CertificateDer<'_>) -> Result<String, TransportError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TransportError::PeerIdentity(format!("unparsable peer certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TransportError::PeerIdentity(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| {
            TransportError::PeerIdentity("peer certificate has no subjectAltName".into())
        })?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(s) => Some(s.to_string()),
            _ => None,
        })
        .ok_or_else(|| TransportError::PeerIdentity("peer certificate names no node".into()))
}

/// What a certificate lets its holder do, read from a subject-alternative-name URI
/// (`urn:strait:role:node` or `urn:strait:role:client`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// A storage node: relays, copies, recovers any block.
    Node,
    /// A client: reads, writes new blocks, and recovers its own writes in progress. A
    /// certificate that names no role is a client's.
    Client,
}

impl PeerRole {
    fn uri(self) -> &'static str {
        match self {
            PeerRole::Node => "urn:strait:role:node",
            PeerRole::Client => "urn:strait:role:client",
        }
    }
}

impl std::fmt::Display for PeerRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerRole::Node => "node",
            PeerRole::Client => "client",
        })
    }
}

/// The role a verified peer certificate grants: the role URI among its subject
/// alternative names; none (or an unparsable certificate) is [`PeerRole::Client`].
pub fn peer_role(cert: &CertificateDer<'_>) -> PeerRole {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return PeerRole::Client;
    };
    let node = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value.general_names.iter().any(|n| {
                matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == PeerRole::Node.uri())
            })
        });
    if node {
        PeerRole::Node
    } else {
        PeerRole::Client
    }
}

/// A cluster certificate authority that issues node certificates (for `strait certs`,
/// the local cluster and tests).
pub struct CertAuthority {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert_pem: String,
    key_pem: String,
}

/// PEM files of one identity.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

impl CertAuthority {
    /// A new CA with a fresh key.
    pub fn generate(name: &str) -> Result<Self, TransportError> {
        let key = rcgen::KeyPair::generate().map_err(|e| tls_err(format!("CA key: {e}")))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| tls_err(e.to_string()))?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|e| tls_err(format!("CA certificate: {e}")))?;
        Ok(CertAuthority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key, PEM (keep it secret; needed to issue more node certificates).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a node certificate for `name`, usable as TLS server and client.
    pub fn issue(&self, name: &str) -> Result<IssuedCert, TransportError> {
        self.issue_as(name, PeerRole::Node)
    }

    /// Issues a certificate for `name` with `role`.
    pub fn issue_as(&self, name: &str, role: PeerRole) -> Result<IssuedCert, TransportError> {
        let key =
            rcgen::KeyPair::generate().map_err(|e| tls_err(format!("key for {name}: {e}")))?;
        let cert = identity_params(name, role)?
            .signed_by(&key, &self.issuer)
            .map_err(|e| tls_err(format!("certificate for {name}: {e}")))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The identity of node `name`, in memory.
    pub fn identity(&self, name: &str) -> Result<TlsIdentity, TransportError> {
        self.identity_as(name, PeerRole::Node)
    }

    /// The identity of `name` with `role`, in memory.
    pub fn identity_as(&self, name: &str, role: PeerRole) -> Result<TlsIdentity, TransportError> {
        let c = self.issue_as(name, role)?;
        TlsIdentity::from_pem(
            self.cert_pem.as_bytes(),
            c.cert_pem.as_bytes(),
            c.key_pem.as_bytes(),
        )
    }

    /// Writes `ca.pem` and `<name>.pem` / `<name>.key` for every node name into `dir`
    /// (node certificates); returns the files written. The CA key is not among them: it
    /// does not belong beside node keys ([`write_ca_key`](Self::write_ca_key)).
    pub fn write_files<'a>(
        &self,
        dir: &Path,
        nodes: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<PathBuf>, TransportError> {
        self.write_files_as(dir, nodes.into_iter().map(|n| (n, PeerRole::Node)))
    }

    /// Like [`write_files`](Self::write_files), each identity with its role.
    pub fn write_files_as<'a>(
        &self,
        dir: &Path,
        identities: impl IntoIterator<Item = (&'a str, PeerRole)>,
    ) -> Result<Vec<PathBuf>, TransportError> {
        std::fs::create_dir_all(dir).map_err(|e| tls_err(format!("{}: {e}", dir.display())))?;
        let mut out = vec![write_pem(&dir.join("ca.pem"), &self.cert_pem, false)?];
        for (n, role) in identities {
            let c = self.issue_as(n, role)?;
            out.push(write_pem(
                &dir.join(format!("{n}.pem")),
                &c.cert_pem,
                false,
            )?);
            out.push(write_pem(&dir.join(format!("{n}.key")), &c.key_pem, true)?);
        }
        Ok(out)
    }

    /// Writes the CA key to `path` (mode 0600), for issuing more certificates later.
    pub fn write_ca_key(&self, path: &Path) -> Result<PathBuf, TransportError> {
        write_pem(path, &self.key_pem, true)
    }
}

impl CertAuthority {
    /// The CA of an existing `ca.pem` and `ca.key` (to sign requests on the CA's host).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, TransportError> {
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| tls_err(format!("CA key: {e}")))?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| tls_err(format!("CA certificate: {e}")))?;
        Ok(CertAuthority {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// Signs a certificate request made by [`certificate_request`]: a certificate for the
    /// one name it asks for, with `role`, valid from now for `validity`. Nothing else of
    /// the request is copied (a request cannot ask for a role, more names or a CA bit).
    pub fn sign_request(
        &self,
        csr_pem: &str,
        role: PeerRole,
        validity: std::time::Duration,
    ) -> Result<String, TransportError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| tls_err(format!("certificate request: {e}")))?;
        let names: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|n| match n {
                rcgen::SanType::DnsName(d) => Some(d.as_str().to_string()),
                _ => None,
            })
            .collect();
        let [name] = names.as_slice() else {
            return Err(tls_err(format!(
                "certificate request names {names:?}: it must name exactly one node"
            )));
        };
        let mut params = identity_params(name, role)?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now
            + time::Duration::try_from(validity).map_err(|e| tls_err(format!("validity: {e}")))?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| tls_err(format!("certificate for {name}: {e}")))?;
        Ok(cert.pem())
    }
}

/// A new key for node `name` and a certificate request for it, both PEM: (request, key).
/// The key stays on the node's host; the request goes to the CA's
/// ([`CertAuthority::sign_request`]).
pub fn certificate_request(name: &str) -> Result<(String, String), TransportError> {
    let key = rcgen::KeyPair::generate().map_err(|e| tls_err(format!("key for {name}: {e}")))?;
    let params = rcgen::CertificateParams::new(vec![name.to_string()])
        .map_err(|e| tls_err(format!("request for {name:?}: {e}")))?;
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| tls_err(format!("request for {name}: {e}")))?;
    Ok((csr, key.serialize_pem()))
}

/// Certificate parameters of identity `name` with `role`: the name as DNS SAN and CN, the
/// role as a URI SAN, usable as TLS server and client.
fn identity_params(name: &str, role: PeerRole) -> Result<rcgen::CertificateParams, TransportError> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
        .map_err(|e| tls_err(format!("certificate for {name:?}: {e}")))?;
    let uri = rcgen::string::Ia5String::try_from(role.uri())
        .map_err(|e| tls_err(format!("role URI: {e}")))?;
    params.subject_alt_names.push(rcgen::SanType::URI(uri));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

/// Writes PEM text to `path`; a secret ends up mode 0600 whether or not the file existed.
/// (Its directory is created if missing.)
pub fn write_pem(path: &Path, text: &str, secret: bool) -> Result<PathBuf, TransportError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| tls_err(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mode = if secret { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    // `mode` applies only to a file created now; an existing one keeps its own.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io)?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn a_signed_request_has_the_name_role_and_validity_the_ca_chose() {
        let ca = CertAuthority::generate("test CA").unwrap();
        let ca = CertAuthority::load(ca.cert_pem(), ca.key_pem()).unwrap();
        let (csr, key) = certificate_request("b7").unwrap();
        let days = std::time::Duration::from_secs(30 * 86_400);
        let cert = ca.sign_request(&csr, PeerRole::Client, days).unwrap();
        // The key that made the request goes with the certificate.
        TlsIdentity::from_pem(ca.cert_pem().as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap();
        let d = der(&cert);
        assert_eq!(peer_name(&d).unwrap(), "b7");
        assert_eq!(peer_role(&d), PeerRole::Client);
        let (_, x) = x509_parser::parse_x509_certificate(&d).unwrap();
        let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
        assert!((30 * 86_400..=30 * 86_400 + 600).contains(&life), "{life}");
        assert!(!x.is_ca());
    }

    #[test]
    fn a_request_for_more_than_one_name_is_refused() {
        let ca = CertAuthority::generate("test CA").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(vec!["a1".to_string(), "a2".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let e = ca
            .sign_request(&csr, PeerRole::Node, std::time::Duration::from_secs(86_400))
            .unwrap_err();
        assert!(e.to_string().contains("exactly one node"), "{e}");
        assert!(
            ca.sign_request(
                "not a request",
                PeerRole::Node,
                std::time::Duration::from_secs(1)
            )
            .is_err()
        );
    }
}
