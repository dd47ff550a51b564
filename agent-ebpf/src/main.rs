//! graywatch kernel programs. One module per signal family; each program is a thin entry point
//! that calls a `try_` function, and all aggregation happens in maps so the hot path never wakes
//! user space per packet.
#![no_std]
#![no_main]
// Atomic adds on map values (see maps::add_u64); built with RUSTC_BOOTSTRAP like aya-ebpf itself.
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "core_intrinsics is internal; see the line above")]

mod cpu_contention;
mod maps;
mod memory_pressure;
mod net_latency;
mod net_loss;
mod sock;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this, so it is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
