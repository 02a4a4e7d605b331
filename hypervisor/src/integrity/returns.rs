//! Return points: where control may legitimately come back to after a
//! crossing between views, and by whom.
//!
//! A return point names the view control returns into, the view it returns
//! from, the address, and the stack pointer the return leaves: a call
//! pushed its return address at RSP, so its `ret` arrives with RSP + 8; an
//! interrupt's `iretq` restores the interrupted RSP. A return is accepted
//! only for that exact (view, view, address, RSP): another module, another
//! task's stack, or a forged frame elsewhere on the stack does not match.
//!
//! Points are kept per kernel stack (16 KiB, aligned), and only those of
//! frames still live: a new point at RSP R on a stack drops the points at
//! or below R there (their frames have unwound), and taking one drops those
//! below it. So the set holds one point per live crossing frame, however
//! many tasks sleep inside modules, and needs no eviction in practice; past
//! [`MAX`] points, the stack used least recently is forgotten (its tasks'
//! returns are then refused, and counted).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::View;

/// A place control may come back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReturnPoint {
    pub into: View,
    pub from: View,
    pub address: u64,
    /// The stack pointer once the return is done.
    pub rsp: u64,
}

/// Kernel stacks are THREAD_SIZE (16 KiB) and aligned to it (the IRQ and
/// exception stacks too): the key that groups a stack's points.
const STACK_SHIFT: u32 = 14;

/// Most points kept: far more crossing frames than a kernel has live.
pub const MAX: usize = 1 << 16;

#[derive(Default)]
struct Stack {
    points: Vec<ReturnPoint>,
    /// When a point was last added or taken here (for the bound).
    used: u64,
}

#[derive(Default)]
pub struct ReturnPoints {
    stacks: BTreeMap<u64, Stack>,
    count: usize,
    clock: u64,
    /// Points forgotten to the bound.
    pub forgotten: u64,
}

