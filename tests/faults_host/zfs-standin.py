#!/usr/bin/env python3
"""A recording stand-in for `zfs`, for the host-lane fault matrix only (tests/faults_host.rs).

Real QEMU and the real guest agent run the snapshot; this answers the few `zfs` calls vmsnap makes
around them, with OpenZFS's output format and error messages, and keeps its snapshots (with their
user properties) in a JSON state file so the test can check what exists after a crash. One
filesystem, `tank/vm`, mounted where the guest's disk images are. Every call is appended to a log.

Environment: VMSNAP_STANDIN_STATE (state file), VMSNAP_STANDIN_MOUNT (mountpoint),
VMSNAP_STANDIN_SNAPSHOT_SLEEP (seconds `snapshot` sleeps first: a hung zfs).
"""
import fcntl
import json
import os
import sys
import time

DATASET = "tank/vm"


def fail(msg):
    sys.stderr.write(msg + "\n")
    sys.exit(1)


def main(argv):
    state_path = os.environ["VMSNAP_STANDIN_STATE"]
    mount = os.environ["VMSNAP_STANDIN_MOUNT"]
    lock = open(state_path + ".lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    with open(state_path + ".log", "a") as log:
        log.write(json.dumps(argv) + "\n")
    try:
        with open(state_path) as f:
            state = json.load(f)
    except FileNotFoundError:
        state = {"txg": 1, "snapshots": {}}
    snaps = state["snapshots"]

    def save():
        tmp = state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, state_path)

    cmd, args = argv[0], argv[1:]
    if cmd == "list" and "filesystem,volume" in args:
        target = args[-1] if not args[-1].startswith("-") and "," not in args[-1] else None
        if target not in (None, DATASET):
            fail(f"cannot open '{target}': dataset does not exist")
        print(f"{DATASET}\tfilesystem\t0\t{mount}\tyes")
    elif cmd == "list" and "snapshot" in args:
        cols = args[args.index("-o") + 1].split(",")
        for name, s in sorted(snaps.items(), key=lambda kv: kv[1]["createtxg"]):
            row = []
            for c in cols:
                row.append({"name": name, "creation": str(s["creation"]), "used": "0", "guid": str(s["guid"]),
                            "createtxg": str(s["createtxg"]), "userrefs": "0"}.get(c, s["props"].get(c, "-")))
            print("\t".join(row))
    elif cmd == "snapshot":
        time.sleep(float(os.environ.get("VMSNAP_STANDIN_SNAPSHOT_SLEEP", "0")))
        props, names, i = {}, [], 0
        while i < len(args):
            if args[i] == "-o":
                k, v = args[i + 1].split("=", 1)
                props[k] = v
                i += 2
            else:
                names.append(args[i])
                i += 1
        for n in names:
            if not n.startswith(DATASET + "@"):
                fail(f"cannot open '{n.split('@')[0]}': dataset does not exist")
            if n in snaps:
                fail(f"cannot create snapshot '{n}': dataset already exists")
        state["txg"] += 1
        for n in names:
            snaps[n] = {"createtxg": state["txg"], "creation": int(time.time()), "guid": state["txg"] * 7919, "props": dict(props)}
        save()
    elif cmd == "get" and "-t" in args and "-d" not in args:
        # get -H -t snapshot -s local -o name,value PROP (every pool's snapshots)
        for name, s in sorted(snaps.items(), key=lambda kv: kv[1]["createtxg"]):
            if args[-1] in s["props"]:
                print(f"{name}\t{s['props'][args[-1]]}")
    elif cmd == "get" and "-t" in args:
        # get -H -p -d 1 -t snapshot -s local,received -o name,property,value,source PROPS DATASET
        wanted = args[-2].split(",")
        for name, s in sorted(snaps.items(), key=lambda kv: kv[1]["createtxg"]):
            if name.startswith(args[-1] + "@"):
                for k, v in s["props"].items():
                    if k in wanted:
                        print(f"{name}\t{k}\t{v}\tlocal")
    elif cmd == "get":
        name = args[-1]
        if name not in snaps:
            fail(f"cannot open '{name}': dataset does not exist")
        for k, v in snaps[name]["props"].items():
            print(f"{name}\t{k}\t{v}\tlocal")
    elif cmd == "set":
        name = args[-1]
        if name not in snaps:
            fail(f"cannot open '{name}': dataset does not exist")
        for kv in args[:-1]:
            k, v = kv.split("=", 1)
            snaps[name]["props"][k] = v
        save()
    elif cmd == "inherit":
        prop, name = args[0], args[1]
        if name not in snaps:
            fail(f"cannot open '{name}': dataset does not exist")
        snaps[name]["props"].pop(prop, None)
        save()
    elif cmd == "destroy":
        ds, names = args[-1].split("@", 1)
        for n in names.split(","):
            snaps.pop(f"{ds}@{n}", None)
        save()
    else:
        fail(f"zfs-standin: unsupported call {argv}")


if __name__ == "__main__":
    main(sys.argv[1:])
