//! The call/return event list the WGL search walks, as an index-based doubly
//! linked list with O(1) lift/unlift.

use super::op::Operation;

/// Sentinel node at the front of the list.
const HEAD: usize = 0;

/// Call and return events of the *definite* ops of one partition, sorted by
/// time, linked so the search can temporarily remove ("lift") a linearized
/// op's two events and put them back ("unlift") when backtracking. Info ops
/// are not in this list: they never return, so the search keeps them apart
/// and tries them only after the definite candidates (see `search.rs`).
///
/// Ordering rules, chosen so the checker never reports a false violation:
/// * events sort by timestamp;
/// * at equal timestamps **calls come before returns**, i.e. an op that
///   returns at `t` and an op invoked at `t` are treated as concurrent. This is
///   the permissive (safe) choice: clocks with coarse resolution can stamp a
///   causally later invoke with the same time as an earlier completion, and
///   ordering the return first would then demand a real-time order that may
///   not exist. The cost is that a violation visible only through two events
///   with identical timestamps is not detected.
///
/// Nodes are array indices: `0` is the head sentinel, `1..=2n` are the events
/// in sorted order (that order never changes, only the links do) and `2n + 1`
/// is the tail sentinel.
pub(crate) struct EventList {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Op id of each node (sentinels: `usize::MAX`).
    op: Vec<usize>,
    /// For a call node, its matching return node; for a return node, itself.
    matching: Vec<usize>,
    is_call: Vec<bool>,
    tail: usize,
}

impl EventList {
    /// Builds the sorted, fully linked list for `ops` (op id = slice index);
    /// an op without a completion (never passed by the search) would return
    /// at the end of time.
    pub(crate) fn new(ops: &[&Operation]) -> Self {
        // (time, is_return, op id)
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (id, op) in ops.iter().enumerate() {
            events.push((op.invoke, false, id));
            let complete = op.effective_complete().unwrap_or(u64::MAX);
            events.push((complete.max(op.invoke), true, id));
        }
        events.sort_unstable();

        let len = events.len() + 2;
        let tail = len - 1;
        let mut list = EventList {
            next: (1..=len).collect(),
            prev: (0..len).map(|i| i.wrapping_sub(1)).collect(),
            op: vec![usize::MAX; len],
            matching: (0..len).collect(),
            is_call: vec![false; len],
            tail,
        };
        let mut call_node = vec![usize::MAX; ops.len()];
        for (pos, &(_, is_return, id)) in events.iter().enumerate() {
            let node = pos + 1;
            list.op[node] = id;
            if is_return {
                if let Some(&c) = call_node.get(id) {
                    if let Some(m) = list.matching.get_mut(c) {
                        *m = node;
                    }
                }
            } else {
                list.is_call[node] = true;
                if let Some(c) = call_node.get_mut(id) {
                    *c = node;
                }
            }
        }
        list
    }

    /// True when every event has been lifted (all ops linearized).
    pub(crate) fn is_empty(&self) -> bool {
        self.next[HEAD] == self.tail
    }

    /// First live node (the tail sentinel when empty).
    pub(crate) fn first(&self) -> usize {
        self.next[HEAD]
    }

    /// Node after `node`.
    pub(crate) fn next(&self, node: usize) -> usize {
        self.next[node]
    }

    /// Whether `node` is the tail sentinel.
    pub(crate) fn is_tail(&self, node: usize) -> bool {
        node == self.tail
    }

    /// Op id of `node`.
    pub(crate) fn op(&self, node: usize) -> usize {
        self.op[node]
    }

    /// Whether `node` is a call event.
    pub(crate) fn is_call(&self, node: usize) -> bool {
        self.is_call[node]
    }

    /// Unlinks a call node and its matching return node.
    pub(crate) fn lift(&mut self, call: usize) {
        let ret = self.matching[call];
        self.unlink(call);
        self.unlink(ret);
    }

    /// Relinks what [`EventList::lift`] removed; must be called in exact
    /// reverse order of lifts (the search's stack discipline guarantees it).
    pub(crate) fn unlift(&mut self, call: usize) {
        let ret = self.matching[call];
        self.relink(ret);
        self.relink(call);
    }

    fn unlink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = n;
        self.prev[n] = p;
    }

    fn relink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        self.prev[n] = node;
    }

    /// Op id of the first live return event: the pending op that must be
    /// linearized first; `None` when the list is empty.
    pub(crate) fn first_return(&self) -> Option<usize> {
        let mut node = self.first();
        while node != self.tail {
            if !self.is_call[node] {
                return Some(self.op[node]);
            }
            node = self.next[node];
        }
        None
    }

    /// Event nodes in time order, regardless of what is lifted.
    pub(crate) fn nodes_in_time_order(&self) -> std::ops::Range<usize> {
        1..self.tail
    }
}
