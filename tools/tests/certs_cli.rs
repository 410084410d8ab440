//! Certificates per host: the CA's key stays with the CA, each node's key with the node;
//! only the request and the signed certificate travel.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use strait::transport::TlsIdentity;

fn strait(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(args)
        .output()
        .expect("strait runs")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_request_sign_make_an_identity_whose_key_never_left_its_host() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_host, node_host) = (dir.path().join("ca-host"), dir.path().join("a1-host"));
    let s = |p: &Path| p.display().to_string();
    assert!(
        strait(&["certs", "ca", "--out", &s(&ca_host)])
            .status
            .success()
    );
    assert_eq!(mode(&ca_host.join("ca.key")), 0o600);
    // A second CA over the first is refused: nodes trust the first.
    let again = strait(&["certs", "ca", "--out", &s(&ca_host)]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));

    let out = strait(&["certs", "request", "--node", "a1", "--out", &s(&node_host)]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&node_host.join("a1.key")), 0o600);
    // Only the request travels to the CA's host; the certificate travels back.
    let csr = ca_host.join("a1.csr");
    std::fs::copy(node_host.join("a1.csr"), &csr).unwrap();
    let cert = ca_host.join("a1.pem");
    let sign = |extra: &[&str], out: &Path| {
        let mut args = vec!["certs", "sign"];
        let (csr, ca, out) = (s(&csr), s(&ca_host), s(out));
        args.extend(["--csr", &csr, "--ca", &ca, "--out", &out]);
        args.extend(extra);
        strait(&args)
    };
    let out = sign(&["--role", "client", "--valid-for", "90d"], &cert);
    assert!(out.status.success(), "{out:?}");
    std::fs::copy(&cert, node_host.join("a1.pem")).unwrap();
    std::fs::copy(ca_host.join("ca.pem"), node_host.join("ca.pem")).unwrap();
    let id = TlsIdentity::from_pem_files(
        &node_host.join("ca.pem"),
        &node_host.join("a1.pem"),
        &node_host.join("a1.key"),
    )
    .unwrap();
    assert_eq!(id.name().unwrap(), "a1");
    assert!(!node_host.join("ca.key").exists() && !ca_host.join("a1.key").exists());

    // A bad request, a bad validity: usage errors, nothing written.
    std::fs::write(&csr, "garbage").unwrap();
    let bad = sign(&[], &dir.path().join("x.pem"));
    assert!(!bad.status.success());
    assert!(!dir.path().join("x.pem").exists());
    let bad = sign(&["--valid-for", "a year"], &dir.path().join("y.pem"));
    assert_eq!(bad.status.code(), Some(2));
}
