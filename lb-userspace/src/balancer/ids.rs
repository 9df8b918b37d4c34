//! Fixed ranges of ids (VIPs, backends, Maglev rings) handed out so that a
//! freed id is reused as late as possible.

use std::collections::BTreeSet;

/// Hands out ids from a fixed range, oldest-freed last, so a freed id is
/// reused as late as possible.
#[derive(Debug)]
pub(super) struct IdPool {
    free: BTreeSet<u32>,
    resting: Vec<u32>,
    cursor: u32,
    size: u32,
}

impl IdPool {
    pub(super) fn new(size: u32) -> Self {
        Self {
            free: (0..size).collect(),
            resting: Vec::new(),
            cursor: 0,
            size,
        }
    }

    pub(super) fn available(&self) -> usize {
        self.free.len()
    }

    /// The next free id at or after the cursor, wrapping around.
    pub(super) fn take(&mut self) -> Option<u32> {
        let id = self
            .free
            .range(self.cursor..)
            .next()
            .or_else(|| self.free.iter().next())
            .copied()?;
        self.free.remove(&id);
        self.cursor = (id + 1) % self.size.max(1);
        Some(id)
    }

    /// Marks `id` as in use (adopting a running datapath); false when it is
    /// out of range or already in use.
    pub(super) fn claim(&mut self, id: u32) -> bool {
        self.free.remove(&id)
    }

    pub(super) fn rest(&mut self, id: u32) {
        self.resting.push(id);
    }

    /// Ids given up by the previous apply become usable again.
    pub(super) fn wake(&mut self) {
        self.free.extend(self.resting.drain(..));
    }
}
