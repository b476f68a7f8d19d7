//! A RAM dump checked before anything starts from it, and by `vmsnap verify`: a regular file,
//! complete (a save image's magic says so), a header that reads, and bytes that hash to the sha256
//! recorded on the snapshot (streamed through a fixed buffer, never held in memory). Also the one
//! conversion restore needs: a zstd save image rewritten raw for a libvirt that cannot read zstd.

use crate::engine::saveimage;
use crate::fsutil;
use crate::model::RamCompress;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// What a good dump is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DumpCheck {
    pub path: PathBuf,
    pub bytes: u64,
    /// `libvirt-save` or `qemu-stream`.
    pub format: &'static str,
    pub compress: RamCompress,
    pub sha256: String,
}

/// Why a dump is not good, in words for the user.
#[derive(Debug, thiserror::Error)]
#[error("RAM dump {path}: {why}")]
pub struct BadDump {
    pub path: PathBuf,
    pub why: String,
}

const BUF: usize = 1 << 20;

/// Checks the dump at `path` against the sha256 the snapshot recorded (`want`; a dump without a
/// recorded sum is refused: nothing proves it is the one written). `progress` gets the bytes read.
pub fn check(path: &Path, want: Option<&str>, progress: impl FnMut(u64)) -> Result<DumpCheck, BadDump> {
    let bad = |why: String| BadDump { path: path.to_owned(), why };
    let want = want.ok_or_else(|| bad("the snapshot records no sha256 for it".into()))?;
    let (format, compress) = match saveimage::read(path) {
        Ok(Some(img)) => {
            let compress = match img.format {
                "raw" => RamCompress::None,
                "zstd" => RamCompress::Zstd,
                other => return Err(bad(format!("{other} compression, which vmsnap does not write"))),
            };
            ("libvirt-save", compress)
        }
        Ok(None) => ("qemu-stream", saveimage::locate(path).map_err(|e| bad(e.to_string()))?.compress),
        Err(e) => return Err(bad(e.to_string())),
    };
    let file = fsutil::open_regular(path).map_err(|e| bad(e.to_string()))?;
    let (bytes, sha256) = fsutil::sha256_of(file, progress).map_err(|e| bad(format!("reading: {e}")))?;
    if !sha256.eq_ignore_ascii_case(want) {
        return Err(bad(format!("its sha256 is {sha256}, the snapshot recorded {want}: the file changed since it was written")));
    }
    Ok(DumpCheck { path: path.to_owned(), bytes, format, compress, sha256 })
}

/// Writes `dir/name` (0600, replaced if there) as an uncompressed save image of the zstd save
/// image `src`: same XML, the stream decompressed. For `virsh restore` on a libvirt that refuses
/// zstd images (9.0, Debian 12's). The caller removes it after use.
pub fn raw_save_image(src: &Path, dir: &Path, name: &str) -> Result<PathBuf, BadDump> {
    copy_save_image(src, dir, name, None)
}

