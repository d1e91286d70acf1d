//! Key/value cache memory accounting: each sequence reserves its worst case at admission.

pub struct KvBudget {
    capacity: usize,
    used: usize,
    bytes_per_token: usize,
}

impl KvBudget {
    pub fn new(capacity: usize, bytes_per_token: usize) -> Self {
        Self { capacity, used: 0, bytes_per_token }
    }

    pub fn bytes_for(&self, tokens: usize) -> usize {
        tokens.saturating_mul(self.bytes_per_token)
    }

    pub fn try_reserve(&mut self, tokens: usize) -> bool {
        let bytes = self.bytes_for(tokens);
        if self.used + bytes > self.capacity {
            return false;
        }
        self.used += bytes;
        true
    }

    pub fn release(&mut self, tokens: usize) {
        self.used -= self.bytes_for(tokens);
    }

    pub fn used(&self) -> usize {
        self.used
    }
}
