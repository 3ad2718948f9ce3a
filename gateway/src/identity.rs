//! Site identity (a key and a self-signed certificate) and how sites recognise each
//! other: by the SHA-256 fingerprint of the certificate, pinned in configuration.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("cannot read {what} {path}: {detail}")]
    Read {
        what: &'static str,
        path: String,
        detail: String,
    },
    #[error("cannot generate a site certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "a fingerprint is 64 hexadecimal digits (SHA-256, colons allowed), as printed by `ferry init`"
)]
pub struct BadFingerprint;

impl FromStr for Fingerprint {
    type Err = BadFingerprint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex: Vec<u8> = s.bytes().filter(|b| *b != b':').collect();
        if hex.len() != 64 {
            return Err(BadFingerprint);
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| BadFingerprint)?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| BadFingerprint)?;
        }
        Ok(Fingerprint(out))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A site's certificate and key, loaded once at start.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, IdentityError> {
        let cert = CertificateDer::from_pem_file(cert_path).map_err(|e| IdentityError::Read {
            what: "certificate",
            path: cert_path.display().to_string(),
            detail: e.to_string(),
        })?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| IdentityError::Read {
            what: "private key",
            path: key_path.display().to_string(),
            detail: e.to_string(),
        })?;
        Ok(Self { cert, key })
    }

    /// Creates a new key and self-signed certificate for `site` and writes both as PEM
    /// (the key readable by root only).
    pub fn generate(site: &str, cert_path: &Path, key_path: &Path) -> Result<Self, IdentityError> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![format!("{site}.ferry")])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("ferry site {site}"));
        let cert = params.self_signed(&key)?;
        write_file(cert_path, cert.pem().as_bytes(), 0o644)?;
        write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        Self::load(cert_path, key_path)
    }

    /// Fingerprint of a PEM certificate file (no key needed: what clients pin).
    pub fn cert_fingerprint(cert_path: &Path) -> Result<Fingerprint, IdentityError> {
        let cert = CertificateDer::from_pem_file(cert_path).map_err(|e| IdentityError::Read {
            what: "certificate",
            path: cert_path.display().to_string(),
            detail: e.to_string(),
        })?;
        Ok(Fingerprint::of(&cert))
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    pub fn key_clone(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| IdentityError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a presented certificate was refused; carried inside the rustls error so the
/// refusing side's logs say which fingerprint was offered.
#[derive(Debug, Error)]
#[error("certificate fingerprint {presented} is not {expected}")]
pub struct FingerprintRefused {
    pub presented: Fingerprint,
    pub expected: String,
}

fn refuse(presented: Fingerprint, expected: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(FingerprintRefused {
            presented,
            expected,
        }),
    )))
}

/// The handshake-signature checks both verifiers share: pinning replaces only the
/// certificate-chain check, never the proof that the peer holds the certificate's key.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Client side: accept exactly one server certificate, the pinned one.
#[derive(Debug)]
pub struct PinnedServer {
    expected: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl PinnedServer {
    pub fn new(expected: Fingerprint) -> Arc<Self> {
        Arc::new(Self {
            expected,
            provider: provider(),
        })
    }
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of(end_entity);
        if presented == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(refuse(presented, format!("the pinned {}", self.expected)))
        }
    }

    handshake_signatures!();
}

/// Server side of the peer link: a client certificate is mandatory and must be one of the
/// configured peers'.
#[derive(Debug)]
pub struct KnownPeers {
    allowed: Vec<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl KnownPeers {
    pub fn new(allowed: Vec<Fingerprint>) -> Arc<Self> {
        Arc::new(Self {
            allowed,
            provider: provider(),
        })
    }
}

impl ClientCertVerifier for KnownPeers {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let presented = Fingerprint::of(end_entity);
        if self.allowed.contains(&presented) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(fingerprint = %presented, "refused a peer with an unknown certificate");
            Err(refuse(presented, "a configured peer's".into()))
        }
    }

    handshake_signatures!();
}

/// TLS client config that trusts only `server` and, when `identity` is given, presents it.
pub fn client_config(
    server: Fingerprint,
    identity: Option<&Identity>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, IdentityError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(PinnedServer::new(server));
    let mut cfg = match identity {
        Some(id) => builder.with_client_auth_cert(vec![id.cert.clone()], id.key_clone())?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// TLS server config presenting `identity`; with `peers`, client certificates are
/// mandatory and pinned.
pub fn server_config(
    identity: &Identity,
    peers: Option<Vec<Fingerprint>>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, IdentityError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match peers {
        Some(allowed) => builder.with_client_cert_verifier(KnownPeers::new(allowed)),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(vec![identity.cert.clone()], identity.key_clone())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_round_trip_with_or_without_colons() {
        let hex = "ab".repeat(32);
        let fp: Fingerprint = hex.parse().expect("hex");
        assert_eq!(fp.to_string(), hex);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(colons.parse::<Fingerprint>(), Ok(fp));
        assert_eq!("abc".parse::<Fingerprint>(), Err(BadFingerprint));
        assert_eq!("zz".repeat(32).parse::<Fingerprint>(), Err(BadFingerprint));
    }

    #[test]
    fn generated_identity_loads_back_with_the_same_fingerprint() {
        let dir = std::env::temp_dir().join(format!("ferry-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let id = Identity::generate("a", &dir.join("c.pem"), &dir.join("k.pem")).expect("gen");
        let again = Identity::load(&dir.join("c.pem"), &dir.join("k.pem")).expect("load");
        assert_eq!(id.fingerprint(), again.fingerprint());
        std::fs::remove_dir_all(&dir).ok();
    }
}