/// Writes `dir/name` (0600, replaced if there) as an uncompressed save image of the save image
/// `src` whose header carries `xml` instead of the original's (`None`: the same): the stream
/// copied (decompressed when it is zstd), through fixed buffers or the kernel's own copy. For a
/// copy of a VM resumed under another name. The caller removes it after use.
pub fn copy_save_image(src: &Path, dir: &Path, name: &str, xml: Option<&str>) -> Result<PathBuf, BadDump> {
    let bad = |why: String| BadDump { path: src.to_owned(), why };
    let img = saveimage::read(src).map_err(|e| bad(e.to_string()))?.ok_or_else(|| bad("not a save image".into()))?;
    let zstd = match img.format {
        "raw" => false,
        "zstd" => true,
        other => return Err(bad(format!("{other} compression, which vmsnap does not write"))),
    };
    let dir = fsutil::Dir::private(dir, &[]).map_err(|e| bad(e.to_string()))?;
    let out_path = dir.path().join(name);
    let mut out = dir.open_resumable(name).map_err(|e| bad(format!("creating {}: {e}", out_path.display())))?;
    let write = |out: &mut std::fs::File| -> std::io::Result<()> {
        out.set_len(0)?;
        out.seek(SeekFrom::Start(0))?;
        saveimage::write_start(out, xml.unwrap_or(&img.xml), img.was_running, RamCompress::None)?;
        let mut input = fsutil::open_regular(src).map_err(std::io::Error::other)?;
        input.seek(SeekFrom::Start(img.data_offset))?;
        if zstd {
            let mut w = std::io::BufWriter::with_capacity(BUF, &mut *out);
            zstd::stream::copy_decode(std::io::BufReader::with_capacity(BUF, input), &mut w)?;
            w.flush()?;
        } else {
            // File to file: std copies in the kernel (copy_file_range) where it can.
            std::io::copy(&mut input, out)?;
        }
        saveimage::finish(out)
    };
    match write(&mut out) {
        Ok(()) => Ok(out_path),
        Err(e) => {
            let _ = std::fs::remove_file(&out_path);
            Err(bad(format!("copying into {}: {e}", out_path.display())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::hex;
    use sha2::{Digest, Sha256};

    /// A save image of `stream` (compressed as `compress`), complete; its sha256.
    fn image(dir: &Path, name: &str, stream: &[u8], compress: RamCompress) -> (PathBuf, String) {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new().create_new(true).write(true).read(true).open(&path).unwrap();
        let mut bytes = saveimage::write_start(&mut f, "<domain><name>vm</name></domain>", true, compress).unwrap();
        let body = match compress {
            RamCompress::None => stream.to_vec(),
            RamCompress::Zstd => zstd::encode_all(stream, 3).unwrap(),
        };
        f.write_all(&body).unwrap();
        saveimage::finish(&f).unwrap();
        bytes.extend_from_slice(&body);
        (path, hex(&Sha256::digest(&bytes)))
    }

    fn stream() -> Vec<u8> {
        (0..3_000_000u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn a_good_dump_passes_and_one_changed_byte_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (path, sum) = image(dir.path(), "a.save", &stream(), RamCompress::None);
        let mut seen = 0;
        let c = check(&path, Some(&sum), |n| seen = n).unwrap();
        assert_eq!(
            (c.format, c.compress, c.bytes, seen),
            ("libvirt-save", RamCompress::None, std::fs::metadata(&path).unwrap().len(), c.bytes)
        );
        let e = check(&path, None, |_| {}).unwrap_err();
        assert!(e.why.contains("no sha256"), "{e}");
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"\x00", 2_000_000).unwrap();
        let e = check(&path, Some(&sum), |_| {}).unwrap_err();
        assert!(e.why.contains("the file changed"), "{e}");
    }

    #[test]
    fn an_incomplete_image_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let (path, sum) = image(dir.path(), "a.save", &stream(), RamCompress::None);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"LibvirtQemudPart", 0).unwrap();
        let e = check(&path, Some(&sum), |_| panic!("read although incomplete")).unwrap_err();
        assert!(e.why.contains("incomplete"), "{e}");
    }

    #[test]
    fn a_zstd_image_rewritten_raw_holds_the_same_stream() {
        let dir = tempfile::tempdir().unwrap();
        let s = stream();
        let (zpath, zsum) = image(dir.path(), "z.save", &s, RamCompress::Zstd);
        assert_eq!(check(&zpath, Some(&zsum), |_| {}).unwrap().compress, RamCompress::Zstd);
        let out = dir.path().join("out");
        let raw = raw_save_image(&zpath, &out, "restore-vm.save").unwrap();
        let img = saveimage::read(&raw).unwrap().unwrap();
        assert_eq!((img.format, img.was_running, img.xml.as_str()), ("raw", true, "<domain><name>vm</name></domain>"));
        let bytes = std::fs::read(&raw).unwrap();
        assert_eq!(&bytes[img.data_offset as usize..], &s[..]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&raw).unwrap().permissions().mode() & 0o777, 0o600);
        // A bare stream is not a save image to rewrite.
        let bare = dir.path().join("bare");
        std::fs::write(&bare, &s).unwrap();
        assert!(raw_save_image(&bare, &out, "x.save").unwrap_err().why.contains("not a save image"));
    }

    #[test]
    fn a_copy_under_another_name_carries_the_new_xml_and_the_same_stream() {
        let dir = tempfile::tempdir().unwrap();
        let s = stream();
        let out = dir.path().join("out");
        let new = "<domain><name>vm2</name><uuid>0b7e1d2c-0000-4000-8000-000000000002</uuid></domain>";
        for (name, compress) in [("r.save", RamCompress::None), ("z.save", RamCompress::Zstd)] {
            let (src, _) = image(dir.path(), name, &s, compress);
            let copy = copy_save_image(&src, &out, &format!("copy-{name}"), Some(new)).unwrap();
            let img = saveimage::read(&copy).unwrap().unwrap();
            assert_eq!((img.format, img.was_running, img.xml.as_str()), ("raw", true, new), "{name}");
            let bytes = std::fs::read(&copy).unwrap();
            assert_eq!(&bytes[img.data_offset as usize..], &s[..], "{name}");
            assert_eq!(&bytes[..16], saveimage::MAGIC, "complete: {name}");
        }
    }
}
