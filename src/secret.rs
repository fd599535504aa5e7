//! The one type every credential travels in.
//!
//! Capstan holds root-equivalent access to every Docker host it knows, so a secret must
//! never end up in a log line, an API response, a panic message or a plugin. `Secret`
//! prints as `***` in both `Debug` and `Display`, has no `Serialize` impl (it can be read
//! from a request, never written to one), and wipes its bytes when dropped.

use std::fmt;

use zeroize::Zeroizing;

/// A credential in memory: zeroized on drop, printed as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(Zeroizing::new(bytes))
    }

    /// `bytes` random bytes from the OS, hex-encoded (a generated shared secret).
    pub fn random_hex(bytes: usize) -> Self {
        let mut raw = zeroize::Zeroizing::new(vec![0u8; bytes]);
        crate::vault::crypto::random_fill(&mut raw[..]);
        Secret::from_str_owned(hex::encode(&raw[..]))
    }

    pub fn from_str_owned(s: String) -> Self {
        Secret::new(s.into_bytes())
    }

    /// The secret's bytes. Call this only at the point of use (sealing, authenticating).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The secret as UTF-8 text, for passwords and PEM/OpenSSH key material.
    pub fn expose_str(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads a secret from a file, dropping one trailing newline (as `echo` writes it).
    pub fn from_file(path: &std::path::Path) -> std::io::Result<Self> {
        let mut bytes = Zeroizing::new(std::fs::read(path)?);
        trim_trailing_newline(&mut bytes);
        Ok(Secret(bytes))
    }

    /// Reads a secret from a reader (stdin), dropping one trailing newline.
    pub fn from_reader(mut r: impl std::io::Read) -> std::io::Result<Self> {
        let mut bytes = Zeroizing::new(Vec::new());
        r.read_to_end(&mut bytes)?;
        trim_trailing_newline(&mut bytes);
        Ok(Secret(bytes))
    }
}

fn trim_trailing_newline(bytes: &mut Vec<u8>) {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Secret::from_str_owned(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_stars_in_debug_and_display() {
        let s = Secret::from_str_owned("hunter2".into());
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{:?}", Some(&s)), "Some(***)");
    }

    #[test]
    fn reading_from_a_file_drops_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "pa ss\n\n").unwrap();
        assert_eq!(Secret::from_file(&p).unwrap().expose(), b"pa ss\n");
        std::fs::write(&p, "x\r\n").unwrap();
        assert_eq!(Secret::from_file(&p).unwrap().expose(), b"x");
    }
}
