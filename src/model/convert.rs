//! Converts API objects into model data.
