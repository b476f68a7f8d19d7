//! RAM dumps sealed for a backup host trusted only with ciphertext. A dump holds the guest's
//! secrets (disk keys, TLS keys, passwords); a source whose datasets are encrypted sends their
//! blocks raw, and sends their dumps through this: ChaCha20-Poly1305 in chunks (the STREAM
//! construction: each chunk's nonce is its index and a last-chunk flag, so chunks cannot be
//! reordered, dropped or cut off without the tag failing), under a key derived from a key file
//! the source keeps and never sends.
//!
//! The sealed form is `MAGIC`, a 32-byte salt, then the chunks (`CHUNK` bytes of the dump each,
//! the last shorter or empty, each followed by its 16-byte tag). The salt is derived from the key
//! and what identifies the dump (domain, snapshot, the dump's sha256), not drawn at random: a
//! resumed upload regenerates exactly the bytes the target already has, from any offset, and a
//! different dump never shares a key stream. Nothing here holds more than one chunk in memory.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// The first bytes of a sealed dump.
pub const MAGIC: &[u8; 16] = b"vmsnap-ramseal1\n";
/// Bytes of the dump per chunk.
pub const CHUNK: usize = 64 << 10;
const TAG: usize = 16;
const SALT: usize = 32;
/// The header: magic and salt.
pub const HEADER: u64 = (MAGIC.len() + SALT) as u64;

/// What went wrong sealing or opening a dump.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the RAM key {path}: {why}")]
    Key { path: String, why: String },
    #[error("not a sealed RAM dump (no vmsnap header)")]
    NotSealed,
    #[error("chunk {chunk} of the sealed dump does not authenticate (wrong key, or changed or cut)")]
    Forged { chunk: u64 },
    #[error("the sealed dump ends before its last chunk (cut off)")]
    Truncated,
    #[error("bytes follow the sealed dump's last chunk")]
    Trailing,
    #[error("the sealed dump authenticates but is not {domain}'s dump of {snapshot} (another snapshot's, handed back under this name)")]
    OtherDump { domain: String, snapshot: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The source's RAM key (32 bytes), as read from its key file.
#[derive(Clone)]
pub struct RamKey([u8; 32]);

impl std::fmt::Debug for RamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RamKey(…)")
    }
}

impl RamKey {
    /// Reads a key file: 64 hex digits (a trailing newline allowed), owned by root and readable
    /// by nobody else.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        use std::os::unix::fs::MetadataExt;
        let bad = |why: String| SealError::Key { path: path.display().to_string(), why };
        let meta = std::fs::symlink_metadata(path).map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
            return Err(bad(format!("must be root's and mode 0600 (it is uid {}, mode {:o})", meta.uid(), meta.mode() & 0o777)));
        }
        let text = crate::fsutil::read_limited(path, 256).map_err(|e| bad(e.to_string()))?;
        Self::from_hex(String::from_utf8_lossy(&text).trim())
            .ok_or_else(|| bad("must hold 64 hex digits (`vmsnap setup` writes one)".into()))
    }

    /// 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(k))
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// The salt of one dump: the same dump of the same snapshot always gets the same one.
    pub fn salt(&self, domain: &str, snapshot: &str, sha256: &str) -> [u8; SALT] {
        self.mac(&[b"vmsnap ram salt v1", domain.as_bytes(), snapshot.as_bytes(), sha256.as_bytes()])
    }

    fn cipher(&self, salt: &[u8; SALT]) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(&self.mac(&[b"vmsnap ram key v1", salt])))
    }
}

fn nonce(chunk: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&chunk.to_be_bytes());
    n[11] = u8::from(last);
    *Nonce::from_slice(&n)
}

/// Chunks of a dump of `len` bytes (an empty dump is one empty chunk).
fn chunks(len: u64) -> u64 {
    len.div_ceil(CHUNK as u64).max(1)
}

/// The sealed size of a dump of `len` bytes.
pub fn sealed_len(len: u64) -> u64 {
    HEADER + len + chunks(len) * TAG as u64
}

/// The sealed form of the dump `file` (`len` bytes), read from sealed offset `from` on: what a
/// resumed upload sends after the bytes the target has.
pub struct Sealer {
    file: std::fs::File,
    len: u64,
    cipher: ChaCha20Poly1305,
    header: Vec<u8>,
    /// Sealed offset of the next byte to hand out.
    at: u64,
    /// The current chunks, sealed, and their sealed offset.
    buf: Vec<u8>,
    buf_at: u64,
    /// The current chunks' plaintext.
    plain: Vec<u8>,
}

