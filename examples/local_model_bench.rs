//! Time to first token and decode speed of the embedded model, single stream.
//!
//! Run with: cargo run --release --example local_model_bench -- [MODEL_PATH] [RUNS] [THREADS]
//!
//! THREADS (default: one per core) is what `[providers.local] threads` sets: the threads each
//! matrix product is split across. 1 is the single-threaded kernel.

use std::cell::Cell;
use std::time::Instant;

use mangoo::domain::Role;
use mangoo::providers::local::llama::Session;
use mangoo::providers::local::model::{LocalModel, SamplingParams, generate};

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(mangoo::providers::local::default_model_path);
    let runs: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(5);
    let threads: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    println!("threads: {}", pool.current_num_threads());
    pool.install(|| run(&path, runs))
}

fn run(
    path: &std::path::Path,
    runs: usize,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let started = Instant::now();
    let model = LocalModel::load(path)?;
    println!(
        "load (with Q4_1 -> Q8_0): {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let prompt = model.tokenizer.chat_prompt(
        None,
        &[(Role::User, "Explain quantum computing in 3 sentences.")],
    )?;
    println!("prompt: {} tokens", prompt.len());
    let cpu_before = cpu_seconds();
    let sampling = SamplingParams {
        max_tokens: 128,
        temperature: None,
        top_p: None,
        seed: 1,
    };
    for run in 0..runs {
        // A fresh session for the cold numbers; the warm ones reuse the system prompt's cache.
        let mut session = Session::new(&model.weights);
        if run % 2 == 1 {
            session.prefill(&model.weights, &model.tokenizer.system_prefix(None)?)?;
        }
        let started = Instant::now();
        let first = Cell::new(None);
        let generated = generate(
            &model.weights,
            &mut session,
            &model.tokenizer,
            &prompt,
            sampling,
            || false,
            |_| {
                if first.get().is_none() {
                    first.set(Some(started.elapsed()));
                }
                true
            },
        )?;
        let total = started.elapsed();
        let ttft = first.get().unwrap_or(total);
        let decode = (total - ttft).as_secs_f64();
        println!(
            "run {run} ({}): ttft {:.1} ms, {} tokens, decode {:.1} tokens/s",
            if run % 2 == 1 {
                "system prompt cached"
            } else {
                "cold"
            },
            ttft.as_secs_f64() * 1e3,
            generated.output_tokens,
            (generated.output_tokens.saturating_sub(1)) as f64 / decode
        );
    }
    println!("CPU: {:.2} s", cpu_seconds() - cpu_before);
    Ok(())
}

/// This process's user + system CPU time, from /proc (0 where there is none).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11..13]
        .iter()
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}
