#!/bin/sh
# hvtsm lab guest init (busybox sh). Built into the initramfs as /init by hvtsm/image/lab.py.
#
# Stage 1 (PID 1 in the initramfs): mount proc/sys/dev, load the virtio + 9p + overlay
# modules, mount the host root (9p tag "hostroot", read-only) under a tmpfs overlay at
# /newroot, configure lo and eth0, then switch_root into /newroot running this same script
# (copied to /run/hvtsm/init, with busybox beside it) as stage 2.
# Stage 2 (PID 1 in the host-root view): start the guest agent
#   PYTHONPATH=$hvtsm.agent $hvtsm.python -m guest_agent
# restart it whenever it exits, and reap orphans forever. PID 1 never exits.
#
# Kernel command line (all optional except python/agent for stage 2):
#   hvtsm.python=PATH     interpreter in the host root (e.g. /usr/bin/python3)
#   hvtsm.agent=DIR       directory put on PYTHONPATH; it holds the guest_agent package
#   hvtsm.ip=ADDR/LEN     address for eth0 (no address: eth0 stays down)
#   hvtsm.gw=ADDR         default route via this gateway
#   hvtsm.dns=ADDR        nameserver written to /etc/resolv.conf (tmpfs overlay copy)
#   hvtsm.hostname=NAME   host name (default hvtsm-lab)
#   hvtsm.shell=1         on a fatal error open a shell on the console instead of powering off
# Every step prints "hvtsm-init: <what> +<seconds since kernel start> s" on the console.
# Any fatal error prints "hvtsm-init: FATAL: ..." and powers the guest off (the domain's
# on_poweroff is destroy, so the host sees the zone end).

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
set -f  # no globbing of the kernel command line words
bb=/bin/busybox  # stage 2 runs busybox from /run/hvtsm and calls applets through $bb

mark() {
    up=?
    [ -r /proc/uptime ] && read -r up _rest </proc/uptime
    echo "hvtsm-init: $* +$up s"
}

fatal() {
    echo "hvtsm-init: FATAL: $*"
    if [ -d /proc/1 ]; then
        echo "hvtsm-init: last kernel messages:"
        $bb dmesg 2>/dev/null | $bb tail -n 15 | $bb sed 's/^/hvtsm-init:   /'
    fi
    if [ "$P_SHELL" = 1 ]; then
        echo "hvtsm-init: hvtsm.shell=1: starting a shell on the console"
        $bb setsid $bb cttyhack $bb sh
    fi
    echo "hvtsm-init: powering off"
    $bb sync
    $bb poweroff -f
    # poweroff -f does not return; if it did, wait here: PID 1 must not exit
    while :; do $bb sleep 3600; done
}

read_cmdline() {
    P_PYTHON="" P_AGENT="" P_IP="" P_GW="" P_DNS="" P_HOSTNAME=hvtsm-lab P_SHELL=0
    read -r cmdline </proc/cmdline
    for word in $cmdline; do
        case "$word" in
            hvtsm.python=*) P_PYTHON="${word#*=}" ;;
            hvtsm.agent=*) P_AGENT="${word#*=}" ;;
            hvtsm.ip=*) P_IP="${word#*=}" ;;
            hvtsm.gw=*) P_GW="${word#*=}" ;;
            hvtsm.dns=*) P_DNS="${word#*=}" ;;
            hvtsm.hostname=*) P_HOSTNAME="${word#*=}" ;;
            hvtsm.shell=*) P_SHELL="${word#*=}" ;;
        esac
    done
}

load_modules() {
    # The builder put the modules (decompressed, dependencies first) here in load order.
    set +f
    for ko in /lib/hvtsm/modules/*.ko; do
        [ -e "$ko" ] || continue
        if ! out=$(insmod "$ko" 2>&1); then
            case "$out" in
                *"File exists"*) ;;  # already loaded / built in
                *) echo "hvtsm-init: warning: insmod ${ko##*/}: $out" ;;
            esac
        fi
    done
    set -f
}

