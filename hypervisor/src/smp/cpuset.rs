//! Sets of CPUs, by the hypervisor's CPU index (0 is the boot CPU, the
//! others follow the firmware's MADT order), and the `cpus=` list syntax.

use core::fmt;

/// The most CPUs the hypervisor runs on.
pub const MAX_CPUS: usize = 256;

const WORDS: usize = MAX_CPUS / 64;

/// A set of CPU indices below [`MAX_CPUS`].
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CpuSet([u64; WORDS]);

impl CpuSet {
    pub const fn new() -> Self {
        CpuSet([0; WORDS])
    }

    /// CPUs `0..count`.
    pub fn first(count: usize) -> Self {
        let mut s = CpuSet::new();
        (0..count.min(MAX_CPUS)).for_each(|c| s.insert(c));
        s
    }

    pub fn single(cpu: usize) -> Self {
        let mut s = CpuSet::new();
        s.insert(cpu);
        s
    }

    /// Adds a CPU; indices past [`MAX_CPUS`] are ignored (callers check).
    pub fn insert(&mut self, cpu: usize) {
        if cpu < MAX_CPUS {
            self.0[cpu / 64] |= 1 << (cpu % 64);
        }
    }

    pub fn remove(&mut self, cpu: usize) {
        if cpu < MAX_CPUS {
            self.0[cpu / 64] &= !(1 << (cpu % 64));
        }
    }

    pub fn contains(&self, cpu: usize) -> bool {
        cpu < MAX_CPUS && self.0[cpu / 64] & (1 << (cpu % 64)) != 0
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// The lowest CPU in the set.
    pub fn lowest(&self) -> Option<usize> {
        self.iter().next()
    }

    /// Whether every CPU of `self` is in `other`.
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.0.iter().zip(other.0.iter()).all(|(a, b)| a & !b == 0)
    }

    pub fn intersects(&self, other: &CpuSet) -> bool {
        self.0.iter().zip(other.0.iter()).any(|(a, b)| a & b != 0)
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_CPUS).filter(|&c| self.contains(c))
    }

    /// Parses a `cpus=` value: comma-separated indices and inclusive ranges,
    /// `0-3`, `0,2`, `1-2,5`. Empty lists, reversed ranges and indices past
    /// [`MAX_CPUS`] are refused.
    pub fn parse(s: &str) -> Option<CpuSet> {
        let mut set = CpuSet::new();
        for part in s.split(',') {
            let index = |t: &str| t.parse::<usize>().ok().filter(|&c| c < MAX_CPUS);
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (index(a)?, index(b)?),
                None => (index(part)?, index(part)?),
            };
            if first > last {
                return None;
            }
            (first..=last).for_each(|c| set.insert(c));
        }
        (!set.is_empty()).then_some(set)
    }
}

/// Shown the way `cpus=` takes it: `0-3,6`.
impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cpus = self.iter().peekable();
        let mut first = true;
        while let Some(start) = cpus.next() {
            let mut end = start;
            while cpus.peek() == Some(&(end + 1)) {
                end = cpus.next().unwrap_or(end);
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec::Vec;

    #[test]
    fn lists_and_ranges_parse() {
        let s = CpuSet::parse("0-3").unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 1, 2, 3]);
        let s = CpuSet::parse("1,5-6,255").unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), [1, 5, 6, 255]);
        assert_eq!(s.len(), 4);
        assert_eq!(s.lowest(), Some(1));
        assert_eq!(format!("{s}"), "1,5-6,255");
        assert_eq!(format!("{}", CpuSet::parse("0-2,3").unwrap()), "0-3");
    }

    #[test]
    fn hostile_lists_are_refused() {
        for bad in ["", ",", "3-1", "256", "0-256", "a", "-", "1-", "-1", "0,,1", "99999999999999999999", " 1"] {
            assert_eq!(CpuSet::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn set_operations() {
        let a = CpuSet::first(4);
        let mut b = CpuSet::single(2);
        assert!(b.is_subset(&a) && a.intersects(&b) && !a.is_subset(&b));
        b.insert(70);
        assert!(!b.is_subset(&a));
        b.remove(2);
        assert!(!a.intersects(&b));
        b.insert(MAX_CPUS + 3);
        assert_eq!(b.len(), 1);
        assert!(!b.contains(MAX_CPUS + 3));
        assert_eq!(format!("{}", CpuSet::new()), "none");
    }
}
