//! libvirt's event loop thread and the C callbacks that turn its domain events and
//! connection closes into [`Event`]s: the crate's only `unsafe`.
//!
//! Each registration gets its own boxed sender as `opaque`; libvirt hands it back to the
//! callback and frees it through [`free_sender`] when the registration ends.

use std::{
    ffi::{CStr, CString, c_char, c_int, c_void},
    sync::{Arc, OnceLock},
};

use tokio::sync::{Notify, broadcast};
use virt::{connect::Connect, domain::Domain, error::Error, sys};

use crate::{Event, LibvirtError};

/// Registers libvirt's default event loop (once per process, before any connection is
/// opened, as libvirt requires) and runs it on a thread of its own.
pub fn start_loop() -> Result<(), LibvirtError> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            // libvirt prints every error to standard error unless told otherwise; ours are
            // returned, logged where they matter.
            virt::error::clear_error_callback();
            virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| {
                    loop {
                        if let Err(e) = virt::event::event_run_default_impl() {
                            tracing::warn!(error = %e, "libvirt event loop");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                })
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| LibvirtError::Unavailable(format!("libvirt event loop: {e}")))
}

type Sender = broadcast::Sender<Event>;

/// The name of `dom`, copied.
///
/// # Safety
/// `dom` must be a valid domain pointer for the duration of the call.
unsafe fn domain_name(dom: sys::virDomainPtr) -> Option<String> {
    // SAFETY: the caller guarantees `dom` is valid; libvirt returns a string owned by it
    // (or null), which we copy before returning.
    let name = unsafe { sys::virDomainGetName(dom) };
    if name.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated, alive as long as `dom`.
    Some(
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// `VIR_DOMAIN_EVENT_ID_LIFECYCLE`.
unsafe extern "C" fn lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the `Box<Sender>` registered with this callback; libvirt keeps it
    // alive until it calls `free_sender`, after the last callback.
    let tx = unsafe { &*(opaque as *const Sender) };
    // SAFETY: libvirt passes a domain valid for the callback's duration.
    let Some(domain) = (unsafe { domain_name(dom) }) else {
        return 0;
    };
    let event = match u32::try_from(event) {
        Ok(sys::VIR_DOMAIN_EVENT_STARTED) => {
            // SAFETY: as above; `virDomainGetID` reads the handle, no round trip.
            let id = unsafe { sys::virDomainGetID(dom) };
            if id == u32::MAX {
                return 0;
            }
            Event::Started { domain, id }
        }
        Ok(sys::VIR_DOMAIN_EVENT_STOPPED) => Event::Stopped { domain },
        _ => return 0,
    };
    let _ = tx.send(event);
    0
}

/// The three device events share one signature: domain and device alias.
macro_rules! device_callback {
    ($name:ident, $variant:ident) => {
        unsafe extern "C" fn $name(
            _conn: sys::virConnectPtr,
            dom: sys::virDomainPtr,
            alias: *const c_char,
            opaque: *mut c_void,
        ) {
            // SAFETY: as in `lifecycle`.
            let tx = unsafe { &*(opaque as *const Sender) };
            // SAFETY: libvirt passes a domain valid for the callback's duration.
            let Some(domain) = (unsafe { domain_name(dom) }) else {
                return;
            };
            if alias.is_null() {
                return;
            }
            // SAFETY: non-null, NUL-terminated, alive for the callback's duration.
            let alias = unsafe { CStr::from_ptr(alias) }
                .to_string_lossy()
                .into_owned();
            let _ = tx.send(Event::$variant { domain, alias });
        }
    };
}

device_callback!(device_added, DeviceAdded);
device_callback!(device_removed, DeviceRemoved);
device_callback!(device_removal_failed, DeviceRemovalFailed);

/// Frees a registration's sender.
unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: `opaque` came from `Box::into_raw` in `register`, and libvirt calls this once.
    drop(unsafe { Box::from_raw(opaque as *mut Sender) });
}

