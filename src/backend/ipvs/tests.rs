//! Golden tests for IPVS-mode rendering.
