#!/bin/bash
# Builds the tiny guest's initramfs: busybox-static, Debian's qemu-ga with its shared libraries, and
# the virtio/ext4 modules (all =m in Debian's kernel).
# Usage: build-initramfs.sh <kernel-dir> <kver> <qga-dir> <busybox-dir> <out.cpio.gz>
set -euo pipefail
KX=$1; KVER=$2; QGA=$3; BB=$4; OUT=$5
HERE=$(cd "$(dirname "$0")" && pwd)
R=$(mktemp -d /tmp/vmsnap-initrd.XXXXXX)
trap 'rm -rf "$R"' EXIT
mkdir -p "$R"/{bin,sbin,dev,proc,sys,run,tmp,mnt,etc,var/log,lib/x86_64-linux-gnu,lib64,usr/bin,usr/sbin}
cp "$BB/bin/busybox" "$R/bin/busybox"
for applet in $("$R/bin/busybox" --list-full); do
  [ -e "$R/$applet" ] || ln -s /bin/busybox "$R/$applet"
done
cp "$QGA/usr/sbin/qemu-ga" "$R/usr/sbin/qemu-ga"
# qemu-ga's libraries come from the host, which is Debian 12 like the guest's userland
for lib in $(ldd "$QGA/usr/sbin/qemu-ga" | awk '/=> \//{print $3} /^[ \t]*\/lib64/{print $1}'); do
  case $lib in
    /lib64/*) cp -L "$lib" "$R/lib64/" ;;
    *) cp -L "$lib" "$R/lib/x86_64-linux-gnu/" ;;
  esac
done
M=lib/modules/$KVER
mkdir -p "$R/$M"
for m in virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console \
         crc16 mbcache jbd2 crc32c_generic libcrc32c ext4; do
  for f in $(grep -E "/$m\.ko:" "$KX/$M/modules.dep" | tr -d ':'); do
    mkdir -p "$R/$M/$(dirname "$f")"; cp "$KX/$M/$f" "$R/$M/$f"
  done
done
cp "$KX/$M"/modules.{dep,alias,builtin,order,symbols} "$R/$M/" 2>/dev/null || true
install -m 755 "$HERE/tiny-init" "$R/init"
# qemu-ga's guest-shutdown runs "shutdown -P|-r|-H +0"
printf '#!/bin/sh\nsync\ncase "$*" in *-r*) reboot -f ;; *) poweroff -f ;; esac\n' > "$R/sbin/shutdown"
chmod +x "$R/sbin/shutdown"
echo "root:x:0:0:root:/:/bin/sh" > "$R/etc/passwd"
echo "root:x:0:" > "$R/etc/group"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT"
