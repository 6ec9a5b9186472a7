"""The libvirt zone backend: QEMU domains from domain_templates/, tightened live."""
