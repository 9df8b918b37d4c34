//! The connection table as the collector reads it: the datapath itself, or
//! (in the agent) a second handle on its map that needs no lock.

use std::os::fd::AsFd as _;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, IterableMap as _, MapData};
use lb_common::{FlowKey, FlowState};

use super::{Datapath, KernelDatapath};

/// The connection table as the collector reads it.
pub trait FlowSource {
    fn scan_flows(&self, each: &mut dyn FnMut(&FlowKey, &FlowState)) -> Result<usize>;
    /// Removes an idle flow unless a packet came since it was scanned
    /// (`last_ns` then moved). Returns whether it was removed.
    fn remove_idle_flow(&mut self, key: &FlowKey, last_ns: u64) -> Result<bool>;
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
/// expires flows without holding the agent's state lock.
pub struct FlowTable {
    flows: HashMap<MapData, FlowKey, FlowState>,
}

impl KernelDatapath {
    pub fn flow_table(&self) -> Result<FlowTable> {
        let fd = self
            .flows
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the connection table's fd")?;
        let data = MapData::from_fd(fd).context("opening the connection table again")?;
        let flows = HashMap::try_from(aya::maps::Map::HashMap(data))
            .context("the connection table has an unexpected type")?;
        Ok(FlowTable { flows })
    }
}

impl FlowSource for FlowTable {
    fn scan_flows(&self, each: &mut dyn FnMut(&FlowKey, &FlowState)) -> Result<usize> {
        super::batch::for_each(self.flows.map(), 8192, |k, v| each(k, v))
            .context("scanning the connection table")
    }

    fn remove_idle_flow(&mut self, key: &FlowKey, last_ns: u64) -> Result<bool> {
        match self.flows.get(key, 0) {
            Ok(state) if state.last_ns != last_ns => return Ok(false),
            Ok(_) => {}
            Err(aya::maps::MapError::KeyNotFound) => return Ok(true),
            Err(e) => return Err(e).context("reading a flow"),
        }
        match self.flows.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(true),
            Err(e) => Err(e).context("removing a flow"),
        }
    }
}
