//! The entry model shared by the whole pipeline, and the tar writer every target uses.
//!
//! The writer emits POSIX ustar headers, with a PAX extended header in front when an entry needs
//! one: long names or link targets, extended attributes (`SCHILY.xattr.*`), large ids. It writes
//! header and data separately, so one entry's bytes can be streamed to several targets at once.

use std::io::{self, Write};

/// What a path is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink(String),
    /// A hard link to another path of the same archive.
    Hardlink(String),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// An entry's metadata, as kept in the flattening index (no content).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    /// Content length; 0 for everything but regular files.
    pub size: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    /// A plain root-owned entry, for files and folders the tool adds itself.
    pub fn new(kind: Kind, mode: u32, size: u64, mtime: u64) -> Self {
        Self {
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime,
            size,
            xattrs: Vec::new(),
        }
    }
}

/// Tar blocks are 512 bytes.
const BLOCK: usize = 512;
/// Largest value an 8-byte octal id field holds (7 digits + NUL).
const MAX_OCTAL_ID: u64 = 0o7777777;
/// ustar `name` and `linkname` fields are 100 bytes.
const NAME_FIELD: usize = 100;

fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    // "<len> <key>=<value>\n", where <len> counts itself.
    let body = key.len() + value.len() + 3; // space, '=', newline
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn set_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field.fill(0);
    field[..n].copy_from_slice(&value[..n]);
}

/// Streaming tar writer: `begin` an entry, feed its `data`, `end` it; `finish` the archive.
pub struct TarWriter<W: Write> {
    out: W,
    remaining: u64,
    written: u64,
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            remaining: 0,
            written: 0,
        }
    }

    /// Write the header(s) of an entry at `path` (relative, no leading slash; folders without
    /// a trailing slash — it is added here).
    pub fn begin(&mut self, path: &str, meta: &Meta) -> io::Result<()> {
        let mut name = path.to_string();
        if meta.kind == Kind::Dir && !name.ends_with('/') {
            name.push('/');
        }
        let link = match &meta.kind {
            Kind::Symlink(t) | Kind::Hardlink(t) => Some(t.as_str()),
            _ => None,
        };
        let mut pax = Vec::new();
        if name.len() > NAME_FIELD || !name.is_ascii() {
            pax_record(&mut pax, "path", name.as_bytes());
        }
        if let Some(l) = link {
            if l.len() > NAME_FIELD || !l.is_ascii() {
                pax_record(&mut pax, "linkpath", l.as_bytes());
            }
        }
        if meta.uid > MAX_OCTAL_ID {
            pax_record(&mut pax, "uid", meta.uid.to_string().as_bytes());
        }
        if meta.gid > MAX_OCTAL_ID {
            pax_record(&mut pax, "gid", meta.gid.to_string().as_bytes());
        }
        for (k, v) in &meta.xattrs {
            pax_record(&mut pax, &format!("SCHILY.xattr.{k}"), v);
        }
        if !pax.is_empty() {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            let base = name.trim_end_matches('/').rsplit('/').next().unwrap_or("x");
            set_field(
                &mut h.as_ustar_mut().expect("ustar").name,
                format!("PaxHeaders/{base}").as_bytes(),
            );
            h.set_mode(0o644);
            h.set_size(pax.len() as u64);
            h.set_mtime(meta.mtime);
            h.set_cksum();
            self.out.write_all(h.as_bytes())?;
            self.out.write_all(&pax)?;
            self.pad(pax.len() as u64)?;
            self.written += BLOCK as u64;
        }

        let mut h = tar::Header::new_ustar();
        let (ty, size) = match &meta.kind {
            Kind::Dir => (tar::EntryType::Directory, 0),
            Kind::File => (tar::EntryType::Regular, meta.size),
            Kind::Symlink(_) => (tar::EntryType::Symlink, 0),
            Kind::Hardlink(_) => (tar::EntryType::Link, 0),
            Kind::Char(..) => (tar::EntryType::Char, 0),
            Kind::Block(..) => (tar::EntryType::Block, 0),
            Kind::Fifo => (tar::EntryType::Fifo, 0),
        };
        h.set_entry_type(ty);
        h.set_mode(meta.mode & 0o7777);
        h.set_uid(meta.uid.min(MAX_OCTAL_ID));
        h.set_gid(meta.gid.min(MAX_OCTAL_ID));
        h.set_mtime(meta.mtime);
        h.set_size(size);
        if let Kind::Char(ma, mi) | Kind::Block(ma, mi) = meta.kind {
            h.set_device_major(ma)?;
            h.set_device_minor(mi)?;
        }
        {
            let u = h.as_ustar_mut().expect("ustar");
            set_field(&mut u.name, name.as_bytes());
            if let Some(l) = link {
                set_field(&mut u.linkname, l.as_bytes());
            }
        }
        h.set_cksum();
        self.out.write_all(h.as_bytes())?;
        self.written += BLOCK as u64;
        self.remaining = size;
        Ok(())
    }

    pub fn data(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.len() as u64 > self.remaining {
            return Err(io::Error::other("entry data longer than its header says"));
        }
        self.remaining -= buf.len() as u64;
        self.out.write_all(buf)
    }

    /// Close the entry: pad its data to a block boundary.
    pub fn end(&mut self, size: u64) -> io::Result<()> {
        if self.remaining != 0 {
            return Err(io::Error::other(format!(
                "entry data {} bytes short of its header",
                self.remaining
            )));
        }
        self.pad(size)
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let rem = (size % BLOCK as u64) as usize;
        self.written += size;
        if rem != 0 {
            self.out.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
            self.written += (BLOCK - rem) as u64;
        }
        Ok(())
    }

    /// Bytes of archive written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// End-of-archive marker (two zero blocks); returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; 2 * BLOCK])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Where entries go, one at a time: a [`TarWriter`], or a folder (the disk target).
