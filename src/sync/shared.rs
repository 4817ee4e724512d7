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
    /// A wake not yet taken by a sync: a stale permit left in `wake` by a change a sync
    /// already took wakes nothing.
    dirty: AtomicBool,
    services_synced: AtomicBool,
    slices_synced: AtomicBool,
}

impl Shared {
    /// Wraps a fresh state.
    pub fn new(state: ClusterState) -> Self {
        Shared {
            state: Mutex::new(state),
            wake: Notify::new(),
            dirty: AtomicBool::new(false),
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
        self.dirty.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// The sync loop is about to take every recorded change: wakes until now are answered.
    pub fn taking_changes(&self) {
        self.dirty.store(false, Ordering::SeqCst);
    }

    /// Applies `f` to the state, then wakes the sync loop only if `f` recorded a change the
    /// loop acts on: a no-op update or a Node heartbeat wakes nothing (the state decides).
    pub fn update<T>(&self, f: impl FnOnce(&mut ClusterState) -> T) -> T {
        let (out, wake) = {
            let mut st = self.lock();
            let out = f(&mut st);
            (out, st.take_wake())
        };
        if wake {
            self.wake();
        }
        out
    }

    /// Waits for a [`Shared::wake`] not yet answered by [`Shared::taking_changes`].
    pub async fn woken(&self) {
        loop {
            let notified = self.wake.notified();
            if self.dirty.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
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
