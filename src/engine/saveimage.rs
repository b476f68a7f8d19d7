//! RAM dumps as libvirt save images: the file `virsh save` writes and `virsh restore` /
//! `virsh save-image-dumpxml` read, so a person can bring a VM back from a vmsnap dump with the
//! tools they know.
//!
//! Layout (libvirt `src/qemu/qemu_saveimage.h`, version 2, host byte order): a 92-byte header —
//! 16 bytes of magic, then `u32` version, data length, was-running, format, cookie offset, and 14
//! unused `u32` — then `data_len` bytes holding the NUL-terminated domain XML (and a cookie when
//! the cookie offset is not 0) padded with zeros (libvirt leaves 64 KiB so the XML can be edited
//! in place), then QEMU's migration stream. The magic reads `LibvirtQemudPart` while the stream is
//! written and becomes `LibvirtQemudSave` only once it is complete and synced: libvirt refuses an
//! incomplete image by itself. vmsnap writes format 0 (raw) or 5 (zstd: libvirt pipes the
//! stream through `zstd -dc` on restore).
//!
//! A domain without XML keeps a bare migration stream (`vmsnap:ram-format=qemu-stream`), zstd
//! frames when compressed; [`locate`] finds where any dump's stream starts and how it is packed.

use crate::model::RamCompress;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const MAGIC: &[u8; 16] = b"LibvirtQemudSave";
pub const PARTIAL: &[u8; 16] = b"LibvirtQemudPart";
pub const VERSION: u32 = 2;
pub const HEADER_LEN: usize = 16 + 5 * 4 + 14 * 4;
/// Room libvirt leaves after the XML (`virsh save-image-define` may grow it in place).
const PAD: usize = 64 * 1024;
/// The most XML vmsnap reads back from an image (real definitions are a few KiB).
const MAX_DATA: u32 = 16 << 20;
/// libvirt's `QEMU_SAVE_FORMAT_*` names, by number.
const FORMATS: [&str; 7] = ["raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse"];

/// How a dump is stored; recorded in `vmsnap:ram-format`.
pub const FORMAT_LIBVIRT: &str = "libvirt-save";
pub const FORMAT_STREAM: &str = "qemu-stream";

#[derive(Debug, thiserror::Error)]
pub enum SaveImageError {
    #[error("{path}: the save image is incomplete (its stream was never finished)", path = path.display())]
    Incomplete { path: std::path::PathBuf },
    #[error("{path}: {why}", path = path.display())]
    Damaged { path: std::path::PathBuf, why: String },
    #[error("{path}: unsupported save image ({why})", path = path.display())]
    Unsupported { path: std::path::PathBuf, why: String },
    #[error("reading {path}", path = path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What an image's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveImage {
    pub xml: String,
    /// Where QEMU's migration stream starts.
    pub data_offset: u64,
    /// libvirt's format name (`raw`, `zstd`, …).
    pub format: &'static str,
    pub was_running: bool,
}

/// libvirt's format number for a compression.
fn format_number(compress: RamCompress) -> u32 {
    match compress {
        RamCompress::None => 0,
        RamCompress::Zstd => 5,
    }
}

fn header(magic: &[u8; 16], data_len: u32, was_running: bool, compress: RamCompress) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..16].copy_from_slice(magic);
    for (i, v) in [VERSION, data_len, u32::from(was_running), format_number(compress), 0].into_iter().enumerate() {
        h[16 + 4 * i..20 + 4 * i].copy_from_slice(&v.to_ne_bytes());
    }
    h
}

/// Writes the incomplete header, `xml` and the padding at the start of the new, empty `file`,
/// leaving its offset where QEMU's stream goes. Returns the bytes as they will read once the
/// image is complete (to hash them without reading the file back); their length is the offset.
pub fn write_start(file: &mut std::fs::File, xml: &str, was_running: bool, compress: RamCompress) -> std::io::Result<Vec<u8>> {
    if xml.contains('\0') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the domain XML contains a NUL byte"));
    }
    let data_len = xml.len() + 1 + PAD;
    let data_len32 = u32::try_from(data_len).ok().filter(|&n| n <= MAX_DATA).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("the domain XML is too large ({} bytes)", xml.len()))
    })?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + data_len);
    bytes.extend_from_slice(&header(PARTIAL, data_len32, was_running, compress));
    bytes.extend_from_slice(xml.as_bytes());
    bytes.resize(HEADER_LEN + data_len, 0);
    file.write_all(&bytes)?;
    bytes[..16].copy_from_slice(MAGIC);
    Ok(bytes)
}

