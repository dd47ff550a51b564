//! The one certificate generator of the tests and the local cluster: a CA in a directory and the
//! leaves it signs, made with Debian's `openssl` (P-256 keys: fast, accepted by every Kubernetes
//! 1.20 component, rustls and Go).

use std::fmt::Write as _;
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// What a leaf certificate is for (its extendedKeyUsage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A CA (`ca.crt`, `ca.key`) in `dir`; [`Pki::sign`] writes `<name>.crt` and `<name>.key` beside it.
#[derive(Clone, Debug)]
pub struct Pki {
    dir: PathBuf,
}

const DAYS: &str = "3650";
const EC_KEY: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

impl Pki {
    /// Creates `dir` and a self-signed CA with `subject` (openssl form: `/O=org/CN=name`).
    pub fn create(dir: &Path, subject: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = Self { dir: dir.to_path_buf() };
        let mut args = vec!["req", "-x509", "-nodes", "-days", DAYS, "-subj", subject];
        args.extend(EC_KEY);
        args.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
        pki.openssl(&args)?;
        Ok(pki)
    }

    /// A leaf `<name>.crt`/`<name>.key` signed by the CA, with `sans` (`IP:…`, `DNS:…`).
    pub fn sign(&self, name: &str, subject: &str, usage: Usage, sans: &[&str]) -> anyhow::Result<PathBuf> {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        let mut req = vec!["req", "-nodes", "-subj", subject];
        req.extend(EC_KEY);
        req.extend(["-keyout", &key, "-out", &csr]);
        self.openssl(&req)?;
        let mut text = String::new();
        if !sans.is_empty() {
            let _ = writeln!(text, "subjectAltName={}", sans.join(","));
        }
        let eku = match usage {
            Usage::Server => "serverAuth",
            Usage::Client => "clientAuth",
        };
        let _ = writeln!(
            text,
            "extendedKeyUsage={eku}\nkeyUsage=critical,digitalSignature,keyEncipherment"
        );
        std::fs::write(self.dir.join(&ext), text)?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            DAYS,
            "-extfile",
            &ext,
            "-out",
            &crt,
        ])?;
        Ok(self.path(&crt))
    }

    /// A ServiceAccount token signing key pair, `sa.key` and `sa.pub` (RSA, as the apiserver's
    /// default).
    pub fn service_account_keys(&self) -> anyhow::Result<()> {
        self.openssl(&["genrsa", "-out", "sa.key", "2048"])?;
        self.openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])
    }

    /// The CA's directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file of this PKI (`ca.crt`, `<name>.key`, …).
    #[must_use]
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The contents of a file of this PKI.
    pub fn read(&self, file: &str) -> anyhow::Result<String> {
        let path = self.path(file);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    fn openssl(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .context("running openssl (Debian package `openssl`)")?;
        if !out.status.success() {
            bail!("openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}
