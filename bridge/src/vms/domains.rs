//! libvirt's running domains as VMs: served while they run, following libvirt's
//! lifecycle events, and reconciled with libvirt's list after every (re)connection, since
//! events that happened while the connection was down were not seen.
//!
//! While libvirtd is away the domains stay listed and their calls fail UNAVAILABLE; a
//! domain that stopped or restarted meanwhile is dropped or replaced at the reconnection.
//! A listing that fails is tried again with backoff until one works.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use qga_libvirt::{Dom, Event, Libvirt};
use qga_wire::backoff::Backoff;
use tokio::{
    sync::{broadcast::error::RecvError, oneshot, watch},
    time::Instant,
};

use crate::vms::VmMap;

/// How long listing the running domains may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);
const RETRY_START: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Serves `libvirt`'s running domains in `vms` until `shutdown`; `loaded` is told once the
/// first listing was tried (so that readiness can wait for the domains).
pub async fn follow(
    vms: Arc<VmMap>,
    libvirt: Arc<Libvirt>,
    mut shutdown: watch::Receiver<bool>,
    loaded: oneshot::Sender<()>,
) {
    let mut loaded = Some(loaded);
    let mut events = libvirt.subscribe();
    let mut backoff = Backoff::new(RETRY_START, RETRY_MAX);
    // When to list again: after a failed listing, until one works.
    let mut retry = (*libvirt.connected().borrow()).then(Instant::now);
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            () = async {
                match retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => Ok(Event::Connected),
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match event {
            Ok(Event::Connected) | Err(RecvError::Lagged(_)) => {
                let listed = reconcile(&vms, &libvirt).await;
                if let Some(tx) = loaded.take() {
                    let _ = tx.send(());
                }
                if listed {
                    retry = None;
                    backoff.reset();
                } else {
                    retry = Some(Instant::now() + backoff.next_wait());
                }
            }
            Ok(Event::Disconnected { .. }) => retry = None,
            Ok(Event::Started { domain, id }) => {
                vms.add_libvirt(&Dom { name: domain, id }, &libvirt);
            }
            Ok(Event::Stopped { domain }) => {
                vms.remove_libvirt(&domain, &libvirt);
                libvirt.forget(&domain);
            }
            Ok(_) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

/// Makes the served domains libvirt's running ones; false when libvirt could not be asked
/// (nothing changed then).
async fn reconcile(vms: &VmMap, libvirt: &Arc<Libvirt>) -> bool {
    let running = match libvirt.running_domains(Instant::now() + LIST_TIMEOUT).await {
        Ok(doms) => doms,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list libvirt's running domains");
            return false;
        }
    };
    let current: BTreeSet<&Dom> = running.iter().collect();
    for served in vms.libvirt_domains(libvirt) {
        if !current.contains(&served) {
            vms.remove_libvirt(&served.name, libvirt);
        }
    }
    for dom in &running {
        vms.add_libvirt(dom, libvirt);
    }
    true
}
