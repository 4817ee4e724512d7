//! Watchers streaming Services, EndpointSlices and this Node into the model.
