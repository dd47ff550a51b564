//! Direct-mapped slot arrays shared with the kernel programs (`RUNQ_SLOTS`, `DROP_SLOTS`),
//! mapped into the agent's memory: reading every slot is a memory scan, not a lookup syscall
//! per slot. Written by hand because aya maps no array into memory (its `Array` reads one
//! element per syscall).
//!
//! Each slot type is `#[repr(C)]` and starts with a `u64` word that the kernel side changes
//! only by compare-and-swap or exchange (the slot's owner or state); this side reads it with
//! atomics and copies the rest with volatile reads.

use std::{
    num::NonZeroUsize,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Map, MapData, MapError};
use graywatch_common::{DropSlot, RunqSlot};

/// `BPF_F_MMAPABLE`, which a slot array must have been created with.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// A slot type whose first field is the `u64` owner/state word.
///
/// # Safety
/// The type is `#[repr(C)]`, its first field is a `u64`, and any bit pattern is a valid value.
pub unsafe trait Slot: Copy {}

// SAFETY: #[repr(C)], `owner` first, plain integers.
unsafe impl Slot for RunqSlot {}
// SAFETY: #[repr(C)], `state` first, plain integers.
unsafe impl Slot for DropSlot {}

/// Why a slot array could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum SlotsError {
    #[error("`{0}` is not an array map")]
    NotAnArray(&'static str),
    #[error("cannot read `{name}`'s kernel info: {source}")]
    Info {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "`{name}` has {entries} slots of {value_size} bytes, flags {flags:#x}; this agent expects \
         {expected_entries} of {expected_size} bytes, mmapable (agent and agent-ebpf out of sync?)"
    )]
    Layout {
        name: &'static str,
        entries: u32,
        value_size: u32,
        flags: u32,
        expected_entries: u32,
        expected_size: usize,
    },
    #[error("mapping `{name}` into memory failed: {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: nix::Error,
    },
}

/// A kernel array of `count` slots of `T`, mapped shared and writable.
pub struct MappedSlots<T> {
    base: NonNull<T>,
    count: u32,
    bytes: NonZeroUsize,
    name: &'static str,
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory; the kernel side only does atomic adds, exchanges
// and compare-and-swaps on it, and this side reads and writes through atomics or volatile copies.
unsafe impl<T> Send for MappedSlots<T> {}

impl<T> std::fmt::Debug for MappedSlots<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedSlots")
            .field("name", &self.name)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl<T: Slot> MappedSlots<T> {
    /// Maps `map` (named `name`), after checking it is an mmapable array of `count` slots of `T`.
    pub fn new(map: Map, name: &'static str, count: u32) -> Result<Self, SlotsError> {
        let Map::Array(data) = map else {
            return Err(SlotsError::NotAnArray(name));
        };
        let info = data.info().map_err(|source| SlotsError::Info { name, source })?;
        let expected_size = size_of::<T>();
        let layout_error = || SlotsError::Layout {
            name,
            entries: info.max_entries(),
            value_size: info.value_size(),
            flags: info.map_flags(),
            expected_entries: count,
            expected_size,
        };
        // The kernel rounds an mmapable array's values up to 8 bytes: a size that is not a
        // multiple of 8 would not map slot for slot.
        if info.max_entries() != count
            || usize::try_from(info.value_size()).ok() != Some(expected_size)
            || !expected_size.is_multiple_of(8)
            || info.map_flags() & BPF_F_MMAPABLE == 0
        {
            return Err(layout_error());
        }
        let bytes = NonZeroUsize::new(expected_size * count as usize).ok_or_else(layout_error)?;
        // SAFETY: a fresh shared mapping of the map's fd at offset 0, of the array's size (an
        // mmapable array's values start page-aligned, at element size, a multiple of 8).
        let base = unsafe {
            nix::sys::mman::mmap(
                None,
                bytes,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                data.fd(),
                0,
            )
        }
        .map_err(|source| SlotsError::Mmap { name, source })?;
        Ok(Self {
            base: base.cast(),
            count,
            bytes,
            name,
            _map: data,
        })
    }

    /// Slots in the array.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Slot `index` inside the mapping.
    ///
    /// # Panics
    /// `index` out of range (a bug in the caller).
    pub fn slot(&self, index: u32) -> *mut T {
        assert!(index < self.count, "{} slot {index} out of range", self.name);
        // SAFETY: index < count, inside the mapping.
        unsafe { self.base.as_ptr().add(index as usize) }
    }

    /// Slot `index`'s owner/state word.
    pub fn owner(&self, index: u32) -> &AtomicU64 {
        // SAFETY: the 8-byte-aligned first field of a slot inside the mapping (`Slot`), which
        // lives as long as `self`; the kernel changes it only atomically.
        unsafe { AtomicU64::from_ptr(self.slot(index).cast::<u64>()) }
    }

    /// Slot `index`'s owner word (acquire: what the kernel wrote before it is visible) and a
    /// copy of the whole slot.
    pub fn read(&self, index: u32) -> (u64, T) {
        let owner = self.owner(index).load(Ordering::Acquire);
        // SAFETY: inside the mapping; a copy racing with the kernel's atomic adds sees each
        // counter before or after an add, as a hash lookup's copy would.
        let slot = unsafe { std::ptr::read_volatile(self.slot(index)) };
        (owner, slot)
    }

    /// Takes slot `index` back from `held` (its owner word as last read) for the kernel to
    /// claim afresh: `releasing`, then `clear` writes the rest of the slot, then `free`.
    /// Nothing happens if the word changed meanwhile (another owner holds the slot).
    pub fn release(&self, index: u32, held: u64, releasing: u64, free: u64, clear: impl FnOnce(*mut T)) {
        let owner = self.owner(index);
        if owner
            .compare_exchange(held, releasing, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        // While `releasing`, the kernel programs neither claim the slot nor write to it.
        clear(self.slot(index));
        owner.store(free, Ordering::Release);
    }
}

impl<T> Drop for MappedSlots<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this length, not used after this.
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.base.cast(), self.bytes.get()) } {
            tracing::warn!(map = self.name, error = %e, "unmapping a slot array failed");
        }
    }
}
