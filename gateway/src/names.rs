//! Validation of the names users and peers give to sites, workloads and image files.

use thiserror::Error;

/// A name was rejected; the message says which rule it broke.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {kind} name {name:?}: {rule}")]
pub struct NameError {
    pub kind: &'static str,
    pub name: String,
    pub rule: &'static str,
}

/// Site and workload names: 1 to 63 characters of `a-z`, `0-9` and `-`, starting with a
/// letter or digit (a DNS label, so names can become host names and cgroup directories).
pub fn validate(kind: &'static str, name: &str) -> Result<(), NameError> {
    let err = |rule| {
        Err(NameError {
            kind,
            name: name.chars().take(80).collect(),
            rule,
        })
    };
    if name.is_empty() || name.len() > 63 {
        return err("must be 1 to 63 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return err("may contain only a-z, 0-9 and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return err("must not start or end with '-'");
    }
    Ok(())
}

/// Image file names sent by a peer: a single path component, so a hostile peer cannot
/// write outside the migration's image directory.
pub fn validate_file_name(name: &str) -> Result<(), NameError> {
    let err = |rule| {
        Err(NameError {
            kind: "image file",
            name: name.chars().take(80).collect(),
            rule,
        })
    };
    if name.is_empty() || name.len() > 255 {
        return err("must be 1 to 255 characters long");
    }
    if name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return err("must be a single path component");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        assert!(validate("workload", "redis-1").is_ok());
        assert!(validate("workload", "a").is_ok());
    }

    #[test]
    fn rejects_bad_names_with_the_rule() {
        let e = validate("workload", "Redis").unwrap_err();
        assert_eq!(e.rule, "may contain only a-z, 0-9 and '-'");
        assert!(validate("workload", "").is_err());
        assert!(validate("workload", "-a").is_err());
        assert!(validate("workload", &"a".repeat(64)).is_err());
        assert!(validate("workload", "a/b").is_err());
    }

    #[test]
    fn file_names_cannot_escape_the_image_directory() {
        assert!(validate_file_name("pages-1.img").is_ok());
        assert!(validate_file_name("../etc/passwd").is_err());
        assert!(validate_file_name("..").is_err());
        assert!(validate_file_name("a/b").is_err());
    }
}
