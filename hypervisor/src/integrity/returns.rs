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
//! Points are kept per kernel stack, and only those of frames still live.
//! A task's stack is 16 KiB, aligned; each CPU's interrupt and exception
//! stacks are not (vmap'd page-aligned, or single pages between guard
//! pages in the CPU entry area), and are known by their exact extents
//! ([`ReturnPoints::set_extents`]), so that two of them never share one
//! 16 KiB window's points, nor one of them two windows'.
//! A new point at RSP R on a stack drops the points at
//! or below R there (their frames have unwound), and taking one drops those
//! below it. So the set holds one point per live crossing frame, however
//! many tasks sleep inside modules, and needs no eviction in practice; past
//! [`MAX`] points, the stack used least recently is forgotten (its tasks'
//! returns are then refused, and counted).
//!
//! The same points say whose frames a stack holds: the bytes between two
//! live crossings belong to the code that runs between them, so a module's
//! view may write its own frames and nothing of the kernel's above them
//! (see [`ReturnPoints::owner`]). A call into a module may hand it pointers
//! into the kernel's frames (`dev_get_stats`' result, a `read`'s position):
//! those out-parameters are recorded with the call ([`ReturnPoints::window`]).
//!
//! A module's call to a write-through function (see `super::deputy`) is
//! held here too while it runs ([`InFlight`]), by the frame it returns to:
//! the bytes its verdict was read from must not change until it returns,
//! and it ends with that frame, as the frame's return point does.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::layout::Range;
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

/// A task's kernel stack is THREAD_SIZE (16 KiB) and aligned to it.
const STACK_SHIFT: u32 = 14;

/// The task stack (16 KiB, aligned) that would hold `addr`.
pub fn task_stack_of(addr: u64) -> Range {
    let base = addr & !((1 << STACK_SHIFT) - 1);
    Range::new(base, base.saturating_add(1 << STACK_SHIFT))
}

/// The most an out-parameter reaches (a kernel frame's object is smaller).
const MAX_OUT_PARAMETER: u64 = 4096;

/// The out-parameter a call into a module at stack pointer `rsp` (its
/// return address is there) hands it in `arg`, if `arg` points into the
/// caller's frames on the same stack: from `arg` up to the first word above
/// it that holds a return address (the frame's own, which the object lies
/// below), at most [`MAX_OUT_PARAMETER`] bytes and never past the stack.
/// `words` are the stack's words from `arg` rounded down to 8 bytes on.
/// What a frame keeps between its object and its return address (its
/// other locals, the registers it saved) is inside the window.
/// `stack` is the stack `rsp` is on.
pub fn out_parameter(
    arg: u64,
    rsp: u64,
    stack: Range,
    words: &[u64],
    is_return_address: impl Fn(u64) -> bool,
) -> Option<Range> {
    if !stack.contains(arg) || arg < rsp.saturating_add(8) {
        return None;
    }
    let cap = stack.end.min(arg.saturating_add(MAX_OUT_PARAMETER));
    let first = arg & !7;
    let end = words
        .iter()
        .enumerate()
        .map(|(i, &w)| (first + 8 * i as u64, w))
        .take_while(|&(at, _)| at < cap)
        .find(|&(at, w)| at >= arg && is_return_address(w))
        .map_or(cap, |(at, _)| at);
    (end > arg).then(|| Range::new(arg, end))
}

/// Most points kept: far more crossing frames than a kernel has live.
pub const MAX: usize = 1 << 16;

/// A module's write-through call while the kernel runs it: what its
/// verdict was read from (a format, pointers on the stack, a `seq_file`)
/// and what it writes, both guest-physical. No module may write the first
/// and no other such call may write it; no other such call may be judged
/// by the second (it changes as that call runs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    pub module: u32,
    pub inputs: Vec<Range>,
    pub writes: Vec<Range>,
}

/// Most write-through calls held at once: one per task inside one, and a
/// call whose task never came back lingers only until its stack is used
/// again. Past it a call is refused, not let run unheld.
pub const MAX_IN_FLIGHT: usize = 1024;

#[derive(Default)]
struct Stack {
    /// Live points, deepest last.
    points: Vec<ReturnPoint>,
    /// Out-parameters handed at calls into modules: the point's RSP, the
    /// module, and the kernel bytes it may write.
    windows: Vec<(u64, View, Range)>,
    /// When a point was last added or taken here (for the bound).
    used: u64,
}