mount_root() {
    mkdir -p /lower /rw /newroot
    # cache=loose: the lower layer is read-only for the guest; caching makes the many
    # small reads of a Python start cheap. msize: larger messages, fewer round trips.
    if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 \
            hostroot /lower; then
        fatal "cannot mount the host root: 9p tag 'hostroot' (trans=virtio) failed;" \
            "is the <filesystem> device in the domain and are 9pnet_virtio and 9p loaded?"
    fi
    mount -t tmpfs -o mode=0755 tmpfs /rw || fatal "cannot mount the tmpfs for the overlay"
    mkdir -p /rw/upper /rw/work
    if ! mount -t overlay overlay \
            -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot; then
        fatal "cannot mount the overlay (lower 9p, upper tmpfs) at /newroot"
    fi
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run \
        || fatal "cannot mount a tmpfs at /run in the new root"
    mkdir -p /newroot/run/hvtsm
    cp /bin/busybox /newroot/run/hvtsm/busybox || fatal "cannot copy busybox to /run/hvtsm"
    cp /init /newroot/run/hvtsm/init || fatal "cannot copy the init script to /run/hvtsm"
    [ -r /etc/hvtsm-image ] && cp /etc/hvtsm-image /newroot/run/hvtsm/image
}

setup_network() {
    ip link set lo up
    hostname "$P_HOSTNAME"
    if [ -n "$P_IP" ]; then
        ip link set eth0 up || fatal "no eth0 to configure (virtio_net loaded?)"
        ip addr add "$P_IP" dev eth0 || fatal "cannot set address $P_IP on eth0"
        if [ -n "$P_GW" ]; then
            ip route add default via "$P_GW" dev eth0 \
                || fatal "cannot add the default route via $P_GW"
        fi
        mark "network eth0 $P_IP${P_GW:+ via $P_GW}"
    fi
    if [ -n "$P_DNS" ]; then
        rm -f /newroot/etc/resolv.conf
        echo "nameserver $P_DNS" >/newroot/etc/resolv.conf
    fi
    echo "$P_HOSTNAME" >/newroot/etc/hostname 2>/dev/null
}

stage1() {
    mount -t proc -o nosuid,nodev,noexec proc /proc
    mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
    mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
    exec </dev/console >/dev/console 2>&1
    read_cmdline
    image=""
    [ -r /etc/hvtsm-image ] && image=" ($(tr '\n' ' ' </etc/hvtsm-image | sed 's/ *$//'))"
    mark "stage-1 started$image"
    load_modules
    mark "modules loaded"
    mount_root
    mark "root mounted"
    setup_network
    mount --move /dev /newroot/dev || fatal "cannot move /dev into the new root"
    mount --move /sys /newroot/sys || fatal "cannot move /sys into the new root"
    mark "switching root"
    mount --move /proc /newroot/proc || fatal "cannot move /proc into the new root"
    exec switch_root /newroot /run/hvtsm/busybox sh /run/hvtsm/init stage2
    fatal "switch_root failed"
}

stage2() {
    # running from /run/hvtsm/busybox: the host's own tools come first on PATH, busybox
    # applets are reached through it explicitly
    bb=/run/hvtsm/busybox
    HOME=/root
    export HOME
    read_cmdline
    $bb mkdir -p /dev/pts /dev/shm
    $bb mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
    $bb mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
    mark "stage-2 started"
    [ -n "$P_PYTHON" ] || fatal "no hvtsm.python= on the kernel command line"
    [ -n "$P_AGENT" ] || fatal "no hvtsm.agent= on the kernel command line"
    [ -x "$P_PYTHON" ] || fatal "the interpreter $P_PYTHON is not executable in the guest" \
        "(the host root is read through 9p as the QEMU user: is it world-readable?)"
    [ -d "$P_AGENT" ] || fatal "the agent directory $P_AGENT is not visible in the guest"
    n=0
    while :; do
        n=$((n + 1))
        mark "starting agent #$n: PYTHONPATH=$P_AGENT $P_PYTHON -m guest_agent"
        PYTHONPATH="$P_AGENT" PYTHONUNBUFFERED=1 "$P_PYTHON" -m guest_agent </dev/null &
        agent=$!
        # ash waits with waitpid(-1): orphans that die meanwhile are reaped here too
        wait "$agent"
        rc=$?
        mark "agent #$n exited with status $rc; restarting in 1 s"
        $bb sleep 1
    done
}

if [ "$1" = stage2 ]; then
    stage2
else
    stage1
fi
fatal "init fell through"
