//! Canary benchmark: one `canary` process driving many deployments at once.
//! Run with `scripts/bench-canary.sh [N]` (starts its own servers); figures
//! in docs/BENCHMARKS.md § Canary.

// The harness shares the integration tests' HTTP service and process
// helpers; their `#[tokio::test]` functions compile out here.
#[path = "../tests/canary.rs"]
#[allow(dead_code, unused_imports)]
mod support;

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(support::bench_one_process_drives_many_deployments());
    Ok(())
}