impl Stack {
    /// The frames at or below `rsp` have unwound: what they held goes.
    /// Returns the number of points gone.
    fn unwind(&mut self, rsp: u64) -> usize {
        let points = self.points.len();
        self.points.retain(|p| p.rsp > rsp);
        self.windows.retain(|w| w.0 > rsp);
        points - self.points.len()
    }
}

/// A write-through call held: its stack (by base), the RSP it returns
/// with, and what it holds.
#[derive(Debug)]
struct Held {
    stack: u64,
    rsp: u64,
    call: InFlight,
}

#[derive(Default)]
pub struct ReturnPoints {
    /// Each stack's points, by the stack's base.
    stacks: BTreeMap<u64, Stack>,
    /// The stacks that are not a task's 16 KiB window, sorted, disjoint.
    extents: Vec<Range>,
    count: usize,
    /// Write-through calls held, on all stacks (few at a time: looked
    /// through at every write a module's view takes).
    calls: Vec<Held>,
    clock: u64,
    /// Points forgotten to the bound.
    pub forgotten: u64,
}

impl ReturnPoints {
    /// The stacks known by their exact extents (each CPU's interrupt and
    /// exception stacks); any other address is on a task's 16 KiB window.
    /// The same extent named twice counts once; overlapping extents are
    /// refused (`false`), and nothing changes.
    pub fn set_extents(&mut self, mut extents: Vec<Range>) -> bool {
        extents.retain(|r| !r.is_empty());
        extents.sort_unstable_by_key(|r| r.start);
        extents.dedup();
        if extents.windows(2).any(|w| w[0].end > w[1].start) {
            return false;
        }
        self.extents = extents;
        true
    }

    /// The kernel stack that holds `addr`: an extent, or else the task
    /// stack window.
    pub fn stack_of(&self, addr: u64) -> Range {
        self.extent_of(addr).unwrap_or_else(|| task_stack_of(addr))
    }

    /// The CPU's interrupt or exception stack that holds `addr`, if any.
    fn extent_of(&self, addr: u64) -> Option<Range> {
        let i = self.extents.partition_point(|r| r.start <= addr);
        i.checked_sub(1).map(|i| self.extents[i]).filter(|r| r.contains(addr))
    }

    /// Whether crossings are live on the task stack window holding `addr`
    /// (not a CPU's interrupt or exception stack).
    pub fn crossings_on_task_window(&self, addr: u64) -> bool {
        self.extent_of(addr).is_none() && self.stacks.contains_key(&task_stack_of(addr).start)
    }

    /// The task that owned the stack holding `addr` is gone: what its
    /// crossings left there goes too.
    pub fn forget_stack(&mut self, addr: u64) {
        let key = self.key(addr);
        if let Some(stack) = self.stacks.remove(&key) {
            self.count -= stack.points.len();
        }
        self.calls.retain(|c| c.stack != key);
    }

    /// Whether two addresses lie on the same kernel stack.
    pub fn same_stack(&self, a: u64, b: u64) -> bool {
        self.stack_of(a) == self.stack_of(b)
    }

    fn key(&self, rsp: u64) -> u64 {
        self.stack_of(rsp).start
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
        let key = self.key(first.rsp);
        let same: Vec<ReturnPoint> = points.iter().filter(|p| self.key(p.rsp) == key).copied().collect();
        self.clock += 1;
        let stack = self.stacks.entry(key).or_default();
        let points = stack.unwind(first.rsp);
        let added = same.len();
        stack.points.extend(same);
        stack.used = self.clock;
        self.count = self.count + added - points;
        self.unwind_calls(key, first.rsp);
        while self.count > MAX {
            self.forget_least_used();
        }
    }

    /// Forgets the stack used least recently, one holding no write-through
    /// call if there is one (forgetting a call would free what it holds).
    fn forget_least_used(&mut self) {
        let holds = |key: &u64| self.calls.iter().any(|c| c.stack == *key);
        let unheld = self.stacks.iter().filter(|(k, _)| !holds(k)).min_by_key(|(_, s)| s.used);
        let Some((&key, _)) = unheld.or_else(|| self.stacks.iter().min_by_key(|(_, s)| s.used)) else { return };
        if let Some(stack) = self.stacks.remove(&key) {
            self.count -= stack.points.len();
            self.forgotten += stack.points.len() as u64;
        }
    }

