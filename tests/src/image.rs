//! The guest image (`tests/guest/build-image`): Debian's cloud kernel and an initramfs with
//! both agents. Built once per process; the script itself caches the kernel download and
//! serialises concurrent builds.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context, bail};

/// Kernel and initramfs paths.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// `vmlinuz`.
    pub kernel: PathBuf,
    /// `initramfs.cpio.gz`.
    pub initrd: PathBuf,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the image if this process has not yet; fails (never skips) when it cannot.
pub fn ensure() -> anyhow::Result<GuestImage> {
    static IMAGE: OnceLock<Result<GuestImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build() -> anyhow::Result<GuestImage> {
    let root = workspace();
    let started = std::time::Instant::now();
    let out = Command::new(root.join("tests/guest/build-image"))
        .current_dir(&root)
        .output()
        .context("running tests/guest/build-image")?;
    if !out.status.success() {
        bail!(
            "build-image failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    eprintln!(
        "e2e: guest image ready in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.cpio.gz"),
    })
}
