//! Cluster certificates, made with rcgen, and who they name.
//!
//! One cluster CA signs a leaf certificate per identity: each topic server (`herald:node:ID`,
//! used to serve and as the client certificate on its links to other servers), the naming
//! group (`herald:naming`) and each client (`herald:client:NAME`). Every link is mutual TLS:
//! a peer without a certificate from the cluster CA is refused at the handshake, and one
//! that names no identity right after it ([`Principal`]).
//!
//! A directory usable as `--certs DIR` for one identity holds `ca.pem` and that identity's
//! certificate and key: `node.pem` and `node.key` for a server or the naming group,
//! `client.pem` and `client.key` for a client. `herald certs` makes the quick-start
//! directory: the `admin` client at the top, `naming/` and `node-1/` ... `node-N/` below it
//! (a server started with `--certs DIR --id 2` uses `DIR/node-2/` when it is there), and the
//! CA key apart in `ca/`, which no process needs and which `herald certs issue` uses to sign.

mod principal;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use principal::{check_client_name, Principal, MAX_CLIENT_NAME_BYTES};

use crate::types::ServerId;

/// The client the quick start makes, and the default superuser.
pub const ADMIN_CLIENT: &str = "admin";

/// Topic server identities `herald certs` makes when not told how many.
pub const DEFAULT_DEV_SERVERS: u16 = 3;

/// How long issued certificates are valid (the CA too).
const VALID_DAYS: i64 = 3650;

/// Which identity a process loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    Client,
    /// The topic server with this id.
    Node(ServerId),
    /// A naming member.
    Naming,
}

impl CertRole {
    fn file_stem(self) -> &'static str {
        leaf_stem(self != CertRole::Client)
    }
}

/// The stem of an identity's certificate and key files: `node` for a server (a topic server
/// or the naming group), `client` for a client.
fn leaf_stem(server: bool) -> &'static str {
    if server {
        "node"
    } else {
        "client"
    }
}

/// The CA certificate's file in every identity directory.
fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

/// Where the quick-start directory keeps the CA certificate and key together.
fn ca_dir(dir: &Path) -> PathBuf {
    dir.join("ca")
}

/// The quick-start sub-directory of topic server `id`.
pub fn node_dir(dir: &Path, id: ServerId) -> PathBuf {
    dir.join(format!("node-{id}"))
}

/// The quick-start sub-directory of the naming group.
pub fn naming_dir(dir: &Path) -> PathBuf {
    dir.join("naming")
}

/// Whether `dir` is a complete quick-start directory: the CA (key apart) and the admin client.
pub fn exist(dir: &Path) -> bool {
    [ca_cert_path(dir), ca_dir(dir).join("ca.key"), dir.join("client.pem"), dir.join("client.key")]
        .iter()
        .all(|p| p.exists())
}

/// The CA that signs: its certificate (PEM) and its signer.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn validity(p: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(VALID_DAYS);
}

