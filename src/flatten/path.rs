//! Layer entry names: normalisation, hostile-name checks and whiteout recognition
//! (OCI image-spec `layer.md`). Pure functions, tested table-driven below.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path {0:?} contains `..`")]
    DotDot(String),
    #[error("path {0:?} is absolute")]
    Absolute(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("path {0:?} is not UTF-8")]
    NotUtf8(String),
    #[error("invalid whiteout {0:?}")]
    BadWhiteout(String),
}

const WH_PREFIX: &str = ".wh.";
const WH_OPAQUE: &str = ".wh..wh..opq";
/// aufs bookkeeping (`.wh..wh.plnk`, `.wh..wh.aufs`): not whiteouts, never part of a rootfs.
const WH_META: &str = ".wh..wh.";

/// What a layer entry means once its name is understood.
#[derive(Debug, PartialEq, Eq)]
pub enum Name {
    /// The root folder itself (`./`).
    Root,
    /// An ordinary path, normalised: relative, `/`-separated, no `.` or empty components.
    Path(String),
    /// `.wh.<name>`: delete `<name>` from lower layers.
    Whiteout(String),
    /// `.wh..wh..opq`: hide the lower layers' children of this folder (`""` is the root).
    Opaque(String),
    /// aufs metadata to drop.
    Ignored,
}

/// Normalise a raw tar name. `./a//b/` → `a/b`; `..`, absolute names and NUL are refused.
pub fn normalize(raw: &[u8]) -> Result<String, PathError> {
    let s = std::str::from_utf8(raw)
        .map_err(|_| PathError::NotUtf8(String::from_utf8_lossy(raw).into_owned()))?;
    if s.contains('\0') {
        return Err(PathError::Nul(s.replace('\0', "\\0")));
    }
    if s.starts_with('/') {
        return Err(PathError::Absolute(s.to_string()));
    }
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(PathError::DotDot(s.to_string())),
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

pub fn classify(raw: &[u8]) -> Result<Name, PathError> {
    let p = normalize(raw)?;
    if p.is_empty() {
        return Ok(Name::Root);
    }
    let (dir, base) = match p.rsplit_once('/') {
        Some((d, b)) => (d, b),
        None => ("", p.as_str()),
    };
    if base == WH_OPAQUE {
        return Ok(Name::Opaque(dir.to_string()));
    }
    if base.starts_with(WH_META) {
        return Ok(Name::Ignored);
    }
    if let Some(target) = base.strip_prefix(WH_PREFIX) {
        if target.is_empty() || target == "." || target == ".." {
            return Err(PathError::BadWhiteout(p.clone()));
        }
        return Ok(Name::Whiteout(join(dir, target)));
    }
    Ok(Name::Path(p))
}

pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The parent of a normalised path (`""` for top-level entries).
pub fn parent(p: &str) -> &str {
    p.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

/// Resolve a symlink target relative to the folder holding the link, inside the root
/// (absolute targets start at the root; `..` stops at the root like the kernel's does).
pub fn resolve_link(link_dir: &str, target: &str) -> String {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        link_dir.split('/').filter(|c| !c.is_empty()).collect()
    };
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_table() {
        use Name::*;
        let ok: &[(&str, Name)] = &[
            ("etc/passwd", Path("etc/passwd".into())),
            ("./etc//passwd", Path("etc/passwd".into())),
            ("etc/", Path("etc".into())),
            ("./", Root),
            (".", Root),
            ("etc/.wh.old", Whiteout("etc/old".into())),
            (".wh.top", Whiteout("top".into())),
            ("etc/.wh..wh..opq", Opaque("etc".into())),
            (".wh..wh..opq", Opaque("".into())),
            ("etc/.wh..wh.plnk", Ignored),
            ("etc/.wh...hidden", Whiteout("etc/..hidden".into())),
            ("etc/x.wh.y", Path("etc/x.wh.y".into())),
        ];
        for (raw, want) in ok {
            assert_eq!(&classify(raw.as_bytes()).unwrap(), want, "{raw}");
        }
        type Check = fn(&PathError) -> bool;
        let bad: &[(&[u8], Check)] = &[
            (b"../etc", |e| matches!(e, PathError::DotDot(_))),
            (b"a/../../b", |e| matches!(e, PathError::DotDot(_))),
            (b"/etc/passwd", |e| matches!(e, PathError::Absolute(_))),
            (b"etc/pa\0ss", |e| matches!(e, PathError::Nul(_))),
            (b"etc/.wh.", |e| matches!(e, PathError::BadWhiteout(_))),
            (b"etc/.wh..", |e| matches!(e, PathError::BadWhiteout(_))),
            (b".wh...", |e| matches!(e, PathError::BadWhiteout(_))),
            (b"bad\xff", |e| matches!(e, PathError::NotUtf8(_))),
        ];
        for (raw, is) in bad {
            let e = classify(raw).unwrap_err();
            assert!(is(&e), "{:?} gave {e:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn link_resolution_stays_inside_the_root() {
        assert_eq!(
            resolve_link("etc", "../usr/lib/os-release"),
            "usr/lib/os-release"
        );
        assert_eq!(
            resolve_link("etc", "/usr/lib/os-release"),
            "usr/lib/os-release"
        );
        assert_eq!(resolve_link("a/b", "../../../../x"), "x");
        assert_eq!(resolve_link("", "busybox"), "busybox");
    }
}
