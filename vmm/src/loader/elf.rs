//! Checks an ELF kernel before linux-loader reads it: linux-loader trusts the headers, so a
//! PT_NOTE claiming 1 TiB (in a sparse file of that size) makes it walk notes 12 bytes at a
//! time for hours, and an ELF for another machine is loaded and run. Here every segment it will
//! read must lie inside the file, notes are bounded, and the class and machine must be ours.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// ELF64 header and program header sizes, and the offsets we read in them.
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: u64 = 56;
const EI_CLASS: usize = 4;
const ELFCLASS64: u8 = 2;
const EI_DATA: usize = 5;
const ELFDATA2LSB: u8 = 1;
const E_ENTRY: usize = 24;
const E_MACHINE: usize = 18;
const EM_X86_64: u16 = 62;
const E_PHOFF: usize = 32;
const E_PHENTSIZE: usize = 54;
const E_PHNUM: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// A vmlinux's notes (Xen/PVH entry, build id, Linux version) take a few hundred bytes.
pub const MAX_NOTE_SEGMENT: u64 = 64 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("is a 32-bit ELF; chapeau boots 64-bit x86_64 kernels")]
    Not64Bit,
    #[error("is an ELF for {0}, not x86_64")]
    WrongMachine(String),
    #[error("has a truncated ELF header")]
    ShortHeader,
    #[error("has program headers of {0} bytes, not 56")]
    PhdrSize(u16),
    #[error("has program headers beyond the end of the file ({size} bytes)")]
    PhdrsOutside { size: u64 },
    #[error(
        "has segment {index} (offset {offset:#x}, {filesz} bytes) beyond the end of the file \
         ({size} bytes)"
    )]
    SegmentOutside {
        index: u16,
        offset: u64,
        filesz: u64,
        size: u64,
    },
    #[error("has a note segment of {filesz} bytes (segment {index}); at most {MAX_NOTE_SEGMENT} are read")]
    NoteTooLarge { index: u16, filesz: u64 },
    #[error("has segment {index} ending at guest address {end:#x}, beyond the VM's {ram} bytes of memory")]
    SegmentBeyondRam { index: u16, end: u64, ram: u64 },
    #[error("is a big-endian ELF")]
    BigEndian,
    #[error("has its entry point at {entry:#x}, below {min:#x}")]
    EntryTooLow { entry: u64, min: u64 },
    #[error("cannot be read: {0}")]
    Read(String),
}

/// A PT_LOAD segment with file bytes: `filesz` bytes from `offset` go to guest address
/// `paddr`; up to `memsz` the rest is zeros (fresh guest RAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// What loading needs from a checked ELF kernel.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

