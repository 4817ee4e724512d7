//! Flags and the KubeProxyConfiguration file, parsed and validated like upstream.
