//! The sync loop: bounded-frequency runner deciding full or partial syncs.
