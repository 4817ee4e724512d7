//! State shared between the watchers (writers) and the sync loop (reader).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::model::ClusterState;

/// The cluster state plus the signals the sync loop waits on.
#[derive(Debug)]
pub struct Shared {
    state: Mutex<ClusterState>,
    wake: Notify,
    services_synced: AtomicBool,
    slices_synced: AtomicBool,
}

impl Shared {
    /// Wraps a fresh state.
    pub fn new(state: ClusterState) -> Self {
        Shared {
            state: Mutex::new(state),
            wake: Notify::new(),
            services_synced: AtomicBool::new(false),
            slices_synced: AtomicBool::new(false),
        }
    }

    /// Locks the state. A poisoned lock is recovered: the state is plain data and every
    /// mutation is complete before the guard drops, so it is still consistent.
    pub fn lock(&self) -> MutexGuard<'_, ClusterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the sync loop something changed.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits for [`Shared::wake`].
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Marks the initial Service list as complete.
    pub fn set_services_synced(&self) {
        self.services_synced.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Marks the initial EndpointSlice list as complete.
    pub fn set_slices_synced(&self) {
        self.slices_synced.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Whether both initial lists are complete (nothing is programmed before).
    pub fn initial_lists_done(&self) -> bool {
        self.services_synced.load(Ordering::SeqCst) && self.slices_synced.load(Ordering::SeqCst)
    }
}
