//! Writing a plan's files into a folder the user named (`devfleet pull`),
//! without letting a file's path reach outside it.
//!
//! Paths come from the store, so they are checked again here
//! ([`devfleet_protocol::plan::validate_path`]: relative, no `..`, no
//! `.git`). Inside the folder nothing is written through a symbolic link:
//! a link where a directory of the path or the file itself would be is
//! refused, directories are created one at a time, and each file is written
//! to a fresh temporary file in its directory and renamed into place, so an
//! existing entry (a link or a hard link to a file elsewhere) is replaced,
//! never written through. The folder itself is the user's choice and may
//! be a link.

use anyhow::{bail, Context as _};
use std::io::Write as _;
use std::path::Path;

/// Writes `bytes` to `rel` under `out` (created if missing), refusing a
/// hostile path or a symbolic link inside `out` with an error naming both.
pub fn write_file(out: &Path, rel: &str, bytes: &[u8]) -> anyhow::Result<()> {
    devfleet_protocol::plan::validate_path(rel)
        .map_err(|e| anyhow::anyhow!("refusing to write '{rel}': {e}"))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let components: Vec<&str> = rel.split('/').collect();
    let (name, dirs) = components
        .split_last()
        .context("a validated path has a last component")?;
    let mut dir = out.to_path_buf();
    for component in dirs {
        dir.push(component);
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.file_type().is_symlink() => bail!(
                "refusing to write '{rel}': {} is a symbolic link",
                dir.display()
            ),
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => bail!(
                "refusing to write '{rel}': {} is not a directory",
                dir.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Not create_dir_all: that would follow a link raced in here.
                std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("inspecting {}", dir.display())),
        }
    }
    let dest = dir.join(name);
    match std::fs::symlink_metadata(&dest) {
        Ok(meta) if meta.file_type().is_symlink() => bail!(
            "refusing to write '{rel}': {} is a symbolic link",
            dest.display()
        ),
        Ok(meta) if meta.is_dir() => bail!(
            "refusing to write '{rel}': {} is a directory",
            dest.display()
        ),
        _ => {}
    }
    let temp = dir.join(format!(
        ".{name}.devfleet-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .and_then(|mut file| file.write_all(bytes))
        .and_then(|()| std::fs::rename(&temp, &dest));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e).with_context(|| format!("writing {}", dest.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        (root, out, outside)
    }

    #[test]
    fn files_land_under_the_folder_and_replace_old_ones() {
        let (_root, out, _) = dirs();
        write_file(&out, "app/models/user.py", b"one").unwrap();
        write_file(&out, "app/models/user.py", b"two").unwrap();
        assert_eq!(
            std::fs::read(out.join("app/models/user.py")).unwrap(),
            b"two"
        );
        let names: Vec<_> = std::fs::read_dir(out.join("app/models"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["user.py"], "no temporary file is left behind");
    }

    #[test]
    fn a_symlinked_directory_in_the_folder_is_refused() {
        let (_root, out, outside) = dirs();
        symlink(&outside, out.join("app")).unwrap();
        let err = write_file(&out, "app/x.py", b"evil")
            .unwrap_err()
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(!outside.join("x.py").exists());
    }

    #[test]
    fn a_symlinked_file_in_the_folder_is_refused() {
        let (_root, out, outside) = dirs();
        std::fs::write(outside.join("target"), b"precious").unwrap();
        symlink(outside.join("target"), out.join("a.py")).unwrap();
        let err = write_file(&out, "a.py", b"evil").unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"precious");
    }

    #[test]
    fn a_hard_link_is_replaced_not_written_through() {
        let (_root, out, outside) = dirs();
        std::fs::write(outside.join("target"), b"precious").unwrap();
        std::fs::hard_link(outside.join("target"), out.join("a.py")).unwrap();
        write_file(&out, "a.py", b"new").unwrap();
        assert_eq!(std::fs::read(out.join("a.py")).unwrap(), b"new");
        assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"precious");
    }

    #[test]
    fn git_metadata_and_escaping_paths_are_refused() {
        let (_root, out, _) = dirs();
        for bad in [
            ".git/hooks/post-checkout",
            "sub/.git/config",
            "../x.py",
            "/etc/x",
        ] {
            let err = write_file(&out, bad, b"evil").unwrap_err().to_string();
            assert!(err.contains("refusing"), "{bad}: {err}");
        }
        assert!(!out.join(".git").exists());
    }
}
