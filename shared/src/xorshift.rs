//! xorshift64: reproducible pseudo-random numbers without a dependency.

/// A small deterministic pseudo-random generator (xorshift64) for tests
/// and benchmarks that want reproducible "random" input without a
/// dependency. Not for anything that must be unpredictable.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// `seed` 0 would stay 0 forever; it is replaced by a fixed odd value.
    pub fn new(seed: u64) -> XorShift {
        XorShift(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n` (`n` > 0; slightly biased, fine for tests and figures).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `n` bytes (bits 24..32 of each step).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next_u64() >> 24) as u8).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::XorShift;

    #[test]
    fn xorshift_is_reproducible_and_never_stuck_at_zero() {
        let a: Vec<u64> = (0..5)
            .map({
                let mut r = XorShift::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..5)
            .map({
                let mut r = XorShift::new(7);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(XorShift::new(0).next_u64(), 0);
        assert!((0..100).all(|_| XorShift::new(3).below(10) < 10));
        assert_eq!(XorShift::new(1).bytes(33).len(), 33);
    }
}
