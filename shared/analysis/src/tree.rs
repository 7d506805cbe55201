//! Listing a directory and scanning its sources on every core.
//!
//! [`walk_and_scan`] runs `Options::threads` threads that share a queue of
//! directories: each takes one, queues its subdirectories and reads and
//! scans its source files, so listing and reading overlap and both cores stay
//! busy. [`list`] only lists (a plan's base). Nothing here fails on a bad
//! file: it becomes a [`Warning`] and stays a graph node without imports, so
//! edges into it still resolve.

use crate::resolve::FileSet;
use crate::scanner::js::{self, Dialect, JsImport};
use crate::scanner::python::{self, PyImport};
use crate::{AnalyzeError, Language, Options, Warning};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

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

/// Checks that `root` is a readable directory; its canonical path.
fn open_root(root: &Path) -> Result<PathBuf, AnalyzeError> {
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
    fs::canonicalize(root).map_err(io)
}

/// Directories nested deeper than this are not entered: the last guard
/// against loops that need no symbolic link (a bind mount of an ancestor).
const MAX_DEPTH: usize = 256;

/// The targets of the symbolic links a directory was reached through.
#[derive(Debug)]
struct LinkChain {
    target: PathBuf,
    up: Option<Arc<LinkChain>>,
}

/// Decides whether the walk enters a symbolically linked directory.
///
/// Real directories cannot form a loop (there are no directory hard links),
/// so only links are checked, and a tree without them costs no `stat` per
/// directory. A link is entered when its target lies outside the root —
/// inside, the walk reaches the target by its real path anyway, and an
/// ancestor would be a loop — and is not the target of a link on the way to
/// it, which ends loops among outside directories (walkdir's rule). Two links
/// to one outside directory both show its files, under both paths.
fn admit_link(
    root: &Path,
    link: &Path,
    chain: Option<&Arc<LinkChain>>,
) -> Result<Arc<LinkChain>, String> {
    let target = fs::canonicalize(link).map_err(|e| format!("not readable: {e}"))?;
    if target.starts_with(root) {
        return Err(
            "symbolic link to a directory of the tree (walked by its real path; \
                    a loop if it is an ancestor); skipped"
                .into(),
        );
    }
    let mut up = chain;
    while let Some(link) = up {
        if link.target == target {
            return Err("symbolic link loop; skipped".into());
        }
        up = link.up.as_ref();
    }
    Ok(Arc::new(LinkChain {
        target,
        up: chain.cloned(),
    }))
}

/// A directory to read.
struct DirJob {
    path: PathBuf,
    rel: String,
    chain: Option<Arc<LinkChain>>,
}

/// What reading one directory found.
#[derive(Default)]
struct DirContents {
    files: Vec<ListedFile>,
    subdirs: Vec<DirJob>,
    warnings: Vec<Warning>,
}

/// Reads one directory; `root` is the canonical root, for [`admit_link`].
fn read_directory(root: &Path, job: &DirJob, opts: &Options) -> DirContents {
    let (dir, rel) = (&job.path, job.rel.as_str());
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
        let (is_dir, size) = if file_type.is_symlink() {
            match fs::metadata(&path) {
                Ok(m) if m.is_dir() && opts.follow_symlinks => (true, 0),
                Ok(m) if m.is_file() => (false, m.len()),
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
            (true, 0)
        } else if file_type.is_file() {
            (false, 0) // sources are measured when they are read
        } else {
            continue; // sockets, fifos, devices
        };
        if !is_dir {
            out.files.push(ListedFile {
                rel: child,
                abs: path,
                size,
            });
            continue;
        }
        if name.starts_with('.') || opts.skip_dirs.contains(&name) {
            continue;
        }
        if child.matches('/').count() >= MAX_DEPTH {
            warn(
                &mut out,
                &child,
                format!("nested deeper than {MAX_DEPTH} directories; skipped"),
            );
            continue;
        }
        let chain = if file_type.is_symlink() {
            match admit_link(root, &path, job.chain.as_ref()) {
                Ok(chain) => Some(chain),
                Err(reason) => {
                    warn(&mut out, &child, reason);
                    continue;
                }
            }
        } else {
            job.chain.clone()
        };
        out.subdirs.push(DirJob {
            path,
            rel: child,
            chain,
        });
    }
    out
}
/// Lists every regular file under `root` without reading any, skipping
/// hidden directories, `opts.skip_dirs`, virtualenvs (a directory holding
/// `pyvenv.cfg`) and symlink loops.
///
/// Fails when `root` is not a readable directory, or when it holds more
/// than `opts.max_entries` files and directories (checked after each
/// directory read, so one giant directory is read before the refusal).
pub fn list(root: &Path, opts: &Options) -> Result<Listing, AnalyzeError> {
    let canonical = open_root(root)?;
    let mut listing = Listing::default();
    let mut stack = vec![DirJob {
        path: root.to_path_buf(),
        rel: String::new(),
        chain: None,
    }];
    let mut entries = 0usize;
    while let Some(job) = stack.pop() {
        let found = read_directory(&canonical, &job, opts);
        entries = entries
            .saturating_add(found.files.len())
            .saturating_add(found.subdirs.len());
        if entries > opts.max_entries {
            return Err(AnalyzeError::TooManyFiles {
                path: root.to_path_buf(),
                limit: opts.max_entries,
            });
        }
        listing.files.extend(found.files);
        listing.warnings.extend(found.warnings);
        stack.extend(found.subdirs);
    }
    listing.files.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
    Ok(listing)
}

/// The directories still to read, shared by the walking threads.
struct Queue {
    dirs: Vec<DirJob>,
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
    let canonical = open_root(root)?;
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let queue = Mutex::new(Queue {
        dirs: vec![DirJob {
            path: root.to_path_buf(),
            rel: String::new(),
            chain: None,
        }],
        busy: 0,
        idle: 0,
    });
    let wake = Condvar::new();

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
            let Some(job) = job else {
                wake.notify_all();
                return (files, warnings);
            };
            let found = read_directory(&canonical, &job, opts);
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
