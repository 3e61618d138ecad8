//! The five defects the fault tests found, as scripted runs of the simulator (each also a
//! real-process test in `tests/safety.rs`). The first topic's voters are servers 1, 2 and 3,
//! led by 1 (placement is predictable).

use super::{Config, Fault};

/// The named scenarios, for `make sim` and the tests.
pub const SCENARIOS: &[&str] = &[
    "cursor-after-failover",
    "replacement-keeps-a-majority",
    "failed-election-retried",
    "power-cut-quick-restart",
    "naming-restart-grace",
];

/// The scripted run called `name`.
pub fn scenario(name: &str, seed: u64) -> Option<Config> {
    use Fault::*;
    let script = match name {
        // A follower down while a consumer acks; the leader dies and the follower returns:
        // the election must not take the cursor back, and a subscription made then must
        // outlive the next failover.
        "cursor-after-failover" => vec![
            (3_000, Crash(2)),
            (6_000, Crash(1)),
            (6_100, Restart(2)),
            (12_000, Crash(3)),
            (12_100, Restart(1)),
            (18_000, Restart(3)),
        ],
        // One voter cut off from the naming server only, another dead, the leader paused
        // just before the replacement: nothing acked may be left on a minority.
        "replacement-keeps-a-majority" => vec![
            (2_000, CutFromNaming(3, true)),
            (2_500, Crash(2)),
            (4_600, Pause(1)),
            (5_200, Restart(2)),
            (9_000, Resume(1)),
            (9_000, CutFromNaming(3, false)),
        ],
        // The leader pauses, then a second voter while the election asks it to promise.
        "failed-election-retried" => {
            vec![(3_000, Pause(1)), (3_550, Pause(2)), (5_500, Resume(1)), (5_500, Resume(2))]
        }
        // The leader loses its unsynced writes and is back within its lease, three times.
        "power-cut-quick-restart" => vec![
            (3_000, Crash(1)),
            (3_300, Restart(1)),
            (7_000, Crash(1)),
            (7_150, Restart(1)),
            (11_000, Crash(1)),
            (11_050, Restart(1)),
        ],
        // The naming server restarts and the leader of every topic reconnects last.
        "naming-restart-grace" => vec![
            (3_000, CutFromNaming(1, true)),
            (3_000, CrashNaming),
            (3_050, RestartNaming),
            (4_500, CutFromNaming(1, false)),
        ],
        _ => return None,
    };
    let servers = if name == "replacement-keeps-a-majority" { 4 } else { 3 };
    Some(Config::scripted(seed, servers, script))
}