    /// Takes the point for this return, if there is one: the points below
    /// it on its stack go too.
    pub fn take(&mut self, into: View, from: View, address: u64, rsp: u64) -> bool {
        let key = self.key(rsp);
        let Some(stack) = self.stacks.get_mut(&key) else { return false };
        let wanted = ReturnPoint { into, from, address, rsp };
        if !stack.points.contains(&wanted) {
            return false;
        }
        // This frame's points (an interrupt's fixup twin) and the ones below go.
        self.count -= stack.unwind(rsp);
        self.clock += 1;
        stack.used = self.clock;
        if stack.points.is_empty() {
            self.stacks.remove(&key);
        }
        self.unwind_calls(key, rsp);
        true
    }

    /// The calls held on stack `key` at or below `rsp` have returned.
    fn unwind_calls(&mut self, key: u64, rsp: u64) {
        if !self.calls.is_empty() {
            self.calls.retain(|c| c.stack != key || c.rsp > rsp);
        }
    }

    /// Holds a module's write-through call that returns with RSP `rsp`
    /// until that frame unwinds; `false` (nothing held) past
    /// [`MAX_IN_FLIGHT`].
    pub fn hold_call(&mut self, rsp: u64, call: InFlight) -> bool {
        if !self.can_hold_call() {
            return false;
        }
        self.calls.push(Held { stack: self.key(rsp), rsp, call });
        true
    }

    /// Whether another call can be held.
    pub fn can_hold_call(&self) -> bool {
        self.calls.len() < MAX_IN_FLIGHT
    }

    fn held(&self) -> impl Iterator<Item = &InFlight> {
        self.calls.iter().map(|c| &c.call)
    }

    /// Whether `bytes` (guest-physical) reach into what a call held was
    /// judged by.
    pub fn holds_input(&self, bytes: Range) -> bool {
        self.held().any(|c| c.inputs.iter().any(|r| r.overlaps(&bytes)))
    }

    /// The bytes of guest-physical `page` that calls held were judged by.
    pub fn inputs_on(&self, page: u64) -> Vec<Range> {
        let whole = Range::new(page, page + 0x1000);
        let clip = |r: &Range| Range::new(r.start.max(whole.start), r.end.min(whole.end));
        self.held().flat_map(|c| c.inputs.iter().filter(|r| r.overlaps(&whole)).map(clip)).collect()
    }

    /// The first guest-physical byte a new call (judged by `inputs`,
    /// writing `writes`) and the calls held disagree on: one it would write
    /// that a held call was judged by, or one it was judged by that a held
    /// call writes.
    pub fn conflict(&self, inputs: &[Range], writes: &[Range]) -> Option<u64> {
        let first = |mine: &[Range], theirs: &[Range]| {
            mine.iter().flat_map(|a| theirs.iter().filter(|b| a.overlaps(b)).map(move |b| a.start.max(b.start))).min()
        };
        self.held().filter_map(|c| first(writes, &c.inputs).into_iter().chain(first(inputs, &c.writes)).min()).min()
    }

    /// Records a call from the kernel into `point.from`, with the
    /// out-parameters it hands the module in the kernel's frames.
    pub fn remember_call(&mut self, point: ReturnPoint, out: &[Range]) {
        self.remember(point);
        let key = self.key(point.rsp);
        if let Some(stack) = self.stacks.get_mut(&key) {
            stack.windows.extend(out.iter().map(|&r| (point.rsp, point.from, r)));
        }
    }

    /// Whose frames hold stack byte `addr`, and the run of bytes around it
    /// that are theirs: `None` when no crossing is live on that stack.
    ///
    /// Below the deepest point run the frames of the code that was called
    /// there (`from`); between two points, those of the code that the lower
    /// one returns into, which must be the code the upper one called (else
    /// the kernel's: a run two points disagree about is no module's); above
    /// the highest, those of the code it returns into. A point's own return
    /// address belongs to the code it returns into.
    pub fn owner(&self, addr: u64) -> Option<(View, Range)> {
        let whole = self.stack_of(addr);
        let stack = self.stacks.get(&whole.start)?;
        let slot = |p: &ReturnPoint| p.rsp.wrapping_sub(8);
        // The deepest point whose slot lies above addr, and the highest at or below it.
        let above = stack.points.iter().filter(|p| slot(p) > addr).min_by_key(|p| p.rsp);
        let below = stack.points.iter().filter(|p| slot(p) <= addr).max_by_key(|p| p.rsp);
        let run = Range::new(below.map_or(whole.start, slot), above.map_or(whole.end, slot));
        let owner = match (below, above) {
            (None, Some(a)) => a.from,
            (Some(b), None) => b.into,
            (Some(b), Some(a)) if b.into == a.from => b.into,
            (Some(_), Some(_)) => View::Kernel,
            (None, None) => return None,
        };
        Some((owner, run))
    }

