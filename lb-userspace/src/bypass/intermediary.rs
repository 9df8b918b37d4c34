//! The source intermediary's side of an instruction: after `Verifier`'s
//! checks (form, key, tag, age, nonce), the flow must be one this host sent
//! toward the LB, and the backend one of the VIP's current set that may
//! carry it. Only then is the bypass entry written; a refused instruction
//! changes nothing and is counted by its reason.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::Result;
use lb_common::{addr_bytes, FlowKey};

use super::{Flow, Instruction, Kind, Refusal, Verifier};
use crate::{
    balancer::Balancer,
    config::Protocol,
    datapath::{BypassMaps, Datapath},
};

/// What the intermediary's checks read and what an accepted instruction
/// writes: the datapath's tables and the balancer's view of the VIPs.
pub trait Tables {
    /// Whether this host sent the flow toward the LB.
    fn was_sent(&self, key: &FlowKey) -> Result<bool>;
    /// The backend id of `backend` if it is in the flow's VIP's current set,
    /// the VIP has a bypass policy, and the backend may carry the flow.
    fn target(&self, flow: &Flow, backend: IpAddr) -> Option<u32>;
    fn set_entry(&mut self, key: &FlowKey, backend_id: u32) -> Result<()>;
    /// Ends the flow's entry; false if it had none.
    fn remove_entry(&mut self, key: &FlowKey) -> Result<bool>;
}

/// The flow key the datapath uses for `flow` (client → VIP).
pub fn flow_key(flow: &Flow) -> FlowKey {
    let (src, family) = addr_bytes(flow.client.ip());
    let (dst, _) = addr_bytes(flow.vip.ip());
    FlowKey {
        src,
        dst,
        sport: flow.client.port().to_be(),
        dport: flow.vip.port().to_be(),
        proto: flow.protocol,
        family,
        _pad: [0; 2],
    }
}

/// Checks instructions and applies the accepted ones; counts both.
pub struct Intermediary {
    verifier: Verifier,
    refused: BTreeMap<&'static str, u64>,
    accepted: u64,
    revoked: u64,
}

impl Intermediary {
    pub fn new(verifier: Verifier) -> Self {
        Intermediary {
            verifier,
            refused: BTreeMap::new(),
            accepted: 0,
            revoked: 0,
        }
    }

    pub fn verifier_mut(&mut self) -> &mut Verifier {
        &mut self.verifier
    }

    /// One datagram received at `now_ms`.
    pub fn receive(
        &mut self,
        datagram: &[u8],
        now_ms: u64,
        tables: &mut impl Tables,
    ) -> Result<Instruction, Refusal> {
        let result = self.apply(datagram, now_ms, tables);
        match &result {
            Ok(i) if i.kind == Kind::Revoke => self.revoked += 1,
            Ok(_) => self.accepted += 1,
            Err(r) => *self.refused.entry(r.reason()).or_default() += 1,
        }
        result
    }

    fn apply(
        &mut self,
        datagram: &[u8],
        now_ms: u64,
        tables: &mut impl Tables,
    ) -> Result<Instruction, Refusal> {
        let instruction = self.verifier.check(datagram, now_ms)?;
        let key = flow_key(&instruction.flow);
        if !tables.was_sent(&key).map_err(|_| Refusal::Datapath)? {
            return Err(Refusal::UnknownFlow);
        }
        match instruction.kind {
            Kind::Revoke => {
                tables.remove_entry(&key).map_err(|_| Refusal::Datapath)?;
            }
            Kind::Bypass => {
                let id = tables
                    .target(&instruction.flow, instruction.backend)
                    .ok_or(Refusal::WrongBackend)?;
                tables.set_entry(&key, id).map_err(|_| Refusal::Datapath)?;
            }
        }
        Ok(instruction)
    }

    /// Refused instructions by reason (`Refusal::reason`).
    pub fn refused(&self) -> &BTreeMap<&'static str, u64> {
        &self.refused
    }

    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    pub fn revoked(&self) -> u64 {
        self.revoked
    }
}

/// A balancer instance with bypass VIPs and its bypass maps.
pub struct BalancerTables<'a, D: Datapath> {
    pub balancer: &'a Balancer<D>,
    pub maps: &'a mut BypassMaps,
}

impl<D: Datapath> Tables for BalancerTables<'_, D> {
    fn was_sent(&self, key: &FlowKey) -> Result<bool> {
        self.maps.was_sent(key)
    }

    fn target(&self, flow: &Flow, backend: IpAddr) -> Option<u32> {
        let protocol = Protocol::from_number(flow.protocol)?;
        self.balancer
            .bypass_target(flow.vip.ip(), flow.vip.port(), protocol, backend)
    }

    fn set_entry(&mut self, key: &FlowKey, backend_id: u32) -> Result<()> {
        self.maps.set(key, backend_id)
    }

    fn remove_entry(&mut self, key: &FlowKey) -> Result<bool> {
        self.maps.remove(key)
    }
}