impl Sealer {
    pub fn new(mut file: std::fs::File, len: u64, key: &RamKey, salt: [u8; SALT], from: u64) -> Result<Self, SealError> {
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&salt);
        let from = from.min(sealed_len(len));
        file.seek(SeekFrom::Start(0))?;
        Ok(Self { file, len, cipher: key.cipher(&salt), header, at: from, buf: Vec::new(), buf_at: 0, plain: Vec::new() })
    }

    /// Seals chunks `i`.. (up to [`BATCH`] of them, read in one call) into `buf`.
    fn fill(&mut self, i: u64) -> Result<(), SealError> {
        let total = chunks(self.len);
        let k = (total - i).min(BATCH);
        let start = i * CHUNK as u64;
        let n = (self.len - start).min(k * CHUNK as u64) as usize;
        self.plain.resize(n, 0);
        self.file.seek(SeekFrom::Start(start))?;
        self.file.read_exact(&mut self.plain)?;
        self.buf.clear();
        for j in 0..k {
            // (An empty dump is one empty chunk.)
            let a = j as usize * CHUNK;
            let piece = &self.plain[a..(a + CHUNK).min(n)];
            let at = self.buf.len();
            self.buf.extend_from_slice(piece);
            let tag = self
                .cipher
                .encrypt_in_place_detached(&nonce(i + j, i + j + 1 == total), b"", &mut self.buf[at..])
                .map_err(|_| std::io::Error::other("ChaCha20-Poly1305 refused a chunk"))?;
            self.buf.extend_from_slice(&tag);
        }
        self.buf_at = HEADER + i * (CHUNK + TAG) as u64;
        Ok(())
    }
}

/// Chunks sealed per read of the dump (1 MiB).
const BATCH: u64 = 16;

impl Read for Sealer {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let end = sealed_len(self.len);
        if self.at >= end || out.is_empty() {
            return Ok(0);
        }
        if self.at < HEADER {
            let h = &self.header[self.at as usize..];
            let n = h.len().min(out.len());
            out[..n].copy_from_slice(&h[..n]);
            self.at += n as u64;
            return Ok(n);
        }
        if self.buf.is_empty() || self.at < self.buf_at || self.at - self.buf_at >= self.buf.len() as u64 {
            let i = (self.at - HEADER) / (CHUNK + TAG) as u64;
            self.fill(i).map_err(|e| match e {
                SealError::Io(e) => e,
                other => std::io::Error::other(other.to_string()),
            })?;
        }
        let inside = (self.at - self.buf_at) as usize;
        let n = (self.buf.len() - inside).min(out.len());
        out[..n].copy_from_slice(&self.buf[inside..inside + n]);
        self.at += n as u64;
        Ok(n)
    }
}

/// Whether the regular file `path` begins as a sealed dump.
pub fn is_sealed(path: &Path) -> bool {
    let mut magic = [0u8; MAGIC.len()];
    crate::fsutil::open_regular(path).is_ok_and(|mut f| f.read_exact(&mut magic).is_ok() && &magic == MAGIC)
}

/// Opens a sealed dump from `input` into `out`, chunk by chunk; returns the dump's length and
/// the salt it was sealed under. Every chunk is authenticated before it is written; a dump cut
/// off, extended or changed fails. Which dump it is ([`RamKey::salt`] of its snapshot and
/// sha256) is the caller's to check once it knows the sha256: [`open_as`].
pub fn open(input: &mut impl Read, out: &mut impl Write, key: &RamKey) -> Result<(u64, [u8; SALT]), SealError> {
    let mut head = [0u8; HEADER as usize];
    input.read_exact(&mut head).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SealError::NotSealed,
        _ => SealError::Io(e),
    })?;
    if &head[..MAGIC.len()] != MAGIC {
        return Err(SealError::NotSealed);
    }
    let salt: [u8; SALT] = head[MAGIC.len()..].try_into().expect("the header's length");
    let cipher = key.cipher(&salt);
    let mut buf = vec![0u8; CHUNK + TAG];
    // One chunk read ahead: only the one before the end is the last.
    let mut have = read_full(input, &mut buf)?;
    let mut next = vec![0u8; CHUNK + TAG];
    let mut total = 0u64;
    for i in 0u64.. {
        if have < TAG {
            return Err(SealError::Truncated);
        }
        let ahead = if have == CHUNK + TAG { read_full(input, &mut next)? } else { 0 };
        let last = ahead == 0;
        let (data, tag) = buf[..have].split_at_mut(have - TAG);
        cipher.decrypt_in_place_detached(&nonce(i, last), b"", data, Tag::from_slice(tag)).map_err(|_| SealError::Forged { chunk: i })?;
        out.write_all(data)?;
        total += data.len() as u64;
        if last {
            break;
        }
        std::mem::swap(&mut buf, &mut next);
        have = ahead;
    }
    let mut extra = [0u8; 1];
    if input.read(&mut extra)? != 0 {
        return Err(SealError::Trailing);
    }
    Ok((total, salt))
}

