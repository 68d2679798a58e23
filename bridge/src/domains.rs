//! libvirt's running domains as VMs: served while they run, following libvirt's
//! lifecycle events, and reconciled with libvirt's list after every (re)connection, since
//! events that happened while the connection was down were not seen.
//!
//! While libvirtd is away the domains stay listed and their calls fail UNAVAILABLE; a
//! domain that stopped meanwhile goes at the reconnection.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use qga_libvirt::{Event, Libvirt};
use tokio::{
    sync::{broadcast::error::RecvError, watch},
    time::Instant,
};

use crate::registry::Registry;

/// How long listing the running domains may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `libvirt`'s running domains in `registry` until `shutdown`.
pub async fn follow(
    registry: Arc<Registry>,
    libvirt: Arc<Libvirt>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut events = libvirt.subscribe();
    if *libvirt.connected().borrow() {
        reconcile(&registry, &libvirt).await;
    }
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match event {
            Ok(Event::Connected) | Err(RecvError::Lagged(_)) => {
                reconcile(&registry, &libvirt).await;
            }
            Ok(Event::Started { domain }) => {
                registry.add_libvirt(&domain, &libvirt);
            }
            Ok(Event::Stopped { domain }) => registry.remove_libvirt(&domain, &libvirt),
            Ok(_) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

/// Makes the served domains libvirt's running ones. A failed listing changes nothing.
async fn reconcile(registry: &Registry, libvirt: &Arc<Libvirt>) {
    let running = match libvirt.running_domains(Instant::now() + LIST_TIMEOUT).await {
        Ok(names) => names.into_iter().collect::<BTreeSet<_>>(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list libvirt's running domains");
            return;
        }
    };
    for gone in registry
        .libvirt_domains(libvirt)
        .into_iter()
        .filter(|d| !running.contains(d))
    {
        registry.remove_libvirt(&gone, libvirt);
    }
    for name in &running {
        registry.add_libvirt(name, libvirt);
    }
}
