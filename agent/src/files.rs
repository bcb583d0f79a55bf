//! Files and directories the agent keeps to itself. The state file and the audit and flow
//! logs hold addresses, names, DNS names and who moved where; the state and pin
//! directories decide what the agent trusts at its next start. So:
//! - files are created `0600` (root reads them; `backplane flows`, `audit` and `status`
//!   go through the agent's socket), and an existing one with a wider mode is narrowed;
//! - no symbolic link is followed where the agent writes (`O_NOFOLLOW`), and a file
//!   replaced whole is written beside it and renamed over it;
//! - a directory the agent keeps state or pins in is refused when it is a symbolic link,
//!   not a directory, owned by another user, or writable by group or others.

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
};

/// Mode of the files the agent writes.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the directories the agent creates.
pub const DIR_MODE: u32 = 0o700;

/// Opens `path` for appending, creating it `0600`; never through a symbolic link. An
/// existing file must be a regular file of this user's; a wider mode is narrowed.
pub fn open_append(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| refused_link(path, e))?;
    keep_private(&file, path)?;
    Ok(file)
}

/// Replaces `path` with `bytes`: written to `<path>.tmp` (`0600`, a link there removed,
/// never followed) and renamed over it.
pub fn write_replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(tmp, path)
}

/// Creates `dir` (and its parents, `0700`) if it is missing, then [`check_dir`].
pub fn ensure_dir(dir: &Path, what: &str) -> Result<(), String> {
    if fs::symlink_metadata(dir).is_err() {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| format!("cannot create the {what} {}: {e}", dir.display()))?;
    }
    check_dir(dir, what)
}

/// Whether the agent may keep its `what` in `dir`: a directory (not a link to one) of
/// this user, writable by nobody else. `Err` says what is wrong and where.
pub fn check_dir(dir: &Path, what: &str) -> Result<(), String> {
    let meta =
        fs::symlink_metadata(dir).map_err(|e| format!("the {what} {} cannot be examined: {e}", dir.display()))?;
    if meta.file_type().is_symlink() {
        return Err(format!(
            "the {what} {} is a symbolic link: give the directory itself (a link could point anywhere)",
            dir.display()
        ));
    }
    if !meta.is_dir() {
        return Err(format!("the {what} {} is not a directory", dir.display()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "the {what} {} is owned by uid {}, not by this agent's user (uid {me}): another user could change \
             what the agent trusts there",
            dir.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "the {what} {} is writable by {} (mode {mode:04o}): run `chmod go-w {}`",
            dir.display(),
            if mode & 0o002 != 0 { "everyone" } else { "its group" },
            dir.display()
        ));
    }
    Ok(())
}

/// An open that failed on a symbolic link (`ELOOP` under `O_NOFOLLOW`) says so.
fn refused_link(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::other(format!("{} is a symbolic link; the agent does not write through links", path.display()))
    } else {
        e
    }
}

/// A file opened for writing is a regular file of this user with no access for others.
fn keep_private(file: &File, path: &Path) -> io::Result<()> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other(format!("{} is not a regular file", path.display())));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(io::Error::other(format!(
            "{} is owned by uid {}, not by this agent's user",
            path.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("bp-files-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn files_are_created_private_and_wider_ones_narrowed() {
        let dir = TempDir::new("modes");
        let log = dir.0.join("audit.jsonl");
        open_append(&log).unwrap().write_all(b"a\n").unwrap();
        assert_eq!(mode(&log), 0o600);
        // Created 0644 by an older agent: narrowed on the next open, content kept.
        fs::set_permissions(&log, fs::Permissions::from_mode(0o644)).unwrap();
        open_append(&log).unwrap().write_all(b"b\n").unwrap();
        assert_eq!((mode(&log), fs::read_to_string(&log).unwrap().as_str()), (0o600, "a\nb\n"));
        let state = dir.0.join("endpoints.json");
        write_replace(&state, b"{}").unwrap();
        assert_eq!((mode(&state), fs::read(&state).unwrap()), (0o600, b"{}".to_vec()));
    }

    #[test]
    fn no_link_is_followed_where_the_agent_writes() {
        let dir = TempDir::new("links");
        let victim = dir.0.join("victim");
        fs::write(&victim, "untouched").unwrap();
        let log = dir.0.join("flows.jsonl");
        std::os::unix::fs::symlink(&victim, &log).unwrap();
        let err = open_append(&log).unwrap_err().to_string();
        assert!(err.contains("is a symbolic link"), "{err}");
        // A link planted where the state file is written beside its place: removed, not
        // followed.
        let state = dir.0.join("endpoints.json");
        std::os::unix::fs::symlink(&victim, dir.0.join("endpoints.json.tmp")).unwrap();
        write_replace(&state, b"{}").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(fs::read(&state).unwrap(), b"{}");
    }

    #[test]
    fn directories_of_others_or_open_to_others_are_refused() {
        let dir = TempDir::new("dirs");
        let good = dir.0.join("state");
        ensure_dir(&good, "state directory").unwrap();
        assert_eq!(mode(&good), DIR_MODE);
        let open = dir.0.join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_dir(&open, "state directory").unwrap_err();
        assert!(err.contains("writable by everyone (mode 0777)"), "{err}");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o770)).unwrap();
        let err = check_dir(&open, "state directory").unwrap_err();
        assert!(err.contains("writable by its group"), "{err}");
        let link = dir.0.join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let err = check_dir(&link, "pin directory").unwrap_err();
        assert!(err.starts_with("the pin directory") && err.contains("is a symbolic link"), "{err}");
        // Owned by another user (the tests run as root, and give it to nobody).
        let theirs = dir.0.join("theirs");
        fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown (the tests run as root)");
        let err = check_dir(&theirs, "state directory").unwrap_err();
        assert!(err.contains("is owned by uid 65534"), "{err}");
    }
}
