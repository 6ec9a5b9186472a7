"""Guest images for libvirt zones: the lab initramfs (host kernel + busybox init, host root
over 9p) and the cloud-init seed of the disk template."""

from hvtsm.image.lab import LabImage, build_lab_image, kernel_cmdline, plan_lab_image

__all__ = ["LabImage", "build_lab_image", "kernel_cmdline", "plan_lab_image"]