impl Ca {
    fn new() -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("herald cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params);
        let cert = params.self_signed(&key)?;
        Ok(Self { pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// The CA kept in `dir/ca/`.
    fn load(dir: &Path) -> Result<Self> {
        let at = ca_dir(dir);
        let key_path = at.join("ca.key");
        let key = std::fs::read_to_string(&key_path).with_context(|| {
            format!(
                "reading the CA key {} (certificates are issued where the CA key is kept: the directory `herald certs` made)",
                key_path.display()
            )
        })?;
        let pem = std::fs::read_to_string(at.join("ca.pem"))
            .with_context(|| format!("reading {}", at.join("ca.pem").display()))?;
        let issuer = Issuer::from_ca_cert_pem(&pem, KeyPair::from_pem(&key)?)
            .with_context(|| format!("parsing the CA in {}", at.display()))?;
        Ok(Self { pem, issuer })
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let at = ca_dir(dir);
        crate::files::private_dir(&at).with_context(|| format!("creating {}", at.display()))?;
        write_secret(&at.join("ca.key"), &self.issuer.key().serialize_pem())?;
        write_file(&at.join("ca.pem"), &self.pem)?;
        write_file(&ca_cert_path(dir), &self.pem)
    }

    /// Writes `who`'s certificate and key, with the CA certificate, into `out`: a directory
    /// that works as `--certs` for that identity. `hosts` are the names a server is reached by.
    fn issue(&self, who: &Principal, hosts: &[String], out: &Path) -> Result<()> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("herald {who}"));
        params.subject_alt_names.push(SanType::URI(who.uri().as_str().try_into()?));
        match who {
            Principal::Client(_) => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            Principal::Node(_) | Principal::Naming => {
                for host in hosts.iter().map(|h| h.trim()).filter(|h| !h.is_empty()) {
                    params.subject_alt_names.push(match host.parse::<std::net::IpAddr>() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => {
                            SanType::DnsName(host.try_into().with_context(|| format!("host name {host:?}"))?)
                        }
                    });
                }
                params.extended_key_usages =
                    vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        let stem = leaf_stem(who.is_server());
        validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        crate::files::private_dir(out).with_context(|| format!("creating {}", out.display()))?;
        write_secret(&out.join(format!("{stem}.key")), &key.serialize_pem())?;
        write_file(&out.join(format!("{stem}.pem")), &cert.pem())?;
        write_file(&ca_cert_path(out), &self.pem)
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Makes the quick-start directory `dir`: a new CA, the `admin` client, the naming group and
/// topic servers `1..=servers`, valid for `hosts` (DNS names or IP addresses). Refuses to
/// replace an existing CA unless `force`.
pub fn generate(dir: &Path, hosts: &[String], servers: u16, force: bool) -> Result<()> {
    if ca_cert_path(dir).exists() && !force {
        bail!(
            "{} already exists; pass --force to replace the cluster CA (every server and client must then get the new files), or `herald certs issue` to add identities",
            ca_cert_path(dir).display()
        );
    }
    crate::files::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = Ca::new()?;
    ca.save(dir)?;
    ca.issue(&Principal::Client(ADMIN_CLIENT.into()), hosts, dir)?;
    ca.issue(&Principal::Naming, hosts, &naming_dir(dir))?;
    for id in 1..=servers as ServerId {
        ca.issue(&Principal::Node(id), hosts, &node_dir(dir, id))?;
    }
    Ok(())
}

/// Signs a certificate for `who` with the CA kept in `dir` and writes it to `out` (default:
/// `dir/node-ID` or `dir/client-NAME`; `dir/naming` for the naming group). Refuses to replace
/// an identity that is there unless `force`. Returns the directory written.
pub fn issue(
    dir: &Path,
    who: &Principal,
    hosts: &[String],
    out: Option<&Path>,
    force: bool,
) -> Result<PathBuf> {
    let out = match (out, who) {
        (Some(out), _) => out.to_path_buf(),
        (None, Principal::Node(id)) => node_dir(dir, *id),
        (None, Principal::Naming) => naming_dir(dir),
        (None, Principal::Client(name)) => dir.join(format!("client-{name}")),
    };
    let leaf = out.join(format!("{}.pem", leaf_stem(who.is_server())));
    if leaf.exists() && !force {
        bail!("{} already exists; pass --force to replace it", leaf.display());
    }
    Ca::load(dir)?.issue(who, hosts, &out)?;
    Ok(out)
}

/// Makes what `herald dev` needs in `dir`: the quick-start directory if it is not there, and
/// an identity for every topic server `1..=servers` it lacks.
pub fn ensure_dev(dir: &Path, servers: u16) -> Result<()> {
    if !exist(dir) {
        generate(dir, &default_hosts(), servers, false)?;
    }
    for id in 1..=servers as ServerId {
        if !node_dir(dir, id).join("node.pem").exists() {
            issue(dir, &Principal::Node(id), &default_hosts(), None, false)?;
        }
    }
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

/// The CA, leaf chain and key one process needs, and who the leaf names.
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

impl Identity {
    /// Who the leaf certificate names.
    pub fn principal(&self) -> Option<Principal> {
        self.chain.first().and_then(Principal::of_certificate)
    }
}

/// The directory `role`'s files are read from: `dir` itself, or its quick-start
/// sub-directory for that server (`node-ID/`) or the naming group (`naming/`).
pub fn identity_dir(dir: &Path, role: CertRole) -> PathBuf {
    let sub = match role {
        CertRole::Node(id) => node_dir(dir, id),
        CertRole::Naming => naming_dir(dir),
        CertRole::Client => return dir.to_path_buf(),
    };
    if sub.join("node.pem").exists() {
        sub
    } else {
        dir.to_path_buf()
    }
}

/// Loads the CA and `role`'s leaf from `dir` (see [`identity_dir`]) and checks that the
/// leaf names that role, with errors that name the file and the fix.
pub fn load(dir: &Path, role: CertRole) -> Result<Identity> {
    let from = identity_dir(dir, role);
    let stem = role.file_stem();
    let (cert_path, key_path) = (from.join(format!("{stem}.pem")), from.join(format!("{stem}.key")));
    let shown = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let missing = match role {
        CertRole::Node(id) => format!(
            "no certificate for server {id} in {}: `herald certs issue node {id} --dir DIR` signs one where the CA key is kept",
            shown.display()
        ),
        CertRole::Naming => format!(
            "no naming certificate in {}: `herald certs issue naming --dir DIR` signs one where the CA key is kept",
            shown.display()
        ),
        CertRole::Client => format!(
            "certificates are looked for in {}, from --certs or HERALD_CERTS (default ./certs); point it at the certs directory of the cluster you reach. Only for a new cluster: `herald certs --dir DIR` makes a new CA, which a running cluster will not accept",
            shown.display()
        ),
    };
    let read_certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_file_iter(p)
            .with_context(|| format!("reading {} ({missing})", p.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", p.display()))?;
        if certs.is_empty() {
            bail!("{} holds no certificate", p.display());
        }
        Ok(certs)
    };
    let ca = read_certs(&ca_cert_path(&from))?.remove(0);
    let chain = read_certs(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading the {stem} key {} ({missing})", key_path.display()))?;
    let identity = Identity { ca, chain, key };
    let named = identity.principal();
    let fits = match (role, &named) {
        (CertRole::Client, Some(Principal::Client(_))) | (CertRole::Naming, Some(Principal::Naming)) => true,
        (CertRole::Node(id), Some(Principal::Node(n))) => id == *n,
        _ => false,
    };
    if !fits {
        let named = named.map_or(
            "no Herald identity (made before identities: make new ones with `herald certs`)".to_string(),
            |p| p.to_string(),
        );
        bail!(
            "{} names {named}, not {}",
            cert_path.display(),
            match role {
                CertRole::Client => "a client".to_string(),
                CertRole::Node(id) => format!("server {id}"),
                CertRole::Naming => "the naming group".to_string(),
            }
        );
    }
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_start_directory_holds_one_identity_each_and_the_ca_key_apart() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        generate(d, &default_hosts(), 2, false).unwrap();
        assert!(exist(d));
        let principal = |role| load(d, role).unwrap().principal().unwrap();
        assert_eq!(principal(CertRole::Client), Principal::Client(ADMIN_CLIENT.into()));
        assert_eq!(principal(CertRole::Naming), Principal::Naming);
        assert_eq!(principal(CertRole::Node(2)), Principal::Node(2));
        // Identity directories hold nothing of the CA but its certificate.
        for sub in [naming_dir(d), node_dir(d, 1)] {
            let mut names: Vec<String> = std::fs::read_dir(&sub)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, ["ca.pem", "node.key", "node.pem"], "{}", sub.display());
        }
        assert!(!d.join("ca.key").exists() && d.join("ca/ca.key").exists());
        // No certificate for a server it was not made for; a second run keeps the CA.
        let err = load(d, CertRole::Node(3)).err().unwrap();
        assert!(format!("{err:#}").contains("herald certs issue node 3"), "{err:#}");
        assert!(generate(d, &default_hosts(), 2, false).is_err());
    }

    #[test]
    fn issued_identities_work_as_their_own_certs_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        generate(d, &default_hosts(), 1, false).unwrap();
        let ca_before = std::fs::read(d.join("ca.pem")).unwrap();
        let bob = issue(d, &Principal::Client("bob".into()), &[], None, false).unwrap();
        assert_eq!(bob, d.join("client-bob"));
        let loaded = load(&bob, CertRole::Client).unwrap();
        assert_eq!(loaded.principal(), Some(Principal::Client("bob".into())));
        assert_eq!(std::fs::read(bob.join("ca.pem")).unwrap(), ca_before, "signed by the same CA");
        let out = d.join("elsewhere");
        issue(d, &Principal::Node(7), &default_hosts(), Some(&out), false).unwrap();
        assert_eq!(load(&out, CertRole::Node(7)).unwrap().principal(), Some(Principal::Node(7)));
        // A node certificate is not another server's, nor a client's.
        let wrong = load(&out, CertRole::Node(8)).err().unwrap();
        assert!(format!("{wrong:#}").contains("names server 7, not server 8"), "{wrong:#}");
        assert!(load(&out, CertRole::Client).is_err());
        // Replacing an identity takes --force; the CA is never replaced by `issue`.
        assert!(issue(d, &Principal::Node(7), &[], Some(&out), false).is_err());
        issue(d, &Principal::Node(7), &[], Some(&out), true).unwrap();
        assert_eq!(std::fs::read(d.join("ca.pem")).unwrap(), ca_before);
        // Without the CA key there is nothing to sign with.
        let err = issue(&out, &Principal::Node(9), &[], None, false).err().unwrap();
        assert!(format!("{err:#}").contains("CA key"), "{err:#}");
    }

    #[test]
    fn the_dev_cluster_gets_an_identity_for_every_server_and_keeps_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ensure_dev(d, 2).unwrap();
        let ca = std::fs::read(d.join("ca.pem")).unwrap();
        ensure_dev(d, 4).unwrap();
        assert_eq!(std::fs::read(d.join("ca.pem")).unwrap(), ca, "the CA stays");
        for id in 1..=4 {
            assert_eq!(load(d, CertRole::Node(id)).unwrap().principal(), Some(Principal::Node(id)));
        }
        assert!(!node_dir(d, 5).exists());
    }

    #[test]
    fn missing_files_name_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path(), CertRole::Client).err().unwrap();
        assert!(format!("{err:#}").contains("herald certs"), "{err:#}");
    }
}
