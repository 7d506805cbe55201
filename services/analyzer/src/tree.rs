//! Listing a directory and scanning its sources on every core.
//!
//! The walk is sequential (directory reads are cheap); reading and scanning
//! the files is spread over `Options::threads` threads, which take files one
//! at a time from a shared counter so a few large files do not leave a core
//! idle. Nothing here fails on a bad file: it becomes a [`Warning`] and stays
//! a graph node without imports, so edges into it still resolve.

use crate::resolve::FileSet;
use crate::scanner::js::{self, Dialect, JsImport};
use crate::scanner::python::{self, PyImport};
use crate::{AnalyzeError, Language, Options, Warning};
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

/// One regular file found under the root.
#[derive(Debug, Clone)]
pub struct ListedFile {
    /// Relative to the root, `/`-separated.
    pub rel: String,
    pub abs: PathBuf,
    /// Size in bytes: measured when a source is read (0 for files that are
    /// only listed, unless reached through a symbolic link).
    pub size: u64,
}

/// Every regular file under a root, sorted by relative path.
#[derive(Debug, Default)]
pub struct Listing {
    pub files: Vec<ListedFile>,
    pub warnings: Vec<Warning>,
}

impl Listing {
    /// The listed paths as a [`FileSet`] for resolution.
    pub fn file_set(&self) -> FileSet {
        FileSet::new(self.files.iter().map(|f| f.rel.clone()))
    }
}

/// The imports scanned from one file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Imports {
    /// Not a source file, or its text could not be read.
    #[default]
    None,
    Python(Vec<PyImport>),
    Js(Vec<JsImport>),
}

