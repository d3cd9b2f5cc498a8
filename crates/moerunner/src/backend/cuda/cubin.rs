//! What a compiled module (a CUBIN: an ELF file) says about its kernels, read without a GPU: the
//! registers each kernel needs per thread. A kernel launched with B threads a block needs B × its
//! registers of the SM's 65536, or the launch fails ("too many resources requested") — on the GPU,
//! where nothing on the CPU would see it; `tests/cuda.rs` checks every kernel's launch block
//! against its count with NVRTC alone.
//!
//! The counts are in the module's `.nv.info` section: attribute records of `(format u8, attribute
//! u8, size u16, payload)`, where `EIATTR_REGCOUNT` (0x2f) carries `(symbol index u32, registers
//! u32)`; the symbol index names the kernel in `.symtab`. Every read is bounds-checked: a short or
//! malformed file is an error, never a panic.

/// Registers a thread of one SM may use at most, summed over a block's threads.
pub const REGISTERS_PER_SM: u32 = 65536;

const EIATTR_REGCOUNT: u8 = 0x2f;
/// Attribute record formats: 1 no value, 2 one byte, 3 two bytes, 4 a u16 size then that many bytes.
const EIFMT_NVAL: u8 = 1;
const EIFMT_BVAL: u8 = 2;
const EIFMT_HVAL: u8 = 3;
const EIFMT_SVAL: u8 = 4;
const SHT_SYMTAB: u32 = 2;
const SHT_NOBITS: u32 = 8;

/// Each kernel's registers per thread, as `(kernel name, registers)`.
pub fn register_counts(cubin: &[u8]) -> Result<Vec<(String, u32)>, String> {
    let elf = Elf::new(cubin)?;
    let symbols = elf.symbol_names()?;
    let info = elf
        .section_named(".nv.info")?
        .ok_or("the module has no .nv.info section")?;
    let mut counts = Vec::new();
    let mut p = info.0;
    let end = info.0 + info.1;
    while p < end {
        let format = elf.u8(p)?;
        let attribute = elf.u8(p + 1)?;
        p += match format {
            EIFMT_NVAL => 2,
            EIFMT_BVAL => 3,
            EIFMT_HVAL => 4,
            EIFMT_SVAL => {
                let size = elf.u16(p + 2)? as usize;
                if attribute == EIATTR_REGCOUNT && size == 8 {
                    let symbol = elf.u32(p + 4)? as usize;
                    let registers = elf.u32(p + 8)?;
                    let name = symbols
                        .get(symbol)
                        .ok_or_else(|| format!("a register count names symbol {symbol}"))?;
                    counts.push((name.clone(), registers));
                }
                4 + size
            }
            other => return Err(format!(".nv.info: record format {other} at byte {p}")),
        };
    }
    Ok(counts)
}

/// A little-endian ELF64 file, read with bounds checks.
struct Elf<'a> {
    bytes: &'a [u8],
    /// (offset, size, type, link, name) of each section, and the offset of the section-name strings.
    sections: Vec<(usize, usize, u32, usize, u32)>,
    names_at: usize,
}

impl<'a> Elf<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self, String> {
        if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) {
            return Err("not a 64-bit ELF file".into());
        }
        let mut elf = Elf {
            bytes,
            sections: Vec::new(),
            names_at: 0,
        };
        let shoff = elf.u64(0x28)? as usize;
        let entsize = elf.u16(0x3A)? as usize;
        let count = elf.u16(0x3C)? as usize;
        let names = elf.u16(0x3E)? as usize;
        if entsize < 64 {
            return Err(format!("section headers of {entsize} bytes"));
        }
        for i in 0..count {
            let h = shoff
                .checked_add(i * entsize)
                .ok_or("section header offset overflows")?;
            let name = elf.u32(h)?;
            let kind = elf.u32(h + 4)?;
            let offset = elf.u64(h + 0x18)? as usize;
            let size = elf.u64(h + 0x20)? as usize;
            let link = elf.u32(h + 0x28)? as usize;
            // (a NOBITS section — shared memory, .bss — occupies no bytes of the file)
            if kind != SHT_NOBITS && offset.checked_add(size).is_none_or(|e| e > bytes.len()) {
                return Err(format!("section {i} lies outside the file"));
            }
            elf.sections.push((offset, size, kind, link, name));
        }
        elf.names_at = elf.sections.get(names).ok_or("no section-name table")?.0;
        Ok(elf)
    }

    fn field<const N: usize>(&self, at: usize) -> Result<[u8; N], String> {
        at.checked_add(N)
            .and_then(|end| self.bytes.get(at..end))
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("a read of {N} bytes at {at} past the end of the file"))
    }
    fn u8(&self, at: usize) -> Result<u8, String> {
        Ok(self.field::<1>(at)?[0])
    }
    fn u16(&self, at: usize) -> Result<u16, String> {
        self.field(at).map(u16::from_le_bytes)
    }
    fn u32(&self, at: usize) -> Result<u32, String> {
        self.field(at).map(u32::from_le_bytes)
    }
    fn u64(&self, at: usize) -> Result<u64, String> {
        self.field(at).map(u64::from_le_bytes)
    }

    /// The NUL-terminated string at `at`.
    fn string(&self, at: usize) -> Result<String, String> {
        let rest = self
            .bytes
            .get(at..)
            .ok_or("a name past the end of the file")?;
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or("an unterminated name")?;
        Ok(String::from_utf8_lossy(&rest[..len]).into_owned())
    }

    /// (offset, size) of the section called `name`.
    fn section_named(&self, name: &str) -> Result<Option<(usize, usize)>, String> {
        for &(offset, size, _, _, n) in &self.sections {
            if self.string(self.names_at + n as usize)? == name {
                return Ok(Some((offset, size)));
            }
        }
        Ok(None)
    }

    /// The names of `.symtab`'s symbols, by index.
    fn symbol_names(&self) -> Result<Vec<String>, String> {
        let &(offset, size, _, link, _) = self
            .sections
            .iter()
            .find(|s| s.2 == SHT_SYMTAB)
            .ok_or("the module has no symbol table")?;
        let strings = self
            .sections
            .get(link)
            .ok_or("the symbol table names no string table")?
            .0;
        (0..size / 24)
            .map(|i| self.string(strings + self.u32(offset + 24 * i)? as usize))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_a_module_is_refused_without_a_panic() {
        for bytes in [
            &b""[..],
            b"\x7fELF",
            b"\x7fELF\x02\x01\x01",
            &[
                0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ][..],
        ] {
            assert!(register_counts(bytes).is_err(), "{bytes:?}");
        }
        // a header whose section table points past the end
        let mut header = vec![0u8; 64];
        header[..5].copy_from_slice(b"\x7fELF\x02");
        header[0x28..0x30].copy_from_slice(&1_000_000u64.to_le_bytes());
        header[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        header[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        let err = register_counts(&header).unwrap_err();
        assert!(err.contains("past the end"), "{err}");
    }
}