/// The connection closed: wake the supervisor.
unsafe extern "C" fn closed(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Box<Arc<Notify>>` registered with this callback, alive until
    // `free_notify`.
    let lost = unsafe { &*(opaque as *const Arc<Notify>) };
    tracing::debug!(reason, "libvirt connection closed");
    lost.notify_one();
}

/// Frees the close callback's notifier.
unsafe extern "C" fn free_notify(opaque: *mut c_void) {
    // SAFETY: `opaque` came from `Box::into_raw` in `Registered::new`; freed once.
    drop(unsafe { Box::from_raw(opaque as *mut Arc<Notify>) });
}

/// An open connection with our callbacks registered; dropping it deregisters them
/// (which talks to libvirtd: drop it off the async workers).
#[derive(Debug)]
pub struct Registered {
    conn: Connect,
    ids: Vec<c_int>,
    close_registered: bool,
}

/// `VIR_DOMAIN_EVENT_ID_LIFECYCLE`'s callback signature.
type Lifecycle =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
/// The device events' callback signature.
type Device =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *const c_char, *mut c_void);
/// How the C API spells "some callback" (`VIR_DOMAIN_EVENT_CALLBACK`).
type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

/// The domain events we listen to, each with its callback cast to the generic type that
/// `virConnectDomainEventRegisterAny` takes.
fn domain_callbacks() -> [(u32, Generic); 4] {
    // SAFETY (each transmute below): libvirt calls a callback registered for an event
    // id with that id's signature (its VIR_DOMAIN_EVENT_CALLBACK cast); the generic
    // type is only how the C API spells "some callback".
    [
        // SAFETY: see above.
        (sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE, unsafe {
            std::mem::transmute::<Lifecycle, Generic>(lifecycle)
        }),
        // SAFETY: see above.
        (sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, unsafe {
            std::mem::transmute::<Device, Generic>(device_added)
        }),
        // SAFETY: see above.
        (sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, unsafe {
            std::mem::transmute::<Device, Generic>(device_removed)
        }),
        // SAFETY: see above.
        (sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, unsafe {
            std::mem::transmute::<Device, Generic>(device_removal_failed)
        }),
    ]
}

impl Registered {
    /// Registers the domain event callbacks and the close callback on `conn`.
    pub fn new(conn: Connect, tx: Sender, lost: Arc<Notify>) -> Result<Self, LibvirtError> {
        let mut this = Self {
            conn,
            ids: Vec::new(),
            close_registered: false,
        };
        // On an error `this` is dropped, which deregisters whatever was registered.
        this.register_domain_events(&tx)?;
        this.register_close(lost)?;
        Ok(this)
    }

    /// Registers each of [`domain_callbacks`] for every domain, each with its own copy of
    /// `tx`, recording the ids for [`Drop`].
    fn register_domain_events(&mut self, tx: &Sender) -> Result<(), LibvirtError> {
        for (id, callback) in domain_callbacks() {
            let opaque = Box::into_raw(Box::new(tx.clone())) as *mut c_void;
            // SAFETY: the connection is open; a null domain means every domain; `opaque`
            // stays valid until libvirt calls `free_sender` with it.
            let registered = unsafe {
                sys::virConnectDomainEventRegisterAny(
                    self.conn.as_ptr(),
                    std::ptr::null_mut(),
                    id as c_int,
                    Some(callback),
                    opaque,
                    Some(free_sender),
                )
            };
            if registered < 0 {
                // SAFETY: libvirt did not take `opaque`: ours to free.
                unsafe { free_sender(opaque) };
                return Err(Error::last_error().into());
            }
            self.ids.push(registered);
        }
        Ok(())
    }

    /// Registers the close callback, which wakes `lost` when the connection closes.
    fn register_close(&mut self, lost: Arc<Notify>) -> Result<(), LibvirtError> {
        let opaque = Box::into_raw(Box::new(lost)) as *mut c_void;
        // SAFETY: the connection is open; `free_notify` frees `opaque` when the callback
        // is unregistered or the connection freed.
        let registered = unsafe {
            sys::virConnectRegisterCloseCallback(
                self.conn.as_ptr(),
                Some(closed),
                opaque,
                Some(free_notify),
            )
        };
        if registered < 0 {
            // SAFETY: libvirt did not take `opaque`.
            unsafe { free_notify(opaque) };
            return Err(Error::last_error().into());
        }
        self.close_registered = true;
        Ok(())
    }

    /// The connection.
    pub fn connection(&self) -> &Connect {
        &self.conn
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            // SAFETY: `id` was returned by `virConnectDomainEventRegisterAny` on this open
            // connection; a failure (libvirtd gone) only means there is nothing to undo.
            unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), id) };
        }
        if self.close_registered {
            // SAFETY: `closed` was registered on this connection.
            unsafe { sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(closed)) };
        }
    }
}

/// `virDomainDetachDeviceAlias`, which the `virt` crate does not wrap.
pub fn detach_alias(domain: &Domain, alias: &str, flags: u32) -> Result<(), LibvirtError> {
    let alias = CString::new(alias).map_err(|_| LibvirtError::Refused {
        code: "invalidarg".into(),
        message: "a device alias cannot contain NUL".into(),
    })?;
    // SAFETY: `domain` is a valid domain handle and `alias` a NUL-terminated string, both
    // alive for the call.
    let r = unsafe { sys::virDomainDetachDeviceAlias(domain.as_ptr(), alias.as_ptr(), flags) };
    if r < 0 {
        return Err(Error::last_error().into());
    }
    Ok(())
}