impl Imports {
    /// How many imports were found.
    pub fn len(&self) -> usize {
        match self {
            Imports::None => 0,
            Imports::Python(v) => v.len(),
            Imports::Js(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Scans `text` as the language `path`'s extension names.
pub fn scan_text(path: &str, text: &str) -> Imports {
    match Language::from_path(path) {
        Some(Language::Python) => Imports::Python(python::scan(text)),
        Some(Language::JavaScript | Language::TypeScript) => {
            let dialect = Dialect::from_path(path).unwrap_or(Dialect::TypeScript);
            Imports::Js(js::scan(text, dialect))
        }
        None => Imports::None,
    }
}

/// Checks that `root` is a readable directory; its identity for loop detection.
fn open_root(root: &Path) -> Result<DirId, AnalyzeError> {
    let io = |source| AnalyzeError::Io {
        path: root.to_path_buf(),
        source,
    };
    let meta = fs::metadata(root).map_err(io)?;
    if !meta.is_dir() {
        return Err(AnalyzeError::NotADirectory {
            path: root.to_path_buf(),
        });
    }
    fs::read_dir(root).map_err(io)?;
    DirId::of(root, &meta).map_err(io)
}

/// What reading one directory found.
#[derive(Default)]
struct DirContents {
    files: Vec<ListedFile>,
    subdirs: Vec<(PathBuf, String)>,
    warnings: Vec<Warning>,
}

/// Reads one directory. `first_visit` records a subdirectory's identity and
/// says whether it was new (false: a symlink loop or an alias).
fn read_directory(
    dir: &Path,
    rel: &str,
    opts: &Options,
    first_visit: &mut dyn FnMut(DirId) -> bool,
) -> DirContents {
    let mut out = DirContents::default();
    let warn = |out: &mut DirContents, path: &str, message: String| {
        out.warnings.push(Warning {
            path: if path.is_empty() {
                ".".into()
            } else {
                path.into()
            },
            message,
        })
    };
    let mut entries = Vec::new();
    match fs::read_dir(dir) {
        Ok(read) => {
            for entry in read {
                match entry {
                    Ok(entry) => entries.push(entry),
                    Err(e) => warn(&mut out, rel, format!("directory entry not readable: {e}")),
                }
            }
        }
        Err(e) => {
            warn(&mut out, rel, format!("directory not readable: {e}"));
            return out;
        }
    }
    // A virtualenv: thousands of installed files that are not the project.
    if !rel.is_empty() && entries.iter().any(|e| e.file_name() == "pyvenv.cfg") {
        return out;
    }
    for entry in entries {
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            warn(
                &mut out,
                &path.display().to_string(),
                "file name is not UTF-8; skipped".into(),
            );
            continue;
        };
        let child = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let file_type = match entry.file_type() {
            Ok(t) => t,
            Err(e) => {
                warn(&mut out, &child, format!("not readable: {e}"));
                continue;
            }
        };
        let (dir_meta, size) = if file_type.is_symlink() {
            match fs::metadata(&path) {
                Ok(m) if m.is_dir() && opts.follow_symlinks => (Some(m), 0),
                Ok(m) if m.is_file() => (None, m.len()),
                Ok(_) => continue,
                Err(e) => {
                    warn(
                        &mut out,
                        &child,
                        format!("broken symbolic link ({e}); skipped"),
                    );
                    continue;
                }
            }
        } else if file_type.is_dir() {
            match entry.metadata() {
                Ok(m) => (Some(m), 0),
                Err(e) => {
                    warn(&mut out, &child, format!("not readable: {e}"));
                    continue;
                }
            }
        } else if file_type.is_file() {
            (None, 0) // sources are measured when they are read
        } else {
            continue; // sockets, fifos, devices
        };
        let Some(dir_meta) = dir_meta else {
            out.files.push(ListedFile {
                rel: child,
                abs: path,
                size,
            });
            continue;
        };
        if name.starts_with('.') || opts.skip_dirs.contains(&name) {
            continue;
        }
        match DirId::of(&path, &dir_meta) {
            Ok(id) => {
                if first_visit(id) {
                    out.subdirs.push((path, child));
                } else {
                    warn(
                        &mut out,
                        &child,
                        "directory already visited (symbolic link loop or alias); skipped".into(),
                    );
                }
            }
            Err(e) => warn(&mut out, &child, format!("not readable: {e}")),
        }
    }
    out
}
/// Lists every regular file under `root` without reading any, skipping
/// hidden directories, `opts.skip_dirs`, virtualenvs (a directory holding
/// `pyvenv.cfg`) and symlink loops.
///
/// Fails only when `root` is not a readable directory.
pub fn list(root: &Path, opts: &Options) -> Result<Listing, AnalyzeError> {
    let mut visited = HashSet::from([open_root(root)?]);
    let mut listing = Listing::default();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let found = read_directory(&dir, &rel, opts, &mut |id| visited.insert(id));
        listing.files.extend(found.files);
        listing.warnings.extend(found.warnings);
        stack.extend(found.subdirs);
    }
    listing.files.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
    Ok(listing)
}

/// The directories still to read, shared by the walking threads.
struct Queue {
    dirs: Vec<(PathBuf, String)>,
    /// Threads reading a directory now (they may add more).
    busy: usize,
    /// Threads waiting for a directory.
    idle: usize,
}

/// Lists `root` like [`list`] and scans every source file, on
/// `opts.threads` threads that walk and scan at once: each takes a
/// directory, queues its subdirectories for any thread, and scans its
/// sources, so reading files overlaps listing directories.
pub fn walk_and_scan(root: &Path, opts: &Options) -> Result<(Listing, Scanned), AnalyzeError> {
    let root_id = open_root(root)?;
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let queue = Mutex::new(Queue {
        dirs: vec![(root.to_path_buf(), String::new())],
        busy: 0,
        idle: 0,
    });
    let wake = Condvar::new();
    let visited = Mutex::new(HashSet::from([root_id]));

    type Found = (
        Vec<(ListedFile, Option<Result<Imports, Warning>>)>,
        Vec<Warning>,
    );
    let work = || -> Found {
        let mut files = Vec::new();
        let mut warnings = Vec::new();
        let mut buf = Vec::new();
        loop {
            let job = {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(job) = q.dirs.pop() {
                        q.busy += 1;
                        break Some(job);
                    }
                    if q.busy == 0 {
                        break None;
                    }
                    q.idle += 1;
                    q = wake.wait(q).unwrap_or_else(|e| e.into_inner());
                    q.idle -= 1;
                }
            };
            let Some((dir, rel)) = job else {
                wake.notify_all();
                return (files, warnings);
            };
            let found = read_directory(&dir, &rel, opts, &mut |id| {
                visited.lock().unwrap_or_else(|e| e.into_inner()).insert(id)
            });
            if !found.subdirs.is_empty() {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                q.dirs.extend(found.subdirs);
                if q.idle > 0 {
                    wake.notify_all();
                }
            }
            warnings.extend(found.warnings);
            for mut file in found.files {
                let scanned = Language::from_path(&file.rel).map(|_| {
                    let (size, result) = read_and_scan(&file, opts.max_file_bytes, &mut buf);
                    file.size = size;
                    result
                });
                files.push((file, scanned));
            }
            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
            q.busy -= 1;
            if q.busy == 0 && q.dirs.is_empty() && q.idle > 0 {
                wake.notify_all();
            }
        }
    };
    let parts: Vec<Found> = if threads <= 1 {
        vec![work()]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads).map(|_| scope.spawn(work)).collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    };

    let mut all = Vec::new();
    let mut listing = Listing::default();
    for (files, warnings) in parts {
        all.extend(files);
        listing.warnings.extend(warnings);
    }
    all.sort_unstable_by(|a, b| a.0.rel.cmp(&b.0.rel));
    let mut scanned = Scanned::default();
    let mut scan_warnings = Vec::new();
    for (file, result) in all {
        scanned.imports.push(match result {
            Some(Ok(imports)) => imports,
            Some(Err(warning)) => {
                scanned.skipped += 1;
                scan_warnings.push(warning);
                Imports::None
            }
            None => Imports::None,
        });
        listing.files.push(file);
    }
    listing.warnings.sort_by(|a, b| a.path.cmp(&b.path));
    scanned.warnings = scan_warnings;
    Ok((listing, scanned))
}

