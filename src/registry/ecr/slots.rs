//! Upstream slots: how many ECR calls this replica has in flight, for everyone and per caller.
//!
//! A slot is taken by an attempt once its rate-budget slot is granted, just before it leaves
//! for ECR, and given back when ECR's answer arrives: waiting in a budget's queue costs no slot
//! (a caller with 600 listings queued behind a 20/s budget holds none of them), and what the
//! slots bound is what they are for, the calls ECR is working on (each a connection's share,
//! a request body, a task). An attempt that finds no slot is refused at once as OVERLOADED with
//! a retry hint; nothing was sent.
//!
//! Per caller (the call context's principal; a batch is its first caller's, the watch poller
//! its own): at most [`DEFAULT_MAX_UPSTREAM_CALLS_PER_CALLER`] of the replica's slots, so one
//! caller whose calls ECR answers slowly cannot take the slots every other caller's misses
//! need.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// ECR answers in tens of milliseconds and the ECR backend batches up to 100 reads a call, so
/// 512 calls in flight already ask more than BatchGetImage's 2,000/s of ECR.
pub const DEFAULT_MAX_UPSTREAM_CALLS: usize = 512;
/// Half the replica's slots: a lone caller at the default BatchGetImage pace (1,800/s) against
/// ECR answering in 50 ms keeps 90 calls in flight, well under this, and one caller never
/// holds the other half. Without an identity source every caller is `anonymous`, one caller,
/// so this is then what all callers share.
pub const DEFAULT_MAX_UPSTREAM_CALLS_PER_CALLER: usize = DEFAULT_MAX_UPSTREAM_CALLS / 2;

/// An attempt found no slot; nothing was sent.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum SlotsFull {
    /// The replica has `--max-upstream-calls` ECR calls in flight.
    #[error("the replica has {0} ECR calls in flight, its limit")]
    Replica(usize),
    /// This caller has `--max-upstream-calls-per-caller` ECR calls in flight.
    #[error("this caller has {0} ECR calls in flight, its limit")]
    Caller(usize),
}

/// The replica's upstream slots.
#[derive(Debug)]
pub struct UpstreamSlots {
    limit: usize,
    per_caller: usize,
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    total: usize,
    /// Callers with calls in flight; a caller leaves the map with its last slot.
    by_caller: HashMap<Arc<str>, usize>,
}

impl UpstreamSlots {
    /// `limit` slots, at most `per_caller` of them for one caller (both at least 1).
    pub fn new(limit: usize, per_caller: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            per_caller: per_caller.clamp(1, limit.max(1)),
            taken: Mutex::default(),
        })
    }

    /// A slot for `caller` (the call context's [`caller_key`](crate::domain::call::caller_key)), or why there is none.
    pub fn take(self: &Arc<Self>, caller: Arc<str>) -> Result<Slot, SlotsFull> {
        let mut taken = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        if taken.total >= self.limit {
            return Err(SlotsFull::Replica(self.limit));
        }
        let mine = taken.by_caller.entry(Arc::clone(&caller)).or_default();
        if *mine >= self.per_caller {
            return Err(SlotsFull::Caller(self.per_caller));
        }
        *mine += 1;
        taken.total += 1;
        Ok(Slot {
            slots: Arc::clone(self),
            caller,
        })
    }

    /// Slots in flight now.
    pub fn in_flight(&self) -> usize {
        self.taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

/// One ECR call in flight; the slot is given back when this is dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<UpstreamSlots>,
    caller: Arc<str>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self
            .slots
            .taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        taken.total = taken.total.saturating_sub(1);
        if let Some(mine) = taken.by_caller.get_mut(&self.caller) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                taken.by_caller.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One caller reaches its own limit while the replica still has room for others; the
    /// replica's limit holds across callers; slots come back when dropped.
    #[test]
    fn a_caller_gets_its_share_and_no_more() {
        let slots = UpstreamSlots::new(4, 2);
        let a: Vec<Slot> = (0..2)
            .map(|_| slots.take(Arc::from("a")).unwrap())
            .collect();
        assert_eq!(
            slots.take(Arc::from("a")).unwrap_err(),
            SlotsFull::Caller(2)
        );
        let b: Vec<Slot> = (0..2)
            .map(|_| slots.take(Arc::from("b")).unwrap())
            .collect();
        assert_eq!(
            slots.take(Arc::from("c")).unwrap_err(),
            SlotsFull::Replica(4)
        );
        drop(a);
        assert_eq!(slots.in_flight(), 2);
        assert!(slots.take(Arc::from("c")).is_ok());
        drop(b);
        assert_eq!(slots.in_flight(), 0);
        assert!(slots.taken.lock().unwrap().by_caller.is_empty());
    }
}