fn machine_name(machine: u16) -> String {
    match machine {
        3 => "i386".into(),
        8 => "MIPS".into(),
        20 => "PowerPC".into(),
        21 => "PowerPC64".into(),
        22 => "s390".into(),
        40 => "ARM".into(),
        183 => "AArch64".into(),
        243 => "RISC-V".into(),
        258 => "LoongArch".into(),
        other => format!("machine {other}"),
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// Checks the ELF kernel in `file` (of `size` bytes) for a VM of `ram` bytes (its highest guest
/// address + 1) whose kernel entry must be at `min_entry` or above. Reads only the headers: 64
/// bytes plus 56 per program header. Returns the entry point and the PT_LOAD segments with
/// file bytes, in file order (the order they are loaded in: a later one wins where two overlap).
pub fn check(file: &File, size: u64, ram: u64, min_entry: u64) -> Result<Checked, ElfError> {
    let read = |buf: &mut [u8], offset: u64| {
        file.read_exact_at(buf, offset)
            .map_err(|e| ElfError::Read(e.to_string()))
    };
    if size < EHDR_SIZE as u64 {
        return Err(ElfError::ShortHeader);
    }
    let mut ehdr = [0u8; EHDR_SIZE];
    read(&mut ehdr, 0)?;
    if ehdr[EI_CLASS] != ELFCLASS64 {
        return Err(ElfError::Not64Bit);
    }
    if ehdr[EI_DATA] != ELFDATA2LSB {
        return Err(ElfError::BigEndian);
    }
    let machine = u16_at(&ehdr, E_MACHINE);
    if machine != EM_X86_64 {
        return Err(ElfError::WrongMachine(machine_name(machine)));
    }
    let phentsize = u16_at(&ehdr, E_PHENTSIZE);
    if u64::from(phentsize) != PHDR_SIZE {
        return Err(ElfError::PhdrSize(phentsize));
    }
    let entry = u64_at(&ehdr, E_ENTRY);
    if entry < min_entry {
        return Err(ElfError::EntryTooLow {
            entry,
            min: min_entry,
        });
    }
    let phoff = u64_at(&ehdr, E_PHOFF);
    let phnum = u16_at(&ehdr, E_PHNUM);
    let phdrs_end = phoff.checked_add(u64::from(phnum) * PHDR_SIZE);
    if phoff < EHDR_SIZE as u64 || phdrs_end.is_none_or(|end| end > size) {
        return Err(ElfError::PhdrsOutside { size });
    }
    let mut phdr = [0u8; PHDR_SIZE as usize];
    let mut loaded = Vec::new();
    for index in 0..phnum {
        read(&mut phdr, phoff + u64::from(index) * PHDR_SIZE)?;
        let p_type = u32_at(&phdr, 0);
        let offset = u64_at(&phdr, 8);
        let paddr = u64_at(&phdr, 24);
        let filesz = u64_at(&phdr, 32);
        let memsz = u64_at(&phdr, 40);
        // PT_LOAD segments are loaded; notes are bounded (linux-loader walked them, and a
        // kernel with a 1 TiB note is no kernel); the rest is skipped.
        if p_type != PT_LOAD && p_type != PT_NOTE {
            continue;
        }
        if offset.checked_add(filesz).is_none_or(|end| end > size) {
            return Err(ElfError::SegmentOutside {
                index,
                offset,
                filesz,
                size,
            });
        }
        if p_type == PT_NOTE && filesz > MAX_NOTE_SEGMENT {
            return Err(ElfError::NoteTooLarge { index, filesz });
        }
        if p_type == PT_LOAD && filesz > 0 {
            let end = paddr.checked_add(memsz.max(filesz));
            if end.is_none_or(|end| end > ram) {
                return Err(ElfError::SegmentBeyondRam {
                    index,
                    end: end.unwrap_or(u64::MAX),
                    ram,
                });
            }
            loaded.push(Segment {
                offset,
                paddr,
                filesz,
                memsz,
            });
        }
    }
    Ok(Checked {
        entry,
        segments: loaded,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal x86_64 ELF header with `phnum` program headers right after it.
    pub(crate) fn header(phnum: u16) -> Vec<u8> {
        let mut h = vec![0u8; EHDR_SIZE];
        h[..4].copy_from_slice(b"\x7fELF");
        h[EI_CLASS] = ELFCLASS64;
        h[5] = 1; // little endian
        h[6] = 1; // EV_CURRENT
        h[E_MACHINE..E_MACHINE + 2].copy_from_slice(&EM_X86_64.to_le_bytes());
        h[E_ENTRY..E_ENTRY + 8].copy_from_slice(&0x100_0000u64.to_le_bytes());
        h[E_PHOFF..E_PHOFF + 8].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        h[E_PHENTSIZE..E_PHENTSIZE + 2].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        h[E_PHNUM..E_PHNUM + 2].copy_from_slice(&phnum.to_le_bytes());
        h
    }

    pub(crate) fn phdr(p_type: u32, offset: u64, paddr: u64, filesz: u64) -> Vec<u8> {
        let mut p = vec![0u8; PHDR_SIZE as usize];
        p[..4].copy_from_slice(&p_type.to_le_bytes());
        p[8..16].copy_from_slice(&offset.to_le_bytes());
        p[24..32].copy_from_slice(&paddr.to_le_bytes());
        p[32..40].copy_from_slice(&filesz.to_le_bytes());
        p[40..48].copy_from_slice(&filesz.to_le_bytes());
        p
    }

    fn check_bytes(bytes: &[u8], size: u64) -> Result<Checked, ElfError> {
        let path = std::env::temp_dir().join(format!(
            "chapeau-elf-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        file.set_len(size.max(bytes.len() as u64)).ok();
        let file_size = file.metadata().unwrap().len();
        let result = check(&file, file_size, 64 << 20, 0x10_0000);
        std::fs::remove_file(&path).unwrap();
        result
    }

    #[test]
    fn header_fields_are_checked() {
        let mut elf = header(1);
        elf.extend(phdr(PT_LOAD, 0, 0x100_0000, 64));
        assert_eq!(
            check_bytes(&elf, 0),
            Ok(Checked {
                entry: 0x100_0000,
                segments: vec![Segment {
                    offset: 0,
                    paddr: 0x100_0000,
                    filesz: 64,
                    memsz: 64
                }]
            })
        );
        let mut big_endian = elf.clone();
        big_endian[EI_DATA] = 2;
        assert_eq!(check_bytes(&big_endian, 0), Err(ElfError::BigEndian));
        let mut low = elf.clone();
        low[E_ENTRY..E_ENTRY + 8].copy_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(
            check_bytes(&low, 0),
            Err(ElfError::EntryTooLow {
                entry: 0x1000,
                min: 0x10_0000
            })
        );

        let mut arm = elf.clone();
        arm[E_MACHINE..E_MACHINE + 2].copy_from_slice(&183u16.to_le_bytes());
        assert_eq!(
            check_bytes(&arm, 0),
            Err(ElfError::WrongMachine("AArch64".into()))
        );
        let mut elf32 = elf.clone();
        elf32[EI_CLASS] = 1;
        assert_eq!(check_bytes(&elf32, 0), Err(ElfError::Not64Bit));
        let mut many = elf.clone();
        many[E_PHNUM..E_PHNUM + 2].copy_from_slice(&1000u16.to_le_bytes());
        assert!(matches!(
            check_bytes(&many, 0),
            Err(ElfError::PhdrsOutside { .. })
        ));
        assert_eq!(check_bytes(&elf[..40], 0), Err(ElfError::ShortHeader));
    }

    #[test]
    fn segments_must_lie_in_the_file_and_in_ram() {
        let mut past_end = header(1);
        past_end.extend(phdr(PT_LOAD, 0, 0x100_0000, 4096));
        assert_eq!(
            check_bytes(&past_end, 0),
            Err(ElfError::SegmentOutside {
                index: 0,
                offset: 0,
                filesz: 4096,
                size: 120
            })
        );
        let mut wrapping = header(1);
        wrapping.extend(phdr(PT_NOTE, u64::MAX, 0, 2));
        assert!(matches!(
            check_bytes(&wrapping, 0),
            Err(ElfError::SegmentOutside { .. })
        ));
        let mut high = header(1);
        high.extend(phdr(PT_LOAD, 0, 0x1_0000_0000, 64));
        assert!(matches!(
            check_bytes(&high, 0),
            Err(ElfError::SegmentBeyondRam { .. })
        ));
    }
}
