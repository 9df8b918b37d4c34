//! The connection table as the collector reads it: the datapath itself, or
//! (in the agent) a second handle on its map that needs no lock.

use std::sync::Arc;

use anyhow::Result;
use lb_common::{FlowKey, FlowState};

use super::{
    flow_slots::{FlowSlots, Taken},
    Datapath, KernelDatapath,
};

/// The connection table as the collector reads it.
pub trait FlowSource {
    fn scan_flows(&self, each: &mut dyn FnMut(&FlowKey, &FlowState)) -> Result<usize>;
    /// Removes an idle flow unless a packet came since it was scanned
    /// (`last_ns` then moved). Returns whether it was removed.
    fn remove_idle_flow(&mut self, key: &FlowKey, last_ns: u64) -> Result<bool>;
    /// Frees what the removals since the last call took (their flows are
    /// already gone for packets).
    fn settle(&mut self) -> Result<()> {
        Ok(())
    }
}

impl<D: Datapath> FlowSource for D {
    fn scan_flows(&self, each: &mut dyn FnMut(&FlowKey, &FlowState)) -> Result<usize> {
        Datapath::scan_flows(self, each)
    }

    fn remove_idle_flow(&mut self, key: &FlowKey, _: u64) -> Result<bool> {
        self.remove_flow(key)?;
        Ok(true)
    }
}

/// A second handle on the connection table, for the collector: it reads and
/// expires flows without holding the agent's state lock. Removed flows'
/// slots are freed together by `settle`.
pub struct FlowTable {
    slots: Arc<FlowSlots>,
    taken: Vec<u32>,
}

impl KernelDatapath {
    pub fn flow_table(&self) -> Result<FlowTable> {
        Ok(FlowTable {
            slots: self.flow_slots().clone(),
            taken: Vec::new(),
        })
    }
}

impl FlowSource for FlowTable {
    fn scan_flows(&self, each: &mut dyn FnMut(&FlowKey, &FlowState)) -> Result<usize> {
        Ok(self.slots.for_each(each))
    }

    fn remove_idle_flow(&mut self, key: &FlowKey, last_ns: u64) -> Result<bool> {
        match self.slots.take(key, Some(last_ns)) {
            Taken::Slot(i) => {
                self.taken.push(i);
                Ok(true)
            }
            Taken::Absent => Ok(true),
            Taken::Moved => Ok(false),
        }
    }

    fn settle(&mut self) -> Result<()> {
        self.slots.release(&self.taken);
        self.taken.clear();
        Ok(())
    }
}