/// What makes a directory the same directory however it was reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum DirId {
    /// Device and inode: one `stat`, which the walk has done anyway.
    #[cfg(unix)]
    Inode(u64, u64),
    /// Elsewhere, the canonical path.
    #[cfg(not(unix))]
    Path(PathBuf),
}

impl DirId {
    #[cfg(unix)]
    fn of(_path: &Path, meta: &fs::Metadata) -> std::io::Result<DirId> {
        use std::os::unix::fs::MetadataExt;
        Ok(DirId::Inode(meta.dev(), meta.ino()))
    }

    #[cfg(not(unix))]
    fn of(path: &Path, _meta: &fs::Metadata) -> std::io::Result<DirId> {
        fs::canonicalize(path).map(DirId::Path)
    }
}

/// The scan of every listed file: `imports[i]` belongs to `listing.files[i]`.
#[derive(Debug, Default)]
pub struct Scanned {
    pub imports: Vec<Imports>,
    pub warnings: Vec<Warning>,
    /// Source files that could not be scanned.
    pub skipped: usize,
}

/// Reads one source file into `buf` (reused across files) and scans it:
/// its size, and its imports or a warning that says why they could not be
/// scanned. No `stat`: the size is what was read, at most `max_bytes + 1`.
fn read_and_scan(
    file: &ListedFile,
    max_bytes: u64,
    buf: &mut Vec<u8>,
) -> (u64, Result<Imports, Warning>) {
    use std::io::Read as _;
    let warn = |message: String| Warning {
        path: file.rel.clone(),
        message,
    };
    buf.clear();
    let read = fs::File::open(&file.abs)
        .and_then(|handle| handle.take(max_bytes.saturating_add(1)).read_to_end(buf));
    if let Err(e) = read {
        return (
            file.size,
            Err(warn(format!("not readable ({e}); imports not scanned"))),
        );
    }
    let size = buf.len() as u64;
    if size > max_bytes {
        let size = fs::metadata(&file.abs).map_or(size, |m| m.len());
        return (
            size,
            Err(warn(format!(
                "{size} bytes, over the {max_bytes}-byte limit; imports not scanned"
            ))),
        );
    }
    let result = decode(&file.rel, buf)
        .map(|text| scan_text(&file.rel, &text))
        .map_err(warn);
    (size, result)
}

/// The text of a source file, or why it is not text.
///
/// Binary files (a NUL byte in the first 8 KiB) and invalid UTF-8 are
/// refused, except a Python file that declares another encoding with a PEP 263
/// `coding:` line: imports are ASCII, so it is decoded lossily.
pub fn decode<'a>(path: &str, bytes: &'a [u8]) -> Result<std::borrow::Cow<'a, str>, String> {
    let head = &bytes[..bytes.len().min(8192)];
    if memchr::memchr(0, head).is_some() {
        return Err("binary file (NUL byte); imports not scanned".into());
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(std::borrow::Cow::Borrowed(text)),
        Err(e)
            if Language::from_path(path) == Some(Language::Python) && has_coding_cookie(bytes) =>
        {
            let _ = e;
            Ok(String::from_utf8_lossy(bytes))
        }
        Err(e) => Err(format!(
            "not valid UTF-8 (at byte {}); imports not scanned",
            e.valid_up_to()
        )),
    }
}

/// A PEP 263 encoding declaration in one of the first two lines.
fn has_coding_cookie(bytes: &[u8]) -> bool {
    bytes.split(|&b| b == b'\n').take(2).any(|line| {
        let Some(hash) = line.iter().position(|&b| b == b'#') else {
            return false;
        };
        let comment = &line[hash..];
        comment
            .windows(7)
            .any(|w| w == b"coding:" || w == b"coding=")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_refuses_binary_and_invalid_utf8_but_honours_coding_cookies() {
        assert!(decode("a.py", b"import os\n\0\x01").is_err());
        assert!(decode("a.js", b"import x from 'y'\n\xff\xfe").is_err());
        let latin1 = b"# -*- coding: latin-1 -*-\nimport os\ns = '\xe9'\n";
        assert!(decode("a.py", latin1).is_ok());
        assert!(decode("a.js", latin1).is_err());
        assert_eq!(decode("a.py", b"ok").unwrap(), "ok");
    }

    #[test]
    fn scan_text_picks_the_scanner_by_extension() {
        assert!(matches!(scan_text("a.py", "import x"), Imports::Python(v) if v.len() == 1));
        assert!(matches!(scan_text("a.tsx", "import x from 'y'"), Imports::Js(v) if v.len() == 1));
        assert_eq!(scan_text("README.md", "import x"), Imports::None);
    }
}