/// Opens the sealed dump `input` into `out` and proves it is `domain`'s dump of `snapshot`:
/// every chunk authenticates, and its salt is the one this key gives that snapshot and the
/// opened bytes' sha256 (a target cannot hand back another snapshot's sealed dump under this
/// name, nor make one: the salt is keyed). Returns the dump's length and sha256.
pub fn open_as(
    input: &mut impl Read,
    out: &mut impl Write,
    key: &RamKey,
    domain: &str,
    snapshot: &str,
) -> Result<(u64, String), SealError> {
    let mut hashing = HashingWriter { inner: out, hasher: <Sha256 as sha2::Digest>::new() };
    let (len, salt) = open(input, &mut hashing, key)?;
    let sha256: String = sha2::Digest::finalize(hashing.hasher).iter().map(|b| format!("{b:02x}")).collect();
    if key.salt(domain, snapshot, &sha256) != salt {
        return Err(SealError::OtherDump { domain: domain.to_owned(), snapshot: snapshot.to_owned() });
    }
    Ok((len, sha256))
}

struct HashingWriter<'a, W: Write> {
    inner: &'a mut W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Sealer {
    /// The sealed form of `domain`'s dump of `snapshot` (`file`, `len` bytes, sha256 `sha256`)
    /// from sealed offset `from`: what an upload sends after the bytes the target has.
    pub fn for_dump(
        file: std::fs::File,
        len: u64,
        key: &RamKey,
        (domain, snapshot, sha256): (&str, &str, &str),
        from: u64,
    ) -> Result<Self, SealError> {
        Self::new(file, len, key, key.salt(domain, snapshot, sha256), from)
    }
}