    /// The out-parameter handed to module `view` on `addr`'s stack that
    /// holds `addr`, if any.
    pub fn window(&self, view: View, addr: u64) -> Option<Range> {
        let stack = self.stacks.get(&self.key(addr))?;
        stack.windows.iter().find(|w| w.1 == view && w.2.contains(addr)).map(|w| w.2)
    }

    /// The module whose call is the nearest one live on this stack above
    /// `rsp`: the kernel code running here runs on that module's behalf.
    pub fn caller_on_stack(&self, rsp: u64) -> Option<u32> {
        let stack = self.stacks.get(&self.key(rsp))?;
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
            stack.windows.retain(|w| w.1 != view);
            self.count -= before - stack.points.len();
        }
        self.stacks.retain(|_, s| !s.points.is_empty());
        self.calls.retain(|c| View::Module(c.call.module) != view);
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

    fn call(inputs: &[Range], writes: &[Range]) -> InFlight {
        InFlight { module: 1, inputs: inputs.to_vec(), writes: writes.to_vec() }
    }

    /// A write-through call is held until its frame unwinds: by its
    /// return, by a new crossing at or above it, or by its module's going;
    /// never by the bound on points.
    #[test]
    fn a_call_in_flight_is_held_until_its_frame_unwinds() {
        let fmt = Range::new(0x5000, 0x5004);
        let buf = Range::new(0x6000, 0x6100);
        let mut r = ReturnPoints::default();
        r.remember(point(M, K, 0xb, STACK_A + 0x3e00));
        assert!(r.hold_call(STACK_A + 0x3e00, call(&[fmt], &[buf])));
        assert!(r.holds_input(Range::new(0x5003, 0x5008)) && !r.holds_input(Range::new(0x5004, 0x5008)));
        assert_eq!(r.inputs_on(0x5000), [fmt]);
        // Another call that would write the format, or be judged by the buffer.
        assert_eq!(r.conflict(&[], &[Range::new(0x4ff0, 0x5010)]), Some(0x5000));
        assert_eq!(r.conflict(&[Range::new(0x6080, 0x6081)], &[]), Some(0x6080));
        assert_eq!(r.conflict(&[Range::new(buf.end, buf.end + 1)], &[Range::new(fmt.end, fmt.end + 4)]), None);
        // A crossing deeper on the stack (the call interrupted) keeps it.
        r.remember(point(K, M, 0xc, STACK_A + 0x3c00));
        assert!(r.holds_input(fmt));
        // Its return takes it.
        assert!(r.take(M, K, 0xb, STACK_A + 0x3e00));
        assert!(!r.holds_input(fmt) && r.conflict(&[buf], &[fmt]).is_none());
        // A call that never came back goes once its stack is used above it.
        assert!(r.hold_call(STACK_A + 0x3e00, call(&[fmt], &[])));
        r.remember(point(M, K, 0xd, STACK_A + 0x3d00));
        assert!(r.holds_input(fmt));
        r.remember(point(M, K, 0xe, STACK_A + 0x3f00));
        assert!(!r.holds_input(fmt));
        // Its module's going takes it.
        assert!(r.hold_call(STACK_B + 0x3e00, call(&[fmt], &[])));
        r.forget(OTHER);
        assert!(r.holds_input(fmt));
        r.forget(M);
        assert!(!r.holds_input(fmt));
        // Points past the bound forget other stacks first.
        assert!(r.hold_call(STACK_B + 0x3e00, call(&[fmt], &[])));
        r.remember(point(M, K, 0xf, STACK_B + 0x3f00 - 0x1000));
        for i in 0..MAX as u64 {
            r.remember(point(M, K, i, 0xffff_c900_1000_0000 + (i << 14) + 0x3f00));
        }
        assert!(r.forgotten > 0);
        assert!(r.holds_input(fmt), "held through the bound");
        // Past the most calls held, no more.
        let mut r = ReturnPoints::default();
        for i in 0..MAX_IN_FLIGHT as u64 {
            assert!(r.hold_call(STACK_A + 0x3000 + i, call(&[fmt], &[])));
        }
        assert!(!r.can_hold_call() && !r.hold_call(STACK_B, call(&[fmt], &[])));
    }