impl ReturnPoints {
    fn key(rsp: u64) -> u64 {
        rsp >> STACK_SHIFT
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Records a point; the stack's points at or below it are stale.
    pub fn remember(&mut self, point: ReturnPoint) {
        self.remember_all(&[point]);
    }

    /// Records points of one frame (an interrupted instruction and its
    /// exception fixup share the interrupted RSP).
    pub fn remember_all(&mut self, points: &[ReturnPoint]) {
        let Some(first) = points.first() else { return };
        self.clock += 1;
        let stack = self.stacks.entry(Self::key(first.rsp)).or_default();
        let before = stack.points.len();
        stack.points.retain(|p| p.rsp > first.rsp);
        stack.points.extend(points.iter().filter(|p| Self::key(p.rsp) == Self::key(first.rsp)));
        stack.used = self.clock;
        self.count = self.count + stack.points.len() - before;
        while self.count > MAX {
            self.forget_least_used();
        }
    }

    fn forget_least_used(&mut self) {
        let Some((&key, _)) = self.stacks.iter().min_by_key(|(_, s)| s.used) else { return };
        if let Some(stack) = self.stacks.remove(&key) {
            self.count -= stack.points.len();
            self.forgotten += stack.points.len() as u64;
        }
    }

    /// Takes the point for this return, if there is one: the points below
    /// it on its stack go too.
    pub fn take(&mut self, into: View, from: View, address: u64, rsp: u64) -> bool {
        let key = Self::key(rsp);
        let Some(stack) = self.stacks.get_mut(&key) else { return false };
        let wanted = ReturnPoint { into, from, address, rsp };
        if !stack.points.contains(&wanted) {
            return false;
        }
        let before = stack.points.len();
        // This frame's points (an interrupt's fixup twin) and the ones below go.
        stack.points.retain(|p| p.rsp > rsp);
        self.clock += 1;
        stack.used = self.clock;
        self.count -= before - stack.points.len();
        if stack.points.is_empty() {
            self.stacks.remove(&key);
        }
        true
    }

    /// The module whose call is the nearest one live on this stack above
    /// `rsp`: the kernel code running here runs on that module's behalf.
    pub fn caller_on_stack(&self, rsp: u64) -> Option<u32> {
        let stack = self.stacks.get(&Self::key(rsp))?;
        let nearest = stack.points.iter().filter(|p| p.rsp > rsp).min_by_key(|p| p.rsp)?;
        match (nearest.into, nearest.from) {
            (View::Module(m), _) => Some(m),
            // The kernel called a module which is still running (or which
            // called the kernel deeper down): not a module's deputy here.
            _ => None,
        }
    }

    /// A module is gone: no return into or from it remains.
    pub fn forget(&mut self, view: View) {
        for stack in self.stacks.values_mut() {
            let before = stack.points.len();
            stack.points.retain(|p| p.into != view && p.from != view);
            self.count -= before - stack.points.len();
        }
        self.stacks.retain(|_, s| !s.points.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: View = View::Module(1);
    const OTHER: View = View::Module(2);
    const K: View = View::Kernel;
    const STACK_A: u64 = 0xffff_c900_0001_0000;
    const STACK_B: u64 = 0xffff_c900_0002_0000;

    fn point(into: View, from: View, address: u64, rsp: u64) -> ReturnPoint {
        ReturnPoint { into, from, address, rsp }
    }

    #[test]
    fn a_return_needs_its_own_module_stack_and_depth() {
        let mut r = ReturnPoints::default();
        r.remember(point(M, K, 0x1000, STACK_A + 0x3f00));
        // Another module, another stack, another depth: no.
        assert!(!r.take(OTHER, K, 0x1000, STACK_A + 0x3f00));
        assert!(!r.take(M, K, 0x1000, STACK_B + 0x3f00));
        assert!(!r.take(M, K, 0x1000, STACK_A + 0x3e00));
        assert!(!r.take(M, OTHER, 0x1000, STACK_A + 0x3f00));
        assert!(r.take(M, K, 0x1000, STACK_A + 0x3f00));
        assert!(!r.take(M, K, 0x1000, STACK_A + 0x3f00), "once");
        assert!(r.is_empty());
    }

    #[test]
    fn two_tasks_sleeping_at_the_same_call_site_keep_their_own_points() {
        let mut r = ReturnPoints::default();
        r.remember(point(M, K, 0x1000, STACK_A + 0x3f00));
        r.remember(point(M, K, 0x1000, STACK_B + 0x3f00));
        assert!(r.take(M, K, 0x1000, STACK_B + 0x3f00));
        assert!(r.take(M, K, 0x1000, STACK_A + 0x3f00));
    }

    #[test]
    fn unwound_frames_are_dropped_live_ones_kept() {
        let mut r = ReturnPoints::default();
        // The kernel calls the module (return into the kernel at 0x3f00),
        // the module calls the kernel deeper (return into it at 0x3e00).
        r.remember(point(K, M, 0xa, STACK_A + 0x3f00));
        r.remember(point(M, K, 0xb, STACK_A + 0x3e00));
        assert_eq!(r.len(), 2);
        // A new call at 0x3e00 again: the old one at that depth is stale.
        r.remember(point(M, K, 0xc, STACK_A + 0x3e00));
        assert_eq!(r.len(), 2);
        assert!(!r.take(M, K, 0xb, STACK_A + 0x3e00));
        // Returning at 0x3f00 drops what is below.
        r.remember(point(M, K, 0xd, STACK_A + 0x3d00));
        assert!(r.take(K, M, 0xa, STACK_A + 0x3f00));
        assert!(r.is_empty());
    }

    #[test]
    fn the_kernel_knows_on_whose_behalf_it_runs() {
        let mut r = ReturnPoints::default();
        r.remember(point(K, M, 0xa, STACK_A + 0x3f00));
        assert_eq!(r.caller_on_stack(STACK_A + 0x3e00), None, "the kernel called the module");
        r.remember(point(M, K, 0xb, STACK_A + 0x3e00));
        assert_eq!(r.caller_on_stack(STACK_A + 0x3d00), Some(1), "the module called the kernel");
        assert_eq!(r.caller_on_stack(STACK_B + 0x3d00), None, "another task");
        assert_eq!(r.caller_on_stack(STACK_A + 0x3f80), None, "above the module's call");
    }

    #[test]
    fn the_bound_forgets_the_least_used_stack_and_counts() {
        let mut r = ReturnPoints::default();
        for i in 0..MAX as u64 + 1 {
            r.remember(point(M, K, 1, (STACK_A + (i << STACK_SHIFT)) | 0x100));
        }
        assert_eq!(r.len(), MAX);
        assert_eq!(r.forgotten, 1);
        assert!(!r.take(M, K, 1, STACK_A | 0x100), "the oldest stack was forgotten");
        assert!(r.take(M, K, 1, (STACK_A + ((MAX as u64) << STACK_SHIFT)) | 0x100));
    }

    #[test]
    fn a_gone_module_leaves_no_point() {
        let mut r = ReturnPoints::default();
        r.remember(point(K, M, 0xa, STACK_A + 0x3f00));
        r.remember(point(OTHER, K, 0xb, STACK_B + 0x3f00));
        r.forget(M);
        assert_eq!(r.len(), 1);
        assert!(r.take(OTHER, K, 0xb, STACK_B + 0x3f00));
    }
}
