//! iptables mode: upstream-compatible NAT and filter chains written with iptables-restore.
