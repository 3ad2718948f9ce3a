//! Facts about a CRIU image directory that the rest of Ferry relies on: which files hold
//! the memory pages (written front to back, so they can travel while the dump runs),
//! which are CRIU's own logs (never sent), and where a restore leaves its pid.

/// CRIU's log of a dump, written into the image directory.
pub const DUMP_LOG: &str = "dump.log";
/// What a runtime's own lazy checkpoint (`runc checkpoint --lazy-pages`) printed.
pub const RUNTIME_DUMP_LOG: &str = "runtime-dump.log";
/// CRIU's log of a restore.
pub const RESTORE_LOG: &str = "restore.log";
/// The log of the `criu lazy-pages` daemon of a post-copy restore.
pub const LAZY_PAGES_LOG: &str = "lazy-pages.log";
/// Where `criu restore --pidfile` writes the restored root's host pid.
pub const RESTORE_PIDFILE: &str = "restore.pid";
/// The exit code of the `criu lazy-pages` daemon, written by the guard that outlives the
/// gateway ("0": the restored tree got every page).
pub const LAZY_PAGES_EXIT: &str = "lazy-pages.exit";

/// A page image (`pages-N.img`): nearly all of an image's bytes, written front to back.
pub fn is_page_image(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// A file of the image directory that is not part of the image (logs, the pidfile).
pub fn is_local_only(name: &str) -> bool {
    name.ends_with(".log") || name == RESTORE_PIDFILE || name == LAZY_PAGES_EXIT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_stream_and_logs_stay() {
        assert!(is_page_image("pages-1.img"));
        assert!(!is_page_image("pagemap-1.img"));
        assert!(is_local_only(DUMP_LOG));
        assert!(is_local_only(RESTORE_PIDFILE));
        assert!(!is_local_only("inventory.img"));
    }
}