/// The sha256 of the sealed form of `file` (see [`Sealer::for_dump`]): what a target holding it
/// complete holds.
pub fn sealed_sha256(file: std::fs::File, len: u64, key: &RamKey, id: (&str, &str, &str)) -> Result<String, SealError> {
    let mut sealer = Sealer::for_dump(file, len, key, id, 0)?;
    let mut h = <Sha256 as sha2::Digest>::new();
    std::io::copy(&mut sealer, &mut h)?;
    Ok(sha2::Digest::finalize(h).iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads until `buf` is full or the input ends; how many bytes.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> RamKey {
        RamKey([b; 32])
    }

    fn dump(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        (f, data)
    }

    fn seal(f: &tempfile::NamedTempFile, len: usize, k: &RamKey, from: u64) -> Vec<u8> {
        let salt = k.salt("web", "autosnap_x", "ab");
        let mut s = Sealer::new(f.reopen().unwrap(), len as u64, k, salt, from).unwrap();
        let mut out = Vec::new();
        // Odd read sizes, as pipes hand them out.
        let mut b = [0u8; 7001];
        loop {
            let n = s.read(&mut b).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&b[..n]);
        }
        out
    }

    /// Every size around the chunk edges seals to its announced length, opens to the dump, and
    /// the plaintext appears nowhere in the sealed bytes.
    #[test]
    fn sealed_dumps_open_to_the_dump_and_hide_it() {
        let batch = BATCH as usize * CHUNK;
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17, batch, batch + 1, 2 * batch + CHUNK + 3] {
            let (f, data) = dump(len);
            let sealed = seal(&f, len, &key(1), 0);
            assert_eq!(sealed.len() as u64, sealed_len(len as u64), "{len}");
            let mut back = Vec::new();
            assert_eq!(open(&mut sealed.as_slice(), &mut back, &key(1)).unwrap().0, len as u64);
            assert!(back == data, "{len}");
            if len >= 64 {
                assert!(!sealed.windows(64).any(|w| w == &data[..64]), "{len}: plaintext in the sealed form");
            }
        }
    }

    /// A resumed upload: sealing from any offset gives the same bytes as the whole from there.
    #[test]
    fn sealing_from_an_offset_continues_the_same_bytes() {
        let len = (BATCH as usize + 2) * CHUNK + 100;
        let (f, _) = dump(len);
        let whole = seal(&f, len, &key(2), 0);
        let second_batch = HEADER + BATCH * (CHUNK + TAG) as u64;
        for from in [
            1,
            HEADER - 1,
            HEADER,
            HEADER + 5,
            HEADER + (CHUNK + TAG) as u64,
            second_batch - 1,
            second_batch,
            second_batch + 7,
            whole.len() as u64 - 3,
            whole.len() as u64,
        ] {
            assert!(seal(&f, len, &key(2), from) == whole[from as usize..], "from {from}");
        }
    }

    /// The wrong key, a changed byte, a cut at a chunk edge or inside one, a chunk dropped, bytes
    /// appended: each refused, named.
    #[test]
    fn changed_cut_or_extended_dumps_are_refused() {
        let len = 3 * CHUNK + 5;
        let (f, _) = dump(len);
        let sealed = seal(&f, len, &key(3), 0);
        let opened = |bytes: &[u8], k: &RamKey| open(&mut &bytes[..], &mut std::io::sink(), k).unwrap_err().to_string();
        assert!(opened(&sealed, &key(4)).contains("does not authenticate"));
        let mut changed = sealed.clone();
        changed[HEADER as usize + CHUNK + 3] ^= 1;
        assert!(opened(&changed, &key(3)).contains("chunk 0"));
        let edge = (HEADER as usize) + 2 * (CHUNK + TAG);
        assert!(opened(&sealed[..edge], &key(3)).contains("chunk 1"), "cut at a chunk edge: the new last chunk is not flagged last");
        assert!(opened(&sealed[..edge + 100], &key(3)).contains("chunk 2"));
        let mut dropped = sealed[..HEADER as usize + CHUNK + TAG].to_vec();
        dropped.extend_from_slice(&sealed[HEADER as usize + 2 * (CHUNK + TAG)..]);
        assert!(opened(&dropped, &key(3)).contains("chunk 1"));
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(!opened(&longer, &key(3)).is_empty());
        assert!(opened(b"plain RAM", &key(3)).contains("not a sealed"));
    }

    fn read_all(mut r: impl Read) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = [0u8; 5003];
        loop {
            let n = r.read(&mut b).unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&b[..n]);
        }
    }

    fn sha(b: &[u8]) -> String {
        sha2::Digest::finalize(<Sha256 as sha2::Digest>::new_with_prefix(b)).iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A dump sealed for its snapshot opens as that snapshot's dump, and as no other; its sealed
    /// sum is the sealed bytes'.
    #[test]
    fn dumps_open_only_as_their_snapshot() {
        let len = 2 * CHUNK + 999;
        let (f, data) = dump(len);
        let k = key(6);
        let id = ("web", "autosnap_a", sha(&data));
        let sealed = read_all(Sealer::for_dump(f.reopen().unwrap(), len as u64, &k, (id.0, id.1, &id.2), 0).unwrap());
        assert_eq!(sealed.len() as u64, sealed_len(len as u64));
        assert_eq!(sealed_sha256(f.reopen().unwrap(), len as u64, &k, (id.0, id.1, &id.2)).unwrap(), sha(&sealed));
        let mut back = Vec::new();
        assert_eq!(open_as(&mut &sealed[..], &mut back, &k, "web", "autosnap_a").unwrap(), (len as u64, id.2.clone()));
        assert!(back == data);
        let err = open_as(&mut &sealed[..], &mut std::io::sink(), &k, "web", "autosnap_b").unwrap_err();
        assert!(matches!(err, SealError::OtherDump { .. }), "{err}");
    }

    #[test]
    fn keys_read_from_root_only_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ram.key");
        std::fs::write(&p, format!("{}\n", "0f".repeat(32))).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(RamKey::load(&p).unwrap_err().to_string().contains("0600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        if nix::unistd::geteuid().is_root() {
            assert_eq!(RamKey::load(&p).unwrap().0, [0x0f; 32]);
        }
        std::fs::write(&p, "short").unwrap();
        assert!(RamKey::load(&p).is_err());
        // A different snapshot, dump or domain never shares the salt.
        let k = key(5);
        let s = k.salt("web", "a", "x");
        assert!(s != k.salt("web", "b", "x") && s != k.salt("web", "a", "y") && s != k.salt("we", "ba", "x"));
    }
}
