//! Throwaway X.509 material made with the `openssl` command: a CA, a server certificate
//! for `localhost` and 127.0.0.1, client certificates, and a second ("rogue") CA.

use std::{
    io,
    path::{Path, PathBuf},
    process::Command,
};

use tempfile::TempDir;

/// A directory of PEM files: `ca.pem`, `server.pem`/`.key`, `NAME.pem`/`.key` for each
/// client, `rogue-ca.pem` and `rogue.pem`/`.key` (a client of the rogue CA).
#[derive(Debug)]
pub struct Certs {
    dir: TempDir,
}

fn openssl(dir: &Path, args: &[&str]) -> io::Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

impl Certs {
    /// Generates the CA, the server certificate and clients named `clients` (each
    /// certificate's DNS subjectAltName is `NAME`).
    pub fn generate(clients: &[&str]) -> io::Result<Self> {
        let certs = Self {
            dir: tempfile::Builder::new().prefix("qga-certs-").tempdir()?,
        };
        certs.ca("ca")?;
        certs.server("ca")?;
        for name in clients {
            certs.leaf("ca", name, &format!("DNS:{name}"), "clientAuth")?;
        }
        certs.ca("rogue-ca")?;
        certs.leaf("rogue-ca", "rogue", "DNS:rogue", "clientAuth")?;
        Ok(certs)
    }

    /// The file `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Makes CA `name` (`NAME.pem`, `NAME.key`).
    pub fn ca(&self, name: &str) -> io::Result<()> {
        openssl(
            self.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )
    }

    /// (Re)issues `server.pem`/`server.key` for localhost and 127.0.0.1 from CA `ca`.
    pub fn server(&self, ca: &str) -> io::Result<()> {
        self.leaf(ca, "server", "DNS:localhost,IP:127.0.0.1", "serverAuth")
    }

    fn leaf(&self, ca: &str, name: &str, san: &str, usage: &str) -> io::Result<()> {
        let dir = self.dir.path();
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!(
                "subjectAltName={san}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
            ),
        )?;
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key.new"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.pem.new"),
                "-extfile",
                &format!("{name}.ext"),
            ],
        )?;
        // Replace both files only once both exist, key first.
        std::fs::rename(
            dir.join(format!("{name}.key.new")),
            dir.join(format!("{name}.key")),
        )?;
        std::fs::rename(
            dir.join(format!("{name}.pem.new")),
            dir.join(format!("{name}.pem")),
        )
    }
}