pub trait EntryOut {
    fn begin(&mut self, path: &str, meta: &Meta) -> anyhow::Result<()>;
    fn data(&mut self, buf: &[u8]) -> anyhow::Result<()>;
    fn end(&mut self, size: u64) -> anyhow::Result<()>;
    /// A whole entry whose content is in memory.
    fn entry(&mut self, path: &str, meta: &Meta, data: &[u8]) -> anyhow::Result<()> {
        let mut m = meta.clone();
        if m.kind == Kind::File {
            m.size = data.len() as u64;
        }
        self.begin(path, &m)?;
        if m.kind == Kind::File {
            self.data(data)?;
        }
        self.end(m.size)
    }
}

impl<W: Write> EntryOut for TarWriter<W> {
    fn begin(&mut self, path: &str, meta: &Meta) -> anyhow::Result<()> {
        Ok(TarWriter::begin(self, path, meta)?)
    }
    fn data(&mut self, buf: &[u8]) -> anyhow::Result<()> {
        Ok(TarWriter::data(self, buf)?)
    }
    fn end(&mut self, size: u64) -> anyhow::Result<()> {
        Ok(TarWriter::end(self, size)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let mut v = Vec::new();
        pax_record(&mut v, "path", &[b'a'; 90]);
        let s = String::from_utf8(v.clone()).unwrap();
        let (len, _) = s.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), v.len());
        // Crossing a power of ten: a 2-digit body that needs a 3-digit length.
        let mut v = Vec::new();
        pax_record(&mut v, "k", &[b'x'; 94]);
        let s = String::from_utf8(v.clone()).unwrap();
        assert_eq!(
            s.split_once(' ').unwrap().0.parse::<usize>().unwrap(),
            v.len()
        );
    }

    #[test]
    fn long_names_xattrs_and_devices_round_trip_through_the_tar_crate() {
        let long = format!("{}/file", "d".repeat(150));
        let target = format!("/{}", "t".repeat(120));
        let mut w = TarWriter::new(Vec::new());
        let mut m = Meta::new(Kind::File, 0o640, 3, 1234);
        m.uid = 3_000_000;
        m.xattrs.push(("user.k".into(), b"v\0bin".to_vec()));
        w.entry(&long, &m, b"abc").unwrap();
        w.entry(
            "l",
            &Meta::new(Kind::Symlink(target.clone()), 0o777, 0, 1),
            b"",
        )
        .unwrap();
        w.entry("dev/null", &Meta::new(Kind::Char(1, 3), 0o666, 0, 1), b"")
            .unwrap();
        let buf = w.finish().unwrap();
        let mut ar = tar::Archive::new(&buf[..]);
        let mut es = ar.entries().unwrap();
        let mut e = es.next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str().unwrap(), long);
        assert_eq!(e.header().mode().unwrap(), 0o640);
        let mut xattrs = Vec::new();
        for ext in e.pax_extensions().unwrap().unwrap() {
            let ext = ext.unwrap();
            xattrs.push((ext.key().unwrap().to_string(), ext.value_bytes().to_vec()));
        }
        assert!(xattrs.contains(&("SCHILY.xattr.user.k".into(), b"v\0bin".to_vec())));
        assert!(xattrs.contains(&("uid".into(), b"3000000".to_vec())));
        let mut s = String::new();
        std::io::Read::read_to_string(&mut e, &mut s).unwrap();
        assert_eq!(s, "abc");
        let e = es.next().unwrap().unwrap();
        assert_eq!(e.link_name().unwrap().unwrap().to_str().unwrap(), target);
        let e = es.next().unwrap().unwrap();
        assert_eq!(e.header().device_major().unwrap(), Some(1));
        assert_eq!(e.header().device_minor().unwrap(), Some(3));
        assert!(es.next().is_none());
    }
}
