#!/bin/bash
# Runs inside the rig's OpenZFS VM (scripts/record-fixtures starts it): interrupts real
# `zfs receive -s` runs (a full stream, an incremental one, a raw stream of an encrypted dataset)
# and keeps what `zfs send -n -v -t TOKEN` prints for each resume token, in $1/<case>.txt, the
# lines vmsnap decodes before it resumes a send (src/replicate/token.rs).
set -euo pipefail
out=$1
mkdir -p "$out"
truncate -s 512M /tmp/tokens.img
zpool create -f -O mountpoint=none tokens /tmp/tokens.img
trap 'zpool destroy tokens; rm -f /tmp/tokens.img /tmp/tokens.key' EXIT
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > /tmp/tokens.key
zfs create -o mountpoint=/tokens/web tokens/web
zfs create -o mountpoint=/tokens/secret -o encryption=on -o keyformat=hex -o keylocation=file:///tmp/tokens.key tokens/secret
for ds in web secret; do
  dd if=/dev/urandom of=/tokens/$ds/a bs=1M count=8 status=none
  zfs snapshot tokens/$ds@autosnap_2026-12-01_00:00:00_daily
  dd if=/dev/urandom of=/tokens/$ds/b bs=1M count=8 status=none
  zfs snapshot tokens/$ds@autosnap_2026-12-02_00:00:00_daily
done
zfs create -o mountpoint=none tokens/replica
old=tokens/web@autosnap_2026-12-01_00:00:00_daily
new=tokens/web@autosnap_2026-12-02_00:00:00_daily
# case name, the receiving dataset, then the send's arguments; 3 MB of the stream get there
record() {
  local name=$1 into=$2
  shift 2
  zfs send "$@" | head -c 3000000 | zfs receive -s -u "$into" 2>/dev/null || true
  local token
  token=$(zfs get -H -o value receive_resume_token "$into")
  [ "$token" != "-" ] || { echo "no resume token on $into after an interrupted receive" >&2; exit 1; }
  {
    echo "# stdout of \`zfs send -n -v -t TOKEN\`, TOKEN the receive_resume_token of an interrupted \`zfs receive -s\` of \`zfs send $*\`"
    echo "# recorded with $(zfs version | head -1) on Linux $(uname -r)"
    zfs send -n -v -t "$token"
  } > "$out/$name.txt"
  echo "recorded $out/$name.txt"
}
record send-nvt-full tokens/replica/full "$new"
zfs send "$old" | zfs receive -u tokens/replica/incr
record send-nvt-incremental tokens/replica/incr -I "$old" "$new"
record send-nvt-raw-encrypted tokens/replica/secret -w tokens/secret@autosnap_2026-12-02_00:00:00_daily
