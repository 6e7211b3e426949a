//! The merged tree: layer indexes applied bottom to top with OCI semantics.
//!
//! Every non-folder entry is an *inode*; a hard link is a second path to the same inode. That is
//! what makes hard links exact: replacing or whiting out a link's target in a higher layer does
//! not take the link's content with it (an overlay filesystem behaves the same way), so the
//! surviving paths of an inode are written as one file plus hard links to it.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use super::index::Op;
use super::path::parent;
use crate::tarfmt::{Kind, Meta};

#[derive(Debug, Clone)]
pub enum Node {
    Dir(Meta),
    Inode(u32),
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// The layer that last wrote this path.
    pub layer: u32,
    pub node: Node,
}

#[derive(Debug)]
pub struct Inode {
    pub layer: u32,
    pub ordinal: u32,
    /// Never `Hardlink`.
    pub meta: Meta,
    /// The path that created it.
    pub origin: String,
}

#[derive(Default)]
pub struct Tree {
    pub entries: BTreeMap<String, Entry>,
    pub inodes: Vec<Inode>,
}

/// Metadata for a parent folder no layer describes.
fn implied_dir() -> Meta {
    Meta::new(Kind::Dir, 0o755, 0, 0)
}

/// Keys strictly below `p` in the map's order: `p/…`.
fn below(p: &str) -> (String, String) {
    if p.is_empty() {
        (String::new(), String::from("\u{10FFFF}"))
    } else {
        // '0' is the character right after '/'.
        (format!("{p}/"), format!("{p}0"))
    }
}

impl Tree {
    fn descendants(&self, p: &str) -> Vec<(String, u32)> {
        let (lo, hi) = below(p);
        self.entries
            .range(lo..hi)
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, e)| (k.clone(), e.layer))
            .collect()
    }

    /// Remove what lower layers (below `layer`) put at or under `p`.
    fn hide_lower(&mut self, p: &str, layer: u32, include_self: bool) {
        let mut keep_self = false;
        for (k, l) in self.descendants(p) {
            if l < layer {
                self.entries.remove(&k);
            } else {
                keep_self = true;
            }
        }
        if include_self && !keep_self && self.entries.get(p).is_some_and(|e| e.layer < layer) {
            self.entries.remove(p);
        }
    }

    fn ensure_parents(&mut self, path: &str, layer: u32) -> Result<()> {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let a = &path[..end + i];
            match self.entries.get(a).map(|e| &e.node) {
                Some(Node::Dir(_)) => {}
                Some(Node::Inode(n)) => match &self.inodes[*n as usize].meta.kind {
                    Kind::Symlink(t) => bail!(
                        "{path} would be written through the symlink {a} -> {t}; a symlink must not \
                         lead a later entry elsewhere (possible escape from the root)"
                    ),
                    _ => bail!("{path}: its parent {a} is not a folder"),
                },
                None => {
                    self.entries.insert(
                        a.to_string(),
                        Entry {
                            layer,
                            node: Node::Dir(implied_dir()),
                        },
                    );
                }
            }
            end += i + 1;
        }
        Ok(())
    }

    /// Apply one layer's operations (in its stream order).
    pub fn apply(&mut self, layer: u32, ops: Vec<Op>) -> Result<()> {
        for op in ops {
            match op {
                Op::Whiteout(p) => self.hide_lower(&p, layer, true),
                Op::Opaque(p) => self.hide_lower(&p, layer, false),
                Op::Put {
                    ordinal,
                    path,
                    meta,
                } => self.put(layer, ordinal, path, meta)?,
            }
        }
        Ok(())
    }

    fn put(&mut self, layer: u32, ordinal: u32, path: String, meta: Meta) -> Result<()> {
        self.ensure_parents(&path, layer)?;
        let node = match &meta.kind {
            Kind::Dir => Node::Dir(meta),
            Kind::Hardlink(target) => {
                if *target == path {
                    bail!("hard link {path} points to itself");
                }
                match self.entries.get(target).map(|e| &e.node) {
                    Some(Node::Inode(n)) => Node::Inode(*n),
                    Some(Node::Dir(_)) => bail!("hard link {path} points to the folder {target}"),
                    None => bail!(
                        "hard link {path} points to {target}, which does not exist (at this layer)"
                    ),
                }
            }
            _ => {
                self.inodes.push(Inode {
                    layer,
                    ordinal,
                    meta,
                    origin: path.clone(),
                });
                Node::Inode(self.inodes.len() as u32 - 1)
            }
        };
        let was_dir = matches!(self.entries.get(&path).map(|e| &e.node), Some(Node::Dir(_)));
        if was_dir && !matches!(node, Node::Dir(_)) {
            // A non-folder replaces a folder: its whole subtree goes.
            for (k, _) in self.descendants(&path) {
                self.entries.remove(&k);
            }
        }
        self.entries.insert(path, Entry { layer, node });
        Ok(())
    }

    /// The inode at `path`, following no links.
    pub fn inode_at(&self, path: &str) -> Option<&Inode> {
        match self.entries.get(path)?.node {
            Node::Inode(n) => Some(&self.inodes[n as usize]),
            Node::Dir(_) => None,
        }
    }

    /// The path `path` names once every symlink on the way is followed inside the tree, as the
    /// kernel would in the unpacked rootfs (absolute targets start at the root; at most 40
    /// links); None when it leads nowhere, through a non-folder, or into a loop.
    pub fn resolve(&self, path: &str) -> Option<String> {
        let mut todo: Vec<String> = path
            .split('/')
            .filter(|c| !c.is_empty())
            .rev()
            .map(str::to_string)
            .collect();
        let mut done: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(c) = todo.pop() {
            match c.as_str() {
                "." => continue,
                ".." => {
                    done.pop();
                    continue;
                }
                _ => {}
            }
            done.push(c);
            let here = done.join("/");
            match &self.entries.get(&here)?.node {
                Node::Dir(_) => {}
                Node::Inode(n) => {
                    if let Kind::Symlink(t) = &self.inodes[*n as usize].meta.kind {
                        hops += 1;
                        if hops > 40 {
                            return None;
                        }
                        done.pop();
                        if t.starts_with('/') {
                            done.clear();
                        }
                        todo.extend(
                            t.split('/')
                                .filter(|c| !c.is_empty())
                                .rev()
                                .map(str::to_string),
                        );
                    } else if !todo.is_empty() {
                        return None;
                    }
                }
            }
        }
        Some(done.join("/"))
    }

    /// Number of paths in the tree.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Check that every parent of every path is present (they are, by construction; this guards the
/// invariant in tests).
pub fn parents_present(t: &Tree) -> bool {
    t.entries.keys().all(|k| {
        parent(k).is_empty()
            || matches!(
                t.entries.get(parent(k)).map(|e| &e.node),
                Some(Node::Dir(_))
            )
    })
}
