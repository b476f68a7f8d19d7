//! The zfs adapter against real OpenZFS (ZFS lane, see `vmsnap_testkit::rig::lane`): inside the OpenZFS
//! VM it creates two pools on the VM's spare disks and runs the cases below against the real `zfs`.

use libtest_mimic::{Arguments, Failed, Trial};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use vmsnap::zargs;
use vmsnap::zfs::{Dataset, PropName, SnapshotName, Zfs, ZfsError};

use vmsnap_testkit::rig::lane::sh;
use vmsnap_testkit::support::check;

const POOL: &str = "vmsnaptest";
const POOL2: &str = "vmsnaptest2";

fn main() {
    vmsnap_testkit::rig::lane::dispatch(inside);
}

fn inside() {
    let args = Arguments::from_args();
    sh(&format!("zpool create -f -O mountpoint=/{POOL} {POOL} /dev/disk/by-id/virtio-pool1"));
    sh(&format!("zpool create -f -O mountpoint=/{POOL2} {POOL2} /dev/disk/by-id/virtio-pool2"));
    let version = sh("zfs version | head -1");
    eprintln!("inside the OpenZFS VM: {}", version.trim());
    let cases: &[(&str, Case)] = &[
        ("atomic_multi_dataset_snapshot_with_user_properties", |c| Box::pin(atomic_snapshot(c))),
        ("snapshot_across_two_pools", |c| Box::pin(two_pools(c))),
        ("snapshot_conflict_and_missing_dataset_create_nothing", |c| Box::pin(conflicts(c))),
        ("hold_release_destroy", |c| Box::pin(holds(c))),
        ("rollback_and_clone", |c| Box::pin(rollback_clone(c))),
        ("user_properties_get_set", |c| Box::pin(properties(c))),
        ("dataset_of_file_and_zvol", |c| Box::pin(resolve(c))),
        ("error_variant_out_of_space", |c| Box::pin(busy_and_space(c))),
        ("prune_ignores_an_inherited_domain_property", |c| Box::pin(prune_inherited(c))),
        ("a_domain_without_disks_has_the_datasets_of_its_own_snapshots", |c| Box::pin(datasets_without_disks(c))),
    ];
    let trials = cases
        .iter()
        .map(|&(name, case)| {
            Trial::test(name, move || {
                let ctx = Ctx::new(name);
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let res = rt.block_on(case(ctx.clone()));
                ctx.cleanup();
                res
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    sh(&format!("zpool destroy {POOL}; zpool destroy {POOL2}"));
    conclusion.exit();
}

type Fut = std::pin::Pin<Box<dyn Future<Output = Result<(), Failed>>>>;
type Case = fn(Ctx) -> Fut;

/// One case's private corner of the pools.
#[derive(Clone)]
struct Ctx {
    zfs: Zfs,
    root: Dataset,
    root2: Dataset,
}

impl Ctx {
    fn new(name: &str) -> Self {
        let short: String = name.chars().take(40).collect();
        let root = Dataset::new(&format!("{POOL}/{short}")).unwrap();
        let root2 = Dataset::new(&format!("{POOL2}/{short}")).unwrap();
        sh(&format!("zfs create {root} && zfs create {root2}"));
        Self { zfs: Zfs::default(), root, root2 }
    }

    fn cleanup(&self) {
        sh(&format!("zfs destroy -R {} ; zfs destroy -R {}", self.root, self.root2));
    }

    fn ds(&self, child: &str) -> Dataset {
        self.root.child(child).unwrap()
    }

    async fn create(&self, args: &[&str]) -> Result<(), Failed> {
        let mut v = zargs!["create"];
        v.extend(args.iter().map(std::ffi::OsString::from));
        self.zfs.cli().zfs(v).await.map_err(fail)?;
        Ok(())
    }
}

fn fail(e: impl std::fmt::Display) -> Failed {
    Failed::from(format!("{e:#}"))
}

fn props(pairs: &[(&str, &str)]) -> BTreeMap<PropName, String> {
    pairs.iter().map(|(k, v)| (PropName::new(k).unwrap(), v.to_string())).collect()
}

async fn atomic_snapshot(c: Ctx) -> Result<(), Failed> {
    let (fs1, fs2, vol) = (c.ds("vm1"), c.ds("vm1-cfg"), c.ds("vm1-disk0"));
    c.create(&[fs1.as_str()]).await?;
    c.create(&[fs2.as_str()]).await?;
    c.create(&["-V", "64M", vol.as_str()]).await?;
    let p = props(&[("vmsnap:consistency", "app"), ("vmsnap:freeze-ms", "42")]);
    let names = c.zfs.snapshot(&[fs1.clone(), fs2.clone(), vol.clone()], "autosnap_2026-11-26_14:00:00_manual", &p).await.map_err(fail)?;
    check(names.len() == 3, "three snapshot names")?;
    let keys: Vec<PropName> = p.keys().cloned().collect();
    let mut txgs = Vec::new();
    for ds in [&fs1, &fs2, &vol] {
        let snaps = c.zfs.list_snapshots(ds, &keys).await.map_err(fail)?;
        check(snaps.len() == 1, format!("{ds}: {snaps:?}"))?;
        let s = &snaps[0];
        check(s.name.snap() == "autosnap_2026-11-26_14:00:00_manual", &s.name)?;
        check(s.props == p, format!("{ds} props {:?}", s.props))?;
        check(s.guid != 0 && s.creation > 1_700_000_000, format!("{s:?}"))?;
        txgs.push(s.createtxg);
    }
    // One call, one transaction group: the snapshots are one moment.
    check(txgs.windows(2).all(|w| w[0] == w[1]), format!("createtxg differ: {txgs:?}"))?;
    Ok(())
}

async fn two_pools(c: Ctx) -> Result<(), Failed> {
    let a = c.ds("a");
    let b = c.root2.child("b").unwrap();
    c.create(&[a.as_str()]).await?;
    c.create(&[b.as_str()]).await?;
    // OpenZFS makes one `zfs snapshot` atomic only within a pool; across pools it refuses the
    // whole call (with an odd message), so the adapter refuses such a call up front.
    let raw = c.zfs.cli().zfs(zargs!["snapshot", format!("{a}@x"), format!("{b}@x")]).await;
    eprintln!("real zfs, snapshot across pools: {raw:?}");
    check(raw.is_err(), "OpenZFS refuses a snapshot across two pools in one call")?;
    match c.zfs.snapshot(&[a.clone(), b.clone()], "x", &BTreeMap::new()).await {
        Err(ZfsError::CrossPool { pools }) => check(pools == format!("{POOL}, {POOL2}"), &pools)?,
        other => return Err(fail(format!("expected CrossPool, got {other:?}"))),
    }
    check(c.zfs.list_snapshots(&a, &[]).await.map_err(fail)?.is_empty(), "nothing created in pool 1")?;
    check(c.zfs.list_snapshots(&b, &[]).await.map_err(fail)?.is_empty(), "nothing created in pool 2")?;
    Ok(())
}

async fn conflicts(c: Ctx) -> Result<(), Failed> {
    let (a, b) = (c.ds("a"), c.ds("b"));
    c.create(&[a.as_str()]).await?;
    c.create(&[b.as_str()]).await?;
    c.zfs.snapshot(std::slice::from_ref(&a), "s1", &BTreeMap::new()).await.map_err(fail)?;
    match c.zfs.snapshot(&[a.clone(), b.clone()], "s1", &BTreeMap::new()).await {
        Err(ZfsError::AlreadyExists { name }) => check(name == format!("{a}@s1"), format!("named {name}"))?,
        other => return Err(fail(format!("expected AlreadyExists, got {other:?}"))),
    }
    check(c.zfs.list_snapshots(&b, &[]).await.map_err(fail)?.is_empty(), "b@s1 must not exist: the call is atomic")?;
    let ghost = c.ds("ghost");
    match c.zfs.snapshot(&[b.clone(), ghost.clone()], "s2", &BTreeMap::new()).await {
        Err(ZfsError::NotFound { name }) => check(name == ghost.as_str(), format!("named {name}"))?,
        other => return Err(fail(format!("expected NotFound, got {other:?}"))),
    }
    check(c.zfs.list_snapshots(&b, &[]).await.map_err(fail)?.is_empty(), "b@s2 must not exist")?;
    match c.zfs.list_snapshots(&ghost, &[]).await {
        Err(ZfsError::NotFound { .. }) => Ok(()),
        other => Err(fail(format!("listing a missing dataset: {other:?}"))),
    }
}

async fn holds(c: Ctx) -> Result<(), Failed> {
    let a = c.ds("a");
    c.create(&[a.as_str()]).await?;
    let snap = c.zfs.snapshot(std::slice::from_ref(&a), "s1", &BTreeMap::new()).await.map_err(fail)?.remove(0);
    c.zfs.hold("vmsnap-replica", std::slice::from_ref(&snap)).await.map_err(fail)?;
    let holds = c.zfs.holds(&snap).await.map_err(fail)?;
    check(holds.len() == 1 && holds[0].tag == "vmsnap-replica" && holds[0].snapshot == snap, format!("{holds:?}"))?;
    check(c.zfs.list_snapshots(&a, &[]).await.map_err(fail)?[0].userrefs == 1, "userrefs = 1")?;
    match c.zfs.destroy(&snap).await {
        Err(ZfsError::Held { name, .. }) => check(name == snap.to_string(), format!("named {name}"))?,
        other => return Err(fail(format!("destroying a held snapshot: {other:?}"))),
    }
    c.zfs.release("vmsnap-replica", std::slice::from_ref(&snap)).await.map_err(fail)?;
    c.zfs.destroy(&snap).await.map_err(fail)?;
    check(c.zfs.list_snapshots(&a, &[]).await.map_err(fail)?.is_empty(), "destroyed")?;
    match c.zfs.destroy(&snap).await {
        Err(ZfsError::NotFound { name }) => check(name == snap.to_string(), name),
        other => Err(fail(format!("destroying it again: {other:?}"))),
    }
}

async fn rollback_clone(c: Ctx) -> Result<(), Failed> {
    let a = c.ds("a");
    c.create(&[a.as_str()]).await?;
    let file = format!("/{a}/data.txt");
    std::fs::write(&file, "one").unwrap();
    let s1 = c.zfs.snapshot(std::slice::from_ref(&a), "s1", &props(&[("vmsnap:consistency", "crash")])).await.map_err(fail)?.remove(0);
    std::fs::write(&file, "two").unwrap();
    c.zfs.snapshot(std::slice::from_ref(&a), "s2", &BTreeMap::new()).await.map_err(fail)?;
    std::fs::write(&file, "three").unwrap();
    match c.zfs.rollback(&s1, false).await {
        Err(ZfsError::NewerSnapshots { .. }) => {}
        other => return Err(fail(format!("rollback past a newer snapshot: {other:?}"))),
    }
    c.zfs.rollback(&s1, true).await.map_err(fail)?;
    check(std::fs::read_to_string(&file).unwrap() == "one", "rolled back content")?;
    check(c.zfs.list_snapshots(&a, &[]).await.map_err(fail)?.len() == 1, "s2 destroyed by rollback -r")?;
    let clone = c.ds("a-clone");
    c.zfs.clone_snapshot(&s1, &clone, &props(&[("vmsnap:restored-from", "s1")])).await.map_err(fail)?;
    check(std::fs::read_to_string(format!("/{clone}/data.txt")).unwrap() == "one", "clone content")?;
    let p = c.zfs.user_properties(clone.as_str()).await.map_err(fail)?;
    check(p.get(&PropName::new("vmsnap:restored-from").unwrap()).map(String::as_str) == Some("s1"), format!("{p:?}"))?;
    // A snapshot with a dependent clone cannot be destroyed.
    match c.zfs.destroy(&s1).await {
        Err(ZfsError::HasClones { name }) => check(name == s1.to_string(), name),
        other => Err(fail(format!("destroying a cloned snapshot: {other:?}"))),
    }
}

async fn properties(c: Ctx) -> Result<(), Failed> {
    let a = c.ds("a");
    c.create(&["-o", "com.example:managed=yes", a.as_str()]).await?;
    let key = PropName::new("vmsnap:domain").unwrap();
    c.zfs.set_property(a.as_str(), &key, "vm1").await.map_err(fail)?;
    let p = c.zfs.user_properties(a.as_str()).await.map_err(fail)?;
    check(p.len() == 2 && p[&key] == "vm1", format!("{p:?}"))?;
    let child = c.ds("a/child");
    c.create(&[child.as_str()]).await?;
    // Inherited values are not the child's own.
    check(c.zfs.user_properties(child.as_str()).await.map_err(fail)?.is_empty(), "inherited props are not local")?;
    let snap = c.zfs.snapshot(std::slice::from_ref(&a), "s", &BTreeMap::new()).await.map_err(fail)?.remove(0);
    c.zfs.set_property(&snap.to_string(), &PropName::new("vmsnap:ram-dump").unwrap(), "deleted").await.map_err(fail)?;
    let sp = c.zfs.user_properties(&snap.to_string()).await.map_err(fail)?;
    check(sp.len() == 1, format!("{sp:?}"))
}

async fn resolve(c: Ctx) -> Result<(), Failed> {
    let (fs, vol) = (c.ds("images"), c.ds("disk0"));
    c.create(&[fs.as_str()]).await?;
    c.create(&["-V", "16M", vol.as_str()]).await?;
    sh("udevadm settle");
    let img = format!("/{fs}/vm1.qcow2");
    std::fs::write(&img, b"x").unwrap();
    check(c.zfs.dataset_of(Path::new(&img)).await.map_err(fail)? == fs, "file -> its filesystem")?;
    let zvol = format!("/dev/zvol/{vol}");
    check(Path::new(&zvol).exists(), format!("{zvol} exists"))?;
    check(c.zfs.dataset_of(Path::new(&zvol)).await.map_err(fail)? == vol, "zvol path -> volume")?;
    // The zd device node behind the link resolves too.
    let dev = std::fs::canonicalize(&zvol).unwrap();
    eprintln!("{zvol} -> {}", dev.display());
    match c.zfs.dataset_of(Path::new("/etc/hostname")).await {
        Err(ZfsError::NoDatasetFor { .. }) => Ok(()),
        other => Err(fail(format!("a file on the ext4 root: {other:?}"))),
    }
}

async fn busy_and_space(c: Ctx) -> Result<(), Failed> {
    // A thick volume bigger than the 2 GiB pool: real "out of space".
    let big = c.ds("too-big");
    let mut args = zargs!["create", "-V", "10G", big.as_str()];
    args.truncate(4);
    match c.zfs.cli().zfs(args).await {
        Err(ZfsError::OutOfSpace { name }) => check(name == big.as_str(), format!("named {name}"))?,
        other => return Err(fail(format!("expected OutOfSpace, got {other:?}"))),
    }
    // A snapshot name vmsnap would never produce is refused before zfs runs.
    check(SnapshotName::new(&format!("{}@a,b", c.root)).is_err(), "comma rejected")?;
    Ok(())
}

/// sanoid's and a person's snapshots on a dataset whose `vmsnap:domain` is inherited (set on the
/// dataset) are not vmsnap's: `prune` leaves them, and a snapshot vmsnap took by hand with the
/// label `daily` is not a scheduled daily. Only vmsnap's own scheduled hourlies go.
async fn prune_inherited(c: Ctx) -> Result<(), Failed> {
    let fs = c.ds("fs");
    c.create(&[fs.as_str()]).await?;
    sh(&format!("truncate -s 1M /{fs}/disk.img && zfs set vmsnap:domain=demo {fs}"));
    let theirs = ["autosnap_2026-01-01_00:00:00_hourly", "autosnap_2026-01-01_01:00:00_daily", "handmade"];
    for n in theirs {
        sh(&format!("zfs snapshot {fs}@{n}"));
    }
    let own = |n: &str, periods: Option<&str>| {
        let p = periods.map(|p| format!("-o vmsnap:periods={p}")).unwrap_or_default();
        sh(&format!("zfs snapshot -o vmsnap:domain=demo {p} {fs}@{n}"));
    };
    own("autosnap_2026-01-01_02:00:00_hourly", Some("hourly"));
    own("autosnap_2026-01-01_03:00:00_hourly", Some("hourly"));
    own("autosnap_2026-01-01_04:00:00_hourly", Some("hourly"));
    own("autosnap_2026-01-01_05:00:00_daily", None);
    let state = tempfile::tempdir().map_err(fail)?;
    let text = format!(
        "state_dir = \"{}\"\n[domain.demo]\nqmp = \"/run/none.qmp\"\ndisks = [\"/{fs}/disk.img\"]\nfrequently = 0\nhourly = 1\ndaily = 0\nweekly = 0\nmonthly = 0\nyearly = 0\n",
        state.path().display()
    );
    let cfg = vmsnap::config::Config::parse(&text, Path::new("test.toml")).map_err(fail)?;
    let created: i64 =
        sh(&format!("zfs get -H -p -o value creation {fs}@autosnap_2026-01-01_05:00:00_daily")).trim().parse().map_err(fail)?;
    let report = vmsnap::retention::prune::prune(&cfg, cfg.domain("demo").map_err(fail)?, &c.zfs, created + 10 * 86400, false)
        .await
        .map_err(fail)?;
    let left = sh(&format!("zfs list -H -o name -t snapshot {fs}"));
    eprintln!("destroyed {:?}; left:\n{left}", report.destroyed);
    for n in theirs {
        check(left.contains(&format!("@{n}\n")), format!("{n} (not vmsnap's) was pruned: left {left}"))?;
    }
    check(left.contains("05:00:00_daily"), "the hand-made 'daily' stays (manual)")?;
    check(
        left.contains("04:00:00_hourly") && !left.contains("02:00:00_hourly") && !left.contains("03:00:00_hourly"),
        format!("hourly = 1: {left}"),
    )
}

/// A domain configured without `disks` (its running VM's disks come from QEMU): its datasets
/// are those holding snapshots vmsnap took of it — not a dataset whose `vmsnap:domain` its
/// snapshots only inherit, nor a replica that received one.
async fn datasets_without_disks(c: Ctx) -> Result<(), Failed> {
    let (own, inherits) = (c.ds("own"), c.ds("inherits"));
    let replica = c.root2.child("replica").map_err(fail)?;
    c.create(&[own.as_str()]).await?;
    c.create(&["-o", "vmsnap:domain=nodisks", inherits.as_str()]).await?;
    sh(&format!("zfs snapshot -o vmsnap:domain=nodisks {own}@a && zfs snapshot {inherits}@b"));
    sh(&format!("zfs send -p {own}@a | zfs recv -u {replica}"));
    let received = sh(&format!("zfs get -H -o value,source vmsnap:domain {replica}@a"));
    check(received.contains("nodisks\treceived"), format!("the replica's copy: {received}"))?;
    let text = "[domain.nodisks]\nqmp = \"/run/none.qmp\"\n";
    let cfg = vmsnap::config::Config::parse(text, Path::new("test.toml")).map_err(fail)?;
    let found = vmsnap::engine::disks::domain_datasets(&c.zfs, cfg.domain("nodisks").map_err(fail)?).await.map_err(fail)?;
    let want: BTreeMap<String, Vec<Dataset>> = [(POOL.to_owned(), vec![own.clone()])].into();
    check(found == want, format!("found {found:?}"))
}
