//! Uniform, bounds-checked access to the bytes of a frame for both program types.
//!
//! XDP reads packet memory directly (every read checked against `data_end`); TC reads
//! the linear part of the skb the same way and the rest with `bpf_skb_load_bytes`,
//! which also reaches the non-linear part (GSO super-frames written by a guest keep
//! their headers there on some paths).

use aya_ebpf::{
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

/// Largest header offset the parser reads at. Bounding offsets keeps the verifier
/// able to prove every packet access in range.
pub const MAX_HEADER_OFFSET: usize = 1024;

pub trait Frame {
    /// Length of the whole frame from its Ethernet header, in bytes.
    fn frame_len(&self) -> u32;
    /// The `size_of::<T>()` bytes at `offset`, or `None` when the frame is shorter.
    ///
    /// `T` is at least two bytes: for a one-byte load LLVM rewrites the bounds check
    /// `p + 1 > end` into `p >= end`, a form this kernel's verifier does not turn into
    /// a packet range. Single header bytes are read together with a neighbour
    /// ([`load_pair`]).
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
    /// Copies the frame's first `len` bytes (1 to the size of the buffer) to `dst`, with
    /// the kernel's copy helper (which also reaches non-linear data); false on failure.
    ///
    /// # Safety
    /// `dst` must be writable for `len` bytes.
    unsafe fn copy_prefix(&self, dst: *mut u8, len: u32) -> bool;
    /// The TCI of an outer VLAN tag the kernel took out of the frame before the program
    /// ran (TC: the receive path moves the first 802.1Q/802.1ad tag into the skb), so
    /// that every hook sees the same tags.
    fn offloaded_vlan(&self) -> Option<u16>;
    /// Leaves `tag` (see `conntrack::TAG_VALID`) on the frame for `to_port`: which
    /// receiver the ingress program judged it for. TC keeps it in the skb's `tc_index`,
    /// which the bridge carries from the ingress port to the egress port; XDP has no skb
    /// to keep it in, so its frames are judged again at egress where it matters.
    fn set_receiver_tag(&self, tag: u16);
}

impl Frame for XdpContext {
    #[inline(always)]
    fn frame_len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }

    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        const { assert!(core::mem::size_of::<T>() >= 2) };
        if offset > MAX_HEADER_OFFSET {
            return None;
        }
        let start = self.data() + offset;
        if start + core::mem::size_of::<T>() > self.data_end() {
            return None;
        }
        // SAFETY: the range [start, start + size_of::<T>()) lies inside the frame,
        // checked just above; T is plain old data read without alignment.
        Some(unsafe { core::ptr::read_unaligned(start as *const T) })
    }

    #[inline(always)]
    unsafe fn copy_prefix(&self, dst: *mut u8, len: u32) -> bool {
        // SAFETY: the context is the one the kernel passed; `dst` is writable for `len`
        // bytes (the caller's promise); the helper checks the frame's bounds.
        unsafe { bpf_xdp_load_bytes(self.ctx, 0, dst.cast(), len) == 0 }
    }

    #[inline(always)]
    fn offloaded_vlan(&self) -> Option<u16> {
        // Generic and native XDP see the frame as it came, tags included.
        None
    }

    #[inline(always)]
    fn set_receiver_tag(&self, _tag: u16) {}
}

impl Frame for TcContext {
    #[inline(always)]
    fn frame_len(&self) -> u32 {
        self.len()
    }

    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        const { assert!(core::mem::size_of::<T>() >= 2) };
        if offset > MAX_HEADER_OFFSET {
            return None;
        }
        // Headers are nearly always in the linear part: read them in place. What lies
        // beyond it (a GSO frame's headers in a fragment) is copied by the helper.
        let start = self.data() + offset;
        if start + core::mem::size_of::<T>() <= self.data_end() {
            // SAFETY: the range lies inside the skb's linear data, checked just above;
            // T is plain old data read without alignment.
            return Some(unsafe { core::ptr::read_unaligned(start as *const T) });
        }
        TcContext::load::<T>(self, offset).ok()
    }

    #[inline(always)]
    unsafe fn copy_prefix(&self, dst: *mut u8, len: u32) -> bool {
        // SAFETY: as for XDP: the kernel's skb, a writable destination, a checked copy.
        unsafe { bpf_skb_load_bytes(self.skb.skb as *const _, 0, dst.cast(), len) == 0 }
    }

    #[inline(always)]
    fn offloaded_vlan(&self) -> Option<u16> {
        // SAFETY: the context pointer is the skb the kernel handed to this program.
        let skb = unsafe { &*self.skb.skb };
        if skb.vlan_present != 0 { Some(skb.vlan_tci as u16) } else { None }
    }

    #[inline(always)]
    fn set_receiver_tag(&self, tag: u16) {
        set_tc_index(self.skb.skb, u32::from(tag));
    }
}

/// Writes the skb's `tc_index`. A function of its own: inlined, LLVM keeps the field's
/// address in a register between writes, and the verifier allows a write to the context
/// only at a constant offset from the unmodified context pointer.
#[inline(never)]
fn set_tc_index(skb: *mut aya_ebpf::bindings::__sk_buff, value: u32) {
    // SAFETY: `skb` is the context the kernel handed to the program; `tc_index` is one
    // of the fields a TC program may write.
    unsafe { (*skb).tc_index = value };
}

/// The tag an ingress program left on the skb (`tc_index`), 0 when none.
#[inline(always)]
pub fn receiver_tag(ctx: &TcContext) -> u16 {
    // SAFETY: the context pointer is the skb the kernel handed to this program.
    unsafe { (*ctx.skb.skb).tc_index as u16 }
}

/// Reads a big-endian `u16` at `offset`.
#[inline(always)]
pub fn load_be16<F: Frame>(frame: &F, offset: usize) -> Option<u16> {
    frame.load::<[u8; 2]>(offset).map(u16::from_be_bytes)
}

/// Reads the two bytes at `offset` as `[byte at offset, byte at offset + 1]`.
#[inline(always)]
pub fn load_pair<F: Frame>(frame: &F, offset: usize) -> Option<[u8; 2]> {
    frame.load::<[u8; 2]>(offset)
}
