//! The files a keyring names: reading any of them safely, finding a relative one, and the CA
//! bundle of a `ca_file`.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The most a keyring file may hold: thousands of teams fit in far less.
pub(super) const MAX_KEYRING_BYTES: u64 = 1024 * 1024;
/// The most a key file may hold: a key is a few dozen bytes.
pub(super) const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;
/// The most a `ca_file` may hold: a CA bundle of a few hundred certificates.
const MAX_CA_FILE_BYTES: u64 = 1024 * 1024;

/// The certificates of a team's `ca_file`, read and parsed at load.
pub struct CaBundle {
    /// The file, for messages.
    pub path: PathBuf,
    pub certificates: Vec<reqwest::Certificate>,
    /// SHA-256 of the file: teams with the same bundle share one HTTP client.
    pub digest: [u8; 32],
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("path", &self.path)
            .field("certificates", &self.certificates.len())
            .finish()
    }
}

/// Reads and parses a PEM bundle of CA certificates.
pub(super) fn read_ca_bundle(path: &Path) -> Result<CaBundle, String> {
    use sha2::Digest;
    let text = read_checked(path, MAX_CA_FILE_BYTES)?;
    let certificates = reqwest::Certificate::from_pem_bundle(text.as_bytes())
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if certificates.is_empty() {
        return Err("it holds no PEM certificate".into());
    }
    Ok(CaBundle {
        path: path.to_path_buf(),
        certificates,
        digest: sha2::Sha256::digest(text.as_bytes()).into(),
    })
}

/// A key file named relatively is found beside the keyring.
pub(super) fn resolve(keyring: &Path, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        keyring.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Reads the file at `path` as text when it is a regular file of at most `cap` bytes.
///
/// Opened with `O_NONBLOCK`, so that a FIFO cannot hold `open(2)` until a writer comes, and
/// checked on the opened file (`fstat`), so that the file checked is the file read; then read
/// through `take(cap + 1)`, so that a file growing after the check, or one whose size the
/// kernel does not know, still costs at most `cap + 1` bytes.
///
/// Fails, with a sentence on what the file is (the caller names it), when it cannot be
/// opened, is not a regular file, is larger than `cap`, or is not UTF-8.
pub(super) fn read_checked(path: &Path, cap: u64) -> Result<String, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open it: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot inspect it: {e}"))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(format!(
            "it is {}, not a regular file; refusing to read it",
            kind_of(kind)
        ));
    }
    let too_large = || {
        format!(
            "it is larger than {} KiB, the most it may hold; refusing to read it",
            cap / 1024
        )
    };
    if meta.len() > cap {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(cap + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if data.len() as u64 > cap {
        return Err(too_large());
    }
    String::from_utf8(data).map_err(|_| "it is not UTF-8 text".to_string())
}

/// What a file that is not a regular file is, for the message that refuses it.
fn kind_of(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_fifo() {
        "a named pipe (FIFO)"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a plain file"
    }
}
