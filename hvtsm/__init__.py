"""hvtsm: a Temporal Sandbox Manager for libvirt/QEMU and cgroup zones."""

__version__ = "0.1.0"