/// Marks the image complete once QEMU's stream is in it: the data is synced first, then the
/// magic is flipped in place and synced (a crash in between leaves an image libvirt refuses).
pub fn finish(file: &std::fs::File) -> std::io::Result<()> {
    file.sync_data()?;
    file.write_all_at(MAGIC, 0)?;
    file.sync_data()
}

/// Reads the header and XML of the image at `path`; `Ok(None)` when the file is a bare
/// migration stream (no libvirt magic at all).
pub fn read(path: &Path) -> Result<Option<SaveImage>, SaveImageError> {
    let io = |source| SaveImageError::Io { path: path.to_owned(), source };
    let damaged = |why: String| SaveImageError::Damaged { path: path.to_owned(), why };
    let mut f = crate::fsutil::open_regular(path).map_err(|e| io(std::io::Error::other(e)))?;
    let mut h = [0u8; HEADER_LEN];
    match f.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io(e)),
    }
    if &h[..16] == PARTIAL {
        return Err(SaveImageError::Incomplete { path: path.to_owned() });
    }
    if &h[..16] != MAGIC {
        return Ok(None);
    }
    let word = |i: usize| u32::from_ne_bytes(h[16 + 4 * i..20 + 4 * i].try_into().expect("4 bytes"));
    let (version, data_len, was_running, format, cookie) = (word(0), word(1), word(2), word(3), word(4));
    if version != VERSION {
        return Err(SaveImageError::Unsupported { path: path.to_owned(), why: format!("version {version}, vmsnap reads {VERSION}") });
    }
    let format = *FORMATS
        .get(format as usize)
        .ok_or_else(|| SaveImageError::Unsupported { path: path.to_owned(), why: format!("format number {format}") })?;
    if data_len == 0 || data_len > MAX_DATA || cookie > data_len {
        return Err(damaged(format!("data length {data_len} (cookie at {cookie}) is not a header's")));
    }
    let xml_len = if cookie > 0 { cookie } else { data_len } as usize;
    let mut data = vec![0u8; xml_len];
    f.read_exact(&mut data).map_err(|e| damaged(format!("the XML is cut short: {e}")))?;
    let end = data.iter().position(|&b| b == 0).ok_or_else(|| damaged("the XML is not NUL-terminated".into()))?;
    data.truncate(end);
    let xml = String::from_utf8(data).map_err(|_| damaged("the XML is not UTF-8".into()))?;
    let data_offset = HEADER_LEN as u64 + u64::from(data_len);
    let size = f.seek(SeekFrom::End(0)).map_err(io)?;
    if size <= data_offset {
        return Err(damaged(format!("no migration stream after the header ({size} bytes in all)")));
    }
    Ok(Some(SaveImage { xml, data_offset, format, was_running: was_running != 0 }))
}

/// Where a dump's migration stream starts and how it is packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAt {
    pub offset: u64,
    pub compress: RamCompress,
}

/// zstd's frame magic (little endian 0xFD2FB528).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Finds the stream in the dump at `path`: after a save image's header, or at 0 in a bare
/// stream (zstd frames are recognised by their magic).
pub fn locate(path: &Path) -> Result<StreamAt, SaveImageError> {
    match read(path)? {
        Some(img) => {
            let compress = match img.format {
                "raw" => RamCompress::None,
                "zstd" => RamCompress::Zstd,
                other => {
                    return Err(SaveImageError::Unsupported {
                        path: path.to_owned(),
                        why: format!("{other} compression: restore it with `virsh restore`"),
                    })
                }
            };
            Ok(StreamAt { offset: img.data_offset, compress })
        }
        None => {
            let mut magic = [0u8; 4];
            let f = crate::fsutil::open_regular(path)
                .map_err(|e| SaveImageError::Io { path: path.to_owned(), source: std::io::Error::other(e) })?;
            let zstd = f.read_exact_at(&mut magic, 0).is_ok() && magic == ZSTD_MAGIC;
            Ok(StreamAt { offset: 0, compress: if zstd { RamCompress::Zstd } else { RamCompress::None } })
        }
    }
}

