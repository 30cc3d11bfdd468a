//! Unix sockets chapeau listens on (console ports, the API socket), bound without harming the
//! host: a socket someone listens on is never taken over, nothing but a stale socket file is
//! ever replaced, symlinks are never followed, and the file is removed when we are done with
//! it only while it is still the one we created.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{} is a socket another process is listening on; not taking it over", path.display())]
    InUse { path: PathBuf },
    #[error("{} exists and is not a socket; not replacing it", path.display())]
    NotASocket { path: PathBuf },
    #[error("{} is a symbolic link; not following it", path.display())]
    Symlink { path: PathBuf },
    #[error("cannot tell whether anyone listens on the socket {}: {source}", path.display())]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale socket {}: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on unix socket {}: {source}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub use crate::host_files::CreatedFile as SocketFile;

/// Listens on `path` (blocking; callers set non-blocking mode as they need). An existing
/// socket file is probed with connect(2) first: a listener answers, and we refuse; only
/// ECONNREFUSED (nobody listens: a leftover of a crashed run) lets us replace it, which is
/// logged. Any other kind of file, a symlink included, is refused.
pub fn bind_unix_listener(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    let path_buf = || path.to_path_buf();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse { path: path_buf() }),
            // A full backlog means someone listens too.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                return Err(SocketError::InUse { path: path_buf() })
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                // unlink(2) removes the name only; it never follows a symlink.
                std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                    path: path_buf(),
                    source,
                })?;
                log::warn!(
                    "replaced the stale socket {} (nobody was listening on it)",
                    path.display()
                );
            }
            Err(source) => {
                return Err(SocketError::Probe {
                    path: path_buf(),
                    source,
                })
            }
        },
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(SocketError::Symlink { path: path_buf() })
        }
        Ok(_) => return Err(SocketError::NotASocket { path: path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SocketError::Listen {
                path: path_buf(),
                source,
            })
        }
    }
    // bind(2) creates the file and fails on any existing name (a symlink included), so a file
    // planted since the check above is never replaced.
    let listener = UnixListener::bind(path).map_err(|source| SocketError::Listen {
        path: path_buf(),
        source,
    })?;
    let file = SocketFile::track(path);
    Ok((listener, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chapeau-unix-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn a_live_socket_is_refused_and_keeps_working() {
        let path = scratch("live.sock");
        let theirs = UnixListener::bind(&path).unwrap();
        let err = bind_unix_listener(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} is a socket another process is listening on; not taking it over",
                path.display()
            )
        );
        // The owner still gets its clients (and the probe's connection is all it saw).
        theirs.accept().unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        theirs.accept().unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced_and_removed_on_drop() {
        let path = scratch("stale.sock");
        drop(UnixListener::bind(&path).unwrap());
        let (listener, file) = bind_unix_listener(&path).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        drop(file);
        assert!(!path.exists());
    }

    #[test]
    fn a_socket_that_replaced_ours_is_not_removed() {
        let path = scratch("replaced.sock");
        let (_listener, file) = bind_unix_listener(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let _theirs = UnixListener::bind(&path).unwrap();
        drop(file);
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn other_files_and_symlinks_are_left_alone() {
        let file = scratch("plain");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(
            bind_unix_listener(&file),
            Err(SocketError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        // A symlink to a stale socket: neither the link nor its target is touched.
        let target = scratch("target.sock");
        drop(UnixListener::bind(&target).unwrap());
        let link = scratch("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = bind_unix_listener(&link).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} is a symbolic link; not following it", link.display())
        );
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert!(std::fs::symlink_metadata(&target)
            .unwrap()
            .file_type()
            .is_socket());
    }
}
