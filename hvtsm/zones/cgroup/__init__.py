"""The cgroup backend: zones as cgroups plus network and mount namespaces on this host.

One job per module: `cgroupfs` (v1/v2 control files), `netns` (namespace and veth NIC),
`nft` (egress allow-list, NAT), `mounts` (private and read-only mount namespaces),
`launcher` (entering a zone from a forked child), `libc` (the system calls Python lacks),
`command` (running ip and nft), `driver` (the ZoneDriver that ties them together).
"""
