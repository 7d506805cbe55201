//! The simulate executor: takes time and fails on purpose, for demos, load
//! tests and capacity planning.
//!
//! A task takes `estimate × unit`; it fails on the attempts listed in
//! `fail_attempts`, and otherwise with probability `fail_rate`, drawn from
//! a hash of (seed, path, attempt), so the same plan fails the same way on
//! every run. Failures are retryable. The file it writes names the task,
//! its spec and a hash of each dependency's text, so when a dependency's
//! output changes, so does this file's (and the change propagates
//! downstream through the result cache the way real output would).

use super::{ExecError, ExecInput, ExecOutput, Executor};
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Timing and failure behaviour; none of it changes the file written.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulateSettings {
    /// Time per unit of estimate.
    pub unit: Duration,
    /// Probability in [0, 1] that an attempt fails.
    pub fail_rate: f64,
    /// Attempts (1-based) that always fail.
    pub fail_attempts: Vec<u32>,
    /// Seed of the failure draw.
    pub seed: u64,
}

impl Default for SimulateSettings {
    fn default() -> Self {
        Self {
            unit: Duration::from_millis(100),
            fail_rate: 0.0,
            fail_attempts: Vec::new(),
            seed: 0,
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Simulate {
    settings: SimulateSettings,
}

impl Simulate {
    pub fn new(settings: SimulateSettings) -> Self {
        Self { settings }
    }

    /// Whether this attempt of this task fails, and why.
    pub fn failure(&self, path: &str, attempt: u32) -> Option<String> {
        if self.settings.fail_attempts.contains(&attempt) {
            return Some(format!("simulated failure on attempt {attempt}"));
        }
        let rate = self.settings.fail_rate;
        if rate > 0.0 && draw(self.settings.seed, path, attempt) < rate {
            return Some(format!(
                "simulated failure (rate {rate}) on attempt {attempt}"
            ));
        }
        None
    }
}

/// A number in [0, 1) fixed by (seed, path, attempt).
fn draw(seed: u64, path: &str, attempt: u32) -> f64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(attempt.to_le_bytes());
    h.update(path.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_le_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The line-comment marker for a file, by extension.
fn comment_for(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext {
        "js" | "jsx" | "ts" | "tsx" | "mjs" | "cjs" | "rs" | "go" | "java" | "c" | "h" | "cc"
        | "cpp" | "hpp" | "cs" | "kt" | "swift" | "scala" => "//",
        "sql" | "lua" | "hs" => "--",
        _ => "#",
    }
}

/// The simulated file: a header naming the task, its spec and each
/// dependency's text hash, then the task's content (if any).
pub fn render(input: &ExecInput) -> String {
    let c = comment_for(&input.path);
    let mut out = format!("{c} {}: simulated by devfleet\n", input.path);
    for line in input.spec.lines() {
        out.push_str(&format!("{c} spec: {line}\n"));
    }
    for (path, text) in &input.dependencies {
        let hash = hex::encode(Sha256::digest(text.as_bytes()));
        out.push_str(&format!("{c} uses {path} ({})\n", &hash[..12]));
    }
    if let Some(content) = &input.content {
        out.push_str(content);
        if !content.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

#[async_trait]
impl Executor for Simulate {
    fn identity(&self) -> String {
        // Timing and failures do not change the output.
        "simulate/1".to_owned()
    }

    async fn run(&self, input: &ExecInput) -> Result<ExecOutput, ExecError> {
        let time = self.settings.unit.saturating_mul(input.estimate.max(1));
        if !time.is_zero() {
            tokio::time::sleep(time).await;
        }
        if let Some(reason) = self.failure(&input.path, input.attempt) {
            return Err(ExecError::retryable(reason));
        }
        Ok(ExecOutput::file(render(input)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::test_input;

    fn sim(fail_rate: f64, fail_attempts: Vec<u32>) -> Simulate {
        Simulate::new(SimulateSettings {
            unit: Duration::ZERO,
            fail_rate,
            fail_attempts,
            seed: 7,
        })
    }

    #[tokio::test]
    async fn fails_on_listed_attempts_only() {
        let s = sim(0.0, vec![1, 3]);
        let mut input = test_input("a.py");
        assert!(s.run(&input).await.unwrap_err().retryable);
        input.attempt = 2;
        assert!(s.run(&input).await.is_ok());
        input.attempt = 3;
        assert!(s.run(&input).await.is_err());
    }

    #[test]
    fn failure_draws_are_deterministic_and_near_the_rate() {
        let s = sim(0.3, vec![]);
        let fails = (0..2_000)
            .filter(|i| s.failure(&format!("f{i}.py"), 1).is_some())
            .count();
        assert!((450..750).contains(&fails), "{fails}");
        for i in 0..50 {
            let p = format!("f{i}.py");
            assert_eq!(s.failure(&p, 1), s.failure(&p, 1));
        }
        assert!(sim(0.0, vec![]).failure("x", 1).is_none());
        assert!(sim(1.0, vec![]).failure("x", 1).is_some());
    }

    #[test]
    fn output_changes_with_spec_and_dependency_text_only() {
        let mut a = test_input("src/a.ts");
        a.dependencies
            .insert("src/b.ts".into(), "export const b = 1;\n".into());
        let base = render(&a);
        assert!(base.starts_with("// src/a.ts"), "{base}");
        let mut b = a.clone();
        b.attempt = 4;
        assert_eq!(render(&b), base);
        b.dependencies
            .insert("src/b.ts".into(), "export const b = 2;\n".into());
        assert_ne!(render(&b), base);
        let mut c = a.clone();
        c.spec = "another spec".into();
        assert_ne!(render(&c), base);
    }

    #[tokio::test(start_paused = true)]
    async fn takes_estimate_times_unit() {
        let s = Simulate::new(SimulateSettings {
            unit: Duration::from_millis(50),
            ..SimulateSettings::default()
        });
        let mut input = test_input("a.py");
        input.estimate = 4;
        let start = tokio::time::Instant::now();
        s.run(&input).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(200));
    }
}
