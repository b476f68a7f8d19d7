#!/bin/bash
# vmsnap test rig: real QEMU + a tiny guest running the real qemu-guest-agent (host lane), and a
# Debian VM with real OpenZFS built by DKMS (ZFS lane). Debian 12 host, root, TCG only (KVM does not
# work on this machine: see docs/development/testing.md).
#
# Usage: scripts/rig/rig.sh [all|packages|tiny|zfsvm|zfsvm_extra|sanoid|env]
#   all      build every missing or outdated step (idempotent, cached in $VMSNAP_RIG)
#   env      print the variables the tests read (VMSNAP_RIG=...)
#
# Everything lands in $VMSNAP_RIG (default /var/cache/vmsnap-rig), outside the clone. Each step writes
# a stamp holding the hash of its own recipe (its function text plus the helper files it copies); a
# step reruns when its stamp is missing or differs. Only Debian's archive is used.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RIG=${VMSNAP_RIG:-/var/cache/vmsnap-rig}
mkdir -p "$RIG/stamps"
APTDIR=$RIG/apt
APTO=(-o "Dir::Etc::sourcelist=$APTDIR/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::lists=$APTDIR/lists" -o "Dir::Cache::archives=$APTDIR/archives")
export DEBIAN_FRONTEND=noninteractive

