//! Cluster certificates, made with rcgen.
//!
//! One cluster CA signs two leaf certificates: `node` (servers: naming and topic servers, used
//! both to serve and, for server-to-server and server-to-naming links, as a client
//! certificate) and `client` (the CLI and applications). Every link is mutual TLS: a peer
//! without a certificate from the cluster CA is refused at the handshake. The role is the
//! leaf's common name, which the naming server checks before it lets a peer register as a
//! topic server.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Common name of the certificate servers present.
pub const NODE_COMMON_NAME: &str = "herald node";
/// Common name of the certificate clients present.
pub const CLIENT_COMMON_NAME: &str = "herald client";

/// Which leaf certificate a process presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    Node,
    Client,
}

impl CertRole {
    fn file_stem(self) -> &'static str {
        match self {
            CertRole::Node => "node",
            CertRole::Client => "client",
        }
    }
}

/// Paths of the files in a certificate directory.
pub struct CertPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl CertPaths {
    pub fn new(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            node_cert: dir.join("node.pem"),
            node_key: dir.join("node.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }

    fn all(&self) -> [&PathBuf; 6] {
        [&self.ca_cert, &self.ca_key, &self.node_cert, &self.node_key, &self.client_cert, &self.client_key]
    }
}

/// Whether `dir` already holds a complete set.
pub fn exist(dir: &Path) -> bool {
    CertPaths::new(dir).all().iter().all(|p| p.exists())
}

/// Generates a CA, a node certificate valid for `hosts` (DNS names or IP addresses) and a
/// client certificate into `dir`. Refuses to overwrite an existing CA unless `force`.
pub fn generate(dir: &Path, hosts: &[String], force: bool) -> Result<()> {
    let paths = CertPaths::new(dir);
    if paths.ca_cert.exists() && !force {
        bail!(
            "{} already exists; pass --force to replace the cluster CA (every server and client must then get the new files)",
            paths.ca_cert.display()
        );
    }
    crate::files::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;

    let now = time::OffsetDateTime::now_utc();
    let validity = |p: &mut CertificateParams| {
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(3650);
    };

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = dn("herald cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let mut node = CertificateParams::default();
    node.distinguished_name = dn(NODE_COMMON_NAME);
    for host in hosts {
        let host = host.trim();
        if host.is_empty() {
            continue;
        }
        node.subject_alt_names.push(match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().with_context(|| format!("host name {host:?}"))?),
        });
    }
    node.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut node);
    let node_key = KeyPair::generate()?;
    let node_cert = node.signed_by(&node_key, &issuer)?;

    let mut client = CertificateParams::default();
    client.distinguished_name = dn(CLIENT_COMMON_NAME);
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut client);
    let client_key = KeyPair::generate()?;
    let client_cert = client.signed_by(&client_key, &issuer)?;

    write_secret(&paths.ca_key, &ca_key.serialize_pem())?;
    write_secret(&paths.node_key, &node_key.serialize_pem())?;
    write_secret(&paths.client_key, &client_key.serialize_pem())?;
    std::fs::write(&paths.ca_cert, ca_cert.pem())?;
    std::fs::write(&paths.node_cert, node_cert.pem())?;
    std::fs::write(&paths.client_cert, client_cert.pem())?;
    Ok(())
}

/// Hosts every node certificate covers.
pub fn default_hosts() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn write_secret(path: &Path, pem: &str) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).with_context(|| format!("writing {}", path.display()))?;
    // An existing file keeps its mode when opened: set it.
    crate::files::private_file(path)?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}

/// The CA, leaf chain and key one process needs.
pub struct Identity {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self { ca: self.ca.clone(), chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

/// Loads the CA and the `role` leaf from `dir`, with errors that name the file and the fix.
pub fn load(dir: &Path, role: CertRole) -> Result<Identity> {
    let paths = CertPaths::new(dir);
    let (cert_path, key_path) = match role {
        CertRole::Node => (&paths.node_cert, &paths.node_key),
        CertRole::Client => (&paths.client_cert, &paths.client_key),
    };
    let shown = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let hint = format!(
        "certificates are looked for in {}, from --certs or HERALD_CERTS (default ./certs); point it at the certs directory of the cluster you reach. Only for a new cluster: `herald certs --dir DIR` makes a new CA, which a running cluster will not accept",
        shown.display()
    );
    let read_certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_file_iter(p)
            .with_context(|| format!("reading {} ({hint})", p.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", p.display()))?;
        if certs.is_empty() {
            bail!("{} holds no certificate", p.display());
        }
        Ok(certs)
    };
    let ca = read_certs(&paths.ca_cert)?.remove(0);
    let chain = read_certs(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .with_context(|| format!("reading the {} key {} ({hint})", role.file_stem(), key_path.display()))?;
    Ok(Identity { ca, chain, key })
}

/// The common name of a peer's leaf certificate, if it has one.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_loadable_certificates_with_roles() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &default_hosts(), false).unwrap();
        assert!(exist(dir.path()));
        let node = load(dir.path(), CertRole::Node).unwrap();
        let client = load(dir.path(), CertRole::Client).unwrap();
        assert_eq!(common_name(&node.chain[0]).as_deref(), Some(NODE_COMMON_NAME));
        assert_eq!(common_name(&client.chain[0]).as_deref(), Some(CLIENT_COMMON_NAME));
        // A second run keeps the CA unless forced.
        assert!(generate(dir.path(), &default_hosts(), false).is_err());
        generate(dir.path(), &default_hosts(), true).unwrap();
    }

    #[test]
    fn missing_files_name_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path(), CertRole::Client).err().unwrap();
        assert!(format!("{err:#}").contains("herald certs"), "{err:#}");
    }
}