    /// An interrupt stack is no task's, even where its extent is one
    /// aligned 16 KiB window (x86-64 vmaps each CPU's so): no end-of-stack
    /// mark makes it a dead task's.
    #[test]
    fn only_a_task_window_has_a_task_to_die() {
        let mut r = ReturnPoints::default();
        assert!(r.set_extents(vec![Range::new(STACK_B, STACK_B + 0x4000)]));
        r.remember(point(M, K, 0x1, STACK_A + 0x3e00));
        r.remember(point(M, K, 0x2, STACK_B + 0x3e00));
        assert!(r.crossings_on_task_window(STACK_A + 0x100));
        assert!(!r.crossings_on_task_window(STACK_B + 0x100), "an interrupt stack");
        assert!(!r.crossings_on_task_window(STACK_A + 0x4100), "no crossing there");
        r.forget_stack(STACK_A + 0x100);
        assert!(!r.crossings_on_task_window(STACK_A + 0x100));
        assert_eq!(r.len(), 1);
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

    #[test]
    fn frames_belong_to_the_code_between_two_crossings() {
        let mut r = ReturnPoints::default();
        assert_eq!(r.owner(STACK_A + 0x3000), None, "no crossing live: unknown");
        // The kernel calls M (its return address at 0x3f00), M calls the
        // kernel (at 0x3e00), which calls OTHER (at 0x3d00).
        r.remember(point(K, M, 0xa, STACK_A + 0x3f08));
        r.remember(point(M, K, 0xb, STACK_A + 0x3e08));
        r.remember(point(K, OTHER, 0xc, STACK_A + 0x3d08));
        let whole_top = STACK_A + 0x4000;
        assert_eq!(
            r.owner(STACK_A + 0x3f00),
            Some((K, Range::new(STACK_A + 0x3f00, whole_top))),
            "the kernel's return address"
        );
        assert_eq!(r.owner(STACK_A + 0x3e80), Some((M, Range::new(STACK_A + 0x3e00, STACK_A + 0x3f00))));
        assert_eq!(r.owner(STACK_A + 0x3d80), Some((K, Range::new(STACK_A + 0x3d00, STACK_A + 0x3e00))));
        assert_eq!(r.owner(STACK_A + 0x100), Some((OTHER, Range::new(STACK_A, STACK_A + 0x3d00))));
        // Two points that disagree about a run leave it to the kernel.
        let mut odd = ReturnPoints::default();
        odd.remember(point(K, M, 0xa, STACK_A + 0x3f08));
        odd.remember(point(OTHER, K, 0xb, STACK_A + 0x3e08));
        assert_eq!(odd.owner(STACK_A + 0x3e80).map(|o| o.0), Some(K));
    }

    #[test]
    fn an_out_parameter_ends_below_the_frames_return_address() {
        let rsp = STACK_A + 0x3e00;
        let ret = 0xffff_ffff_8100_0000;
        // Words from rsp: its return address, then a frame's object at
        // +0x20, a saved register at +0x38, the frame's return address at +0x40.
        let mut words = [0u64; 16];
        words[0] = ret;
        words[7] = 0xffff_8880_0000_1000;
        words[8] = ret + 0x40;
        let is_ret = |w: u64| w == ret || w == ret + 0x40;
        let from = |arg: u64| &words[((arg & !7) - rsp) as usize / 8..];
        assert_eq!(
            out_parameter(rsp + 0x20, rsp, task_stack_of(rsp), from(rsp + 0x20), is_ret),
            Some(Range::new(rsp + 0x20, rsp + 0x40))
        );
        assert_eq!(
            out_parameter(rsp + 0x24, rsp, task_stack_of(rsp), from(rsp + 0x24), is_ret),
            Some(Range::new(rsp + 0x24, rsp + 0x40))
        );
        assert_eq!(
            out_parameter(rsp + 0x40, rsp, task_stack_of(rsp), from(rsp + 0x40), is_ret),
            None,
            "a return address is no object"
        );
        assert_eq!(
            out_parameter(rsp, rsp, task_stack_of(rsp), from(rsp), is_ret),
            None,
            "the call's own return address"
        );
        assert_eq!(out_parameter(rsp - 0x20, rsp, task_stack_of(rsp), &words, is_ret), None, "below: the callee's");
        assert_eq!(out_parameter(STACK_B + 0x20, rsp, task_stack_of(rsp), &words, is_ret), None, "another stack");
        // No return address in reach: at most a page, never past the stack.
        let none = [0u64; 600];
        assert_eq!(
            out_parameter(STACK_A + 0x800, STACK_A + 0x700, task_stack_of(STACK_A + 0x700), &none, is_ret),
            Some(Range::new(STACK_A + 0x800, STACK_A + 0x1800))
        );
        assert_eq!(
            out_parameter(STACK_A + 0x3f00, STACK_A + 0x3000, task_stack_of(STACK_A + 0x3000), &none, is_ret),
            Some(Range::new(STACK_A + 0x3f00, STACK_A + 0x4000))
        );
    }

    /// An interrupt stack vmap'd page-aligned lies across two 16 KiB
    /// windows, and two single-page exception stacks share one: each is
    /// one stack by its extent, whatever window its bytes are in.
    #[test]
    fn interrupt_and_exception_stacks_are_judged_by_their_extents() {
        let irq = Range::new(STACK_A + 0x3000, STACK_A + 0x7000);
        let (nmi, db) =
            (Range::new(STACK_B + 0x1000, STACK_B + 0x2000), Range::new(STACK_B + 0x3000, STACK_B + 0x4000));
        let mut r = ReturnPoints::default();
        assert!(!r.set_extents(alloc::vec![irq, Range::new(STACK_A + 0x6000, STACK_A + 0x8000)]), "overlap");
        assert!(r.set_extents(alloc::vec![db, irq, nmi]));
        assert_eq!(r.stack_of(STACK_A + 0x3008), irq);
        assert_eq!(r.stack_of(STACK_A + 0x6ff8), irq);
        assert_eq!(r.stack_of(STACK_A + 0x2ff8), task_stack_of(STACK_A), "below it: a task's window");
        assert!(r.same_stack(STACK_A + 0x3008, STACK_A + 0x6ff8));
        assert!(!r.same_stack(STACK_B + 0x1ff8, STACK_B + 0x3ff8));
        // A handler of M entered high on the interrupt stack, its frames
        // reaching down into the window below: still M's.
        r.remember(point(K, M, 0xa, STACK_A + 0x4008));
        assert_eq!(r.owner(STACK_A + 0x3800), Some((M, Range::new(irq.start, STACK_A + 0x4000))));
        assert_eq!(r.owner(STACK_A + 0x6000), Some((K, Range::new(STACK_A + 0x4000, irq.end))));
        // An NMI's point is no DB stack's, nor dropped by a deeper one there.
        r.remember(point(K, M, 0xb, nmi.end - 0x40));
        r.remember(point(K, OTHER, 0xc, db.end - 0x40));
        assert_eq!(r.owner(nmi.start + 0x10).map(|o| o.0), Some(M));
        assert_eq!(r.owner(db.start + 0x10).map(|o| o.0), Some(OTHER));
        assert!(r.take(K, M, 0xb, nmi.end - 0x40));
        // Out-parameters stay within the stack of the call.
        let none = [0u64; 600];
        assert_eq!(
            out_parameter(STACK_A + 0x3f00, STACK_A + 0x3e00, irq, &none, |_| false),
            Some(Range::new(STACK_A + 0x3f00, STACK_A + 0x4f00))
        );
        assert_eq!(out_parameter(STACK_A + 0x7010, STACK_A + 0x6e00, irq, &none, |_| false), None, "past the stack");
    }

    #[test]
    fn an_out_parameter_goes_with_its_call() {
        let mut r = ReturnPoints::default();
        let w = Range::new(STACK_A + 0x3f40, STACK_A + 0x3f70);
        r.remember_call(point(K, M, 0xa, STACK_A + 0x3f08), &[w]);
        assert_eq!(r.window(M, STACK_A + 0x3f48), Some(w));
        assert_eq!(r.window(OTHER, STACK_A + 0x3f48), None);
        assert!(r.take(K, M, 0xa, STACK_A + 0x3f08));
        assert_eq!(r.window(M, STACK_A + 0x3f48), None, "gone once the call returned");
    }
}
