//! `mangoo probe URL`: checks the path between clients and a Mangoo end to end — reachability,
//! TLS, authentication as a browser's EventSource needs it, the headers clients see, whether
//! something buffers or compresses the stream, whether idle streams are cut, resume, CORS — and
//! says, for each problem, the value it measured and what to change.
//!
//! Every timing check runs against `GET /api/v1/diagnostics/stream`, which Mangoo paces and
//! stamps itself: the probe needs no model and spends no tokens.

mod checks;

use std::time::Duration;

use serde::Serialize;

/// What to probe, from the command line.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// How clients reach Mangoo: `https://chat.example.com`, or with a path prefix.
    pub url: String,
    pub token: Option<String>,
    /// Open the EventSource-style stream with a one-time ticket instead of `?token=`.
    pub ticket: bool,
    /// An origin whose CORS preflight to check (the web page's).
    pub origin: Option<String>,
    /// Seconds of silence a stream must survive.
    pub idle: Duration,
    /// Also measure the path's own idle timeout, with heartbeats off.
    pub without_heartbeats: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Problem,
    Skipped,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was measured or found.
    pub detail: String,
    /// What to change, for a problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn problem(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Problem,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn skipped(name: &'static str, why: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Skipped,
            detail: why.into(),
            fix: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub url: String,
    pub healthy: bool,
    pub checks: Vec<Check>,
}

impl Report {
    /// One line per check, then the fixes.
    pub fn text(&self) -> String {
        let mut out = format!("mangoo probe {}\n", self.url);
        for check in &self.checks {
            let status = match check.status {
                Status::Ok => "ok",
                Status::Problem => "PROBLEM",
                Status::Skipped => "skipped",
            };
            out.push_str(&format!(
                "  {status:<8} {:<14} {}\n",
                check.name, check.detail
            ));
            if let Some(fix) = &check.fix {
                out.push_str(&format!("  {:<8} {:<14} fix: {fix}\n", "", ""));
            }
        }
        out.push_str(if self.healthy {
            "healthy: every check passed\n"
        } else {
            "problems found: see the fixes above\n"
        });
        out
    }
}

/// Runs every check in order; later ones are skipped when what they need failed.
pub async fn run(options: &ProbeOptions) -> Report {
    let checks = checks::all(options).await;
    Report {
        url: options.url.clone(),
        healthy: checks.iter().all(|c| c.status != Status::Problem),
        checks,
    }
}
