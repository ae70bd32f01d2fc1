//! The little-endian framing shared by Tidelock's binary bodies (the shard RPC, KV blocks at rest
//! and in transit): a 4-byte magic, a `u16` version and a `u16` kind, then fixed-width fields.
//! Readers check every length against the bytes present before allocating, so a corrupt or
//! hostile body is an error, never a huge allocation.

/// What a body is: its magic, the version this build speaks, and a name for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub magic: [u8; 4],
    pub version: u16,
    pub name: &'static str,
}

/// Why a body cannot be decoded (or a value cannot be encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a {0} body (bad magic)")]
    Magic(&'static str),
    #[error("{what} version {got}, this build speaks {speaks}")]
    Version {
        what: &'static str,
        got: u16,
        speaks: u16,
    },
    #[error("expected a {expected} body, got kind {got}")]
    Kind { expected: &'static str, got: u16 },
    #[error("body truncated: {need} more bytes needed, {have} left")]
    Truncated { need: usize, have: usize },
    #[error("{0} bytes after the end of the body")]
    Trailing(usize),
    #[error("invalid body: {0}")]
    Invalid(String),
}

pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn header(format: &Format, kind: u16, capacity: usize) -> Writer {
        let mut w = Writer(Vec::with_capacity(capacity));
        w.0.extend_from_slice(&format.magic);
        w.u16(format.version);
        w.u16(kind);
        w
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    pub(crate) fn f32s(&mut self, xs: &[f32]) {
        self.0.reserve(xs.len() * 4);
        for x in xs {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
}

pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated {
                need: n,
                have: self.0.len(),
            });
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn f32(&mut self) -> Result<f32, WireError> {
        Ok(f32::from_le_bytes(self.array()?))
    }
    /// `n` floats; the byte count is checked before anything is allocated.
    pub(crate) fn f32s(&mut self, n: u64) -> Result<Vec<f32>, WireError> {
        let bytes = n
            .checked_mul(4)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| WireError::Invalid(format!("{n} floats")))?;
        Ok(self
            .take(bytes)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
    /// Checks the magic, version and kind.
    pub(crate) fn header(
        &mut self,
        format: &Format,
        kind: u16,
        expected: &'static str,
    ) -> Result<(), WireError> {
        if self.0.len() < 4 || self.0[..4] != format.magic {
            return Err(WireError::Magic(format.name));
        }
        self.take(4)?;
        let version = self.u16()?;
        if version != format.version {
            return Err(WireError::Version {
                what: format.name,
                got: version,
                speaks: format.version,
            });
        }
        let got = self.u16()?;
        if got != kind {
            return Err(WireError::Kind { expected, got });
        }
        Ok(())
    }
    /// Refuses `count` items of at least `size` bytes each when the body cannot hold them.
    pub(crate) fn fits(&self, count: u32, size: u64) -> Result<(), WireError> {
        let need = u64::from(count).saturating_mul(size);
        if need > self.0.len() as u64 {
            return Err(WireError::Truncated {
                need: usize::try_from(need).unwrap_or(usize::MAX),
                have: self.0.len(),
            });
        }
        Ok(())
    }
    pub(crate) fn end(&self) -> Result<(), WireError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

/// `a * b * c` as a count, or an error naming what overflowed.
pub(crate) fn product(parts: &[u64], what: &str) -> Result<u64, WireError> {
    parts
        .iter()
        .try_fold(1u64, |acc, &p| acc.checked_mul(p))
        .ok_or_else(|| WireError::Invalid(format!("{what} overflows")))
}
