//! One module per signal family: each reads its kernel maps or procfs/cgroup files and produces
//! its part of the window summary. Kernel programs live in agent-ebpf/src/<family>.rs.

pub mod cgroup_stats;
pub mod cpu_contention;
pub mod cpu_steal;
pub mod host;
pub mod memory_pressure;
pub mod net;
pub mod psi;
pub mod slots;

use std::collections::HashMap;

/// Counts the windows each key of a kernel map stayed unchanged.
#[derive(Debug)]
pub struct IdleEviction<K> {
    idle: HashMap<K, u32>,
    limit: u32,
}

impl<K: std::hash::Hash + Eq + Copy> IdleEviction<K> {
    pub fn new(limit: u32) -> Self {
        Self {
            idle: HashMap::new(),
            limit: limit.max(1),
        }
    }

    /// This window's keys, each with whether it changed; returns the keys unchanged for the
    /// limit (to evict; they are forgotten here). Keys no longer in the map are forgotten too.
    pub fn observe(&mut self, keys: impl IntoIterator<Item = (K, bool)>) -> Vec<K> {
        let mut next = HashMap::with_capacity(self.idle.len());
        let mut evict = Vec::new();
        for (key, changed) in keys {
            let idle = if changed {
                0
            } else {
                self.idle.get(&key).map_or(1, |n| n + 1)
            };
            if idle >= self.limit {
                evict.push(key);
            } else {
                next.insert(key, idle);
            }
        }
        self.idle = next;
        evict
    }
}
