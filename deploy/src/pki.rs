//! A private certificate authority for one broker: the CA, and server certificates it issues
//! for the addresses clients use, so that AMQP is TLS with a certificate every client can check.
//!
//! Keys are ECDSA P-256 (rcgen with ring). The CA's key never leaves the machine that made it:
//! it is written with mode 0600 next to the certificates, and only the CA certificate and the
//! broker's own certificate and key are handed out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// How long a CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a server certificate is valid (under the 825 days clients accept).
pub const SERVER_VALIDITY: Duration = Duration::from_secs(397 * 24 * 3600);

/// Why certificates could not be made or kept.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}

/// The files of a CA and of the one server certificate it issued, in one directory.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate (PEM): what clients verify the broker against.
    pub ca_cert: PathBuf,
    /// The CA's private key (PEM, mode 0600): stays here.
    pub ca_key: PathBuf,
    /// The server certificate (PEM).
    pub server_cert: PathBuf,
    /// The server's private key (PEM, mode 0600).
    pub server_key: PathBuf,
}

impl TlsFiles {
    /// The files' places under `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }
}

fn ca_params(name: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "gridq");
    dn.push(DnType::CommonName, format!("gridq CA {name}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Makes sure `dir` holds a CA named `name` and a server certificate from it for exactly
/// `addresses` (host names or IP addresses) that stays valid for at least `min_left`; makes
/// what is missing, reissues a server certificate for other addresses or near its end, and
/// keeps the CA (so clients keep trusting it). Returns the files and whether the server
/// certificate was (re)issued.
///
/// # Errors
/// File system errors and rcgen's.
pub fn ensure(
    dir: &Path,
    name: &str,
    addresses: &[String],
    min_left: Duration,
) -> Result<(TlsFiles, bool), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let files = TlsFiles::in_dir(dir);
    let now = time::OffsetDateTime::now_utc();
    let ca_key = if files.ca_key.exists() && files.ca_cert.exists() {
        KeyPair::from_pem(&read(&files.ca_key)?)?
    } else {
        let key = KeyPair::generate()?;
        let mut params = ca_params(name)?;
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key)?;
        write_file(&files.ca_key, &key.serialize_pem(), 0o600)?;
        write_file(&files.ca_cert, &cert.pem(), 0o644)?;
        let _ = std::fs::remove_file(&files.server_cert);
        key
    };
    let issued_for = dir.join("server.addresses");
    let wanted = addresses.join("\n");
    let until = dir.join("server.not-after");
    let still_good = files.server_cert.exists()
        && files.server_key.exists()
        && std::fs::read_to_string(&issued_for).is_ok_and(|a| a == wanted)
        && std::fs::read_to_string(&until)
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok())
            .is_some_and(|t| t > (now + min_left).unix_timestamp());
    if still_good {
        return Ok((files, false));
    }
    let issuer = Issuer::new(ca_params(name)?, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(addresses.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "gridq");
    dn.push(
        DnType::CommonName,
        addresses.first().cloned().unwrap_or_default(),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + SERVER_VALIDITY;
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&files.server_key, &key.serialize_pem(), 0o600)?;
    write_file(&files.server_cert, &cert.pem(), 0o644)?;
    write_file(&issued_for, &wanted, 0o644)?;
    write_file(
        &until,
        &params.not_after.unix_timestamp().to_string(),
        0o644,
    )?;
    Ok((files, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn keeps_the_ca_and_reissues_only_when_needed() {
        let dir = tempfile::tempdir().unwrap();
        let addrs = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        let (files, issued) = ensure(dir.path(), "t", &addrs, Duration::ZERO).unwrap();
        assert!(issued);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&files.ca_key), 0o600);
        assert_eq!(mode(&files.server_key), 0o600);
        let ca = std::fs::read_to_string(&files.ca_cert).unwrap();
        let server = std::fs::read_to_string(&files.server_cert).unwrap();

        let (_, issued) = ensure(dir.path(), "t", &addrs, Duration::ZERO).unwrap();
        assert!(!issued, "nothing changed");
        assert_eq!(std::fs::read_to_string(&files.server_cert).unwrap(), server);

        // Another address, or too little time left: a new server certificate, the same CA.
        let (_, issued) =
            ensure(dir.path(), "t", &["10.0.0.1".to_owned()], Duration::ZERO).unwrap();
        assert!(issued);
        let (_, issued) = ensure(
            dir.path(),
            "t",
            &["10.0.0.1".to_owned()],
            SERVER_VALIDITY + Duration::from_secs(86400),
        )
        .unwrap();
        assert!(issued);
        assert_eq!(std::fs::read_to_string(&files.ca_cert).unwrap(), ca);
        assert_ne!(std::fs::read_to_string(&files.server_cert).unwrap(), server);
    }
}