log() { printf 'rig: %s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# The host has qemu-utils 10.x from bookworm-backports; bookworm's qemu-system-x86 7.2 conflicts with
# it, so qemu-system-x86 comes from bookworm-backports main through a private source list (nothing in
# /etc/apt changes).
apt_lists() {
  [ -s "$APTDIR/sources.list" ] && ls "$APTDIR"/lists/*_Packages >/dev/null 2>&1 && return 0
  mkdir -p "$APTDIR/lists/partial" "$APTDIR/archives/partial"
  cat > "$APTDIR/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main contrib
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian bookworm-backports main contrib
EOF
  apt-get "${APTO[@]}" -q update
}

step_packages() {
  apt_lists
  apt-get "${APTO[@]}" -q install -y --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils
  apt-get "${APTO[@]}" -q install -y --no-install-recommends cpio kmod debootstrap e2fsprogs dbus dbus-bin systemd util-linux xz-utils
  # libvirt on the host only saves the libvirt lane's enrolled guest (a boot under nested TCG takes minutes)
  apt-get "${APTO[@]}" -q install -y --no-install-recommends libvirt-daemon-system libvirt-clients
  apt-get "${APTO[@]}" clean
}

# The kernel both guests boot: the ABI package linux-image-amd64 depends on right now. Pinned into
# $RIG/kver the first time so that both images agree.
kver() {
  if [ ! -s "$RIG/kver" ]; then
    apt_lists >&2
    apt-cache "${APTO[@]}" depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{sub("linux-image-","",$2); print $2; exit}' > "$RIG/kver"
  fi
  cat "$RIG/kver"
}

# Tiny guest: Debian's kernel + busybox-static + Debian's qemu-guest-agent in an initramfs, plus an
# ext4 data disk template. The kernel is also extracted to an uncompressed vmlinux that QEMU boots
# through its PVH entry, skipping the decompressor (2.4 s instead of 4.9 s to the agent under TCG).
step_tiny() {
  local KVER; KVER=$(kver)
  apt_lists
  local W=$RIG/tiny.work; rm -rf "$W"; mkdir -p "$W/debs" "$W/kernel" "$W/bb" "$W/qga"
  (cd "$W/debs" && apt-get "${APTO[@]}" download "linux-image-$KVER" busybox-static qemu-guest-agent 2>&1 | grep -v unsandboxed || true)
  dpkg-deb -x "$W"/debs/linux-image-*.deb "$W/kernel"
  dpkg-deb -x "$W"/debs/busybox-static_*.deb "$W/bb"
  dpkg-deb -x "$W"/debs/qemu-guest-agent_*.deb "$W/qga"
  depmod -b "$W/kernel" "$KVER"   # the .deb ships no modules.dep
  "$HERE/build-initramfs.sh" "$W/kernel" "$KVER" "$W/qga" "$W/bb" "$RIG/initrd.gz.new"
  mv "$RIG/initrd.gz.new" "$RIG/initrd.gz"
  cp "$W/kernel/boot/vmlinuz-$KVER" "$RIG/vmlinuz"
  python3 - "$RIG/vmlinuz" "$RIG/vmlinux" <<'EOF'
import lzma, sys
data = open(sys.argv[1], 'rb').read()
start = data.find(b'\xfd7zXZ\x00')
open(sys.argv[2], 'wb').write(lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:]))
EOF
  truncate -s 64M "$W/data.raw"; mkfs.ext4 -q -F -L data "$W/data.raw"
  qemu-img convert -f raw -O qcow2 "$W/data.raw" "$RIG/data-template.qcow2"
  rm -rf "$W"
}

# ZFS lane: a Debian rootfs (debootstrap) with the same kernel, its headers, zfs-dkms built by DKMS
# inside the chroot for that kernel, qemu-guest-agent (to drive it), QEMU 10 and e2fsprogs (for the
# nested guests vmsnap snapshots there), libvirt and dbus (the libvirt lane), as an ext4 image. Tests boot it with a per-run overlay.
step_zfsvm() {
  local KVER; KVER=$(kver)
  local R=$RIG/zfsroot
  cleanup_mounts() { for m in dev/pts dev sys proc; do mountpoint -q "$R/$m" && umount "$R/$m" || true; done; }
  cleanup_mounts; rm -rf "$R"
  debootstrap --variant=minbase bookworm "$R" http://deb.debian.org/debian
  cat > "$R/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main contrib
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian bookworm-backports main contrib
EOF
  printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod +x "$R/usr/sbin/policy-rc.d"
  trap cleanup_mounts EXIT
  mount -t proc proc "$R/proc"; mount -t sysfs sys "$R/sys"; mount --bind /dev "$R/dev"; mount --bind /dev/pts "$R/dev/pts"
  chroot "$R" apt-get -q update
  chroot "$R" apt-get -q install -y --no-install-recommends "linux-image-$KVER" "linux-headers-$KVER" qemu-guest-agent kmod udev e2fsprogs
  chroot "$R" apt-get -q install -y --no-install-recommends -t bookworm-backports zfs-dkms zfsutils-linux
  # QEMU 10 from bookworm-backports, as on the host, for the guests vmsnap snapshots in there
  chroot "$R" apt-get -q install -y --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils
  # libvirt and a system bus for the libvirt lane (hook, enrolment, D-Bus service on real libvirtd)
  chroot "$R" apt-get -q install -y --no-install-recommends libvirt-daemon-system libvirt-clients dbus
  chroot "$R" apt-get clean
  cleanup_mounts; trap - EXIT
  ls "$R/lib/modules/$KVER/updates/dkms/zfs.ko"
  install -m 755 "$HERE/zfsvm-init" "$R/sbin/vmsnap-rig-init"
  printf '#!/bin/sh\nsync\ncase "$*" in *-r*) echo b > /proc/sysrq-trigger;; *) echo o > /proc/sysrq-trigger;; esac\n' > "$R/sbin/shutdown"
  chmod +x "$R/sbin/shutdown"
  mkdir -p "$R/mnt/share"
  rm -f "$RIG/zfsroot.img.new"
  mkfs.ext4 -q -F -L zfsroot -d "$R" "$RIG/zfsroot.img.new" 3G
  mv "$RIG/zfsroot.img.new" "$RIG/zfsroot.img"
  cp "$R/boot/initrd.img-$KVER" "$RIG/zfsvm-initrd.img"
  rm -rf "$R"
}

# Packages added to the OpenZFS VM after its image was built, so a new one does not cost a DKMS
# rebuild: zstd (libvirt decompresses zstd save images with it), OpenSSH and iproute2 (the
# replication target: an sshd in its own network namespace). Installed by chroot into the image.
step_zfsvm_extra() {
  local M=$RIG/zfsroot.mnt
  cleanup_extra() {
    for m in dev/pts dev sys proc; do mountpoint -q "$M/$m" && umount "$M/$m" || true; done
    mountpoint -q "$M" && umount "$M" || true
  }
  cleanup_extra; mkdir -p "$M"
  trap cleanup_extra EXIT
  mount -o loop "$RIG/zfsroot.img" "$M"
  mount -t proc proc "$M/proc"; mount -t sysfs sys "$M/sys"; mount --bind /dev "$M/dev"; mount --bind /dev/pts "$M/dev/pts"
  chroot "$M" apt-get -q update
  chroot "$M" apt-get -q install -y --no-install-recommends zstd openssh-server openssh-client iproute2
  # no host keys baked into the image: the tests make their own per run
  rm -f "$M"/etc/ssh/ssh_host_*
  chroot "$M" apt-get clean
  cleanup_extra; trap - EXIT
  rmdir "$M"
}

# Debian's sanoid (for the retention side-by-side test and the planning benchmark), unpacked rather
# than installed: the package depends on zfsutils-linux, which the host cannot use. Its two Perl
# libraries come along; tests run it with PERL5LIB and a `zfs` stand-in on PATH.
step_sanoid() {
  apt_lists
  local W=$RIG/sanoid.work; rm -rf "$W" "$RIG/sanoid"; mkdir -p "$W"
  (cd "$W" && apt-get "${APTO[@]}" download sanoid libconfig-inifiles-perl libcapture-tiny-perl 2>&1 | grep -v unsandboxed || true)
  for deb in "$W"/*.deb; do dpkg-deb -x "$deb" "$RIG/sanoid"; done
  rm -rf "$W"
  test -x "$RIG/sanoid/usr/sbin/sanoid" && test -s "$RIG/sanoid/usr/share/sanoid/sanoid.defaults.conf"
}

# The hash of what a step is: its function text, the kver helper, and the helper files it copies.
recipe_hash() {
  local step=$1; shift
  { declare -f "step_$step"; declare -f kver apt_lists; for f in "$@"; do cat "$HERE/$f"; done; } | sha256sum | cut -c1-16
}

run_step() {
  local step=$1; shift
  local want; want=$(recipe_hash "$step" "$@")
  if [ "$(cat "$RIG/stamps/$step" 2>/dev/null)" = "$want" ]; then
    log "$step: cached ($want)"; return 0
  fi
  log "$step: building (recipe $want)"
  local t0=$SECONDS
  "step_$step"
  echo "$want" > "$RIG/stamps/$step"
  log "$step: built in $((SECONDS - t0)) s"
}

packages_ok() {
  command -v qemu-system-x86_64 >/dev/null && qemu-system-x86_64 --version | grep -q 'version 1[0-9]\.' \
    && command -v debootstrap >/dev/null && command -v depmod >/dev/null && command -v cpio >/dev/null \
    && command -v dbus-daemon >/dev/null && command -v dbus-send >/dev/null && command -v busctl >/dev/null \
    && command -v setpriv >/dev/null && command -v virsh >/dev/null && command -v libvirtd >/dev/null
}

case "${1:-all}" in
  all)
    t0=$SECONDS
    # packages live on the host, not in the cache: check what is installed, not a stamp
    if packages_ok; then log "packages: present"; else run_step packages; packages_ok; fi
    [ -s "$RIG/vmlinux" ] || rm -f "$RIG/stamps/tiny"
    run_step tiny build-initramfs.sh
    [ -s "$RIG/zfsroot.img" ] || rm -f "$RIG/stamps/zfsvm"
    zfsvm_was=$(cat "$RIG/stamps/zfsvm" 2>/dev/null || true)
    run_step zfsvm zfsvm-init
    # a new image has none of the extras
    [ "$zfsvm_was" = "$(cat "$RIG/stamps/zfsvm")" ] || rm -f "$RIG/stamps/zfsvm_extra"
    run_step zfsvm_extra
    [ -x "$RIG/sanoid/usr/sbin/sanoid" ] || rm -f "$RIG/stamps/sanoid"
    run_step sanoid
    log "rig ready in $((SECONDS - t0)) s: $RIG"
    ;;
  packages) step_packages ;;
  tiny) run_step tiny build-initramfs.sh ;;
  zfsvm) run_step zfsvm zfsvm-init ;;
  zfsvm_extra) run_step zfsvm_extra ;;
  sanoid) run_step sanoid ;;
  env) echo "VMSNAP_RIG=$RIG" ;;
  *) echo "usage: $0 [all|packages|tiny|zfsvm|zfsvm_extra|sanoid|env]" >&2; exit 2 ;;
esac