/// The `migrate-incoming` URI that feeds QEMU (started with `-incoming defer`) the RAM in an
/// uncompressed dump at `path` (a compressed one goes through a pipe: `ramstream::feed`).
pub fn incoming_uri(path: &Path) -> Result<String, SaveImageError> {
    let shown = path.to_str().filter(|p| !p.contains(',')).ok_or_else(|| SaveImageError::Unsupported {
        path: path.to_owned(),
        why: "QEMU's file: URI cannot name a path with a comma or non-UTF-8 bytes".into(),
    })?;
    match locate(path)? {
        StreamAt { offset: 0, compress: RamCompress::None } => Ok(format!("file:{shown}")),
        StreamAt { offset, compress: RamCompress::None } => Ok(format!("file:{shown},offset={offset}")),
        StreamAt { compress, .. } => Err(SaveImageError::Unsupported {
            path: path.to_owned(),
            why: format!("{compress} compression: QEMU cannot read it from a file by itself"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'><name>web</name></domain>";

    fn image(dir: &Path, stream: &[u8], complete: bool) -> std::path::PathBuf {
        let path = dir.join("dump.ram");
        let mut f = std::fs::File::create(&path).unwrap();
        let prefix = write_start(&mut f, XML, true, RamCompress::None).unwrap();
        assert_eq!(prefix.len(), HEADER_LEN + XML.len() + 1 + PAD);
        assert_eq!(&prefix[..16], MAGIC);
        f.write_all(stream).unwrap();
        if complete {
            finish(&f).unwrap();
        }
        path
    }

    #[test]
    fn header_bytes_are_libvirts_layout() {
        let h = header(MAGIC, 0x0001_0203, true, RamCompress::None);
        assert_eq!(HEADER_LEN, 92);
        assert_eq!(&h[..16], b"LibvirtQemudSave");
        // version, data_len, was_running, format, cookieOffset, then 14 zero words (x86: little endian).
        assert_eq!(&h[16..36], &[2, 0, 0, 0, 3, 2, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(h[36..].iter().all(|&b| b == 0));
    }

    #[test]
    fn complete_images_read_back_and_partial_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path(), b"QEVM\0\0\0\x03stream", true);
        let img = read(&path).unwrap().unwrap();
        assert_eq!(img.xml, XML);
        assert_eq!((img.format, img.was_running), ("raw", true));
        assert_eq!(incoming_uri(&path).unwrap(), format!("file:{},offset={}", path.display(), img.data_offset));
        let mut stream = vec![0u8; 14];
        std::fs::File::open(&path).unwrap().read_exact_at(&mut stream, img.data_offset).unwrap();
        assert_eq!(&stream, b"QEVM\0\0\0\x03stream");

        let partial = image(dir.path(), b"QEVM", false);
        assert!(matches!(read(&partial), Err(SaveImageError::Incomplete { .. })));
        assert!(incoming_uri(&partial).unwrap_err().to_string().contains("incomplete"));
    }

    #[test]
    fn bare_streams_and_damaged_headers() {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("bare.ram");
        std::fs::write(&bare, b"QEVM\0\0\0\x03 a bare migration stream, longer than a header ................................").unwrap();
        assert_eq!(read(&bare).unwrap(), None);
        assert_eq!(incoming_uri(&bare).unwrap(), format!("file:{}", bare.display()));

        let path = image(dir.path(), b"QEVM", true);
        let bytes = std::fs::read(&path).unwrap();
        let bad = |at: usize, v: &[u8]| {
            let mut b = bytes.clone();
            b[at..at + v.len()].copy_from_slice(v);
            std::fs::write(&path, &b).unwrap();
            read(&path).unwrap_err().to_string()
        };
        assert!(bad(16, &3u32.to_ne_bytes()).contains("version 3"));
        assert!(bad(20, &u32::MAX.to_ne_bytes()).contains("data length"));
        assert!(bad(28, &9u32.to_ne_bytes()).contains("format number 9"));
        let mut zstd = bytes.clone();
        zstd[28..32].copy_from_slice(&5u32.to_ne_bytes());
        std::fs::write(&path, &zstd).unwrap();
        assert!(incoming_uri(&path).unwrap_err().to_string().contains("zstd compression"));
        assert_eq!(locate(&path).unwrap().compress, RamCompress::Zstd);
        // Cut right after the header: no stream.
        std::fs::write(&path, &bytes[..HEADER_LEN + XML.len() + 1 + PAD]).unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("no migration stream"));
        assert!(write_start(&mut std::fs::File::create(dir.path().join("x")).unwrap(), "a\0b", true, RamCompress::None).is_err());
    }
}
