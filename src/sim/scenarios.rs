//! The five defects the fault tests found, and the naming group's hardest moments, as
//! scripted runs of the simulator (the defects are also real-process tests in
//! `tests/safety.rs`, the naming group's in `tests/naming_group.rs`). The first topic's
//! voters are servers 1, 2 and 3, led by 1 (placement is predictable).

use super::{Config, Fault};

/// The named scenarios, for `make sim` and the tests.
pub const SCENARIOS: &[&str] = &[
    "cursor-after-failover",
    "replacement-keeps-a-majority",
    "failed-election-retried",
    "power-cut-quick-restart",
    "naming-restart-grace",
    "naming-leader-dies-with-topic-leader",
    "naming-leader-dies-mid-election",
    "naming-minority-partition",
    "naming-member-wiped",
    "naming-wiped-member-elects-no-stale-one",
    "preferred-leader-returns",
    "damaged-chunk-on-the-leader",
    "damaged-chunk-found-at-restart",
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
        // The naming server (a group of one) restarts and the leader of every topic
        // reconnects last.
        "naming-restart-grace" => vec![
            (3_000, CutFromNaming(1, true)),
            (3_000, CrashNaming(1)),
            (3_050, RestartNaming(1)),
            (4_500, CutFromNaming(1, false)),
        ],
        // The naming leader and a topic leader die at the same instant.
        "naming-leader-dies-with-topic-leader" => {
            vec![(3_000, Crash(1)), (3_000, CrashNaming(0)), (9_000, Restart(1)), (9_000, RestartNaming(0))]
        }
        // The topic leader dies; the naming leader dies once the election is under way (its
        // epoch committed, promises asked), and again under its successor.
        "naming-leader-dies-mid-election" => vec![
            (3_000, Crash(1)),
            (4_100, CrashNaming(0)),
            (6_500, CrashNaming(0)),
            (7_000, RestartNaming(0)),
            (9_000, Restart(1)),
        ],
        // The naming leader is cut off from everyone: the majority elects another and goes
        // on (a topic leader dies meanwhile); the old one changes nothing.
        "naming-minority-partition" => vec![
            (3_000, IsolateNaming(0, true)),
            (4_000, Crash(1)),
            (8_000, IsolateNaming(0, false)),
            (9_000, Restart(1)),
        ],
        // A naming member loses its data directory and is rebuilt from the others, then the
        // topic leader dies (the rebuilt member must count toward the naming majority).
        "naming-member-wiped" => vec![
            (3_000, WipeNaming(2)),
            (3_500, RestartNaming(2)),
            (6_000, CrashNaming(3)),
            (6_500, Crash(1)),
            (10_000, RestartNaming(3)),
            (10_000, Restart(1)),
        ],
        // Member 3 falls behind (cut off while a topic fails over); member 2 loses its disk;
        // the leader dies. Member 2, rebuilding, must not elect the stale member 3: the
        // group waits for member 1 and the book never goes back.
        "naming-wiped-member-elects-no-stale-one" => vec![
            (2_000, IsolateNaming(3, true)),
            (3_000, Crash(1)),
            (7_000, WipeNaming(2)),
            (7_000, Crash(2)),
            (7_500, IsolateNaming(3, false)),
            (7_500, CrashNaming(1)),
            (7_500, RestartNaming(2)),
            (7_600, Restart(1)),
            (12_000, RestartNaming(1)),
            (13_000, Restart(2)),
        ],
        // The leader (the topic's preferred leader) dies while producers write and is back
        // before it would be replaced; twice. Each time, once it has caught up and stayed
        // alive for the pause, leadership moves back to it, keeping every acked record.
        "preferred-leader-returns" => {
            vec![(2_000, Crash(1)), (3_500, Restart(1)), (12_000, Pause(1)), (13_200, Resume(1))]
        }
        // F19: the preferred leader dies; a bit flips in the new leader's newest committed
        // chunk, one the old leader never stored. When it returns, it can catch up (and
        // take its leadership back) only once the new leader has put a good copy, from the
        // third replica, in place of its own: a damaged chunk is never shipped.
        "damaged-chunk-on-the-leader" => {
            vec![(2_000, Crash(1)), (4_000, DamageChunk(0, 0)), (4_100, Restart(1))]
        }
        // F19: a bit flips in a follower's chunk; the scrub at its restart finds it and a
        // peer's copy replaces it; then the leader dies and that follower may lead.
        "damaged-chunk-found-at-restart" => vec![
            (1_000, DamageChunk(2, 0)),
            (1_100, Crash(2)),
            (1_200, Restart(2)),
            (1_300, Crash(1)),
            (6_000, Restart(1)),
        ],
        _ => return None,
    };
    let servers = if name == "replacement-keeps-a-majority" { 4 } else { 3 };
    let naming_members = if name.starts_with("naming-") && name != "naming-restart-grace" { 3 } else { 1 };
    let mut config = Config::scripted(seed, servers, naming_members, script);
    // Consumers lag, so committed chunks are still stored (unread) when a bit flips, and
    // still unread by the time a restarted follower asks a peer for one.
    match name {
        "damaged-chunk-on-the-leader" | "damaged-chunk-found-at-restart" => {
            config.consumer_pause_ms = 1_500;
            // Producers write all along, so the chunk damaged is one the dead leader lacks.
            config.producer_pause_ms = 150;
        }
        _ => {}
    }
    Some(config)
}
