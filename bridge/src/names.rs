//! How VMs are named: the rule every name follows, and the names discovery derives from
//! socket paths (a libvirt domain's directory, a Proxmox VE vmid).
//!
//! A leaf: configuration validates names with it and discovery derives them with it.

use std::path::Path;

/// VM names: 1-128 characters of letters, digits, `.`, `_`, `-`, `:`.
pub fn validate_vm_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid VM name '{name}'"))
    }
}

/// The VM name for a discovered socket: its directory's name, without libvirt's
/// `domain-<id>-` prefix (`.../domain-3-web1/org.qemu.guest_agent.0` -> `web1`).
pub fn vm_name_for(socket: &Path) -> Option<String> {
    let dir = socket.parent()?.file_name()?.to_str()?;
    let name = dir
        .strip_prefix("domain-")
        .and_then(|rest| {
            let (id, name) = rest.split_once('-')?;
            id.chars().all(|c| c.is_ascii_digit()).then_some(name)
        })
        .unwrap_or(dir);
    validate_vm_name(name).ok().map(|()| name.to_string())
}

/// The globs that find Proxmox VE's sockets in `dir` (`/var/run/qemu-server`): every
/// `*.qga` and `*.qmp` in it, of which [`proxmox_vm`] takes `<vmid>.qga` and
/// `<vmid>.qmp`; `None` when `dir` is not UTF-8.
pub fn proxmox_patterns(dir: &Path) -> Option<Vec<String>> {
    let dir = glob::Pattern::escape(dir.to_str()?);
    let dir = dir.trim_end_matches('/');
    Some(vec![format!("{dir}/*.qga"), format!("{dir}/*.qmp")])
}

/// A Proxmox socket's VM: `101.qga` -> (`101`, false), `101.qmp` -> (`101`, true); `None`
/// for anything else (the vmid is decimal digits only).
pub fn proxmox_vm(socket: &Path) -> Option<(String, bool)> {
    let file = socket.file_name()?.to_str()?;
    let (vmid, ext) = file.rsplit_once('.')?;
    let qmp = match ext {
        "qga" => false,
        "qmp" => true,
        _ => return None,
    };
    let digits = !vmid.is_empty() && vmid.bytes().all(|b| b.is_ascii_digit());
    (digits && validate_vm_name(vmid).is_ok()).then(|| (vmid.to_string(), qmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_names() {
        let p =
            Path::new("/var/lib/libvirt/qemu/channel/target/domain-3-web1/org.qemu.guest_agent.0");
        assert_eq!(vm_name_for(p).as_deref(), Some("web1"));
        let p = Path::new("/run/vms/db-2/qga.sock");
        assert_eq!(vm_name_for(p).as_deref(), Some("db-2"));
        let p = Path::new("/run/vms/domain-x-y/qga.sock");
        assert_eq!(vm_name_for(p).as_deref(), Some("domain-x-y"));
        assert_eq!(vm_name_for(Path::new("/run/vms/bad name/q")), None);
    }

    fn pve(file: &str) -> std::path::PathBuf {
        Path::new("/var/run/qemu-server").join(file)
    }

    #[test]
    fn proxmox_names() {
        assert_eq!(proxmox_vm(&pve("101.qga")), Some(("101".into(), false)));
        assert_eq!(proxmox_vm(&pve("101.qmp")), Some(("101".into(), true)));
        for junk in [
            "abc.qga",
            "101.conf",
            "1a.qga",
            ".qga",
            "101.qga.bak",
            "-1.qmp",
        ] {
            assert_eq!(proxmox_vm(&pve(junk)), None, "{junk}");
        }
        assert_eq!(
            proxmox_patterns(Path::new("/var/run/qemu-server/")),
            Some(vec![
                "/var/run/qemu-server/*.qga".to_string(),
                "/var/run/qemu-server/*.qmp".to_string()
            ])
        );
        assert_eq!(
            proxmox_patterns(Path::new("/run/[x]")),
            Some(vec![
                "/run/[[]x[]]/*.qga".to_string(),
                "/run/[[]x[]]/*.qmp".to_string()
            ])
        );
    }
}
